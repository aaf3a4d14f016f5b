//! PROXY protocol in (`[[listen]] proxy_protocol = true`): v1 and v2 headers name the client
//! for everything after them (here: the X-Forwarded-For a proxied app sees); a missing,
//! malformed, truncated or slow header closes the connection and is counted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use wsgate::proxy_protocol::{encode_v1, encode_v2, V2_SIGNATURE};

use crate::common::*;

/// A ws app that records the X-Forwarded-For of each upgrade it accepts.
async fn app() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let addr = backend(move |s| {
        let record = record.clone();
        async move {
            #[allow(clippy::result_large_err)] // the callback's type is tungstenite's
            let callback = |req: &Request, resp: Response| {
                let xff = req
                    .headers()
                    .get("x-forwarded-for")
                    .map(|v| v.to_str().unwrap_or("").to_owned())
                    .unwrap_or_default();
                record.lock().unwrap().push(xff);
                Ok(resp)
            };
            let _ = tokio_tungstenite::accept_hdr_async(s, callback).await;
        }
    })
    .await;
    (addr, seen)
}

async fn gate(app: std::net::SocketAddr, limits: &str) -> Gate {
    Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\n{limits}\n[[route]]\npath = \"/\"\nbackend = \"ws://{app}\"\n"
    ))
    .await
}

/// Sends `prefix` then a WebSocket upgrade; returns the status line's code.
async fn upgrade_behind(gate: &Gate, prefix: &[u8]) -> u16 {
    let mut req = prefix.to_vec();
    req.extend_from_slice(upgrade_request("/", "").as_bytes());
    upgrade_head(gate.addr, &req).await.0.status
}

