//! A bridge session: the two pumps between an upgraded client and its backend, their timers,
//! and how each ending maps to a close code.
//!
//! ```text
//!  client ──frames──▶ pump_client ──payload bytes──▶ backend      (Decoder, unmask, UTF-8)
//!  client ◀─frames─── pump_backend ◀──bytes───────── backend      (one frame per read)
//! ```
//! Both pumps run concurrently in the session's task and share the client's [`FrameWriter`]
//! behind a mutex, so a pong or a close never lands inside another frame. Each pump awaits its
//! own writes, which is the backpressure: a slow reader stops the other side's reads, and each
//! direction buffers at most [`MAX_READ_BUF`] bytes in user space.
//!
//! Endings: once a close is sent or received the session is *closing* and has `close_timeout`
//! left; whatever has not finished by then is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Mutex};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::backend::BoxRead;
use crate::config::MessageMode;
use crate::frame::{close_code, OpCode};
use crate::metrics::SessionCounters;
use crate::ws::{BoxWrite, Decoder, Event, FrameWriter, MessageKind, Utf8Validator, Violation};

/// First read buffer of each direction; idle sessions stay this small.
const INITIAL_READ_BUF: usize = 4 * 1024;
/// A buffer that fills on every read doubles up to this; the per-direction bound.
pub const MAX_READ_BUF: usize = 64 * 1024;

/// The limits a session runs under.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_message_size: u64,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub close_timeout: Duration,
    pub message: MessageMode,
}

/// What happened in a session, for its log line and metrics.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub messages_from_client: u64,
    pub messages_to_client: u64,
    /// Close code we sent (1005 for an empty close).
    pub close_sent: Option<u16>,
    /// Close code the client sent (1005 for an empty close).
    pub close_received: Option<u16>,
    /// Why the session ended, a fixed label.
    pub end: &'static str,
}

/// State both pumps share.
struct Shared {
    writer: Mutex<FrameWriter>,
    /// Set when a close is sent or received: the moment the session must be over by.
    closing: watch::Sender<Option<Instant>>,
    close_timeout: Duration,
    end: OnceLock<&'static str>,
    close_received: OnceLock<u16>,
    bytes_from_client: AtomicU64,
    bytes_to_client: AtomicU64,
    messages_from_client: AtomicU64,
    messages_to_client: AtomicU64,
    /// The route's global counters, counted into as the session goes.
    counters: SessionCounters,
}

impl Shared {
    fn count_from_client(&self, bytes: usize, message_done: bool) {
        self.bytes_from_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.bytes_from_client.inc_by(bytes as u64);
        if message_done {
            self.messages_from_client.fetch_add(1, Ordering::Relaxed);
            self.counters.messages_from_client.inc();
        }
    }

    /// Counts one whole message (frame) sent to the client.
    fn count_to_client(&self, bytes: usize) {
        self.bytes_to_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.bytes_to_client.inc_by(bytes as u64);
        self.messages_to_client.fetch_add(1, Ordering::Relaxed);
        self.counters.messages_to_client.inc();
    }

    /// Records why the session ends (the first reason wins) and starts the close countdown.
    fn start_closing(&self, end: &'static str) {
        let _ = self.end.set(end);
        self.closing.send_if_modified(|deadline| {
            if deadline.is_none() {
                *deadline = Some(Instant::now() + self.close_timeout);
                true
            } else {
                false
            }
        });
    }

    fn is_closing(&self) -> bool {
        self.closing.borrow().is_some()
    }

    /// Starts closing and sends our close frame (once), after any frame in progress.
    /// Cancel-safe in the sense that matters: the countdown is started before waiting.
    async fn close(&self, end: &'static str, code: Option<u16>, reason: &str) {
        self.start_closing(end);
        let _ = self.writer.lock().await.close(code, reason).await;
    }

