//! The bridge: the two pumps between an upgraded client and a byte-stream backend, their
//! timers, and how each ending maps to a close code.
//!
//! ```text
//!  client ──frames──▶ pump_client ──payload bytes──▶ backend      (Decoder, unmask, UTF-8)
//!  client ◀─frames─── pump_backend ◀──bytes───────── backend      (one frame per read)
//! ```
//! Both pumps run concurrently in the session's task and share the client's [`FrameWriter`]
//! behind a mutex, so a pong or a close never lands inside another frame. Each pump awaits its
//! own writes, which is the backpressure: a slow reader stops the other side's reads, and each
//! direction buffers at most [`MAX_READ_BUF`] bytes in user space (plus, on the echo route,
//! whole messages counted against the process-wide [`MessageBudget`]).
//!
//! A third task, the [`watchdog`], runs the idle, ping and stuck-side timers and the drain
//! signal, so a pump blocked on a side that stopped reading is always noticed.
//!
//! Endings: once a close is sent or received the session is *closing* and has `close_timeout`
//! left; whatever has not finished by then is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{watch, Mutex};
use tokio::time::{sleep_until, Instant};

use crate::metrics::SessionCounters;
use crate::on_wake::OnWake;
use crate::protocol::deflate::{Agreed, Deflater};
use crate::protocol::writer::FrameWriter;
use crate::route::{Framing, MessageMode};
use crate::session_end::{SessionControl, SessionEnd};
use crate::stream::{BoxRead, BoxWrite, PendingSince};

mod budget;
mod from_backend;
mod from_client;
mod watchdog;

pub(crate) use budget::MessageBudget;

/// First read buffer of each direction; idle sessions stay this small.
const INITIAL_READ_BUF: usize = 4 * 1024;
/// A buffer that fills on every read doubles up to this; the per-direction bound.
pub(crate) const MAX_READ_BUF: usize = 64 * 1024;

/// The limits a session runs under.
#[derive(Debug, Clone)]
pub(crate) struct SessionLimits {
    pub max_message_size: u64,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub close_timeout: Duration,
    pub message: MessageMode,
    pub framing: Framing,
    /// permessage-deflate, when the handshake agreed on it.
    pub deflate: Option<Agreed>,
}

/// What happened in a session, for its log line and metrics.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub messages_from_client: u64,
    pub messages_to_client: u64,
    /// Close code we sent (1005 for an empty close).
    pub close_sent: Option<u16>,
    /// Close code the client sent (1005 for an empty close).
    pub close_received: Option<u16>,
    /// Why the session ended.
    pub end: SessionEnd,
}

impl Summary {
    /// A session that moved nothing and ended for `end`.
    pub(crate) fn ended(end: SessionEnd) -> Summary {
        Summary {
            bytes_from_client: 0,
            bytes_to_client: 0,
            messages_from_client: 0,
            messages_to_client: 0,
            close_sent: None,
            close_received: None,
            end,
        }
    }
}

/// State the pumps and the watchdog share.
struct Shared<'c> {
    writer: Mutex<FrameWriter>,
    started: Instant,
    /// When the client last sent anything (the same clock the proxy splice uses).
    heard_at: PendingSince,
    /// A write to the client (a frame) is pending since…
    client_write: PendingSince,
    /// A write to the backend is pending since…
    backend_write: PendingSince,
    /// Set when a close is sent or received: the moment the session must be over by.
    closing: watch::Sender<Option<Instant>>,
    close_timeout: Duration,
    end: OnceLock<SessionEnd>,
    close_received: OnceLock<u16>,
    /// The session's stop signal and its byte counts (read live by the admin listener).
    control: &'c SessionControl,
    messages_from_client: AtomicU64,
    messages_to_client: AtomicU64,
    /// The route's global counters, counted into as the session goes.
    counters: SessionCounters,
}

