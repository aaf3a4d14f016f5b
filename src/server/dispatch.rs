//! One request on a client connection: the route, the RFC 6455 checks, the backend connected
//! (and, on proxy routes, the app's 101 checked) **before** the client's 101, then the session
//! handed back to run once the answer is sent. Every refusal goes through [`refuse`].

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tracing::{info, warn};

use super::accept::ConnectionSlot;
use super::balance::OnBackend;
use super::client_limits::{Held, OverLimit};
use super::conn::Conn;
use super::keepalive::{mark_end, WatchedBody};
use super::listen::Peer;
use super::respond::{forward_failed, full, passthrough, refuse, Body, RequestBody};
use super::session::{ClientSide, Pending, Session, SessionBackend};
use crate::auth::Presented;
use crate::backend::{self, BackendConn, ClientAddrs};
use crate::bridge::SessionLimits;
use crate::edge::path::{canonical, PathError};
use crate::files::StaticDir;
use crate::forwarded::forwarded_client;
use crate::metrics::KindLabel;
use crate::params::{cookie, query_param};
use crate::protocol::deflate::{self, Agreed};
use crate::protocol::handshake::{self, has_token, Accepted, Rejection};
use crate::proxy::forward::{self, ForwardError, ForwardedFor};
use crate::proxy::headers::BackendAccept;
use crate::route::{Backend, Route};
use crate::targets::LookupError;

/// One request's answer, and the session it agreed on (an upgrade), which the caller runs once
/// the answer is sent: the HTTP/1.1 connection's task after hyper hands the connection over,
/// or the HTTP/2 stream's future after the 200.
pub(super) async fn handle(
    conn: Arc<Conn>,
    req: Request<RequestBody>,
) -> (Response<Body>, Option<Pending>) {
    let mut session = None;
    let response = answer(conn, req, &mut session).await;
    (response, session)
}

