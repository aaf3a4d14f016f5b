//! Load benchmark: the wsgate bridge against a plain TCP relay, in one run, on loopback, on
//! the same TCP echo backend. Each server runs as its own process.
//!
//! Run: `cargo bench --bench load` (LOAD_SECS=N sets each phase's length, default 2;
//! LOAD_REPS=N how often each phase runs, alternating the two servers, default 3, the median
//! is reported; LOAD_IDLE=N the idle sessions, default 1000).
//!
//! Measures: single-connection throughput (64 KiB messages echoed), round trips per second
//! (32-byte messages; 1 and 64 connections), new connections per second (handshake, one
//! message, close), and memory per idle session (RSS growth of the server process / N).
//! Then an over-capacity flood (LOAD_FLOOD=N connections, default 5000, 0 to skip) against
//! max_connections = 100: admitted clients' handshake latency and wsgate's CPU, quiet and
//! during the flood (LOAD_ONLY=flood runs only this). LOAD_ONLY=proxy_protocol compares new
//! connections/s on a plain listener and on a proxy_protocol one (the PROXY parsing cost).
//! LOAD_ONLY=nginx compares wsgate's proxy routes (ws and wss listeners, in front of a ws
//! app) with Debian's nginx proxying to the same app (64 KiB buffers, one worker), when nginx
//! is installed.
//! LOAD_ONLY=deflate compares one text route (JSON lines, `framing = "lines"`) used by clients
//! that offer permessage-deflate and by clients that do not: round trips/s, wsgate's CPU per
//! round trip, bytes on the wire, and KiB per idle and per active session.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use wsgate::protocol::frame::{encode_frame, FrameHeader, OpCode};
use wsgate::stream::Io;

