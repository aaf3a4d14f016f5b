//! Bind, accept (with a connection cap and backoff), hyper for the HTTP/1.1 request, the
//! handshake and route checks, the backend connect, then the session task; reload, drain,
//! and the admin listener.
//!
//! Only this module spawns tasks. Every connection and session runs on one [`TaskTracker`],
//! so a drain can wait for all of them: hyper's graceful shutdown does not see upgraded
//! sessions. The config is swapped whole on reload; each connection takes the config of the
//! moment it was accepted, so live sessions keep the limits they started with.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backend::{self, BackendConn, BoxRead};
use crate::config::Config;
use crate::handshake::{self, Rejection};
use crate::metrics::{Metrics, RejectionLabels, SessionCounters};
use crate::proxy;
use crate::relay::{self, SessionLimits};
use crate::route::Route;
use crate::ws::BoxWrite;

/// Largest request head (request line and headers) accepted; bigger gets 431.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// A bound server, ready to run.
pub struct Server {
    state: Arc<State>,
    admin: Option<TcpListener>,
}

/// A handle to a running server, for reloads (SIGHUP, --watch) and tests.
#[derive(Clone)]
pub struct Handle {
    state: Arc<State>,
}

struct State {
    config: RwLock<Arc<Config>>,
    /// Where the config came from, for reloads; `None` in quick mode.
    config_path: Mutex<Option<PathBuf>>,
    /// One accept loop per configured `[[listen]]` address.
    listeners: Mutex<HashMap<SocketAddr, ListenerSlot>>,
    /// Accepted client connections now open (counted against max_connections).
    open_connections: AtomicUsize,
    tracker: TaskTracker,
    /// Cancelled when draining ends: live sessions send close 1001.
    sessions_stop: CancellationToken,
    draining: AtomicBool,
    next_id: AtomicU64,
    metrics: Metrics,
}

struct ListenerSlot {
    bound: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The listener's TLS config, swapped on reload (new certificates, new connections).
    tls: Arc<RwLock<Option<TlsAcceptor>>>,
}

impl Server {
    /// Binds every `[[listen]]` address and the admin address (port 0 picks a free port; see
    /// [`Server::local_addrs`]).
    pub async fn bind(config: Config) -> std::io::Result<Server> {
        let admin = match config.admin {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let mut bound = Vec::new();
        for l in &config.listen {
            bound.push((l.addr, acceptor(l), bind(l.addr).await?));
        }
        let state = Arc::new(State {
            config: RwLock::new(Arc::new(config)),
            config_path: Mutex::new(None),
            listeners: Mutex::new(HashMap::new()),
            open_connections: AtomicUsize::new(0),
            tracker: TaskTracker::new(),
            sessions_stop: CancellationToken::new(),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            metrics: Metrics::new(),
        });
        let server = Server { state, admin };
        for (configured, tls, listener) in bound {
            server.state.start_listener(configured, tls, listener);
        }
        Ok(server)
    }

    /// Remembers the config file, so a reload reads it again.
    pub fn with_config_path(self, path: PathBuf) -> Server {
        *self.state.config_path.lock().unwrap() = Some(path);
        self
    }

    /// The client addresses actually bound, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.handle().local_addrs()
    }

    /// The admin address actually bound, if there is an admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn handle(&self) -> Handle {
        Handle {
            state: self.state.clone(),
        }
    }

    /// Serves until `stop` resolves, then drains: listeners close, /readyz turns 503, live
    /// sessions may go on for `drain_timeout`, then get close 1001 and at most
    /// `close_timeout` more. Returns when the last session has ended.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let state = self.state;
        for addr in state.handle().local_addrs() {
            info!(%addr, "listening");
        }
        let admin = self.admin.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "admin listening");
            }
            tokio::spawn(admin_loop(listener, state.clone()))
        });
        stop.await;
        state.draining.store(true, Ordering::Release);
        let slots: Vec<ListenerSlot> = state
            .listeners
            .lock()
            .unwrap()
            .drain()
            .map(|(_, s)| s)
            .collect();
        for slot in slots {
            slot.stop.cancel();
            let _ = slot.task.await;
        }
        state.tracker.close();
        let limits = state.config().limits.clone();
        info!(
            sessions = state.tracker.len(),
            drain_timeout = ?limits.drain_timeout,
            "draining"
        );
        if tokio::time::timeout(limits.drain_timeout, state.tracker.wait())
            .await
            .is_err()
        {
            info!(
                sessions = state.tracker.len(),
                "drain timeout: closing sessions with 1001"
            );
            state.sessions_stop.cancel();
            let grace = limits.close_timeout + Duration::from_secs(1);
            let _ = tokio::time::timeout(grace, state.tracker.wait()).await;
        }
        if let Some(admin) = admin {
            admin.abort();
        }
        info!("stopped");
    }
}

