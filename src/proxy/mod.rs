//! Proxy routes (`ws://` and `wss://` backends): the client's request is forwarded to the ws
//! app, the app's 101 is checked before the client gets its own, then bytes are spliced.
//!
//! ```text
//! headers   the request for the app, the 101 check, passed-through headers (pure)
//! forward   the exchange with the app: the upgrade (see exchange) or a plain request (hyper)
//! exchange  the upgrade's HTTP/1.1 written and read here, the app's socket after its 101
//! splice    bytes both ways after both upgrades, idle timer, drain
//! ```

pub(crate) mod exchange;
pub(crate) mod forward;
pub(crate) mod headers;
pub(crate) mod splice;
