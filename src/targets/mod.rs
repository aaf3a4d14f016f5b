//! Where a session goes when its route's backend is looked up per connection by a token:
//! websockify's token plugins. The token file lives in `token_file`; here are the fleet
//! sources, shared by many gateways: Redis (`TokenRedis`) and signed tokens (`JWTTokenApi`).
//! Each answers `host:port` for a token, "unknown", or why it could not.

pub mod jwt;
pub mod redis;

/// A token lookup that gave no target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The source cannot be asked now (Redis down or slow): 503, try again.
    #[error("the token source is unavailable: {0}")]
    Unavailable(String),
    /// What the source holds for the token is not a target (a malformed Redis value): 502.
    #[error("the token's value is not a target: {0}")]
    BadValue(&'static str),
    /// The token itself is refused (a JWT that is invalid, expired, not yet valid, without
    /// claims, or encrypted): answered like an unknown token (404).
    #[error("the token is refused: {0}")]
    Refused(&'static str),
}

/// Checks `host:port` (a bracketed IPv6 host too) and returns it as a target.
pub(crate) fn target(host: &str, port: &str) -> Option<String> {
    let host = host.trim();
    let port = port.trim();
    if host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().is_err() {
        return None;
    }
    Some(format!("{host}:{port}"))
}

/// `host:port` as one string.
pub(crate) fn split_target(text: &str) -> Option<String> {
    let (host, port) = text.trim().rsplit_once(':')?;
    target(host, port)
}