fn acceptor(listener: &crate::config::Listener) -> Option<TlsAcceptor> {
    listener
        .tls
        .as_ref()
        .map(|t| TlsAcceptor::from(t.server.clone()))
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

impl Handle {
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let config = self.state.config();
        let listeners = self.state.listeners.lock().unwrap();
        config
            .listen
            .iter()
            .filter_map(|l| listeners.get(&l.addr).map(|s| s.bound))
            .collect()
    }

    /// The metrics page, as /metrics serves it.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.encode()
    }

    /// Reads the config file again and applies it; on any error the old config stays.
    pub async fn reload(&self) -> Result<(), String> {
        let Some(path) = self.state.config_path.lock().unwrap().clone() else {
            return Err("no config file to reload (quick mode)".into());
        };
        let result = match Config::load(&path) {
            Ok(config) => self.apply(config).await,
            Err(e) => Err(e.to_string()),
        };
        let m = &self.state.metrics;
        let label = crate::metrics::ResultLabel {
            result: if result.is_ok() { "success" } else { "failure" }.into(),
        };
        m.reloads.get_or_create(&label).inc();
        m.last_reload_success.set(i64::from(result.is_ok()));
        match &result {
            Ok(()) => info!(path = %path.display(), "config reloaded"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "config reload rejected; keeping the old config")
            }
        }
        result
    }

    /// Applies a validated config: binds new listeners first (any failure changes nothing),
    /// swaps the config for new connections, then closes listeners no longer configured.
    pub async fn apply(&self, config: Config) -> Result<(), String> {
        let state = &self.state;
        if state.draining.load(Ordering::Acquire) {
            return Err("draining: reload ignored".into());
        }
        let old = state.config();
        if old.admin != config.admin {
            warn!("[admin] addr changes take effect at restart");
        }
        let existing: Vec<SocketAddr> = state.listeners.lock().unwrap().keys().copied().collect();
        let mut fresh = Vec::new();
        for l in &config.listen {
            if !existing.contains(&l.addr) {
                fresh.push((
                    l.addr,
                    acceptor(l),
                    bind(l.addr).await.map_err(|e| e.to_string())?,
                ));
            }
        }
        let removed: Vec<SocketAddr> = existing
            .into_iter()
            .filter(|a| !config.listen.iter().any(|l| l.addr == *a))
            .collect();
        // Kept listeners take the new TLS settings (renewed certificates) for new connections.
        {
            let slots = state.listeners.lock().unwrap();
            for l in &config.listen {
                if let Some(slot) = slots.get(&l.addr) {
                    *slot.tls.write().unwrap() = acceptor(l);
                }
            }
        }
        *state.config.write().unwrap() = Arc::new(config);
        for (configured, tls, listener) in fresh {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "listening");
            }
            state.start_listener(configured, tls, listener);
        }
        for addr in removed {
            let slot = state.listeners.lock().unwrap().remove(&addr);
            if let Some(slot) = slot {
                slot.stop.cancel();
                let _ = slot.task.await;
                info!(addr = %slot.bound, "listener closed");
            }
        }
        Ok(())
    }
}

impl State {
    fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    fn handle(self: &Arc<Self>) -> Handle {
        Handle {
            state: self.clone(),
        }
    }

    fn start_listener(
        self: &Arc<Self>,
        configured: SocketAddr,
        tls: Option<TlsAcceptor>,
        listener: TcpListener,
    ) {
        let bound = listener.local_addr().unwrap_or(configured);
        let stop = CancellationToken::new();
        let tls = Arc::new(RwLock::new(tls));
        let task = tokio::spawn(accept_loop(
            listener,
            self.clone(),
            stop.clone(),
            tls.clone(),
        ));
        self.listeners.lock().unwrap().insert(
            configured,
            ListenerSlot {
                bound,
                stop,
                task,
                tls,
            },
        );
    }
}

