//! Route auth before the upgrade: Basic against an htpasswd file made by Apache's own
//! `htpasswd -B`, bearer tokens (header, query, cookie), and client certificate names on an
//! mTLS listener. A refused request never reaches the backend, and no credential reaches the
//! log.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// An echo backend that counts the connections it accepted.
async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let addr = backend(move |mut s| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
    })
    .await;
    (addr, count)
}

/// Opens a session with extra request headers; the status when refused, with its
/// WWW-Authenticate.
async fn open(url: &str, headers: &[(&str, &str)]) -> Result<(), (u16, Option<String>)> {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut ws, _)) => {
            ws.send(Message::binary(b"authed".to_vec())).await.unwrap();
            let echoed = within("the echo after auth", WAIT, ws.next()).await;
            assert_eq!(echoed.unwrap().unwrap().into_data(), &b"authed"[..]);
            Ok(())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err((
            r.status().as_u16(),
            r.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned()),
        )),
        Err(e) => panic!("{e}"),
    }
}

fn htpasswd(args: &[&str]) -> String {
    let out = output_within(Command::new("htpasswd").args(args), WAIT);
    assert!(
        out.status.success(),
        "htpasswd (apache2-utils; scripts/test installs it)"
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn basic_auth_from_an_apache_htpasswd_file() {
    let (echo, connects) = counting_echo().await;
    let dir = TempDir::new();
    let users = dir.path().join("users.htpasswd");
    let alice = htpasswd(&["-nbB", "alice", "s3cret-pw"]);
    std::fs::write(&users, format!("# made by htpasswd -B\n{alice}")).unwrap();
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{echo}\"\nauth = {{ basic = \"{}\" }}\n",
        users.display()
    ));
    let url = format!("ws://{}/", gate.addr);
    let basic = |up: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(up)
        )
    };
    let challenge = Some("Basic realm=\"wsgate\", charset=\"UTF-8\"".to_owned());
    assert_eq!(open(&url, &[]).await, Err((401, challenge.clone())));
    let wrong = basic("alice:wrong-pw");
    assert_eq!(
        open(&url, &[("Authorization", &wrong)]).await,
        Err((401, challenge.clone()))
    );
    let nobody = basic("mallory:s3cret-pw");
    assert_eq!(
        open(&url, &[("Authorization", &nobody)]).await,
        Err((401, challenge))
    );
    assert_eq!(
        connects.load(Ordering::SeqCst),
        0,
        "no backend connect before auth"
    );
    let right = basic("alice:s3cret-pw");
    assert_eq!(open(&url, &[("Authorization", &right)]).await, Ok(()));
    assert_eq!(connects.load(Ordering::SeqCst), 1);

    gate.wait_for_log("credentials_refused");
    gate.wait_for_log_lines("upgraded", 1);
    let log = gate.log_text();
    for secret in ["s3cret-pw", "wrong-pw", &wrong[6..], &right[6..], "mallory"] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
}

#[test]
fn htpasswd_hashes_other_than_bcrypt_stop_the_config() {
    let dir = TempDir::new();
    let users = dir.path().join("users");
    let md5 = htpasswd(&["-nbm", "bob", "pw"]);
    let sha = htpasswd(&["-nbs", "carol", "pw"]);
    let good = htpasswd(&["-nbB", "alice", "pw"]);
    for (text, line, user) in [(format!("{good}{md5}"), 3, "bob"), (sha, 1, "carol")] {
        std::fs::write(&users, &text).unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\nauth = { basic = \"users\" }\n",
        )
        .unwrap();
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .arg("--check-config")
                .arg(&config),
            WAIT,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("line 6")
                && err.contains(&format!("line {line}: user \"{user}\""))
                && err.contains("not bcrypt"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn bearer_tokens_by_header_query_or_cookie() {
    let (echo, connects) = counting_echo().await;
    let dir = TempDir::new();
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, "# tokens\ntok-AAAA-1111\ntok-BBBB-2222\n").unwrap();
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{echo}\"\nauth = {{ bearer = \"{}\" }}\n",
        tokens.display()
    ));
    let url = |q: &str| format!("ws://{}/{q}", gate.addr);
    assert_eq!(
        open(&url(""), &[]).await,
        Err((401, Some("Bearer realm=\"wsgate\"".into())))
    );
    let refused = Err((
        401,
        Some("Bearer realm=\"wsgate\", error=\"invalid_token\"".into()),
    ));
    assert_eq!(
        open(&url(""), &[("Authorization", "Bearer tok-WRONG-0000")]).await,
        refused
    );
    assert_eq!(open(&url("?access_token=tok-AAAA-111"), &[]).await, refused);
    assert_eq!(
        connects.load(Ordering::SeqCst),
        0,
        "no backend connect before auth"
    );
    assert_eq!(
        open(&url(""), &[("Authorization", "Bearer tok-AAAA-1111")]).await,
        Ok(())
    );
    assert_eq!(open(&url("?access_token=tok-BBBB-2222"), &[]).await, Ok(()));
    assert_eq!(
        open(&url(""), &[("Cookie", "a=b; access_token=tok-AAAA-1111")]).await,
        Ok(())
    );
    assert_eq!(connects.load(Ordering::SeqCst), 3);

    // Every line up to the last session's is written before the log is searched.
    gate.wait_for_log_lines("upgraded", 3);
    let log = gate.log_text();
    for secret in ["tok-", "access_token"] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
}

