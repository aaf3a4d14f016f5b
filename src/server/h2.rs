//! HTTP/2 connections (ALPN `h2` on TLS listeners, prior knowledge on plain ones with
//! `http2 = true`), with WebSockets as extended CONNECT streams (RFC 8441).
//!
//! The h2 crate runs the connection (hyper's own HTTP/2 layer, driven directly: hyper's
//! server would add a task and a channel per upgraded stream). The connection's streams run
//! on the connection's own task, beside it: each stream's request answered and, for a
//! WebSocket, its session run on the stream (see `h2_stream`). A frame for a stream and the
//! stream's work on it are one task's poll, with no wake of another task in between (as
//! HAProxy runs a connection and its streams on one thread): in the load bench this saved the
//! stack floor 8 % of its CPU per new session and 19 % per round trip. The streams of one
//! connection so share one core; connections spread over the workers. A stream that panics
//! ends alone. The task ends when the connection and every stream on it have ended, and it
//! runs on the server's tracker, so a drain waits for it. It watches the connection as a
//! whole:
//!
//! - the first stream must open within `handshake_timeout` of accept;
//! - a connection with no stream open for `keepalive_timeout` is shut down gracefully
//!   (GOAWAY), and so is every connection when the drain starts (its WebSockets go on until
//!   the drain's deadline, then get close 1001, as on HTTP/1.1);
//! - after a graceful shutdown with nothing left open, `close_timeout` bounds the wait for the
//!   client to go;
//! - a write to the client blocked for `send_timeout` (a client that stopped reading the
//!   connection) ends it.
//!
//! Flow control: each stream gets a receive window of [`STREAM_WINDOW`] and the connection
//! the largest window HTTP/2 allows, so a stream whose backend stopped reading (and so is not
//! read itself) holds at most its own window and never the connection's: the other streams
//! go on. What a connection can hold buffered is bounded by its streams × [`STREAM_WINDOW`].

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::h2::server::SendResponse;
use ::h2::{RecvStream, SendStream};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument, Span};

use super::conn::Conn;
use super::dispatch;
use super::h2_stream::{send_head, send_response, H2Body, SendError};
use super::respond::RequestBody;
use super::session::Pending;
use crate::on_wake::WakeGate;

/// Receive window of each stream: what one stream may have in flight towards wsgate.
pub(super) const STREAM_WINDOW: u32 = 256 * 1024;

/// The connection's receive window: HTTP/2's largest, so no stream's unread data can hold
/// the connection's window (and h2's per-connection budget for small DATA frames, half of
/// this window, is out of reach of the streams' own windows in practice).
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// The client connection's part of the largest request head (HPACK-decoded header list).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// The streams a connection has open: requests being answered and WebSocket sessions.
///
/// The count is an atomic; only its moves between none and some wake the connection's idle
/// watch (a stream opening or closing beside others does not wake the connection's task).
pub(super) struct Streams {
    open: AtomicUsize,
    /// Told when the count leaves or reaches zero (one waiter: the connection's idle watch;
    /// a move while it is not waiting is kept as a permit, so none is missed).
    emptied_or_used: Notify,
    /// Streams opened over the connection's life (its log line).
    total: AtomicU64,
}

impl Streams {
    pub(super) fn new() -> Streams {
        Streams {
            open: AtomicUsize::new(0),
            emptied_or_used: Notify::new(),
            total: AtomicU64::new(0),
        }
    }

    /// Counts a stream as open until the guard is dropped.
    pub(super) fn open(self: &Arc<Self>) -> StreamGuard {
        if self.open.fetch_add(1, Ordering::AcqRel) == 0 {
            self.emptied_or_used.notify_one();
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    fn none_open(&self) -> bool {
        self.open.load(Ordering::Acquire) == 0
    }

    /// Waits until no stream has been open for `idle` (or, before the first stream, until
    /// `first`), then returns. Every time the count reaches zero (even a stream opened and
    /// closed between two looks) starts the idle time anew.
    async fn idle(&self, first: Instant, idle: Duration) {
        let mut deadline = first;
        loop {
            if self.none_open() {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => return,
                    () = self.emptied_or_used.notified() => {}
                }
            } else {
                self.emptied_or_used.notified().await;
            }
            deadline = Instant::now() + idle;
        }
    }
}

/// What woke an HTTP/2 connection's task, besides the connection itself.
enum Rare {
    /// Time for GOAWAY, and why: the drain began, or no stream for `keepalive_timeout`.
    GoAway(&'static str),
    /// Time to check the send timeout and, after GOAWAY, the close timeout.
    Tick,
}

/// One open stream of a connection.
pub(super) struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied_or_used.notify_one();
        }
    }
}

