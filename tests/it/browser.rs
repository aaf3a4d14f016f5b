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

/// Makes a Chromium profile folder whose NSS database (under $HOME, as Chromium on Linux
/// reads it) trusts the CA at `ca`: no certificate-error flag needed.
pub fn trust_in_profile(profile: &std::path::Path, ca: &std::path::Path) {
    let nssdb = format!("sql:{}/.pki/nssdb", profile.display());
    std::fs::create_dir_all(profile.join(".pki/nssdb")).unwrap();
    run(Command::new("certutil").args(["-d", &nssdb, "-N", "--empty-password"]));
    run(Command::new("certutil")
        .args([
            "-d",
            &nssdb,
            "-A",
            "-t",
            "C,,",
            "-n",
            "wsgate-test-ca",
            "-i",
        ])
        .arg(ca));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_over_wss_bridge_proxy_and_close_codes() {
    let chromium = chromium();
    let dir = TempDir::new();
    let d = dir.path().display().to_string();
    gen_certs(dir.path(), "ec", "server", "localhost");
    let profile = dir.path().join("profile");
    trust_in_profile(&profile, &dir.path().join("ca.crt"));

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

/// Chromium loads a page from wsgate over HTTP/2 and opens 20 WebSockets to the same origin:
/// each goes as an extended CONNECT stream (RFC 8441) on the page's own connection (every
/// handshake 200, one TCP connection at the server), and every echo comes back intact.
#[test]
fn chromium_opens_twenty_websockets_on_the_pages_http2_connection() {
    let dir = TempDir::new();
    let d = dir.path().display().to_string();
    gen_certs(dir.path(), "ec", "server", "localhost");
    let profile = dir.path().join("profile");
    trust_in_profile(&profile, &dir.path().join("ca.crt"));
    let web = dir.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::copy(
        format!("{ROOT}/tests/browser/h2_page.html"),
        web.join("index.html"),
    )
    .unwrap();
    let gate = GateProcess::start_logging(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{d}/server.crt\", key = \"{d}/server.key\" }}\n\
         [admin]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/\"\nbackend = \"echo\"\nstatic = \"{}\"\n\
         [[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
        web.display()
    ), &[], "info,wsgate::server::h2=debug");
    let url = format!("https://localhost:{}/index.html?n=20", gate.addr.port());
    let report = json_output(
        Command::new(python())
            .arg(format!("{ROOT}/tests/browser/h2_driver.py"))
            .arg(chromium())
            .arg(&profile)
            .arg(&url),
        Duration::from_secs(120),
    );
    eprintln!("chromium saw: {report:#}");
    assert_eq!(report["page"]["opened"], 20, "{report:#}");
    assert_eq!(report["page"]["echoed"], 20, "{report:#}");
    assert_eq!(report["page"]["errors"], serde_json::json!([]));
    assert_eq!(
        report["page_protocol"],
        serde_json::json!(["h2"]),
        "the page came over h2"
    );
    assert_eq!(
        report["handshakes"],
        serde_json::json!(vec![200; 20]),
        "RFC 8441 answers 200"
    );
    // At the server: 20 sessions over HTTP/2, all from one client port (one connection).
    gate.wait_for_log_lines("session ended", 20);
    let log = gate.log_text();
    let upgraded: Vec<&str> = log.lines().filter(|l| l.contains(" upgraded ")).collect();
    assert_eq!(upgraded.len(), 20, "{log}");
    assert!(
        upgraded.iter().all(|l| l.contains("http_version=\"2\"")),
        "{log}"
    );
    let peers: std::collections::HashSet<_> = upgraded
        .iter()
        .filter_map(|l| log_addr_after(l, "peer="))
        .collect();
    assert_eq!(peers.len(), 1, "one TCP connection: {peers:?}");
    let admin = gate.admin.unwrap();
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { http_get(admin, "/metrics").await.1 });
    let m = parse_metrics(&metrics);
    assert_eq!(
        m.get("wsgate_sessions_total{route=\"/echo\",http_version=\"2\"}"),
        Some(&20.0)
    );
    // Chromium may also open a spare connection it never uses (a preconnect): every
    // connection it made is closed by now (the browser has exited), and only one carried
    // requests — the page's, with the page and the 20 sockets on it.
    let connections = *m.get("wsgate_http2_connections_total").unwrap() as usize;
    gate.wait_for_log_lines("http/2 connection closed", connections);
    let log = gate.log_text();
    let used: Vec<(String, u64)> = log
        .lines()
        .filter(|l| l.contains("http/2 connection closed"))
        .filter_map(|l| {
            let streams = log_addr_after(l, "streams=")?.parse().ok()?;
            Some((log_addr_after(l, "peer=")?, streams))
        })
        .filter(|(_, streams)| *streams > 0)
        .collect();
    assert_eq!(used.len(), 1, "one connection carried requests: {used:?}");
    assert!(
        peers.contains(&used[0].0) && used[0].1 >= 21,
        "the page and its sockets: {used:?}"
    );
}

/// The `ip:port` after `key` in a log line.
fn log_addr_after(line: &str, key: &str) -> Option<String> {
    let rest = line.split(key).nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}