    /// Resolves when the close countdown runs out.
    async fn closing_deadline(&self) {
        let mut rx = self.closing.subscribe();
        loop {
            let deadline = *rx.borrow_and_update();
            if let Some(deadline) = deadline {
                sleep_until(deadline).await;
                return;
            }
            // The sender lives as long as `self`, so this only fails if it was dropped.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Runs one session to its end and says how it went.
///
/// `initial` holds client bytes that arrived behind the handshake; `backend` is `None` for
/// the built-in echo. `shutdown`, when
/// cancelled, closes the session with 1001. Cancel-safe only in that dropping it drops the
/// connections.
pub async fn run(
    client_read: BoxRead,
    initial: BytesMut,
    client_write: BoxWrite,
    backend: Option<(BoxRead, BoxWrite)>,
    limits: &SessionLimits,
    shutdown: &CancellationToken,
    counters: SessionCounters,
) -> Summary {
    let shared = Shared {
        writer: Mutex::new(FrameWriter::new(client_write)),
        closing: watch::Sender::new(None),
        close_timeout: limits.close_timeout,
        end: OnceLock::new(),
        close_received: OnceLock::new(),
        bytes_from_client: AtomicU64::new(0),
        bytes_to_client: AtomicU64::new(0),
        messages_from_client: AtomicU64::new(0),
        messages_to_client: AtomicU64::new(0),
        counters,
    };
    let (backend_read, backend_write) = match backend {
        None => (None, None),
        Some((read, write)) => (Some(read), Some(write)),
    };
    let pumps = async {
        tokio::join!(
            pump_client(
                &shared,
                client_read,
                initial,
                backend_write,
                limits,
                shutdown
            ),
            async {
                if let Some(read) = backend_read {
                    pump_backend(&shared, read, limits.message).await;
                }
            }
        )
    };
    tokio::select! {
        _ = pumps => {}
        () = shared.closing_deadline() => {
            let _ = shared.end.set("close_timeout");
        }
    }
    let close_sent = match shared.writer.try_lock() {
        Ok(w) => w.close_sent(),
        Err(_) => None,
    };
    Summary {
        bytes_from_client: shared.bytes_from_client.load(Ordering::Relaxed),
        bytes_to_client: shared.bytes_to_client.load(Ordering::Relaxed),
        messages_from_client: shared.messages_from_client.load(Ordering::Relaxed),
        messages_to_client: shared.messages_to_client.load(Ordering::Relaxed),
        close_sent,
        close_received: shared.close_received.get().copied(),
        end: shared.end.get().copied().unwrap_or("unknown"),
    }
}

/// Client → backend: reads frames, streams data payloads to the backend (or echoes them),
/// answers pings, runs the idle and ping timers, and finishes the close handshake.
async fn pump_client(
    s: &Shared,
    mut client: BoxRead,
    mut buf: BytesMut,
    mut backend: Option<BoxWrite>,
    limits: &SessionLimits,
    shutdown: &CancellationToken,
) {
    let echo = backend.is_none();
    let mut decoder = Decoder::new(limits.max_message_size);
    let mut closing_rx = s.closing.subscribe();
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + limits.ping_interval;
    let mut read_size = INITIAL_READ_BUF;
    let mut shutdown_seen = false;
    let mut echo_message = Vec::new();
    loop {
        // Act on every complete event already buffered.
        loop {
            let event = match decoder.decode(&mut buf) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(Violation { code, reason }) => {
                    let end = match code {
                        close_code::INVALID_PAYLOAD => "invalid_utf8",
                        close_code::MESSAGE_TOO_BIG => "message_too_big",
                        _ => "protocol_error",
                    };
                    s.close(end, Some(code), reason).await;
                    // Failing the connection (§7.1.7): no further frames are processed.
                    return finish(s, client, backend).await;
                }
            };
            match event {
                Event::Data {
                    kind, payload, fin, ..
                } => {
                    s.count_from_client(payload.len(), fin);
                    if echo {
                        // The echo answers whole messages (at most max_message_size): a
                        // client may write a whole message before it reads anything.
                        echo_message.extend_from_slice(&payload);
                        if fin {
                            let opcode = match kind {
                                MessageKind::Text => OpCode::Text,
                                MessageKind::Binary => OpCode::Binary,
                            };
                            let mut writer = s.writer.lock().await;
                            let counted = writer.close_sent().is_none();
                            if writer.send(opcode, true, &echo_message).await.is_err() {
                                s.start_closing("client_error");
                                return;
                            }
                            if counted {
                                s.count_to_client(echo_message.len());
                            }
                            echo_message.clear();
                            echo_message.shrink_to(INITIAL_READ_BUF);
                        }
                    } else if let Some(w) = backend.as_mut() {
                        if w.write_all(&payload).await.is_err() {
                            backend = None;
                            s.close(
                                "backend_error",
                                Some(close_code::BAD_GATEWAY),
                                "backend connection failed",
                            )
                            .await;
                        }
                    }
                }
                Event::Ping(payload) => match timeout(s.close_timeout, s.writer.lock()).await {
                    Ok(mut writer) => {
                        if writer.pong(&payload).await.is_err() {
                            s.start_closing("client_error");
                            return;
                        }
                    }
                    // The writer is stuck behind a client that does not read.
                    Err(_) => s.start_closing("client_not_reading"),
                },
                Event::Pong(_) => {}
                Event::Close(close) => {
                    let code = close.as_ref().map(|(code, _)| *code);
                    let reason = close.as_ref().map_or("", |(_, r)| r.as_str());
                    let _ = s.close_received.set(code.unwrap_or(1005));
                    // Echo the code and reason (§5.5.1); a no-op if our close went first.
                    s.close("client_close", code, reason).await;
                    return finish(s, client, backend).await;
                }
            }
        }

        // Read more.
        if buf.capacity() - buf.len() < read_size.max(decoder.wants()) {
            buf.reserve(read_size.max(decoder.wants()));
        }
        let closing = closing_rx.borrow_and_update().is_some();
        let idle_at = last_heard + limits.idle_timeout;
        let timer = if closing {
            // The session's close deadline bounds us now.
            Instant::now() + limits.close_timeout * 2
        } else {
            idle_at.min(next_ping)
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled(), if !shutdown_seen => {
                shutdown_seen = true;
                s.close("shutdown", Some(close_code::GOING_AWAY), "server shutting down").await;
            }
            _ = closing_rx.changed() => {}
            () = sleep_until(timer) => {
                if closing {
                    continue;
                }
                let now = Instant::now();
                if now >= idle_at {
                    s.close("idle_timeout", Some(close_code::GOING_AWAY), "idle timeout").await;
                } else if now >= next_ping {
                    // Skip the ping if a frame is being written: the link is busy anyway.
                    if let Ok(mut writer) = s.writer.try_lock() {
                        if writer.send(OpCode::Ping, true, b"").await.is_err() {
                            s.start_closing("client_error");
                            return;
                        }
                    }
                    next_ping = now + limits.ping_interval;
                }
            }
            read = client.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    // Gone without a close handshake (1006 in the log).
                    s.start_closing("client_gone");
                    if let Some(mut w) = backend {
                        let _ = w.shutdown().await;
                    }
                    return;
                }
                Ok(n) => {
                    last_heard = Instant::now();
                    next_ping = last_heard + limits.ping_interval;
                    if n >= read_size && read_size < MAX_READ_BUF {
                        read_size *= 2;
                    }
                }
            }
        }
    }
}