async fn answer(
    conn: Arc<Conn>,
    mut req: Request<RequestBody>,
    session_out: &mut Option<Pending>,
) -> Response<Body> {
    // HTTP/2: each request is a stream of its own (its future counts it open); HTTP/1.1 keeps
    // its keep-alive phases instead.
    let http2 = conn.streams.is_some();
    let last_request = !http2 && conn.keepalive.request_started();
    let state = &conn.state;
    let is_upgrade = match http2 {
        true => is_extended_connect(&req),
        false => has_token(req.headers(), &header::UPGRADE, "websocket"),
    };
    if http2 {
        let kind = if is_upgrade { "websocket" } else { "request" };
        state
            .metrics
            .h2_streams
            .get_or_create(&KindLabel { kind })
            .inc();
    }
    if req.method() == Method::CONNECT && !is_upgrade {
        // No tunnels: CONNECT is taken only as a WebSocket handshake (RFC 8441).
        return refuse(
            &conn,
            None,
            Rejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "CONNECT is taken only with :protocol websocket (RFC 8441)",
            ),
        );
    }
    if http2 && !req.headers().contains_key(header::HOST) {
        // HTTP/2 names the host in :authority (RFC 9113 §8.3.1); from here on it is the
        // Host header, as on HTTP/1.1 (the app, X-Forwarded-Host, logs).
        let authority = req.uri().authority().map(|a| a.as_str().to_owned());
        if let Some(host) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    // One canonical path from here on: the route, auth, limits, files and the app all see it.
    if let Err(e) = canonicalize_target(&mut req) {
        return refuse(
            &conn,
            None,
            Rejection::new(StatusCode::BAD_REQUEST, "path", e.as_str()),
        );
    }
    let Some(route) = conn.config.routes.find(req.uri().path()) else {
        return refuse(
            &conn,
            None,
            Rejection::new(StatusCode::NOT_FOUND, "no_route", "no route for this path"),
        );
    };
    let trusted = &conn.config.limits.trusted_proxies;
    // The client as the trusted proxies in front say (else the peer itself).
    let client = match forwarded_client(conn.peer_trusted, req.headers(), trusted) {
        Some(ip) if ip != conn.peer.addr.ip() || conn.peer.unix.is_some() => {
            Peer::tcp(SocketAddr::new(ip, 0))
        }
        _ => conn.peer.clone(),
    };
    // A page's files are not handshakes: only upgrades and proxied requests count against
    // the per-client handshake rate (and, below, credential checks on any request).
    let rated = is_upgrade || route.static_dir.is_none();
    let stream_held = match within_client_limits(&conn, client.addr, route, rated) {
        Ok(held) => held,
        Err(over) => return refuse(&conn, Some(&route.path), over_limit(over)),
    };
    let forwarded_for = ForwardedFor {
        peer: conn.peer.addr,
        trusted: conn.peer_trusted,
        tls: conn.tls,
    };
    let addrs = ClientAddrs {
        client: client.addr,
        listener: conn.local,
    };
    if let Some(auth) = &route.auth {
        // Every credential check costs a token of the client's handshake rate: a page request
        // (not rated above) takes one now and gives it back when its check passes, so a burst
        // of bad attempts costs at most the burst in checks, and good ones never run out.
        let lent = !rated;
        if lent {
            if let Err(over) = state
                .client_limits
                .handshake(client.addr.ip(), &conn.config.limits)
            {
                return refuse(&conn, Some(&route.path), over_limit(over));
            }
        }
        let presented = Presented {
            headers: req.headers(),
            query: req.uri().query(),
            cert_names: &conn.client_cert_names,
        };
        if let Err(rejection) = auth.check(presented).await {
            return refuse(&conn, Some(&route.path), rejection);
        }
        if lent {
            state
                .client_limits
                .give_back(client.addr.ip(), &conn.config.limits);
        }
    }
    if !is_upgrade && (route.backend.is_proxy() || route.static_dir.is_some()) {
        let mut response = match &route.static_dir {
            Some(dir) => serve_static(&req, route, dir).await,
            None => proxy_http(&conn, req, route, forwarded_for, addrs).await,
        };
        if http2 {
            return response;
        }
        if last_request {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let (parts, body) = response.into_parts();
        return Response::from_parts(parts, mark_end(body, conn.keepalive.clone()));
    }
    let checked = match http2 {
        true => handshake::check_h2(req.headers(), route),
        false => handshake::check(req.method(), req.version(), req.headers(), route),
    };
    let accepted = match checked {
        Ok(a) => a,
        Err(rejection) => return refuse(&conn, Some(&route.path), rejection),
    };
    // An HTTP/2 WebSocket takes a place under max_connections of its own (its connection
    // holds one already), so sessions stay bounded however they are multiplexed.
    let stream_slot = match http2 {
        false => None,
        true => match ConnectionSlot::take(state) {
            Some(slot) => Some(slot),
            None => {
                let over = Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "over_capacity",
                    "too many connections; try again later",
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from(1));
                return refuse(&conn, Some(&route.path), over);
            }
        },
    };
    let token_route;
    let route = match &route.backend {
        Backend::TokenFile(_) | Backend::TokenRedis(_) | Backend::TokenJwt(_) => {
            match token_target(&conn, &req, route).await {
                Ok(r) => {
                    token_route = r;
                    &token_route
                }
                Err(rejection) => return refuse(&conn, Some(&route.path), rejection),
            }
        }
        _ => route,
    };
    let limits = &conn.config.limits;
    let connect_started = Instant::now();
    let connected = connect_with_failover(&conn, &req, route, addrs, forwarded_for).await;
    let (route, backend, proxy_accept, on_backend) = match connected {
        Ok(c) => c,
        Err(response) => return response,
    };
    let http_version = if http2 { "2" } else { "1.1" };
    let route_metrics = state.metrics.for_route(&route.path, http_version);
    route_metrics
        .backend_connect_seconds
        .observe(connect_started.elapsed().as_secs_f64());
    // permessage-deflate on bridge and echo routes; a proxy route has the app's answer.
    let deflate = match (route.compression, &proxy_accept) {
        (true, None) => deflate::negotiate(
            req.headers()
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|v| v.to_str().ok()),
            &limits.deflate(),
        ),
        _ => None,
    };
    let response = switching_protocols(&accepted, proxy_accept, deflate.as_ref(), http2);

    let on_upgrade = hyper::upgrade::on(&mut req);
    let client_side = match req.into_body() {
        RequestBody::H2(body) => ClientSide::H2(body.into_recv()),
        RequestBody::Http1(_) => ClientSide::Http1(on_upgrade),
    };
    let places = match http2 {
        true => (stream_slot, stream_held, on_backend),
        false => {
            let slot = conn.slot.lock().ok().and_then(|mut s| s.take());
            let held = conn.held.lock().ok().and_then(|mut h| h.take());
            (slot, held, on_backend)
        }
    };
    let session = Session {
        state: state.clone(),
        peer: client,
        http_version,
        limits: SessionLimits {
            max_message_size: limits.max_message_size,
            idle_timeout: limits.idle_timeout,
            ping_interval: limits.ping_interval,
            close_timeout: limits.close_timeout,
            message: route.message,
            framing: route.framing,
            deflate,
        },
        route_path: route.path.clone(),
        backend_name: Arc::new(route.backend.clone()),
        metrics: route_metrics,
    };
    *session_out = Some(Pending {
        session,
        client: client_side,
        backend,
        places,
    });
    response
}

