//! `backend = "token-redis:SOURCE"`: websockify's `TokenRedis`. SOURCE is websockify's
//! `host[:port[:db[:password[:namespace]]]]` (empty fields take 6379 and db 0; a namespace `N`
//! means the key `N:TOKEN`, and a quoted namespace may hold colons) or a
//! `redis://[:password@]host[:port][/db]` URL. A key's value is, as websockify reads it, JSON
//! `{"host": "h:p"}` or plain `h:p`.
//!
//! Every session looks its token up (no cache: a change or a delete applies to the next
//! session), within `connect_timeout`. One multiplexed connection per source, made on first
//! use and re-made by the client crate when it breaks, so a burst of sessions shares it and
//! a Redis that comes back is used again without a restart. Neither tokens nor the password
//! reach a log line or a metric: the source is shown with its password starred.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{split_target, LookupError};

/// A Redis token source and its connection (made on first use).
pub struct RedisSource {
    /// As the config wrote it, the password starred.
    shown: String,
    client: redis::Client,
    namespace: Option<String>,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
}

impl std::fmt::Debug for RedisSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// The parts of a websockify source or URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceParts {
    /// A `redis://` URL for the client crate (password percent-encoded).
    pub url: String,
    pub namespace: Option<String>,
    /// The source as shown in logs and metric labels: the password starred.
    pub shown: String,
}

/// Parses websockify's `host[:port[:db[:password[:namespace]]]]` or a `redis://` URL.
pub fn parse_source(source: &str) -> Result<SourceParts, String> {
    if source.starts_with("redis://") || source.starts_with("rediss://") {
        if source.contains('#') {
            // The client crate reads `#insecure` (no certificate check) from the fragment.
            return Err("a Redis URL with a #fragment is refused (#insecure would skip the certificate check)".into());
        }
        let shown = match (source.find("://"), source.rfind('@')) {
            (Some(scheme), Some(at)) => {
                format!("{}://***@{}", &source[..scheme], &source[at + 1..])
            }
            _ => source.to_owned(),
        };
        redis::Client::open(source).map_err(|e| format!("{shown}: {e}"))?;
        return Ok(SourceParts {
            url: source.to_owned(),
            namespace: None,
            shown,
        });
    }
    // A bracketed IPv6 host first, then the colon-separated fields.
    let (host, rest) = match source.strip_prefix('[') {
        Some(v6) => {
            let (host, rest) = v6
                .split_once(']')
                .ok_or("an IPv6 host needs its closing ]")?;
            (format!("[{host}]"), rest.strip_prefix(':').unwrap_or(rest))
        }
        None => match source.split_once(':') {
            Some((host, rest)) => (host.to_owned(), rest),
            None => (source.to_owned(), ""),
        },
    };
    if host.is_empty() || host == "[]" {
        return Err("the source needs a host: host[:port[:db[:password[:namespace]]]]".into());
    }
    let mut fields = rest.splitn(4, ':');
    let port = match fields.next().unwrap_or("") {
        "" => 6379,
        p => p
            .parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number"))?,
    };
    let db = match fields.next().unwrap_or("") {
        "" => 0,
        d => d
            .parse::<u32>()
            .map_err(|_| format!("db {d:?} is not a number"))?,
    };
    let password = fields.next().filter(|p| !p.is_empty());
    let namespace = match fields.next().unwrap_or("") {
        "" => None,
        ns => Some(unquote(ns).to_owned()),
    };
    let auth = password.map_or(String::new(), |p| format!(":{}@", encode(p)));
    let shown = format!(
        "{host}:{port}:{db}:{}:{}",
        password.map_or("", |_| "***"),
        namespace.as_deref().unwrap_or("")
    );
    Ok(SourceParts {
        url: format!("redis://{auth}{host}:{port}/{db}"),
        namespace,
        shown,
    })
}

/// A namespace in double or single quotes (websockify lets one hold colons).
fn unquote(ns: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = ns.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    ns
}

/// Percent-encodes all but unreserved characters (for the password in a URL).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The target a key's value names: JSON `{"host": "h:p"}` or plain `h:p`, surrounding
/// whitespace ignored. `Err` says what is wrong with it (never what it holds).
pub fn parse_value(value: &[u8]) -> Result<String, &'static str> {
    let text = std::str::from_utf8(value).map_err(|_| "not UTF-8")?.trim();
    if text.starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|_| "not JSON though it starts with {")?;
        let host = json
            .get("host")
            .and_then(serde_json::Value::as_str)
            .ok_or("JSON without a \"host\" string")?;
        return split_target(host).ok_or("\"host\" is not host:port");
    }
    split_target(text).ok_or("not host:port")
}

