//! TOML configuration → a typed, validated [`Config`].
//!
//! Every key is known: an unknown key, a value of the wrong type or a value that does not parse
//! (a duration without a unit, a backend URL we cannot serve) is an error naming the line and
//! the key, and wsgate does not start with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

mod listen;
pub(crate) mod quick;
mod units;

use listen::RawListener;
pub use listen::{ListenAddr, Listener, ListenerTls};
pub use quick::{QuickArgs, QuickError};

pub use units::{is_token, parse_duration, parse_size};
use units::{Dur, Size};

use crate::auth::{Auth, BearerTokens, Htpasswd};
use crate::files::StaticDir;
use crate::forwarded::TrustedProxies;
use crate::route::{
    Backend, Balance, ClientTls, Framing, MessageMode, ProxyVersion, Route, RouteTable,
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<Listener>,
    /// `[admin] addr`: health, readiness and metrics; off when absent.
    pub admin: Option<SocketAddr>,
    /// `[admin] auth = { bearer = FILE }`: every admin path but `/healthz` and `/readyz`
    /// needs one of these tokens.
    pub admin_auth: Option<Arc<BearerTokens>>,
    pub limits: Limits,
    pub routes: RouteTable,
}

/// `[limits]`; each default is the one documented in docs/design.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest client message, all fragments together (default 16 MiB); bigger → close 1009.
    pub max_message_size: u64,
    /// TCP accept to complete request head (default 10 s).
    pub handshake_timeout: Duration,
    /// Backend connect (default 5 s); exceeded → 504.
    pub connect_timeout: Duration,
    /// Nothing received from the client for this long → close 1001 (default 5 min).
    pub idle_timeout: Duration,
    /// A client silent for this long is pinged (default 30 s).
    pub ping_interval: Duration,
    /// How long to wait for the peer's side of a close (default 5 s).
    pub close_timeout: Duration,
    /// Accepted client connections at once, handshaking ones included (default 10 000).
    pub max_connections: usize,
    /// On SIGTERM, how long sessions may go on before close 1001 (default 30 s).
    pub drain_timeout: Duration,
    /// After a response on a kept-alive connection (plain HTTP on proxy routes), how long
    /// the next request may take to start (default 60 s).
    pub keepalive_timeout: Duration,
    /// A request body or a response that makes no progress this long closes the connection,
    /// and a request body averaging under 1 KiB/s once this long has passed is cut (nginx's
    /// name; default 60 s).
    pub send_timeout: Duration,
    /// Connections from one client address at once (IPv6: per `per_ip_ipv6_prefix`; default
    /// off); over → 503.
    pub max_connections_per_ip: Option<usize>,
    /// Handshakes (requests) one client address may start per second, on average (default
    /// off); over → 429.
    pub handshakes_per_ip_per_second: Option<u32>,
    /// How many handshakes one client address may start at once before the rate applies
    /// (default: the rate).
    pub handshakes_per_ip_burst: Option<u32>,
    /// IPv6 clients are limited per network of this prefix length (default 64).
    pub per_ip_ipv6_prefix: u8,
    /// Peers whose X-Forwarded-For / Forwarded is believed (default: none).
    pub trusted_proxies: TrustedProxies,
    /// Bytes all sessions together may hold as whole messages (the echo route's buffers;
    /// default 256 MiB); a message that would go over gets close 1013. Fixed at start.
    pub message_buffer_budget: u64,
    /// permessage-deflate: the window wsgate compresses with and asks clients to keep to
    /// (9–15, default 15), whether clients keep their context between messages (default
    /// false: nothing is held while a session is idle), and the smallest message to the
    /// client worth compressing (default 64 bytes).
    pub compression_window_bits: u8,
    pub compression_context_takeover: bool,
    pub compression_min_size: u64,
    /// HTTP/2: streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS;
    /// default 100).
    pub max_streams_per_connection: u32,
}

impl Limits {
    /// How permessage-deflate offers are answered.
    pub fn deflate(&self) -> crate::protocol::deflate::DeflateConfig {
        crate::protocol::deflate::DeflateConfig {
            window_bits: self.compression_window_bits,
            context_takeover: self.compression_context_takeover,
            min_size: usize::try_from(self.compression_min_size).unwrap_or(usize::MAX),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 16 << 20,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            ping_interval: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            message_buffer_budget: 256 << 20,
            keepalive_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            trusted_proxies: TrustedProxies::default(),
            max_connections_per_ip: None,
            handshakes_per_ip_per_second: None,
            handshakes_per_ip_burst: None,
            per_ip_ipv6_prefix: 64,
            compression_window_bits: 15,
            compression_context_takeover: false,
            compression_min_size: 64,
            max_streams_per_connection: 100,
        }
    }
}

