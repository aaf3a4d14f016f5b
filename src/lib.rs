//! wsgate: a WebSocket gateway. It accepts WebSocket connections, checks each against its
//! route (path, origin, subprotocol) and relays it to a backend service.
//!
//! The data path, one module per step:
//! ```text
//! client ─TCP─▶ server (accept, cap, handshake_timeout) ─▶ hyper HTTP/1.1 request
//!        ─▶ route (path → route) ─▶ handshake (RFC 6455 §4 checks, accept key)
//!        ─▶ backend (connect before the 101) ─▶ 101 ─▶ relay (two pumps)
//!              frames ⇄ ws::Decoder / ws::FrameWriter (frame codec) ⇄ backend bytes
//! ```
//! `frame`, `ws::Decoder`, `handshake`, `route` and `config` are pure (no I/O) and carry
//! their unit tests; `server` is the only module that spawns tasks.

pub mod backend;
pub mod config;
pub mod frame;
pub mod handshake;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod route;
pub mod server;
pub mod tls;
pub mod ws;

pub use config::Config;
pub use server::{Handle, Server};
