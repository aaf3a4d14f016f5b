//! Hardening: every wait in a session bounded, memory bounded per process, over-capacity
//! cheap, keep-alive bounded, no request smuggling.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsgate::protocol::frame::OpCode;

use crate::common::*;

/// A backend that accepts and never reads; it keeps every connection and reports when the
/// gate closes each one (EOF or reset on a read it does only after the test says so).
async fn hoarding_backend() -> (std::net::SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    (addr, held)
}

/// Regression: a bridge route whose backend accepts and never reads; clients push until
/// backpressure, then reset their sockets. Every session (its fds, its backend connection)
/// must be gone within idle_timeout + close_timeout.
#[tokio::test]
async fn sessions_stuck_on_a_backend_that_never_reads_end_after_clients_reset() {
    const CLIENTS: usize = 20;
    let (backend, held) = hoarding_backend().await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nidle_timeout = \"3s\"\nclose_timeout = \"1s\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{backend}\"\n"
    ))
    .await;
    let admin = gate.admin.unwrap();
    let pushers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = gate.addr;
            tokio::spawn(async move {
                let frame = client_frame(true, OpCode::Binary, &[7u8; 64 * 1024], [1, 2, 3, 4]);
                let mut ws = raw_ws(addr, "/").await.into_inner();
                // Push until a write stalls for 200 ms (backpressure), at most 256 frames.
                for _ in 0..256 {
                    if tokio::time::timeout(Duration::from_millis(200), ws.write_all(&frame))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                ws
            })
        })
        .collect();
    let mut clients = Vec::new();
    for p in pushers {
        clients.push(
            within("a client to reach backpressure", WAIT, p)
                .await
                .unwrap(),
        );
    }
    eventually("all sessions to be up and stuck", WAIT, || async {
        metric(
            admin,
            "wsgate_sessions_open{route=\"/\",http_version=\"1.1\"}",
        )
        .await
            == CLIENTS as f64
    })
    .await;
    for ws in clients {
        reset(ws);
    }
    // idle_timeout 3 s + close_timeout 1 s from when the backend stopped reading.
    let took = eventually(
        "every stuck session to end",
        Duration::from_secs(8),
        || async {
            metric(
                admin,
                "wsgate_sessions_open{route=\"/\",http_version=\"1.1\"}",
            )
            .await
                == 0.0
        },
    )
    .await;
    assert!(took <= Duration::from_millis(4500), "took {took:?}");
    // The gate closed every backend connection too.
    let streams: Vec<TcpStream> = std::mem::take(&mut *held.lock().unwrap());
    assert_eq!(streams.len(), CLIENTS);
    for mut s in streams {
        let mut sink = vec![0u8; 1 << 16];
        let closed = within("backend connection closed by the gate", WAIT, async {
            loop {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed);
    }
    let (_, text) = http_get(admin, "/metrics").await;
    assert!(
        text.contains("code=\"1011\""),
        "close 1011 sent to the stuck sessions: {text}"
    );
}

/// Over max_connections a plain listener answers 503 at accept, before (and without) any
/// request: a client that sends nothing still gets it at once, not after handshake_timeout.
#[tokio::test]
async fn over_capacity_is_answered_at_accept_without_reading_a_request() {
    let gate = Gate::route(
        "/",
        "echo",
        "max_connections = 1\nhandshake_timeout = \"30s\"",
        "",
    )
    .await;
    let _holder = raw_ws(gate.addr, "/").await;
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(gate.addr).await.unwrap();
    let mut all = Vec::new();
    within(
        "the 503 and the close",
        Duration::from_secs(3),
        silent.read_to_end(&mut all),
    )
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    let r = parse_response(&all, true);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), vec!["1".to_string()]);
    assert_eq!(r.header("connection"), vec!["close".to_string()]);
    assert_eq!(r.body, "too many connections; try again later\n");
}

