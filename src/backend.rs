//! Connecting to a route's backend, before the client is upgraded.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::StatusCode;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
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

/// Connects to `authority` and sends `first` (a PROXY header, a ws app's upgrade request, or
/// nothing), trying each address it resolves to in turn, as `TcpStream::connect` does.
async fn tcp(authority: &str, first: &[u8]) -> Result<TcpStream, ConnectError> {
    let mut last = None;
    for addr in tokio::net::lookup_host(authority)
        .await
        .map_err(ConnectError::Unreachable)?
    {
        match dial(addr, first).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(ConnectError::Unreachable(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the backend's name resolves to no address",
        )
    })))
}

/// A TCP connection to `addr` with `first` sent on it. The bytes are written on the socket as
/// soon as connect() returns, before the socket is handed to tokio: when the handshake is
/// already done (on loopback it completes within the call: a sidecar's app) they go out at
/// once, where tokio's own connect would first wait a turn of the event loop to learn the
/// socket is writable (5 % of wsgate's CPU per proxied HTTP/2 session in the load bench, 7 %
/// of the stack floor's). While the handshake is under way the send finds nothing to do and
/// the write waits for the connection, as tokio's would; a refused connection fails either way.
async fn dial(addr: SocketAddr, first: &[u8]) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
        _ => {}
    }
    let sent = match first.is_empty() {
        true => 0,
        false => match socket.send(first) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        },
    };
    let mut stream = TcpStream::from_std(socket.into())?;
    if sent == 0 {
        // Connected, or failed: the error a refused or unreachable peer left on the socket.
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.write_all(&first[sent..]).await?;
    Ok(stream)
}

async fn tls(
    route: &Route,
    authority: &str,
    host: &str,
    addrs: ClientAddrs,
    first: &[u8],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    // The PROXY header goes below TLS, before the ClientHello.
    let stream = tcp(authority, &proxy_header(route, addrs)).await?;
    let config = route
        .tls_client
        .as_ref()
        .expect("config gives tls:// and wss:// routes a TLS client")
        .0
        .clone();
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut stream = TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(ConnectError::Tls)?;
    // The handshake is done: a failed write is a lost connection, not a TLS failure.
    if !first.is_empty() {
        stream
            .write_all(first)
            .await
            .map_err(ConnectError::Unreachable)?;
        stream.flush().await.map_err(ConnectError::Unreachable)?;
    }
    Ok(stream)
}

/// Who a session is for, as a PROXY protocol header tells the backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddrs {
    pub(crate) client: SocketAddr,
    /// The address the client connected to (the listener, or the PROXY header's destination).
    pub(crate) listener: SocketAddr,
}

/// The route's PROXY header for `addrs`, or nothing when it sends none.
fn proxy_header(route: &Route, addrs: ClientAddrs) -> Vec<u8> {
    match route.send_proxy_protocol {
        None => Vec::new(),
        Some(ProxyVersion::V1) => proxy_protocol::encode_v1(addrs.client, addrs.listener),
        Some(ProxyVersion::V2) => proxy_protocol::encode_v2(addrs.client, addrs.listener),
    }
}

/// Connects to the route's backend within `timeout` and sends it the route's PROXY header for
/// `addrs`, then `request` (a ws app's upgrade request; empty for other backends) over the
/// connection, TLS or not. Cancel-safe: dropping it abandons the attempt.
pub(crate) async fn connect(
    route: &Route,
    timeout: Duration,
    addrs: ClientAddrs,
    request: &[u8],
) -> Result<BackendConn, ConnectError> {
    let attempt = async {
        Ok(match &route.backend {
            Backend::Echo => BackendConn::Echo,
            Backend::Tcp(authority) => {
                let (read, write) = tcp(authority, &proxy_header(route, addrs))
                    .await?
                    .into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Unix(path) => {
                let mut stream = UnixStream::connect(path)
                    .await
                    .map_err(ConnectError::Unreachable)?;
                stream
                    .write_all(&proxy_header(route, addrs))
                    .await
                    .map_err(ConnectError::Unreachable)?;
                let (read, write) = stream.into_split();
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Tls { authority, host } => {
                let (read, write) =
                    tokio::io::split(tls(route, authority, host, addrs, &[]).await?);
                BackendConn::Stream {
                    read: Box::pin(read),
                    write: Box::pin(write),
                }
            }
            Backend::Ws {
                secure: false,
                authority,
                ..
            } => BackendConn::Proxy(Box::new(tcp(authority, request).await?)),
            Backend::Ws {
                secure: true,
                authority,
                host,
                ..
            } => BackendConn::Proxy(Box::new(tls(route, authority, host, addrs, request).await?)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Bytes that repeat with no short period, so a lost, doubled or reordered piece shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    /// More than the socket takes in one send: the rest goes out through tokio, in order.
    #[tokio::test]
    async fn first_bytes_larger_than_one_send_arrive_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first = pattern(8 << 20);
        let reader = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        let stream = tokio::time::timeout(DEADLINE, dial(addr, &first))
            .await
            .expect("dial within 10 s")
            .unwrap();
        drop(stream);
        let got = tokio::time::timeout(DEADLINE, reader)
            .await
            .expect("the peer read everything within 10 s")
            .unwrap();
        assert!(
            got == first,
            "{} bytes arrived of {}",
            got.len(),
            first.len()
        );
    }

    /// A peer whose handshake is not done when connect() returns (its accept queue is full,
    /// so its SYN is dropped and sent again a second later): the bytes wait for the
    /// connection and arrive once, whole.
    #[tokio::test]
    async fn first_bytes_wait_for_a_handshake_still_under_way() {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        // A backlog of 0 holds one connection; the next SYN is dropped while it waits.
        socket.listen(0).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(socket.into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        let first = b"GET / HTTP/1.1\r\n\r\n";
        let mut dialing = Box::pin(dial(addr, first));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut dialing)
                .await
                .is_err(),
            "dial waits while the peer's queue is full"
        );
        let (_first_in_queue, _) = listener.accept().await.unwrap();
        drop(queued);
        let stream = tokio::time::timeout(DEADLINE, dialing)
            .await
            .expect("dial done within 10 s of the queue emptying (SYN sent again)")
            .unwrap();
        let (mut peer, _) = tokio::time::timeout(DEADLINE, listener.accept())
            .await
            .expect("the dialed connection accepted within 10 s")
            .unwrap();
        drop(stream);
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, peer.read_to_end(&mut got))
            .await
            .expect("the peer read to the end within 10 s")
            .unwrap();
        assert_eq!(got, first);
    }

    /// A port nothing listens on: the dial fails with the OS's refusal, for the log.
    #[tokio::test]
    async fn a_refused_dial_is_an_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        for first in [&b""[..], b"GET / HTTP/1.1\r\n\r\n"] {
            let e = tokio::time::timeout(DEADLINE, dial(addr, first))
                .await
                .expect("dial failed within 10 s")
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{first:?}");
        }
    }
}