/// Serves an HTTP/2 connection to its end.
///
/// `span` is the connection's. The connection's task is not instrumented with it (it is
/// polled for every frame of every stream): its log lines enter it themselves.
pub(super) async fn serve<I>(conn: Arc<Conn>, io: I, deadline: Instant, span: Span)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = conn.state.clone();
    let limits = conn.config.limits.clone();
    let streams = conn
        .streams
        .clone()
        .expect("an HTTP/2 connection counts its streams");
    let peer = conn.peer.clone();
    state.metrics.h2_connections.inc();
    let _open = Open::new(&state.metrics.h2_connections_open, &peer, &streams, &span);
    let mut builder = ::h2::server::Builder::new();
    builder
        .enable_connect_protocol()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST);
    // The preface and SETTINGS, within the accept-time deadline.
    let mut connection = match tokio::time::timeout_at(deadline, builder.handshake(io)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return span.in_scope(|| debug!(%peer, error = %e, "http/2 handshake failed"))
        }
        Err(_) => {
            state.metrics.handshake_timeouts.inc();
            return span
                .in_scope(|| info!(%peer, "handshake timeout: no HTTP/2 preface in time; closed"));
        }
    };
    // Made once, not each turn of the loop (each would join and leave the token's waiters).
    let drained = state.drain_started.cancelled();
    tokio::pin!(drained);
    // Checked a few times per send_timeout, at most once a second: an HTTP/2 connection
    // usually lives as long as its page, so its quiet hours should cost next to nothing.
    let tick = (limits.send_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shut: Option<Instant> = None;
    // One idle timer for the connection's life (made anew each turn, it would start over
    // from the accept-time deadline).
    let idle = streams.idle(deadline, limits.keepalive_timeout);
    tokio::pin!(idle);
    // The drain, the idle watch and the tick are polled only when one of them woke the task,
    // not on every wake (every frame of every stream): each look costs a lock or a timer's.
    let mut rare_gate = WakeGate::default();
    // The connection's streams, run here (see the module's notes).
    let mut running = FuturesUnordered::new();
    loop {
        let rare = poll_fn(|cx| {
            if !rare_gate.open(cx) {
                return Poll::Pending;
            }
            let mut cx = Context::from_waker(rare_gate.waker());
            let due = if shut.is_none() && drained.as_mut().poll(&mut cx).is_ready() {
                Some(Rare::GoAway("drain: GOAWAY"))
            } else if shut.is_none() && idle.as_mut().poll(&mut cx).is_ready() {
                Some(Rare::GoAway("http/2 connection idle: GOAWAY"))
            } else if ticks.poll_tick(&mut cx).is_ready() {
                Some(Rare::Tick)
            } else {
                None
            };
            match due {
                Some(due) => {
                    // The others were not all looked at: the next turn looks at them all.
                    rare_gate.reopen();
                    Poll::Ready(due)
                }
                None => Poll::Pending,
            }
        });
        tokio::select! {
            // In this order, without select's random start: the rare events (nothing to do
            // unless one woke the task) before the connection, which is ready on most wakes.
            biased;
            due = rare => match due {
                Rare::GoAway(why) => {
                    span.in_scope(|| debug!(%peer, "{why}"));
                    connection.graceful_shutdown();
                    shut = Some(Instant::now());
                }
                Rare::Tick => {
                    if conn.keepalive.write_stalled(limits.send_timeout) {
                        state.metrics.send_timeouts.inc();
                        span.in_scope(|| info!(%peer, "send timeout: no progress with the client within send_timeout; closed"));
                        break;
                    }
                    if let Some(at) = shut {
                        if streams.none_open() && at.elapsed() >= limits.close_timeout {
                            span.in_scope(|| debug!(%peer, "http/2 connection not closed by the client after GOAWAY: dropped"));
                            break;
                        }
                    }
                }
            },
            // Drives the connection (reads, writes, flow control) and yields its new streams.
            accepted = connection.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    let open = streams.open();
                    running.push(isolated(serve_stream(conn.clone(), req, respond, span.clone(), open)));
                }
                Some(Err(e)) => {
                    span.in_scope(|| debug!(%peer, error = %e, "http/2 connection error"));
                    break;
                }
                None => break,
            },
            // The streams' work: what the connection just read for them, their backends'
            // answers. (Polled after the connection, so a frame it read is acted on in the
            // same turn.)
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    // The connection is over (closed, failed or dropped here). Dropping it tells every
    // stream still open, whose sessions then end as on any broken connection, each with its
    // log line; they are driven to that end here.
    drop(connection);
    while running.next().await.is_some() {}
}

/// A stream's future with its panic caught: a panicking stream ends alone, not with its
/// connection and the other streams on it (as a task of its own would).
fn isolated(stream: impl Future<Output = ()> + Send) -> impl Future<Output = ()> + Send {
    AssertUnwindSafe(stream).catch_unwind().map(|ended| {
        if ended.is_err() {
            warn!("an HTTP/2 stream panicked; it was ended (the connection goes on)");
        }
    })
}

