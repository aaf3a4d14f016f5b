//! `framing = "lines"`: each client message reaches the backend as one line, the backend's
//! output comes back one message per line — lines split across reads, several lines in one
//! read, a line over max_message_size, invalid UTF-8 in text mode.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use wsgate::protocol::frame::OpCode;

use crate::common::*;

/// A backend that reports everything it reads and writes what the test tells it to.
async fn scripted_backend() -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<Vec<u8>>,
    mpsc::UnboundedSender<Vec<u8>>,
) {
    let (got_tx, got_rx) = mpsc::unbounded_channel();
    let (say_tx, say_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let say_rx = std::sync::Arc::new(tokio::sync::Mutex::new(say_rx));
    let addr = backend(move |s| {
        let (got_tx, say_rx) = (got_tx.clone(), say_rx.clone());
        async move {
            let (mut r, mut w) = s.into_split();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 || got_tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
            let mut say = say_rx.lock().await;
            while let Some(bytes) = say.recv().await {
                if bytes.is_empty() {
                    let _ = w.shutdown().await;
                    break;
                }
                if w.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    (addr, got_rx, say_tx)
}

async fn gate(backend: std::net::SocketAddr, limits: &str, extra: &str) -> Gate {
    Gate::route(
        "/",
        &format!("tcp://{backend}"),
        limits,
        &format!("framing = \"lines\"\n{extra}"),
    )
    .await
}

async fn send(
    ws: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    fin: bool,
    op: OpCode,
    payload: &[u8],
) {
    ws.get_mut()
        .write_all(&client_frame(fin, op, payload, [3, 1, 4, 1]))
        .await
        .unwrap();
}

#[tokio::test]
async fn each_client_message_is_one_line_to_the_backend() {
    let (backend, mut got, _say) = scripted_backend().await;
    let g = gate(backend, "", "").await;
    let mut ws = raw_ws(g.addr, "/").await;
    send(&mut ws, true, OpCode::Text, b"hello").await;
    send(&mut ws, true, OpCode::Text, b"already ends\n").await;
    // A fragmented message whose newline is in its middle piece: one newline added at its end.
    send(&mut ws, false, OpCode::Text, b"frag\n").await;
    send(&mut ws, true, OpCode::Continuation, b"mented").await;
    send(&mut ws, true, OpCode::Binary, b"").await;
    let want = b"hello\nalready ends\nfrag\nmented\n\n".to_vec();
    let mut all = Vec::new();
    while all.len() < want.len() {
        all.extend(
            within("bytes at the backend", WAIT, got.recv())
                .await
                .unwrap(),
        );
    }
    assert_eq!(all, want);
}

#[tokio::test]
async fn backend_lines_are_messages_across_and_within_reads() {
    let (backend, _got, say) = scripted_backend().await;
    let g = gate(backend, "", "message = \"text\"").await;
    let mut ws = raw_ws(g.addr, "/").await;
    // Several lines in one write, a line split over writes (and over a UTF-8 sequence).
    say.send("one\ntwo\nthré".as_bytes()[..12].to_vec())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    say.send([&"thré".as_bytes()[4..], b"e\n{\"type\":\"usermsg\"}\nlast"].concat())
        .unwrap();
    say.send(Vec::new()).unwrap(); // EOF: the last line without a newline is sent too
    let mut lines = Vec::new();
    loop {
        let f = read_frame(&mut ws).await.expect("a frame");
        match f.opcode {
            OpCode::Text => lines.push(String::from_utf8(f.payload).unwrap()),
            OpCode::Close => {
                assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1000);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        lines,
        ["one", "two", "thrée", "{\"type\":\"usermsg\"}", "last"]
    );
}

#[tokio::test]
async fn a_backend_line_over_max_message_size_is_1009() {
    let (backend, _got, say) = scripted_backend().await;
    let g = gate(backend, "max_message_size = \"1KiB\"", "").await;
    let mut ws = raw_ws(g.addr, "/").await;
    say.send(b"short\n".to_vec()).unwrap();
    say.send(vec![b'x'; 700]).unwrap();
    say.send(vec![b'y'; 700]).unwrap();
    let first = read_frame(&mut ws).await.unwrap();
    assert_eq!(first.payload, b"short");
    assert_eq!(read_until_close(&mut ws).await, Some(1009));
}

#[tokio::test]
async fn invalid_utf8_in_a_text_line_is_1014() {
    let (backend, _got, say) = scripted_backend().await;
    let g = gate(backend, "", "message = \"text\"").await;
    let mut ws = raw_ws(g.addr, "/").await;
    say.send(b"ok\n\xff\xfe\n".to_vec()).unwrap();
    assert_eq!(read_frame(&mut ws).await.unwrap().payload, b"ok");
    assert_eq!(read_until_close(&mut ws).await, Some(1014));
}
