//! Path → route, each route's origin and subprotocol checks, and the backend a route names.
//! No I/O: `config` builds routes from the file, the server looks them up.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// Where a route's sessions go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Built in: echoes each message with its type.
    Echo,
    /// `tcp://host:port`
    Tcp(String),
    /// `unix:/path`
    Unix(PathBuf),
    /// `tls://host:port`: the bridge over a TLS client connection.
    Tls { authority: String, host: String },
    /// `ws://host:port/path` or `wss://…`: a proxy route, the upgrade is forwarded to a ws app.
    Ws {
        secure: bool,
        authority: String,
        host: String,
        /// Path the route's prefix is replaced with; `None` forwards the request path as is.
        path: Option<String>,
    },
    /// `token-file:PATH`: a bridge to the `host:port` that the connection's token maps to in
    /// websockify's token file format, looked up per connection.
    TokenFile(TokenSource),
    /// `token-redis:SOURCE`: the token's target is read from Redis per connection
    /// (websockify's `TokenRedis`).
    TokenRedis(Named<crate::targets::redis::RedisSource>),
    /// `token-jwt:KEYFILE`: the token is a signed JWT naming its target (websockify's
    /// `JWTTokenApi`).
    TokenJwt(Named<crate::targets::jwt::JwtKey>),
}

/// A token source compared (and hashed) by how the config names it (a Redis source with its
/// password starred, a key file by its path).
#[derive(Debug)]
pub struct Named<T>(pub std::sync::Arc<T>, pub String);

impl<T> Clone for Named<T> {
    fn clone(&self) -> Self {
        Named(self.0.clone(), self.1.clone())
    }
}

impl<T> PartialEq for Named<T> {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1
    }
}

impl<T> Eq for Named<T> {}

impl<T> std::hash::Hash for Named<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.1.hash(state);
    }
}

/// A token file (or directory) and what was last read from it; compared (and hashed) by path.
#[derive(Debug, Clone)]
pub struct TokenSource(pub std::sync::Arc<crate::token_file::TokenFile>);

impl PartialEq for TokenSource {
    fn eq(&self, other: &Self) -> bool {
        self.0.source() == other.0.source()
    }
}

impl Eq for TokenSource {}

impl std::hash::Hash for TokenSource {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.source().hash(state);
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Echo => f.write_str("echo"),
            Backend::Tcp(addr) => write!(f, "tcp://{addr}"),
            Backend::Unix(path) => write!(f, "unix:{}", path.display()),
            Backend::Tls { authority, .. } => write!(f, "tls://{authority}"),
            Backend::Ws {
                secure,
                authority,
                path,
                ..
            } => write!(
                f,
                "{}://{authority}{}",
                if *secure { "wss" } else { "ws" },
                path.as_deref().unwrap_or("")
            ),
            Backend::TokenFile(source) => write!(f, "token-file:{}", source.0.source().display()),
            Backend::TokenRedis(source) => write!(f, "token-redis:{}", source.1),
            Backend::TokenJwt(key) => write!(f, "token-jwt:{}", key.1),
        }
    }
}

impl Backend {
    /// Parses a backend spec; relative unix socket paths are taken from `base`.
    pub fn parse(spec: &str, base: &Path) -> Result<Backend, BackendSpecError> {
        if spec == "echo" {
            return Ok(Backend::Echo);
        }
        if let Some(addr) = spec.strip_prefix("tcp://") {
            let (authority, _) = host_port(spec, addr.trim_end_matches('/'))?;
            return Ok(Backend::Tcp(authority));
        }
        if let Some(addr) = spec.strip_prefix("tls://") {
            let (authority, host) = host_port(spec, addr.trim_end_matches('/'))?;
            return Ok(Backend::Tls { authority, host });
        }
        for (scheme, secure) in [("ws://", false), ("wss://", true)] {
            if let Some(rest) = spec.strip_prefix(scheme) {
                let (addr, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], Some(&rest[i..])),
                    None => (rest, None),
                };
                let (authority, host) = host_port(spec, addr)?;
                let path = path
                    .filter(|p| *p != "/")
                    .map(|p| p.trim_end_matches('/').to_owned());
                if path.as_deref().is_some_and(|p| p.contains(['?', '#', ' '])) {
                    return Err(BackendSpecError::PathWithQuery(spec.to_owned()));
                }
                return Ok(Backend::Ws {
                    secure,
                    authority,
                    host,
                    path,
                });
            }
        }
        if let Some(path) = spec.strip_prefix("token-file:") {
            if path.is_empty() {
                return Err(BackendSpecError::EmptyTokenPath);
            }
            let path = base.join(path);
            let file = crate::token_file::TokenFile::open(&path).map_err(|e| {
                BackendSpecError::TokenFile {
                    path: path.display().to_string(),
                    error: e.to_string(),
                }
            })?;
            return Ok(Backend::TokenFile(TokenSource(std::sync::Arc::new(file))));
        }
        if let Some(source) = spec.strip_prefix("token-redis:") {
            let redis = crate::targets::redis::RedisSource::new(source)
                .map_err(BackendSpecError::TokenSource)?;
            let shown = redis.shown().to_owned();
            return Ok(Backend::TokenRedis(Named(
                std::sync::Arc::new(redis),
                shown,
            )));
        }
        if let Some(path) = spec.strip_prefix("token-jwt:") {
            if path.is_empty() {
                return Err(BackendSpecError::EmptyTokenPath);
            }
            let path = base.join(path);
            let key =
                crate::targets::jwt::JwtKey::load(&path).map_err(BackendSpecError::TokenSource)?;
            return Ok(Backend::TokenJwt(Named(
                std::sync::Arc::new(key),
                path.display().to_string(),
            )));
        }
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(BackendSpecError::EmptyUnixPath);
            }
            return Ok(Backend::Unix(base.join(path)));
        }
        Err(BackendSpecError::UnknownScheme(spec.to_owned()))
    }

    /// Whether this is a proxy route's backend (the upgrade is forwarded).
    pub fn is_proxy(&self) -> bool {
        matches!(self, Backend::Ws { .. })
    }

    /// Whether connecting needs a TLS client config.
    pub fn uses_tls(&self) -> bool {
        matches!(self, Backend::Tls { .. } | Backend::Ws { secure: true, .. })
    }
}

