//! examples/chat: the tutorials' chat rebuilt as a line-protocol TCP service
//! (examples/chat/server.py, no WebSocket code) behind a wsgate text route with
//! `framing = "lines"`, its page served by the same route. Three Chromium pages
//! (tests/browser/chat_driver.py) register ids; a message to one id reaches that page only,
//! including one over 64 KiB of non-ASCII text.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn three_browsers_chat_through_a_line_route() {
    let mut server = Command::new(python())
        .arg(format!("{ROOT}/examples/chat/server.py"))
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the chat server");
    let stdout = server.stdout.take().unwrap();
    let _server = KillOnDrop(server);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(WAIT)
        .expect("the chat server's address in time");
    let chat_addr = line.trim().rsplit(' ').next().unwrap().to_owned();

    // examples/chat/wsgate.toml with test addresses.
    let example = std::fs::read_to_string(format!("{ROOT}/examples/chat/wsgate.toml")).unwrap();
    let config = example
        .replace("127.0.0.1:8090", "127.0.0.1:0")
        .replace("tcp://127.0.0.1:9000", &format!("tcp://{chat_addr}"))
        .replace(
            "static = \"web\"",
            &format!("static = \"{ROOT}/examples/chat/web\""),
        );
    assert!(
        config.contains(&chat_addr),
        "the example config changed shape"
    );
    let gate = GateProcess::start(&config);

    let chromium = chromium();
    let profile = TempDir::new();
    let result = json_output(
        Command::new(python())
            .arg(format!("{ROOT}/tests/browser/chat_driver.py"))
            .arg(chromium)
            .arg(profile.path())
            .arg(format!("http://{}/", gate.addr)),
        Duration::from_secs(120),
    );
    assert!(result["long_utf8_bytes"].as_u64().unwrap() > 64 * 1024);
    let registered = serde_json::json!({"type": "system", "message": "Initial message received"});
    let usermsg = |name: &str, message: &str, color: &str| serde_json::json!({"type": "usermsg", "name": name, "message": message, "color": color});
    assert_eq!(
        result["pages"],
        serde_json::json!([
            [registered, usermsg("three", "from three — ✓", "#0000ff")],
            [
                registered,
                usermsg("one", "<long message, intact>", "#ff0000")
            ],
            [registered, usermsg("two", "from two", "#00aa00")],
        ]),
        "each page got its registration answer and the one message sent to its id"
    );
}
