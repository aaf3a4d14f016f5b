//! Keep-alive on a client connection (plain HTTP requests on proxy routes): after a response
//! the connection may wait for the next request for `keepalive_timeout`, and once that
//! request's first byte arrives its head must be complete within `handshake_timeout`; at most
//! [`MAX_REQUESTS`] requests per connection.
//!
//! hyper has one timer for both waits, so wsgate keeps the phase itself: the service marks a
//! request, the response body marks its end, and a read wrapper marks the first byte of the
//! next head. [`conn`](super::conn) sleeps until the current phase's deadline.
//!
//! While a request is answered, `send_timeout` bounds what waits on the client: a response
//! write that stays blocked (a client that stopped reading) or a request body with no new
//! bytes for that long closes the connection, and so does a body that averages under
//! [`MIN_BODY_RATE`] once that long has passed (Apache's `mod_reqtimeout` MinRate idea: a
//! per-read timer alone lets a trickled body hold its place forever). Time spent on wsgate's
//! own side (connecting a backend, an app thinking) is not the client's: `connect_timeout`
//! bounds it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use super::respond::{Body, BoxError, RequestBody};
use crate::stream::{Observed, Observer};

/// Requests served on one connection; the last one's response carries `Connection: close`.
pub(super) const MAX_REQUESTS: u32 = 1000;

/// The slowest a request body may average once `send_timeout` has passed (bytes per second).
pub(super) const MIN_BODY_RATE: u64 = 1024;

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Before the first request head (bounded by the accept-time handshake deadline).
    FirstHead,
    /// A request is being answered; its own timeouts apply.
    InRequest,
    /// The last response is done; waiting for the next request since…
    Idle(Instant),
    /// The next request's head started arriving at…
    NextHead(Instant),
}

/// A connection's keep-alive state, shared by its service, its response bodies and its reads.
pub(super) struct KeepAlive {
    phase: watch::Sender<Phase>,
    /// The phase is `Idle` (read without the phase's lock on every read of the connection).
    idle: AtomicBool,
    requests: AtomicU32,
    /// Times below are milliseconds since this (0: none).
    base: Instant,
    /// Since when a write to the client has been blocked.
    write_blocked_since: AtomicU64,
    /// A request body is being read: when it started, its last bytes, how many.
    body_open: AtomicBool,
    body_started: AtomicU64,
    body_last: AtomicU64,
    body_bytes: AtomicU64,
}

/// Why a connection waiting for a request is closed.
pub(super) enum Expired {
    /// The first request head did not arrive by the accept-time deadline.
    FirstHead,
    /// No next request within keepalive_timeout.
    Idle,
    /// The next request's head did not arrive within handshake_timeout.
    SlowHead,
    /// A response write or the request body made no progress within send_timeout.
    SendStalled,
    /// The request body averaged under [`MIN_BODY_RATE`] past send_timeout.
    SlowBody,
}

impl KeepAlive {
    pub(super) fn new() -> KeepAlive {
        KeepAlive {
            phase: watch::Sender::new(Phase::FirstHead),
            idle: AtomicBool::new(false),
            requests: AtomicU32::new(0),
            base: Instant::now(),
            write_blocked_since: AtomicU64::new(0),
            body_open: AtomicBool::new(false),
            body_started: AtomicU64::new(0),
            body_last: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
        }
    }

    /// Milliseconds since `base`, never 0 (0 means "none").
    fn now_ms(&self) -> u64 {
        (self.base.elapsed().as_millis() as u64).max(1)
    }

