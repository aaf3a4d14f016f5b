//! HTTP/2 (ALPN h2 on TLS listeners, prior knowledge on plain ones) and WebSockets over it
//! (RFC 8441 extended CONNECT), driven by the `h2` crate's client (hyper's own HTTP/2 layer,
//! written by others) with tokio-tungstenite speaking RFC 6455 over each stream.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::*;

use crate::h2io::H2Io;

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
        H2Client::over_with(io, authority, scheme, &h2::client::Builder::new()).await
    }

    pub async fn over_with<S>(
        io: S,
        authority: String,
        scheme: &'static str,
        builder: &h2::client::Builder,
    ) -> H2Client
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = within("the HTTP/2 handshake", WAIT, builder.handshake(io))
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

    /// Another handle on the same connection (for a task of its own).
    pub fn clone_client(&self) -> H2Client {
        H2Client {
            sender: self.sender.clone(),
            authority: self.authority.clone(),
            scheme: self.scheme,
            conn: tokio::spawn(std::future::pending()),
        }
    }

    /// A CONNECT on `path` with `:protocol` `protocol` and exactly these `headers`: the
    /// answer's head (with the stream's receiving half) and the sending half.
    pub async fn raw_connect(
        &mut self,
        path: &str,
        protocol: &'static str,
        headers: &[(&str, &str)],
    ) -> (http::Response<h2::RecvStream>, h2::SendStream<Bytes>) {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{}://{}{path}", self.scheme, self.authority))
            .extension(h2::ext::Protocol::from_static(protocol));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut sender = within("room for a stream", WAIT, self.sender.clone().ready())
            .await
            .expect("the connection takes streams");
        let (response, send) = sender
            .send_request(req.body(()).unwrap(), false)
            .expect("send CONNECT");
        let response = within("the CONNECT's answer", WAIT, response)
            .await
            .expect("an answer");
        (response, send)
    }

    /// An extended CONNECT for a WebSocket on `path` (version 13 and `headers`); its status
    /// and, on 200, the stream.
    pub async fn connect(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<H2Io>) {
        let mut all = vec![("sec-websocket-version", "13")];
        all.extend_from_slice(headers);
        let (response, send) = self.raw_connect(path, "websocket", &all).await;
        let status = response.status();
        match status {
            StatusCode::OK => (status, Some(H2Io::new(send, response.into_body()))),
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

/// Sends `text` and expects its bytes back (as text from the echo, binary from a bridge).
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
    let back = within("the echo", WAIT, ws.next()).await.unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), text.as_bytes());
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

/// A plain h2c gate with these routes (and an admin listener), for the tests below.
async fn h2c_gate(limits: &str, routes: &str) -> Gate {
    Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nhttp2 = true\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\n{limits}\n{routes}"
    ))
    .await
}

fn route(path: &str, backend: &str, extra: &str) -> String {
    format!("[[route]]\npath = \"{path}\"\nbackend = \"{backend}\"\n{extra}\n")
}