const ROLE: &str = "WSGATE_LOAD_ROLE";

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("echo") => return serve_role(None),
        Ok("relay") => {
            let target: SocketAddr = std::env::var("WSGATE_LOAD_TARGET")
                .unwrap()
                .parse()
                .unwrap();
            return serve_role(Some(target));
        }
        _ => {}
    }
    // `cargo test --benches` runs this without --bench: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs: u64 = std::env::var("LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let reps: usize = std::env::var("LOAD_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let idle: usize = std::env::var("LOAD_IDLE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let phase = Duration::from_secs(secs);
    if std::env::var("LOAD_ONLY").as_deref() == Ok("proxy_protocol") {
        let echo = Server::spawn_role("echo", None);
        let plain = Server::spawn_wsgate(&["127.0.0.1:0", &echo.addr.to_string()]);
        let dir = std::env::temp_dir().join(format!("wsgate-pp-{}", std::process::id()));
        let conf = config_file(
            &dir,
            "pp.toml",
            format!("[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[[route]]\npath = \"/\"\nbackend = \"tcp://{}\"\n", echo.addr),
        );
        let pp = Server::spawn_config(&conf);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let with = Target {
            proxy_header: true,
            ..Target::ws(pp.addr)
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..reps.max(1) {
            a.push(rt.block_on(new_connections(&Target::ws(plain.addr), phase)));
            b.push(rt.block_on(new_connections(&with, phase)));
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        let (a, b) = (a[a.len() / 2], b[b.len() / 2]);
        println!("| bridge new connections/s | plain listener {a:.0} | proxy_protocol listener (v1 header) {b:.0} | {:.2}× |", b / a);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if std::env::var("LOAD_ONLY").as_deref() == Ok("nginx") {
        nginx_bench(phase, reps, idle);
        return;
    }
    if std::env::var("LOAD_ONLY").as_deref() == Ok("deflate") {
        deflate_bench(phase, reps, idle);
        return;
    }
    if std::env::var("LOAD_ONLY").as_deref() == Ok("flood") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let flood = std::env::var("LOAD_FLOOD")
            .ok()
            .and_then(|s| s.parse().ok());
        rt.block_on(over_capacity_flood(flood.unwrap_or(5000), phase));
        return;
    }

    let echo = Server::spawn_role("echo", None);
    let relay = Server::spawn_role("relay", Some(echo.addr));
    let gate = Server::spawn_wsgate(&["127.0.0.1:0", &echo.addr.to_string()]);
    // wss: the same bridge behind a TLS listener, with a certificate made for the run.
    let certs = std::env::temp_dir().join(format!("wsgate-load-{}", std::process::id()));
    let made = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-certs.sh"
    ))
    .arg(&certs)
    .arg("localhost")
    .output()
    .expect("certs/gen-dev-certs.sh (needs openssl)");
    assert!(made.status.success());
    let tls_conf = config_file(
        &certs,
        "wss.toml",
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{0}/server.crt\", key = \"{0}/server.key\" }}\n[[route]]\npath = \"/\"\nbackend = \"tcp://{1}\"\n",
            certs.display(),
            echo.addr
        ),
    );
    let gate_tls = Server::spawn_config(&tls_conf);
    let connector = tls_connector(&certs.join("ca.crt"));
    // Proxy routes: one more hop in front of a ws app (a wsgate echo): a plain TCP relay
    // as the baseline, a wsgate proxy route as the candidate.
    let app = Server::spawn_wsgate(&["127.0.0.1:0", "echo"]);
    let relay_to_app = Server::spawn_role("relay", Some(app.addr));
    let proxy = Server::spawn_wsgate(&["127.0.0.1:0", &format!("ws://{}", app.addr)]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    println!("phase length {secs}s, {reps} runs each (median), alternating baseline and candidate; baseline: plain TCP relay (copy_bidirectional, 64 KiB buffers) in front of the same backend");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Runs a phase `reps` times for baseline and candidate, alternating; both medians.
    let both = |f: &dyn Fn(&Target) -> f64, base: &Target, cand: &Target| {
        let (mut r, mut g) = (Vec::new(), Vec::new());
        for _ in 0..reps.max(1) {
            r.push(f(base));
            g.push(f(cand));
        }
        (median(r), median(g))
    };
    let mut rows = Vec::new();
    let mut row = |name: &str, unit: &str, relay: f64, gate: f64| {
        rows.push(format!(
            "| {name} | {relay:.0} {unit} | {gate:.0} {unit} | {:.2}× |",
            gate / relay
        ));
    };
    let raw = Target::raw(relay.addr);
    let ws = Target::ws(gate.addr);
    let wss = Target {
        tls: Some(connector),
        ..Target::ws(gate_tls.addr)
    };

    let (r, g) = both(&|t| rt.block_on(throughput(t, phase)), &raw, &ws);
    row("bridge throughput, 1 conn, 64 KiB messages", "MB/s", r, g);
    for conns in [1usize, 64] {
        let (r, g) = both(&|t| rt.block_on(round_trips(t, conns, phase)), &raw, &ws);
        row(
            &format!("bridge round trips/s, {conns} conn(s), 32 B"),
            "/s",
            r,
            g,
        );
    }
    let (r, g) = both(&|t| rt.block_on(new_connections(t, phase)), &raw, &ws);
    row(
        "bridge new connections/s (handshake + 1 message + close)",
        "/s",
        r,
        g,
    );
    let (r, g) = both(&|t| rt.block_on(throughput(t, phase)), &raw, &wss);
    row(
        "wss bridge throughput, 1 conn, 64 KiB messages",
        "MB/s",
        r,
        g,
    );
    let (r, g) = both(&|t| rt.block_on(new_connections(t, phase)), &raw, &wss);
    row(
        "wss new connections/s (TLS + handshake + 1 message + close)",
        "/s",
        r,
        g,
    );
    let (r, g) = both(
        &|t| rt.block_on(round_trips(t, 64, phase)),
        &Target::ws(relay_to_app.addr),
        &Target::ws(proxy.addr),
    );
    row(
        "proxy route round trips/s, 64 conns, 32 B (in front of a ws app)",
        "/s",
        r,
        g,
    );
    let r = rt.block_on(idle_memory(&|| relay.rss_kib(), &raw, idle));
    let g = rt.block_on(idle_memory(&|| gate.rss_kib(), &ws, idle));
    row(
        &format!("KiB per idle session ({idle} sessions)"),
        "KiB",
        r,
        g,
    );
    let _ = std::fs::remove_dir_all(&certs);

    println!("\n| measure | plain TCP relay | wsgate | wsgate / relay |\n|---|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    let flood: usize = std::env::var("LOAD_FLOOD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    if flood > 0 {
        rt.block_on(over_capacity_flood(flood, phase));
    }
}

/// Where a client connects, and how: raw TCP, WebSocket, or WebSocket over TLS.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    ws: bool,
    tls: Option<TlsConnector>,
    /// Send a PROXY v1 header first (a listener with proxy_protocol = true).
    proxy_header: bool,
}

