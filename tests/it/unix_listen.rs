//! Unix-socket listeners (`[[listen]] addr = "unix:PATH"`): sessions over them, the socket
//! file's mode and lifetime (a stale file replaced at start, a live one or a non-socket an
//! error, the file removed at exit and when a reload drops the listener), TLS and plain on one
//! socket, websockify's `--unix-listen`, and wsgate behind nginx (HTTP) and HAProxy (PROXY v2)
//! over the socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

/// A config with a unix listener at `sock` (`listen_extra` lines under it), a TCP listener
/// (the test fixtures find the process by it), an admin listener and an echo route.
fn config(sock: &Path, listen_extra: &str, limits: &str) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[listen]]\naddr = \"unix:{}\"\n{listen_extra}\n\
         [admin]\naddr = \"127.0.0.1:0\"\n\n[limits]\n{limits}\n\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
        sock.display()
    )
}

/// The WebSocket handshake over any stream, then one round trip.
async fn echo_once<S>(stream: S, host: &str) -> tokio_tungstenite::WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    echo_with(stream, format!("ws://{host}/echo"), "over the socket").await
}

/// The handshake for `request` over `stream` (101 expected), then `text` echoed.
async fn echo_with<S, R>(stream: S, request: R, text: &str) -> tokio_tungstenite::WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    let (mut ws, response) = within(
        "the WebSocket handshake",
        WAIT,
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("handshake");
    assert_eq!(response.status(), 101);
    ws.send(Message::Text(text.into())).await.unwrap();
    let back = within("the echo", WAIT, ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::Text(text.into()));
    ws
}

