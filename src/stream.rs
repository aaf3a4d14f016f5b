//! The byte-stream halves a session moves data through: the client's connection after the
//! upgrade and a bridge backend's connection, each split so both directions run on their own.

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// Boxed read half of a byte stream.
pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;

/// Boxed write half of a byte stream.
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// A whole byte stream (TCP or TLS), for the proxy's HTTP client.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
