//! One accepted connection until its request is answered: the TLS handshake (on wss
//! listeners) and the request head, both inside `handshake_timeout` counted from accept, then
//! hyper's HTTP/1.1 connection with upgrades.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, info, Instrument, Span};

use super::accept::ConnectionSlot;
use super::client_limits::Held;
use super::h2::{self, Streams};
use super::keepalive::{watched, Expired, KeepAlive};
use super::listen::{ClientStream, Peer};
use super::reload::ListenerSettings;
use super::respond::RequestBody;
use super::session::Pending;
use super::{dispatch, State};
use crate::config::Config;
use crate::metrics::ReasonLabel;
use crate::proxy_protocol::{self, ProxyHeader, ProxyHeaderError};

/// Largest request head (request line and headers) accepted; bigger gets 431.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Per-connection context the request handler needs.
pub(super) struct Conn {
    pub(super) state: Arc<State>,
    /// The config at accept time.
    pub(super) config: Arc<Config>,
    pub(super) peer: Peer,
    /// The peer may name the client (forwarding headers): it is in `trusted_proxies`, or a
    /// unix-socket peer with `"unix:"` listed there.
    pub(super) peer_trusted: bool,
    /// Between requests: the handshake deadline stops at the first head, keep-alive after.
    pub(super) keepalive: Arc<KeepAlive>,
    /// The client came in over TLS (X-Forwarded-Proto on proxy routes).
    pub(super) tls: bool,
    /// Common names of the client certificate (mTLS listeners; empty otherwise).
    pub(super) client_cert_names: Vec<String>,
    /// The address the client connected to: the listener's, or the PROXY header's destination.
    pub(super) local: SocketAddr,
    /// Moves into the session on upgrade; otherwise dropped with the connection.
    pub(super) slot: Mutex<Option<ConnectionSlot>>,
    /// The connection's place under the per-client and per-route limits, taken at its first
    /// request; moves into the session on upgrade.
    pub(super) held: Mutex<Option<Held>>,
    /// The session its upgrade request agreed on, run by this connection's task after hyper.
    pub(super) session: Mutex<Option<Pending>>,
    /// HTTP/2 connections: the streams open now (`None` on HTTP/1.1).
    pub(super) streams: Option<Arc<Streams>>,
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one accepted connection to its end, in one task: its requests, then the session
/// one of them upgraded to. Cancel-safe: dropping it drops the connection.
pub(super) async fn serve<S: ClientStream>(
    state: Arc<State>,
    stream: S,
    peer: Peer,
    slot: ConnectionSlot,
    settings: ListenerSettings,
    span: Span,
) {
    // Boxed: the HTTP part's state (hyper's connection, the TLS handshake) is freed when the
    // connection is upgraded instead of being kept beside the session while it runs.
    // (The session's future is made before it is awaited, so this task holds it alone.)
    let requests = serve_requests(state, stream, peer, slot, settings);
    match Box::pin(requests).instrument(span.clone()).await {
        Some(Next::Session(upgraded)) => upgraded.run(None, span).await,
        // Not instrumented: the connection's task is polled for every frame of every stream,
        // and its few log lines enter the span themselves.
        Some(Next::Http2(connection)) => connection.await,
        None => {}
    }
}

/// What a connection goes on with once its requests are done. (Returned once per connection
/// and matched at once: boxing the session would cost an allocation per HTTP/1.1 session.)
#[allow(clippy::large_enum_variant)]
enum Next {
    /// The session an HTTP/1.1 upgrade agreed on.
    Session(Pending),
    /// An HTTP/2 connection, served to its end (see `h2::serve`).
    Http2(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// The connection until it closes or a request upgrades it: the PROXY header, the TLS
/// handshake, then hyper. Returns the session an upgrade agreed on, or the HTTP/2
/// connection to serve.
async fn serve_requests<S: ClientStream>(
    state: Arc<State>,
    stream: S,
    peer: Peer,
    slot: ConnectionSlot,
    settings: ListenerSettings,
) -> Option<Next> {
    let config = state.config();
    // The PROXY header, the TLS handshake and the request head must all arrive within
    // handshake_timeout.
    let deadline = Instant::now() + config.limits.handshake_timeout;
    let mut stream = stream;
    let mut peer = peer;
    let mut local = stream.local_addr().unwrap_or(peer.addr);
    let trusted = &config.limits.trusted_proxies;
    let mut peer_trusted = match peer.unix {
        Some(_) => trusted.unix,
        None => trusted.contains(peer.addr.ip()),
    };
    if settings.proxy_protocol {
        // With trusted_proxies set, only those may name the client (as HAProxy's
        // `accept-proxy` is paired with a source ACL): anyone else could pick any address.
        let read = if trusted.is_empty() || peer_trusted {
            tokio::time::timeout_at(deadline, read_proxy_header(&mut stream)).await
        } else {
            Ok(Err(ProxyReadError::Untrusted))
        };
        match read.unwrap_or(Err(ProxyReadError::Timeout)) {
            Ok(ProxyHeader::Proxied {
                source,
                destination,
            }) => {
                peer = Peer::tcp(source);
                peer_trusted = trusted.contains(source.ip());
                local = destination;
            }
            Ok(ProxyHeader::Local) => {}
            Err(e) => {
                state
                    .metrics
                    .proxy_header_failures
                    .get_or_create(&ReasonLabel {
                        reason: e.label().into(),
                    })
                    .inc();
                info!(%peer, error = %e, "PROXY protocol header refused; closed");
                return None;
            }
        }
    }
    let shared = state.clone();
    let shown = peer.clone();
    let conn = |tls: bool, client_cert_names: Vec<String>, http2: bool| {
        Arc::new(Conn {
            streams: http2.then(|| Arc::new(Streams::new())),
            slot: Mutex::new(Some(slot)),
            held: Mutex::new(None),
            session: Mutex::new(None),
            state: shared,
            config,
            peer,
            peer_trusted,
            keepalive: Arc::new(KeepAlive::new()),
            tls,
            client_cert_names,
            local,
        })
    };
    let tls = match settings.tls {
        Some(acceptor) if settings.allow_plain => {
            // A TLS ClientHello starts with a handshake record (0x16); anything else is plain.
            let mut first = [0u8; 1];
            match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == 0x16 => Some(acceptor),
                Ok(Ok(1)) => None,
                _ => {
                    debug!(peer = %shown, "closed before the first byte");
                    return None;
                }
            }
        }
        tls => tls,
    };
    match tls {
        None => {
            let http2 = match settings.http2 {
                false => false,
                true => match tokio::time::timeout_at(deadline, h2_preface(&mut stream)).await {
                    Ok(Ok(h2)) => h2,
                    _ => {
                        debug!(peer = %shown, "closed before the first request");
                        return None;
                    }
                },
            };
            serve_protocol(conn(false, Vec::new(), http2), stream, deadline).await
        }
        Some(acceptor) => {
            let metrics = &state.metrics;
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(stream))
                    if settings.client_ca && stream.get_ref().1.peer_certificates().is_none() =>
                {
                    // No certificate, no session (resumed or not).
                    metrics.tls_failures.inc();
                    info!(peer = %shown, "TLS handshake without a client certificate on a client_ca listener; closed");
                    None
                }
                Ok(Ok(stream)) => {
                    let session = stream.get_ref().1;
                    let names = cert_names(session.peer_certificates());
                    let http2 = session.alpn_protocol() == Some(b"h2");
                    serve_protocol(conn(true, names, http2), stream, deadline).await
                }
                Ok(Err(e)) => {
                    metrics.tls_failures.inc();
                    info!(peer = %shown, error = %e, "TLS handshake failed; closed");
                    None
                }
                Err(_) => {
                    metrics.tls_failures.inc();
                    metrics.handshake_timeouts.inc();
                    info!(peer = %shown, "handshake timeout during TLS; closed");
                    None
                }
            }
        }
    }
}