impl RedisSource {
    pub fn new(source: &str) -> Result<RedisSource, String> {
        let parts = parse_source(source)?;
        let client =
            redis::Client::open(parts.url.as_str()).map_err(|e| format!("{}: {e}", parts.shown))?;
        Ok(RedisSource {
            shown: parts.shown,
            client,
            namespace: parts.namespace,
            connection: tokio::sync::Mutex::new(None),
        })
    }

    /// The source as logs and metric labels show it (password starred).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The connection, made on first use (one for every session of the source).
    async fn connection(&self, timeout: Duration) -> Result<ConnectionManager, LookupError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let made = tokio::time::timeout(
            timeout,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| LookupError::Unavailable("connecting to Redis timed out".into()))?
        .map_err(|e| LookupError::Unavailable(e.to_string()))?;
        *slot = Some(made.clone());
        Ok(made)
    }

    /// The target `token` maps to now, `None` for a token Redis does not hold. Bounded by
    /// `timeout` in all. Cancel-safe.
    pub async fn lookup(
        &self,
        token: &str,
        timeout: Duration,
    ) -> Result<Option<String>, LookupError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut connection = self.connection(timeout).await?;
        let key = match &self.namespace {
            Some(ns) => format!("{ns}:{token}"),
            None => token.to_owned(),
        };
        let value: Option<Vec<u8>> = tokio::time::timeout_at(
            deadline,
            redis::cmd("GET").arg(&key).query_async(&mut connection),
        )
        .await
        .map_err(|_| LookupError::Unavailable("Redis did not answer in time".into()))?
        .map_err(|e| LookupError::Unavailable(e.to_string()))?;
        match value {
            None => Ok(None),
            Some(v) => parse_value(&v).map(Some).map_err(LookupError::BadValue),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websockify_sources_and_urls() {
        let p = |s: &str| parse_source(s).unwrap();
        assert_eq!(p("redis.internal").url, "redis://redis.internal:6379/0");
        assert_eq!(p("r:6380").url, "redis://r:6380/0");
        assert_eq!(p("r::2").url, "redis://r:6379/2");
        let with_pw = p("r:::p@ss:w/rd");
        assert_eq!(with_pw.url, "redis://:p%40ss@r:6379/0");
        assert_eq!(with_pw.namespace.as_deref(), Some("w/rd"));
        assert!(!with_pw.shown.contains("p@ss"), "{}", with_pw.shown);
        let ns = p("r::::app");
        assert_eq!(
            (ns.url.as_str(), ns.namespace.as_deref()),
            ("redis://r:6379/0", Some("app"))
        );
        assert_eq!(p("r::::\"a:b:c\"").namespace.as_deref(), Some("a:b:c"));
        assert_eq!(p("r:6380:1:secret:ns").url, "redis://:secret@r:6380/1");
        assert_eq!(p("[::1]:6380").url, "redis://[::1]:6380/0");
        let url = p("redis://:hunter2@10.0.0.5:6390/3");
        assert_eq!(url.url, "redis://:hunter2@10.0.0.5:6390/3");
        assert_eq!(url.shown, "redis://***@10.0.0.5:6390/3");
        for bad in [
            "",
            ":6379",
            "r:port",
            "r:1:db",
            "[::1",
            "rediss://r:6380/#insecure",
        ] {
            assert!(parse_source(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_as_websockify_reads_them() {
        assert_eq!(parse_value(b"10.0.0.1:5900"), Ok("10.0.0.1:5900".into()));
        assert_eq!(parse_value(b" vm1.lan:5901\n"), Ok("vm1.lan:5901".into()));
        assert_eq!(
            parse_value(br#"{"host": "10.0.0.2:5902"}"#),
            Ok("10.0.0.2:5902".into())
        );
        assert_eq!(
            parse_value(br#"{"host":"[::1]:5903","x":1}"#),
            Ok("[::1]:5903".into())
        );
        for bad in [
            &b"nohost"[..],
            b"h:port",
            b"{\"host\": 5}",
            b"{\"h\":\"a:1\"}",
            b"{bad",
            b"\xff:1",
            b"",
        ] {
            assert!(parse_value(bad).is_err(), "{bad:?}");
        }
    }
}