impl Shared<'_> {
    /// Notes that the client sent something (any bytes: frames, pongs).
    fn heard(&self) {
        self.heard_at.reset();
    }

    fn last_heard(&self) -> Instant {
        self.heard_at.since().unwrap_or(self.started)
    }

    fn count_from_client(&self, bytes: usize, message_done: bool) {
        self.control
            .bytes_from_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.bytes_from_client.inc_by(bytes as u64);
        if message_done {
            self.messages_from_client.fetch_add(1, Ordering::Relaxed);
            self.counters.messages_from_client.inc();
        }
    }

    /// Counts one whole message (frame) sent to the client.
    fn count_to_client(&self, bytes: usize) {
        self.control
            .bytes_to_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.bytes_to_client.inc_by(bytes as u64);
        self.messages_to_client.fetch_add(1, Ordering::Relaxed);
        self.counters.messages_to_client.inc();
    }

    /// Records why the session ends (the first reason wins) and starts the close countdown.
    fn start_closing(&self, end: SessionEnd) {
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
    async fn close(&self, end: SessionEnd, code: Option<u16>, reason: &str) {
        self.start_closing(end);
        let mut writer = self.writer.lock().await;
        let _pending = self.client_write.start();
        let _ = writer.close(code, reason).await;
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
/// the built-in echo, which holds whole messages against `budget`. `control`'s stop, when
/// cancelled, closes the session with 1001 (or the operator's code); its byte counts move as
/// the session goes. Cancel-safe only in that dropping it drops the connections.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    client_read: BoxRead,
    initial: BytesMut,
    client_write: BoxWrite,
    backend: Option<(BoxRead, BoxWrite)>,
    limits: &SessionLimits,
    control: &SessionControl,
    counters: SessionCounters,
    budget: &Arc<MessageBudget>,
) -> Summary {
    let started = Instant::now();
    let mut writer = FrameWriter::new(client_write);
    if let Some(agreed) = &limits.deflate {
        writer = writer.with_deflater(Deflater::new(agreed, counters.deflate_to_client.clone()));
    }
    let shared = Shared {
        writer: Mutex::new(writer),
        started,
        heard_at: PendingSince::new(started),
        client_write: PendingSince::new(started),
        backend_write: PendingSince::new(started),
        closing: watch::Sender::new(None),
        close_timeout: limits.close_timeout,
        end: OnceLock::new(),
        close_received: OnceLock::new(),
        control,
        messages_from_client: AtomicU64::new(0),
        messages_to_client: AtomicU64::new(0),
        counters,
    };
    let (backend_read, backend_write) = match backend {
        None => (None, None),
        Some((read, write)) => (Some(read), Some(write)),
    };
    // Each part is polled only when its own waker fired: a message wakes the task through
    // one side's socket, and polling the other side (a read that is not ready) or the timers
    // then would only re-register their wakers.
    let pumps = async {
        tokio::join!(
            OnWake::new(from_client::pump(
                &shared,
                client_read,
                initial,
                backend_write,
                limits,
                budget
            )),
            OnWake::new(async {
                match (backend_read, limits.framing) {
                    (Some(read), Framing::Stream) => {
                        from_backend::pump(&shared, read, limits.message).await
                    }
                    (Some(read), Framing::Lines) => {
                        from_backend::pump_lines(&shared, read, limits, budget).await
                    }
                    (None, _) => {}
                }
            }),
            OnWake::new(watchdog::run(&shared, limits))
        )
    };
    tokio::select! {
        biased;
        _ = pumps => {}
        () = OnWake::new(shared.closing_deadline()) => {
            let _ = shared.end.set(SessionEnd::CloseTimeout);
        }
    }
    let close_sent = match shared.writer.try_lock() {
        Ok(w) => w.close_sent(),
        Err(_) => None,
    };
    Summary {
        bytes_from_client: control.bytes_from_client.load(Ordering::Relaxed),
        bytes_to_client: control.bytes_to_client.load(Ordering::Relaxed),
        messages_from_client: shared.messages_from_client.load(Ordering::Relaxed),
        messages_to_client: shared.messages_to_client.load(Ordering::Relaxed),
        close_sent,
        close_received: shared.close_received.get().copied(),
        end: shared.end.get().copied().unwrap_or(SessionEnd::Unknown),
    }
}

#[cfg(test)]
mod tests;