impl Target {
    fn raw(addr: SocketAddr) -> Target {
        Target {
            addr,
            ws: false,
            tls: None,
            proxy_header: false,
        }
    }
    fn ws(addr: SocketAddr) -> Target {
        Target {
            addr,
            ws: true,
            tls: None,
            proxy_header: false,
        }
    }
}

fn tls_connector(ca: &std::path::Path) -> TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

// ---- the server processes ----

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn spawn_role(role: &str, target: Option<SocketAddr>) -> Server {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(ROLE, role);
        if let Some(t) = target {
            cmd.env("WSGATE_LOAD_TARGET", t.to_string());
        }
        Server::start(cmd, "addr=")
    }

    /// wsgate from a config file.
    fn spawn_config(path: &std::path::Path) -> Server {
        Server::spawn_wsgate(&["--config", path.to_str().unwrap()])
    }

    fn spawn_wsgate(args: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.args(args).env("RUST_LOG", "warn,wsgate::server=info");
        Server::start(cmd, "listening addr=")
    }

    /// Starts the process and reads its stderr until it reports its address.
    fn start(mut cmd: Command, marker: &str) -> Server {
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
        let addr = loop {
            let line = lines.next().expect("server exited").unwrap();
            if let Some(rest) = line.split(marker).nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // wsgate logs a line per session; keep the pipe drained.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    fn rss_kib(&self) -> f64 {
        rss_kib_of(self.child.id())
    }
}

/// Writes `toml` as `dir/name` (the directory made if needed) and returns its path.
fn config_file(dir: &std::path::Path, name: &str, toml: impl AsRef<[u8]>) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, toml).unwrap();
    path
}

/// Resident set size of a process, in KiB.
fn rss_kib_of(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The echo backend (`target` None) or the plain relay baseline, in this process.
fn serve_role(target: Option<SocketAddr>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        eprintln!("addr={}", listener.local_addr().unwrap());
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            client.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                match target {
                    None => {
                        let (mut r, mut w) = client.split();
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match r.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if w.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Some(t) => {
                        let Ok(mut backend) = TcpStream::connect(t).await else {
                            return;
                        };
                        backend.set_nodelay(true).unwrap();
                        let _ = tokio::io::copy_bidirectional_with_sizes(
                            &mut client,
                            &mut backend,
                            64 * 1024,
                            64 * 1024,
                        )
                        .await;
                    }
                }
            });
        }
    });
}

// ---- a minimal client: raw TCP, or WebSocket with our own masked frames ----

struct Client {
    stream: Box<dyn Io>,
    ws: bool,
    inbuf: Vec<u8>,
}

