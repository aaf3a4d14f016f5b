//! The pure half of proxy routes: the request sent to the app (hop-by-hop headers dropped,
//! X-Forwarded-For/-Proto/-Host added, the path mapped), the check of the app's 101, and the
//! headers of an app's answer passed back to the client.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri};

use crate::forwarded::forwarded_for;
use crate::protocol::handshake::{accept_key, header_tokens};
use crate::route::{Backend, Route};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus those the
/// Connection header names. (Names, not strings: a string is parsed into a name again on
/// every lookup.)
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];
const FORWARDED: HeaderName = header::FORWARDED;
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = header_tokens(headers, &header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The path to ask the app for: the request's own path when the backend URL has none (as
/// nginx's `proxy_pass` without a URI), else the route prefix replaced by the backend's path.
fn backend_path(route: &Route, uri: &Uri) -> String {
    let path = uri.path();
    let mapped = match &route.backend {
        Backend::Ws {
            path: Some(base), ..
        } => {
            let rest = if &*route.path == "/" {
                path
            } else {
                path.strip_prefix(&*route.path).unwrap_or(path)
            };
            match (base.as_str(), rest) {
                (b, "") => b.to_owned(),
                (b, r) if r.starts_with('/') => format!("{b}{r}"),
                (b, r) => format!("{b}/{r}"),
            }
        }
        _ => path.to_owned(),
    };
    match uri.query() {
        Some(q) => format!("{mapped}?{q}"),
        None => mapped,
    }
}

/// Builds the request sent to the app from the client's request head (`head`'s body is
/// not touched, so the client's request itself can be passed). `peer_trusted`: the direct peer
/// is a trusted proxy, so its X-Forwarded-For chain is kept and extended and what it says of
/// the original request (X-Forwarded-Proto/-Host, `Forwarded`, X-Real-IP) is passed on as it
/// said it, as nginx and Envoy do behind a trusted balancer. From anyone else every such
/// header is dropped and replaced by what wsgate saw itself.
pub(crate) fn backend_request<T, B>(
    head: &Request<T>,
    body: B,
    route: &Route,
    peer: SocketAddr,
    peer_trusted: bool,
    client_tls: bool,
    upgrade: bool,
) -> Request<B> {
    let Backend::Ws { authority, .. } = &route.backend else {
        unreachable!("only proxy routes forward requests");
    };
    let mut headers = head.headers().clone();
    // Room for what is added below (Host, the forwarding headers, the upgrade's), so the map
    // is not grown and rehashed while they go in.
    headers.reserve(8);
    strip_hop_by_hop(&mut headers);
    let original_host = head.headers().get(header::HOST).cloned();
    // HTTP/2 may split Cookie into one field per cookie; HTTP/1.1 wants one (RFC 9113
    // §8.2.3).
    if headers.get_all(header::COOKIE).iter().count() > 1 {
        let joined: Vec<&[u8]> = head
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            headers.insert(header::COOKIE, v);
        }
    }
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, host);
    }
    let chain = forwarded_for(peer.ip(), head.headers(), peer_trusted);
    let chain = HeaderValue::from_str(&chain).ok();
    if !peer_trusted {
        // Its own claims about earlier hops are not passed on: every X-Forwarded-* header,
        // Forwarded and X-Real-IP go, and wsgate says what it saw (from an untrusted peer the
        // chain is the peer alone).
        let claimed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().starts_with("x-forwarded-"))
            .cloned()
            .collect();
        for name in claimed {
            headers.remove(name);
        }
        headers.remove(FORWARDED);
        if let Some(v) = &chain {
            headers.insert(X_REAL_IP, v.clone());
        }
    }
    if let Some(v) = chain {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if client_tls { "https" } else { "http" }),
        );
    }
    if !headers.contains_key(X_FORWARDED_HOST) {
        if let Some(h) = original_host {
            headers.insert(X_FORWARDED_HOST, h);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let mut request = Request::new(body);
    // An HTTP/2 WebSocket's CONNECT is an HTTP/1.1 GET upgrade to the app (as HAProxy and
    // Envoy translate it).
    *request.method_mut() = match upgrade {
        true => hyper::Method::GET,
        false => head.method().clone(),
    };
    *request.uri_mut() = backend_path(route, head.uri())
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    *request.headers_mut() = headers;
    request
}

/// What the client's 101 carries over from the app's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackendAccept {
    pub protocol: Option<HeaderValue>,
    pub extensions: Option<HeaderValue>,
}

/// Checks the app's 101: the accept key for the client's key, and a subprotocol (if any)
/// that the client offered and the route allows.
pub(crate) fn check_backend_101(
    status: StatusCode,
    headers: &HeaderMap,
    client_key: &[u8],
    offered: &[String],
    route: &Route,
) -> Result<BackendAccept, &'static str> {
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err("backend did not switch protocols");
    }
    let upgrade_ok = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if !upgrade_ok {
        return Err("backend 101 without Upgrade: websocket");
    }
    let accept = headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(HeaderValue::as_bytes);
    if accept != Some(accept_key(client_key).as_bytes()) {
        return Err("backend answered with a wrong Sec-WebSocket-Accept");
    }
    let protocol = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
    if let Some(p) = &protocol {
        let p = p.to_str().unwrap_or("").trim();
        let allowed = route.subprotocols.is_empty() || route.subprotocols.iter().any(|a| a == p);
        if !offered.iter().any(|o| o == p) || !allowed {
            return Err("backend chose a subprotocol that was not offered or is not allowed");
        }
    } else if !route.subprotocols.is_empty() {
        return Err("backend chose no subprotocol though the route requires one");
    }
    Ok(BackendAccept {
        protocol,
        extensions: headers.get(header::SEC_WEBSOCKET_EXTENSIONS).cloned(),
    })
}

