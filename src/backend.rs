//! Connecting to a route's backend, before the client is upgraded.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::StatusCode;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use crate::proxy_protocol;
use crate::route::{Backend, ProxyVersion, Route};
use crate::stream::{BoxRead, BoxWrite, Io};

/// A connected backend.
pub(crate) enum BackendConn {
    /// The built-in echo: no socket, the bridge answers each message itself.
    Echo,
    /// A byte stream for the bridge, split so each direction runs on its own.
    Stream { read: BoxRead, write: BoxWrite },
    /// A proxy route's connection to the ws app, before the upgrade is forwarded.
    Proxy(Box<dyn Io>),
}

/// Why a backend could not be reached; each maps to the HTTP status the client gets.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// Refused, unreachable, or not resolvable: 502.
    #[error("backend unreachable: {0}")]
    Unreachable(io::Error),
    /// The TLS handshake with the backend failed (bad certificate, …): 502.
    #[error("backend TLS failed: {0}")]
    Tls(io::Error),
    /// No answer within connect_timeout: 504.
    #[error("backend connect timed out")]
    Timeout,
}

impl ConnectError {
    /// Fixed label for logs and metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            ConnectError::Unreachable(_) => "backend_unreachable",
            ConnectError::Tls(_) => "backend_tls",
            ConnectError::Timeout => "backend_timeout",
        }
    }

    /// The fixed text the client is told (the OS's words stay in the log).
    pub(crate) fn client_text(&self) -> &'static str {
        match self {
            ConnectError::Unreachable(_) => "the backend cannot be reached",
            ConnectError::Tls(_) => "the backend's TLS handshake failed",
            ConnectError::Timeout => "the backend did not answer in time",
        }
    }

    /// The HTTP status the client gets: 504 for a timeout, 502 for everything else.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ConnectError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ConnectError::Unreachable(_) | ConnectError::Tls(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

async fn tcp(authority: &str) -> Result<TcpStream, ConnectError> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(ConnectError::Unreachable)?;
    stream
        .set_nodelay(true)
        .map_err(ConnectError::Unreachable)?;
    Ok(stream)
}

async fn tls(
    route: &Route,
    authority: &str,
    host: &str,
    addrs: ClientAddrs,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let mut stream = tcp(authority).await?;
    // The PROXY header goes below TLS, before the ClientHello.
    send_proxy_header(&mut stream, route, addrs).await?;
    let config = route
        .tls_client
        .as_ref()
        .expect("config gives tls:// and wss:// routes a TLS client")
        .0
        .clone();
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(ConnectError::Tls)
}

/// Who a session is for, as a PROXY protocol header tells the backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddrs {
    pub(crate) client: SocketAddr,
    /// The address the client connected to (the listener, or the PROXY header's destination).
    pub(crate) listener: SocketAddr,
}

/// Writes the route's PROXY header, if it has one, as the first bytes on `stream`.
async fn send_proxy_header<S: AsyncWrite + Unpin>(
    stream: &mut S,
    route: &Route,
    addrs: ClientAddrs,
) -> Result<(), ConnectError> {
    let header = match route.send_proxy_protocol {
        None => return Ok(()),
        Some(ProxyVersion::V1) => proxy_protocol::encode_v1(addrs.client, addrs.listener),
        Some(ProxyVersion::V2) => proxy_protocol::encode_v2(addrs.client, addrs.listener),
    };
    stream
        .write_all(&header)
        .await
        .map_err(ConnectError::Unreachable)
}

/// Connects to the route's backend within `timeout` (and sends it the route's PROXY header
/// for `addrs`). Cancel-safe: dropping it abandons the attempt.
pub(crate) async fn connect(
    route: &Route,
    timeout: Duration,
    addrs: ClientAddrs,
) -> Result<BackendConn, ConnectError> {
    let attempt = async {
        Ok(match &route.backend {
            Backend::Echo => BackendConn::Echo,
            Backend::Tcp(authority) => {
                let mut stream = tcp(authority).await?;
                send_proxy_header(&mut stream, route, addrs).await?;
                let (read, write) = stream.into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Unix(path) => {
                let mut stream = UnixStream::connect(path)
                    .await
                    .map_err(ConnectError::Unreachable)?;
                send_proxy_header(&mut stream, route, addrs).await?;
                let (read, write) = stream.into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Tls { authority, host } => {
                let (read, write) = tokio::io::split(tls(route, authority, host, addrs).await?);
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Ws {
                secure: false,
                authority,
                ..
            } => BackendConn::Proxy(Box::new(tcp(authority).await?)),
            Backend::Ws {
                secure: true,
                authority,
                host,
                ..
            } => BackendConn::Proxy(Box::new(tls(route, authority, host, addrs).await?)),
            // The server looks the token up and connects to the tcp:// target it names.
            Backend::TokenFile(_) | Backend::TokenRedis(_) | Backend::TokenJwt(_) => {
                return Err(ConnectError::Unreachable(io::Error::other(
                    "token target not looked up",
                )))
            }
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout),
    }
}