/// A flood of connections against a small cap: every one is refused or closed quickly, the
/// sessions already admitted keep working throughout, and once the flood is over a new client
/// is admitted at once.
#[tokio::test]
async fn a_flood_over_the_cap_leaves_admitted_sessions_working() {
    const FLOOD: usize = 2000;
    let gate = Gate::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections = 5\nhandshake_timeout = \"30s\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    )
    .await;
    let admin = gate.admin.unwrap();
    let mut sessions = Vec::new();
    for _ in 0..5 {
        sessions.push(raw_ws(gate.addr, "/").await);
    }
    let addr = gate.addr;
    let flood = tokio::spawn(async move {
        let mut refused = 0;
        // 50 at a time, FLOOD in all.
        for _ in 0..FLOOD / 50 {
            let batch: Vec<_> = (0..50)
                .map(|_| {
                    tokio::spawn(async move {
                        let Ok(mut s) = TcpStream::connect(addr).await else {
                            return false;
                        };
                        let _ = s.write_all(upgrade_request("/", "").as_bytes()).await;
                        let mut all = Vec::new();
                        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut all)).await;
                        all.starts_with(b"HTTP/1.1 503")
                    })
                })
                .collect();
            for t in batch {
                if t.await.unwrap_or(false) {
                    refused += 1;
                }
            }
        }
        refused
    });
    // The admitted sessions keep round-tripping during the flood.
    let mut round_trips = 0;
    while !flood.is_finished() && round_trips < 2000 {
        for ws in sessions.iter_mut() {
            let msg = format!("ping {round_trips}");
            ws.get_mut()
                .write_all(&client_frame(
                    true,
                    OpCode::Text,
                    msg.as_bytes(),
                    [9, 9, 9, 9],
                ))
                .await
                .unwrap();
            let f = within("an echo during the flood", WAIT, read_frame(ws))
                .await
                .expect("echo frame");
            assert_eq!(f.payload, msg.as_bytes());
            round_trips += 1;
        }
    }
    let refused = within("the flood to finish", Duration::from_secs(60), flood)
        .await
        .unwrap();
    assert_eq!(refused, FLOOD, "every flood connection got the 503");
    assert!(round_trips > 0);
    let m = parse_metrics(&http_get(admin, "/metrics").await.1);
    assert_eq!(
        m.get("wsgate_handshake_rejections_total{route=\"none\",reason=\"over_capacity\"}"),
        Some(&(FLOOD as f64))
    );
    // One session leaves; its place is free for the next client at once.
    drop(sessions.pop());
    eventually("a new client to be admitted", WAIT, || async {
        upgrade_head(addr, upgrade_request("/", "").as_bytes())
            .await
            .0
            .status
            == 101
    })
    .await;
}

/// A plain HTTP app for proxy-route keep-alive tests: answers every request on a connection
/// with a small 200, as long as the connection stays open.
async fn keepalive_app() -> std::net::SocketAddr {
    backend(|s| async move {
        let mut s = tokio::io::BufReader::new(s);
        loop {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(b[0]);
            }
            let r = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
            if s.get_mut().write_all(r).await.is_err() {
                return;
            }
        }
    })
    .await
}

const GET: &[u8] = b"GET /page HTTP/1.1\r\nHost: front.example\r\n\r\n";

/// Reads one HTTP response with a Content-Length body; returns its head and body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut all = Vec::new();
    let mut b = [0u8; 1];
    while !all.ends_with(b"\r\n\r\n") {
        let n = within("a response head", WAIT, s.read(&mut b))
            .await
            .unwrap();
        assert_eq!(n, 1, "connection closed before a response: {all:?}");
        all.push(b[0]);
    }
    let head = String::from_utf8_lossy(&all).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    within("a response body", WAIT, s.read_exact(&mut body))
        .await
        .unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// How long until the server closes `s` (EOF or reset), reading and dropping anything sent.
async fn closed_after(s: &mut TcpStream, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    let mut sink = [0u8; 256];
    within("the server to close the connection", limit, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    started.elapsed()
}

/// After a response, an idle kept-alive connection is closed at keepalive_timeout.
#[tokio::test]
async fn idle_keepalive_connection_is_closed_at_keepalive_timeout() {
    let app = keepalive_app().await;
    let gate = Gate::route(
        "/",
        &format!("ws://{app}"),
        "keepalive_timeout = \"1s\"",
        "",
    )
    .await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    for _ in 0..3 {
        s.write_all(GET).await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "ok\n");
    }
    let idle = closed_after(&mut s, Duration::from_secs(5)).await;
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_millis(1500),
        "closed {idle:?} after the last response; keepalive_timeout is 1 s"
    );
}

/// A slow second request head is cut at handshake_timeout from its first byte, although the
/// keep-alive wait is longer.
#[tokio::test]
async fn slow_second_request_head_is_cut_at_handshake_timeout() {
    let app = keepalive_app().await;
    let gate = Gate::route(
        "/",
        &format!("ws://{app}"),
        "keepalive_timeout = \"20s\"\nhandshake_timeout = \"1s\"",
        "",
    )
    .await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Idle a while (shorter than keepalive_timeout), then start a head and stall.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"GET /page HTTP/1.1\r\nHo").await.unwrap();
    let cut = closed_after(&mut s, Duration::from_secs(5)).await;
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_millis(1500),
        "cut {cut:?} after the head started; handshake_timeout is 1 s"
    );
}

