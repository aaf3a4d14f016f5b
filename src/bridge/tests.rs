//! The bridge's endings, driven through in-memory streams (`tokio::io::duplex`) with tokio's
//! clock paused, so timeouts are checked against their exact windows without waiting.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{run, MessageBudget, SessionLimits, Summary};
use crate::metrics::SessionCounters;
use crate::protocol::frame::{close_payload, encode_frame, FrameHeader, OpCode};
use crate::route::MessageMode;
use crate::session_end::{SessionControl, SessionEnd};
use crate::stream::{BoxRead, BoxWrite};

const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

fn limits() -> SessionLimits {
    SessionLimits {
        deflate: None,
        max_message_size: 1 << 20,
        idle_timeout: Duration::from_secs(60),
        ping_interval: Duration::from_secs(600),
        close_timeout: Duration::from_secs(5),
        message: MessageMode::Binary,
        framing: crate::route::Framing::Stream,
    }
}

/// The test's ends of a session: the client's socket, the backend's socket, the session task.
struct Harness {
    client: DuplexStream,
    backend: DuplexStream,
    shutdown: CancellationToken,
    /// The session's control: an operator's close goes through it.
    control: Arc<SessionControl>,
    session: JoinHandle<Summary>,
}

fn start(limits: SessionLimits) -> Harness {
    start_sized(limits, 64 * 1024, 64 * 1024)
}

/// A session whose client and backend connections hold at most these many bytes in flight.
fn start_sized(limits: SessionLimits, client_window: usize, backend_window: usize) -> Harness {
    let (client, gate_client) = tokio::io::duplex(client_window);
    let (backend, gate_backend) = tokio::io::duplex(backend_window);
    let (backend_read, backend_write) = tokio::io::split(gate_backend);
    start_with(
        limits,
        gate_client,
        Box::pin(backend_read),
        Box::pin(backend_write),
        client,
        backend,
    )
}

fn start_with(
    limits: SessionLimits,
    gate_client: DuplexStream,
    backend_read: BoxRead,
    backend_write: BoxWrite,
    client: DuplexStream,
    backend: DuplexStream,
) -> Harness {
    let shutdown = CancellationToken::new();
    let control = Arc::new(SessionControl::new(shutdown.clone()));
    let stop = control.clone();
    let (client_read, client_write) = tokio::io::split(gate_client);
    let session = tokio::spawn(async move {
        run(
            Box::pin(client_read),
            BytesMut::new(),
            Box::pin(client_write),
            Some((backend_read, backend_write)),
            &limits,
            &stop,
            SessionCounters::default(),
            &MessageBudget::new(1 << 30),
        )
        .await
    });
    Harness {
        client,
        backend,
        shutdown,
        control,
        session,
    }
}

async fn send(client: &mut DuplexStream, opcode: OpCode, payload: &[u8]) {
    let frame = encode_frame(true, opcode, Some(KEY), payload);
    client.write_all(&frame).await.expect("write to the gate");
}

/// Reads one server frame: its opcode and payload. Server frames must be unmasked.
async fn read_frame(client: &mut DuplexStream, buf: &mut Vec<u8>) -> Option<(OpCode, Vec<u8>)> {
    read_frame_from(client, buf).await
}