#[tokio::test]
async fn every_route_kind_runs_over_an_h2_stream() {
    let dir = certs();
    let tcp = echo_backend().await;
    let unix = dir.path().join("echo.sock");
    unix_echo_backend(&unix);
    let tls = tls_echo_backend(dir.path()).await;
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, format!("desk1: {tcp}\n")).unwrap();
    let (app, seen) = crate::proxy::ws_app(None).await;
    let routes = [
        route("/echo", "echo", ""),
        route("/tcp", &format!("tcp://{tcp}"), ""),
        route("/unix", &format!("unix:{}", unix.display()), ""),
        route(
            "/tls",
            &format!("tls://localhost:{tls}"),
            &format!("ca = \"{}\"", dir.path().join("ca.crt").display()),
        ),
        route("/token", &format!("token-file:{}", tokens.display()), ""),
        route(
            "/lines",
            &format!("tcp://{tcp}"),
            "framing = \"lines\"\nmessage = \"text\"",
        ),
        route("/app", &format!("ws://{app}"), ""),
    ]
    .concat();
    let gate = h2c_gate("", &routes).await;
    let mut h2 = H2Client::plain(gate.addr).await;
    for path in [
        "/echo",
        "/tcp",
        "/unix",
        "/tls",
        "/token?token=desk1",
        "/app",
    ] {
        let mut ws = h2.ws(path, &[]).await;
        round_trip(&mut ws, &format!("through {path}")).await;
        // 300 KB each way, compared whole.
        let data = pattern(300_000, 3);
        ws.send(Message::binary(data.clone())).await.unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            match within("the big echo", WAIT, ws.next())
                .await
                .unwrap()
                .unwrap()
            {
                Message::Binary(b) => got.extend_from_slice(&b),
                other => panic!("{path}: unexpected {other:?}"),
            }
        }
        assert!(got == data, "{path}: 300 KB came back intact");
        ws.close(None).await.unwrap();
    }
    // Lines: one message per line both ways.
    let mut ws = h2.ws("/lines", &[]).await;
    round_trip(&mut ws, "a line").await;
    // The app got an HTTP/1.1 upgrade: GET, its own key, the Host of the :authority.
    assert_eq!(
        crate::proxy::header(&seen, "host").as_deref(),
        Some(app.to_string().as_str())
    );
    assert!(crate::proxy::header(&seen, "sec-websocket-key").is_some());
    assert_eq!(
        crate::proxy::header(&seen, "x-forwarded-host").as_deref(),
        Some(gate.addr.to_string().as_str())
    );
    // Counted under HTTP/2.
    let admin = gate.admin.unwrap();
    eventually("the h2 sessions to be counted", WAIT, || async {
        metric(
            admin,
            r#"wsgate_sessions_total{route="/echo",http_version="2"}"#,
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(metric(admin, "wsgate_http2_connections_total").await, 1.0);
    assert_eq!(
        metric(admin, r#"wsgate_http2_streams_total{kind="websocket"}"#).await,
        7.0
    );
}

#[tokio::test]
async fn checks_answer_as_on_http1_and_a_refusal_ends_only_its_stream() {
    let dir = TempDir::new();
    let bearer = dir.path().join("bearer.txt");
    std::fs::write(&bearer, "s3cret\n").unwrap();
    let routes = [
        route(
            "/strict",
            "echo",
            "origins = [\"https://ok.example\"]\nsubprotocols = [\"binary\"]",
        ),
        route(
            "/auth",
            "echo",
            &format!("auth = {{ bearer = \"{}\" }}", bearer.display()),
        ),
        route("/echo", "echo", ""),
    ]
    .concat();
    let gate = h2c_gate("", &routes).await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let ok = [
        ("origin", "https://ok.example"),
        ("sec-websocket-protocol", "binary"),
    ];
    // Each refusal is a status on its stream; the connection goes on.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: [Case; 6] = [
        (
            "/strict",
            vec![("origin", "https://evil.example"), ok[1]],
            403,
        ),
        ("/strict", vec![ok[0]], 400),
        ("/nowhere", vec![], 404),
        ("/auth", vec![], 401),
        ("/auth", vec![("authorization", "Bearer wrong")], 401),
        ("/strict", ok.to_vec(), 200),
    ];
    for (path, headers, status) in cases {
        let (got, _) = h2.connect(path, &headers).await;
        assert_eq!(got.as_u16(), status, "{path} {headers:?}");
    }
    // Version 13 is required (426 names it).
    let (response, _) = h2
        .raw_connect("/echo", "websocket", &[("sec-websocket-version", "8")])
        .await;
    assert_eq!(response.status(), 426);
    assert_eq!(response.headers()["sec-websocket-version"], "13");
    // A CONNECT that is not a WebSocket: no tunnels.
    let (response, _) = h2.raw_connect("/echo", "not-websocket", &[]).await;
    assert_eq!(response.status(), 405);
    // Good ones on the same connection, with the subprotocol and permessage-deflate agreed.
    let (status, io) = h2
        .connect(
            "/auth",
            &[
                ("authorization", "Bearer s3cret"),
                ("sec-websocket-extensions", "permessage-deflate"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    drop(io);
    let (response, _send) = h2
        .raw_connect(
            "/strict",
            "websocket",
            &[
                ("sec-websocket-version", "13"),
                ("origin", "https://ok.example"),
                ("sec-websocket-protocol", "chat, binary"),
                (
                    "sec-websocket-extensions",
                    "permessage-deflate; client_max_window_bits",
                ),
            ],
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["sec-websocket-protocol"], "binary");
    assert!(response.headers()["sec-websocket-extensions"]
        .to_str()
        .unwrap()
        .starts_with("permessage-deflate"));
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "the connection outlived six refusals").await;
}

/// Other spellings of a route's path reach that route over HTTP/2 too (its auth is not walked
/// around), and the app of a proxy route gets the canonical path with the query unchanged,
/// whether the client's spelling was already canonical or not.
#[tokio::test]
async fn other_spellings_of_a_path_are_the_same_route_on_h2() {
    let dir = TempDir::new();
    let bearer = dir.path().join("bearer.txt");
    std::fs::write(&bearer, "s3cret\n").unwrap();
    let (app, seen) = crate::proxy::ws_app(None).await;
    let routes = [
        route(
            "/auth",
            "echo",
            &format!("auth = {{ bearer = \"{}\" }}", bearer.display()),
        ),
        route("/app", &format!("ws://{app}"), ""),
        route("/", "echo", ""),
    ]
    .concat();
    let gate = h2c_gate("", &routes).await;
    let mut h2 = H2Client::plain(gate.addr).await;
    for path in ["/auth", "//auth", "///auth//x", "/%61uth", "/%61uth/x?q=1"] {
        let (status, _) = h2.connect(path, &[]).await;
        assert_eq!(status.as_u16(), 401, "{path} without credentials");
        let (status, _) = h2
            .connect(path, &[("authorization", "Bearer s3cret")])
            .await;
        assert_eq!(status.as_u16(), 200, "{path} with credentials");
    }
    for (path, app_sees) in [
        ("/app/x?k=v&k2=%20", "/app/x?k=v&k2=%20"),
        ("//app//x?k=v", "/app/x?k=v"),
        ("/%61pp/x", "/app/x"),
    ] {
        let mut ws = h2.ws(path, &[]).await;
        round_trip(&mut ws, path).await;
        let got = crate::proxy::header(&seen, "path");
        seen.lock().unwrap().clear();
        assert_eq!(got.as_deref(), Some(app_sees), "{path}");
    }
}

#[tokio::test]
async fn streams_count_against_max_connections_and_the_per_client_and_route_limits() {
    // Per client: two places; the connection's streams take them one each.
    let gate = h2c_gate(
        "max_connections_per_ip = 2",
        &[
            route("/a", "echo", ""),
            route("/b", "echo", "max_connections = 1"),
        ]
        .concat(),
    )
    .await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let mut first = h2.ws("/a", &[]).await;
    let (status, _) = h2.connect("/b", &[]).await;
    assert_eq!(status, 200, "the second place");
    let (status, _) = h2.connect("/a", &[]).await;
    assert_eq!(
        status, 503,
        "a third stream from the same client is over the limit"
    );
    round_trip(&mut first, "still fine").await;
    drop(h2);

    // Per route: /b holds one session at once, from any connection.
    let gate = h2c_gate("", &[route("/b", "echo", "max_connections = 1")].concat()).await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let _held = h2.ws("/b", &[]).await;
    let (status, _) = h2.connect("/b", &[]).await;
    assert_eq!(status, 503);

    // max_connections: the connection takes one place, each WebSocket stream one more.
    let gate = h2c_gate("max_connections = 3", &route("/a", "echo", "")).await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let _one = h2.ws("/a", &[]).await;
    let _two = h2.ws("/a", &[]).await;
    let (status, _) = h2.connect("/a", &[]).await;
    assert_eq!(status, 503, "connection + 2 streams = max_connections");
}

#[tokio::test]
async fn pages_and_proxied_requests_share_the_connection_with_websockets() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("index.html"), "<h1>desk</h1>").unwrap();
    let app = crate::proxy::fixed_app(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 9\r\nconnection: close\r\n\r\nfrom app\n",
    )
    .await;
    let routes = [
        route(
            "/",
            "echo",
            &format!("static = \"{}\"", dir.path().display()),
        ),
        route("/app", &format!("ws://{app}"), ""),
    ]
    .concat();
    let gate = h2c_gate("", &routes).await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let (status, _, body) = h2.get("/index.html").await;
    assert_eq!(
        (status.as_u16(), body.as_slice()),
        (200, &b"<h1>desk</h1>"[..])
    );
    let mut ws = h2.ws("/", &[]).await;
    round_trip(&mut ws, "beside the page").await;
    let (status, headers, body) = h2.get("/app/x").await;
    assert_eq!(
        (status.as_u16(), body.as_slice()),
        (200, &b"from app\n"[..])
    );
    assert!(
        headers.get("connection").is_none(),
        "no connection-specific headers on h2"
    );
    let (status, _, _) = h2.get("/..%2fetc/passwd").await;
    assert_eq!(status, 400, "the canonical path holds on h2 too");
}

/// A page's client that keeps its stream window shut (it stopped reading) holds the page's
/// response: the stream is reset once the window has stayed shut for `send_timeout`, and the
/// connection's other streams go on meanwhile.
#[tokio::test]
async fn a_page_whose_client_keeps_its_window_shut_is_reset_at_send_timeout() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; 1 << 20]).unwrap();
    let routes = route(
        "/",
        "echo",
        &format!("static = \"{}\"", dir.path().display()),
    );
    let gate = h2c_gate("send_timeout = \"1s\"", &routes).await;
    // The stream's window stays at HTTP/2's default 64 KiB; the connection's is wide, so the
    // shut stream cannot hold the others through it.
    let mut builder = h2::client::Builder::new();
    builder.initial_connection_window_size(1 << 24);
    let tcp = within("connect", WAIT, TcpStream::connect(gate.addr))
        .await
        .unwrap();
    let mut h2 = H2Client::over_with(tcp, gate.addr.to_string(), "http", &builder).await;
    let req = Request::builder()
        .uri(format!("http://{}/big.bin", gate.addr))
        .body(())
        .unwrap();
    let mut sender = within("room for a stream", WAIT, h2.sender.clone().ready())
        .await
        .unwrap();
    let (response, _) = sender.send_request(req, true).unwrap();
    let response = within("the page's head", WAIT, response).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // Take what the window let through, never giving any of it back.
    let mut got = 0;
    while got < 65_535 {
        let chunk = within("the first window's worth", WAIT, body.data()).await;
        got += chunk.expect("data").expect("no reset yet").len();
    }
    let shut = std::time::Instant::now();
    let mut ws = h2.ws("/", &[]).await;
    round_trip(&mut ws, "beside a shut stream").await;
    let ended = within("the shut stream's reset", WAIT, body.data()).await;
    let waited = shut.elapsed();
    let reason = ended.and_then(|r| r.err()).and_then(|e| e.reason());
    assert_eq!(
        reason,
        Some(h2::Reason::CANCEL),
        "reset, not ended or left open"
    );
    assert!(
        waited >= Duration::from_millis(800) && waited <= Duration::from_millis(2500),
        "reset {waited:?} after the window shut, with send_timeout = 1s"
    );
    assert!(got < 1 << 20, "the page was not sent whole");
    round_trip(&mut ws, "after the reset").await;
}

