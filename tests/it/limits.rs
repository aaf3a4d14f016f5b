//! The `[limits]` timers: idle timeout, pings, close timeout, and drain on shutdown.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use wsgate::protocol::frame::OpCode;

#[tokio::test]
async fn silent_client_gets_1001_at_idle_timeout() {
    let g = Gate::route(
        "/",
        "echo",
        "idle_timeout = \"400ms\"\nping_interval = \"10s\"",
        "",
    )
    .await;
    let mut ws = raw_ws(g.addr, "/").await;
    let started = Instant::now();
    assert_eq!(read_until_close(&mut ws).await, Some(1001));
    assert!(started.elapsed() >= Duration::from_millis(350));
}

#[tokio::test]
async fn idle_client_is_pinged() {
    let g = Gate::route("/", "echo", "ping_interval = \"200ms\"", "").await;
    let mut ws = raw_ws(g.addr, "/").await;
    let f = read_frame(&mut ws).await.unwrap();
    assert_eq!(f.opcode, OpCode::Ping);
}

/// A client that answers pings (tungstenite does) is never idle-closed, though it sends no
/// data: pongs count as activity.
#[tokio::test]
async fn client_answering_pings_stays_open() {
    let g = Gate::route(
        "/",
        "echo",
        "idle_timeout = \"600ms\"\nping_interval = \"150ms\"",
        "",
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(g.url("/")).await.unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while Instant::now() < until {
        match tokio::time::timeout_at(until.into(), ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("session must stay open, got {other:?}"),
        }
    }
    assert!(pings >= 3, "pinged {pings} times");
    ws.send(Message::text("still here")).await.unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => {
                assert_eq!(m, Message::text("still here"));
                break;
            }
        }
    }
}

/// A client that never answers our close is cut after close_timeout.
#[tokio::test]
async fn unanswered_close_is_cut_after_close_timeout() {
    let backend = send_n_then_close_backend(10).await;
    let g = Gate::route(
        "/",
        &format!("tcp://{backend}"),
        "close_timeout = \"300ms\"",
        "",
    )
    .await;
    let mut ws = raw_ws(g.addr, "/").await;
    assert_eq!(read_until_close(&mut ws).await, Some(1000));
    let started = Instant::now();
    assert!(expect_eof(&mut ws).await);
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// On shutdown, live sessions may go on for drain_timeout, then get close 1001; the server
/// stops once they are done, and new connections are refused meanwhile.
#[tokio::test]
async fn drain_closes_live_sessions_with_1001() {
    let mut g = Gate::route(
        "/",
        "echo",
        "drain_timeout = \"500ms\"\nclose_timeout = \"1s\"",
        "",
    )
    .await;
    let addr = g.addr;
    let (mut ws, _) = tokio_tungstenite::connect_async(g.url("/")).await.unwrap();
    let drained = g.stop();
    let started = Instant::now();
    // During the drain the session still works...
    ws.send(Message::text("during drain")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("during drain")
    );
    // ...and new connections are refused (the listener is closed).
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "listener must close on shutdown");
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(c))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert_eq!(u16::from(close.unwrap().code), 1001);
    drop(ws);
    tokio::time::timeout(WAIT, drained).await.unwrap().unwrap();
}

/// A frame trickling in slower than idle_timeout in total is not idle: incoming bytes, not
/// whole frames, count as activity.
#[tokio::test]
async fn slow_frame_counts_as_activity() {
    let g = Gate::route(
        "/",
        "echo",
        "idle_timeout = \"300ms\"\nping_interval = \"100ms\"",
        "",
    )
    .await;
    let mut ws = raw_ws(g.addr, "/").await;
    let frame = client_frame(true, OpCode::Binary, &[7u8; 6], [1, 2, 3, 4]);
    for b in &frame {
        ws.write_all(std::slice::from_ref(b)).await.unwrap();
        // The slowness is the point of this test: a byte every 120 ms.
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    loop {
        let f = read_frame(&mut ws).await.expect("session still open");
        if f.opcode == OpCode::Binary {
            assert_eq!(f.payload, vec![7u8; 6]);
            break;
        }
        assert_eq!(f.opcode, OpCode::Ping);
    }
}