/// Splits "host:port" (or "[v6]:port"), checking both; returns the authority and the bare host
/// (for SNI and certificate checks).
fn host_port(spec: &str, addr: &str) -> Result<(String, String), BackendSpecError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| BackendSpecError::NoPort(spec.to_owned()))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(BackendSpecError::NotHostPort {
            spec: spec.to_owned(),
            addr: addr.to_owned(),
        });
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok((addr.to_owned(), bare.to_owned()))
}

/// Frames sent to the client on a bridge route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MessageMode {
    #[default]
    Binary,
    Text,
}

/// A backend spec wsgate cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendSpecError {
    #[error("backend {0:?} needs a port, e.g. host:port")]
    NoPort(String),
    #[error("backend {spec:?}: {addr:?} is not host:port")]
    NotHostPort { spec: String, addr: String },
    #[error("backend {0:?}: the path may not have a query")]
    PathWithQuery(String),
    #[error("backend \"unix:\" needs a socket path")]
    EmptyUnixPath,
    #[error("backend \"token-file:\" and \"token-jwt:\" need a file or directory path")]
    EmptyTokenPath,
    #[error("backend token-file:{path}: cannot read it: {error}")]
    TokenFile { path: String, error: String },
    #[error("{0}")]
    TokenSource(String),
    #[error("backend {0:?} is not one of: echo, tcp://host:port, unix:/path, tls://host:port, ws://host:port/path, wss://host:port/path, token-file:PATH, token-redis:SOURCE, token-jwt:KEYFILE")]
    UnknownScheme(String),
}

/// The route requires a subprotocol and the client offered none of its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoAcceptableSubprotocol;

/// The TLS client config for a tls:// or wss:// backend (compared by identity).
#[derive(Debug, Clone)]
pub struct ClientTls(pub std::sync::Arc<tokio_rustls::rustls::ClientConfig>);

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ClientTls {}

/// A compiled `[[route]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Normalised prefix: starts with "/", no trailing "/" except for the root route.
    pub path: Arc<str>,
    /// The backend a connection attempt uses: the first of `backends`, or, while wsgate fails
    /// over, the one being tried.
    pub backend: Backend,
    /// Every backend of the route, in config order (one or more, all of one kind).
    pub backends: Vec<Backend>,
    /// How a session's backend is chosen among `backends`.
    pub balance: Balance,
    /// Connect failures in a row after which a backend is skipped for `eject_for`.
    pub eject_after: u32,
    pub eject_for: std::time::Duration,
    /// Allowed subprotocols; when not empty the client must offer one of them.
    pub subprotocols: Vec<String>,
    /// Allowed origins, lowercased; when not empty a present Origin header must be one.
    pub origins: Vec<String>,
    pub message: MessageMode,
    pub framing: Framing,
    /// Set for tls:// and wss:// backends.
    pub tls_client: Option<ClientTls>,
    /// Sessions and requests in progress on this route at once (none: no limit of its own).
    pub max_connections: Option<usize>,
    /// Bridge routes: a PROXY protocol header naming the client is written to the backend
    /// before anything else.
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// Plain GET and HEAD requests are answered from this directory (`static = "DIR"`).
    pub static_dir: Option<crate::files::StaticDir>,
    /// Checked before anything else is done for a request (`auth = { .. }`).
    pub auth: Option<crate::auth::Auth>,
    /// Bridge and echo routes answer permessage-deflate offers (default true).
    pub compression: bool,
    /// Set on a copy whose `backend` was looked up from a token source: that source as the
    /// config names it. Metrics and the balancer count the session under it, so what a token
    /// file names never becomes a label (their number is bounded by the config).
    pub looked_up_from: Option<Backend>,
}