/// Whether a plain connection starts with HTTP/2's preface (prior knowledge, h2c): peeked,
/// so the bytes stay for hyper. A request that is not HTTP/2 differs from the preface within
/// its first bytes; one that is has it whole in its first packet almost always, else it is
/// peeked again a moment later. `Err` when the connection closes first.
async fn h2_preface<S: ClientStream>(stream: &mut S) -> std::io::Result<bool> {
    let mut first = [0u8; 24];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if first[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// The subject common names of the client's certificate (mTLS), for `client_cert_names`.
fn cert_names(chain: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    let Some(leaf) = chain.and_then(|c| c.first()) else {
        return Vec::new();
    };
    match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The connection's protocol over its stream (plain or TLS), its reads and writes watched for
/// keep-alive: HTTP/2 handed back to be served on this task (outside the span entered for
/// the requests), HTTP/1.1 served here until an upgrade or the end.
async fn serve_protocol<I>(conn: Arc<Conn>, stream: I, deadline: Instant) -> Option<Next>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = watched(stream, &conn.keepalive);
    if conn.streams.is_some() {
        let span = Span::current();
        return Some(Next::Http2(Box::pin(h2::serve(conn, io, deadline, span))));
    }
    serve_http(conn, TokioIo::new(io), deadline)
        .await
        .map(Next::Session)
}

/// Serves the HTTP/1.1 requests of a connection (plain or TLS): the first head must arrive by
/// `deadline`; after a response, the next request is waited for `keepalive_timeout` and its
/// head for `handshake_timeout` from its first byte.
async fn serve_http<I>(conn: Arc<Conn>, io: I, deadline: Instant) -> Option<Pending>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn.peer.clone();
    let handler = conn.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = handler.clone();
        async move {
            let (response, session) =
                dispatch::handle(conn.clone(), req.map(RequestBody::Http1)).await;
            if let Some(session) = session {
                // Run by this connection's task once hyper has sent the 101 and handed the
                // connection over.
                if let Ok(mut slot) = conn.session.lock() {
                    *slot = Some(session);
                }
            }
            Ok::<_, Infallible>(response)
        }
    });
    let http = http1::Builder::new()
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(io, service)
        .with_upgrades();
    let limits = &conn.config.limits;
    tokio::select! {
        result = http => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection error");
            }
        }
        expired = conn.keepalive.expired(deadline, limits.keepalive_timeout, limits.handshake_timeout, limits.send_timeout) => {
            match expired {
                Expired::FirstHead => {
                    conn.state.metrics.handshake_timeouts.inc();
                    info!(%peer, "handshake timeout: request not complete in time; closed");
                }
                Expired::Idle => debug!(%peer, "keep-alive timeout: closed"),
                Expired::SlowHead => {
                    conn.state.metrics.handshake_timeouts.inc();
                    info!(%peer, "handshake timeout: next request not complete in time; closed");
                }
                Expired::SendStalled => {
                    conn.state.metrics.send_timeouts.inc();
                    info!(%peer, "send timeout: no progress with the client within send_timeout; closed");
                }
                Expired::SlowBody => {
                    conn.state.metrics.send_timeouts.inc();
                    info!(%peer, "send timeout: request body slower than 1 KiB/s; closed");
                }
            }
        }
    }
    // After an upgrade hyper's future has ended with the connection handed over; the session
    // goes on in this task (no second task to spawn and wake).
    let upgraded = conn.session.lock().ok().and_then(|mut p| p.take());
    upgraded
}