async fn accept_loop(
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
                    serve_connection(conn_state, stream, peer, slot, id, tls)
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
struct ConnectionSlot {
    state: Arc<State>,
    over: bool,
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

/// Per-connection context the request handler needs.
struct Conn {
    state: Arc<State>,
    /// The config at accept time.
    config: Arc<Config>,
    id: u64,
    peer: SocketAddr,
    /// Set once a request head has arrived: the handshake deadline stops there.
    head_seen: AtomicBool,
    /// The client came in over TLS (X-Forwarded-Proto on proxy routes).
    tls: bool,
    /// Moves into the session on upgrade; otherwise dropped with the connection.
    slot: Mutex<Option<ConnectionSlot>>,
    over_capacity: bool,
}

async fn serve_connection(
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
        over_capacity: slot.over,
        slot: Mutex::new(Some(slot)),
        state,
        config,
        id,
        peer,
        head_seen: AtomicBool::new(false),
        tls: tls.is_some(),
    });
    match tls {
        None => serve_http(conn, TokioIo::new(stream), deadline).await,
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => serve_http(conn, TokioIo::new(stream), deadline).await,
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

/// Serves the one HTTP/1.1 request of a connection (plain or TLS), bounded by `deadline`
/// until the request head has arrived.
async fn serve_http<I>(conn: Arc<Conn>, io: I, deadline: Instant)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let handler = conn.clone();
    let service = service_fn(move |req| {
        let conn = handler.clone();
        async move { Ok::<_, Infallible>(handle_request(conn, req).await) }
    });
    let http = http1::Builder::new()
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(http);
    tokio::select! {
        result = http.as_mut() => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection error");
            }
            return;
        }
        () = sleep_until(deadline) => {}
    }
    if !conn.head_seen.load(Ordering::Acquire) {
        conn.state.metrics.handshake_timeouts.inc();
        info!(%peer, "handshake timeout: request not complete in time; closed");
        return;
    }
    if let Err(e) = http.await {
        debug!(%peer, error = %e, "http connection error");
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn text_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A refusal: status, the one-line reason as body, `Connection: close`.
fn refuse(conn: &Conn, route: Option<&str>, rejection: Rejection) -> Response<Body> {
    info!(
        peer = %conn.peer,
        route = route.unwrap_or("-"),
        status = rejection.status.as_u16(),
        reason = rejection.label,
        "refused"
    );
    conn.state
        .metrics
        .rejections
        .get_or_create(&RejectionLabels {
            route: route.unwrap_or("none").to_owned(),
            reason: rejection.label.to_owned(),
        })
        .inc();
    let mut response = text_response(rejection.status, format!("{}\n", rejection.reason));
    let headers = response.headers_mut();
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
    let Some(route) = conn.config.routes.find(req.uri().path()) else {
        return refuse(
            &conn,
            None,
            Rejection::new(StatusCode::NOT_FOUND, "no_route", "no route for this path"),
        );
    };
    let route = route.clone();
    if route.backend.is_proxy() && !is_websocket_upgrade(req.headers()) {
        return proxy_http(&conn, req, &route).await;
    }
    let accepted = match handshake::check(req.method(), req.version(), req.headers(), &route) {
        Ok(a) => a,
        Err(rejection) => return refuse(&conn, Some(&route.path), rejection),
    };
    let limits = &conn.config.limits;
    let connect_started = Instant::now();
    let backend = match backend::connect(&route, limits.connect_timeout).await {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                backend::ConnectError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                backend::ConnectError::Unreachable(_) | backend::ConnectError::Tls(_) => {
                    StatusCode::BAD_GATEWAY
                }
            };
            warn!(route = %route.path, backend = %route.backend, error = %e, "backend connect failed");
            return refuse(
                &conn,
                Some(&route.path),
                Rejection::new(status, e.label(), e.to_string()),
            );
        }
    };
    state
        .metrics
        .backend_connect_seconds
        .get_or_create(&Metrics::route(&route.path))
        .observe(connect_started.elapsed().as_secs_f64());
    let (backend, proxy_accept) = match backend {
        BackendConn::Proxy(io) => match proxy_upgrade(&conn, &mut req, &route, io).await {
            Ok((app, accept)) => (SessionBackend::Proxy(app), Some(accept)),
            Err(response) => return response,
        },
        BackendConn::Echo => (SessionBackend::Bridge(None), None),
        BackendConn::Stream { read, write } => (SessionBackend::Bridge(Some((read, write))), None),
    };

    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accepted.accept).expect("base64 is a valid header value"),
    );
    match proxy_accept {
        // A proxy route answers with the app's choice (checked against the offer and route).
        Some(accept) => {
            if let Some(p) = accept.protocol {
                headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
            }
            if let Some(e) = accept.extensions {
                headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, e);
            }
        }
        None => {
            if let Some(protocol) = &accepted.protocol {
                // Chosen from the route's own list of tokens, so always a valid value.
                if let Ok(v) = HeaderValue::from_str(protocol) {
                    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
                }
            }
        }
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    let slot = conn.slot.lock().ok().and_then(|mut s| s.take());
    let session = Session {
        state: state.clone(),
        peer: conn.peer,
        route: route.clone(),
        limits: SessionLimits {
            max_message_size: limits.max_message_size,
            idle_timeout: limits.idle_timeout,
            ping_interval: limits.ping_interval,
            close_timeout: limits.close_timeout,
            message: route.message,
        },
    };
    state.tracker.spawn(
        async move {
            let _slot = slot;
            match on_upgrade.await {
                Ok(upgraded) => session.run(upgraded, backend).await,
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        }
        // The connection's own span, not nested in the handshake's (same id).
        .instrument(info_span!(parent: None, "conn", id = conn.id)),
    );
    response
}

