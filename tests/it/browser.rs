//! A real browser: headless Chromium (Debian's `chromium`, driven over the DevTools protocol
//! by tests/browser/cdp_driver.py) runs tests/browser/page.html, which uses the browser's own
//! WebSocket API against wsgate over wss. The test CA is trusted through an NSS database in
//! the browser profile (no certificate-error flag).

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command) {
    let out = output_within(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_over_wss_bridge_proxy_and_close_codes() {
    let chromium = chromium();
    let dir = TempDir::new();
    let d = dir.path().display().to_string();
    gen_certs(dir.path(), "ec", "server", "localhost");
    // Trust the test CA the way Chromium on Linux does: the NSS database under $HOME.
    let profile = dir.path().join("profile");
    let nssdb = format!("sql:{}/.pki/nssdb", profile.display());
    std::fs::create_dir_all(profile.join(".pki/nssdb")).unwrap();
    run(Command::new("certutil").args(["-d", &nssdb, "-N", "--empty-password"]));
    run(Command::new("certutil").args([
        "-d",
        &nssdb,
        "-A",
        "-t",
        "C,,",
        "-n",
        "wsgate-test-ca",
        "-i",
        &format!("{d}/ca.crt"),
    ]));

    let echo = echo_backend().await;
    let fin = backend(|mut s| async move {
        let _ = s.write_all(b"bye").await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
    })
    .await;
    let app = backend(|s| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        while let Some(Ok(m)) = ws.next().await {
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                break;
            }
        }
    })
    .await;
    let gate = GateProcess::start(&format!(
        r#"
[[listen]]
addr = "127.0.0.1:0"
tls = {{ cert = "{d}/server.crt", key = "{d}/server.key" }}
[limits]
max_message_size = "64KiB"
drain_timeout = "300ms"
[[route]]
path = "/tcp"
backend = "tcp://{echo}"
subprotocols = ["binary", "chat"]
[[route]]
path = "/fin"
backend = "tcp://{fin}"
[[route]]
path = "/echo"
backend = "echo"
[[route]]
path = "/app"
backend = "ws://{app}"
"#
    ));
    std::fs::copy(
        format!("{ROOT}/tests/browser/page.html"),
        dir.path().join("page.html"),
    )
    .unwrap();
    let url = format!(
        "file://{d}/page.html?base=wss://localhost:{}",
        gate.addr.port()
    );
    let pid = gate.child.id().to_string();
    let profile_dir = profile.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        output_within(
            Command::new(python())
                .arg(format!("{ROOT}/tests/browser/cdp_driver.py"))
                .args([chromium, &url, &pid, &profile_dir]),
            Duration::from_secs(120),
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "driver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r: serde_json::Value = serde_json::from_str(outer.as_str().expect("page results")).unwrap();
    eprintln!("page saw: {r:#}");

    let bridge = &r["bridge"];
    assert_eq!(bridge["protocol"], "chat", "{r:#}");
    assert_eq!(bridge["text"], "héllo wörld");
    assert_eq!(bridge["binaryOk"], true);
    // CONNECTING → OPEN → CLOSING → CLOSED
    assert_eq!(bridge["states"], serde_json::json!([0, 1, 2, 3]));
    assert_eq!(bridge["close"]["code"], 1000);
    assert_eq!(bridge["close"]["reason"], "done");
    assert_eq!(bridge["close"]["wasClean"], true);

    assert_eq!(r["backendFin"]["data"], "bye");
    assert_eq!(r["backendFin"]["close"]["code"], 1000);
    assert_eq!(r["tooBig"]["close"]["code"], 1009);
    assert_eq!(r["proxy"]["text"], "via the proxy route");
    assert_eq!(r["proxy"]["close"]["code"], 1000);
    assert_eq!(r["shutdown"]["close"]["code"], 1001);
    assert_eq!(r["shutdown"]["close"]["reason"], "server shutting down");
}
