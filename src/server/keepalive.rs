//! Keep-alive on a client connection (plain HTTP requests on proxy routes): after a response
//! the connection may wait for the next request for `keepalive_timeout`, and once that
//! request's first byte arrives its head must be complete within `handshake_timeout`; at most
//! [`MAX_REQUESTS`] requests per connection.
//!
//! hyper has one timer for both waits, so wsgate keeps the phase itself: the service marks a
//! request, the response body marks its end, and a read wrapper marks the first byte of the
//! next head. [`conn`](super::conn) sleeps until the current phase's deadline.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::Instant;

use super::respond::{Body, BoxError};
use crate::stream::{Observed, Observer};

/// Requests served on one connection; the last one's response carries `Connection: close`.
pub(super) const MAX_REQUESTS: u32 = 1000;

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
    requests: AtomicU32,
}

/// Why a connection waiting for a request is closed.
pub(super) enum Expired {
    /// The first request head did not arrive by the accept-time deadline.
    FirstHead,
    /// No next request within keepalive_timeout.
    Idle,
    /// The next request's head did not arrive within handshake_timeout.
    SlowHead,
}

impl KeepAlive {
    pub(super) fn new() -> KeepAlive {
        KeepAlive {
            phase: watch::Sender::new(Phase::FirstHead),
            requests: AtomicU32::new(0),
        }
    }

    /// A request head arrived. Returns true when this is the last request the connection may
    /// serve (its response must close the connection).
    pub(super) fn request_started(&self) -> bool {
        self.phase.send_replace(Phase::InRequest);
        self.requests.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REQUESTS
    }

    fn response_done(&self) {
        self.phase.send_if_modified(|p| {
            if *p == Phase::InRequest {
                *p = Phase::Idle(Instant::now());
                true
            } else {
                false
            }
        });
    }

    fn bytes_read(&self) {
        self.phase.send_if_modified(|p| {
            if matches!(p, Phase::Idle(_)) {
                *p = Phase::NextHead(Instant::now());
                true
            } else {
                false
            }
        });
    }

    /// Waits until the current phase's deadline passes, and says which one it was: the
    /// first head by `first_head`, the next request `keepalive` after a response, its head
    /// `handshake` after its first byte. Never resolves while a request is being answered.
    pub(super) async fn expired(
        &self,
        first_head: Instant,
        keepalive: Duration,
        handshake: Duration,
    ) -> Expired {
        let mut rx = self.phase.subscribe();
        loop {
            let phase = *rx.borrow_and_update();
            let (deadline, why) = match phase {
                Phase::FirstHead => (first_head, Expired::FirstHead),
                Phase::Idle(t) => (t + keepalive, Expired::Idle),
                Phase::NextHead(t) => (t + handshake, Expired::SlowHead),
                Phase::InRequest => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
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
}

/// `inner` wrapped for hyper.
pub(super) fn watched<S>(inner: S, keepalive: &Arc<KeepAlive>) -> TokioIo<Watched<S>> {
    TokioIo::new(Observed {
        inner,
        observer: keepalive.clone(),
    })
}