/// Reads until tungstenite has the close handshake done, then waits for the server's
/// END_STREAM.
async fn until_server_end_stream(ws: &mut WebSocketStream<H2Io>) {
    while let Some(Ok(_)) = within("the server's close", WAIT, ws.next()).await {}
    eventually("the server's END_STREAM", WAIT, || {
        let ended = ws.get_ref().recv.is_end_stream();
        async move { ended }
    })
    .await;
}

/// Whether the server has reset the stream by now (no waiting).
fn reset_now(io: &mut H2Io) -> Option<h2::Reason> {
    let waker = futures_util::task::noop_waker();
    match io.send.poll_reset(&mut Context::from_waker(&waker)) {
        Poll::Ready(Ok(reason)) => Some(reason),
        _ => None,
    }
}

#[tokio::test]
async fn after_the_close_handshake_both_sides_end_the_stream_and_only_a_silent_client_is_reset() {
    let gate = h2c_gate("close_timeout = \"1s\"", &route("/echo", "echo", "")).await;
    let admin = gate.admin.unwrap();
    let open = r#"wsgate_sessions_open{route="/echo",http_version="2"}"#;
    let mut h2 = H2Client::plain(gate.addr).await;

    // The client closes and ends its side as soon as the server has: no reset, and the
    // session ends at once (long before close_timeout).
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "hello").await;
    ws.close(None).await.unwrap();
    until_server_end_stream(&mut ws).await;
    let ended_ours = std::time::Instant::now();
    ws.get_mut().send.send_data(Bytes::new(), true).unwrap();
    eventually("the session to end", WAIT, || async {
        metric(admin, open).await == 0.0
    })
    .await;
    assert!(
        ended_ours.elapsed() < Duration::from_millis(700),
        "the server waited for our END_STREAM, not for close_timeout"
    );
    assert_eq!(
        reset_now(ws.get_mut()),
        None,
        "no RST_STREAM after a clean ending"
    );

    // A client that stays silent after the close handshake gets RST_STREAM, but only once
    // close_timeout (1 s) has passed.
    let mut ws = h2.ws("/echo", &[]).await;
    ws.close(None).await.unwrap();
    until_server_end_stream(&mut ws).await;
    let server_done = std::time::Instant::now();
    let reason = within(
        "the RST_STREAM at close_timeout",
        WAIT,
        futures_util::future::poll_fn(|cx| ws.get_mut().send.poll_reset(cx)),
    )
    .await
    .expect("a reset, not a connection error");
    let after = server_done.elapsed();
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_millis(1800),
        "reset {after:?} after the server's END_STREAM (close_timeout 1 s), reason {reason:?}"
    );
    // The connection is fine.
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "next").await;
}

