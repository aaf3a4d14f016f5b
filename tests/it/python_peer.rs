//! The Python `websockets` library as the client: a second real peer, with its own idea of
//! close codes (it accepts 1014) and subprotocols.

use crate::common::*;
use std::time::Duration;

/// Runs tests/peers/ws_client.py SCENARIO URL and returns its JSON line, parsed loosely.
fn run_client(scenario: &str, url: &str) -> String {
    run_client_with(scenario, url, &[])
}

/// The same with extra arguments after the URL.
fn run_client_with(scenario: &str, url: &str, extra: &[String]) -> String {
    let out = output_within(
        std::process::Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/peers/ws_client.py"
            ))
            .arg(scenario)
            .arg(url)
            .args(extra),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The value of `"key": value` in the client's one-line JSON.
fn field(json: &str, key: &str) -> String {
    let at = json
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("{key} in {json}"));
    let rest = &json[at + key.len() + 4..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim().trim_matches('"').to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_echo_text_binary_and_close() {
    let g = Gate::route("/echo", "echo", "", "").await;
    let url = g.url("/echo");
    let out = tokio::task::spawn_blocking(move || run_client("echo", &url))
        .await
        .unwrap();
    assert!(out.contains(r#""text": "h\u00e9llo w\u00f6rld""#), "{out}");
    assert_eq!(field(&out, "binary_sha256"), field(&out, "binary_expected"));
    assert_eq!(field(&out, "close_rcvd"), "1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sees_every_byte_then_1000_on_backend_fin() {
    let backend = send_n_then_close_backend(1_000_000).await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let url = g.url("/");
    let out = tokio::task::spawn_blocking(move || run_client("drain", &url))
        .await
        .unwrap();
    assert_eq!(field(&out, "bytes"), "1000000");
    assert_eq!(field(&out, "close_rcvd"), "1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sees_1014_on_backend_reset() {
    let backend = reset_backend().await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let url = g.url("/");
    let out = tokio::task::spawn_blocking(move || run_client("send_then_read", &url))
        .await
        .unwrap();
    assert_eq!(field(&out, "close_rcvd"), "1014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_gets_the_negotiated_subprotocol() {
    let g = Gate::route("/", "echo", "", "subprotocols = [\"binary\", \"base64\"]").await;
    let url = g.url("/");
    let out = tokio::task::spawn_blocking(move || run_client("subprotocol", &url))
        .await
        .unwrap();
    assert_eq!(field(&out, "subprotocol"), "binary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sees_502_for_a_dead_backend() {
    let port = unused_addr().port();
    let g = Gate::route("/", &format!("tcp://127.0.0.1:{port}"), "", "").await;
    let url = g.url("/");
    let out = tokio::task::spawn_blocking(move || run_client("refused", &url))
        .await
        .unwrap();
    assert_eq!(field(&out, "status"), "502");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_over_wss_trusting_the_test_ca() {
    let dir = TempDir::new();
    let d = dir.path().display().to_string();
    gen_certs(dir.path(), "ec", "server", "localhost 127.0.0.1");
    let g = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{d}/server.crt\", key = \"{d}/server.key\" }}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n"
    ))
    .await;
    let url = format!("wss://localhost:{}/", g.addr.port());
    let ca = vec![format!("{d}/ca.crt")];
    let out = tokio::task::spawn_blocking(move || run_client_with("echo_tls", &url, &ca))
        .await
        .unwrap();
    assert_eq!(field(&out, "text"), "over wss");
    assert_eq!(field(&out, "cn"), "localhost");
    assert_eq!(field(&out, "close_rcvd"), "1000");
}
