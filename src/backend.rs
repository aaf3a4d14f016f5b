//! Connecting to a route's backend, before the client is upgraded.

use std::io;
use std::time::Duration;

use hyper::StatusCode;
use rustls_pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use crate::route::{Backend, Route};
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
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let stream = tcp(authority).await?;
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

/// Connects to the route's backend within `timeout`. Cancel-safe: dropping it abandons the
/// attempt.
pub(crate) async fn connect(route: &Route, timeout: Duration) -> Result<BackendConn, ConnectError> {
    let attempt = async {
        Ok(match &route.backend {
            Backend::Echo => BackendConn::Echo,
            Backend::Tcp(authority) => {
                let (read, write) = tcp(authority).await?.into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Unix(path) => {
                let (read, write) = UnixStream::connect(path)
                    .await
                    .map_err(ConnectError::Unreachable)?
                    .into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Tls { authority, host } => {
                let (read, write) = tokio::io::split(tls(route, authority, host).await?);
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
            } => BackendConn::Proxy(Box::new(tls(route, authority, host).await?)),
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout),
    }
}
