//! The websockify drop-in: static pages on a route, token-file targets, and websockify's
//! command line (equivalent to the config `--print-config` writes for it).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// A GET (or other method) with extra header lines; the connection is closed after it.
async fn get(addr: SocketAddr, method: &str, path: &str, extra: &str) -> RawResponse {
    raw_request(
        addr,
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await
}

/// A web directory with pages of several types, a directory without an index, a dot file,
/// and, beside it, a secret file.
fn web_dir(dir: &TempDir) -> std::path::PathBuf {
    let web = dir.path().join("web");
    std::fs::create_dir_all(web.join("sub")).unwrap();
    std::fs::create_dir_all(web.join("app")).unwrap();
    std::fs::write(web.join("index.html"), "<h1>index</h1>").unwrap();
    std::fs::write(web.join("app/index.html"), "<h1>app</h1>").unwrap();
    std::fs::write(web.join("rfb.js"), "export default 1;").unwrap();
    std::fs::write(web.join("mod.mjs"), "export default 2;").unwrap();
    std::fs::write(web.join("x.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(
        web.join("i.svg"),
        "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
    )
    .unwrap();
    std::fs::write(web.join("sub/file.txt"), "in sub").unwrap();
    std::fs::write(web.join(".hidden"), "SECRET-dot").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "SECRET-outside").unwrap();
    web
}

#[tokio::test]
async fn static_pages_types_validators_head_and_the_upgrade_beside_them() {
    let dir = TempDir::new();
    let web = web_dir(&dir);
    let echo = echo_backend().await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{echo}\"\nstatic = \"{}\"\n[[route]]\npath = \"/app\"\nbackend = \"echo\"\nstatic = \"{}\"\n",
        web.display(),
        web.join("app").display()
    ))
    .await;

    let index = get(gate.addr, "GET", "/", "").await;
    assert_eq!(index.status, 200, "{index:?}");
    assert_eq!(index.body, "<h1>index</h1>");
    assert_eq!(index.header("content-type"), ["text/html"]);
    assert_eq!(index.header("cache-control"), ["no-cache"]);
    let etag = index.header("etag").pop().expect("an ETag");
    let modified = index.header("last-modified").pop().expect("Last-Modified");

    for (path, mime) in [
        ("/rfb.js", "text/javascript"),
        ("/mod.mjs", "text/javascript"),
        ("/x.wasm", "application/wasm"),
        ("/i.svg", "image/svg+xml"),
        ("/sub/file.txt", "text/plain"),
    ] {
        let r = get(gate.addr, "GET", path, "").await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert!(
            r.header("content-type")[0].starts_with(mime),
            "{path}: {:?}",
            r.header("content-type")
        );
    }

    // Validators: 304 for the same ETag or a date not before Last-Modified; 200 otherwise.
    let same = get(gate.addr, "GET", "/", &format!("If-None-Match: {etag}\r\n")).await;
    assert_eq!(same.status, 304, "{same:?}");
    assert!(same.body.is_empty());
    let since = get(
        gate.addr,
        "GET",
        "/",
        &format!("If-Modified-Since: {modified}\r\n"),
    )
    .await;
    assert_eq!(since.status, 304, "{since:?}");
    let other = get(gate.addr, "GET", "/", "If-None-Match: \"other\"\r\n").await;
    assert_eq!(other.status, 200);

    // HEAD: the headers of a GET, no body.
    let head = get(gate.addr, "HEAD", "/rfb.js", "").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), ["17"]);
    assert!(head.body.is_empty(), "{head:?}");

    // Other methods, a directory without index.html (no listing), a missing file.
    let post = get(gate.addr, "POST", "/index.html", "Content-Length: 0\r\n").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), ["GET, HEAD"]);
    assert_eq!(get(gate.addr, "GET", "/sub/", "").await.status, 404);
    let listing = get(gate.addr, "GET", "/sub/", "").await;
    assert!(!listing.body.contains("file.txt"), "{listing:?}");
    assert_eq!(get(gate.addr, "GET", "/nope.html", "").await.status, 404);

    // A route under a prefix serves DIR at the prefix; the bare prefix is sent to its slash.
    let bare = get(gate.addr, "GET", "/app?x=1", "").await;
    assert_eq!(bare.status, 301);
    assert_eq!(bare.header("location"), ["/app/?x=1"]);
    let app = get(gate.addr, "GET", "/app/", "").await;
    assert_eq!((app.status, app.body.as_str()), (200, "<h1>app</h1>"));

    // The same paths upgrade to the route's backend.
    let (mut ws, _) = tokio_tungstenite::connect_async(gate.url("/index.html"))
        .await
        .unwrap();
    ws.send(Message::binary(b"through".to_vec())).await.unwrap();
    let echoed = within("the echo through a static route", WAIT, ws.next()).await;
    assert_eq!(
        echoed.unwrap().unwrap(),
        Message::binary(b"through".to_vec())
    );
}

