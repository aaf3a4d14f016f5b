//! Proxy routes (`ws://` and `wss://` backends): the client's request is forwarded to the ws
//! app, the app's 101 is checked before the client gets its own, then bytes are spliced.
//!
//! ```text
//! headers   the request for the app, the 101 check, passed-through headers (pure)
//! forward   the HTTP/1.1 exchange with the app: upgrade or plain request
//! splice    bytes both ways after both upgrades, idle timer, drain
//! ```

pub(crate) mod forward;
pub(crate) mod headers;
pub(crate) mod splice;
