//! Bind, accept (with a connection cap and backoff), hyper for the HTTP/1.1 request, the
//! handshake and route checks, the backend connect, then the session task; and drain.
//!
//! Only this module spawns tasks. Every connection and session runs on one [`TaskTracker`],
//! so a drain can wait for all of them: hyper's graceful shutdown does not see upgraded
//! sessions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::{self, BackendConn, BoxRead};
use crate::config::Config;
use crate::handshake::{self, Rejection};
use crate::relay::{self, SessionLimits};
use crate::route::Route;
use crate::ws::BoxWrite;

/// Largest request head (request line and headers) accepted; bigger gets 431.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// A bound server, ready to run.
pub struct Server {
    listeners: Vec<TcpListener>,
    state: Arc<State>,
}

struct State {
    config: Config,
    connections: Arc<Semaphore>,
    tracker: TaskTracker,
    /// Cancelled when draining ends: live sessions send close 1001.
    sessions_stop: CancellationToken,
    next_id: AtomicU64,
}

impl Server {
    /// Binds every `[[listen]]` address (port 0 picks a free port; see [`Server::local_addrs`]).
    pub async fn bind(config: Config) -> std::io::Result<Server> {
        let mut listeners = Vec::new();
        for l in &config.listen {
            let listener = TcpListener::bind(l.addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", l.addr))
            })?;
            listeners.push(listener);
        }
        Ok(Server {
            listeners,
            state: Arc::new(State {
                connections: Arc::new(Semaphore::new(config.limits.max_connections)),
                config,
                tracker: TaskTracker::new(),
                sessions_stop: CancellationToken::new(),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// The addresses actually bound, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `stop` resolves, then drains: listeners close, live sessions may go on for
    /// `drain_timeout`, then get close 1001 and at most `close_timeout` more.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let accepting = CancellationToken::new();
        let mut acceptors = Vec::new();
        for listener in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "listening");
            }
            acceptors.push(tokio::spawn(accept_loop(
                listener,
                self.state.clone(),
                accepting.clone(),
            )));
        }
        stop.await;
        accepting.cancel();
        for a in acceptors {
            let _ = a.await;
        }
        let state = self.state;
        state.tracker.close();
        let limits = &state.config.limits;
        info!(
            sessions = state.tracker.len(),
            drain_timeout = ?limits.drain_timeout,
            "draining"
        );
        if tokio::time::timeout(limits.drain_timeout, state.tracker.wait())
            .await
            .is_err()
        {
            state.sessions_stop.cancel();
            let grace = limits.close_timeout + Duration::from_secs(1);
            let _ = tokio::time::timeout(grace, state.tracker.wait()).await;
        }
        info!("stopped");
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, accepting: CancellationToken) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = accepting.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let _ = stream.set_nodelay(true);
                let permit = state.connections.clone().try_acquire_owned().ok();
                let conn_state = state.clone();
                state
                    .tracker
                    .spawn(serve_connection(conn_state, stream, peer, permit));
            }
            Err(e) if is_per_connection_error(&e) => debug!(error = %e, "accept"),
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    () = accepting.cancelled() => return,
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

/// Per-connection context the request handler needs.
struct Conn {
    state: Arc<State>,
    id: u64,
    peer: SocketAddr,
    /// Set once a request head has arrived: the handshake deadline stops there.
    head_seen: AtomicBool,
    /// The connection's slot under max_connections; `None` when over the cap.
    permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    over_capacity: bool,
}

async fn serve_connection(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
) {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now() + state.config.limits.handshake_timeout;
    let conn = Arc::new(Conn {
        over_capacity: permit.is_none(),
        permit: std::sync::Mutex::new(permit),
        state,
        id,
        peer,
        head_seen: AtomicBool::new(false),
    });
    let handler = conn.clone();
    let service = service_fn(move |req| {
        let conn = handler.clone();
        async move { Ok::<_, Infallible>(handle_request(conn, req).await) }
    });
    let http = http1::Builder::new()
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(http);
    let timed_out = tokio::select! {
        result = http.as_mut() => {
            if let Err(e) = result {
                debug!(id, %peer, error = %e, "http connection error");
            }
            return;
        }
        () = sleep_until(deadline) => true,
    };
    if timed_out && !conn.head_seen.load(Ordering::Acquire) {
        info!(id, %peer, "handshake timeout: request not complete in time; closed");
        return;
    }
    if let Err(e) = http.await {
        debug!(id, %peer, error = %e, "http connection error");
    }
}

