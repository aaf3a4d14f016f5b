//! wss:// listeners with certificates made at test time by certs/gen-dev-certs.sh (openssl),
//! and a rustls client (tokio-rustls) under tokio-tungstenite.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

/// Certificates for a test: CA, an ECDSA (SEC1) localhost cert, an RSA (PKCS#1) cert for
/// other.test, an Ed25519 (PKCS#8) cert for ed.test, and a client cert.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new();
        for (key_type, prefix, names) in [
            ("ec", "server", "localhost 127.0.0.1"),
            ("rsa", "other", "other.test"),
            ("ed25519", "ed", "ed.test"),
            ("ec", "client", "client.test"),
        ] {
            Certs::make(dir.path(), key_type, prefix, names);
        }
        Certs { dir }
    }

    fn make(dir: &Path, key_type: &str, prefix: &str, names: &str) {
        gen_certs(dir, key_type, prefix, names);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn der(&self, name: &str) -> Vec<u8> {
        CertificateDer::from_pem_file(self.path(name))
            .unwrap()
            .to_vec()
    }

    fn listener(&self, extra: &str) -> String {
        format!(
            "tls = {{ cert = \"{}\", key = \"{}\", sni = [{{ names = [\"other.test\"], cert = \"{}\", key = \"{}\" }}, {{ names = [\"ed.test\"], cert = \"{}\", key = \"{}\" }}]{extra} }}",
            self.p("server.crt"),
            self.p("server.key"),
            self.p("other.crt"),
            self.p("other.key"),
            self.p("ed.crt"),
            self.p("ed.key"),
        )
    }

    /// A rustls client of one TLS version that trusts the test CA (its auth still to choose).
    fn client_for(
        &self,
        version: &'static tokio_rustls::rustls::SupportedProtocolVersion,
    ) -> tokio_rustls::rustls::ConfigBuilder<
        ClientConfig,
        tokio_rustls::rustls::client::WantsClientCert,
    > {
        let mut roots = RootCertStore::empty();
        roots.add(self.der("ca.crt").into()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
    }

    fn connector(&self, client_cert: bool) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.path("ca.crt")).unwrap())
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = if client_cert {
            let chain = vec![CertificateDer::from_pem_file(self.path("client.crt")).unwrap()];
            let key = PrivateKeyDer::from_pem_file(self.path("client.key")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        TlsConnector::from(Arc::new(config))
    }
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// TLS to `addr` with SNI `name`, then the WebSocket handshake; returns the session and the
/// server's leaf certificate.
async fn wss(
    addr: std::net::SocketAddr,
    name: &str,
    connector: &TlsConnector,
    path: &str,
) -> Result<(Wss, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    assert!(alpn.is_none() || alpn.as_deref() == Some(&b"http/1.1"[..]));
    let url = format!("wss://{name}{path}");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .map_err(|_| "websocket handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((ws, leaf))
}

#[tokio::test]
async fn wss_bridge_and_echo_routes() {
    let certs = Certs::new();
    let backend = echo_backend().await;
    let g = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n[[route]]\npath = \"/tcp\"\nbackend = \"tcp://{backend}\"\n",
        certs.listener("")
    ))
    .await;
    let c = certs.connector(false);
    let (mut ws, leaf) = wss(g.addr, "localhost", &c, "/echo").await.unwrap();
    assert_eq!(leaf, certs.der("server.crt"));
    ws.send(Message::text("over wss")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over wss"));

    let (ws, _) = wss(g.addr, "localhost", &c, "/tcp").await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let data = pattern(2 * 1024 * 1024, 5);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(64 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx
    });
    let mut got = Vec::new();
    while got.len() < data.len() {
        match tokio::time::timeout(WAIT, rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == data, "bytes intact through the wss bridge");
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn sni_chooses_the_certificate_with_a_default() {
    let certs = Certs::new();
    let g = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        certs.listener("")
    ))
    .await;
    let c = certs.connector(false);
    for (name, cert) in [
        ("other.test", "other.crt"),
        ("ed.test", "ed.crt"),
        ("localhost", "server.crt"),
    ] {
        let (mut ws, leaf) = wss(g.addr, name, &c, "/").await.unwrap();
        assert_eq!(leaf, certs.der(cert), "SNI {name}");
        ws.send(Message::text(name)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(name));
    }
    // An IP address sends no SNI: the default certificate.
    let (_, leaf) = wss(g.addr, "127.0.0.1", &c, "/").await.unwrap();
    assert_eq!(leaf, certs.der("server.crt"));
}

