//! The config behind websockify's command line: `wsgate [--web DIR] [--cert FILE [--key
//! FILE]] [--ssl-only] [--token-plugin TokenFile --token-source PATH] [--heartbeat SECS]
//! [[SOURCE_ADDR:]SOURCE_PORT] [TARGET_ADDR:TARGET_PORT]`.
//!
//! The command line is turned into TOML text, which is then loaded like any config file: a
//! command line and the file `wsgate --print-config` writes for it are the same config by
//! construction, and a websockify user moving to a config file starts from that text.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::{Config, ConfigError};

/// websockify's options as wsgate takes them (see the README's table for the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuickArgs {
    /// `[SOURCE_ADDR:]SOURCE_PORT`; a bare port listens on all interfaces. Unused with
    /// `unix_listen`.
    pub listen: String,
    /// `--unix-listen PATH`: a unix socket instead of a port.
    pub unix_listen: Option<String>,
    /// `--unix-listen-mode MODE`: its permission bits, octal (websockify's default: 600).
    pub unix_listen_mode: Option<String>,
    /// `TARGET_ADDR:TARGET_PORT`, or wsgate's own `tcp://`, `unix:`, `tls://`, `echo`.
    pub target: Option<String>,
    /// `--web DIR`: files served on plain GET/HEAD.
    pub web: Option<String>,
    /// `--cert FILE`: TLS certificate (with its key in the same file unless `key`).
    pub cert: Option<String>,
    pub key: Option<String>,
    /// `--ssl-only`: refuse plain connections (without it, a `--cert` listener takes both).
    pub ssl_only: bool,
    /// `--token-plugin … --token-source …` as the backend it stands for: `token-file:PATH`,
    /// `token-redis:SOURCE` or `token-jwt:KEYFILE`.
    pub token_source: Option<String>,
    /// `--heartbeat SECS`: ping the client after this many silent seconds.
    pub heartbeat: Option<u64>,
    /// `--ssl-target`: the target speaks TLS.
    pub ssl_target: bool,
    /// `--unix-target PATH`: the target is a unix socket.
    pub unix_target: Option<String>,
    /// `--verify-client` with `--cafile FILE`: clients must present a certificate from it.
    pub cafile: Option<String>,
    /// `--auth-plugin ClientCertCNAuth --auth-source "NAME …"`.
    pub cert_names: Vec<String>,
}

/// A command line wsgate cannot turn into a config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuickError {
    #[error("listen address {0:?} is not [SOURCE_ADDR:]SOURCE_PORT")]
    Listen(String),
    #[error("give a target (TARGET_ADDR:TARGET_PORT, --unix-target or --token-source), just one")]
    Target,
    #[error("{0}")]
    Other(&'static str),
}

impl QuickArgs {
    /// The config file this command line stands for.
    pub fn to_toml(&self) -> Result<String, QuickError> {
        let backend = match (&self.target, &self.unix_target, &self.token_source) {
            (Some(t), None, None) => target_spec(t, self.ssl_target),
            (None, Some(path), None) => format!("unix:{path}"),
            (None, None, Some(spec)) => spec.clone(),
            _ => return Err(QuickError::Target),
        };
        if self.ssl_only && self.cert.is_none() {
            return Err(QuickError::Other("--ssl-only needs --cert"));
        }
        if self.key.is_some() && self.cert.is_none() {
            return Err(QuickError::Other("--key needs --cert"));
        }
        if self.cafile.is_some() && self.cert.is_none() {
            return Err(QuickError::Other("--verify-client needs --cert"));
        }
        if !self.cert_names.is_empty() && self.cafile.is_none() {
            return Err(QuickError::Other(
                "--auth-plugin ClientCertCNAuth needs --verify-client and --cafile",
            ));
        }
        let mut toml = String::from("# Written by wsgate from a websockify command line.\n");
        toml += "[[listen]]\n";
        match &self.unix_listen {
            Some(path) => {
                toml += &format!("addr = {}\n", quote(&format!("unix:{path}")));
                let mode = self.unix_listen_mode.as_deref().unwrap_or("600");
                toml += &format!("mode = {}\n", quote(mode));
            }
            None => {
                let listen = listen_addr(&self.listen)?;
                toml += &format!("addr = {}\n", quote(&listen.to_string()));
            }
        }
        if let Some(cert) = &self.cert {
            let key = self.key.as_ref().unwrap_or(cert);
            toml += &format!("tls = {{ cert = {}, key = {}", quote(cert), quote(key));
            if let Some(ca) = &self.cafile {
                toml += &format!(", client_ca = {}", quote(ca));
            }
            toml += " }\n";
            if self.cafile.is_some() && !self.ssl_only {
                // No certificate, no session: plain ws:// would skip the client check.
                toml += "# --verify-client implies --ssl-only (plain ws:// has no client certificate)\n";
            } else if !self.ssl_only {
                toml += "allow_plain = true\n";
            }
        }
        if let Some(secs) = self.heartbeat {
            if secs == 0 {
                return Err(QuickError::Other("--heartbeat must be at least 1"));
            }
            toml += &format!("\n[limits]\nping_interval = \"{secs}s\"\n");
        }
        toml += "\n[[route]]\npath = \"/\"\n";
        toml += &format!("backend = {}\n", quote(&backend));
        if let Some(web) = &self.web {
            toml += &format!("static = {}\n", quote(web));
        }
        if !self.cert_names.is_empty() {
            let names: Vec<String> = self.cert_names.iter().map(|n| quote(n)).collect();
            toml += &format!("auth = {{ client_cert_names = [{}] }}\n", names.join(", "));
        }
        Ok(toml)
    }