fn failures(m: &std::collections::HashMap<String, f64>, reason: &str) -> f64 {
    m.get(&format!(
        "wsgate_proxy_protocol_failures_total{{reason=\"{reason}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

#[tokio::test]
async fn v1_and_v2_headers_name_the_client() {
    let (app, seen) = app().await;
    let gate = gate(app, "").await;
    let dst = gate.addr;
    let v1 = encode_v1("192.0.2.7:5555".parse().unwrap(), dst);
    assert_eq!(upgrade_behind(&gate, &v1).await, 101);
    let v2 = encode_v2(
        "[2001:db8::7]:5555".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    );
    assert_eq!(upgrade_behind(&gate, &v2).await, 101);
    // v2 with a TLV after the addresses (skipped).
    let mut tlv = encode_v2("198.51.100.9:1".parse().unwrap(), dst);
    tlv[15] += 5;
    tlv.extend_from_slice(&[0x04, 0x00, 0x02, 0xAB, 0xCD]);
    assert_eq!(upgrade_behind(&gate, &tlv).await, 101);
    // LOCAL (a balancer's health check) and UNKNOWN: the real peer is the client.
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    assert_eq!(upgrade_behind(&gate, &local).await, 101);
    assert_eq!(upgrade_behind(&gate, b"PROXY UNKNOWN\r\n").await, 101);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "192.0.2.7",
            "2001:db8::7",
            "198.51.100.9",
            "127.0.0.1",
            "127.0.0.1"
        ]
    );
}

#[tokio::test]
async fn a_header_in_pieces_is_read_exactly() {
    let (app, seen) = app().await;
    let gate = gate(app, "").await;
    for header in [
        encode_v1("192.0.2.8:1000".parse().unwrap(), gate.addr),
        encode_v2("192.0.2.9:1000".parse().unwrap(), gate.addr),
    ] {
        let mut s = TcpStream::connect(gate.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        for piece in header.chunks(7) {
            s.write_all(piece).await.unwrap();
            // Let each piece arrive on its own.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.write_all(upgrade_request("/", "").as_bytes())
            .await
            .unwrap();
        let mut head = [0u8; 12];
        within("the 101", WAIT, s.read_exact(&mut head))
            .await
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
    }
    assert_eq!(*seen.lock().unwrap(), ["192.0.2.8", "192.0.2.9"]);
}

#[tokio::test]
async fn missing_malformed_and_truncated_headers_close_the_connection() {
    let (app, seen) = app().await;
    let gate = gate(app, "").await;
    let cases: [(&str, &[u8]); 4] = [
        ("missing", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("malformed", b"PROXY TCP4 1.2.3.999 10.0.0.1 1 2\r\n"),
        (
            "malformed",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04\x01\x02\x03\x04",
        ),
        ("truncated", b"PROXY TCP4 192.0.2"),
    ];
    for (reason, bytes) in cases {
        // The bytes, then the client's FIN: the gate must close without answering.
        let mut s = TcpStream::connect(gate.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        within("the gate to close", WAIT, s.read_to_end(&mut answer))
            .await
            .ok();
        assert!(answer.is_empty(), "{reason}: no answer at all: {answer:?}");
    }
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert_eq!(failures(&m, "missing"), 1.0);
    assert_eq!(failures(&m, "malformed"), 2.0);
    assert_eq!(failures(&m, "truncated"), 1.0);
    assert!(seen.lock().unwrap().is_empty(), "nothing reached the app");
}

#[tokio::test]
async fn a_slow_header_is_cut_at_handshake_timeout() {
    let (app, _) = app().await;
    let gate = gate(app, "handshake_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.7 ").await.unwrap();
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    within(
        "the slow header to be cut",
        Duration::from_secs(5),
        s.read_to_end(&mut sink),
    )
    .await
    .unwrap();
    let cut = started.elapsed();
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_millis(1500),
        "cut after {cut:?}"
    );
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert_eq!(failures(&m, "timeout"), 1.0);
}

/// An X-Forwarded-For from a peer that is not in trusted_proxies is replaced, never appended
/// to: the app sees only the real peer.
#[tokio::test]
async fn spoofed_x_forwarded_for_from_an_untrusted_peer_is_replaced() {
    let (app, seen) = app().await;
    let gate = Gate::route(
        "/",
        &format!("ws://{app}"),
        "trusted_proxies = [\"10.0.0.0/8\"]",
        "",
    )
    .await;
    let req = upgrade_request(
        "/",
        "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n",
    );
    assert_eq!(upgrade_head(gate.addr, req.as_bytes()).await.0.status, 101);
    assert_eq!(*seen.lock().unwrap(), ["127.0.0.1"]);
}

/// From a trusted proxy, the chain is believed: the client is the rightmost untrusted address
/// (in the session's log line too), and the app sees the chain with the proxy appended.
#[tokio::test]
async fn a_trusted_proxy_chain_names_the_client() {
    let (app, seen) = app().await;
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n[[route]]\npath = \"/\"\nbackend = \"ws://{app}\"\n"
    ));
    let req = upgrade_request("/", "X-Forwarded-For: 6.6.6.6, 203.0.113.5, 10.1.1.1\r\n");
    let (r, _s) = upgrade_head(gate.addr, req.as_bytes()).await;
    assert_eq!(r.status, 101);
    assert_eq!(
        *seen.lock().unwrap(),
        ["6.6.6.6, 203.0.113.5, 10.1.1.1, 127.0.0.1"]
    );
    let line = gate.wait_for_log("upgraded");
    assert!(line.contains("peer=203.0.113.5"), "{line}");
}

/// A backend that reads `header_len` bytes first, reports them, then echoes the rest.
async fn header_then_echo_backend(
    header_len: usize,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut header = vec![0u8; header_len];
            if s.read_exact(&mut header).await.is_err() {
                return;
            }
            let _ = tx.send(header);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    (addr, rx)
}

/// send_proxy_protocol: the backend gets the header (real client, listener address) before
/// any payload, byte for byte, in v1 and v2; the payload follows intact.
#[tokio::test]
async fn bridge_routes_send_the_client_to_the_backend_first() {
    for version in ["v1", "v2"] {
        let client: std::net::SocketAddr = "192.0.2.77:4242".parse().unwrap();
        let probe = |dst| match version {
            "v1" => encode_v1(client, dst),
            _ => encode_v2(client, dst),
        };
        // The listener takes PROXY in, so the client (and listener) address is one we choose.
        let listener: std::net::SocketAddr = "198.51.100.1:443".parse().unwrap();
        let (backend, mut headers) = header_then_echo_backend(probe(listener).len()).await;
        let gate = Gate::start(&format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[[route]]\npath = \"/\"\nbackend = \"tcp://{backend}\"\nsend_proxy_protocol = \"{version}\"\n"
        ))
        .await;
        let mut req = encode_v1(client, listener);
        req.extend_from_slice(upgrade_request("/", "").as_bytes());
        let (r, mut s) = upgrade_head(gate.addr, &req).await;
        assert_eq!(r.status, 101);
        let got = within("the backend's header", WAIT, headers.recv())
            .await
            .unwrap();
        assert_eq!(got, probe(listener), "{version}: byte for byte");
        s.write_all(&client_frame(
            true,
            wsgate::protocol::frame::OpCode::Binary,
            b"after the header",
            [1, 2, 3, 4],
        ))
        .await
        .unwrap();
        let f = read_frame(&mut s).await.expect("echo");
        assert_eq!(f.payload, b"after the header");
    }
}

/// End to end with a real consumer: HAProxy (Debian's package) accepts wsgate's PROXY v2
/// header (`accept-proxy`) and passes the client it names on to its own server in a v1
/// header (`send-proxy`), which a test backend reads.
#[tokio::test]
async fn haproxy_accepts_the_header_wsgate_sends() {
    // HAProxy's own server: reads HAProxy's v1 line, then echoes.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let haproxy_server = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\r\n") && line.len() < 108 {
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    return;
                }
                line.push(b[0]);
            }
            let _ = tx.send(line);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    let front = unused_addr();
    let _haproxy = Haproxy::start(
        &format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend fe\n  bind {front} accept-proxy\n  default_backend be\nbackend be\n  server s1 {haproxy_server} send-proxy\n"
        ),
        front,
    )
    .await;
    // HAProxy's readiness probe above opened a connection without a header: it counts as
    // garbage there, not here. Now wsgate, with a client we choose through PROXY in.
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[[route]]\npath = \"/\"\nbackend = \"tcp://{front}\"\nsend_proxy_protocol = \"v2\"\n"
    ))
    .await;
    let client: std::net::SocketAddr = "203.0.113.44:5151".parse().unwrap();
    let mut req = encode_v1(client, "198.51.100.1:443".parse().unwrap());
    req.extend_from_slice(upgrade_request("/", "").as_bytes());
    let (r, mut s) = upgrade_head(gate.addr, &req).await;
    assert_eq!(r.status, 101);
    let line = within("HAProxy's header to its server", WAIT, lines.recv())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&line);
    assert!(
        text.starts_with("PROXY TCP4 203.0.113.44 198.51.100.1 5151 443"),
        "HAProxy passed on: {text:?}"
    );
    s.write_all(&client_frame(
        true,
        wsgate::protocol::frame::OpCode::Binary,
        b"through haproxy",
        [1, 2, 3, 4],
    ))
    .await
    .unwrap();
    assert_eq!(
        read_frame(&mut s).await.expect("echo").payload,
        b"through haproxy"
    );
}

/// Regression: with `trusted_proxies` set, any peer could still send a PROXY header and pick
/// its own address (one inside `trusted_proxies` included). Now only a trusted peer may.
#[tokio::test]
async fn a_proxy_header_from_a_peer_outside_trusted_proxies_is_refused() {
    let (app, seen) = app().await;
    let elsewhere = gate(app, "trusted_proxies = [\"10.0.0.0/8\"]").await;
    let spoof = encode_v1("10.1.2.3:5555".parse().unwrap(), elsewhere.addr);
    assert_eq!(upgrade_behind(&elsewhere, &spoof).await, 0, "closed");
    let m = parse_metrics(&http_get(elsewhere.admin.unwrap(), "/metrics").await.1);
    assert_eq!(failures(&m, "untrusted_peer"), 1.0);
    assert!(seen.lock().unwrap().is_empty());

    let here = gate(app, "trusted_proxies = [\"127.0.0.1/32\"]").await;
    let named = encode_v1("192.0.2.7:5555".parse().unwrap(), here.addr);
    assert_eq!(upgrade_behind(&here, &named).await, 101);
    assert_eq!(*seen.lock().unwrap(), ["192.0.2.7"]);
}