/// An HTTP/2 extended CONNECT for a WebSocket (RFC 8441): `:method CONNECT` with
/// `:protocol websocket`.
fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<::h2::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Replaces the request's target with its canonical path (and its query, unchanged); an
/// absolute-form target keeps only those.
fn canonicalize_target<B>(req: &mut Request<B>) -> Result<(), PathError> {
    let uri = req.uri();
    let path = match canonical(uri.path())? {
        Cow::Borrowed(_) if uri.scheme().is_none() => return Ok(()),
        // Already canonical in an absolute form (every HTTP/2 request: :scheme and
        // :authority): its path and query as they are, shared, not written out again.
        Cow::Borrowed(_) => {
            if let Some(target) = uri.path_and_query().cloned() {
                *req.uri_mut() = target.into();
                return Ok(());
            }
            Cow::Borrowed("/")
        }
        path => path,
    };
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    *req.uri_mut() = target.parse().map_err(|_| PathError::BadEscape)?;
    Ok(())
}

/// The client's 101 (HTTP/1.1: with the accept key) or 200 (HTTP/2, RFC 8441: the stream is
/// the connection, there is no key), and the subprotocol (and, on proxy routes, the
/// extensions) chosen.
fn switching_protocols(
    accepted: &Accepted,
    proxy: Option<BackendAccept>,
    deflate: Option<&Agreed>,
    http2: bool,
) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    let headers = response.headers_mut();
    if !http2 {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accepted.accept).expect("base64 is a valid header value"),
        );
    }
    *response.status_mut() = match http2 {
        true => StatusCode::OK,
        false => StatusCode::SWITCHING_PROTOCOLS,
    };
    let headers = response.headers_mut();
    match proxy {
        // A proxy route answers with the app's choice (checked against the offer and route).
        Some(accept) => {
            if let Some(p) = accept.protocol {
                headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
            }
            if let Some(e) = accept.extensions {
                headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, e);
            }
        }
        None => {
            if let Some(protocol) = &accepted.protocol {
                // Chosen from the route's own list of tokens, so always a valid value.
                if let Ok(v) = HeaderValue::from_str(protocol) {
                    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
                }
            }
            if let Some(agreed) = deflate {
                if let Ok(v) = HeaderValue::from_str(&agreed.response) {
                    headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
                }
            }
        }
    }
    response
}

/// A plain HTTP request on a proxy route: forwarded to the app, both bodies streamed.
async fn proxy_http(
    conn: &Conn,
    req: Request<RequestBody>,
    route: &Route,
    client: ForwardedFor,
    addrs: ClientAddrs,
) -> Response<Body> {
    let limits = &conn.config.limits;
    let io = match backend::connect(route, limits.connect_timeout, addrs, &[]).await {
        Ok(BackendConn::Proxy(io)) => io,
        Ok(_) => unreachable!("proxy routes connect to proxy backends"),
        Err(e) => {
            warn!(route = %route.path, backend = %route.backend, error = %e, "backend connect failed");
            return refuse(
                conn,
                Some(&route.path),
                Rejection::new(e.status(), e.label(), e.client_text()),
            );
        }
    };
    let timeout = limits.connect_timeout;
    // The body is watched: send_timeout cuts one that stalls or trickles.
    let req = req.map(|body| WatchedBody::new(body, conn.keepalive.clone()));
    match forward::http(req, route, io, client, timeout, &conn.state.tracker).await {
        Ok(response) => passthrough(response),
        Err(e) => forward_failed(conn, &route.path, e),
    }
}

/// A plain GET or HEAD on a route with `static`: the file, the route's prefix taken off the
/// path. The route's own path without its trailing slash is redirected to it, so relative
/// links in its index page resolve inside the route.
async fn serve_static(
    req: &Request<RequestBody>,
    route: &Route,
    dir: &StaticDir,
) -> Response<Body> {
    let path = req.uri().path();
    let below = match &*route.path {
        "/" => path,
        prefix => &path[prefix.len()..],
    };
    if below.is_empty() {
        let location = match req.uri().query() {
            Some(q) => format!("{path}/?{q}"),
            None => format!("{path}/"),
        };
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
        if let Ok(v) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, v);
        }
        return response;
    }
    dir.serve(req, &route.path, below).await
}