impl Client {
    async fn connect(target: &Target) -> Client {
        let mut tcp = TcpStream::connect(target.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        if target.proxy_header {
            let header = wsgate::proxy_protocol::encode_v1(tcp.local_addr().unwrap(), target.addr);
            tcp.write_all(&header).await.unwrap();
        }
        let mut stream: Box<dyn Io> = match &target.tls {
            None => Box::new(tcp),
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                Box::new(connector.connect(name, tcp).await.unwrap())
            }
        };
        let ws = target.ws;
        let mut inbuf = Vec::new();
        if ws {
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed during handshake");
                inbuf.extend_from_slice(&buf[..n]);
                if let Some(end) = inbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                    assert!(
                        inbuf.starts_with(b"HTTP/1.1 101"),
                        "{}",
                        String::from_utf8_lossy(&inbuf)
                    );
                    inbuf.drain(..end + 4);
                    break;
                }
            }
        }
        Client { stream, ws, inbuf }
    }

    /// The bytes to send one message: a masked binary frame, or the raw payload.
    fn message(&self, payload: &[u8]) -> Vec<u8> {
        if !self.ws {
            return payload.to_vec();
        }
        encode_frame(
            true,
            OpCode::Binary,
            Some([0x12, 0x34, 0x56, 0x78]),
            payload,
        )
    }

    /// Reads until `want` payload bytes have arrived (frame headers are parsed and skipped).
    async fn read_payload(&mut self, want: usize) {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let mut remaining_in_frame = 0usize;
        loop {
            // Consume what is buffered.
            loop {
                if remaining_in_frame > 0 {
                    let take = remaining_in_frame.min(self.inbuf.len());
                    self.inbuf.drain(..take);
                    remaining_in_frame -= take;
                    got += take;
                    if take == 0 {
                        break;
                    }
                } else if self.ws {
                    match FrameHeader::parse(&self.inbuf).unwrap() {
                        Some((h, n)) => {
                            self.inbuf.drain(..n);
                            remaining_in_frame = h.payload_len as usize;
                        }
                        None => break,
                    }
                } else {
                    got += self.inbuf.len();
                    self.inbuf.clear();
                    break;
                }
                if got >= want && remaining_in_frame == 0 {
                    return;
                }
            }
            if got >= want && remaining_in_frame == 0 {
                return;
            }
            let n = self.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "server closed");
            self.inbuf.extend_from_slice(&buf[..n]);
        }
    }

    async fn close(mut self) {
        if self.ws {
            let frame = encode_frame(
                true,
                OpCode::Close,
                Some([1, 2, 3, 4]),
                &1000u16.to_be_bytes(),
            );
            let _ = self.stream.write_all(&frame).await;
        } else {
            let _ = self.stream.shutdown().await;
        }
        // Read until the server closes (the close reply, then EOF).
        let mut sink = [0u8; 1024];
        while let Ok(n) = self.stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// MB/s of payload echoed through one connection, writer and reader running at once.
async fn throughput(target: &Target, phase: Duration) -> f64 {
    let ws = target.ws;
    let client = Client::connect(target).await;
    let msg = client.message(&vec![0x61u8; 64 * 1024]);
    let Client { stream, inbuf, .. } = client;
    let (mut r, mut w) = tokio::io::split(stream);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if w.write_all(&msg).await.is_err() {
                    break;
                }
            }
        })
    };
    let started = Instant::now();
    let mut pending = inbuf;
    let mut buf = vec![0u8; 64 * 1024];
    let mut payload: u64 = 0;
    let mut in_frame = 0usize;
    while started.elapsed() < phase {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0, "server closed");
        if !ws {
            payload += n as u64;
            continue;
        }
        // Count payload bytes only: skip frame headers as they pass.
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        loop {
            if in_frame > 0 {
                let take = in_frame.min(pending.len() - at);
                if take == 0 {
                    break;
                }
                at += take;
                in_frame -= take;
                payload += take as u64;
            } else {
                match FrameHeader::parse(&pending[at..]).unwrap() {
                    Some((h, hl)) => {
                        at += hl;
                        in_frame = h.payload_len as usize;
                    }
                    None => break,
                }
            }
        }
        pending.drain(..at);
    }
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer.abort();
    payload as f64 / secs / 1e6
}

/// Round trips per second with `conns` connections, each one message in flight.
async fn round_trips(target: &Target, conns: usize, phase: Duration) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + phase;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let count = count.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&target).await;
            let msg = c.message(&[0x62u8; 32]);
            while Instant::now() < deadline {
                c.stream.write_all(&msg).await.unwrap();
                c.read_payload(32).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
            c.close().await;
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(phase.as_secs_f64())
}

/// New connections per second: connect, (handshake,) one 32-byte message echoed, close.
async fn new_connections(target: &Target, phase: Duration) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + phase;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let count = count.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut c = Client::connect(&target).await;
                let msg = c.message(&[0x63u8; 32]);
                c.stream.write_all(&msg).await.unwrap();
                c.read_payload(32).await;
                c.close().await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// RSS growth of the server process per idle session, in KiB (each session has exchanged one
/// message first, so it is a live, set-up session).
async fn idle_memory(rss: &dyn Fn() -> f64, target: &Target, n: usize) -> f64 {
    let before = rss();
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = Client::connect(target).await;
        let msg = c.message(b"hi");
        c.stream.write_all(&msg).await.unwrap();
        c.read_payload(2).await;
        clients.push(c);
    }
    let after = rss();
    drop(clients);
    (after - before) / n as f64
}

// ---- over-capacity flood ----

/// CPU time (user + system) the process has used so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Whether a handshake + one message + close succeeds, and how long it took.
async fn probe(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.ok()?;
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.ok()?;
    (&head == b"HTTP/1.1 101").then(|| started.elapsed())
}