/// Headers of an app's response passed through to the client (hop-by-hop ones dropped).
pub(crate) fn passthrough_headers(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::MessageMode;

    fn route(path: &str, backend: &str, protocols: &[&str]) -> Route {
        Route::new(
            path,
            Backend::parse(backend, std::path::Path::new("/")).unwrap(),
            protocols.iter().map(|p| p.to_string()).collect(),
            vec![],
            MessageMode::Binary,
        )
    }

    #[test]
    fn paths_map_like_nginx_proxy_pass() {
        let uri: Uri = "/app/socket?room=1".parse().unwrap();
        assert_eq!(
            backend_path(&route("/app", "ws://h:1", &[]), &uri),
            "/app/socket?room=1"
        );
        assert_eq!(
            backend_path(&route("/app", "ws://h:1/ws", &[]), &uri),
            "/ws/socket?room=1"
        );
        let bare: Uri = "/app".parse().unwrap();
        assert_eq!(
            backend_path(&route("/app", "ws://h:1/ws", &[]), &bare),
            "/ws"
        );
    }

    #[test]
    fn forwarded_request_drops_hop_by_hop_and_adds_forwarded_headers() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "public.example")
            .header("connection", "keep-alive, Upgrade, x-secret")
            .header("x-secret", "hop")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", "chat")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        let r = route("/", "ws://127.0.0.1:3000", &[]);
        let out = backend_request(
            &req,
            (),
            &r,
            "192.0.2.7:5555".parse().unwrap(),
            true,
            true,
            true,
        );
        let h = out.headers();
        assert_eq!(h["host"], "127.0.0.1:3000");
        assert!(h.get("x-secret").is_none());
        assert_eq!(h["connection"], "Upgrade");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "public.example");
        assert_eq!(h["sec-websocket-protocol"], "chat");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    }

    /// Regression: a TLS-terminating balancer's X-Forwarded-Proto was overwritten (the app
    /// saw `http`), and an untrusted client's X-Real-IP and X-Forwarded-Host passed through.
    #[test]
    fn what_a_trusted_proxy_says_is_kept_and_anyone_elses_claims_are_replaced() {
        let claims = || {
            Request::builder()
                .uri("/x")
                .header("host", "internal:8080")
                .header("x-forwarded-for", "10.0.0.1")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "public.example")
                .header("x-forwarded-port", "443")
                .header("forwarded", "for=10.0.0.1;proto=https;host=public.example")
                .header("x-real-ip", "10.0.0.1")
                .body(())
                .unwrap()
        };
        let r = route("/", "ws://127.0.0.1:3000", &[]);
        let peer = "192.0.2.7:5555".parse().unwrap();
        let trusted = backend_request(&claims(), (), &r, peer, true, false, false);
        let h = trusted.headers();
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "public.example");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.1;proto=https;host=public.example"
        );
        assert_eq!(h["x-real-ip"], "10.0.0.1");

        let untrusted = backend_request(&claims(), (), &r, peer, false, false, false);
        let h = untrusted.headers();
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "internal:8080");
        assert!(h.get("x-forwarded-port").is_none());
        assert!(h.get("forwarded").is_none());
        assert_eq!(h["x-real-ip"], "192.0.2.7");
    }

    #[test]
    fn backend_101_is_checked() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let r = route("/", "ws://h:1", &[]);
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        assert!(check_backend_101(StatusCode::SWITCHING_PROTOCOLS, &h, key, &[], &r).is_ok());
        let mut wrong = h.clone();
        wrong.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        );
        assert!(check_backend_101(StatusCode::SWITCHING_PROTOCOLS, &wrong, key, &[], &r).is_err());
        let mut proto = h.clone();
        proto.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("evil"),
        );
        assert!(check_backend_101(
            StatusCode::SWITCHING_PROTOCOLS,
            &proto,
            key,
            &["chat".into()],
            &r
        )
        .is_err());
        proto.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat"),
        );
        assert!(check_backend_101(
            StatusCode::SWITCHING_PROTOCOLS,
            &proto,
            key,
            &["chat".into()],
            &r
        )
        .is_ok());
        let strict = route("/", "ws://h:1", &["binary"]);
        assert!(check_backend_101(
            StatusCode::SWITCHING_PROTOCOLS,
            &proto,
            key,
            &["chat".into()],
            &strict
        )
        .is_err());
    }
}

#[cfg(test)]
mod forwarded_tests {
    use super::*;
    use crate::route::MessageMode;

    /// From a peer that is not a trusted proxy, X-Forwarded-For and Forwarded are replaced.
    #[test]
    fn untrusted_peer_chain_is_replaced() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "h")
            .header("x-forwarded-for", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6")
            .body(())
            .unwrap();
        let r = Route::new(
            "/",
            Backend::parse("ws://127.0.0.1:3000", std::path::Path::new("/")).unwrap(),
            vec![],
            vec![],
            MessageMode::Binary,
        );
        let out = backend_request(
            &req,
            (),
            &r,
            "192.0.2.7:1".parse().unwrap(),
            false,
            false,
            false,
        );
        assert_eq!(out.headers()["x-forwarded-for"], "192.0.2.7");
        assert!(out.headers().get("forwarded").is_none());
    }
}
