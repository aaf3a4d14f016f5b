//! The HTTP/1.1 exchange with a ws app: the client's upgrade (or plain request) forwarded over
//! a connection the caller already opened, and the app's answer checked.
//!
//! Nothing here answers the client: each outcome is returned, and the server turns it into
//! the client's response, so refusals are logged and counted in one place.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use super::exchange::{self, AppStream};
use super::headers::{backend_request, check_backend_101, BackendAccept};
use crate::protocol::handshake::{header_tokens, Rejection};
use crate::route::Route;
use crate::stream::{Io, ReadAhead};

/// Who the request is forwarded for (X-Forwarded-For and -Proto).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardedFor {
    /// The direct peer (or the PROXY header's client).
    pub peer: SocketAddr,
    /// The peer is a trusted proxy: its X-Forwarded-For chain is extended, not replaced.
    pub trusted: bool,
    /// The client came in over TLS.
    pub tls: bool,
}

/// Why a forwarded request gives the client no upgrade.
#[derive(Debug)]
pub(crate) enum ForwardError {
    /// The app could not be spoken to, or its 101 was wrong: the client gets this refusal.
    Refused(Rejection),
    /// The app answered the upgrade with something else (403, 404, …), its body read whole:
    /// passed to the client.
    AppRefused(Response<Full<Bytes>>),
}

/// The app's HTTP failed: the detail goes to the log, the client gets a fixed text.
fn http_failed(error: impl std::fmt::Display) -> ForwardError {
    tracing::warn!(error = %error, "HTTP exchange with the app failed");
    ForwardError::Refused(Rejection::new(
        StatusCode::BAD_GATEWAY,
        "backend_http",
        "the backend's HTTP answer failed",
    ))
}

/// An HTTP/1.1 client connection to the app over `io`; the connection task (with upgrades)
/// runs on `tracker`, so a drain waits for it.
async fn app_client<B>(
    io: Box<dyn Io>,
    tracker: &TaskTracker,
) -> Result<SendRequest<B>, ForwardError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http_failed)?;
    tracker.spawn(connection.with_upgrades());
    Ok(sender)
}

/// The client's upgrade as the app gets it: the HTTP/1.1 request head, and what its answer is
/// checked against.
pub(crate) struct UpgradeRequest {
    /// The request head, sent as the connection's first bytes (see `backend::connect`).
    pub head: Vec<u8>,
    key: Vec<u8>,
    offered: Vec<String>,
}

impl UpgradeRequest {
    /// The upgrade request `req` becomes on its way to `route`'s app.
    pub(crate) fn new<T>(req: &Request<T>, route: &Route, client: ForwardedFor) -> UpgradeRequest {
        let offered = header_tokens(req.headers(), &header::SEC_WEBSOCKET_PROTOCOL)
            .map(str::to_owned)
            .collect();
        // An HTTP/2 client has no key (its stream is the connection): the app's HTTP/1.1
        // upgrade gets one of wsgate's, checked against the app's answer the same way.
        let key = match req.headers().get(header::SEC_WEBSOCKET_KEY) {
            Some(k) => k.as_bytes().trim_ascii().to_vec(),
            None => fresh_key().into_bytes(),
        };
        let mut request = backend_request(
            req,
            (),
            route,
            client.peer,
            client.trusted,
            client.tls,
            true,
        );
        if let Ok(k) = HeaderValue::from_bytes(&key) {
            request.headers_mut().insert(header::SEC_WEBSOCKET_KEY, k);
        }
        UpgradeRequest {
            head: exchange::encode_head(&request),
            key,
            offered,
        }
    }
}

/// Reads the app's answer to `request` (already sent over `io`) and checks it, within
/// `timeout`. On a good 101 returns the app's side of the upgrade and what the client's 101
/// carries over; on a refusal, the app's answer (its body read whole) for the client.
pub(crate) async fn upgrade(
    request: &UpgradeRequest,
    route: &Route,
    mut io: Box<dyn Io>,
    timeout: Duration,
) -> Result<(AppStream, BackendAccept), ForwardError> {
    let exchanged = tokio::time::timeout(timeout, async {
        let mut answer = exchange::read_head(&mut io).await?;
        if answer.status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok((answer, None));
        }
        let body = exchange::read_body(&mut io, &mut answer).await?;
        Ok::<_, exchange::ExchangeError>((answer, Some(body)))
    })
    .await;
    let (answer, body) = match exchanged {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return Err(http_failed(e)),
        Err(_) => return Err(app_timeout()),
    };
    let (key, offered) = (&request.key, &request.offered);
    match check_backend_101(answer.status, &answer.headers, key, offered, route) {
        Ok(accept) => Ok((ReadAhead::new(io, answer.rest), accept)),
        Err(reason) if answer.status == StatusCode::SWITCHING_PROTOCOLS => {
            Err(ForwardError::Refused(Rejection::new(
                StatusCode::BAD_GATEWAY,
                "backend_bad_101",
                reason,
            )))
        }
        Err(_) => {
            let mut response = Response::new(Full::new(body.unwrap_or_default()));
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            Err(ForwardError::AppRefused(response))
        }
    }
}

/// Forwards a plain HTTP request (both bodies streamed) over `io` and returns the app's
/// answer, which must begin within `timeout` (504 otherwise).
pub(crate) async fn http<B>(
    req: Request<B>,
    route: &Route,
    io: Box<dyn Io>,
    client: ForwardedFor,
    timeout: Duration,
    tracker: &TaskTracker,
) -> Result<Response<Incoming>, ForwardError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut sender = app_client(io, tracker).await?;
    let (parts, body) = req.into_parts();
    let head = Request::from_parts(parts, ());
    let request = backend_request(
        &head,
        body,
        route,
        client.peer,
        client.trusted,
        client.tls,
        false,
    );
    match tokio::time::timeout(timeout, sender.send_request(request)).await {
        Ok(answer) => answer.map_err(http_failed),
        Err(_) => Err(app_timeout()),
    }
}

/// A `Sec-WebSocket-Key`: base64 of 16 random bytes.
fn fresh_key() -> String {
    use base64::Engine;
    use std::hash::BuildHasher;
    // Sixteen bytes no one can guess: SipHash under keys the thread drew from the system once
    // (std's RandomState: a new state bumps them, so each call hashes under new keys). The
    // key is a nonce for the handshake, not a secret; this spares a getrandom call per session.
    let state = std::collections::hash_map::RandomState::new();
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&state.hash_one(0u8).to_le_bytes());
    raw[8..].copy_from_slice(&state.hash_one(1u8).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

fn app_timeout() -> ForwardError {
    ForwardError::Refused(Rejection::new(
        StatusCode::GATEWAY_TIMEOUT,
        "backend_timeout",
        "the backend did not answer in time",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    /// The key sent to the app for an HTTP/2 client: 16 bytes in base64 (RFC 6455 §4.1), a
    /// new one each time, on every thread.
    #[test]
    fn fresh_keys_are_sixteen_bytes_and_never_repeat() {
        let on_one_thread = || (0..2000).map(|_| fresh_key()).collect::<Vec<_>>();
        let mut keys = on_one_thread();
        keys.extend(std::thread::spawn(on_one_thread).join().unwrap());
        for key in &keys {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key)
                .expect("base64");
            assert_eq!(raw.len(), 16, "{key}");
        }
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "a key repeated");
    }
}