#[tokio::test]
async fn static_pages_never_leave_their_directory() {
    let dir = TempDir::new();
    let web = web_dir(&dir);
    // wsgate's own files inside the served directory, and symlinks in and out of it.
    std::fs::write(web.join("tokens.txt"), "vnc: 127.0.0.1:1\n").unwrap();
    std::fs::write(web.join("bearer.txt"), "SECRET-bearer-token\n").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), web.join("out.txt")).unwrap();
    std::os::unix::fs::symlink(dir.path(), web.join("up")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", web.join("passwd")).unwrap();
    std::os::unix::fs::symlink(web.join("index.html"), web.join("in.html")).unwrap();
    let config = web.join("wsgate.toml");
    std::fs::write(
        &config,
        "# SECRET-config\n[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"token-file:tokens.txt\"\nstatic = \".\"\nauth = { bearer = \"bearer.txt\" }\n",
    )
    .unwrap();
    let gate = Gate::from_file(&config).await;
    let auth = "Authorization: Bearer SECRET-bearer-token\r\n";

    assert_eq!(get(gate.addr, "GET", "/", auth).await.status, 200);
    let inside = get(gate.addr, "GET", "/in.html", auth).await;
    assert_eq!(
        inside.status, 200,
        "a symlink inside the directory is served"
    );
    for path in [
        "/wsgate.toml",
        "/tokens.txt",
        "/bearer.txt",
        "/.hidden",
        "/out.txt",
        "/up/secret.txt",
        "/passwd",
        "/../secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/.%2e/secret.txt",
        "/sub/..%2f..%2fsecret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/..\\secret.txt",
        "/sub\\..\\..\\secret.txt",
        "/%5c..%5csecret.txt",
        "/index.html%00.txt",
        "/%00",
        "//etc/passwd",
        "/%2fetc/passwd",
        "http://test/../secret.txt",
        "/sub/.",
    ] {
        let r = get(gate.addr, "GET", path, auth).await;
        assert!(
            r.status == 404 || r.status == 400,
            "{path}: status {} ({r:?})",
            r.status
        );
        assert!(!r.body.contains("SECRET"), "{path} leaked: {r:?}");
        assert!(!r.body.contains("root:"), "{path} leaked: {r:?}");
        assert!(!r.body.contains("127.0.0.1:1"), "{path} leaked: {r:?}");
    }
}

/// A backend that says who it is, then echoes.
async fn named_backend(name: &'static str) -> SocketAddr {
    banner_backend(name.as_bytes()).await
}