/// A token route's target for this request: the token from the `token` query parameter or
/// cookie (as websockify reads it), looked up in the route's source as it is now (a token
/// file, Redis, or the token itself when it is a signed JWT). The answer is a copy of the
/// route whose backend is that `tcp://` target. Missing, unknown and refused tokens are 404;
/// Redis down is 503, a malformed Redis value 502. Neither the token nor the mapping is logged;
/// each lookup is counted by result, with its time.
async fn token_target(
    conn: &Conn,
    req: &Request<RequestBody>,
    route: &Route,
) -> Result<Route, Rejection> {
    let token = query_param(req.uri().query(), "token")
        .map(|t| t.trim_end_matches('\n').to_owned())
        .or_else(|| cookie(req.headers(), "token"))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Rejection::new(
                StatusCode::NOT_FOUND,
                "token_missing",
                "no token: give one as ?token=… or a `token` cookie",
            )
        })?;
    let unknown = || Rejection::new(StatusCode::NOT_FOUND, "token_unknown", "unknown token");
    let started = Instant::now();
    let found: Result<Option<String>, LookupError> = match &route.backend {
        Backend::TokenFile(source) => {
            let tokens = source.0.clone();
            match tokio::task::spawn_blocking(move || tokens.lookup(&token)).await {
                Ok(Ok(target)) => Ok(target),
                Ok(Err(e)) => Err(LookupError::Unavailable(e.to_string())),
                Err(_) => Err(LookupError::Unavailable("the lookup failed".into())),
            }
        }
        Backend::TokenRedis(source) => {
            source
                .0
                .lookup(&token, conn.config.limits.connect_timeout)
                .await
        }
        Backend::TokenJwt(key) => key.0.verify(&token).map(Some),
        _ => unreachable!("only token routes look a token up"),
    };
    let result = match &found {
        Ok(Some(_)) => "found",
        Ok(None) => "unknown",
        Err(LookupError::BadValue(_) | LookupError::Refused(_)) => "invalid",
        Err(LookupError::Unavailable(_)) => "error",
    };
    conn.state
        .metrics
        .token_lookup(&route.path, result, started.elapsed());
    let target = match found {
        Ok(Some(target)) => target,
        Ok(None) => return Err(unknown()),
        Err(LookupError::Refused(why)) => {
            info!(route = %route.path, reason = why, "token refused");
            return Err(unknown());
        }
        Err(LookupError::BadValue(why)) => {
            warn!(route = %route.path, source = %route.backend, problem = why, "token source holds a value that is not a target");
            return Err(Rejection::new(
                StatusCode::BAD_GATEWAY,
                "token_value_invalid",
                "the token's target is malformed",
            ));
        }
        Err(LookupError::Unavailable(e)) => {
            warn!(route = %route.path, source = %route.backend, error = %e, "token source unavailable");
            let file = matches!(route.backend, Backend::TokenFile(_));
            return Err(if file {
                Rejection::new(
                    StatusCode::BAD_GATEWAY,
                    "token_source_unreadable",
                    "the token source cannot be read",
                )
            } else {
                Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token_source_unavailable",
                    "the token source is unavailable; try again later",
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from(1))
            });
        }
    };
    let mut resolved = route.clone();
    resolved.backend = Backend::Tcp(target);
    resolved.backends = vec![resolved.backend.clone()];
    resolved.looked_up_from = Some(route.backend.clone());
    Ok(resolved)
}

/// Checks the request against the per-client rate (when `rated`), and takes its place under
/// the per-client and per-route connection limits. Every request on a keep-alive connection
/// is judged: one for another client (a trusted proxy's next request) or another route gives
/// the connection's place back and takes its own.
fn within_client_limits(
    conn: &Conn,
    client: SocketAddr,
    route: &Route,
    rated: bool,
) -> Result<Option<Held>, OverLimit> {
    let limits = &conn.config.limits;
    let counts = &conn.state.client_limits;
    if rated {
        counts.handshake(client.ip(), limits)?;
    }
    if conn.streams.is_some() {
        // HTTP/2: each stream is a request (or a WebSocket) of its own and holds its own
        // place while it is open, as an HTTP/1.1 connection would.
        return counts
            .hold(client.ip(), &route.path, route.max_connections, limits)
            .map(Some);
    }
    let mut held = conn.held.lock().unwrap();
    if !held
        .as_ref()
        .is_some_and(|h| h.is_for(client.ip(), &route.path))
    {
        // The connection's previous request is over (HTTP/1.1 answers in order): its place
        // goes back before this one's is taken.
        *held = None;
        *held = Some(counts.hold(client.ip(), &route.path, route.max_connections, limits)?);
    }
    Ok(None)
}

