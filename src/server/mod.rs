//! The running gateway: bound listeners, the shared state every connection sees, and the drain.
//!
//! ```text
//! mod.rs       Server (bind, run, drain), Handle, State
//! listen.rs    TCP and unix listeners, the socket file, the client stream kinds
//! accept.rs    accept loop, backoff, ConnectionSlot (max_connections)
//! conn.rs      TLS and the handshake deadline, hyper's HTTP/1.1 connection
//! h2.rs        HTTP/2 connections (the h2 crate): streams, GOAWAY on idle and drain
//! h2_stream.rs one HTTP/2 stream: request body, response under flow control, RFC 8441 stream
//! balance.rs   several backends per route: order, failover, ejection
//! client_limits.rs  per-client and per-route limits
//! dispatch.rs  one request: route, checks, backend connect, the 101 or a refusal
//! keepalive.rs between requests: keepalive_timeout, the next head's deadline
//! respond.rs   response bodies, refusals, passed-through answers
//! session.rs   an upgraded session's lifecycle, its metrics and log line
//! reload.rs    reload and apply (listeners added, kept, removed)
//! admin.rs     /healthz, /readyz, /metrics
//! ```
//!
//! Only this module spawns tasks. Every connection and session runs on one [`TaskTracker`],
//! so a drain can wait for all of them: hyper's graceful shutdown does not see upgraded
//! sessions. The config is swapped whole on reload; each connection takes the config of the
//! moment it was accepted, so live sessions keep the limits they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::bridge::MessageBudget;
use crate::config::{Config, ListenAddr};
use crate::metrics::Metrics;
use balance::Balancer;
use client_limits::ClientLimits;

mod accept;
mod admin;
mod balance;
mod client_limits;
mod conn;
mod dispatch;
mod h2;
mod h2_stream;
mod keepalive;
mod listen;
mod reload;
mod respond;
mod session;
mod sessions;

pub use reload::ReloadError;
use reload::{ListenerSettings, ListenerSlot};

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
    listeners: Mutex<HashMap<ListenAddr, ListenerSlot>>,
    /// Accepted client connections now open (counted against max_connections).
    open_connections: AtomicUsize,
    tracker: TaskTracker,
    /// Cancelled when draining ends: live sessions send close 1001.
    sessions_stop: CancellationToken,
    /// Cancelled when draining starts: HTTP/2 connections send GOAWAY.
    drain_started: CancellationToken,
    draining: AtomicBool,
    next_id: AtomicU64,
    metrics: Metrics,
    /// Backend choice and passive health for routes with several backends.
    balancer: Arc<Balancer>,
    /// Per-client and per-route connection counts and handshake rates.
    client_limits: Arc<ClientLimits>,
    /// Held for a whole reload, so two reloads (SIGHUP and --watch) never interleave.
    reloading: tokio::sync::Mutex<()>,
    /// Whole-message buffering of all sessions (limits.message_buffer_budget, fixed at start).
    message_budget: Arc<MessageBudget>,
    /// Live sessions, listed and closed through the admin listener.
    sessions: sessions::Registry,
}

impl State {
    fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// The metrics page, with the gauges that are read at scrape time brought up to date.
    fn metrics_text(&self) -> String {
        self.metrics
            .message_buffer_bytes
            .set(self.message_budget.used() as i64);
        self.metrics.encode()
    }
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
            let listener = listen::Bound::bind(&l.addr, l.mode).await?;
            bound.push((l.addr.clone(), ListenerSettings::of(l), listener));
        }
        let message_budget = MessageBudget::new(config.limits.message_buffer_budget);
        let state = Arc::new(State {
            message_budget,
            reloading: tokio::sync::Mutex::new(()),
            client_limits: Arc::default(),
            balancer: Arc::default(),
            config: RwLock::new(Arc::new(config)),
            config_path: Mutex::new(None),
            listeners: Mutex::new(HashMap::new()),
            open_connections: AtomicUsize::new(0),
            tracker: TaskTracker::new(),
            sessions_stop: CancellationToken::new(),
            drain_started: CancellationToken::new(),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            metrics: Metrics::new(),
            sessions: sessions::Registry::default(),
        });
        let server = Server { state, admin };
        for (configured, settings, listener) in bound {
            server.state.start_listener(configured, settings, listener);
        }
        Ok(server)
    }

    /// Remembers the config file, so a reload reads it again.
    pub fn with_config_path(self, path: PathBuf) -> Server {
        *self.state.config_path.lock().unwrap() = Some(path);
        self
    }

    /// The TCP client addresses actually bound, in config order (unix listeners are where
    /// their config says).
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
        for addr in self.handle().bound() {
            info!(%addr, "listening");
        }
        let state = self.state;
        let admin = self.admin.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "admin listening");
            }
            tokio::spawn(admin::serve(listener, state.clone()))
        });
        stop.await;
        state.draining.store(true, Ordering::Release);
        state.drain_started.cancel();
        let slots: Vec<ListenerSlot> = state
            .listeners
            .lock()
            .unwrap()
            .drain()
            .map(|(_, s)| s)
            .collect();
        for slot in slots {
            slot.close().await;
        }
        state.tracker.close();
        let limits = state.config().limits.clone();
        // Sessions as the session list has them (an HTTP/2 connection's streams are one task
        // with the connection, and a keep-alive connection is a task with no session).
        info!(
            sessions = state.sessions.len(),
            drain_timeout = ?limits.drain_timeout,
            "draining"
        );
        if tokio::time::timeout(limits.drain_timeout, state.tracker.wait())
            .await
            .is_err()
        {
            info!(
                sessions = state.sessions.len(),
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

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

impl Handle {
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound()
            .into_iter()
            .filter_map(|a| match a {
                ListenAddr::Tcp(addr) => Some(addr),
                ListenAddr::Unix(_) => None,
            })
            .collect()
    }

    /// Every listener's bound address, in config order.
    fn bound(&self) -> Vec<ListenAddr> {
        let config = self.state.config();
        let listeners = self.state.listeners.lock().unwrap();
        config
            .listen
            .iter()
            .filter_map(|l| listeners.get(&l.addr).map(|s| s.bound.clone()))
            .collect()
    }

    /// Client connections open now (handshaking ones and sessions).
    pub fn open_connections(&self) -> usize {
        self.state.open_connections.load(Ordering::Acquire)
    }

    /// The metrics page, as /metrics serves it.
    pub fn metrics_text(&self) -> String {
        self.state.metrics_text()
    }
}
