//! Shared test fixtures: wsgate in-process or as a process, real TCP backends, raw HTTP and
//! raw frames. Everything binds 127.0.0.1 on ports the OS picks, and every wait is bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use wsgate::protocol::frame::{FrameHeader, OpCode};
use wsgate::{Config, Server};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// A wsgate running in this process; stops (drains) when dropped.
pub struct Gate {
    pub addr: SocketAddr,
    /// Every listener's address, in the config's order.
    pub addrs: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// For reloads (a gate started from a file) and the metrics page.
    pub handle: wsgate::Handle,
    stop: Option<oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

impl Gate {
    /// Starts wsgate from TOML text; `{listen}` is 127.0.0.1:0.
    pub async fn start(toml: &str) -> Gate {
        let config = Config::parse(toml, "test.toml", Path::new(".")).expect("test config");
        Gate::run(Server::bind(config).await.expect("bind"))
    }

    /// Starts wsgate from a config file, which `handle.reload()` reads again.
    pub async fn from_file(path: &Path) -> Gate {
        let config = Config::load(path).expect("test config");
        let server = Server::bind(config).await.expect("bind");
        Gate::run(server.with_config_path(path.to_owned()))
    }

    fn run(server: Server) -> Gate {
        let addrs = server.local_addrs().to_vec();
        let addr = addrs[0];
        let handle = server.handle();
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Gate {
            addr,
            addrs,
            admin,
            handle,
            stop: Some(tx),
            done: Some(done),
        }
    }

    /// A gate with one route `path` → `backend`, extra limits lines, extra route lines.
    pub async fn route(path: &str, backend: &str, limits: &str, route_extra: &str) -> Gate {
        Gate::start(&format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\n{limits}\n[[route]]\npath = \"{path}\"\nbackend = \"{backend}\"\n{route_extra}\n"
        ))
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Signals shutdown and returns the drain task.
    pub fn stop(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.done.take().expect("stopped once")
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The wsgate binary as a child process (for RSS, signals, reload and log tests); killed
/// when dropped. Its log lines are collected for tests to wait on.
pub struct GateProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub config_path: std::path::PathBuf,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub _dir: TempDir,
}

impl GateProcess {
    pub fn start(toml: &str) -> GateProcess {
        GateProcess::start_with(toml, &[])
    }

    /// Starts `wsgate --config FILE ARGS…` and waits until it reports its listener (and its
    /// admin listener when the config has one).
    pub fn start_with(toml: &str, args: &[&str]) -> GateProcess {
        GateProcess::start_logging(toml, args, "info")
    }

    /// As [`GateProcess::start_with`], with `RUST_LOG=rust_log`.
    pub fn start_logging(toml: &str, args: &[&str], rust_log: &str) -> GateProcess {
        GateProcess::start_env(toml, args, &[("RUST_LOG", rust_log)])
    }

    /// `wsgate --config FILE ARGS…` with these environment variables set.
    pub fn start_env(toml: &str, args: &[&str], env: &[(&str, &str)]) -> GateProcess {
        let dir = TempDir::new();
        let config_path = dir.path().join("wsgate.toml");
        std::fs::write(&config_path, toml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.arg("--config")
            .arg(&config_path)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        GateProcess::spawn(cmd, dir, config_path, toml.contains("[admin]"))
    }

    /// Starts `wsgate ARGS…` (quick mode, websockify's command line) in `dir` and waits until
    /// it reports its listener.
    pub fn start_cli(args: &[&str], dir: TempDir) -> GateProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.args(args).current_dir(dir.path());
        let config_path = dir.path().join("none.toml");
        GateProcess::spawn(cmd, dir, config_path, false)
    }