/// The refusal for a request over a limit: 503 for connections, 429 for the rate, each with
/// Retry-After.
fn over_limit(over: OverLimit) -> Rejection {
    let (status, reason, retry) = match over {
        OverLimit::ClientConnections => (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections from this client; try again later",
            1,
        ),
        OverLimit::RouteConnections => (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections on this route; try again later",
            1,
        ),
        OverLimit::ClientRate(wait) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many handshakes from this client; slow down",
            wait.as_secs_f64().ceil().max(1.0) as u64,
        ),
    };
    Rejection::new(status, over.label(), reason)
        .with_header(header::RETRY_AFTER, HeaderValue::from(retry))
}

/// A connected backend, ready for the 101: the route as attempted (its `backend` is the one
/// that answered), what the session relays to, what the app's 101 carries over, and the
/// session's place on that backend.
/// The route as tried (its `backend` the one that answered: borrowed unless failing over
/// changed it), the session's backend side, a proxy app's 101, its place in the balancer.
type Connected<'r> = (
    Cow<'r, Route>,
    SessionBackend,
    Option<BackendAccept>,
    OnBackend,
);

/// Tries the route's backends in the balancer's order until one connects (and, on proxy
/// routes, answers the upgrade with a good 101). Every failure counts against its backend and
/// moves on; when all fail the client gets the last failure's answer (502, 504, or a ws
/// app's own refusal).
async fn connect_with_failover<'r>(
    conn: &Conn,
    req: &Request<RequestBody>,
    route: &'r Route,
    addrs: ClientAddrs,
    forwarded_for: ForwardedFor,
) -> Result<Connected<'r>, Response<Body>> {
    let state = &conn.state;
    let limits = &conn.config.limits;
    let mut last = None;
    for index in state.balancer.order(route) {
        // A copy of the route only when the backend tried is not its first.
        let attempt = match &route.backends[index] {
            first if *first == route.backend => Cow::Borrowed(route),
            other => Cow::Owned(Route {
                backend: other.clone(),
                ..route.clone()
            }),
        };
        let failed = |e: &dyn std::fmt::Display| {
            let ejected = state.balancer.failed(route, index, &state.metrics);
            warn!(route = %route.path, backend = %attempt.backend, error = %e, ejected, "backend connect failed");
        };
        // A ws app's upgrade request goes out with the connection (see backend::connect).
        let upgrade = matches!(attempt.backend, Backend::Ws { .. })
            .then(|| forward::UpgradeRequest::new(req, &attempt, forwarded_for));
        let request = upgrade.as_ref().map_or(&[][..], |u| &u.head[..]);
        let backend = match backend::connect(&attempt, limits.connect_timeout, addrs, request).await
        {
            Ok(b) => b,
            Err(e) => {
                failed(&e);
                last = Some(refuse(
                    conn,
                    Some(&route.path),
                    Rejection::new(e.status(), e.label(), e.client_text()),
                ));
                continue;
            }
        };
        let (session, accept) = match backend {
            BackendConn::Proxy(io) => {
                let upgrade = upgrade.expect("a ws app's upgrade request is built before dialing");
                let forwarded =
                    forward::upgrade(&upgrade, &attempt, io, limits.connect_timeout).await;
                match forwarded {
                    Ok((app, accept)) => (SessionBackend::Proxy(app), Some(accept)),
                    // A 4xx is the app's answer to this client, not a failure of the app: it
                    // is passed on, with no failover and nothing counted against the app.
                    Err(ForwardError::AppRefused(r)) if r.status().is_client_error() => {
                        return Err(forward_failed(
                            conn,
                            &route.path,
                            ForwardError::AppRefused(r),
                        ));
                    }
                    Err(e) => {
                        failed(&"the app did not answer the upgrade with a good 101");
                        last = Some(forward_failed(conn, &route.path, e));
                        continue;
                    }
                }
            }
            BackendConn::Echo => (SessionBackend::Bridge(None), None),
            BackendConn::Stream { read, write } => {
                (SessionBackend::Bridge(Some((read, write))), None)
            }
        };
        let on_backend = state.balancer.started(route, index, &state.metrics);
        return Ok((attempt, session, accept, on_backend));
    }
    // Config guarantees a backend, so there was at least one attempt.
    Err(last.unwrap_or_else(|| {
        refuse(
            conn,
            Some(&route.path),
            Rejection::new(StatusCode::BAD_GATEWAY, "no_backend", "no backend to try"),
        )
    }))
}