type Body = Full<Bytes>;

/// A refusal: status, the one-line reason as body, `Connection: close`.
fn refuse(conn: &Conn, route: Option<&str>, rejection: Rejection) -> Response<Body> {
    info!(
        id = conn.id,
        peer = %conn.peer,
        route = route.unwrap_or("-"),
        status = rejection.status.as_u16(),
        reason = rejection.label,
        "refused"
    );
    let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", rejection.reason))));
    *response.status_mut() = rejection.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    for (name, value) in rejection.headers {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn handle_request(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<Body> {
    conn.head_seen.store(true, Ordering::Release);
    let state = &conn.state;
    if conn.over_capacity {
        let mut r = Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
            "too many connections; try again later",
        );
        r.headers.push((header::RETRY_AFTER, "1"));
        return refuse(&conn, None, r);
    }
    let Some(route) = state.config.routes.find(req.uri().path()) else {
        return refuse(
            &conn,
            None,
            Rejection::new(StatusCode::NOT_FOUND, "no_route", "no route for this path"),
        );
    };
    let accepted = match handshake::check(req.method(), req.version(), req.headers(), route) {
        Ok(a) => a,
        Err(rejection) => return refuse(&conn, Some(&route.path), rejection),
    };
    let limits = &state.config.limits;
    let backend = match backend::connect(&route.backend, limits.connect_timeout).await {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                backend::ConnectError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                backend::ConnectError::Unreachable(_) => StatusCode::BAD_GATEWAY,
            };
            warn!(id = conn.id, route = %route.path, backend = %route.backend, error = %e, "backend connect failed");
            return refuse(
                &conn,
                Some(&route.path),
                Rejection::new(status, e.label(), e.to_string()),
            );
        }
    };

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accepted.accept).expect("base64 is a valid header value"),
    );
    if let Some(protocol) = &accepted.protocol {
        // Chosen from the route's own list of tokens, so always a valid value.
        if let Ok(v) = HeaderValue::from_str(protocol) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    let permit = conn.permit.lock().ok().and_then(|mut p| p.take());
    let session = Session {
        id: conn.id,
        peer: conn.peer,
        route: route.clone(),
        limits: SessionLimits {
            max_message_size: limits.max_message_size,
            idle_timeout: limits.idle_timeout,
            ping_interval: limits.ping_interval,
            close_timeout: limits.close_timeout,
            message: route.message,
        },
        stop: state.sessions_stop.clone(),
    };
    state.tracker.spawn(async move {
        let _permit = permit;
        match on_upgrade.await {
            Ok(upgraded) => session.run(upgraded, backend).await,
            Err(e) => debug!(id = session.id, error = %e, "upgrade failed"),
        }
    });
    response
}

struct Session {
    id: u64,
    peer: SocketAddr,
    route: Route,
    limits: SessionLimits,
    stop: CancellationToken,
}

impl Session {
    async fn run(self, upgraded: hyper::upgrade::Upgraded, backend: BackendConn) {
        let started = Instant::now();
        let (read, initial, write) = split_upgraded(upgraded);
        let summary = relay::run(read, initial, write, backend, &self.limits, &self.stop).await;
        info!(
            id = self.id,
            peer = %self.peer,
            route = %self.route.path,
            backend = %self.route.backend,
            bytes_in = summary.bytes_from_client,
            bytes_out = summary.bytes_to_client,
            messages_in = summary.messages_from_client,
            messages_out = summary.messages_to_client,
            duration_ms = started.elapsed().as_millis() as u64,
            close_sent = summary.close_sent.unwrap_or(0),
            close_received = summary.close_received.unwrap_or(1006),
            end = summary.end,
            "session ended"
        );
    }
}

/// Takes the client connection back from hyper: the plain TCP stream when it is one (no
/// extra layer on the data path), with the bytes hyper had already read behind the request.
fn split_upgraded(upgraded: hyper::upgrade::Upgraded) -> (BoxRead, BytesMut, BoxWrite) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            (
                Box::pin(read),
                BytesMut::from(&parts.read_buf[..]),
                Box::pin(write),
            )
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            (Box::pin(read), BytesMut::new(), Box::pin(write))
        }
    }
}
