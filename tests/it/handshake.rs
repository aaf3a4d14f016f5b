//! One test per row of the refusal table in docs/design.md ("What a request gets"), with raw
//! requests: status, headers, a one-line body, `Connection: close`, and the socket closed
//! after it.

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn gate() -> Gate {
    let backend = echo_backend().await;
    Gate::start(&format!(
        r#"
[[listen]]
addr = "127.0.0.1:0"
[limits]
handshake_timeout = "500ms"
[[route]]
path = "/ws"
backend = "tcp://{backend}"
[[route]]
path = "/strict"
backend = "echo"
subprotocols = ["binary", "base64"]
origins = ["https://ok.example"]
"#
    ))
    .await
}

/// Every refusal: the status, a one-line text body, Connection: close, socket closed.
fn assert_refused(r: &RawResponse, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert!(r.closed, "socket must be closed after a refusal: {r:?}");
    assert_eq!(r.header("connection"), vec!["close".to_string()], "{r:?}");
    assert!(
        !r.body.trim().is_empty() && r.body.trim().lines().count() == 1,
        "one-line body: {r:?}"
    );
    assert!(!r.head.contains("HTTP/1.1 101"));
}

#[tokio::test]
async fn no_route_is_404() {
    let g = gate().await;
    let r = raw_request(g.addr, upgrade_request("/nope", "").as_bytes()).await;
    assert_refused(&r, 404);
}

#[tokio::test]
async fn route_prefix_is_on_whole_segments() {
    let g = gate().await;
    let r = raw_request(g.addr, upgrade_request("/wsx", "").as_bytes()).await;
    assert_refused(&r, 404);
    let (r, _s) = upgrade_head(g.addr, upgrade_request("/ws/deeper?x=1", "").as_bytes()).await;
    assert_eq!(r.status, 101, "{r:?}");
}