#[tokio::test]
async fn a_client_reset_mid_message_ends_the_session_and_closes_the_backend_at_once() {
    let (tx, rx) = tokio::sync::oneshot::channel::<std::time::Instant>();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    let backend = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(std::time::Instant::now());
            }
        }
    })
    .await;
    let gate = h2c_gate(
        "",
        &[
            route("/tcp", &format!("tcp://{backend}"), ""),
            route("/echo", "echo", ""),
        ]
        .concat(),
    )
    .await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let (status, io) = h2.connect("/tcp", &[]).await;
    assert_eq!(status, 200);
    let mut io = io.unwrap();
    // Half of a masked binary frame that says 1000 bytes.
    let mut partial = client_frame(
        true,
        wsgate::protocol::frame::OpCode::Binary,
        &[7; 1000],
        [1, 2, 3, 4],
    );
    partial.truncate(500);
    io.send.send_data(Bytes::from(partial), false).unwrap();
    io.send.send_reset(h2::Reason::CANCEL);
    let reset_at = std::time::Instant::now();
    let eof_at = within("the backend's EOF", WAIT, rx).await.unwrap();
    assert!(
        eof_at.duration_since(reset_at) < Duration::from_millis(500),
        "the backend was closed {:?} after the client's RST_STREAM",
        eof_at.duration_since(reset_at)
    );
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "the connection goes on").await;
}