/// A config error, with the line it is about when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}{}: {message}", line.as_ref().map(|(n, text)| format!(" line {n} (`{text}`)")).unwrap_or_default())]
    Invalid {
        file: String,
        line: Option<(usize, String)>,
        message: String,
    },
    /// Quick mode (websockify's command line) that makes no config.
    #[error(transparent)]
    Quick(#[from] QuickError),
}

// ---- raw TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: Vec<RawListener>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    route: Vec<RawRoute>,
    admin: Option<RawAdmin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    addr: toml::Spanned<String>,
    auth: Option<toml::Spanned<RawAdminAuth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminAuth {
    bearer: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_size: Option<Size>,
    handshake_timeout: Option<Dur>,
    connect_timeout: Option<Dur>,
    idle_timeout: Option<Dur>,
    ping_interval: Option<Dur>,
    close_timeout: Option<Dur>,
    max_connections: Option<usize>,
    drain_timeout: Option<Dur>,
    message_buffer_budget: Option<Size>,
    keepalive_timeout: Option<Dur>,
    send_timeout: Option<Dur>,
    #[serde(default)]
    trusted_proxies: Vec<toml::Spanned<String>>,
    max_connections_per_ip: Option<usize>,
    handshakes_per_ip_per_second: Option<u32>,
    handshakes_per_ip_burst: Option<u32>,
    per_ip_ipv6_prefix: Option<u8>,
    compression_window_bits: Option<toml::Spanned<u8>>,
    compression_context_takeover: Option<bool>,
    compression_min_size: Option<Size>,
    max_streams_per_connection: Option<toml::Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: toml::Spanned<String>,
    backend: toml::Spanned<RawBackends>,
    #[serde(default)]
    balance: Balance,
    framing: Option<toml::Spanned<Framing>>,
    eject_after: Option<toml::Spanned<u32>>,
    eject_for: Option<Dur>,
    #[serde(default)]
    subprotocols: Vec<toml::Spanned<String>>,
    #[serde(default)]
    origins: Vec<toml::Spanned<String>>,
    #[serde(default)]
    message: MessageMode,
    /// CA bundle for tls:// and wss:// backends (system roots when absent).
    ca: Option<toml::Spanned<String>>,
    max_connections: Option<toml::Spanned<usize>>,
    send_proxy_protocol: Option<toml::Spanned<ProxyVersion>>,
    /// Directory plain GET/HEAD requests are served from.
    #[serde(rename = "static")]
    static_dir: Option<toml::Spanned<String>>,
    /// permessage-deflate on bridge and echo routes (default true).
    compression: Option<toml::Spanned<bool>>,
    auth: Option<toml::Spanned<RawAuth>>,
}

/// `auth = { basic = FILE }`, `{ bearer = FILE }` or `{ client_cert_names = [..] }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    basic: Option<String>,
    bearer: Option<String>,
    client_cert_names: Option<Vec<String>>,
}

/// `backend = "tcp://…"` or `backend = ["tcp://…", "tcp://…"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawBackends {
    One(String),
    Many(Vec<String>),
}