#[tokio::test]
async fn plain_get_is_426_with_upgrade_header() {
    let g = gate().await;
    let r = raw_request(g.addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_refused(&r, 426);
    assert_eq!(r.header("upgrade"), vec!["websocket".to_string()]);
}

#[tokio::test]
async fn wrong_method_is_400() {
    let g = gate().await;
    let req = upgrade_request("/ws", "").replacen("GET", "POST", 1);
    assert_refused(&raw_request(g.addr, req.as_bytes()).await, 400);
}

#[tokio::test]
async fn http_1_0_is_400() {
    let g = gate().await;
    let req = upgrade_request("/ws", "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    assert_refused(&raw_request(g.addr, req.as_bytes()).await, 400);
}

#[tokio::test]
async fn missing_host_is_400() {
    let g = gate().await;
    let req = upgrade_request("/ws", "").replacen("Host: test\r\n", "", 1);
    assert_refused(&raw_request(g.addr, req.as_bytes()).await, 400);
}

#[tokio::test]
async fn malformed_header_line_is_400() {
    let g = gate().await;
    for bad in ["Bad Header Line\r\n", "X-Nul: a\0b\r\n", " folded: x\r\n"] {
        let req = upgrade_request("/ws", bad);
        let r = raw_request(g.addr, req.as_bytes()).await;
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
        assert!(r.closed);
    }
}

#[tokio::test]
async fn bad_keys_are_400() {
    let g = gate().await;
    let missing =
        upgrade_request("/ws", "").replacen(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "", 1);
    assert_refused(&raw_request(g.addr, missing.as_bytes()).await, 400);
    let short = upgrade_request("/ws", "").replacen(KEY, "c2hvcnQ=", 1);
    assert_refused(&raw_request(g.addr, short.as_bytes()).await, 400);
    let not_b64 = upgrade_request("/ws", "").replacen(KEY, "!!!!notbase64!!!!!!!!!==", 1);
    assert_refused(&raw_request(g.addr, not_b64.as_bytes()).await, 400);
    let dup = upgrade_request("/ws", &format!("Sec-WebSocket-Key: {KEY}\r\n"));
    assert_refused(&raw_request(g.addr, dup.as_bytes()).await, 400);
}

#[tokio::test]
async fn missing_connection_upgrade_token_is_400() {
    let g = gate().await;
    let req =
        upgrade_request("/ws", "").replacen("Connection: Upgrade", "Connection: keep-alive", 1);
    assert_refused(&raw_request(g.addr, req.as_bytes()).await, 400);
}

#[tokio::test]
async fn token_lists_and_case_are_accepted() {
    let g = gate().await;
    let req = "GET /ws HTTP/1.1\r\nhost: test\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";
    let (r, _s) = upgrade_head(g.addr, req.as_bytes()).await;
    assert_eq!(r.status, 101, "{r:?}");
    // RFC 6455 §1.3's sample key and answer.
    assert_eq!(
        r.header("sec-websocket-accept"),
        vec!["s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_string()]
    );
    assert_eq!(r.header("connection").len(), 1);
    assert!(r.header("connection")[0].eq_ignore_ascii_case("upgrade"));
}

#[tokio::test]
async fn bad_version_is_426_with_version_header() {
    let g = gate().await;
    let v8 = upgrade_request("/ws", "").replacen("Version: 13", "Version: 8", 1);
    let r = raw_request(g.addr, v8.as_bytes()).await;
    assert_refused(&r, 426);
    assert_eq!(r.header("sec-websocket-version"), vec!["13".to_string()]);
    let missing = upgrade_request("/ws", "").replacen("Sec-WebSocket-Version: 13\r\n", "", 1);
    let r = raw_request(g.addr, missing.as_bytes()).await;
    assert_refused(&r, 426);
    assert_eq!(r.header("sec-websocket-version"), vec!["13".to_string()]);
}

#[tokio::test]
async fn hixie_76_request_is_426() {
    let g = gate().await;
    let req = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\nSec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\n\r\n^n:ds[4U";
    let r = raw_request(g.addr, req.as_bytes()).await;
    assert_refused(&r, 426);
    assert_eq!(r.header("sec-websocket-version"), vec!["13".to_string()]);
}

#[tokio::test]
async fn origin_not_allowed_is_403() {
    let g = gate().await;
    let req = upgrade_request(
        "/strict",
        "Origin: https://evil.example\r\nSec-WebSocket-Protocol: binary\r\n",
    );
    assert_refused(&raw_request(g.addr, req.as_bytes()).await, 403);
    let ok = upgrade_request(
        "/strict",
        "Origin: https://ok.example\r\nSec-WebSocket-Protocol: binary\r\n",
    );
    let (r, _s) = upgrade_head(g.addr, ok.as_bytes()).await;
    assert_eq!(r.status, 101, "{r:?}");
}

#[tokio::test]
async fn no_acceptable_subprotocol_is_400_listing_accepted() {
    let g = gate().await;
    let req = upgrade_request("/strict", "Sec-WebSocket-Protocol: chat, superchat\r\n");
    let r = raw_request(g.addr, req.as_bytes()).await;
    assert_refused(&r, 400);
    assert!(
        r.body.contains("binary") && r.body.contains("base64"),
        "{r:?}"
    );
    let none = upgrade_request("/strict", "");
    assert_refused(&raw_request(g.addr, none.as_bytes()).await, 400);
}

#[tokio::test]
async fn first_offered_allowed_subprotocol_is_chosen() {
    let g = gate().await;
    let req = upgrade_request(
        "/strict",
        "Sec-WebSocket-Protocol: chat, base64, binary\r\n",
    );
    let (r, _s) = upgrade_head(g.addr, req.as_bytes()).await;
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("sec-websocket-protocol"),
        vec!["base64".to_string()]
    );
}

#[tokio::test]
async fn over_max_connections_is_503_with_retry_after() {
    let backend = echo_backend().await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "max_connections = 1", "").await;
    // One live session holds the only slot.
    let (_ws, _) = tokio_tungstenite::connect_async(g.url("/")).await.unwrap();
    let r = raw_request(g.addr, upgrade_request("/", "").as_bytes()).await;
    assert_refused(&r, 503);
    assert_eq!(r.header("retry-after"), vec!["1".to_string()]);
}

/// max_connections counts connections still handshaking, not only upgraded sessions.
#[tokio::test]
async fn handshaking_connections_count_toward_max_connections() {
    let g = Gate::route("/", "echo", "max_connections = 1", "").await;
    let mut silent = TcpStream::connect(g.addr).await.unwrap();
    // Accepts are handled in order, so the silent connection holds the only slot before the
    // next one is looked at.
    let r = raw_request(g.addr, upgrade_request("/", "").as_bytes()).await;
    assert_refused(&r, 503);
    // Once the handshaking connection goes away, its slot is free again.
    silent.shutdown().await.unwrap();
    assert!(expect_eof(&mut silent).await);
    drop(silent);
    let mut upgraded = false;
    for _ in 0..100 {
        let (r, _s) = upgrade_head(g.addr, upgrade_request("/", "").as_bytes()).await;
        if r.status == 101 {
            upgraded = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(upgraded, "slot released after the first connection closed");
}

#[tokio::test]
async fn backend_refused_is_502_and_client_not_upgraded() {
    let (dead, _held) = refusing_addr();
    let g = Gate::route("/", &format!("tcp://{dead}"), "", "").await;
    assert_refused(
        &raw_request(g.addr, upgrade_request("/", "").as_bytes()).await,
        502,
    );
    let g = Gate::route("/", "unix:/nonexistent/wsgate.sock", "", "").await;
    assert_refused(
        &raw_request(g.addr, upgrade_request("/", "").as_bytes()).await,
        502,
    );
}

#[tokio::test]
async fn backend_connect_timeout_is_504() {
    // A listener with a backlog of 0 that never accepts: once its queue holds a connection,
    // further SYNs are dropped and connects hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let g = Gate::route(
        "/",
        &format!("tcp://{addr}"),
        "connect_timeout = \"300ms\"",
        "",
    )
    .await;
    let r = raw_request(g.addr, upgrade_request("/", "").as_bytes()).await;
    assert_refused(&r, 504);
    drop(listener);
}

#[tokio::test]
async fn slow_request_is_closed_at_handshake_timeout() {
    let g = gate().await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    // Slowloris: a partial request head, then silence.
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert!(
        expect_eof(&mut s).await,
        "wsgate must close a stalled handshake"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    // A connection that never sends a byte is closed too.
    let mut silent = TcpStream::connect(g.addr).await.unwrap();
    assert!(expect_eof(&mut silent).await);
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let g = gate().await;
    let big = format!("X-Big: {}\r\n", "a".repeat(64 * 1024));
    let r = raw_request(g.addr, upgrade_request("/ws", &big).as_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");
    assert!(r.closed);
}

/// A request pipelined behind a refused one must never be answered (no smuggling).
#[tokio::test]
async fn pipelined_request_behind_refusal_is_not_answered() {
    let g = gate().await;
    let mut req = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    req.extend_from_slice(upgrade_request("/ws", "").as_bytes());
    let r = raw_request(g.addr, &req).await;
    assert_eq!(r.status, 426);
    assert!(r.closed);
    assert_eq!(
        r.head.matches("HTTP/1.1").count() + r.body.matches("HTTP/1.1").count(),
        1,
        "{r:?}"
    );
}

/// Bytes pipelined behind a successful upgrade are WebSocket frames, not a second request.
#[tokio::test]
async fn frames_pipelined_behind_upgrade_are_frames() {
    let g = gate().await;
    let mut req = upgrade_request("/strict", "Sec-WebSocket-Protocol: binary\r\n").into_bytes();
    req.extend(client_frame(
        true,
        wsgate::protocol::frame::OpCode::Binary,
        b"early",
        [1, 2, 3, 4],
    ));
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    s.write_all(&req).await.unwrap();
    let mut r = tokio::io::BufReader::new(s);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let f = read_frame(&mut r).await.unwrap();
    assert_eq!(f.payload, b"early");
}