#[tokio::test]
async fn client_certificate_required_when_client_ca_is_set() {
    let certs = Certs::new();
    let extra = format!(", client_ca = \"{}\"", certs.p("ca.crt"));
    let g = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        certs.listener(&extra)
    ))
    .await;
    let (mut ws, _) = wss(g.addr, "localhost", &certs.connector(true), "/")
        .await
        .unwrap();
    ws.send(Message::text("with a certificate")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("with a certificate")
    );
    // Without one the TLS layer refuses (TLS 1.3 reports it on the first read).
    let refused = wss(g.addr, "localhost", &certs.connector(false), "/").await;
    assert!(
        refused.is_err(),
        "a client without a certificate must be refused"
    );
}

/// Plain HTTP, garbage, and a client hanging up mid-handshake: each closed cleanly, counted,
/// and the listener keeps serving.
#[tokio::test]
async fn non_tls_and_broken_handshakes_are_closed_cleanly() {
    let certs = Certs::new();
    let g = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nhandshake_timeout = \"500ms\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        certs.listener("")
    ))
    .await;
    for junk in [
        &upgrade_request("/", "").into_bytes()[..],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3][..],
        &b"\x00\xffgarbage"[..],
    ] {
        let mut s = TcpStream::connect(g.addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "connection closed, not left hanging");
        assert!(!String::from_utf8_lossy(&sink).contains("101"));
    }
    // Hang up mid-handshake.
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    drop(s);
    // A silent TLS client is closed at handshake_timeout.
    let mut silent = TcpStream::connect(g.addr).await.unwrap();
    assert!(expect_eof(&mut silent).await);
    // Still serving.
    let (mut ws, _) = wss(g.addr, "localhost", &certs.connector(false), "/")
        .await
        .unwrap();
    ws.send(Message::text("fine")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("fine"));
    drop(ws);
    let admin = g.admin.unwrap();
    let until = std::time::Instant::now() + WAIT;
    loop {
        let text = http_get(admin, "/metrics").await.1;
        let m = parse_metrics(&text);
        let failures = m
            .get("wsgate_tls_handshake_failures_total")
            .copied()
            .unwrap_or(0.0);
        let open = m.get("wsgate_client_connections").copied().unwrap_or(-1.0);
        if failures >= 5.0 && open == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "failures {failures}, open {open}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One SIGHUP that swaps the certificate (files renewed in place), adds a route and changes
/// a limit, while a wss session streams 4 MiB through it all: new connections see the new
/// certificate, route and limit; the live session loses no byte (SHA-256).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_certificate_route_and_limit_while_a_session_streams() {
    use sha2::{Digest, Sha256};
    let certs = Certs::new();
    let listen = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        certs.p("server.crt"),
        certs.p("server.key")
    );
    let gate = GateProcess::start(&format!(
        "{listen}[[route]]\npath = \"/\"\nbackend = \"echo\"\n"
    ));
    let c = certs.connector(false);
    let old = certs.der("server.crt");
    let (live, leaf) = wss(gate.addr, "localhost", &c, "/").await.unwrap();
    assert_eq!(leaf, old);
    let (mut tx, mut rx) = live.split();
    let data = pattern(4 * 1024 * 1024, 77);
    let want = Sha256::digest(&data);
    let sent = data.clone();
    // Half the data before the reload, the rest after it (64 KiB messages, over the old
    // limit of the new config).
    let (go_on, reloaded) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let (first, rest) = sent.split_at(sent.len() / 2);
        for chunk in first.chunks(64 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        reloaded.await.unwrap();
        for chunk in rest.chunks(64 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx
    });
    let n = data.len();
    let reader = tokio::spawn(async move { sha256_of_binary(&mut rx, n).await });

    Certs::make(certs.dir.path(), "rsa", "server", "localhost 127.0.0.1");
    let renewed = certs.der("server.crt");
    assert_ne!(renewed, old);
    std::fs::write(
        &gate.config_path,
        format!("{listen}[limits]\nmax_message_size = \"1KiB\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n[[route]]\npath = \"/added\"\nbackend = \"echo\"\n"),
    )
    .unwrap();
    gate.signal("HUP");
    gate.wait_for_log("config reloaded");
    // A new client (no session to resume: a returning one resumes its session, which keeps
    // the certificate it was made with) gets the renewed certificate.
    let fresh = certs.connector(false);
    let (mut added, leaf) = wss(gate.addr, "localhost", &fresh, "/added").await.unwrap();
    assert_eq!(leaf, renewed, "new connections get the renewed certificate");
    added.send(Message::text("new route")).await.unwrap();
    assert_eq!(
        added.next().await.unwrap().unwrap(),
        Message::text("new route")
    );
    added.send(Message::binary(vec![0u8; 2048])).await.unwrap();
    match added.next().await.unwrap().unwrap() {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1009, "the new limit"),
        other => panic!("expected 1009, got {other:?}"),
    }
    go_on.send(()).unwrap();
    assert_eq!(
        reader.await.unwrap(),
        want.to_vec(),
        "the live session lost no byte"
    );
    drop(writer.await.unwrap());
}

