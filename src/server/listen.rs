//! Listening sockets of both kinds, TCP and unix, and the client streams they accept.
//!
//! A unix listener owns its socket file: a stale file left by a dead process is replaced at
//! bind (a live one, or anything that is not a socket, is an error), and the file is removed
//! when the listener closes (drain, exit, or a reload that drops it) unless another process
//! has put its own socket there meanwhile.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::ListenAddr;
use crate::stream::{BoxRead, BoxWrite, ReadAhead};

/// A bound listening socket.
pub(super) enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

/// A connection just accepted, with who is at the other end.
pub(super) enum Accepted {
    Tcp(TcpStream, Peer),
    Unix(UnixClient, Peer),
}

/// The client end of a connection as logs and the session list show it, and the address the
/// per-client limits and forwarding headers use. A unix-socket peer has no address of its
/// own: it is shown as the socket's path (`unix:/run/wsgate/ws.sock`) and stands as
/// `127.0.0.1` for the rest, until a PROXY header or a trusted forwarding header names the
/// client.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) addr: SocketAddr,
    /// The listener's socket path (`unix:…`) when the peer is a unix-socket client.
    pub(super) unix: Option<Arc<str>>,
    /// How it is shown, written once: each session logs it twice and lists it, and an
    /// HTTP/2 connection's streams share it.
    shown: Arc<str>,
}

impl Peer {
    pub(super) fn tcp(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            unix: None,
            shown: addr.to_string().into(),
        }
    }

    fn unix(name: Arc<str>) -> Peer {
        Peer {
            addr: UNIX_STAND_IN,
            shown: name.clone(),
            unix: Some(name),
        }
    }

    /// How it is shown, shared rather than written again.
    pub(super) fn shown(&self) -> Arc<str> {
        self.shown.clone()
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.shown)
    }
}

/// The address a unix-socket peer (and its listener) stands as where an IP is needed.
pub(super) const UNIX_STAND_IN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

impl Bound {
    /// Binds `addr`; a unix socket gets `mode` as its permission bits when given.
    pub(super) async fn bind(addr: &ListenAddr, mode: Option<u32>) -> io::Result<Bound> {
        let bound = match addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a).await.map(Bound::Tcp),
            ListenAddr::Unix(path) => bind_unix(path, mode),
        };
        bound.map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
    }

    /// The address actually bound (a TCP port 0 resolved).
    pub(super) fn local(&self, configured: &ListenAddr) -> ListenAddr {
        match self {
            Bound::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| configured.clone(), ListenAddr::Tcp),
            Bound::Unix(_, file) => ListenAddr::Unix(file.path.clone()),
        }
    }

    pub(super) async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Bound::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Accepted::Tcp(stream, Peer::tcp(peer)))
            }
            Bound::Unix(l, file) => {
                let (stream, _) = l.accept().await?;
                Ok(Accepted::Unix(
                    ReadAhead::new(stream, BytesMut::new()),
                    Peer::unix(file.name.clone()),
                ))
            }
        }
    }
}

/// Binds a unix socket at `path`, replacing a stale socket file (one nobody accepts on).
fn bind_unix(path: &Path, mode: Option<u32>) -> io::Result<Bound> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not replaced",
            ))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ))
            }
            // Nobody behind it: left by a process that died without removing it.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_owned(),
        name: format!("unix:{}", path.display()).into(),
        identity: (meta.dev(), meta.ino()),
    };
    Ok(Bound::Unix(listener, file))
}

/// A unix listener's socket file, removed when the listener is dropped.
pub(super) struct SocketFile {
    path: PathBuf,
    /// `unix:PATH`, shared by every peer of this listener.
    name: Arc<str>,
    /// Device and inode of the socket this listener made: the file is removed only while
    /// it is still that socket.
    identity: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A stream a listener accepted: what the connection code needs beyond reading and writing.
pub(super) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Reads ahead without consuming: the next read returns these bytes again.
    fn peek<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;

    /// Writes what the socket buffer takes now, without waiting.
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;

    /// The address the client connected to (a unix socket stands as `127.0.0.1:0`).
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// The two directions on their own, with nothing in between on the data path.
    fn into_halves(self) -> (BoxRead, BoxWrite);
}

impl ClientStream for TcpStream {
    fn peek<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        TcpStream::peek(self, buf)
    }

    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, bytes)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }

    fn into_halves(self) -> (BoxRead, BoxWrite) {
        let (read, write) = self.into_split();
        (Box::pin(read), Box::pin(write))
    }
}

/// A unix-socket client. The kernel can peek a unix socket, but the standard library keeps
/// that behind an unstable feature, so bytes read ahead (a PROXY header, the first byte that
/// tells TLS from plain) are kept and read again first.
pub(super) type UnixClient = ReadAhead<UnixStream>;

impl ClientStream for UnixClient {
    async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // As a socket's peek: waits for a first byte, then returns what has arrived.
        let mut more = vec![0u8; buf.len().saturating_sub(self.ahead.len())];
        if self.ahead.is_empty() {
            let n = self.inner.read(&mut more).await?;
            self.ahead.extend_from_slice(&more[..n]);
        } else if !more.is_empty() {
            match self.inner.try_read(&mut more) {
                Ok(n) => self.ahead.extend_from_slice(&more[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let n = buf.len().min(self.ahead.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        Ok(n)
    }

    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        self.inner.try_write(bytes)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(UNIX_STAND_IN)
    }

    fn into_halves(self) -> (BoxRead, BoxWrite) {
        let (read, write) = self.inner.into_split();
        if self.ahead.is_empty() {
            (Box::pin(read), Box::pin(write))
        } else {
            (
                Box::pin(AsyncReadExt::chain(std::io::Cursor::new(self.ahead), read)),
                Box::pin(write),
            )
        }
    }
}