async fn first_message(url: &str, cookie: Option<&str>) -> Result<Vec<u8>, u16> {
    let mut request = url.into_client_request().unwrap();
    if let Some(c) = cookie {
        request
            .headers_mut()
            .insert("Cookie", HeaderValue::from_str(c).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut ws, _)) => {
            let m = within("the backend's banner", WAIT, ws.next()).await;
            Ok(m.unwrap().unwrap().into_data().to_vec())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn token_files_choose_the_target_and_edits_apply_to_the_next_connection() {
    let a = named_backend("A").await;
    let b = named_backend("B").await;
    let dir = TempDir::new();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("# websockify format\nvnc-a: {a}\n\nbroken line\n"),
    )
    .unwrap();
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/websockify\"\nbackend = \"token-file:{}\"\n",
        tokens.display()
    ));
    let url = |q: &str| format!("ws://{}/websockify{q}", gate.addr);

    assert_eq!(
        first_message(&url("?token=vnc-a"), None).await,
        Ok(b"A".to_vec())
    );
    assert_eq!(
        first_message(&url(""), Some("other=1; token=vnc-a")).await,
        Ok(b"A".to_vec()),
        "the token cookie, as websockify reads it"
    );
    assert_eq!(first_message(&url("?token=nope"), None).await, Err(404));
    assert_eq!(first_message(&url(""), None).await, Err(404));
    gate.wait_for_log("line=4");

    // A live session on A; then the file changes: vnc-a moves to B and vnc-b appears.
    let (mut live, _) = tokio_tungstenite::connect_async(url("?token=vnc-a"))
        .await
        .unwrap();
    within("A's banner", WAIT, live.next()).await;
    std::fs::write(&tokens, format!("vnc-a: {b}\nvnc-b: {b}\n")).unwrap();
    assert_eq!(
        first_message(&url("?token=vnc-b"), None).await,
        Ok(b"B".to_vec())
    );
    assert_eq!(
        first_message(&url("?token=vnc-a"), None).await,
        Ok(b"B".to_vec())
    );
    live.send(Message::binary(b"still A".to_vec()))
        .await
        .unwrap();
    let echoed = within("the live session's echo", WAIT, live.next()).await;
    assert_eq!(echoed.unwrap().unwrap().into_data(), &b"still A"[..]);

    // Neither the tokens nor the mapping reach the log (every line up to the last
    // session's is written first).
    gate.wait_for_log_lines("upgraded", 5);
    let log = gate.log_text();
    for secret in ["vnc-a", "vnc-b", "nope"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[tokio::test]
async fn a_token_directory_is_read_whole_and_again_when_a_file_is_added() {
    let a = named_backend("A").await;
    let b = named_backend("B").await;
    let dir = TempDir::new();
    let tokens = dir.path().join("tokens.d");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::write(tokens.join("one"), format!("t1: {a}\n")).unwrap();
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"token-file:{}\"\n",
        tokens.display()
    ))
    .await;
    assert_eq!(
        first_message(&gate.url("/?token=t1"), None).await,
        Ok(b"A".to_vec())
    );
    assert_eq!(first_message(&gate.url("/?token=t2"), None).await, Err(404));
    std::fs::write(tokens.join("two"), format!("t2: {b}\n")).unwrap();
    assert_eq!(
        first_message(&gate.url("/?token=t2"), None).await,
        Ok(b"B".to_vec())
    );
}

