//! The accept loop of one listener: the connection cap, accept-error backoff, and a task per
//! connection on the server's tracker.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn};

use super::listen::{Accepted, Bound, ClientStream, Peer};
use super::reload::ListenerSettings;
use super::{conn, State};
use crate::metrics::RejectionLabels;

/// Accepts until `stop` is cancelled. Each connection takes a [`ConnectionSlot`] and the
/// listener's settings of the moment it was accepted.
pub(super) async fn run(
    listener: Bound,
    state: Arc<State>,
    stop: CancellationToken,
    settings: Arc<RwLock<ListenerSettings>>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                backoff = Duration::from_millis(10);
                start(&state, &settings, stream, peer);
            }
            Ok(Accepted::Unix(stream, peer)) => {
                backoff = Duration::from_millis(10);
                start(&state, &settings, stream, peer);
            }
            Err(e) if is_per_connection_error(&e) => debug!(error = %e, "accept"),
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    // The listener (and a unix listener's socket file) goes when the loop ends.
}

/// One accepted connection: refused over max_connections, else served in its own task.
fn start<S: ClientStream>(
    state: &Arc<State>,
    settings: &RwLock<ListenerSettings>,
    stream: S,
    peer: Peer,
) {
    let Some(slot) = ConnectionSlot::take(state) else {
        let is_tls = settings.read().unwrap().tls.is_some();
        refuse_over_capacity(state, stream, is_tls);
        return;
    };
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let settings = settings.read().unwrap().clone();
    let span = info_span!("conn", id);
    state.tracker.spawn(conn::serve(
        state.clone(),
        stream,
        peer,
        slot,
        settings,
        span,
    ));
}

fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

/// The whole answer to a connection over max_connections, written without reading the
/// request (no parsing, no TLS, no task for hyper).
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 38\r\n\
\r\n\
too many connections; try again later\n";

/// How long a refused plain connection is read (and dropped) after the 503, so that closing
/// it does not reset the client before it has read the answer.
const OVER_CAPACITY_LINGER: Duration = Duration::from_secs(1);

/// Over max_connections, at accept time and at no cost: a plain listener answers 503 at once
/// (whatever the client sends is read and dropped for at most a second, then the socket
/// closes); a TLS listener closes the connection without a TLS handshake. The connection
/// holds no place under the cap. Counted as `over_capacity` rejections.
fn refuse_over_capacity<S: ClientStream>(state: &State, stream: S, tls: bool) {
    state
        .metrics
        .rejections
        .get_or_create(&RejectionLabels {
            route: "none".into(),
            reason: "over_capacity".into(),
        })
        .inc();
    debug!(tls, "over max_connections: refused at accept");
    if tls {
        return;
    }
    // A fresh socket's send buffer takes these few bytes whole; if not, the client gets a
    // close instead, which is still a refusal.
    if stream.try_write(OVER_CAPACITY).is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 512];
        let _ = tokio::time::timeout(OVER_CAPACITY_LINGER, async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    });
}

/// One accepted connection's place under max_connections, released on drop.
pub(super) struct ConnectionSlot {
    state: Arc<State>,
}

impl ConnectionSlot {
    /// A place under the cap, or `None` when the cap is reached.
    pub(super) fn take(state: &Arc<State>) -> Option<ConnectionSlot> {
        let max = state.config().limits.max_connections;
        state
            .open_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        state.metrics.connections.inc();
        Some(ConnectionSlot {
            state: state.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.state.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.connections.dec();
    }
}
