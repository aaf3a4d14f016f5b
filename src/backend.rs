//! Connecting to a route's backend, before the client is upgraded.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::net::{TcpStream, UnixStream};

use crate::config::Backend;
use crate::ws::BoxWrite;

/// Boxed read half of a byte stream.
pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;

/// A connected backend.
pub enum BackendConn {
    /// The built-in echo: no socket, the relay answers each message itself.
    Echo,
    /// A byte stream, split so each direction runs on its own.
    Stream { read: BoxRead, write: BoxWrite },
}

/// Why a backend could not be reached; each maps to the HTTP status the client gets.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Refused, unreachable, or not resolvable: 502.
    #[error("backend unreachable: {0}")]
    Unreachable(io::Error),
    /// No answer within connect_timeout: 504.
    #[error("backend connect timed out")]
    Timeout,
}

impl ConnectError {
    /// Fixed label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Unreachable(_) => "backend_unreachable",
            ConnectError::Timeout => "backend_timeout",
        }
    }
}

/// Connects to `backend` within `timeout`. Cancel-safe: dropping it abandons the attempt.
pub async fn connect(backend: &Backend, timeout: Duration) -> Result<BackendConn, ConnectError> {
    let attempt = async {
        Ok(match backend {
            Backend::Echo => BackendConn::Echo,
            Backend::Tcp(addr) => {
                let stream = TcpStream::connect(addr.as_str()).await?;
                stream.set_nodelay(true)?;
                let (read, write) = stream.into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Unix(path) => {
                let (read, write) = UnixStream::connect(path).await?.into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result.map_err(ConnectError::Unreachable),
        Err(_) => Err(ConnectError::Timeout),
    }
}
