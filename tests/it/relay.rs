//! The bridge relay against real TCP/unix backends, driven by tokio-tungstenite as the client:
//! data both ways, every ending with nothing lost, text mode, volume, concurrency, memory.

use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use wsgate::protocol::frame::OpCode;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade")
        .0
}

/// Next message, bounded by WAIT; `None` when the stream ended.
async fn next(ws: &mut Ws) -> Option<Message> {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("message in time")
        .map(|m| m.expect("no protocol error"))
}

/// Collects binary payload until a close frame; returns the bytes and the close code.
async fn collect_until_close(ws: &mut Ws) -> (Vec<u8>, Option<CloseCode>, String) {
    let mut data = Vec::new();
    while let Some(m) = next(ws).await {
        match m {
            Message::Binary(b) => data.extend_from_slice(&b),
            Message::Text(t) => data.extend_from_slice(t.as_bytes()),
            Message::Close(c) => {
                let (code, reason) = c
                    .map(|c| (Some(c.code), c.reason.to_string()))
                    .unwrap_or((None, String::new()));
                return (data, code, reason);
            }
            _ => {}
        }
    }
    (data, None, String::new())
}

#[tokio::test]
async fn echo_through_tcp_backend() {
    let backend = echo_backend().await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let mut ws = connect(&g.url("/")).await;
    ws.send(Message::binary(b"hello".to_vec())).await.unwrap();
    assert_eq!(
        next(&mut ws).await,
        Some(Message::binary(b"hello".to_vec()))
    );
    // Text from the client is relayed as bytes; binary frames come back (message = binary).
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(
        next(&mut ws).await,
        Some(Message::binary("héllo".as_bytes().to_vec()))
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn unix_socket_backend() {
    let dir = TempDir::new();
    let path = dir.path().join("backend.sock");
    unix_echo_backend(&path);
    let g = Gate::route("/", &format!("unix:{}", path.display()), "", "").await;
    let mut ws = connect(&g.url("/")).await;
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::binary(vec![1, 2, 3])));
}

#[tokio::test]
async fn backend_banner_arrives_before_the_client_speaks() {
    let backend = banner_backend(b"RFB 003.008\n").await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let mut ws = connect(&g.url("/")).await;
    assert_eq!(
        next(&mut ws).await,
        Some(Message::binary(b"RFB 003.008\n".to_vec()))
    );
}

#[tokio::test]
async fn backend_fin_delivers_every_byte_then_close_1000() {
    let n = 3 * 1024 * 1024 + 17;
    let backend = send_n_then_close_backend(n).await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let mut ws = connect(&g.url("/")).await;
    let (data, code, _) = collect_until_close(&mut ws).await;
    assert_eq!(data.len(), n);
    assert!(
        data == pattern(n, 7),
        "bytes must arrive intact and in order"
    );
    assert_eq!(code, Some(CloseCode::Normal));
    // The close handshake completes and wsgate closes TCP.
    assert!(next(&mut ws).await.is_none());
}

#[tokio::test]
async fn backend_reset_is_close_1014() {
    let backend = reset_backend().await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    // Raw frames here: tungstenite turns a received 1014 into 1002 (tungstenite-rs#502).
    let mut ws = raw_ws(g.addr, "/").await;
    ws.write_all(&client_frame(
        true,
        OpCode::Binary,
        b"trigger",
        [1, 2, 3, 4],
    ))
    .await
    .unwrap();
    assert_eq!(read_until_close(&mut ws).await, Some(1014));
}

/// Client close: the backend gets every byte sent before it, then EOF; the client gets the
/// close answered. The backend keeps sending meanwhile (the case that loses bytes elsewhere).
#[tokio::test]
async fn client_close_delivers_every_byte_then_half_closes_backend() {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
    let backend = backend(move |s| {
        let tx = tx.clone();
        async move {
            let (mut r, mut w) = s.into_split();
            let chatter = tokio::spawn(async move {
                let chunk = vec![b'x'; 16 * 1024];
                for _ in 0..2000 {
                    if w.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
            let mut got = Vec::new();
            let _ = r.read_to_end(&mut got).await; // until wsgate's FIN
            let _ = tx.send(got).await;
            chatter.abort();
        }
    })
    .await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let mut ws = connect(&g.url("/")).await;
    let sent = pattern(1024 * 1024, 3);
    for chunk in sent.chunks(50_000) {
        ws.send(Message::binary(chunk.to_vec())).await.unwrap();
    }
    ws.close(None).await.unwrap();
    // Read out the chatter until the close reply.
    let (_, code, _) = collect_until_close(&mut ws).await;
    assert_eq!(code, None, "an empty close is answered with an empty close");
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(
        got == sent,
        "backend must get every byte sent before the close"
    );
}

#[tokio::test]
async fn client_close_code_is_echoed() {
    let backend = echo_backend().await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let mut ws = connect(&g.url("/")).await;
    ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: CloseCode::Library(4321),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let (_, code, _) = collect_until_close(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Library(4321)));
}

/// Text mode: a UTF-8 sequence split across backend reads is carried, never cut.
#[tokio::test]
async fn text_mode_carries_utf8_split_across_reads() {
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go = std::sync::Mutex::new(Some(go_rx));
    let backend = backend(move |mut s| {
        let go = go.lock().unwrap().take();
        async move {
            // "a" and the first byte of "é" (0xC3 0xA9) in one write...
            s.write_all(b"a\xC3").await.unwrap();
            // ...the rest only after the client has seen "a".
            go.unwrap().await.unwrap();
            s.write_all(b"\xA9b").await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
    })
    .await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "message = \"text\"").await;
    let mut ws = connect(&g.url("/")).await;
    assert_eq!(next(&mut ws).await, Some(Message::text("a")));
    go_tx.send(()).unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::text("éb")));
}

