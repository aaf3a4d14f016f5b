//! The accept loop of one listener: the connection cap, accept-error backoff, and a task per
//! connection on the server's tracker.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::sleep;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use super::{conn, State};

/// Accepts until `stop` is cancelled. Each connection takes a [`ConnectionSlot`] and the TLS
/// settings of the moment it was accepted.
pub(super) async fn run(
    listener: TcpListener,
    state: Arc<State>,
    stop: CancellationToken,
    tls: Arc<RwLock<Option<TlsAcceptor>>>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let _ = stream.set_nodelay(true);
                let slot = ConnectionSlot::take(&state);
                let id = state.next_id.fetch_add(1, Ordering::Relaxed);
                let conn_state = state.clone();
                let tls = tls.read().unwrap().clone();
                state.tracker.spawn(
                    conn::serve(conn_state, stream, peer, slot, id, tls)
                        .instrument(info_span!("conn", id)),
                );
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
}

fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

/// One accepted connection's place under max_connections, released on drop. `over` is set
/// when the cap was already reached: the connection only gets its 503.
pub(super) struct ConnectionSlot {
    state: Arc<State>,
    pub(super) over: bool,
}

impl ConnectionSlot {
    fn take(state: &Arc<State>) -> ConnectionSlot {
        let max = state.config().limits.max_connections;
        let before = state.open_connections.fetch_add(1, Ordering::AcqRel);
        state.metrics.connections.inc();
        ConnectionSlot {
            state: state.clone(),
            over: before >= max,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.state.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.connections.dec();
    }
}