#[tokio::test]
async fn client_certificate_names_on_an_mtls_listener() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let (echo, connects) = counting_echo().await;
    let dir = TempDir::new();
    for (prefix, cn) in [
        ("server", "localhost"),
        ("alice", "alice"),
        ("mallory", "mallory"),
    ] {
        gen_certs(dir.path(), "ec", prefix, cn);
    }
    let d = dir.path().display();
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{d}/server.crt\", key = \"{d}/server.key\", client_ca = \"{d}/ca.crt\" }}\n[[route]]\npath = \"/\"\nbackend = \"tcp://{echo}\"\nauth = {{ client_cert_names = [\"alice\", \"bob\"] }}\n"
    ))
    .await;
    let connect = |who: &'static str| {
        let dir = dir.path().to_owned();
        async move {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(dir.join("ca.crt")).unwrap())
                .unwrap();
            let chain =
                vec![CertificateDer::from_pem_file(dir.join(format!("{who}.crt"))).unwrap()];
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{who}.key"))).unwrap();
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap();
            let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            within(
                "the wss handshake",
                WAIT,
                tokio_tungstenite::client_async("wss://localhost/", tls),
            )
            .await
        }
    };
    match connect("mallory").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("mallory: {other:?}"),
    }
    assert_eq!(connects.load(Ordering::SeqCst), 0);
    let (mut ws, _) = connect("alice").await.expect("alice is allowed");
    ws.send(Message::binary(b"alice".to_vec())).await.unwrap();
    let echoed = within("alice's echo", WAIT, ws.next()).await;
    assert_eq!(echoed.unwrap().unwrap().into_data(), &b"alice"[..]);
}

#[test]
fn client_cert_names_need_an_mtls_listener() {
    let err = wsgate::Config::parse(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\nauth = { client_cert_names = [\"alice\"] }\n",
        "t.toml",
        std::path::Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("line 6") && err.contains("tls.client_ca"),
        "{err}"
    );
}

#[tokio::test]
async fn auth_files_are_read_again_on_reload() {
    let (echo, _) = counting_echo().await;
    let dir = TempDir::new();
    std::fs::write(dir.path().join("tokens.txt"), "old-token\n").unwrap();
    let config = dir.path().join("wsgate.toml");
    std::fs::write(
        &config,
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{echo}\"\nauth = {{ bearer = \"tokens.txt\" }}\n"),
    )
    .unwrap();
    let gate = Gate::from_file(&config).await;
    let url = |t: &str| format!("ws://{}/?access_token={t}", gate.addr);
    assert_eq!(open(&url("old-token"), &[]).await, Ok(()));
    std::fs::write(dir.path().join("tokens.txt"), "new-token\n").unwrap();
    // Not before the reload: the file is read with the config.
    assert_eq!(
        open(&url("new-token"), &[]).await.map_err(|e| e.0),
        Err(401)
    );
    gate.handle.reload().await.expect("reload");
    assert_eq!(open(&url("new-token"), &[]).await, Ok(()));
    assert_eq!(
        open(&url("old-token"), &[]).await.map_err(|e| e.0),
        Err(401)
    );
}