    /// The config: [`QuickArgs::to_toml`] loaded with paths taken from the working directory.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let text = self.to_toml()?;
        Config::parse(&text, "command line", Path::new("."))
    }
}

/// websockify's `[SOURCE_ADDR:]SOURCE_PORT`: a bare port is every IPv4 interface; a name is
/// resolved once, here.
fn listen_addr(spec: &str) -> Result<SocketAddr, QuickError> {
    let bad = || QuickError::Listen(spec.to_owned());
    if let Ok(port) = spec.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = spec.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(bad)
}

/// `host:port` becomes `tcp://host:port` (`tls://` with `--ssl-target`); wsgate's own specs
/// pass as they are.
fn target_spec(target: &str, tls: bool) -> String {
    if target.contains("://") || target.starts_with("unix:") || target == "echo" {
        target.to_owned()
    } else if tls {
        format!("tls://{target}")
    } else {
        format!("tcp://{target}")
    }
}

/// A TOML basic string, which is also a JSON string (both take `\"`, `\\` and `\uXXXX`
/// escapes; control characters are escaped).
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        assert_eq!(
            listen_addr("6080").unwrap(),
            "0.0.0.0:6080".parse().unwrap()
        );
        assert_eq!(
            listen_addr("127.0.0.1:6080").unwrap(),
            "127.0.0.1:6080".parse().unwrap()
        );
        assert_eq!(
            listen_addr("[::1]:6080").unwrap(),
            "[::1]:6080".parse().unwrap()
        );
        assert_eq!(
            listen_addr("localhost:6080").unwrap().port(),
            6080,
            "a name resolves"
        );
        assert!(listen_addr("nope").is_err());
        assert!(listen_addr("1.2.3.4:99999").is_err());
    }

    #[test]
    fn quoting_survives_toml() {
        let odd = "a \"b\" \\c\u{1}";
        let parsed: toml::Table = toml::from_str(&format!("k = {}", quote(odd))).unwrap();
        assert_eq!(parsed["k"].as_str(), Some(odd));
    }

    #[test]
    fn one_target() {
        let args = |target: Option<&str>, token: Option<&str>| QuickArgs {
            listen: "6080".into(),
            target: target.map(Into::into),
            token_source: token.map(Into::into),
            ..QuickArgs::default()
        };
        assert_eq!(args(None, None).to_toml(), Err(QuickError::Target));
        assert_eq!(
            args(Some("h:1"), Some("t")).to_toml(),
            Err(QuickError::Target)
        );
        let toml = args(Some("localhost:5900"), None).to_toml().unwrap();
        assert!(toml.contains("addr = \"0.0.0.0:6080\""), "{toml}");
        assert!(
            toml.contains("backend = \"tcp://localhost:5900\""),
            "{toml}"
        );
    }
}