/// A missing file or a key that does not match its certificate stops wsgate at start, with
/// the file named; --check-config reports the same.
#[test]
fn bad_certificate_files_stop_wsgate_at_start() {
    let certs = Certs::new();
    let dir = TempDir::new();
    let cases = [
        (certs.p("server.crt"), certs.p("other.key"), "does not fit"),
        (certs.p("missing.crt"), certs.p("server.key"), "missing.crt"),
        (certs.p("server.crt"), certs.p("missing.key"), "missing.key"),
    ];
    for (i, (cert, key, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(
            &path,
            format!("[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{cert}\", key = \"{key}\" }}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n"),
        )
        .unwrap();
        for flag in ["--check-config", "--config"] {
            let out = output_within(
                Command::new(env!("CARGO_BIN_EXE_wsgate"))
                    .arg(flag)
                    .arg(&path),
                Duration::from_secs(60),
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} {i}: {err}");
            assert!(
                err.contains(needle) && err.contains("line 3"),
                "{flag} {i}: {err}"
            );
        }
    }
}

/// Over max_connections a TLS listener does no TLS work: the connection is closed at accept
/// (the client's handshake fails at once) and counted as an over_capacity rejection, not as a
/// TLS failure.
#[tokio::test]
async fn over_capacity_on_a_tls_listener_is_closed_without_a_handshake() {
    let certs = Certs::new();
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections = 1\nhandshake_timeout = \"30s\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        certs.listener("")
    ))
    .await;
    let admin = gate.admin.unwrap();
    let connector = certs.connector(false);
    // A silent connection holds the only place.
    let _holder = TcpStream::connect(gate.addr).await.unwrap();
    eventually("the holder to be accepted", WAIT, || async {
        metric(admin, "wsgate_client_connections").await == 1.0
    })
    .await;
    let started = std::time::Instant::now();
    let refused = within(
        "the over-capacity TLS handshake to fail",
        WAIT,
        wss(gate.addr, "localhost", &connector, "/"),
    )
    .await;
    assert!(refused.is_err(), "no TLS session over the cap");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at accept, not after handshake_timeout: {:?}",
        started.elapsed()
    );
    let m = parse_metrics(&http_get(admin, "/metrics").await.1);
    assert_eq!(
        m.get("wsgate_handshake_rejections_total{route=\"none\",reason=\"over_capacity\"}"),
        Some(&1.0)
    );
    assert_eq!(m.get("wsgate_tls_handshake_failures_total"), Some(&0.0));
}

/// One wss session to `addr` (SNI localhost) with a round trip, so a TLS 1.3 ticket sent after
/// the handshake is read, then closed; how its TLS handshake went.
async fn session_kind(
    addr: std::net::SocketAddr,
    connector: &TlsConnector,
) -> Option<tokio_rustls::rustls::HandshakeKind> {
    let (mut ws, _) = wss(addr, "localhost", connector, "/").await.unwrap();
    let kind = ws.get_ref().get_ref().1.handshake_kind();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    ws.close(None).await.unwrap();
    kind
}

