//! Client → backend: frames decoded, data payloads streamed to the backend (or echoed), pings
//! answered, and the close handshake finished. The timers live in the watchdog; this pump
//! only notes when it heard from the client and which write it is waiting on.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

use super::budget::MessageBudget;
use super::{SessionLimits, Shared, INITIAL_READ_BUF, MAX_READ_BUF};
use crate::protocol::decoder::{Decoder, Event, MessageKind, Violation};
use crate::protocol::deflate::Inflater;
use crate::protocol::frame::{close_code, OpCode};
use crate::route::Framing;
use crate::scratch::read_lazily;
use crate::session_end::SessionEnd;
use crate::stream::{BoxRead, BoxWrite};

/// With permessage-deflate, the pump yields after a data piece this large.
const YIELD_AFTER: usize = 16 * 1024;

/// Why a write to the backend did not complete.
enum BackendWriteFailed {
    /// The backend's connection failed.
    Backend,
    /// The client went away while the write was waiting.
    ClientGone,
}

/// Client → backend until the client's close (or the session's end). Cancel-safe in the
/// sense that matters: dropping it drops both connections.
pub(super) async fn pump(
    s: &Shared<'_>,
    mut client: BoxRead,
    mut buf: BytesMut,
    mut backend: Option<BoxWrite>,
    limits: &SessionLimits,
    budget: &Arc<MessageBudget>,
) {
    let echo = backend.is_none();
    let inflating = limits.deflate.is_some();
    let mut decoder = match &limits.deflate {
        Some(agreed) => Decoder::with_inflater(
            limits.max_message_size,
            Inflater::new(agreed, s.counters.deflate_from_client.clone()),
        ),
        None => Decoder::new(limits.max_message_size),
    };
    let mut read_size = INITIAL_READ_BUF;
    let mut echo_message = Vec::new();
    let mut echo_held = budget.reservation();
    let lines = limits.framing == Framing::Lines;
    // Line framing: whether the message so far ends with a newline.
    let mut ends_with_newline = false;
    let mut pending_line = Vec::new();
    loop {
        // Act on every complete event already buffered.
        loop {
            let event = match decoder.decode(&mut buf) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(Violation { code, reason, end }) => {
                    s.close(end, Some(code), reason).await;
                    // Failing the connection (§7.1.7): no further frames are processed.
                    return finish(s, client, backend).await;
                }
            };
            match event {
                Event::Data {
                    kind,
                    payload,
                    first,
                    fin,
                } => {
                    s.count_from_client(payload.len(), fin);
                    if inflating && payload.len() >= YIELD_AFTER {
                        // Inflating is CPU without I/O: other sessions on this worker get a
                        // turn between pieces (at most 64 KiB each).
                        tokio::task::yield_now().await;
                    }
                    if echo {
                        // The echo answers whole messages (at most max_message_size): a
                        // client may write a whole message before it reads anything. What it
                        // holds counts against the process-wide budget.
                        if !echo_held.grow(payload.len() as u64) {
                            s.close(
                                SessionEnd::TryAgainLater,
                                Some(close_code::TRY_AGAIN_LATER),
                                "server busy: message buffers full",
                            )
                            .await;
                            return finish(s, client, backend).await;
                        }
                        echo_message.extend_from_slice(&payload);
                        if fin {
                            let opcode = match kind {
                                MessageKind::Text => OpCode::Text,
                                MessageKind::Binary => OpCode::Binary,
                            };
                            let mut writer = s.writer.lock().await;
                            let counted = writer.close_sent().is_none();
                            let pending = s.client_write.start();
                            if writer.send(opcode, true, &echo_message).await.is_err() {
                                s.start_closing(SessionEnd::ClientError);
                                return;
                            }
                            drop(pending);
                            if counted {
                                s.count_to_client(echo_message.len());
                            }
                            echo_message.clear();
                            echo_message.shrink_to(INITIAL_READ_BUF);
                            echo_held.release();
                        }
                    } else if let Some(w) = backend.as_mut() {
                        // Line framing: a message that does not end with a newline gets one.
                        if first {
                            ends_with_newline = false;
                        }
                        if !payload.is_empty() {
                            ends_with_newline = payload.ends_with(b"\n");
                        }
                        let newline = lines && fin && !ends_with_newline;
                        let piece: &[u8] = if newline {
                            pending_line.clear();
                            pending_line.extend_from_slice(&payload);
                            pending_line.push(b'\n');
                            &pending_line
                        } else {
                            &payload
                        };
                        match write_backend(s, w, piece, &mut client, &mut buf).await {
                            Ok(()) => {}
                            Err(BackendWriteFailed::Backend) => {
                                backend = None;
                                s.close(
                                    SessionEnd::BackendError,
                                    Some(close_code::BAD_GATEWAY),
                                    "backend connection failed",
                                )
                                .await;
                            }
                            Err(BackendWriteFailed::ClientGone) => {
                                // Gone without a close handshake: nobody is left to deliver
                                // the rest to; the backend gets EOF.
                                return client_gone(s, backend).await;
                            }
                        }
                    }
                }
                Event::Ping(payload) => match timeout(s.close_timeout, s.writer.lock()).await {
                    Ok(mut writer) => {
                        let _pending = s.client_write.start();
                        if writer.pong(&payload).await.is_err() {
                            s.start_closing(SessionEnd::ClientError);
                            return;
                        }
                    }
                    // The writer is stuck behind a client that does not read.
                    Err(_) => s.start_closing(SessionEnd::ClientNotReading),
                },
                Event::Pong(_) => {}
                Event::Close(close) => {
                    let code = close.as_ref().map(|(code, _)| *code);
                    let reason = close.as_ref().map_or("", |(_, r)| r.as_str());
                    let _ = s.close_received.set(code.unwrap_or(close_code::NO_STATUS));
                    // Echo the code and reason (§5.5.1); a no-op if our close went first.
                    s.close(SessionEnd::ClientClose, code, reason).await;
                    return finish(s, client, backend).await;
                }
            }
        }

        // Read more.
        // An idle session holds no read buffer (see `scratch`).
        let want = read_size.max(decoder.wants());
        match read_lazily(client.as_mut(), &mut buf, want).await {
            Ok(0) | Err(_) => return client_gone(s, backend).await,
            Ok(n) => {
                s.heard();
                if n >= read_size && read_size < MAX_READ_BUF {
                    read_size *= 2;
                }
            }
        }
    }
}

