//! wsgate: a WebSocket gateway. It accepts WebSocket connections, checks each against its
//! route (path, origin, subprotocol) and relays it to a backend service.
//!
//! The modules in the order a request meets them:
//! ```text
//! client ─TCP─▶ server::accept      accept, max_connections, backoff
//!        ─────▶ server::conn        PROXY header (proxy_protocol), TLS (tls),
//!                                   handshake_timeout, hyper HTTP/1.1
//!        ─────▶ server::dispatch    route (path → Route), forwarded (who the client is),
//!                                   server::client_limits, protocol::handshake (§4 checks)
//!        ─────▶ backend             connect before the 101, server::balance choosing and
//!                                   failing over (proxy::forward: the app's 101)
//!        ─────▶ server::session     the session's lifecycle, metrics, log line
//!                 ├─ bridge         two pumps: protocol::decoder ⇄ backend bytes ⇄ protocol::writer
//!                 └─ proxy::splice  bytes both ways to a ws app
//! ```
//! Beside the path: `config` (TOML → Config; reads the PEM files through `tls`), `metrics`,
//! `server::reload`, `server::admin`, `log_writer` (buffered log lines), `log_time` (their
//! timestamps), and the leaf types
//! `stream` (byte-stream halves), `scratch` (reads that hold no buffer while a session is
//! idle), `on_wake` (session timers polled only when woken) and `session_end` (how a session
//! ended). `protocol`, `proxy_protocol`, `forwarded`, `route` and
//! `proxy::headers` are pure (no I/O) and carry their unit tests. Tasks are spawned by
//! `server` (one per connection: its requests, then its session) and, on the server's
//! tracker, by `proxy::forward` (the app connection). Imports
//! run one way: server → bridge/proxy → backend → protocol → route.

// Public: what the binary, the tests, the benches and the fuzz targets use.
pub mod auth;
pub mod config;
pub mod edge;
pub mod files;
pub mod forwarded;
pub mod log_time;
pub mod log_writer;
pub mod params;
pub mod protocol;
pub mod proxy_protocol;
pub mod route;
pub mod stream;
pub mod targets;
pub mod token_file;

mod backend;
mod bridge;
mod metrics;
mod on_wake;
mod proxy;
mod scratch;
mod server;
mod session_end;
mod tls;

pub use config::{Config, ConfigError};

/// Every metric family the process exports (`wsgate_…`, counters without `_total`), for the
/// check that docs/operations.md names each one.
#[doc(hidden)]
pub fn metric_names() -> Vec<String> {
    metrics::Metrics::new().names()
}
pub use server::{Handle, ReloadError, Server};