struct Session {
    state: Arc<State>,
    peer: SocketAddr,
    route: Route,
    limits: SessionLimits,
}

/// What a session relays to.
enum SessionBackend {
    /// The bridge: a byte stream, or `None` for the built-in echo.
    Bridge(Option<(BoxRead, BoxWrite)>),
    /// A proxy route: the app's side of the upgrade, ready once its 101 is through.
    Proxy(hyper::upgrade::OnUpgrade),
}

impl Session {
    async fn run(self, upgraded: hyper::upgrade::Upgraded, backend: SessionBackend) {
        let m = &self.state.metrics;
        let route = &self.route.path;
        let label = Metrics::route(route);
        m.sessions_total.get_or_create(&label).inc();
        m.sessions_open.get_or_create(&label).inc();
        let counters = SessionCounters::for_route(m, route);
        info!(peer = %self.peer, route = %route, backend = %self.route.backend, "upgraded");
        let started = Instant::now();
        let summary = match backend {
            SessionBackend::Bridge(backend) => {
                let (read, initial, write) = split_upgraded(upgraded);
                relay::run(
                    read,
                    initial,
                    write,
                    backend,
                    &self.limits,
                    &self.state.sessions_stop,
                    counters,
                )
                .await
            }
            SessionBackend::Proxy(app) => match app.await {
                Ok(app) => {
                    let spliced = proxy::splice(
                        TokioIo::new(upgraded),
                        TokioIo::new(app),
                        self.limits.idle_timeout,
                        &self.state.sessions_stop,
                        counters.bytes_from_client.clone(),
                        counters.bytes_to_client.clone(),
                    )
                    .await;
                    relay::Summary {
                        bytes_from_client: spliced.from_client,
                        bytes_to_client: spliced.to_client,
                        end: match spliced.end {
                            proxy::SpliceEnd::Closed => "closed",
                            proxy::SpliceEnd::Error => "error",
                            proxy::SpliceEnd::IdleTimeout => "idle_timeout",
                            proxy::SpliceEnd::Shutdown => "shutdown",
                        },
                        ..relay::Summary::default()
                    }
                }
                Err(_) => relay::Summary {
                    end: "backend_upgrade_failed",
                    ..relay::Summary::default()
                },
            },
        };
        let duration = started.elapsed();
        m.sessions_open.get_or_create(&label).dec();
        m.session_seconds
            .get_or_create(&label)
            .observe(duration.as_secs_f64());
        m.close_codes
            .get_or_create(&Metrics::close(route, "sent", summary.close_sent))
            .inc();
        m.close_codes
            .get_or_create(&Metrics::close(route, "received", summary.close_received))
            .inc();
        info!(
            peer = %self.peer,
            route = %route,
            backend = %self.route.backend,
            bytes_in = summary.bytes_from_client,
            bytes_out = summary.bytes_to_client,
            messages_in = summary.messages_from_client,
            messages_out = summary.messages_to_client,
            duration_ms = duration.as_millis() as u64,
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
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            return (
                Box::pin(read),
                BytesMut::from(&parts.read_buf[..]),
                Box::pin(write),
            );
        }
        Err(upgraded) => upgraded,
    };
    match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
        Ok(parts) => {
            // A TLS session has one state for both directions: split behind a lock.
            let (read, write) = tokio::io::split(parts.io.into_inner());
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

// ---- proxy routes ----

fn is_websocket_upgrade(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
}

/// Forwards the client's upgrade to the app and checks its answer. On a good 101 returns the
/// app's side of the upgrade and what the client's 101 carries over; otherwise the response
/// for the client (the app's own status and body, or 502/504).
async fn proxy_upgrade(
    conn: &Arc<Conn>,
    req: &mut Request<Incoming>,
    route: &Route,
    io: Box<dyn backend::Io>,
) -> Result<(hyper::upgrade::OnUpgrade, proxy::BackendAccept), Response<Body>> {
    let limits = &conn.config.limits;
    let mut sender = app_client(conn, route, io).await?;
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii().to_vec())
        .unwrap_or_default();
    let (parts, _) = Request::new(()).into_parts();
    let mut head = parts;
    head.method = req.method().clone();
    head.uri = req.uri().clone();
    head.headers = req.headers().clone();
    let request = proxy::backend_request(
        &head,
        Empty::<Bytes>::new(),
        route,
        conn.peer,
        conn.tls,
        true,
    );
    let response =
        match tokio::time::timeout(limits.connect_timeout, sender.send_request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(backend_http_failed(conn, route, e)),
            Err(_) => {
                return Err(refuse(
                    conn,
                    Some(&route.path),
                    Rejection::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "backend_timeout",
                        "backend did not answer the upgrade in time",
                    ),
                ))
            }
        };
    match proxy::check_backend_101(response.status(), response.headers(), &key, &offered, route) {
        Ok(accept) => Ok((hyper::upgrade::on(response), accept)),
        Err(reason) if response.status() == StatusCode::SWITCHING_PROTOCOLS => Err(refuse(
            conn,
            Some(&route.path),
            Rejection::new(StatusCode::BAD_GATEWAY, "backend_bad_101", reason),
        )),
        Err(_) => {
            // The app refused: its status and body go to the client as they are.
            info!(route = %route.path, status = response.status().as_u16(), "backend refused the upgrade");
            conn.state
                .metrics
                .rejections
                .get_or_create(&RejectionLabels {
                    route: route.path.clone(),
                    reason: "backend_refused".into(),
                })
                .inc();
            let (parts, body) = response.into_parts();
            let mut out = Response::new(body.boxed());
            *out.status_mut() = parts.status;
            *out.headers_mut() = proxy::passthrough_headers(&parts.headers);
            out.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(out)
        }
    }
}