/// Admitted clients' handshake latency and the gateway's CPU, without and then during a flood
/// of `flood` connections against `max_connections = 100` (90 places held by idle sessions).
/// Prints its own table.
async fn over_capacity_flood(flood: usize, phase: Duration) {
    let dir = std::env::temp_dir().join(format!("wsgate-flood-{}", std::process::id()));
    let conf = config_file(
        &dir,
        "flood.toml",
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections = 100\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    );
    let gate = Server::spawn_config(&conf);
    let pid = gate.child.id();
    let mut idle = Vec::new();
    for _ in 0..90 {
        idle.push(Client::connect(&Target::ws(gate.addr)).await);
    }
    // Sequential probes for `phase` (or until `stop`): latencies of the admitted ones.
    let probes = |stop: Arc<AtomicBool>| async move {
        let (mut ok, mut refused) = (Vec::new(), 0usize);
        let until = Instant::now() + phase;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            match probe(gate.addr).await {
                Some(t) => ok.push(t),
                None => refused += 1,
            }
        }
        (ok, refused)
    };
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };

    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let (mut quiet, quiet_refused) = probes(Arc::new(AtomicBool::new(false))).await;
    let quiet_cpu = (cpu_secs(pid) - cpu0) / t0.elapsed().as_secs_f64();

    let stop = Arc::new(AtomicBool::new(false));
    let refused_503 = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, refused_503) = (stop.clone(), refused_503.clone());
        let addr = gate.addr;
        tokio::spawn(async move {
            let started = Instant::now();
            // 500 at a time, `flood` in all.
            for _ in 0..flood.div_ceil(500) {
                let batch: Vec<_> = (0..500)
                    .map(|_| {
                        let refused_503 = refused_503.clone();
                        tokio::spawn(async move {
                            let Ok(mut s) = TcpStream::connect(addr).await else { return };
                            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: flood\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await;
                            let mut head = [0u8; 12];
                            if s.read_exact(&mut head).await.is_ok() && &head == b"HTTP/1.1 503" {
                                refused_503.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for t in batch {
                    let _ = t.await;
                }
            }
            stop.store(true, Ordering::Relaxed);
            started.elapsed()
        })
    };
    let cpu1 = cpu_secs(pid);
    let t1 = Instant::now();
    let (mut flooded, flooded_refused) = probes(stop.clone()).await;
    let flood_took = flooder.await.unwrap();
    let flood_cpu = (cpu_secs(pid) - cpu1) / t1.elapsed().as_secs_f64();
    drop(idle);
    let _ = std::fs::remove_dir_all(&dir);

    println!("\nOver-capacity flood: max_connections = 100, 90 held by idle sessions; {flood} connections sent in batches of 500 (done in {:.2} s, {} answered 503); probes = handshake + 101, one after another", flood_took.as_secs_f64(), refused_503.load(Ordering::Relaxed));
    println!("| measure | quiet | during the flood |\n|---|---:|---:|");
    println!("| admitted probes | {} | {} |", quiet.len(), flooded.len());
    println!("| probes refused (503: all places taken at that moment) | {quiet_refused} | {flooded_refused} |");
    println!(
        "| admitted handshake latency p50 | {:.2} ms | {:.2} ms |",
        pct(&mut quiet, 0.5),
        pct(&mut flooded, 0.5)
    );
    println!(
        "| admitted handshake latency p99 | {:.2} ms | {:.2} ms |",
        pct(&mut quiet, 0.99),
        pct(&mut flooded, 0.99)
    );
    println!("| wsgate CPU (cores) | {quiet_cpu:.2} | {flood_cpu:.2} |");
}

// ---- permessage-deflate: the same route with and without compression ----

/// A JSON line like the chat example's (about 150–400 bytes, repetitive as JSON is).
fn json_line(i: usize) -> Vec<u8> {
    format!(
        r##"{{"type":"usermsg","id":"{}","to_id":"{}","name":"user{}","message":"{}","color":"#{:06x}"}}"##,
        i % 97,
        (i * 7) % 97,
        i % 13,
        "the quick brown fox jumps over the lazy dog ".repeat(2 + i % 7),
        (i * 2_654_435_761) & 0xff_ffff
    )
    .into_bytes()
}

/// A WebSocket client for JSON lines, compressing (no context takeover, as wsgate answers)
/// or not; counts the bytes it puts on and takes off the wire.
struct LineClient {
    stream: TcpStream,
    inbuf: Vec<u8>,
    deflate: bool,
    wire_out: u64,
    wire_in: u64,
}

impl LineClient {
    async fn connect(addr: SocketAddr, deflate: bool) -> LineClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let offer = if deflate {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n").as_bytes())
            .await
            .unwrap();
        let mut inbuf = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed during handshake");
            inbuf.extend_from_slice(&buf[..n]);
            if let Some(end) = inbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&inbuf[..end]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 101"), "{head}");
                assert_eq!(head.contains("permessage-deflate"), deflate, "{head}");
                inbuf.drain(..end + 4);
                break;
            }
        }
        LineClient {
            stream,
            inbuf,
            deflate,
            wire_out: 0,
            wire_in: 0,
        }
    }

    /// Sends one line and waits for its echo, which must be the same line.
    async fn round_trip(&mut self, line: &[u8]) {
        let mut frame = if self.deflate {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(line.len() + 64);
            c.compress_vec(line, &mut out, flate2::FlushCompress::Sync)
                .unwrap();
            out.truncate(out.len() - 4);
            let mut f = encode_frame(true, OpCode::Text, Some([1, 2, 3, 4]), &out);
            f[0] |= 0x40;
            f
        } else {
            encode_frame(true, OpCode::Text, Some([1, 2, 3, 4]), line)
        };
        self.wire_out += frame.len() as u64;
        self.stream.write_all(&frame).await.unwrap();
        frame.clear();
        let mut buf = [0u8; 16 * 1024];
        let (header, len) = loop {
            if let Some((h, n)) = FrameHeader::parse(&self.inbuf).unwrap() {
                if self.inbuf.len() >= n + h.payload_len as usize {
                    break (h, n);
                }
            }
            let n = self.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "server closed");
            self.inbuf.extend_from_slice(&buf[..n]);
        };
        let end = len + header.payload_len as usize;
        self.wire_in += end as u64;
        let payload: Vec<u8> = self.inbuf.drain(..end).skip(len).collect();
        let text = if header.rsv1 {
            let mut d = flate2::Decompress::new(false);
            let mut input = payload;
            input.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let mut out = Vec::with_capacity(line.len() + 64);
            d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
                .unwrap();
            out
        } else {
            payload
        };
        assert_eq!(text, line, "the echo is the line sent");
    }
}

