//! Client → backend: frames decoded, data payloads streamed to the backend (or echoed), pings
//! answered, the idle and ping timers, and the close handshake finished.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::{SessionLimits, Shared, INITIAL_READ_BUF, MAX_READ_BUF};
use crate::protocol::decoder::{Decoder, Event, MessageKind, Violation};
use crate::protocol::frame::{close_code, OpCode};
use crate::session_end::SessionEnd;
use crate::stream::{BoxRead, BoxWrite};

/// Client → backend: reads frames, streams data payloads to the backend (or echoes them),
/// answers pings, runs the idle and ping timers, and finishes the close handshake.
pub(super) async fn pump(
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
                Err(Violation { code, reason, end }) => {
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
                                s.start_closing(SessionEnd::ClientError);
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
                                SessionEnd::BackendError,
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
                    let _ = s.close_received.set(code.unwrap_or(1005));
                    // Echo the code and reason (§5.5.1); a no-op if our close went first.
                    s.close(SessionEnd::ClientClose, code, reason).await;
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
                s.close(SessionEnd::Shutdown, Some(close_code::GOING_AWAY), "server shutting down").await;
            }
            _ = closing_rx.changed() => {}
            () = sleep_until(timer) => {
                if closing {
                    continue;
                }
                let now = Instant::now();
                if now >= idle_at {
                    s.close(SessionEnd::IdleTimeout, Some(close_code::GOING_AWAY), "idle timeout").await;
                } else if now >= next_ping {
                    // Skip the ping if a frame is being written: the link is busy anyway.
                    if let Ok(mut writer) = s.writer.try_lock() {
                        if writer.send(OpCode::Ping, true, b"").await.is_err() {
                            s.start_closing(SessionEnd::ClientError);
                            return;
                        }
                    }
                    next_ping = now + limits.ping_interval;
                }
            }
            read = client.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    // Gone without a close handshake (1006 in the log).
                    s.start_closing(SessionEnd::ClientGone);
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