/// A returning client resumes its TLS session (a ticket from wsgate) instead of a full
/// handshake, in TLS 1.3 and 1.2, and still after a reload (the ticket keys are the process's).
#[tokio::test]
async fn returning_clients_resume_their_tls_session() {
    use tokio_rustls::rustls::HandshakeKind;
    let certs = Certs::new();
    let dir = TempDir::new();
    let path = dir.path().join("wsgate.toml");
    let toml = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        certs.listener("")
    );
    std::fs::write(&path, &toml).unwrap();
    let gate = Gate::from_file(&path).await;
    for version in [
        &tokio_rustls::rustls::version::TLS13,
        &tokio_rustls::rustls::version::TLS12,
    ] {
        let config = certs.client_for(version).with_no_client_auth();
        // One client config: its session cache keeps what the server gave it.
        let connector = TlsConnector::from(Arc::new(config));
        let mut kinds = Vec::new();
        for round in 0..3 {
            if round == 2 {
                gate.handle.reload().await.expect("reload");
            }
            kinds.push(session_kind(gate.addr, &connector).await);
        }
        assert_eq!(
            kinds,
            [
                Some(HandshakeKind::Full),
                Some(HandshakeKind::Resumed),
                Some(HandshakeKind::Resumed)
            ],
            "{version:?}"
        );
    }
}

/// wsgate's listeners choose AES-128-GCM when the client offers it, even listed after
/// AES-256-GCM (as rustls and OpenSSL clients list them), in TLS 1.3 and 1.2; a client that
/// offers only ChaCha20-Poly1305 still gets it.
#[tokio::test]
async fn listeners_prefer_aes_128_gcm_over_the_clients_order() {
    use tokio_rustls::rustls::crypto::ring::{cipher_suite, default_provider};
    use tokio_rustls::rustls::{version, CipherSuite};
    let certs = Certs::new();
    let dir = TempDir::new();
    let path = dir.path().join("wsgate.toml");
    let toml = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        certs.listener("")
    );
    std::fs::write(&path, &toml).unwrap();
    let gate = Gate::from_file(&path).await;
    let cases = [
        (&version::TLS13, None, CipherSuite::TLS13_AES_128_GCM_SHA256),
        (
            &version::TLS12,
            None,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            &version::TLS13,
            Some(cipher_suite::TLS13_CHACHA20_POLY1305_SHA256),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (version, only, expected) in cases {
        let mut provider = default_provider();
        assert_eq!(
            provider.cipher_suites[0].suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client lists AES-256 first"
        );
        if let Some(only) = only {
            provider.cipher_suites = vec![only];
        }
        let mut roots = RootCertStore::empty();
        roots.add(certs.der("ca.crt").into()).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(config));
        let (mut ws, _) = wss(gate.addr, "localhost", &connector, "/").await.unwrap();
        let chosen = ws.get_ref().get_ref().1.negotiated_cipher_suite();
        assert_eq!(chosen.map(|s| s.suite()), Some(expected), "{version:?}");
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
        ws.close(None).await.unwrap();
    }
}

/// Regression: a ticket from a listener without client_ca resumed on a client_ca listener and
/// got 101 with no client certificate (one ticketer for every listener, and rustls does not
/// compare client-auth settings on resumption). Now client_ca listeners never resume, in TLS
/// 1.3 and 1.2, so every session there was verified against the CA loaded now.
#[tokio::test]
async fn a_ticket_from_another_listener_never_skips_the_client_certificate() {
    use tokio_rustls::rustls::HandshakeKind;
    let certs = Certs::new();
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n[[listen]]\naddr = \"127.0.0.2:0\"\n{}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        certs.listener(""),
        certs.listener(&format!(", client_ca = \"{}\"", certs.p("ca.crt"))),
    ))
    .await;
    let (open, mtls) = (gate.addrs[0], gate.addrs[1]);
    for version in [
        &tokio_rustls::rustls::version::TLS13,
        &tokio_rustls::rustls::version::TLS12,
    ] {
        let builder = certs.client_for(version);
        let chain = vec![CertificateDer::from_pem_file(certs.path("client.crt")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(certs.path("client.key")).unwrap();
        let with_cert = TlsConnector::from(Arc::new(
            builder.clone().with_client_auth_cert(chain, key).unwrap(),
        ));
        let without = TlsConnector::from(Arc::new(builder.with_no_client_auth()));
        // A ticket from the open listener (read after a round trip)...
        session_kind(open, &without).await;
        // ...gets no session on the client_ca listener.
        let refused = wss(mtls, "localhost", &without, "/").await;
        assert!(refused.is_err(), "{version:?}: resumed past client_ca");
        // A client with a certificate gets in, by a full handshake every time.
        let mut kinds = Vec::new();
        for _ in 0..2 {
            kinds.push(session_kind(mtls, &with_cert).await);
        }
        assert_eq!(
            kinds,
            [Some(HandshakeKind::Full), Some(HandshakeKind::Full)],
            "{version:?}"
        );
    }
}