/// A client whose whole connection goes (TCP closed under open WebSocket streams): every
/// session on it ends at once, as on a broken HTTP/1.1 connection, with its backend closed
/// and its session counted out; the streams run on the connection's task, so this is the
/// task finishing them after its connection, not dropping them.
#[tokio::test]
async fn a_lost_connection_ends_every_session_on_it_and_closes_their_backends() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::time::Instant>();
    let backend = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
            let _ = tx.send(std::time::Instant::now());
        }
    })
    .await;
    let gate = h2c_gate("", &route("/tcp", &format!("tcp://{backend}"), "")).await;
    let admin = gate.admin.unwrap();
    let open = r#"wsgate_sessions_open{route="/tcp",http_version="2"}"#;
    let mut h2 = H2Client::plain(gate.addr).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let (status, io) = h2.connect("/tcp", &[]).await;
        assert_eq!(status, 200);
        streams.push(io.unwrap());
    }
    eventually("three sessions open", WAIT, || async {
        metric(admin, open).await == 3.0
    })
    .await;
    h2.conn.abort();
    let lost_at = std::time::Instant::now();
    for i in 0..3 {
        let eof_at = within("a backend's EOF", WAIT, rx.recv()).await.unwrap();
        assert!(
            eof_at.duration_since(lost_at) < Duration::from_millis(500),
            "backend {i} was closed {:?} after the client's connection went",
            eof_at.duration_since(lost_at)
        );
    }
    eventually("every session counted out", WAIT, || async {
        metric(admin, open).await == 0.0
    })
    .await;
    drop(streams);
}