async fn read_frame_from(
    client: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Option<(OpCode, Vec<u8>)> {
    loop {
        if let Some((header, len)) = FrameHeader::parse(buf).expect("valid server frame") {
            assert!(header.mask.is_none(), "server frames are unmasked");
            let total = len + header.payload_len as usize;
            if buf.len() >= total {
                let payload = buf[len..total].to_vec();
                buf.drain(..total);
                return Some((header.opcode, payload));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await.expect("read from the gate");
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn close_code_of(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Reads data frames until the close frame; returns the data and the close code.
async fn data_then_close(client: &mut DuplexStream) -> (Vec<u8>, u16) {
    let mut buf = Vec::new();
    let mut data = Vec::new();
    loop {
        match read_frame(client, &mut buf).await {
            Some((OpCode::Binary | OpCode::Text, payload)) => data.extend(payload),
            Some((OpCode::Close, payload)) => return (data, close_code_of(&payload)),
            Some((other, _)) => panic!("unexpected {other:?} frame"),
            None => panic!("client stream ended before a close frame"),
        }
    }
}

async fn summary(h: Harness) -> Summary {
    tokio::time::timeout(Duration::from_secs(30), h.session)
        .await
        .expect("session ends within 30 s")
        .expect("session task")
}

#[tokio::test(start_paused = true)]
async fn backend_fin_delivers_every_byte_then_close_1000() {
    let mut h = start(limits());
    h.backend.write_all(b"RFB 003.008\n").await.unwrap();
    h.backend.write_all(&[7u8; 100_000]).await.unwrap();
    h.backend.shutdown().await.unwrap();
    let (data, code) = data_then_close(&mut h.client).await;
    assert_eq!(data.len(), 12 + 100_000);
    assert_eq!(&data[..12], b"RFB 003.008\n");
    assert_eq!(code, 1000);
    send(&mut h.client, OpCode::Close, &close_payload(1000, "")).await;
    let s = summary(h).await;
    assert_eq!(s.end, SessionEnd::BackendEof);
    assert_eq!(s.close_sent, Some(1000));
    assert_eq!(s.bytes_to_client, 100_012);
}

#[tokio::test(start_paused = true)]
async fn client_close_is_answered_and_half_closes_the_backend() {
    let mut h = start(limits());
    send(&mut h.client, OpCode::Binary, b"last words").await;
    send(&mut h.client, OpCode::Close, &close_payload(4000, "bye")).await;
    let mut got = vec![0u8; 10];
    h.backend.read_exact(&mut got).await.unwrap();
    assert_eq!(
        &got, b"last words",
        "data before the close reaches the backend"
    );
    let mut rest = Vec::new();
    h.backend.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "the backend sees EOF after the data");
    let mut buf = Vec::new();
    let (op, payload) = read_frame(&mut h.client, &mut buf)
        .await
        .expect("close reply");
    assert_eq!(op, OpCode::Close);
    assert_eq!(payload, close_payload(4000, "bye"), "the close is echoed");
    // The backend finishes; the gate then ends the client's TCP (FIN) and the session.
    h.backend.shutdown().await.unwrap();
    assert!(read_frame(&mut h.client, &mut buf).await.is_none());
    drop(h.client);
    let s = tokio::time::timeout(Duration::from_secs(30), h.session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.end, SessionEnd::ClientClose);
    assert_eq!(s.close_received, Some(4000));
}

/// A backend read half that fails: a reset connection.
struct ResetRead;

impl AsyncRead for ResetRead {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
    }
}

#[tokio::test(start_paused = true)]
async fn backend_reset_is_close_1014() {
    let (client, gate_client) = tokio::io::duplex(64 * 1024);
    let (backend, gate_backend) = tokio::io::duplex(64 * 1024);
    let mut h = start_with(
        limits(),
        gate_client,
        Box::pin(ResetRead),
        Box::pin(gate_backend),
        client,
        backend,
    );
    let (data, code) = data_then_close(&mut h.client).await;
    assert!(data.is_empty());
    assert_eq!(code, 1014);
    send(&mut h.client, OpCode::Close, &close_payload(1014, "")).await;
    assert_eq!(summary(h).await.end, SessionEnd::BackendError);
}

#[tokio::test(start_paused = true)]
async fn silent_client_gets_1001_at_idle_timeout_and_is_gone_by_close_timeout() {
    let l = SessionLimits {
        idle_timeout: Duration::from_secs(20),
        close_timeout: Duration::from_secs(3),
        ..limits()
    };
    let started = Instant::now();
    let mut h = start(l.clone());
    let (_, code) = data_then_close(&mut h.client).await;
    let closed_at = started.elapsed();
    assert_eq!(code, 1001);
    assert!(
        closed_at >= l.idle_timeout && closed_at < l.idle_timeout + Duration::from_millis(100),
        "close 1001 at {closed_at:?}, idle_timeout is {:?}",
        l.idle_timeout
    );
    // The client never answers the close: the session ends at close_timeout.
    let s = tokio::time::timeout(Duration::from_secs(30), &mut h.session)
        .await
        .unwrap()
        .unwrap();
    let ended_at = started.elapsed();
    assert!(
        ended_at >= l.idle_timeout + l.close_timeout
            && ended_at < l.idle_timeout + l.close_timeout + Duration::from_millis(100),
        "session ended at {ended_at:?}"
    );
    assert_eq!(s.end, SessionEnd::IdleTimeout);
}

#[tokio::test(start_paused = true)]
async fn shutdown_sends_1001() {
    let mut h = start(limits());
    h.shutdown.cancel();
    let (_, code) = data_then_close(&mut h.client).await;
    assert_eq!(code, 1001);
    let s = answer_close_and_end(h, 1001).await;
    assert_eq!(s.end, SessionEnd::Shutdown);
}

/// The client answers the close with `code`, the backend ends, the client goes: the
/// session's summary.
async fn answer_close_and_end(mut h: Harness, code: u16) -> Summary {
    send(&mut h.client, OpCode::Close, &close_payload(code, "")).await;
    h.backend.shutdown().await.unwrap();
    drop(h.client);
    tokio::time::timeout(Duration::from_secs(30), h.session)
        .await
        .unwrap()
        .unwrap()
}

/// An operator's close (the admin listener) reaches the client with its code and reason, and
/// the session's live byte counts are what it moved.
#[tokio::test(start_paused = true)]
async fn an_operators_close_sends_its_code_and_reason() {
    let mut h = start(limits());
    send(&mut h.client, OpCode::Binary, b"12345").await;
    let mut got = [0u8; 5];
    h.backend.read_exact(&mut got).await.unwrap();
    assert_eq!(
        h.control
            .bytes_from_client
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    assert!(h.control.close(4001, "moved to another desk".into()));
    let mut buf = Vec::new();
    let (op, payload) = read_frame(&mut h.client, &mut buf).await.expect("a close");
    assert_eq!(op, OpCode::Close);
    assert_eq!(payload, close_payload(4001, "moved to another desk"));
    let s = answer_close_and_end(h, 4001).await;
    assert_eq!(s.end, SessionEnd::ClosedByOperator);
    assert_eq!(s.close_sent, Some(4001));
}

#[tokio::test(start_paused = true)]
async fn text_mode_carries_utf8_split_across_backend_reads() {
    let l = SessionLimits {
        message: MessageMode::Text,
        ..limits()
    };
    let mut h = start(l);
    let euro = "€".as_bytes();
    h.backend.write_all(&euro[..1]).await.unwrap();
    h.backend.flush().await.unwrap();
    tokio::task::yield_now().await;
    h.backend.write_all(&euro[1..]).await.unwrap();
    h.backend.shutdown().await.unwrap();
    let mut buf = Vec::new();
    let mut text = Vec::new();
    loop {
        match read_frame(&mut h.client, &mut buf).await.expect("frame") {
            (OpCode::Text, payload) => {
                assert!(std::str::from_utf8(&payload).is_ok(), "each frame is UTF-8");
                text.extend(payload);
            }
            (OpCode::Close, payload) => {
                assert_eq!(close_code_of(&payload), 1000);
                break;
            }
            (op, _) => panic!("unexpected {op:?}"),
        }
    }
    assert_eq!(text, euro);
}

fn quick_timeouts() -> SessionLimits {
    SessionLimits {
        idle_timeout: Duration::from_secs(5),
        close_timeout: Duration::from_secs(2),
        ..limits()
    }
}

fn assert_within(what: &str, at: Duration, from: Duration) {
    assert!(
        at >= from && at < from + Duration::from_millis(100),
        "{what} at {at:?}, expected {from:?} (+100 ms at most)"
    );
}

/// Regression (issue: a backend that accepts and never reads held its sessions forever): the
/// client pushes until backpressure; the session gets close 1011 at idle_timeout after the
/// backend stopped reading, and is gone by idle_timeout + close_timeout.
#[tokio::test(start_paused = true)]
async fn backend_that_never_reads_is_1011_at_idle_timeout() {
    let l = quick_timeouts();
    let started = Instant::now();
    let h = start_sized(l.clone(), 16 * 1024, 1024);
    let (mut client_read, mut client_write) = tokio::io::split(h.client);
    let pusher = tokio::spawn(async move {
        let frame = encode_frame(true, OpCode::Binary, Some(KEY), &[1u8; 16 * 1024]);
        // Bounded: 64 frames (1 MiB) is far more than the windows and buffers hold.
        for _ in 0..64 {
            if client_write.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut buf = Vec::new();
    let (op, payload) = read_frame_from(&mut client_read, &mut buf)
        .await
        .expect("close");
    assert_eq!(op, OpCode::Close);
    assert_eq!(close_code_of(&payload), 1011);
    assert_within("close 1011", started.elapsed(), l.idle_timeout);
    let s = tokio::time::timeout(Duration::from_secs(30), h.session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.end, SessionEnd::BackendStuck);
    assert_within(
        "session end",
        started.elapsed(),
        l.idle_timeout + l.close_timeout,
    );
    pusher.abort();
    drop(h.backend);
}

/// A client that goes away while its data waits for a slow backend is noticed at once: the
/// backend gets EOF behind what was written, and the session ends when the backend closes.
#[tokio::test(start_paused = true)]
async fn client_gone_while_backend_blocked_is_noticed_at_once() {
    let l = quick_timeouts();
    let mut h = start_sized(l, 64 * 1024, 1024);
    for _ in 0..5 {
        send(&mut h.client, OpCode::Binary, &[2u8; 4096]).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone_at = Instant::now();
    drop(h.client);
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), h.backend.read_to_end(&mut got))
        .await
        .expect("backend sees EOF")
        .unwrap();
    assert!(
        gone_at.elapsed() < Duration::from_millis(100),
        "backend got EOF {:?} after the client left",
        gone_at.elapsed()
    );
    assert!(got.iter().all(|b| *b == 2));
    drop(h.backend);
    let s = tokio::time::timeout(Duration::from_secs(30), h.session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.end, SessionEnd::ClientGone);
    assert!(gone_at.elapsed() < Duration::from_millis(100));
}

/// A client that never reads what the backend sends: closing at idle_timeout, gone by
/// idle_timeout + close_timeout (no close frame can get through its full window).
#[tokio::test(start_paused = true)]
async fn client_that_never_reads_is_cut_at_idle_timeout() {
    let l = quick_timeouts();
    let started = Instant::now();
    let mut h = start_sized(l.clone(), 1024, 64 * 1024);
    let backend = tokio::spawn(async move {
        // Bounded: 1 MiB, far more than the client's window.
        for _ in 0..64 {
            if h.backend.write_all(&[3u8; 16 * 1024]).await.is_err() {
                break;
            }
        }
        h.backend
    });
    let s = tokio::time::timeout(Duration::from_secs(30), h.session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.end, SessionEnd::ClientNotReading);
    assert_within(
        "session end",
        started.elapsed(),
        l.idle_timeout + l.close_timeout,
    );
    drop(h.client);
    backend.abort();
}

/// Drain with both sides stuck still ends the session within close_timeout of the signal.
#[tokio::test(start_paused = true)]
async fn shutdown_with_both_sides_stuck_ends_within_close_timeout() {
    let l = SessionLimits {
        idle_timeout: Duration::from_secs(600),
        ..quick_timeouts()
    };
    let h = start_sized(l.clone(), 1024, 1024);
    let (_client_read, mut client_write) = tokio::io::split(h.client);
    let mut backend = h.backend;
    let pushers = tokio::spawn(async move {
        let frame = encode_frame(true, OpCode::Binary, Some(KEY), &[4u8; 8192]);
        for _ in 0..64 {
            let _ = tokio::join!(
                client_write.write_all(&frame),
                backend.write_all(&[5u8; 8192])
            );
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let signalled = Instant::now();
    h.shutdown.cancel();
    let s = tokio::time::timeout(Duration::from_secs(30), h.session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.end, SessionEnd::Shutdown);
    assert!(
        signalled.elapsed() <= l.close_timeout + Duration::from_millis(100),
        "ended {:?} after the signal",
        signalled.elapsed()
    );
    pushers.abort();
}