/// A connection serves at most 1,000 requests; the last response says Connection: close and
/// the connection ends after it.
#[tokio::test]
async fn keepalive_connection_serves_at_most_1000_requests() {
    let app = keepalive_app().await;
    let gate = Gate::route("/", &format!("ws://{app}"), "", "").await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    for n in 1..=1000 {
        s.write_all(GET).await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert_eq!(body, "ok\n");
        let closes = head.to_ascii_lowercase().contains("connection: close");
        assert_eq!(closes, n == 1000, "request {n}: {head}");
    }
    closed_after(&mut s, WAIT).await;
}

/// Refused upgrades that carry a body, in every framing: one answer, then the connection is
/// closed; the request hidden in the body is never answered.
#[tokio::test]
async fn refused_requests_with_bodies_are_answered_once_and_closed() {
    let gate = Gate::route("/", "echo", "", "subprotocols = [\"binary\"]").await;
    let hidden = upgrade_request("/", "Sec-WebSocket-Protocol: binary\r\n");
    let chunked = format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len());
    let cases = [
        (
            "content-length",
            format!("Content-Length: {}\r\n", hidden.len()),
            hidden.clone(),
        ),
        (
            "chunked",
            "Transfer-Encoding: chunked\r\n".to_string(),
            chunked.clone(),
        ),
        (
            "both",
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n".to_string(),
            chunked.clone(),
        ),
        (
            "conflicting lengths",
            format!("Content-Length: 4\r\nContent-Length: {}\r\n", hidden.len()),
            hidden.clone(),
        ),
    ];
    for (name, headers, body) in cases {
        // An upgrade with a body (and no acceptable subprotocol), then the hidden one.
        let mut req = upgrade_request("/", &headers).into_bytes();
        req.extend_from_slice(body.as_bytes());
        req.extend_from_slice(hidden.as_bytes());
        let r = raw_request(gate.addr, &req).await;
        assert!(r.closed, "{name}: closed after the refusal");
        assert!(r.status == 400, "{name}: refused with 400, got {r:?}");
        let all = format!("{}{}", r.head, r.body);
        assert_eq!(
            all.matches("HTTP/1.1 ").count(),
            1,
            "{name}: one answer only: {r:?}"
        );
        assert!(!all.contains("101"), "{name}: {r:?}");
    }
}

/// On a proxy route: a request with both Transfer-Encoding and Content-Length is taken by
/// its Transfer-Encoding alone (RFC 9112 §6.1), forwarded without the Content-Length, and the
/// connection is closed after the answer, so the request pipelined behind it is never
/// answered; a request pipelined behind a refused upgrade is never answered or forwarded.
#[tokio::test]
async fn proxy_route_closes_after_ambiguous_framing_and_refusals() {
    let forwarded = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = forwarded.clone();
    let app = backend(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut got = vec![0u8; 4096];
            let n = s.read(&mut got).await.unwrap_or(0);
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&got[..n]).into_owned());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                .await;
        }
    })
    .await;
    let gate = Gate::route(
        "/",
        &format!("ws://{app}"),
        "",
        "origins = [\"https://good.example\"]",
    )
    .await;
    let mut req = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec();
    req.extend_from_slice(GET);
    let r = raw_request(gate.addr, &req).await;
    assert!(r.closed, "closed after the answer: {r:?}");
    assert_eq!(
        format!("{}{}", r.head, r.body).matches("HTTP/1.1 ").count(),
        1,
        "{r:?}"
    );
    {
        let seen = forwarded.lock().unwrap();
        assert_eq!(
            seen.len(),
            1,
            "only the first request reached the app: {seen:?}"
        );
        assert!(
            !seen[0].to_ascii_lowercase().contains("content-length: 5"),
            "{seen:?}"
        );
        assert!(!seen[0].contains("GET /page"), "{seen:?}");
    }
    forwarded.lock().unwrap().clear();

    let mut req = upgrade_request("/", "Origin: https://evil.example\r\n").into_bytes();
    req.extend_from_slice(GET);
    let r = raw_request(gate.addr, &req).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.closed);
    assert_eq!(
        format!("{}{}", r.head, r.body).matches("HTTP/1.1 ").count(),
        1,
        "{r:?}"
    );
    assert!(
        forwarded.lock().unwrap().is_empty(),
        "nothing reached the app"
    );
}