/// The sessions the admin listener lists.
async fn sessions(admin: std::net::SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http_get(admin, "/sessions").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

async fn connect(sock: &Path) -> UnixStream {
    within(
        "connect to the unix socket",
        WAIT,
        UnixStream::connect(sock),
    )
    .await
    .expect("connect")
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_unix_listener_serves_sessions_shows_the_socket_path_and_removes_its_file_at_exit() {
    let dir = TempDir::new();
    let sock = dir.path().join("ws.sock");
    let gate = GateProcess::start(&config(&sock, "mode = \"0660\"", ""));
    let admin = gate.admin.unwrap();

    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode_of(&sock), 0o660, "mode = \"0660\" is the file's mode");

    let mut ws = echo_once(connect(&sock).await, "gate").await;
    let listed = sessions(admin).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let shown = format!("unix:{}", sock.display());
    assert_eq!(
        listed[0]["peer"],
        shown.as_str(),
        "the peer is the socket path"
    );
    ws.close(None).await.unwrap();
    gate.wait_for_log("session ended");
    assert!(gate.log_text().contains(&format!("peer={shown}")));

    // SIGTERM: the listener closes at once and its file goes with it.
    gate.signal("TERM");
    let mut gate = gate;
    let status = within("wsgate to exit after SIGTERM", WAIT, async {
        loop {
            if let Some(status) = gate.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(status.success());
    assert!(!sock.exists(), "the socket file is removed at exit");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_or_a_plain_file_stops_wsgate() {
    let dir = TempDir::new();
    // Stale: a socket file nobody accepts on (std's listener leaves its file when dropped).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let gate = GateProcess::start(&config(&stale, "", ""));
    echo_once(connect(&stale).await, "gate").await;
    drop(gate);

    // Live: another process listens there; wsgate must not take it over.
    let live = dir.path().join("live.sock");
    let _other = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let out = start_fails(&config(&live, "", ""));
    assert!(
        out.contains("another process is listening") && out.contains("live.sock"),
        "{out}"
    );
    assert!(live.exists(), "the live socket is left alone");

    // Not a socket: an operator's file is never removed.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let out = start_fails(&config(&file, "", ""));
    assert!(out.contains("not a socket"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// Runs wsgate with `toml`, expects it to exit with an error, and returns its stderr.
fn start_fails(toml: &str) -> String {
    let dir = TempDir::new();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, toml).unwrap();
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null()),
        WAIT,
    );
    assert!(!out.status.success(), "wsgate started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_unix_listener_keys_are_named_with_their_line() {
    let long = format!("/tmp/{}.sock", "x".repeat(120));
    for (listen, expect) in [
        ("addr = \"unix:\"", "give the socket file's path"),
        (&format!("addr = \"unix:{long}\"") as &str, "at most 107"),
        (
            "addr = \"unix:/tmp/a.sock\"\nmode = \"0999\"",
            "listen.mode \"0999\" is not octal",
        ),
        (
            "addr = \"unix:/tmp/a.sock\"\nmode = \"01777\"",
            "is not octal",
        ),
        (
            "addr = \"127.0.0.1:0\"\nmode = \"0660\"",
            "listen.mode is for unix-socket listeners",
        ),
    ] {
        let text = format!("[[listen]]\n{listen}\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n");
        let err = wsgate::Config::parse(&text, "t.toml", Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expect) && err.contains("line "),
            "{listen}: {err}"
        );
    }
    let text = "[[listen]]\naddr = \"unix:/tmp/a.sock\"\n[[listen]]\naddr = \"unix:/tmp/a.sock\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n";
    let err = wsgate::Config::parse(text, "t.toml", Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listed twice") && err.contains("line 4"),
        "{err}"
    );
    // A relative path is taken from the config file's folder.
    let text =
        "[[listen]]\naddr = \"unix:run/ws.sock\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n";
    let c = wsgate::Config::parse(text, "t.toml", Path::new("/srv/gate")).unwrap();
    assert_eq!(c.listen[0].addr.to_string(), "unix:/srv/gate/run/ws.sock");
}

#[tokio::test]
async fn a_reload_adds_and_removes_unix_listeners_with_their_files() {
    let dir = TempDir::new();
    let sock = dir.path().join("added.sock");
    let path = dir.path().join("wsgate.toml");
    let tcp_only =
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n";
    std::fs::write(&path, tcp_only).unwrap();
    let gate = Gate::from_file(&path).await;
    assert!(!sock.exists());

    let with_unix = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"unix:{}\"\nmode = \"0600\"\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
        sock.display()
    );
    std::fs::write(&path, with_unix).unwrap();
    gate.handle
        .reload()
        .await
        .expect("reload adds the unix listener");
    assert_eq!(mode_of(&sock), 0o600);
    // A session that started on the listener outlives its removal.
    let mut ws = echo_once(connect(&sock).await, "gate").await;

    std::fs::write(&path, tcp_only).unwrap();
    gate.handle.reload().await.expect("reload drops it");
    assert!(!sock.exists(), "a dropped unix listener's file is removed");
    ws.send(Message::Text("still here".into())).await.unwrap();
    let back = within("the echo after the reload", WAIT, ws.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, Message::Text("still here".into()));
}

/// A TLS listener with `allow_plain` on a unix socket tells the two apart by the first byte,
/// as on TCP (the socket cannot be peeked through the standard library: the byte is read
/// ahead and given back).
#[tokio::test]
async fn tls_and_plain_share_a_unix_socket_and_proxy_headers_are_read_off_it() {
    let dir = TempDir::new();
    gen_certs(dir.path(), "ec", "server", "localhost");
    let sock = dir.path().join("tls.sock");
    let listen = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}\nallow_plain = true",
        dir.path().join("server.crt").display(),
        dir.path().join("server.key").display()
    );
    let gate = GateProcess::start(&config(&sock, &listen, ""));

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.path().join("ca.crt")).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = within(
        "the TLS handshake over the unix socket",
        WAIT,
        TlsConnector::from(Arc::new(client)).connect(
            ServerName::try_from("localhost").unwrap(),
            connect(&sock).await,
        ),
    )
    .await
    .expect("TLS over the unix socket");
    echo_once(tls, "localhost").await;
    echo_once(connect(&sock).await, "localhost").await;
    drop(gate);

    // A PROXY v1 header on a unix socket names the client, as on TCP.
    let sock = dir.path().join("proxied.sock");
    let gate = GateProcess::start(&config(&sock, "proxy_protocol = true", ""));
    let mut stream = connect(&sock).await;
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\n",
    )
    .await
    .unwrap();
    let _ws = echo_once(stream, "gate").await;
    let listed = sessions(gate.admin.unwrap()).await;
    assert_eq!(listed[0]["peer"], "198.51.100.7:40000", "{listed:?}");
}