fn print_config(args: &[&str], dir: &std::path::Path) -> Result<String, String> {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--print-config")
            .args(args)
            .current_dir(dir),
        WAIT,
    );
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn websockify_command_lines_are_their_config() {
    let dir = TempDir::new();
    web_dir(&dir);
    gen_certs(dir.path(), "ec", "self", "localhost 127.0.0.1");
    std::fs::write(dir.path().join("tokens"), "t: 127.0.0.1:5901\n").unwrap();
    let d = dir.path();
    // Each command line, and what its config must say.
    for (args, wanted) in [
        (
            &["6080", "localhost:5900"][..],
            &[
                "addr = \"0.0.0.0:6080\"",
                "backend = \"tcp://localhost:5900\"",
            ][..],
        ),
        (
            &["--web", "web", "127.0.0.1:6080", "127.0.0.1:5900"],
            &["addr = \"127.0.0.1:6080\"", "static = \"web\""],
        ),
        (
            &[
                "--token-plugin",
                "TokenFile",
                "--token-source",
                "tokens",
                "6080",
            ],
            &["backend = \"token-file:tokens\""],
        ),
        (
            &["--target-config", "tokens", "6080"],
            &["backend = \"token-file:tokens\""],
        ),
        (
            &["--cert", "self.crt", "--key", "self.key", "6080", "h:1"],
            &[
                "cert = \"self.crt\", key = \"self.key\"",
                "allow_plain = true",
            ],
        ),
        (
            &[
                "--cert",
                "self.crt",
                "--key",
                "self.key",
                "--ssl-only",
                "6080",
                "h:1",
            ],
            &["cert = \"self.crt\""],
        ),
        (
            &["--heartbeat", "20", "6080", "h:1"],
            &["ping_interval = \"20s\""],
        ),
        (
            &["--ssl-target", "6080", "h:1"],
            &["backend = \"tls://h:1\""],
        ),
        (
            &["--unix-target", "/run/vnc.sock", "6080"],
            &["backend = \"unix:/run/vnc.sock\""],
        ),
    ] {
        let toml = print_config(args, d).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        for w in wanted {
            assert!(toml.contains(w), "{args:?} → {toml}");
        }
        if args.contains(&"--ssl-only") {
            assert!(!toml.contains("allow_plain"), "{toml}");
        }
        // The text loads as a config file (paths from the same directory).
        let file = d.join("printed.toml");
        std::fs::write(&file, &toml).unwrap();
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .arg("--check-config")
                .arg(&file)
                .current_dir(d),
            WAIT,
        );
        assert!(
            out.status.success(),
            "{args:?}: {toml}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (args, error) in [
        (&["6080"][..], "give a target"),
        (
            &[
                "--token-plugin",
                "JSONTokenApi",
                "--token-source",
                "http://broker/token",
                "6080",
            ],
            "TokenFile, ReadOnlyTokenFile, TokenRedis and JWTTokenApi are taken",
        ),
        (
            &[
                "--auth-plugin",
                "BasicHTTPAuth",
                "--auth-source",
                "u:p",
                "6080",
                "h:1",
            ],
            "only ClientCertCNAuth",
        ),
        (&["--ssl-only", "6080", "h:1"], "--ssl-only needs --cert"),
        (&["nope", "h:1"], "is not [SOURCE_ADDR:]SOURCE_PORT"),
    ] {
        let err = print_config(args, d).expect_err("refused");
        assert!(err.contains(error), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn websockify_web_and_target_run_as_websockify_does() {
    let dir = TempDir::new();
    web_dir(&dir);
    let echo = echo_backend().await;
    let gate = GateProcess::start_cli(&["--web", "web", "127.0.0.1:0", &echo.to_string()], dir);
    let page = get(gate.addr, "GET", "/", "").await;
    assert_eq!((page.status, page.body.as_str()), (200, "<h1>index</h1>"));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/websockify", gate.addr))
        .await
        .unwrap();
    ws.send(Message::binary(b"vnc".to_vec())).await.unwrap();
    let echoed = within("the echo", WAIT, ws.next()).await;
    assert_eq!(echoed.unwrap().unwrap().into_data(), &b"vnc"[..]);
}

#[tokio::test]
async fn a_cert_port_takes_ws_and_wss_unless_ssl_only() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use std::sync::Arc;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let echo = echo_backend().await;
    for ssl_only in [false, true] {
        let dir = TempDir::new();
        gen_certs(dir.path(), "ec", "self", "localhost 127.0.0.1");
        // websockify's default: the key in the certificate file.
        let pem = format!(
            "{}{}",
            std::fs::read_to_string(dir.path().join("self.crt")).unwrap(),
            std::fs::read_to_string(dir.path().join("self.key")).unwrap()
        );
        std::fs::write(dir.path().join("self.pem"), pem).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(dir.path().join("ca.crt")).unwrap())
            .unwrap();
        let mut args = vec!["--cert", "self.pem", "127.0.0.1:0"];
        if ssl_only {
            args.insert(0, "--ssl-only");
        }
        let target = echo.to_string();
        args.push(&target);
        let gate = GateProcess::start_cli(&args, dir);

        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let (mut wss, _) = within(
            "the wss handshake",
            WAIT,
            tokio_tungstenite::client_async("wss://localhost/", tls),
        )
        .await
        .unwrap();
        wss.send(Message::binary(b"tls".to_vec())).await.unwrap();
        let echoed = within("the wss echo", WAIT, wss.next()).await;
        assert_eq!(echoed.unwrap().unwrap().into_data(), &b"tls"[..]);

        let plain = tokio_tungstenite::connect_async(format!("ws://{}/", gate.addr)).await;
        assert_eq!(plain.is_ok(), !ssl_only, "ssl_only={ssl_only}");
    }
}

#[tokio::test]
async fn idle_timeout_exits_after_that_long_without_a_connection() {
    let echo = echo_backend().await;
    let dir = TempDir::new();
    let started = Instant::now();
    let mut gate = GateProcess::start_cli(
        &["--idle-timeout", "2", "127.0.0.1:0", &echo.to_string()],
        dir,
    );
    // A session held open keeps it running past the timeout.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", gate.addr))
        .await
        .unwrap();
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(3) {
        ws.send(Message::binary(b"x".to_vec())).await.unwrap();
        within("an echo", WAIT, ws.next()).await;
        assert!(
            gate.child.try_wait().unwrap().is_none(),
            "exited with a session open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(2));
    ws.close(None).await.unwrap();
    drop(ws);
    let closed = Instant::now();
    let status = loop {
        if let Some(s) = gate.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            closed.elapsed() < Duration::from_secs(6),
            "still running 6 s after the last session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let idle = closed.elapsed();
    assert!(status.success());
    // 2 s of no connection, checked every 200 ms (so up to one tick early against our clock),
    // and the drain of nothing.
    assert!(
        idle >= Duration::from_millis(1750) && idle < Duration::from_millis(3500),
        "exited {idle:?} after the last session"
    );
}