struct DeflateFigures {
    round_trips: f64,
    cpu_us: f64,
    out_per_msg: f64,
    in_per_msg: f64,
    active_kib: f64,
}

async fn line_round_trips(
    gate: &Server,
    conns: usize,
    deflate: bool,
    phase: Duration,
) -> DeflateFigures {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(LineClient::connect(gate.addr, deflate).await);
    }
    let before_rss = gate.rss_kib();
    let cpu_before = cpu_secs(gate.child.id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (k, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < phase {
                c.round_trip(&json_line(k * 1000 + n as usize)).await;
                n += 1;
            }
            (n, c)
        }));
    }
    let mut peak_rss = 0f64;
    while started.elapsed() < phase {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak_rss = peak_rss.max(gate.rss_kib());
    }
    let (mut total, mut out, mut inn) = (0u64, 0u64, 0u64);
    for t in tasks {
        let (n, c) = t.await.unwrap();
        total += n;
        out += c.wire_out;
        inn += c.wire_in;
    }
    let cpu = cpu_secs(gate.child.id()) - cpu_before;
    DeflateFigures {
        round_trips: total as f64 / started.elapsed().as_secs_f64(),
        cpu_us: cpu * 1e6 / total as f64,
        out_per_msg: out as f64 / total as f64,
        in_per_msg: inn as f64 / total as f64,
        active_kib: (peak_rss - before_rss).max(0.0) / conns as f64,
    }
}

/// KiB of wsgate RSS per idle session, each having sent and received one line (a fresh
/// wsgate process each time).
async fn line_idle_memory(gate: &Server, n: usize, deflate: bool) -> f64 {
    let before = gate.rss_kib();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = LineClient::connect(gate.addr, deflate).await;
        c.round_trip(&json_line(i)).await;
        clients.push(c);
    }
    let after = gate.rss_kib();
    drop(clients);
    (after - before) / n as f64
}