#[tokio::test]
async fn text_mode_invalid_utf8_from_backend_is_1014() {
    let backend = backend(|mut s| async move {
        s.write_all(b"ok\xFF\xFEnot text").await.unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "message = \"text\"").await;
    let mut ws = raw_ws(g.addr, "/").await;
    let mut frames = Vec::new();
    while let Some(f) = read_frame(&mut ws).await {
        let close = f.opcode == OpCode::Close;
        frames.push(f);
        if close {
            break;
        }
    }
    let close = frames.pop().expect("a close frame");
    assert_eq!(close.payload[..2], 1014u16.to_be_bytes());
    assert!(
        frames.is_empty(),
        "no invalid text reaches the client: {frames:?}"
    );
}

/// 8 MiB each way through the bridge, compared by SHA-256, reading and writing at once.
#[tokio::test]
async fn large_transfer_each_way_is_intact() {
    let backend = echo_backend().await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let ws = connect(&g.url("/")).await;
    let (mut tx, mut rx) = ws.split();
    let total = 8 * 1024 * 1024;
    let data = pattern(total, 11);
    let sent_hash = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx
    });
    assert_eq!(sha256_of_binary(&mut rx, total).await, sent_hash.to_vec());
    let _ = writer.await.unwrap();
}

/// 200 sessions at once, each with its own data: nothing mixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sessions_do_not_mix() {
    let backend = echo_backend().await;
    let g = Gate::route("/", &format!("tcp://{backend}"), "", "").await;
    let url = g.url("/");
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&url).await;
            let mine = pattern(20_000, 1000 + i);
            let mut echoed = Vec::new();
            for chunk in mine.chunks(5_000) {
                ws.send(Message::binary(chunk.to_vec())).await.unwrap();
            }
            while echoed.len() < mine.len() {
                match next(&mut ws).await.unwrap() {
                    Message::Binary(b) => echoed.extend_from_slice(&b),
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(echoed == mine, "session {i} got someone else's bytes");
            ws.close(None).await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A backend that never reads: wsgate stops reading the client (backpressure) instead of
/// buffering, so its memory stays flat however much the client tries to send.
#[tokio::test]
async fn never_reading_backend_does_not_grow_memory() {
    let backend = never_read_backend(Duration::from_secs(30)).await;
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{backend}\"\n"
    ));
    let url = format!("ws://{}/", gate.addr);
    let before = gate.rss_kib();
    let mut ws = connect(&url).await;
    let chunk = vec![0x5Au8; 256 * 1024];
    let mut accepted = 0usize;
    // Send until a send stays blocked for a second (the stream is full), at most 256 MiB.
    for _ in 0..1024 {
        match tokio::time::timeout(
            Duration::from_secs(1),
            ws.send(Message::binary(chunk.clone())),
        )
        .await
        {
            Ok(Ok(())) => accepted += chunk.len(),
            _ => break,
        }
    }
    let after = gate.rss_kib();
    assert!(
        accepted < 64 * 1024 * 1024,
        "wsgate kept accepting: {accepted} bytes"
    );
    assert!(
        after.saturating_sub(before) < 8 * 1024,
        "wsgate RSS grew by {} KiB (before {before} KiB, after {after} KiB)",
        after.saturating_sub(before)
    );
}

/// The other direction: a client that never reads while the backend floods. wsgate stops
/// reading the backend instead of queueing, so its memory stays flat.
#[tokio::test]
async fn client_that_never_reads_does_not_grow_memory() {
    let (tx, mut rx) = mpsc::channel::<usize>(1);
    let backend = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let chunk = vec![0xA5u8; 256 * 1024];
            let mut written = 0usize;
            // Write until a write stays blocked for a second, at most 256 MiB.
            for _ in 0..1024 {
                match tokio::time::timeout(Duration::from_secs(1), s.write_all(&chunk)).await {
                    Ok(Ok(())) => written += chunk.len(),
                    _ => break,
                }
            }
            let _ = tx.send(written).await;
        }
    })
    .await;
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{backend}\"\n"
    ));
    let before = gate.rss_kib();
    let _client = raw_ws(gate.addr, "/").await; // upgraded, never reads
    let written = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let after = gate.rss_kib();
    assert!(
        written < 64 * 1024 * 1024,
        "wsgate kept reading the backend: {written} bytes"
    );
    assert!(
        after.saturating_sub(before) < 8 * 1024,
        "wsgate RSS grew by {} KiB (before {before} KiB, after {after} KiB)",
        after.saturating_sub(before)
    );
}