#[tokio::test]
async fn drain_sends_goaway_then_close_1001_at_the_drain_deadline() {
    let mut gate = h2c_gate(
        "drain_timeout = \"1s\"\nclose_timeout = \"1s\"",
        &route("/echo", "echo", ""),
    )
    .await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "before").await;
    let drain = gate.stop();
    let signalled = std::time::Instant::now();
    // GOAWAY: the client may open no new stream (the h2 client refuses once it has one).
    eventually("GOAWAY to stop new streams", WAIT, || {
        let mut sender = h2.sender.clone();
        let url = format!("http://{}/echo", gate.addr);
        async move {
            let req = Request::builder().uri(url).body(()).unwrap();
            match sender.send_request(req, true) {
                Err(_) => true,
                Ok((response, _)) => response.await.is_err(),
            }
        }
    })
    .await;
    // The WebSocket goes on until the drain deadline…
    round_trip(&mut ws, "during the drain").await;
    // …then gets 1001.
    let close = loop {
        match within("close 1001 at the drain deadline", WAIT, ws.next()).await {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    let at = signalled.elapsed();
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    assert!(
        at >= Duration::from_millis(900) && at < Duration::from_millis(2500),
        "1001 {at:?} after SIGTERM with drain_timeout 1 s"
    );
    drop(ws);
    within("the drain to finish", WAIT, drain).await.unwrap();
    within("the connection to end", WAIT, h2.conn)
        .await
        .unwrap()
        .ok();
}

/// Sends messages of `size` until one is not taken within a second (the stream's window
/// and every buffer behind it are full), at most `max`; returns how many went.
async fn fill(ws: &mut WebSocketStream<H2Io>, size: usize, max: usize) -> usize {
    let payload = vec![0x5a; size];
    for sent in 0..max {
        let send = ws.send(Message::binary(payload.clone()));
        match tokio::time::timeout(Duration::from_secs(1), send).await {
            Err(_) => return sent,
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("send {sent} failed: {e}"),
        }
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_never_stalls_the_others() {
    let stalled = never_read_backend(Duration::from_secs(60)).await;
    let gate = h2c_gate(
        "",
        &[
            route("/stalled", &format!("tcp://{stalled}"), ""),
            route("/echo", "echo", ""),
        ]
        .concat(),
    )
    .await;
    // A client that keeps whatever it is sent unread (its own budget for tiny frames set out
    // of the way, so only the server's is tried).
    let tcp = TcpStream::connect(gate.addr).await.unwrap();
    let mut builder = h2::client::Builder::new();
    builder
        .initial_connection_window_size(1 << 30)
        .data_frame_budget(usize::MAX / 2);
    let mut h2 = H2Client::over_with(tcp, gate.addr.to_string(), "http", &builder).await;
    // A backend that stopped reading: big messages until nothing more is taken.
    let mut dead = h2.ws("/stalled", &[]).await;
    let sent = fill(&mut dead, 1 << 20, 256).await;
    assert!(
        sent < 256,
        "the stalled stream stopped taking data ({sent} MiB went)"
    );
    // VNC-sized input (one small message per DATA frame) on streams whose echoes are not
    // read: once the echo waits on the client, wsgate stops reading the stream, which
    // fills with tiny frames; the budget h2 keeps for those (it answers exhaustion with
    // GOAWAY ENHANCE_YOUR_CALM) must not end the connection.
    let mut tiny = Vec::new();
    for _ in 0..4 {
        let mut ws = h2.ws("/echo", &[]).await;
        let sent = fill(&mut ws, 10, 200_000).await;
        assert!(
            sent > 16_000 && sent < 200_000,
            "the stream took {sent} tiny messages, then stopped"
        );
        tiny.push(ws);
    }
    // Another stream on the same connection still works both ways.
    let mut live = h2.ws("/echo", &[]).await;
    for i in 0..20 {
        round_trip(&mut live, &format!("still moving {i}")).await;
    }
    let big = pattern(1 << 20, 5);
    live.send(Message::binary(big.clone())).await.unwrap();
    let back = within("1 MiB back", WAIT, live.next())
        .await
        .unwrap()
        .unwrap();
    assert!(back.into_data().as_ref() == big.as_slice());
    assert!(!h2.conn.is_finished(), "no GOAWAY: the connection is up");
}

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block of literals without indexing (names and values under 127 bytes).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Reads one frame: (type, flags, stream, payload).
async fn read_frame_h2(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    within("a frame from the server", WAIT, s.read_exact(&mut head))
        .await
        .unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    within("its payload", WAIT, s.read_exact(&mut payload))
        .await
        .unwrap();
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    (head[3], head[4], stream, payload)
}

/// max_streams_per_connection is advertised as SETTINGS_MAX_CONCURRENT_STREAMS, a client
/// that keeps to it waits for room, and one that ignores it gets its extra stream refused
/// (frames written by hand: no client library sends them) while the others go on.
#[tokio::test]
async fn streams_per_connection_are_advertised_and_enforced() {
    let gate = h2c_gate(
        "max_streams_per_connection = 3",
        &route("/echo", "echo", ""),
    )
    .await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let sender = h2.sender.clone();
    eventually(
        "the server's SETTINGS_MAX_CONCURRENT_STREAMS = 3",
        WAIT,
        || {
            let advertised = sender.current_max_send_streams();
            async move { advertised == 3 }
        },
    )
    .await;
    let first = h2.ws("/echo", &[]).await;
    let _second = h2.ws("/echo", &[]).await;
    let mut third = h2.ws("/echo", &[]).await;
    // A fourth waits in the client until one ends.
    let mut client = h2.clone_client();
    let fourth = tokio::spawn(async move { client.connect("/echo", &[]).await.0 });
    round_trip(&mut third, "three open").await;
    assert!(!fourth.is_finished(), "the fourth stream waits for room");
    drop(first);
    assert_eq!(
        within("the fourth stream", WAIT, fourth).await.unwrap(),
        200
    );

    // By hand: SETTINGS acknowledged, then four CONNECTs at once.
    use tokio::io::AsyncWriteExt;
    let mut raw = TcpStream::connect(gate.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    raw.write_all(&hello).await.unwrap();
    loop {
        let (kind, flags, _, _) = read_frame_h2(&mut raw).await;
        if kind == 0x4 && flags & 1 == 0 {
            raw.write_all(&frame(0x4, 1, 0, &[])).await.unwrap();
            break;
        }
    }
    let authority = gate.addr.to_string();
    let block = header_block(&[
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "http"),
        (":path", "/echo"),
        (":authority", &authority),
        ("sec-websocket-version", "13"),
    ]);
    let mut four = Vec::new();
    for stream in [1, 3, 5, 7] {
        four.extend(frame(0x1, 0x4, stream, &block));
    }
    raw.write_all(&four).await.unwrap();
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    while answered.len() + refused.len() < 4 {
        match read_frame_h2(&mut raw).await {
            (0x1, _, stream, _) => answered.push(stream),
            (0x3, _, stream, code) => {
                refused.push((stream, u32::from_be_bytes(code[..4].try_into().unwrap())))
            }
            (0x7, ..) => panic!("GOAWAY: the whole connection was ended"),
            _ => {}
        }
    }
    assert_eq!(answered, [1, 3, 5], "three streams answered");
    assert_eq!(refused, [(7, 0x7)], "the fourth refused (REFUSED_STREAM)");
}

#[tokio::test]
async fn idle_connections_get_goaway_after_keepalive_timeout_and_silent_ones_at_handshake_timeout()
{
    // handshake_timeout shorter than keepalive_timeout: a connection that opened streams is
    // timed by keepalive_timeout from its last stream, not by its accept-time deadline (a
    // stream opened and closed between two looks of the timer counts too).
    let gate = h2c_gate(
        "keepalive_timeout = \"2s\"\nhandshake_timeout = \"1s\"",
        &route("/echo", "echo", ""),
    )
    .await;
    // Streams, then nothing: GOAWAY and the end one keepalive_timeout after the last one.
    let mut h2 = H2Client::plain(gate.addr).await;
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "one").await;
    ws.close(None).await.unwrap();
    until_server_end_stream(&mut ws).await;
    ws.get_mut().send.send_data(Bytes::new(), true).unwrap();
    let (status, _, _) = h2.get("/echo").await;
    assert_eq!(status, 426, "a plain request on a WebSocket route");
    let last = std::time::Instant::now();
    let ended = within("the idle connection to end", WAIT, h2.conn)
        .await
        .unwrap();
    let after = last.elapsed();
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_millis(3500),
        "ended {after:?} after its last stream (keepalive_timeout 2 s): {ended:?}"
    );
    // A connection that never opens a stream: closed at handshake_timeout.
    let opened = std::time::Instant::now();
    let h2 = H2Client::plain(gate.addr).await;
    within("the silent connection to end", WAIT, h2.conn)
        .await
        .unwrap()
        .ok();
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "ended {after:?} after accept (handshake_timeout 1 s)"
    );
}