/// Regression (issue: the echo held every half-sent message whole, so 1,000 clients with
/// 15 MiB each could make wsgate hold 15 GiB): 40 clients each send 4 MiB of a message and
/// stall. Whole-message buffering is bounded by message_buffer_budget (32 MiB here): the
/// clients over it get close 1013 (with all 40 sending at once, possibly every one of them),
/// the process's RSS stays under the budget plus the per-session buffers, and the budget is
/// given back when those sessions end.
#[tokio::test]
async fn many_half_sent_messages_on_the_echo_route_stay_within_the_budget() {
    const CLIENTS: usize = 40;
    const PART: usize = 1 << 20;
    let gate = GateProcess::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_message_size = \"8MiB\"\nmessage_buffer_budget = \"32MiB\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    );
    let before = gate.rss_kib();
    let addr = gate.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(async move {
                let mut ws = raw_ws(addr, "/").await;
                let key = [i as u8, 1, 2, 3];
                let first = client_frame(false, OpCode::Binary, &vec![i as u8; PART], key);
                let more = client_frame(false, OpCode::Continuation, &vec![i as u8; PART], key);
                let mut writes = ws.get_mut().write_all(&first).await.is_ok();
                for _ in 0..3 {
                    writes = writes && ws.get_mut().write_all(&more).await.is_ok();
                }
                // Stalled mid-message: either the gate holds it, or it said 1013.
                let code = tokio::time::timeout(Duration::from_secs(2), read_until_close(&mut ws))
                    .await
                    .ok()
                    .flatten();
                (ws, code)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut try_again_later = 0;
    for c in clients {
        let (ws, code) = within("a client to send its half message", WAIT, c)
            .await
            .unwrap();
        match code {
            Some(1013) => try_again_later += 1,
            None => held.push(ws),
            Some(other) => panic!("unexpected close {other}"),
        }
    }
    let grown_mib = gate.rss_kib().saturating_sub(before) / 1024;
    assert!(
        try_again_later >= CLIENTS - 8,
        "at most 8 × 4 MiB fit in 32 MiB; {try_again_later} got 1013, {} held",
        held.len()
    );
    // 32 MiB of messages, plus up to 128 KiB of read buffers per session and slack.
    assert!(grown_mib < 32 + 20, "RSS grew by {grown_mib} MiB");
    // Once those sessions are gone, their share is given back: a whole 4 MiB message is
    // echoed again.
    drop(held);
    let message = vec![9u8; 4 * PART];
    let ok = eventually("a 4 MiB message to be echoed again", WAIT, || async {
        let mut ws = raw_ws(addr, "/").await;
        let frame = client_frame(true, OpCode::Binary, &message, [4, 3, 2, 1]);
        ws.get_mut().write_all(&frame).await.unwrap();
        matches!(read_frame(&mut ws).await, Some(f) if f.payload == message)
    })
    .await;
    assert!(ok < WAIT);
}

/// Proxy route (splice): a client that keeps sending but never reads what the app sends is
/// cut once the write to it has been stalled for idle_timeout.
#[tokio::test]
async fn proxy_session_whose_client_never_reads_is_cut_at_idle_timeout() {
    let app = backend(|s| async move {
        let Ok(ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        let (mut tx, mut rx) = futures_util::StreamExt::split(ws);
        tokio::spawn(async move {
            while let Some(Ok(_)) = futures_util::StreamExt::next(&mut rx).await {}
        });
        // Bounded: 1,000 messages of 64 KiB, far more than the windows hold.
        for _ in 0..1000 {
            let msg = tokio_tungstenite::tungstenite::Message::binary(vec![1u8; 64 * 1024]);
            if futures_util::SinkExt::send(&mut tx, msg).await.is_err() {
                return;
            }
        }
    })
    .await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nidle_timeout = \"2s\"\n[[route]]\npath = \"/\"\nbackend = \"ws://{app}\"\n"
    ))
    .await;
    let admin = gate.admin.unwrap();
    let mut ws = raw_ws(gate.addr, "/").await.into_inner();
    let started = std::time::Instant::now();
    let open = || async {
        metric(
            admin,
            "wsgate_sessions_open{route=\"/\",http_version=\"1.1\"}",
        )
        .await
    };
    eventually("the session to start", WAIT, || async {
        open().await == 1.0
    })
    .await;
    // Keep talking (so the client is not idle), never read; at most 50 × 100 ms.
    for _ in 0..50 {
        let frame = client_frame(true, OpCode::Text, b"still here", [5, 6, 7, 8]);
        if ws.write_all(&frame).await.is_err() || open().await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut = started.elapsed();
    assert_eq!(open().await, 0.0, "the session was cut");
    assert!(
        cut >= Duration::from_secs(2) && cut < Duration::from_millis(3500),
        "cut after {cut:?}; idle_timeout is 2 s"
    );
}