#[tokio::test]
async fn websockify_unix_listen_takes_the_target_as_its_one_argument() {
    let dir = TempDir::new();
    let sock = dir.path().join("quick.sock");
    let sock_arg = sock.display().to_string();
    let printed = output_within(
        Command::new(env!("CARGO_BIN_EXE_wsgate")).args([
            "--unix-listen",
            &sock_arg,
            "--print-config",
            "127.0.0.1:5900",
        ]),
        WAIT,
    );
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{text}");
    assert!(
        text.contains(&format!("addr = \"unix:{sock_arg}\"")) && text.contains("mode = \"600\""),
        "websockify's default mode is 600: {text}"
    );
    assert!(
        text.contains("backend = \"tcp://127.0.0.1:5900\""),
        "{text}"
    );
    let both = output_within(
        Command::new(env!("CARGO_BIN_EXE_wsgate")).args([
            "--unix-listen",
            &sock_arg,
            "6080",
            "127.0.0.1:5900",
        ]),
        WAIT,
    );
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("give no listen address"));

    // Run it: an echo backend through the socket, mode 750 as websockify writes it.
    let backend = echo_backend().await;
    let _gate = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["--unix-listen", &sock_arg, "--unix-listen-mode", "750"])
            .arg(backend.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("wsgate to listen on the unix socket", WAIT, || async {
        UnixStream::connect(&sock).await.is_ok()
    })
    .await;
    assert_eq!(mode_of(&sock), 0o750);
    let url = "ws://gate/".to_string();
    let (mut ws, _) = within(
        "the handshake",
        WAIT,
        tokio_tungstenite::client_async(url, connect(&sock).await),
    )
    .await
    .unwrap();
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let back = within("the backend's echo", WAIT, ws.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.into_data().as_ref(), &[1, 2, 3]);
}

/// nginx (Debian's) in front, speaking HTTP to wsgate over the unix socket, as a sidecar
/// behind the host's web server. Its X-Forwarded-For is believed only with `"unix:"` in
/// `trusted_proxies`.
#[tokio::test]
async fn behind_nginx_over_the_unix_socket() {
    for trusted in [false, true] {
        let dir = TempDir::new();
        let sock = dir.path().join("gate.sock");
        // Loopback networks do not stand for unix-socket peers: only "unix:" does.
        let limits = if trusted {
            "trusted_proxies = [\"unix:\"]"
        } else {
            "trusted_proxies = [\"127.0.0.0/8\", \"::1\"]"
        };
        let gate = GateProcess::start(&config(&sock, "mode = \"0666\"", limits));
        let nginx = Nginx::start(&dir, &sock);
        let tcp = within(
            "connect to nginx",
            WAIT,
            tokio::net::TcpStream::connect(nginx.addr),
        )
        .await
        .unwrap();
        // A client that claims an address of its own: nginx appends the real one.
        let url = format!("ws://{}/echo", nginx.addr);
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        request
            .headers_mut()
            .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        let _ws = echo_with(tcp, request, "via nginx").await;
        let listed = sessions(gate.admin.unwrap()).await;
        let peer = listed[0]["peer"].as_str().unwrap().to_owned();
        if trusted {
            // The rightmost address nginx did not get from the client: the client's own.
            assert_eq!(peer, "127.0.0.1:0", "trusted nginx names the client");
        } else {
            assert_eq!(
                peer,
                format!("unix:{}", sock.display()),
                "an untrusted socket peer's X-Forwarded-For is not believed"
            );
        }
    }
}

/// Debian's nginx on a free port of 127.0.0.1, proxying WebSockets to `sock`; killed on drop.
struct Nginx {
    addr: std::net::SocketAddr,
    _child: KillOnDrop,
}

impl Nginx {
    fn start(dir: &TempDir, sock: &Path) -> Nginx {
        let addr = unused_addr();
        let prefix: PathBuf = dir.path().join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        // Workers run as the test's user (root in CI: `user` names it; ignored otherwise).
        let user = if running_as_root() {
            "user root root;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}daemon off;\nmaster_process off;\nerror_log stderr warn;\npid {pid};\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n\
               fastcgi_temp_path {tmp}/fcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
               server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://unix:{sock}:;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n\
                 proxy_set_header Connection \"upgrade\";\n      proxy_set_header Host $host;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n",
            pid = prefix.join("nginx.pid").display(),
            tmp = prefix.display(),
            sock = sock.display(),
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let bin = std::env::var("WSGATE_TEST_NGINX").unwrap_or_else(|_| "nginx".into());
        let child = KillOnDrop(
            Command::new(&bin)
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx (Debian package nginx; scripts/test installs it)"),
        );
        let until = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < until,
                "nginx did not listen on {addr}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Nginx {
            addr,
            _child: child,
        }
    }
}

/// Whether the tests run as root (from /proc, no libc call).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}