/// How a bridge route maps messages to the backend's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// Payload bytes as they come; one message per backend read (the default).
    #[default]
    Stream,
    /// One message per line: each client message is written with a `\n` after it (unless it
    /// ends with one), the backend's output is split at `\n` into one message per line.
    Lines,
}

/// How a route with several backends picks one for a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// In turn (the default).
    #[default]
    RoundRobin,
    /// The first healthy one in config order; the others are spares.
    First,
    /// The one with the fewest open sessions.
    LeastConnections,
}

/// Which PROXY protocol header a bridge route sends its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProxyVersion {
    #[serde(rename = "v1")]
    V1,
    #[serde(rename = "v2")]
    V2,
}

impl Route {
    pub fn new(
        path: &str,
        backend: Backend,
        subprotocols: Vec<String>,
        origins: Vec<String>,
        message: MessageMode,
    ) -> Route {
        let trimmed = path.trim_end_matches('/');
        Route {
            path: if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed.into()
            },
            backends: vec![backend.clone()],
            backend,
            balance: Balance::RoundRobin,
            eject_after: 3,
            eject_for: std::time::Duration::from_secs(10),
            subprotocols,
            origins,
            message,
            framing: Framing::Stream,
            tls_client: None,
            max_connections: None,
            send_proxy_protocol: None,
            static_dir: None,
            auth: None,
            compression: true,
            looked_up_from: None,
        }
    }

    /// Whether this route's prefix covers `path` on whole segments ("/vnc" covers "/vnc" and
    /// "/vnc/x", not "/vncx").
    fn covers(&self, path: &str) -> bool {
        &*self.path == "/"
            || path
                .strip_prefix(&*self.path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Whether a request's Origin header is acceptable: no list, no header, or an exact
    /// (ASCII case-insensitive) match.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(_) if self.origins.is_empty() => true,
            Some(o) => self
                .origins
                .iter()
                .any(|a| a.eq_ignore_ascii_case(o.trim())),
        }
    }

    /// Picks the subprotocol: the first in the client's offer that the route allows.
    /// `Ok(None)` when the route has no list (nothing is echoed); `Err` when the route
    /// requires one and none offered matches.
    pub fn choose_subprotocol<'a>(
        &self,
        offered: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<String>, NoAcceptableSubprotocol> {
        if self.subprotocols.is_empty() {
            return Ok(None);
        }
        offered
            .into_iter()
            .find(|p| self.subprotocols.iter().any(|a| a == p))
            .map(|p| Some(p.to_owned()))
            .ok_or(NoAcceptableSubprotocol)
    }
}

/// Routes ordered so the longest prefix is tried first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        RouteTable { routes }
    }

    /// The route with the longest prefix covering `path` (the query is not part of it).
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.covers(path))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Route {
        Route::new(path, Backend::Echo, vec![], vec![], MessageMode::Binary)
    }

    #[test]
    fn longest_prefix_on_whole_segments() {
        let t = RouteTable::new(vec![route("/"), route("/vnc"), route("/vnc/admin/")]);
        assert_eq!(&*t.find("/vnc").unwrap().path, "/vnc");
        assert_eq!(&*t.find("/vnc/").unwrap().path, "/vnc");
        assert_eq!(&*t.find("/vnc/1").unwrap().path, "/vnc");
        assert_eq!(&*t.find("/vnc/admin").unwrap().path, "/vnc/admin");
        assert_eq!(&*t.find("/vnc/admin/x").unwrap().path, "/vnc/admin");
        assert_eq!(&*t.find("/vncx").unwrap().path, "/");
        let no_root = RouteTable::new(vec![route("/echo")]);
        assert!(no_root.find("/").is_none());
        assert!(no_root.find("/echoes").is_none());
    }

    #[test]
    fn subprotocol_is_first_client_offer_allowed() {
        let mut r = route("/");
        assert_eq!(r.choose_subprotocol(["a"]), Ok(None));
        r.subprotocols = vec!["binary".into(), "base64".into()];
        assert_eq!(
            r.choose_subprotocol(["x", "base64", "binary"]),
            Ok(Some("base64".into()))
        );
        assert_eq!(r.choose_subprotocol(["x"]), Err(NoAcceptableSubprotocol));
        assert_eq!(r.choose_subprotocol([]), Err(NoAcceptableSubprotocol));
    }

    #[test]
    fn origins() {
        let mut r = route("/");
        assert!(r.origin_allowed(Some("https://evil.example")));
        r.origins = vec!["https://example.com".into()];
        assert!(r.origin_allowed(None));
        assert!(r.origin_allowed(Some("https://EXAMPLE.com")));
        assert!(!r.origin_allowed(Some("https://example.com.evil")));
        assert!(!r.origin_allowed(Some("null")));
    }
}