    fn write_blocked(&self, blocked: bool) {
        if !blocked {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        } else if self.write_blocked_since.load(Ordering::Relaxed) == 0 {
            self.write_blocked_since
                .store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn body_started(&self) {
        let now = self.now_ms();
        self.body_started.store(now, Ordering::Relaxed);
        self.body_last.store(now, Ordering::Relaxed);
        self.body_bytes.store(0, Ordering::Relaxed);
        self.body_open.store(true, Ordering::Release);
    }

    fn body_read(&self, n: usize) {
        self.body_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.body_last.store(self.now_ms(), Ordering::Relaxed);
    }

    fn body_ended(&self) {
        self.body_open.store(false, Ordering::Release);
    }

    /// Whether a write to the client has been blocked for `send_timeout` (HTTP/2
    /// connections, whose requests are not timed here).
    pub(super) fn write_stalled(&self, send_timeout: Duration) -> bool {
        let blocked = self.write_blocked_since.load(Ordering::Relaxed);
        let now = self.now_ms();
        blocked != 0 && now - blocked.min(now) >= send_timeout.as_millis() as u64
    }

    /// Whether what waits on the client has been stuck past `send_timeout`.
    fn stalled(&self, send_timeout: Duration) -> Option<Expired> {
        if self.write_stalled(send_timeout) {
            return Some(Expired::SendStalled);
        }
        let now = self.now_ms();
        let limit = send_timeout.as_millis() as u64;
        if self.body_open.load(Ordering::Acquire) {
            if now - self.body_last.load(Ordering::Relaxed).min(now) >= limit {
                return Some(Expired::SendStalled);
            }
            let elapsed = now - self.body_started.load(Ordering::Relaxed).min(now);
            let bytes = self.body_bytes.load(Ordering::Relaxed);
            if elapsed >= limit && bytes * 1000 < MIN_BODY_RATE * elapsed {
                return Some(Expired::SlowBody);
            }
        }
        None
    }

    /// A request head arrived. Returns true when this is the last request the connection may
    /// serve (its response must close the connection).
    pub(super) fn request_started(&self) -> bool {
        self.phase.send_replace(Phase::InRequest);
        self.idle.store(false, Ordering::Release);
        self.requests.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REQUESTS
    }

    fn response_done(&self) {
        self.phase.send_if_modified(|p| {
            if *p == Phase::InRequest {
                *p = Phase::Idle(Instant::now());
                self.idle.store(true, Ordering::Release);
                true
            } else {
                false
            }
        });
    }

    fn bytes_read(&self) {
        // Almost every read is not the first byte of a next request (an HTTP/2 connection's
        // never is): those only look at a flag.
        if !self.idle.load(Ordering::Acquire) {
            return;
        }
        self.phase.send_if_modified(|p| {
            if matches!(p, Phase::Idle(_)) {
                *p = Phase::NextHead(Instant::now());
                self.idle.store(false, Ordering::Release);
                true
            } else {
                false
            }
        });
    }

    /// Waits until the current phase's deadline passes, and says which one it was: the
    /// first head by `first_head`, the next request `keepalive` after a response, its head
    /// `handshake` after its first byte; while a request is answered, a write or body stuck
    /// for `send_timeout` (checked every quarter of it, at most every 250 ms).
    pub(super) async fn expired(
        &self,
        first_head: Instant,
        keepalive: Duration,
        handshake: Duration,
        send_timeout: Duration,
    ) -> Expired {
        let mut rx = self.phase.subscribe();
        let tick = (send_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        loop {
            let phase = *rx.borrow_and_update();
            let (deadline, why) = match phase {
                Phase::FirstHead => (first_head, Expired::FirstHead),
                Phase::Idle(t) => (t + keepalive, Expired::Idle),
                Phase::NextHead(t) => (t + handshake, Expired::SlowHead),
                Phase::InRequest => {
                    if let Some(why) = self.stalled(send_timeout) {
                        return why;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(tick) => {}
                        changed = rx.changed() => if changed.is_err() {
                            std::future::pending::<()>().await;
                        },
                    }
                    continue;
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return why,
                changed = rx.changed() => if changed.is_err() {
                    std::future::pending::<()>().await;
                },
            }
        }
    }
}

/// A response body that marks the end of its request when it is done (fully written or
/// dropped by hyper).
struct MarksEnd {
    body: Body,
    keepalive: Arc<KeepAlive>,
}

impl HttpBody for MarksEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for MarksEnd {
    fn drop(&mut self) {
        self.keepalive.response_done();
    }
}

/// Wraps a response body so that its end starts the keep-alive wait.
pub(super) fn mark_end(body: Body, keepalive: Arc<KeepAlive>) -> Body {
    MarksEnd { body, keepalive }.boxed_unsync()
}

/// The client connection as hyper reads it: the first byte of each next request is noted.
/// Taken off again after an upgrade, so the data path does not pay for it.
pub(super) type Watched<S> = Observed<S, Arc<KeepAlive>>;

impl Observer for Arc<KeepAlive> {
    fn read(&mut self, _n: usize) {
        self.bytes_read();
    }

    fn write_blocked(&mut self, blocked: bool) {
        KeepAlive::write_blocked(self, blocked);
    }
}

/// A request body whose progress `send_timeout` watches (bytes as they come, its end).
pub(super) struct WatchedBody {
    inner: RequestBody,
    keepalive: Arc<KeepAlive>,
}

impl WatchedBody {
    pub(super) fn new(inner: RequestBody, keepalive: Arc<KeepAlive>) -> WatchedBody {
        if !inner.is_end_stream() {
            keepalive.body_started();
        }
        WatchedBody { inner, keepalive }
    }
}

impl HttpBody for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.keepalive.body_read(data.len());
                }
                if self.inner.is_end_stream() {
                    self.keepalive.body_ended();
                }
            }
            Poll::Ready(_) => self.keepalive.body_ended(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.keepalive.body_ended();
    }
}

/// `inner` with its reads and blocked writes noted.
pub(super) fn watched<S>(inner: S, keepalive: &Arc<KeepAlive>) -> Watched<S> {
    Observed {
        inner,
        observer: keepalive.clone(),
    }
}