impl Config {
    /// Reads and validates a config file; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), base)
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let invalid =
            |span: Option<std::ops::Range<usize>>, message: String| ConfigError::Invalid {
                file: file.to_owned(),
                line: span.map(|s| line_of(text, s.start)),
                message,
            };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            invalid(e.span(), message)
        })?;

        // Files wsgate reads itself: never served by a static route.
        let mut hidden = vec![PathBuf::from(file)];
        let listen = listen::parse(&raw.listen, base, &mut hidden, &invalid)?;

        let admin = match &raw.admin {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a.addr.get_ref().parse().map_err(|_| {
                    invalid(
                        Some(a.addr.span()),
                        format!("admin.addr {:?} is not ip:port", a.addr.get_ref()),
                    )
                })?;
                if addr.port() != 0 && listen.iter().any(|l| l.addr == ListenAddr::Tcp(addr)) {
                    return Err(invalid(
                        Some(a.addr.span()),
                        format!("admin.addr {addr} is also a [[listen]] address"),
                    ));
                }
                Some(addr)
            }
        };

        let admin_auth = match raw.admin.as_ref().and_then(|a| a.auth.as_ref()) {
            None => None,
            Some(auth) => {
                let path = base.join(&auth.get_ref().bearer);
                let tokens = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|bytes| {
                        BearerTokens::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
                    })
                    .map_err(|m| invalid(Some(auth.span()), format!("admin.auth: {m}")))?;
                hidden.push(path);
                Some(Arc::new(tokens))
            }
        };

        let d = Limits::default();
        let r = raw.limits;
        let mut trusted = TrustedProxies::default();
        for net in &r.trusted_proxies {
            let text = net.get_ref().trim();
            if text == "unix:" {
                trusted.unix = true;
                continue;
            }
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            trusted.nets.push(parsed.map_err(|_| {
                invalid(
                    Some(net.span()),
                    format!(
                        "limits.trusted_proxies: {text:?} is not a network like \"10.0.0.0/8\", an address or \"unix:\""
                    ),
                )
            })?);
        }
        let limits = Limits {
            max_message_size: r.max_message_size.map_or(d.max_message_size, |s| s.0),
            handshake_timeout: r.handshake_timeout.map_or(d.handshake_timeout, |x| x.0),
            connect_timeout: r.connect_timeout.map_or(d.connect_timeout, |x| x.0),
            idle_timeout: r.idle_timeout.map_or(d.idle_timeout, |x| x.0),
            ping_interval: r.ping_interval.map_or(d.ping_interval, |x| x.0),
            close_timeout: r.close_timeout.map_or(d.close_timeout, |x| x.0),
            max_connections: r.max_connections.unwrap_or(d.max_connections),
            drain_timeout: r.drain_timeout.map_or(d.drain_timeout, |x| x.0),
            message_buffer_budget: r
                .message_buffer_budget
                .map_or(d.message_buffer_budget, |x| x.0),
            keepalive_timeout: r.keepalive_timeout.map_or(d.keepalive_timeout, |x| x.0),
            send_timeout: r.send_timeout.map_or(d.send_timeout, |x| x.0),
            trusted_proxies: trusted,
            max_connections_per_ip: r.max_connections_per_ip,
            handshakes_per_ip_per_second: r.handshakes_per_ip_per_second,
            handshakes_per_ip_burst: r.handshakes_per_ip_burst,
            per_ip_ipv6_prefix: r.per_ip_ipv6_prefix.unwrap_or(d.per_ip_ipv6_prefix),
            compression_window_bits: r
                .compression_window_bits
                .as_ref()
                .map_or(d.compression_window_bits, |b| *b.get_ref()),
            compression_context_takeover: r
                .compression_context_takeover
                .unwrap_or(d.compression_context_takeover),
            compression_min_size: r
                .compression_min_size
                .map_or(d.compression_min_size, |x| x.0),
            max_streams_per_connection: match &r.max_streams_per_connection {
                None => d.max_streams_per_connection,
                Some(n) if *n.get_ref() == 0 => {
                    return Err(invalid(
                        Some(n.span()),
                        "limits.max_streams_per_connection must be at least 1".into(),
                    ))
                }
                Some(n) => *n.get_ref(),
            },
        };
        if let Some(bits) = &r.compression_window_bits {
            if !(9..=15).contains(bits.get_ref()) {
                return Err(invalid(
                    Some(bits.span()),
                    "limits.compression_window_bits must be 9 to 15".into(),
                ));
            }
        }
        for (key, value) in [
            (
                "max_connections_per_ip",
                limits.max_connections_per_ip.map(|v| v as u64),
            ),
            (
                "handshakes_per_ip_per_second",
                limits.handshakes_per_ip_per_second.map(u64::from),
            ),
            (
                "handshakes_per_ip_burst",
                limits.handshakes_per_ip_burst.map(u64::from),
            ),
        ] {
            if value == Some(0) {
                return Err(invalid(
                    None,
                    format!("limits.{key} must be at least 1 (leave it out to turn it off)"),
                ));
            }
        }
        if limits.per_ip_ipv6_prefix > 128 {
            return Err(invalid(
                None,
                "limits.per_ip_ipv6_prefix must be 0 to 128".into(),
            ));
        }
        for (key, value) in [
            ("handshake_timeout", limits.handshake_timeout),
            ("connect_timeout", limits.connect_timeout),
            ("idle_timeout", limits.idle_timeout),
            ("ping_interval", limits.ping_interval),
            ("close_timeout", limits.close_timeout),
            ("keepalive_timeout", limits.keepalive_timeout),
            ("send_timeout", limits.send_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(
                    None,
                    format!("limits.{key} must be more than zero"),
                ));
            }
        }
        if limits.message_buffer_budget < limits.max_message_size {
            return Err(invalid(
                None,
                "limits.message_buffer_budget must be at least max_message_size".into(),
            ));
        }
        if limits.max_connections == 0 {
            return Err(invalid(
                None,
                "limits.max_connections must be at least 1".into(),
            ));
        }

        if raw.route.is_empty() {
            return Err(invalid(None, "no [[route]] entry: add one, e.g. path = \"/\" and backend = \"tcp://127.0.0.1:5900\"".into()));
        }
        let mut routes = Vec::new();
        let mut static_dirs = Vec::new();
        for r in raw.route {
            let path = r.path.get_ref();
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                return Err(invalid(
                    Some(r.path.span()),
                    format!("route.path {path:?} must start with / and have no query"),
                ));
            }
            let specs = match r.backend.get_ref() {
                RawBackends::One(spec) => vec![spec.clone()],
                RawBackends::Many(specs) => specs.clone(),
            };
            if specs.is_empty() {
                return Err(invalid(
                    Some(r.backend.span()),
                    "route.backend: the list is empty".into(),
                ));
            }
            let mut backends = Vec::new();
            for spec in &specs {
                let b = Backend::parse(spec, base)
                    .map_err(|m| invalid(Some(r.backend.span()), format!("route.backend: {m}")))?;
                let alone = |b: &Backend| {
                    matches!(
                        b,
                        Backend::Echo
                            | Backend::TokenFile(_)
                            | Backend::TokenRedis(_)
                            | Backend::TokenJwt(_)
                    )
                };
                let same_kind = backends.first().map_or(true, |first: &Backend| {
                    first.is_proxy() == b.is_proxy() && !alone(first) && !alone(&b)
                });
                if !same_kind {
                    return Err(invalid(
                        Some(r.backend.span()),
                        "route.backend: a list holds bridge backends (tcp, unix, tls) or ws apps (ws, wss), not both, and no echo or token source".into(),
                    ));
                }
                match &b {
                    Backend::TokenFile(t) => hidden.push(t.0.source().to_owned()),
                    Backend::TokenJwt(key) => hidden.push(PathBuf::from(&key.1)),
                    _ => {}
                }
                backends.push(b);
            }
            let backend = backends[0].clone();
            let mut subprotocols = Vec::new();
            for p in &r.subprotocols {
                if !is_token(p.get_ref()) {
                    return Err(invalid(
                        Some(p.span()),
                        format!("route.subprotocols: {:?} is not a valid token", p.get_ref()),
                    ));
                }
                subprotocols.push(p.get_ref().clone());
            }
            let mut origins = Vec::new();
            for o in &r.origins {
                let v = o.get_ref();
                if v.is_empty() || v.contains(char::is_whitespace) || v.ends_with('/') {
                    return Err(invalid(
                        Some(o.span()),
                        format!(
                            "route.origins: {v:?} is not an origin like \"https://example.com\""
                        ),
                    ));
                }
                origins.push(v.to_ascii_lowercase());
            }
            let mut route = Route::new(path, backend, subprotocols, origins, r.message);
            route.backends = backends;
            if let Some(framing) = &r.framing {
                if matches!(route.backend, Backend::Echo) || route.backend.is_proxy() {
                    return Err(invalid(
                        Some(framing.span()),
                        "route.framing is for tcp://, unix: and tls:// backends".into(),
                    ));
                }
                route.framing = *framing.get_ref();
            }
            route.balance = r.balance;
            if let Some(n) = &r.eject_after {
                if *n.get_ref() == 0 {
                    return Err(invalid(
                        Some(n.span()),
                        "route.eject_after must be at least 1".into(),
                    ));
                }
                route.eject_after = *n.get_ref();
            }
            if let Some(d) = &r.eject_for {
                route.eject_for = d.0;
            }
            if let Some(max) = &r.max_connections {
                if *max.get_ref() == 0 {
                    return Err(invalid(
                        Some(max.span()),
                        "route.max_connections must be at least 1".into(),
                    ));
                }
                route.max_connections = Some(*max.get_ref());
            }
            if let Some(version) = &r.send_proxy_protocol {
                if matches!(route.backend, Backend::Echo) || route.backend.is_proxy() {
                    return Err(invalid(
                        Some(version.span()),
                        "route.send_proxy_protocol is for tcp://, unix: and tls:// backends".into(),
                    ));
                }
                route.send_proxy_protocol = Some(*version.get_ref());
            }
            match (&r.ca, route.backends.iter().any(Backend::uses_tls)) {
                (Some(ca), false) => {
                    return Err(invalid(
                        Some(ca.span()),
                        "route.ca is only for tls:// and wss:// backends".into(),
                    ))
                }
                (ca, true) => {
                    let ca_path = ca.as_ref().map(|c| base.join(c.get_ref()));
                    let client = crate::tls::client_config(ca_path.as_deref()).map_err(|m| {
                        invalid(
                            ca.as_ref().map(|c| c.span()).or(Some(r.backend.span())),
                            format!("route: {m}"),
                        )
                    })?;
                    route.tls_client = Some(ClientTls(client));
                }
                (None, false) => {}
            }
            if let Some(dir) = &r.static_dir {
                if route.backend.is_proxy() {
                    return Err(invalid(
                        Some(dir.span()),
                        "route.static is for bridge and echo routes (a ws app serves its own pages)".into(),
                    ));
                }
                static_dirs.push((routes.len(), dir.clone()));
            }
            if let Some(compression) = &r.compression {
                if route.backend.is_proxy() {
                    return Err(invalid(
                        Some(compression.span()),
                        "route.compression is for bridge and echo routes (a proxy route passes the app's choice through)".into(),
                    ));
                }
                route.compression = *compression.get_ref();
            }
            if let Some(auth) = &r.auth {
                let (a, files) = load_auth(auth.get_ref(), base, &listen)
                    .map_err(|m| invalid(Some(auth.span()), format!("route.auth: {m}")))?;
                hidden.extend(files);
                route.auth = Some(a);
            }
            if routes.iter().any(|x: &Route| x.path == route.path) {
                return Err(invalid(
                    Some(r.path.span()),
                    format!("route.path {:?} is listed twice", route.path),
                ));
            }
            routes.push(route);
        }
        for (i, dir) in static_dirs {
            let path = base.join(dir.get_ref());
            let served = StaticDir::new(&path, &hidden).map_err(|e| {
                invalid(
                    Some(dir.span()),
                    format!("route.static: {}: {e}", path.display()),
                )
            })?;
            routes[i].static_dir = Some(served);
        }
        Ok(Config {
            listen,
            admin,
            admin_auth,
            limits,
            routes: RouteTable::new(routes),
        })
    }
}