/// One stream, run on its connection's task: the request answered, and for a WebSocket
/// (RFC 8441) the session run on the stream after its 200.
///
/// `span` is the connection's: the answer runs in it; the session enters it only around its
/// log lines, not on every poll of its data path. `_open` counts the stream among the
/// connection's open ones until the stream's future ends.
async fn serve_stream(
    conn: Arc<Conn>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    span: Span,
    _open: StreamGuard,
) {
    // Boxed: the answer's state (routes, checks, the backend's connect, a page's body) is
    // freed once it is sent instead of being kept beside the session while the stream lives.
    let answered = Box::pin(answer(conn, req, respond).instrument(span.clone())).await;
    if let Some((session, send)) = answered {
        session.run(Some(send), span).await;
    }
}

/// Answers a stream's request. A WebSocket's 200 is sent with the stream left open: the
/// session agreed on and the stream's sending side are returned to run it. A client's
/// RST_STREAM while the answer is being made drops it (a backend connection being opened is
/// closed).
async fn answer(
    conn: Arc<Conn>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<(Pending, SendStream<Bytes>)> {
    let (parts, recv) = req.into_parts();
    let body = H2Body::new(recv, &parts.headers);
    let req = Request::from_parts(parts, RequestBody::H2(body));
    let (response, session) = tokio::select! {
        answer = dispatch::handle(conn.clone(), req) => answer,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return None,
    };
    let Some(session) = session else {
        let send_timeout = conn.config.limits.send_timeout;
        if let Err(e) = send_response(&mut respond, response, send_timeout).await {
            if matches!(e, SendError::Stalled) {
                conn.state.metrics.send_timeouts.inc();
                info!(peer = %conn.peer, "send timeout: the client kept the stream's window shut past send_timeout; stream reset");
            } else {
                debug!(peer = %conn.peer, error = %e, "http/2 response not sent whole");
            }
        }
        return None;
    };
    // The 200 opens the WebSocket: the stream stays open for its DATA.
    let (parts, _) = response.into_parts();
    match send_head(&mut respond, Response::from_parts(parts, ()), false) {
        Ok(send) => Some((session, send)),
        Err(e) => {
            debug!(peer = %conn.peer, error = %e, "the client reset the stream before its 200");
            None
        }
    }
}

/// An HTTP/2 connection while it is open: counted in the open gauge, and when it ends,
/// however it ends, the gauge goes down and a debug line says how many streams it carried.
struct Open<'a> {
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
    peer: String,
    streams: Arc<Streams>,
    span: Span,
}

impl<'a> Open<'a> {
    fn new(
        gauge: &'a prometheus_client::metrics::gauge::Gauge,
        peer: &impl std::fmt::Display,
        streams: &Arc<Streams>,
        span: &Span,
    ) -> Self {
        gauge.inc();
        Open {
            gauge,
            peer: peer.to_string(),
            streams: streams.clone(),
            span: span.clone(),
        }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
        let streams = self.streams.total.load(Ordering::Relaxed);
        self.span
            .in_scope(|| debug!(peer = %self.peer, streams, "http/2 connection closed"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The idle watch of a connection, on a paused clock: when it returns.
    async fn idle_returns_at(streams: &Arc<Streams>, first: Duration, idle: Duration) -> Duration {
        let start = Instant::now();
        streams.idle(start + first, idle).await;
        start.elapsed()
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let panicking = isolated(async { panic!("a bug in one stream") });
        // Ends with (), the panic caught: the connection's task goes on.
        tokio::time::timeout(Duration::from_secs(5), panicking)
            .await
            .expect("the panicking stream ended");
        let mut fine = false;
        isolated(async { fine = true }).await;
        assert!(fine, "a stream that does not panic runs as it is");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_no_stream_is_idle_at_its_first_deadline() {
        let streams = Arc::new(Streams::new());
        let took = idle_returns_at(&streams, Duration::from_secs(2), Duration::from_secs(5)).await;
        assert_eq!(took, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_opened_and_closed_between_two_looks_starts_the_idle_time_anew() {
        let streams = Arc::new(Streams::new());
        // Opened and closed before the watch first looks: it must still count.
        drop(streams.open());
        let took = idle_returns_at(&streams, Duration::from_secs(2), Duration::from_secs(5)).await;
        assert_eq!(took, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn open_streams_hold_the_connection_and_the_last_one_closing_starts_the_idle_time() {
        let streams = Arc::new(Streams::new());
        let (a, b) = (streams.open(), streams.open());
        let watch = {
            let streams = streams.clone();
            tokio::spawn(async move {
                idle_returns_at(&streams, Duration::from_secs(1), Duration::from_secs(3)).await
            })
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watch.is_finished(), "idle while two streams are open");
        drop(a);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watch.is_finished(), "idle while one stream is open");
        drop(b);
        let took = tokio::time::timeout(Duration::from_secs(60), watch)
            .await
            .expect("idle after the last stream closed")
            .unwrap();
        assert_eq!(took, Duration::from_secs(23));
    }
}