fn deflate_bench(phase: Duration, reps: usize, idle: usize) {
    const CONNS: usize = 16;
    let echo = Server::spawn_role("echo", None);
    let dir = std::env::temp_dir().join(format!("wsgate-deflate-{}", std::process::id()));
    let conf = config_file(
        &dir,
        "lines.toml",
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{}\"\nframing = \"lines\"\nmessage = \"text\"\n", echo.addr),
    );
    let spawn = || Server::spawn_config(&conf);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut runs: [Vec<DeflateFigures>; 2] = [Vec::new(), Vec::new()];
    let mut idle_kib: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps.max(1) {
        // Alternate which goes first.
        let order = if rep % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for deflate in order {
            let gate = spawn();
            runs[usize::from(deflate)]
                .push(rt.block_on(line_round_trips(&gate, CONNS, deflate, phase)));
            let gate = spawn();
            idle_kib[usize::from(deflate)]
                .push(rt.block_on(line_idle_memory(&gate, idle, deflate)));
        }
    }
    let pick = |i: usize, f: fn(&DeflateFigures) -> f64| median(runs[i].iter().map(f).collect());
    println!("permessage-deflate: one text route (framing = lines) to a TCP echo; JSON lines of about 150–400 bytes; {CONNS} connections doing round trips for {}s; {reps} runs (median), alternating; idle: {idle} sessions on a fresh wsgate, each after one round trip", phase.as_secs());
    println!("\n| measure | without compression | with permessage-deflate | with / without |\n|---|---:|---:|---:|");
    for (name, f) in [
        (
            "round trips/s",
            (|x: &DeflateFigures| x.round_trips) as fn(&DeflateFigures) -> f64,
        ),
        ("wsgate CPU µs per round trip", |x| x.cpu_us),
        ("bytes on the wire per message, client → wsgate", |x| {
            x.out_per_msg
        }),
        ("bytes on the wire per message, wsgate → client", |x| {
            x.in_per_msg
        }),
        (
            "KiB per active session (peak RSS growth / connections)",
            |x| x.active_kib,
        ),
    ] {
        let (a, b) = (pick(0, f), pick(1, f));
        println!("| {name} | {a:.1} | {b:.1} | {:.2}× |", b / a);
    }
    let (a, b) = (median(idle_kib[0].clone()), median(idle_kib[1].clone()));
    println!("| KiB per idle session | {a:.1} | {b:.1} | {:.2}× |", b / a);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- nginx as the anchor for proxy routes ----

/// A free port on 127.0.0.1 (bound and released; the server binds it right after).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Debian's nginx in the foreground with one worker, proxying WebSocket upgrades on a plain
/// and a TLS port to `app` with 64 KiB buffers.
struct Nginx {
    child: Child,
    plain: SocketAddr,
    tls: SocketAddr,
}