/// Writes one payload piece to the backend. While the backend is slow to take it, the client
/// is still read into `buf` (up to [`MAX_READ_BUF`]), so a client that goes away is noticed and
/// the watchdog sees it is alive; past that the client waits (backpressure).
async fn write_backend(
    s: &Shared<'_>,
    backend: &mut BoxWrite,
    payload: &[u8],
    client: &mut BoxRead,
    buf: &mut BytesMut,
) -> Result<(), BackendWriteFailed> {
    let _pending = s.backend_write.start();
    // Flushed, so a tls:// backend gets the last TLS record now rather than at the next
    // write.
    let write = async {
        backend.write_all(payload).await?;
        backend.flush().await
    };
    tokio::pin!(write);
    loop {
        let room = MAX_READ_BUF.saturating_sub(buf.len());
        tokio::select! {
            biased;
            written = &mut write => return written.map_err(|_| BackendWriteFailed::Backend),
            read = read_lazily(client.as_mut(), buf, room.min(INITIAL_READ_BUF)), if room > 0 => match read {
                Ok(0) | Err(_) => return Err(BackendWriteFailed::ClientGone),
                Ok(_) => s.heard(),
            },
        }
    }
}

/// The client's connection ended without a close handshake (1006 in the log): the session is
/// closing, and the backend gets EOF; its remaining output is read and dropped.
async fn client_gone(s: &Shared<'_>, backend: Option<BoxWrite>) {
    s.start_closing(SessionEnd::ClientGone);
    if let Some(mut w) = backend {
        let _ = w.shutdown().await;
    }
}

/// After the close frames: half-close the backend so it sees EOF, send our FIN to the client
/// (the server closes TCP first, §7.1.1), then read the client until its EOF so closing our
/// socket never resets it with unread bytes. The session's close deadline bounds this.
async fn finish(s: &Shared<'_>, mut client: BoxRead, backend: Option<BoxWrite>) {
    if let Some(mut w) = backend {
        let _ = w.shutdown().await;
    }
    let _ = s.writer.lock().await.shutdown().await;
    // Read and dropped until EOF (usually the next read).
    let mut rest = BytesMut::new();
    while let Ok(n) = read_lazily(client.as_mut(), &mut rest, INITIAL_READ_BUF).await {
        if n == 0 {
            break;
        }
        rest.clear();
    }
}