/// 502 for an app that did not speak HTTP as expected.
fn backend_http_failed(
    conn: &Conn,
    route: &Route,
    error: impl std::fmt::Display,
) -> Response<Body> {
    refuse(
        conn,
        Some(&route.path),
        Rejection::new(
            StatusCode::BAD_GATEWAY,
            "backend_http",
            format!("backend HTTP failed: {error}"),
        ),
    )
}

/// An HTTP/1.1 client connection to the app over `io`; the connection task (with upgrades)
/// runs on the tracker.
async fn app_client<B>(
    conn: &Arc<Conn>,
    route: &Route,
    io: Box<dyn backend::Io>,
) -> Result<hyper::client::conn::http1::SendRequest<B>, Response<Body>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok((sender, connection)) => {
            conn.state.tracker.spawn(connection.with_upgrades());
            Ok(sender)
        }
        Err(e) => Err(backend_http_failed(conn, route, e)),
    }
}

/// The app's response for the client: its status, headers (hop-by-hop ones dropped) and
/// streamed body.
fn passthrough(response: Response<Incoming>) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let mut out = Response::new(body.boxed());
    *out.status_mut() = parts.status;
    *out.headers_mut() = proxy::passthrough_headers(&parts.headers);
    out
}

/// A plain HTTP request on a proxy route: forwarded to the app, both bodies streamed.
async fn proxy_http(conn: &Arc<Conn>, req: Request<Incoming>, route: &Route) -> Response<Body> {
    let limits = &conn.config.limits;
    let io = match backend::connect(route, limits.connect_timeout).await {
        Ok(BackendConn::Proxy(io)) => io,
        Ok(_) => unreachable!("proxy routes connect to proxy backends"),
        Err(e) => {
            let status = match e {
                backend::ConnectError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            return refuse(
                conn,
                Some(&route.path),
                Rejection::new(status, e.label(), e.to_string()),
            );
        }
    };
    let mut sender = match app_client(conn, route, io).await {
        Ok(sender) => sender,
        Err(response) => return response,
    };
    let (parts, body) = req.into_parts();
    let request = proxy::backend_request(&parts, body, route, conn.peer, conn.tls, false);
    match sender.send_request(request).await {
        Ok(response) => passthrough(response),
        Err(e) => backend_http_failed(conn, route, e),
    }
}

// ---- admin listener ----

async fn admin_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(admin_response(&state, req.uri().path())) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn admin_response(state: &State, path: &str) -> Response<Body> {
    match path {
        "/healthz" => text_response(StatusCode::OK, "ok\n".into()),
        "/readyz" if state.draining.load(Ordering::Acquire) => {
            text_response(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        }
        "/readyz" => text_response(StatusCode::OK, "ready\n".into()),
        "/metrics" => {
            let mut r = text_response(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text_response(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}
