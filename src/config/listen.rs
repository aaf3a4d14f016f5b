//! `[[listen]]` entries: where clients connect (an address or a unix socket), TLS with its
//! files and ALPN, PROXY headers, plain-beside-TLS and HTTP/2.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::ConfigError;
use crate::tls::{SniCert, TlsFiles};

/// Where a listener listens: an IP address and port, or a unix socket's path
/// (`unix:/run/wsgate/ws.sock`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => addr.fmt(f),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The longest unix socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
const MAX_UNIX_PATH: usize = 107;

/// One `[[listen]]` entry.
#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: ListenAddr,
    /// Unix listeners: the socket file's permission bits (`mode = "0660"`); `None` leaves
    /// them to the umask.
    pub mode: Option<u32>,
    /// Set for `wss://` listeners: the files and the config built from them at load time.
    pub tls: Option<ListenerTls>,
    /// Connections start with a PROXY protocol header (v1 or v2) naming the client
    /// (default false).
    pub proxy_protocol: bool,
    /// A TLS listener that also takes plain connections on the same port, told apart by
    /// their first byte (websockify with `--cert` but without `--ssl-only`; default false).
    pub allow_plain: bool,
    /// HTTP/2 beside HTTP/1.1: offered by ALPN on TLS listeners (default there), taken with
    /// prior knowledge (h2c) on plain ones (default off there). WebSockets over it per
    /// RFC 8441.
    pub http2: bool,
}

#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub files: TlsFiles,
    pub server: Arc<tokio_rustls::rustls::ServerConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    addr: toml::Spanned<String>,
    mode: Option<toml::Spanned<String>>,
    tls: Option<toml::Spanned<RawTls>>,
    #[serde(default)]
    proxy_protocol: bool,
    allow_plain: Option<toml::Spanned<bool>>,
    http2: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    client_ca: Option<String>,
    #[serde(default)]
    sni: Vec<RawSni>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSni {
    names: Vec<String>,
    cert: String,
    key: String,
}

/// Validates the `[[listen]]` entries; the TLS files they read are added to `hidden`.
pub(super) fn parse(
    raw: &[RawListener],
    base: &Path,
    hidden: &mut Vec<PathBuf>,
    invalid: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<Vec<Listener>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            None,
            "no [[listen]] entry: add one, e.g. addr = \"127.0.0.1:8080\"".into(),
        ));
    }
    let mut listen = Vec::new();
    for l in raw {
        let addr = listen_addr(l.addr.get_ref(), base)
            .map_err(|m| invalid(Some(l.addr.span()), format!("listen.addr {m}")))?;
        let mode = match &l.mode {
            None => None,
            Some(m) if matches!(addr, ListenAddr::Unix(_)) => {
                Some(socket_mode(m.get_ref()).ok_or_else(|| {
                    invalid(
                        Some(m.span()),
                        format!(
                            "listen.mode {:?} is not octal permission bits like \"0660\"",
                            m.get_ref()
                        ),
                    )
                })?)
            }
            Some(m) => {
                return Err(invalid(
                    Some(m.span()),
                    "listen.mode is for unix-socket listeners (addr = \"unix:/path\")".into(),
                ))
            }
        };
        // Port 0 too: listeners are told apart (on reload, drain) by the address written
        // here, so two "127.0.0.1:0" would be one listener to wsgate and a stray socket.
        if listen.iter().any(|x: &Listener| x.addr == addr) {
            return Err(invalid(
                Some(l.addr.span()),
                format!("listen.addr {addr} is listed twice (for two listeners on free ports, give two addresses, e.g. 127.0.0.1:0 and 127.0.0.2:0)"),
            ));
        }
        // HTTP/2 is offered by ALPN on TLS listeners unless turned off.
        let http2 = l.http2.unwrap_or(l.tls.is_some());
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                let raw = t.get_ref();
                let files = TlsFiles {
                    cert: base.join(&raw.cert),
                    key: base.join(&raw.key),
                    client_ca: raw.client_ca.as_ref().map(|c| base.join(c)),
                    sni: raw
                        .sni
                        .iter()
                        .map(|s| SniCert {
                            names: s.names.clone(),
                            cert: base.join(&s.cert),
                            key: base.join(&s.key),
                        })
                        .collect(),
                };
                let server = crate::tls::server_config(&files, http2)
                    .map_err(|m| invalid(Some(t.span()), format!("listen.tls: {m}")))?;
                hidden.extend([files.cert.clone(), files.key.clone()]);
                hidden.extend(files.client_ca.clone());
                for sni in &files.sni {
                    hidden.extend([sni.cert.clone(), sni.key.clone()]);
                }
                Some(ListenerTls { files, server })
            }
        };
        let allow_plain = l.allow_plain.as_ref().is_some_and(|a| *a.get_ref());
        if allow_plain && tls.is_none() {
            return Err(invalid(
                l.allow_plain.as_ref().map(|a| a.span()),
                "listen.allow_plain is for listeners with tls".into(),
            ));
        }
        if allow_plain && tls.as_ref().is_some_and(|t| t.files.client_ca.is_some()) {
            return Err(invalid(
                l.allow_plain.as_ref().map(|a| a.span()),
                "listen.allow_plain with tls.client_ca would let plain clients in without a certificate: give one or the other".into(),
            ));
        }
        listen.push(Listener {
            addr,
            mode,
            http2,
            tls,
            proxy_protocol: l.proxy_protocol,
            allow_plain,
        });
    }
    Ok(listen)
}

/// A `[[listen]] addr`: `ip:port`, or `unix:PATH` (relative paths are taken from the config
/// file's folder).
fn listen_addr(text: &str, base: &Path) -> Result<ListenAddr, String> {
    let Some(path) = text.strip_prefix("unix:") else {
        return text
            .parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{text:?} is not ip:port or unix:PATH"));
    };
    if path.is_empty() || path.ends_with('/') {
        return Err(format!("{text:?}: give the socket file's path after unix:"));
    }
    if path.contains('\0') {
        return Err(format!("{text:?}: a socket path cannot hold a NUL byte"));
    }
    let path = base.join(path);
    let len = path.as_os_str().len();
    if len > MAX_UNIX_PATH {
        return Err(format!(
            "{text:?}: the socket path is {len} bytes long; the kernel takes at most {MAX_UNIX_PATH}"
        ));
    }
    Ok(ListenAddr::Unix(path))
}

/// `"0660"`, `"660"` or `"0o660"`: permission bits, nothing above `0777`.
fn socket_mode(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}