/// A route's auth from its table, with the files it read (never served by a static route).
fn load_auth(
    raw: &RawAuth,
    base: &Path,
    listeners: &[Listener],
) -> Result<(Auth, Vec<PathBuf>), String> {
    let read = |file: &str| {
        let path = base.join(file);
        std::fs::read(&path)
            .map(|text| (text, path.clone()))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    match (&raw.basic, &raw.bearer, &raw.client_cert_names) {
        (Some(file), None, None) => {
            let (text, path) = read(file)?;
            let users = Htpasswd::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok((Auth::Basic(Arc::new(users)), vec![path]))
        }
        (None, Some(file), None) => {
            let (text, path) = read(file)?;
            let tokens =
                BearerTokens::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok((Auth::Bearer(Arc::new(tokens)), vec![path]))
        }
        (None, None, Some(names)) => {
            if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
                return Err("client_cert_names needs at least one name, none empty".into());
            }
            let mtls = listeners
                .iter()
                .any(|l| l.tls.as_ref().is_some_and(|t| t.files.client_ca.is_some()));
            if !mtls {
                return Err(
                    "client_cert_names needs a [[listen]] with tls.client_ca (mTLS)".into(),
                );
            }
            Ok((Auth::ClientCertNames(names.clone()), Vec::new()))
        }
        _ => {
            Err("give exactly one of basic = FILE, bearer = FILE, client_cert_names = [..]".into())
        }
    }
}

/// 1-based line number of byte `offset` in `text`, with that line's text.
fn line_of(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let n = text[..offset].matches('\n').count() + 1;
    let line = text.lines().nth(n - 1).unwrap_or("").trim().to_owned();
    (n, line)
}

#[cfg(test)]
mod tests;
