//! Proxy routes (ws:// and wss:// backends) and tls:// bridge backends, against a
//! tokio-tungstenite ws app, hand-written misbehaving apps, and a TLS echo service.

use std::sync::{Arc, Mutex};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A ws app (tokio-tungstenite server) that echoes, records the request line and headers it
/// got, and picks `protocol` when the client offers it.
pub async fn ws_app(protocol: Option<&'static str>) -> (std::net::SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)] // the callback's type is tungstenite's
                let callback = |req: &Request, mut resp: Response| {
                    let mut r = record.lock().unwrap();
                    r.push(("path".into(), req.uri().to_string()));
                    for (k, v) in req.headers() {
                        r.push((k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()));
                    }
                    if let Some(p) = protocol {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", HeaderValue::from_static(p));
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}

pub fn header(seen: &Seen, name: &str) -> Option<String> {
    seen.lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// An app that reads a request head and answers with `response` verbatim.
pub async fn fixed_app(response: &'static str) -> std::net::SocketAddr {
    fixed_app_bytes(response.as_bytes()).await
}

/// An app that reads a request head, answers with `response` in one write, and closes.
async fn fixed_app_bytes(response: &'static [u8]) -> std::net::SocketAddr {
    backend(move |mut s| async move {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(b[0]);
        }
        let _ = s.write_all(response).await;
        let _ = s.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn upgrade_is_forwarded_with_forwarded_headers_and_spliced() {
    let (app, seen) = ws_app(Some("chat")).await;
    let g = Gate::route("/app", &format!("ws://{app}/socket"), "", "").await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/app/room?id=7", g.addr),
    )
    .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("superchat, chat"),
    );
    req.headers_mut()
        .insert("x-custom", HeaderValue::from_static("kept"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    for i in 0..20 {
        let msg = Message::binary(pattern(1000 * i + 1, i as u64));
        ws.send(msg.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), msg);
    }
    ws.close(None).await.unwrap();
    assert_eq!(header(&seen, "path").as_deref(), Some("/socket/room?id=7"));
    assert_eq!(
        header(&seen, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(header(&seen, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        header(&seen, "x-forwarded-host").as_deref(),
        Some(g.addr.to_string().as_str())
    );
    assert_eq!(
        header(&seen, "host").as_deref(),
        Some(app.to_string().as_str())
    );
    assert_eq!(header(&seen, "x-custom").as_deref(), Some("kept"));
    assert_eq!(
        header(&seen, "sec-websocket-protocol").as_deref(),
        Some("superchat, chat")
    );
}

#[tokio::test]
async fn wrong_accept_key_from_the_app_is_502_and_no_upgrade() {
    let app = fixed_app("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n").await;
    let g = Gate::route("/", &format!("ws://{app}"), "", "").await;
    let r = raw_request(g.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("Accept"), "{r:?}");
    assert!(r.closed);
}

/// An app whose first frame travels in the same packet as its 101: the frame is not lost
/// between reading the app's answer and splicing.
#[tokio::test]
async fn a_frame_right_behind_the_apps_101_reaches_the_client() {
    let app = fixed_app_bytes(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello").await;
    let g = Gate::route("/", &format!("ws://{app}"), "", "").await;
    let r = raw_request(g.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 101, "{r:?}");
    // 0x81 (a final text frame) shows as U+FFFD in the lossy text.
    assert_eq!(r.body, "\u{FFFD}\u{5}hello", "{r:?}");
    assert!(r.closed, "the app's EOF is passed on");
}

#[tokio::test]
async fn app_refusal_is_passed_through() {
    let app = fixed_app("HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 14\r\nConnection: close\r\n\r\nnot for you!!\n").await;
    let g = Gate::route("/", &format!("ws://{app}"), "", "").await;
    let r = raw_request(g.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body, "not for you!!\n");
    assert!(r.closed);
}

#[tokio::test]
async fn app_choosing_an_unoffered_subprotocol_is_502() {
    let (app, _) = ws_app(Some("evil")).await;
    let g = Gate::route("/", &format!("ws://{app}"), "", "").await;
    let r = raw_request(
        g.addr,
        upgrade_request("/", "Sec-WebSocket-Protocol: chat\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 502, "{r:?}");
    // The route's own list applies too.
    let (app, _) = ws_app(Some("chat")).await;
    let g = Gate::route(
        "/",
        &format!("ws://{app}"),
        "",
        "subprotocols = [\"binary\", \"chat\"]",
    )
    .await;
    let (r, _s) = upgrade_head(
        g.addr,
        upgrade_request("/", "Sec-WebSocket-Protocol: chat\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 101, "{r:?}");
    assert_eq!(r.header("sec-websocket-protocol"), vec!["chat".to_string()]);
}

#[tokio::test]
async fn plain_http_on_a_proxy_route_reaches_the_app() {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = backend(move |mut s| {
        let record = record.clone();
        async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(b[0]);
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            for line in text.lines().skip(1) {
                if let Some((k, v)) = line.split_once(':') {
                    record.lock().unwrap().push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                }
            }
            record.lock().unwrap().push(("line".into(), text.lines().next().unwrap_or("").to_owned()));
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 17\r\n\r\n<h1>the app</h1>\n")
                .await;
        }
    })
    .await;
    let g = Gate::route("/", &format!("ws://{app}"), "", "").await;
    let r = raw_request(
        g.addr,
        b"GET /index.html?v=2 HTTP/1.1\r\nHost: front.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "<h1>the app</h1>\n");
    assert_eq!(
        header(&seen, "line").as_deref(),
        Some("GET /index.html?v=2 HTTP/1.1")
    );
    assert_eq!(
        header(&seen, "x-forwarded-host").as_deref(),
        Some("front.example")
    );
    assert_eq!(
        header(&seen, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
}

#[tokio::test]
async fn dead_app_is_502() {
    let (dead, _held) = refusing_addr();
    let g = Gate::route("/", &format!("ws://{dead}"), "", "").await;
    let r = raw_request(g.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 502);
}

/// Certificates for the TLS backends, made by certs/gen-dev-certs.sh.
fn dev_certs() -> TempDir {
    let dir = TempDir::new();
    gen_certs(dir.path(), "ec", "server", "localhost 127.0.0.1");
    dir
}

/// wss:// backend: wsgate A (proxy route) → wsgate B (TLS listener, echo), B's certificate
/// checked against the route's `ca`; without it (system roots) the app is not trusted: 502.
#[tokio::test]
async fn wss_backend_is_verified_against_the_route_ca() {
    let certs = dev_certs();
    let d = certs.path().display();
    let b = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{d}/server.crt\", key = \"{d}/server.key\" }}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n"
    ))
    .await;
    let port = b.addr.port();
    let a = Gate::route(
        "/",
        &format!("wss://localhost:{port}/"),
        "",
        &format!("ca = \"{d}/ca.crt\""),
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(a.url("/")).await.unwrap();
    ws.send(Message::text("through two gates")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("through two gates")
    );
    let untrusted = Gate::route("/", &format!("wss://localhost:{port}/"), "", "").await;
    let r = raw_request(untrusted.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 502, "{r:?}");
}

/// tls:// bridge backend: the relay over a rustls client connection.
#[tokio::test]
async fn tls_bridge_backend() {
    let certs = dev_certs();
    let port = tls_echo_backend(certs.path()).await;
    let d = certs.path().display();
    let g = Gate::route(
        "/",
        &format!("tls://localhost:{port}"),
        "",
        &format!("ca = \"{d}/ca.crt\""),
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(g.url("/")).await.unwrap();
    let data = pattern(300_000, 9);
    ws.send(Message::binary(data.clone())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == data);
}
