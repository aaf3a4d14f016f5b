//! RFC 6455 §4.2: is this request a valid opening handshake for this route, and what do we
//! answer? Pure: the server does the I/O.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Version};
use sha1::{Digest, Sha1};

use crate::route::Route;

/// The GUID every accept key is derived with (§1.3).
pub const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// A refused request: status, a one-line reason for the body, extra headers, and a fixed
/// label for metrics and logs (never taken from client input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub label: &'static str,
}

impl Rejection {
    pub fn new(status: StatusCode, label: &'static str, reason: impl Into<String>) -> Self {
        Rejection {
            status,
            reason: reason.into(),
            headers: Vec::new(),
            label,
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// An accepted handshake: what goes into the 101.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub accept: String,
    pub protocol: Option<String>,
}

/// Comma-separated tokens of every instance of a header, trimmed; values that are not
/// visible ASCII yield nothing (and so never match). The one place header lists are split.
pub fn header_tokens<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a request says a body follows its head (`Transfer-Encoding`, or a
/// `Content-Length` other than 0).
pub fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes().trim_ascii() != b"0")
}

/// Whether a header lists `token` (ASCII case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a HeaderValue>, ()> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => Ok(Some(v)),
        (Some(_), Some(_)) => Err(()),
    }
}

/// Checks a request against §4.2.1 and the route's rules, in the order of the refusal table
/// in docs/design.md.
pub fn check(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    route: &Route,
) -> Result<Accepted, Rejection> {
    use StatusCode as S;
    let bad = |label, reason: &str| Rejection::new(S::BAD_REQUEST, label, reason);
    if method != Method::GET {
        return Err(bad("method", "WebSocket handshake must use GET"));
    }
    if version != Version::HTTP_11 {
        return Err(bad("http_version", "WebSocket handshake needs HTTP/1.1"));
    }
    match single(headers, &header::HOST) {
        Ok(Some(h)) if !h.is_empty() => {}
        Ok(_) => return Err(bad("host", "missing Host header")),
        Err(()) => return Err(bad("host", "more than one Host header")),
    }
    if headers.contains_key("sec-websocket-key1") || headers.contains_key("sec-websocket-key2") {
        return Err(version_426(
            "hixie-76 WebSocket is not supported; use RFC 6455 (version 13)",
        ));
    }
    if !has_token(headers, &header::UPGRADE, "websocket") {
        return Err(Rejection::new(
            S::UPGRADE_REQUIRED,
            "not_upgrade",
            "this is a WebSocket endpoint: send Upgrade: websocket",
        )
        .with_header(header::UPGRADE, HeaderValue::from_static("websocket")));
    }
    if !has_token(headers, &header::CONNECTION, "upgrade") {
        return Err(bad(
            "connection",
            "Connection header lacks the upgrade token",
        ));
    }
    if declares_body(headers) {
        // Bytes after the head are WebSocket frames; a body would make them ambiguous.
        return Err(bad("body", "WebSocket handshake must not have a body"));
    }
    check_version(headers)?;
    let key = match single(headers, &header::SEC_WEBSOCKET_KEY) {
        Ok(Some(k)) => k.as_bytes().trim_ascii(),
        Ok(None) => return Err(bad("key", "missing Sec-WebSocket-Key")),
        Err(()) => return Err(bad("key", "more than one Sec-WebSocket-Key")),
    };
    if !BASE64.decode(key).is_ok_and(|raw| raw.len() == 16) {
        return Err(bad("key", "Sec-WebSocket-Key must be base64 of 16 bytes"));
    }
    let protocol = check_origin_and_protocol(headers, route)?;
    Ok(Accepted {
        accept: accept_key(key),
        protocol,
    })
}

/// The 426 that names the version wsgate speaks.
fn version_426(reason: &str) -> Rejection {
    Rejection::new(StatusCode::UPGRADE_REQUIRED, "version", reason).with_header(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    )
}

/// `Sec-WebSocket-Version: 13`, once.
fn check_version(headers: &HeaderMap) -> Result<(), Rejection> {
    match single(headers, &header::SEC_WEBSOCKET_VERSION) {
        Ok(Some(v)) if v.as_bytes().trim_ascii() == b"13" => Ok(()),
        Ok(None) => Err(version_426("missing Sec-WebSocket-Version (must be 13)")),
        _ => Err(version_426(
            "unsupported Sec-WebSocket-Version (must be 13)",
        )),
    }
}