/// Why a PROXY header could not be read.
#[derive(Debug, thiserror::Error)]
enum ProxyReadError {
    #[error(transparent)]
    Header(#[from] ProxyHeaderError),
    #[error("connection ended inside the PROXY header")]
    Truncated,
    #[error("PROXY header not complete within handshake_timeout")]
    Timeout,
    #[error("the peer is not in trusted_proxies")]
    Untrusted,
}

impl ProxyReadError {
    fn label(&self) -> &'static str {
        match self {
            ProxyReadError::Header(e) => e.label(),
            ProxyReadError::Truncated => "truncated",
            ProxyReadError::Timeout => "timeout",
            ProxyReadError::Untrusted => "untrusted_peer",
        }
    }
}

/// Reads the PROXY header off the connection, and not one byte more (what follows belongs to
/// TLS or HTTP). Usually the header arrives whole: one peek finds it and one read takes it.
/// Otherwise it is read in exact pieces. Cancel-safe only in that the connection is dropped.
async fn read_proxy_header<S: ClientStream>(stream: &mut S) -> Result<ProxyHeader, ProxyReadError> {
    let truncated = |_| ProxyReadError::Truncated;
    let mut peeked = [0u8; 512];
    let n = stream.peek(&mut peeked).await.map_err(truncated)?;
    if n == 0 {
        return Err(ProxyReadError::Truncated);
    }
    if let Some((header, len)) = proxy_protocol::parse(&peeked[..n])? {
        stream
            .read_exact(&mut peeked[..len])
            .await
            .map_err(truncated)?;
        return Ok(header);
    }
    // In pieces: a v2 header is at least 16 bytes and says its length; a v1 line is read a
    // byte at a time up to its CRLF.
    let mut got = Vec::with_capacity(128);
    loop {
        if let Some((header, _)) = proxy_protocol::parse(&got)? {
            return Ok(header);
        }
        let v2 =
            !got.is_empty() && got.starts_with(&proxy_protocol::V2_SIGNATURE[..got.len().min(12)]);
        let want = match got.len() {
            n if v2 && n >= 16 => 16 + usize::from(u16::from_be_bytes([got[14], got[15]])),
            _ if v2 => 16,
            n => n + 1,
        };
        let start = got.len();
        got.resize(want, 0);
        stream
            .read_exact(&mut got[start..])
            .await
            .map_err(truncated)?;
    }
}
