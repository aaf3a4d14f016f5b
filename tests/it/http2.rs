//! HTTP/2 (ALPN h2 on TLS listeners, prior knowledge on plain ones) and WebSockets over it
//! (RFC 8441 extended CONNECT), driven by the `h2` crate's client (hyper's own HTTP/2 layer,
//! written by others) with tokio-tungstenite speaking RFC 6455 over each stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{SinkExt, StreamExt};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::*;

/// One HTTP/2 stream as a byte stream (what RFC 8441 makes of it): DATA frames both ways,
/// END_STREAM as shutdown and EOF.
pub struct H2Io {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    buf: Bytes,
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(b)) => {
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    self.buf = b;
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
        let n = out.remaining().min(self.buf.len());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(std::io::Error::other)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// An HTTP/2 client connection (prior knowledge over TCP, or TLS with ALPN h2).
pub struct H2Client {
    pub sender: SendRequest<Bytes>,
    pub authority: String,
    pub scheme: &'static str,
    /// The connection's task: ends when the connection does (its result says how).
    pub conn: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl H2Client {
    /// h2c: HTTP/2 with prior knowledge on a plain connection.
    pub async fn plain(addr: std::net::SocketAddr) -> H2Client {
        let tcp = within("connect", WAIT, TcpStream::connect(addr))
            .await
            .unwrap();
        H2Client::over(tcp, addr.to_string(), "http").await
    }

    /// TLS with ALPN `h2` (the listener must choose it).
    pub async fn tls(addr: std::net::SocketAddr, ca: &std::path::Path) -> H2Client {
        let tls = tls_connect(addr, ca, &[b"h2"]).await;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "the listener chose h2 by ALPN"
        );
        H2Client::over(tls, "localhost".into(), "https").await
    }

    pub async fn over<S>(io: S, authority: String, scheme: &'static str) -> H2Client
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = within("the HTTP/2 handshake", WAIT, h2::client::handshake(io))
            .await
            .expect("HTTP/2 handshake");
        let conn = tokio::spawn(connection);
        let sender = within("the server's SETTINGS", WAIT, sender.ready())
            .await
            .expect("ready");
        H2Client {
            sender,
            authority,
            scheme,
            conn,
        }
    }

    /// An extended CONNECT for a WebSocket on `path` with `headers`; its status and, on 200,
    /// the stream.
    pub async fn connect(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<H2Io>) {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{}://{}{path}", self.scheme, self.authority))
            .header("sec-websocket-version", "13")
            .extension(h2::ext::Protocol::from_static("websocket"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let sender = within("room for a stream", WAIT, self.sender.clone().ready())
            .await
            .expect("the connection takes streams");
        let mut sender = sender;
        let (response, send) = sender
            .send_request(req.body(()).unwrap(), false)
            .expect("send CONNECT");
        let response = within("the CONNECT's answer", WAIT, response)
            .await
            .expect("an answer");
        let status = response.status();
        let recv = response.into_body();
        match status {
            StatusCode::OK => (
                status,
                Some(H2Io {
                    send,
                    recv,
                    buf: Bytes::new(),
                }),
            ),
            _ => (status, None),
        }
    }

    /// A WebSocket over a new stream on `path` (asserting 200), RFC 6455 by tungstenite.
    pub async fn ws(&mut self, path: &str, headers: &[(&str, &str)]) -> WebSocketStream<H2Io> {
        let (status, io) = self.connect(path, headers).await;
        assert_eq!(status, StatusCode::OK, "extended CONNECT {path}");
        WebSocketStream::from_raw_socket(io.unwrap(), Role::Client, None).await
    }

    /// A plain request (GET) over a new stream: status, headers and the whole body.
    pub async fn get(&mut self, path: &str) -> (StatusCode, http::HeaderMap, Vec<u8>) {
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}://{}{path}", self.scheme, self.authority))
            .body(())
            .unwrap();
        let mut sender = within("room for a stream", WAIT, self.sender.clone().ready())
            .await
            .unwrap();
        let (response, _) = sender.send_request(req, true).unwrap();
        let response = within("the answer", WAIT, response).await.unwrap();
        let (parts, mut body) = response.into_parts();
        let mut all = Vec::new();
        while let Some(chunk) = within("the body", WAIT, body.data()).await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            all.extend_from_slice(&chunk);
        }
        (parts.status, parts.headers, all)
    }
}

/// TLS to `addr` (SNI localhost) offering `alpn`, trusting the CA at `ca`.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    within(
        "the TLS handshake",
        WAIT,
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("TLS")
}

/// Sends `text` and expects it back.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
    let back = within("the echo", WAIT, ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::Text(text.into()));
}

/// A development CA and a localhost certificate.
fn certs() -> TempDir {
    let dir = TempDir::new();
    gen_certs(dir.path(), "ec", "server", "localhost 127.0.0.1");
    dir
}

fn tls_listener(dir: &TempDir, extra: &str) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n{extra}\n",
        dir.path().join("server.crt").display(),
        dir.path().join("server.key").display()
    )
}

#[tokio::test]
async fn tls_listeners_offer_h2_and_http1_and_websockets_run_over_both() {
    let dir = certs();
    let ca = dir.path().join("ca.crt");
    let gate = Gate::start(&format!(
        "{}[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
        tls_listener(&dir, "")
    ))
    .await;
    let mut h2 = H2Client::tls(gate.addr, &ca).await;
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "over h2").await;
    // A second WebSocket on the same connection.
    let mut second = h2.ws("/echo", &[]).await;
    round_trip(&mut second, "second stream").await;
    round_trip(&mut ws, "first still there").await;

    // HTTP/1.1 on the same listener: ALPN http/1.1, the usual 101.
    let tls = tls_connect(gate.addr, &ca, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut ws1, response) = within(
        "the HTTP/1.1 handshake",
        WAIT,
        tokio_tungstenite::client_async("wss://localhost/echo", tls),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    round_trip(&mut ws1, "over http/1.1").await;

    // http2 = false: ALPN offers http/1.1 only.
    let off = Gate::start(&format!(
        "{}[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
        tls_listener(&dir, "http2 = false")
    ))
    .await;
    let tls = tls_connect(off.addr, &ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn h2c_with_prior_knowledge_only_where_http2_is_on() {
    let on = Gate::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nhttp2 = true\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
    )
    .await;
    let mut h2 = H2Client::plain(on.addr).await;
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "h2c").await;
    // HTTP/1.1 upgrades keep working on the same listener.
    let (mut ws1, _) = within(
        "the HTTP/1.1 handshake",
        WAIT,
        tokio_tungstenite::connect_async(on.url("/echo")),
    )
    .await
    .unwrap();
    round_trip(&mut ws1, "http/1.1 beside h2c").await;

    // Default plain listener: the preface is not HTTP/1.1, and no HTTP/2 is spoken.
    let off = Gate::route("/echo", "echo", "", "").await;
    let tcp = TcpStream::connect(off.addr).await.unwrap();
    let answered = tokio::time::timeout(WAIT, async {
        let (sender, conn) = h2::client::handshake(tcp).await?;
        tokio::spawn(conn);
        let mut sender = sender.ready().await?;
        let req = Request::builder()
            .uri(format!("http://{}/echo", off.addr))
            .body(())
            .unwrap();
        let (response, _) = sender.send_request(req, true)?;
        response.await.map(|r| r.status())
    })
    .await
    .expect("the attempt ends within WAIT");
    assert!(
        answered.is_err(),
        "no HTTP/2 on a listener without http2: {answered:?}"
    );
}