/// The route's Origin rule (403), then the subprotocol chosen from the client's offer (400
/// when the route lists some and none is offered).
fn check_origin_and_protocol(
    headers: &HeaderMap,
    route: &Route,
) -> Result<Option<String>, Rejection> {
    let origin = match single(headers, &header::ORIGIN) {
        Ok(o) => o.map(|v| v.to_str().unwrap_or("\u{fffd}")),
        Err(()) => {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "origin",
                "more than one Origin header",
            ))
        }
    };
    if !route.origin_allowed(origin) {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "origin",
            "origin not allowed",
        ));
    }
    route
        .choose_subprotocol(header_tokens(headers, &header::SEC_WEBSOCKET_PROTOCOL))
        .map_err(|_| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "subprotocol",
                format!(
                    "no offered subprotocol is accepted; accepted: {}",
                    route.subprotocols.join(", ")
                ),
            )
        })
}

/// Checks an HTTP/2 extended CONNECT (RFC 8441 §4) against `route`, as [`check`] does an
/// HTTP/1.1 upgrade: the caller has seen `:method CONNECT` with `:protocol websocket`; there
/// is no key to answer (the stream is the connection), so `accept` is empty. Version 13,
/// Origin and the subprotocol are checked the same way, with the same answers.
pub fn check_h2(headers: &HeaderMap, route: &Route) -> Result<Accepted, Rejection> {
    check_version(headers)?;
    let protocol = check_origin_and_protocol(headers, route)?;
    Ok(Accepted {
        accept: String::new(),
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Backend, MessageMode};

    /// RFC 6455 §1.3's worked example.
    #[test]
    fn accept_key_matches_rfc_sample() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    /// Sample servers get the GUID wrong; a wrong GUID must not produce the RFC's answer.
    #[test]
    fn wrong_guid_in_accept_key_is_detected() {
        let mut sha = Sha1::new();
        sha.update(b"dGhlIHNhbXBsZSBub25jZQ==");
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B12");
        assert_ne!(
            BASE64.encode(sha.finalize()),
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ==")
        );
    }

    fn route() -> Route {
        Route::new(
            "/",
            Backend::Echo,
            vec!["binary".into()],
            vec!["https://ok.example".into()],
            MessageMode::Binary,
        )
    }

    fn good() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "x".parse().unwrap());
        h.insert(header::UPGRADE, "WebSocket".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        h.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "chat, binary".parse().unwrap(),
        );
        h
    }

    fn status(h: &HeaderMap) -> StatusCode {
        match check(&Method::GET, Version::HTTP_11, h, &route()) {
            Ok(_) => StatusCode::SWITCHING_PROTOCOLS,
            Err(r) => r.status,
        }
    }

    #[test]
    fn accepts_token_lists_case_insensitively() {
        let a = check(&Method::GET, Version::HTTP_11, &good(), &route()).unwrap();
        assert_eq!(a.protocol.as_deref(), Some("binary"));
    }

    #[test]
    fn each_rule_has_its_status() {
        let r = route();
        assert_eq!(
            check(&Method::POST, Version::HTTP_11, &good(), &r)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            check(&Method::GET, Version::HTTP_10, &good(), &r)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        type Case = (fn(&mut HeaderMap), StatusCode);
        let cases: Vec<Case> = vec![
            (
                |h| {
                    h.remove(header::HOST);
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                |h| {
                    h.remove(header::UPGRADE);
                },
                StatusCode::UPGRADE_REQUIRED,
            ),
            (
                |h| {
                    h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                |h| {
                    h.remove(header::SEC_WEBSOCKET_VERSION);
                },
                StatusCode::UPGRADE_REQUIRED,
            ),
            (
                |h| {
                    h.insert(header::SEC_WEBSOCKET_VERSION, "8".parse().unwrap());
                },
                StatusCode::UPGRADE_REQUIRED,
            ),
            (
                |h| {
                    h.remove(header::SEC_WEBSOCKET_KEY);
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                |h| {
                    h.insert(header::SEC_WEBSOCKET_KEY, "c2hvcnQ=".parse().unwrap());
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                |h| {
                    h.append(
                        header::SEC_WEBSOCKET_KEY,
                        "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
                    );
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                |h| {
                    h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
                },
                StatusCode::FORBIDDEN,
            ),
            (
                |h| {
                    h.insert(header::SEC_WEBSOCKET_PROTOCOL, "chat".parse().unwrap());
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                |h| {
                    h.insert(
                        "sec-websocket-key1",
                        "4 @1  46546xW%0l 1 5".parse().unwrap(),
                    );
                },
                StatusCode::UPGRADE_REQUIRED,
            ),
        ];
        for (i, (edit, want)) in cases.into_iter().enumerate() {
            let mut h = good();
            edit(&mut h);
            assert_eq!(status(&h), want, "case {i}");
        }
    }
}