/// After the close frames: half-close the backend so it sees EOF, send our FIN to the client
/// (the server closes TCP first, §7.1.1), then read the client until its EOF so closing our
/// socket never resets it with unread bytes. The session's close deadline bounds this.
async fn finish(s: &Shared, mut client: BoxRead, backend: Option<BoxWrite>) {
    if let Some(mut w) = backend {
        let _ = w.shutdown().await;
    }
    let _ = s.writer.lock().await.shutdown().await;
    let mut scratch = [0u8; 1024];
    while let Ok(n) = client.read(&mut scratch).await {
        if n == 0 {
            break;
        }
    }
}

/// Backend → client: one frame per read. In text mode an incomplete UTF-8 sequence at the end
/// of a read waits for the next one, and invalid UTF-8 ends the session with 1014. Once the
/// session is closing, backend output is read and discarded until its EOF.
async fn pump_backend(s: &Shared, mut backend: BoxRead, mode: MessageMode) {
    let text = mode == MessageMode::Text;
    let opcode = if text { OpCode::Text } else { OpCode::Binary };
    let mut buf = vec![0u8; INITIAL_READ_BUF];
    let mut utf8 = Utf8Validator::default();
    let mut carry = 0;
    loop {
        let read = backend.read(&mut buf[carry..]).await;
        let n = match read {
            Ok(0) => {
                if !s.is_closing() {
                    if carry > 0 {
                        s.close(
                            "backend_invalid_utf8",
                            Some(close_code::BAD_GATEWAY),
                            "backend sent incomplete UTF-8",
                        )
                        .await;
                    } else {
                        s.close("backend_eof", Some(close_code::NORMAL), "").await;
                    }
                }
                return;
            }
            Ok(n) => n,
            Err(_) => {
                if !s.is_closing() {
                    s.close(
                        "backend_error",
                        Some(close_code::BAD_GATEWAY),
                        "backend connection reset",
                    )
                    .await;
                }
                return;
            }
        };
        if s.is_closing() {
            carry = 0;
            continue;
        }
        let filled = carry + n;
        let mut send_len = filled;
        if text {
            if utf8.feed(&buf[carry..filled]).is_err() {
                s.close(
                    "backend_invalid_utf8",
                    Some(close_code::BAD_GATEWAY),
                    "backend sent invalid UTF-8",
                )
                .await;
                continue;
            }
            send_len = filled - utf8.pending_len();
        }
        if send_len > 0 {
            let mut writer = s.writer.lock().await;
            if writer.send(opcode, true, &buf[..send_len]).await.is_err() {
                s.start_closing("client_error");
                return;
            }
            if writer.close_sent().is_none() {
                s.count_to_client(send_len);
            }
        }
        buf.copy_within(send_len..filled, 0);
        carry = filled - send_len;
        if n == buf.len() - (filled - n) && buf.len() < MAX_READ_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
