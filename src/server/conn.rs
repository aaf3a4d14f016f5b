//! One accepted connection until its request is answered: the TLS handshake (on wss
//! listeners) and the request head, both inside `handshake_timeout` counted from accept, then
//! hyper's HTTP/1.1 connection with upgrades.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::accept::ConnectionSlot;
use super::keepalive::{watched, Expired, KeepAlive};
use super::{dispatch, State};
use crate::config::Config;

/// Largest request head (request line and headers) accepted; bigger gets 431.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Per-connection context the request handler needs.
pub(super) struct Conn {
    pub(super) state: Arc<State>,
    /// The config at accept time.
    pub(super) config: Arc<Config>,
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    /// Between requests: the handshake deadline stops at the first head, keep-alive after.
    pub(super) keepalive: Arc<KeepAlive>,
    /// The client came in over TLS (X-Forwarded-Proto on proxy routes).
    pub(super) tls: bool,
    /// Moves into the session on upgrade; otherwise dropped with the connection.
    pub(super) slot: Mutex<Option<ConnectionSlot>>,
}

/// Serves one accepted connection to its end. Cancel-safe: dropping it drops the connection.
pub(super) async fn serve(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    id: u64,
    tls: Option<TlsAcceptor>,
) {
    let config = state.config();
    // The whole TLS handshake and request head must arrive within handshake_timeout.
    let deadline = Instant::now() + config.limits.handshake_timeout;
    let conn = Arc::new(Conn {
        slot: Mutex::new(Some(slot)),
        state,
        config,
        id,
        peer,
        keepalive: Arc::new(KeepAlive::new()),
        tls: tls.is_some(),
    });
    match tls {
        None => {
            let io = watched(stream, &conn.keepalive);
            serve_http(conn, io, deadline).await
        }
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let io = watched(stream, &conn.keepalive);
                serve_http(conn, io, deadline).await
            }
            Ok(Err(e)) => {
                conn.state.metrics.tls_failures.inc();
                info!(%peer, error = %e, "TLS handshake failed; closed");
            }
            Err(_) => {
                conn.state.metrics.tls_failures.inc();
                conn.state.metrics.handshake_timeouts.inc();
                info!(%peer, "handshake timeout during TLS; closed");
            }
        },
    }
}

/// Serves the HTTP/1.1 requests of a connection (plain or TLS): the first head must arrive by
/// `deadline`; after a response, the next request is waited for `keepalive_timeout` and its
/// head for `handshake_timeout` from its first byte.
async fn serve_http<I>(conn: Arc<Conn>, io: I, deadline: Instant)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let handler = conn.clone();
    let service = service_fn(move |req| {
        let conn = handler.clone();
        async move { Ok::<_, Infallible>(dispatch::handle(conn, req).await) }
    });
    let http = http1::Builder::new()
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(io, service)
        .with_upgrades();
    let limits = &conn.config.limits;
    tokio::select! {
        result = http => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection error");
            }
        }
        expired = conn.keepalive.expired(deadline, limits.keepalive_timeout, limits.handshake_timeout) => {
            match expired {
                Expired::FirstHead => {
                    conn.state.metrics.handshake_timeouts.inc();
                    info!(%peer, "handshake timeout: request not complete in time; closed");
                }
                Expired::Idle => debug!(%peer, "keep-alive timeout: closed"),
                Expired::SlowHead => {
                    conn.state.metrics.handshake_timeouts.inc();
                    info!(%peer, "handshake timeout: next request not complete in time; closed");
                }
            }
        }
    }
}