#[tokio::test]
async fn a_reload_keeps_http2_connections_and_their_streams() {
    let dir = TempDir::new();
    let path = dir.path().join("wsgate.toml");
    let config = |extra: &str| {
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\nhttp2 = true\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n{extra}")
    };
    std::fs::write(&path, config("")).unwrap();
    let gate = Gate::from_file(&path).await;
    let mut h2 = H2Client::plain(gate.addr).await;
    let mut ws = h2.ws("/echo", &[]).await;
    round_trip(&mut ws, "before").await;
    std::fs::write(
        &path,
        config("[[route]]\npath = \"/more\"\nbackend = \"echo\"\n"),
    )
    .unwrap();
    gate.handle.reload().await.expect("reload");
    round_trip(&mut ws, "after").await;
    let mut again = h2.ws("/echo", &[]).await;
    round_trip(&mut again, "a new stream on the old connection").await;
    // New connections see the new config.
    let mut fresh = H2Client::plain(gate.addr).await;
    let mut more = fresh.ws("/more", &[]).await;
    round_trip(&mut more, "new route").await;
}

/// The admin listener lists HTTP/2 WebSockets (many on one connection) and closes one
/// stream's session with the code its client sees, leaving its neighbours on the connection.
#[tokio::test]
async fn the_session_api_lists_and_closes_http2_streams_one_by_one() {
    // The closed client does not answer the close here: its session ends at close_timeout.
    let gate = h2c_gate("close_timeout = \"1s\"", &route("/echo", "echo", "")).await;
    let admin = gate.admin.unwrap();
    let mut h2 = H2Client::plain(gate.addr).await;
    let mut one = h2.ws("/echo", &[]).await;
    let mut two = h2.ws("/echo", &[]).await;
    round_trip(&mut one, "one").await;
    round_trip(&mut two, "two").await;
    let (status, body) = http_get(admin, "/sessions").await;
    assert_eq!(status, 200);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.len(), 2, "{body}");
    let peers: std::collections::HashSet<_> =
        listed.iter().map(|s| s["peer"].to_string()).collect();
    assert_eq!(peers.len(), 1, "both from one connection: {body}");
    let id = listed[0]["id"].as_u64().unwrap();
    let closed = raw_request(
        admin,
        format!("POST /sessions/{id}/close?code=4001&reason=moved HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(closed.status, 200, "{closed:?}");
    eventually("the closed session to leave the list", WAIT, || async {
        let (_, body) = http_get(admin, "/sessions").await;
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .len()
            == 1
    })
    .await;
    // Whichever stream it was has 4001 waiting; the other echoes a probe.
    let (mut got, mut echoed) = (None, 0);
    for ws in [&mut one, &mut two] {
        let _ = ws.send(Message::Text("probe".into())).await;
        match within("a close or an echo", WAIT, ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => got = Some(u16::from(frame.code)),
            Some(Ok(Message::Text(t))) if t.as_str() == "probe" => echoed += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(echoed, 1, "the other stream on the connection goes on");
    assert_eq!(
        got,
        Some(4001),
        "the closed stream's client saw the operator's code"
    );
}