impl Nginx {
    fn start(dir: &std::path::Path, app: SocketAddr, certs: &std::path::Path) -> Nginx {
        let (plain, tls) = (free_addr(), free_addr());
        let conf = config_file(
            dir,
            "nginx.conf",
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 20000; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n  server {{\n    listen {plain};\n    listen {tls} ssl;\n    ssl_certificate {c}/server.crt;\n    ssl_certificate_key {c}/server.key;\n    location / {{\n      proxy_pass http://{app};\n      proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n      proxy_set_header Host $host;\n      proxy_buffer_size 64k;\n      proxy_buffers 4 64k;\n      proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n",
                d = dir.display(),
                c = certs.display(),
            ),
        );
        let child = Command::new("nginx")
            .args(["-e", "stderr", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian's nginx package)");
        // Up when both ports take connections (bounded: 10 s).
        let started = Instant::now();
        while std::net::TcpStream::connect(plain).is_err()
            || std::net::TcpStream::connect(tls).is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, plain, tls }
    }

    /// The worker process (nginx's only child).
    fn worker(&self) -> u32 {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("an nginx worker")
            .parse()
            .unwrap()
    }

    fn rss_kib(&self) -> f64 {
        rss_kib_of(self.worker())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker too (SIGKILL would leave the worker running).
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn nginx_bench(phase: Duration, reps: usize, idle: usize) {
    let dir = std::env::temp_dir().join(format!("wsgate-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-certs.sh"
    ))
    .arg(&dir)
    .arg("localhost")
    .output()
    .expect("certs/gen-dev-certs.sh (needs openssl)");
    assert!(made.status.success());
    // The ws app both proxy in front of: a wsgate echo route.
    let app = Server::spawn_wsgate(&["127.0.0.1:0", "echo"]);
    let nginx = Nginx::start(&dir, app.addr, &dir);
    // Two listeners on ports chosen here, so the address wsgate reports first is the plain one.
    let (plain, tls) = (free_addr(), free_addr());
    let conf = config_file(
        &dir,
        "proxy.toml",
        format!(
            "[[listen]]\naddr = \"{plain}\"\n[[listen]]\naddr = \"{tls}\"\ntls = {{ cert = \"{0}/server.crt\", key = \"{0}/server.key\" }}\n[[route]]\npath = \"/\"\nbackend = \"ws://{1}\"\n",
            dir.display(),
            app.addr
        ),
    );
    let gate = Server::spawn_config(&conf);
    assert_eq!(gate.addr, plain);
    let gate_tls = tls;
    let connector = tls_connector(&dir.join("ca.crt"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ng_ws, gw_ws) = (Target::ws(nginx.plain), Target::ws(gate.addr));
    let ng_wss = Target {
        tls: Some(connector.clone()),
        ..Target::ws(nginx.tls)
    };
    let gw_wss = Target {
        tls: Some(connector),
        ..Target::ws(gate_tls)
    };
    let ng_pid = nginx.worker();
    let gw_pid = gate.child.id();
    // Each phase alternates nginx and wsgate, `reps` times; medians, and CPU per unit.
    let pair = |f: &dyn Fn(&Target) -> f64, a: &Target, b: &Target| {
        let (mut x, mut y, mut cx, mut cy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps.max(1) {
            let one = |t: &Target, pid: u32, out: &mut Vec<f64>, cpu: &mut Vec<f64>| {
                let c0 = cpu_secs(pid);
                let v = f(t);
                cpu.push((cpu_secs(pid) - c0) * 1e6 / (v * phase.as_secs_f64()));
                out.push(v);
            };
            if rep % 2 == 0 {
                one(a, ng_pid, &mut x, &mut cx);
                one(b, gw_pid, &mut y, &mut cy);
            } else {
                one(b, gw_pid, &mut y, &mut cy);
                one(a, ng_pid, &mut x, &mut cx);
            }
        }
        (median(x), median(y), median(cx), median(cy))
    };
    println!("proxy routes against nginx {}: the same ws app (a wsgate echo), the same client; phase {}s, {reps} runs each (median), alternating; nginx: 1 worker, proxy_buffer_size 64k, proxy_buffers 4 64k; CPU is the proxy process's own (nginx: its worker)",
        String::from_utf8_lossy(&Command::new("nginx").arg("-v").output().unwrap().stderr).trim(), phase.as_secs());
    println!("\n| measure | nginx | wsgate | wsgate / nginx | nginx CPU µs per unit | wsgate CPU µs per unit |\n|---|---:|---:|---:|---:|---:|");
    let print = |name: &str, (a, b, ca, cb): (f64, f64, f64, f64)| {
        println!(
            "| {name} | {a:.0} | {b:.0} | {:.2}× | {ca:.1} | {cb:.1} |",
            b / a
        );
    };
    print(
        "ws proxy throughput, 1 conn, 64 KiB messages (MB/s; CPU per MB)",
        pair(&|t| rt.block_on(throughput(t, phase)), &ng_ws, &gw_ws),
    );
    print(
        "ws proxy round trips/s, 64 conns, 32 B",
        pair(&|t| rt.block_on(round_trips(t, 64, phase)), &ng_ws, &gw_ws),
    );
    print(
        "ws proxy new connections/s",
        pair(&|t| rt.block_on(new_connections(t, phase)), &ng_ws, &gw_ws),
    );
    print(
        "wss proxy throughput, 1 conn, 64 KiB messages (MB/s; CPU per MB)",
        pair(&|t| rt.block_on(throughput(t, phase)), &ng_wss, &gw_wss),
    );
    print(
        "wss proxy round trips/s, 64 conns, 32 B",
        pair(
            &|t| rt.block_on(round_trips(t, 64, phase)),
            &ng_wss,
            &gw_wss,
        ),
    );
    print(
        "wss new connections/s (full TLS handshakes)",
        pair(
            &|t| rt.block_on(new_connections(t, phase)),
            &ng_wss,
            &gw_wss,
        ),
    );
    let n = rt.block_on(idle_memory(&|| nginx.rss_kib(), &ng_ws, idle));
    let g = rt.block_on(idle_memory(&|| gate.rss_kib(), &gw_ws, idle));
    println!("| KiB per idle proxied ws session ({idle} held; RSS growth / N) | {n:.1} | {g:.1} | {:.2}× | | |", g / n);
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}
