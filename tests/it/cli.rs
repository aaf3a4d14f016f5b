//! The `wsgate` command: --check-config, --help, quick mode, and refusing bad configs.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn wsgate(args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_wsgate")).args(args),
        Duration::from_secs(60),
    )
}

#[test]
fn check_config_accepts_the_example() {
    let out = wsgate(&[
        "--check-config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn bad_config_names_key_and_line_and_does_not_start() {
    let dir = TempDir::new();
    let cases = [
        ("[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nidle_timout = \"5s\"\n", "line 4", "idle_timout"),
        ("[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"ftp://x\"\n", "line 5", "backend"),
        ("[[listen]]\naddr = \"nowhere\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n", "line 2", "addr"),
        ("[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\nmessage = \"morse\"\n", "line 6", "morse"),
    ];
    for (i, (text, line, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        for flag in ["--check-config", "--config"] {
            let out = wsgate(&[flag, path.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} case {i}: {err}");
            assert!(
                err.contains(line) && err.contains(key),
                "{flag} case {i}: {err}"
            );
        }
    }
}

/// RUST_LOG picks what is logged: per target ("info,wsgate::server::accept=debug"), by span
/// ("info,[conn]=debug": debug lines of connections only), and a value wsgate cannot read is
/// named on stderr and logging goes on at info.
#[tokio::test]
async fn rust_log_filters_by_target_and_by_span() {
    let toml = "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections = 1\n\
                [[route]]\npath = \"/\"\nbackend = \"echo\"\n";
    // A target's debug lines: the second connection over max_connections.
    let gate = GateProcess::start_logging(toml, &[], "info,wsgate::server::accept=debug");
    let _held = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let (over, _) = upgrade_head(gate.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(over.status, 503);
    gate.wait_for_log("over max_connections: refused at accept");
    drop(gate);
    // A span's debug lines: hyper's error for a request that is not HTTP, in the conn span.
    let gate = GateProcess::start_logging(toml, &[], "info,[conn]=debug");
    let refused = raw_request(gate.addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(refused.status, 400);
    let line = gate.wait_for_log("http connection error");
    assert!(line.contains("conn{id="), "{line}");
    drop(gate);
    // Not understood: named, and info still logged (the listener line was waited for).
    let gate = GateProcess::start_logging(toml, &[], "wsgate=[[");
    let line = gate.wait_for_log("RUST_LOG");
    assert!(line.contains("not understood"), "{line}");
}

#[test]
fn help_describes_quick_mode() {
    let out = wsgate(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--config") && text.contains("--check-config") && text.contains("LISTEN")
    );
}

#[tokio::test]
async fn quick_mode_bridges_every_path_to_the_target() {
    let backend = echo_backend().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["127.0.0.1:0", &backend.to_string()])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let addr = loop {
        let line = lines.next().expect("wsgate exited").unwrap();
        if line.contains("listening") {
            break line.split("addr=").nth(1).unwrap().trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/any/path"))
        .await
        .unwrap();
    ws.send(Message::binary(b"quick".to_vec())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(b"quick".to_vec())
    );
    // SIGTERM: drains and exits 0.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    // Wait off the runtime: the echo backend runs on it and must see wsgate's FIN.
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