    fn spawn(
        mut cmd: Command,
        dir: TempDir,
        config_path: std::path::PathBuf,
        wants_admin: bool,
    ) -> GateProcess {
        if !cmd.get_envs().any(|(key, _)| key == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn wsgate");
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || (wants_admin && admin.is_none()) {
            let line = rx
                .recv_timeout(WAIT)
                .expect("wsgate reported its listeners in time");
            if let Some(a) = log_addr(&line) {
                if line.contains("admin listening") {
                    admin = Some(a);
                } else if line.contains("listening") && addr.is_none() {
                    addr = Some(a);
                }
            }
        }
        GateProcess {
            child,
            addr: addr.unwrap(),
            admin,
            config_path,
            lines,
            _dir: dir,
        }
    }

    /// Every log line so far, joined.
    pub fn log_text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (bounded by WAIT) for a log line containing `needle`, and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let until = std::time::Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                std::time::Instant::now() < until,
                "no log line with {needle:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded by WAIT) until `n` log lines contain `needle`. wsgate writes its log
    /// in order (buffered, at most 100 ms late), so once the line of the last thing a test
    /// did is there, so is every line before it.
    pub fn wait_for_log_lines(&self, needle: &str, n: usize) {
        let until = std::time::Instant::now() + WAIT;
        loop {
            let seen = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count();
            if seen >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < until,
                "{seen} of {n} log lines with {needle:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (HUP, TERM) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Resident set size of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

/// The `addr=IP:PORT` of a text or JSON log line.
pub fn log_addr(line: &str) -> Option<SocketAddr> {
    let rest = line
        .split("addr=")
        .nth(1)
        .or_else(|| line.split("\"addr\":\"").nth(1))?;
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from an HTTP server (the admin listener); status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = raw_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    (r.status, r.body)
}

/// Parses OpenMetrics text into `name{labels}` → value.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// A temporary directory removed on drop (no extra crate for it).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "wsgate-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- backends ----

/// An echo service on a unix socket at `path` (bound now, served on the runtime).
pub fn unix_echo_backend(path: &Path) {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// A TLS echo service on 127.0.0.1 with `certs`' server.crt/server.key; its port.
pub async fn tls_echo_backend(certs: &Path) -> u16 {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = vec![CertificateDer::from_pem_file(certs.join("server.crt")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Binds 127.0.0.1:0 and runs `handler` for every accepted connection.
pub async fn backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handler(stream));
        }
    });
    addr
}

/// Echoes bytes until EOF, then closes.
pub async fn echo_backend() -> SocketAddr {
    backend(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Sends a greeting banner first, then echoes.
pub async fn banner_backend(banner: &'static [u8]) -> SocketAddr {
    backend(move |mut s| async move {
        let _ = s.write_all(banner).await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Writes `n` bytes of a known pattern, then half-closes and waits for the peer's EOF.
pub async fn send_n_then_close_backend(n: usize) -> SocketAddr {
    backend(move |mut s| async move {
        let _ = s.write_all(&pattern(n, 7)).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await
}

/// Reads a little, then resets the connection (SO_LINGER 0).
pub async fn reset_backend() -> SocketAddr {
    backend(|s| async move {
        let mut s = s;
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await;
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s);
    })
    .await
}

/// Accepts and then never reads; holds the connection open for `hold`.
pub async fn never_read_backend(hold: Duration) -> SocketAddr {
    backend(move |s| async move {
        tokio::time::sleep(hold).await;
        drop(s);
    })
    .await
}

/// A loopback address that was free a moment ago (bound, noted, closed): nothing listens
/// there, for dead-backend tests, or for a listener a reload adds.
pub fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An address that refuses connections for as long as the socket returned is held: bound,
/// never listening, so no other test can take the port in the meantime (an address from
/// [`unused_addr`] is free again at once, and a concurrent test may listen on it).
pub fn refusing_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// A deterministic byte pattern, distinct per `seed`.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---- raw HTTP ----

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A valid upgrade request for `path`, with extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// What a raw request got back.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
    /// True when the server closed the connection after the response.
    pub closed: bool,
}

impl RawResponse {
    /// Values of a header (case-insensitive name), in order.
    pub fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// Debian's Chromium, for the browser tests.
pub fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("Debian's chromium (scripts/test installs it)")
}

/// Sends raw bytes, reads everything until the server closes (bounded by WAIT).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut all = Vec::new();
    let closed = matches!(
        tokio::time::timeout(WAIT, s.read_to_end(&mut all)).await,
        Ok(Ok(_)) | Ok(Err(_))
    );
    parse_response(&all, closed)
}

pub fn parse_response(all: &[u8], closed: bool) -> RawResponse {
    let text = String::from_utf8_lossy(all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
        closed,
    }
}

/// Opens a raw WebSocket connection (our own frames, for protocol tests): returns the stream
/// positioned after the 101 head.
pub async fn raw_ws(addr: SocketAddr, path: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(upgrade_request(path, "").as_bytes())
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    within("the 101 status line", WAIT, r.read_line(&mut line))
        .await
        .unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "got {line:?}");
    loop {
        line.clear();
        within("the 101's header lines", WAIT, r.read_line(&mut line))
            .await
            .unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    r
}

/// A masked client frame.
pub fn client_frame(fin: bool, opcode: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    wsgate::protocol::frame::encode_frame(fin, opcode, Some(key), payload)
}

/// A server frame as read off the wire.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFrame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: Vec<u8>,
    /// Encoded header length, to check the minimal length form.
    pub header_len: usize,
}

/// Reads one server frame (asserting it is unmasked); `None` on EOF.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<ServerFrame> {
    let mut head = Vec::new();
    loop {
        match FrameHeader::parse(&head).expect("server frame header is valid") {
            Some((h, n)) => {
                assert!(h.mask.is_none(), "server frames are never masked");
                let mut payload = vec![0u8; h.payload_len as usize];
                tokio::time::timeout(WAIT, r.read_exact(&mut payload))
                    .await
                    .expect("frame payload in time")
                    .ok()?;
                return Some(ServerFrame {
                    fin: h.fin,
                    opcode: h.opcode,
                    payload,
                    header_len: n,
                });
            }
            None => {
                let mut b = [0u8; 1];
                match tokio::time::timeout(WAIT, r.read(&mut b))
                    .await
                    .expect("frame in time")
                {
                    Ok(1) => head.push(b[0]),
                    _ => return None,
                }
            }
        }
    }
}

/// Reads frames until a close; returns its code (None for an empty close or EOF first).
pub async fn read_until_close<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<u16> {
    while let Some(f) = read_frame(r).await {
        if f.opcode == OpCode::Close {
            return (f.payload.len() >= 2)
                .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
        }
    }
    None
}

/// Reads until EOF, bounded by WAIT; true when the server closed.
pub async fn expect_eof<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> bool {
    let mut sink = Vec::new();
    matches!(
        tokio::time::timeout(WAIT, r.read_to_end(&mut sink)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

/// Path of the Python with the `websockets` peer (set by scripts/test).
pub fn python() -> String {
    std::env::var("WSGATE_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
        assert!(
            Path::new(venv).exists(),
            "no Python test peer: run scripts/test (it creates .venv with websockets)"
        );
        venv.to_owned()
    })
}

/// Sends a request that should upgrade and reads only the response head (the connection
/// stays open, as an upgraded one does); returns the head and the open stream.
pub async fn upgrade_head(addr: SocketAddr, request: &[u8]) -> (RawResponse, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("response in time")
        {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    (parse_response(&head, false), s)
}

/// Makes a certificate signed by a test CA in `dir` with certs/gen-dev-certs.sh (openssl);
/// the CA is made on first use. `key_type` is ec, rsa or ed25519.
pub fn gen_certs(dir: &Path, key_type: &str, prefix: &str, names: &str) {
    let out = output_within(
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/certs/gen-dev-certs.sh"
        ))
        .arg(dir)
        .args(names.split(' '))
        .env("KEY_TYPE", key_type)
        .env("PREFIX", prefix),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads binary messages until `n` payload bytes arrived (bounded by WAIT per message) and
/// returns their SHA-256.
pub async fn sha256_of_binary<S, E>(stream: &mut S, n: usize) -> Vec<u8>
where
    S: futures_util::Stream<Item = Result<tokio_tungstenite::tungstenite::Message, E>> + Unpin,
    E: std::fmt::Debug,
{
    use futures_util::StreamExt;
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("message in time")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
                got += b.len();
                hasher.update(&b);
            }
            other => panic!("expected binary data, got {other:?}"),
        }
    }
    assert_eq!(got, n);
    hasher.finalize().to_vec()
}

/// Awaits `fut` for at most `limit`; fails the test naming what it was waiting for.
pub async fn within<F: std::future::Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Checks `cond` every 20 ms until it holds; fails the test naming the condition if it does
/// not hold within `limit`. Returns how long it took.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    loop {
        if cond().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One metric's value from the admin endpoint (0 when the series does not exist yet).
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    parse_metrics(&text).get(series).copied().unwrap_or(0.0)
}

/// Resets a TCP connection (SO_LINGER 0, then close): the peer sees RST, not FIN.
pub fn reset(stream: TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// A child process that is killed when dropped (so a failing test never leaves one behind).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a test driver (a peer script) with [`output_within`], asserts it succeeded (its
/// output in the failure message), and returns the JSON report it printed on stdout.
pub fn json_output(cmd: &mut Command, limit: Duration) -> serde_json::Value {
    let out = output_within(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Runs `cmd` to its end like `Command::output`, but for at most `limit`: a child still running
/// then is killed and the test fails naming the command.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
    );
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = pipe.read_to_end(&mut all);
            all
        })
    };
    let stdout = drain(Box::new(child.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.0.stderr.take().unwrap()));
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < limit,
            "{cmd:?} still running after {limit:?}: killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// An HAProxy config in TCP mode in front of `gates` (round robin, PROXY v2 to each, a gate
/// taken out as soon as its admin listener's /readyz is not 200), listening on `front`.
/// `global` and `defaults` are extra lines for those sections.
pub fn haproxy_for_gates(
    front: SocketAddr,
    gates: &[GateProcess],
    global: &str,
    defaults: &str,
) -> String {
    let servers: String = gates
        .iter()
        .enumerate()
        .map(|(i, g)| {
            format!(
                "  server gate{i} {} check port {}\n",
                g.addr,
                g.admin.expect("a gate with an admin listener").port()
            )
        })
        .collect();
    format!(
        "global\n{global}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n{defaults}\
         frontend fe\n  bind {front}\n  default_backend gates\n\
         backend gates\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n  default-server send-proxy-v2 inter 100ms fall 1 rise 1\n{servers}"
    )
}

/// HAProxy (Debian's package) running `config`, killed when dropped; ready once `front`
/// accepts connections.
pub struct Haproxy {
    _child: KillOnDrop,
    _dir: TempDir,
}

impl Haproxy {
    pub async fn start(config: &str, front: SocketAddr) -> Haproxy {
        let bin = std::env::var("WSGATE_TEST_HAPROXY").unwrap_or_else(|_| "haproxy".into());
        let dir = TempDir::new();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config).unwrap();
        let child = KillOnDrop(
            Command::new(&bin)
                .args(["-db", "-f"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("haproxy (Debian package haproxy; scripts/test installs it)"),
        );
        eventually("HAProxy to listen", WAIT, || async {
            TcpStream::connect(front).await.is_ok()
        })
        .await;
        Haproxy {
            _child: child,
            _dir: dir,
        }
    }
}
