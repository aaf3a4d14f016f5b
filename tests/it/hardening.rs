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
    let open = metric(admin, "wsgate_sessions_open{route=\"/\"}").await;
    assert_eq!(open, CLIENTS as f64, "all sessions are up and stuck");
    for ws in clients {
        reset(ws);
    }
    // idle_timeout 3 s + close_timeout 1 s from when the backend stopped reading.
    let took = eventually(
        "every stuck session to end",
        Duration::from_secs(8),
        || async { metric(admin, "wsgate_sessions_open{route=\"/\"}").await == 0.0 },
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
