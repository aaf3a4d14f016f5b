//! Soak run (not in CI): wsgate as a child process under churn, idle and streaming sessions
//! for a given time, with every byte checked (SHA-256) and the process's RSS and open fds
//! sampled every 10 s.
//!
//! ```sh
//! scripts/soak                      # 1 hour
//! scripts/soak --secs 300 --settle 60
//! ```
//! Fails (exit 1) on any data mismatch or failed session, on RSS more than 10 % above its
//! level at the end of the settle time (default 5 min), or when the open fds are not back to
//! their start-up count once every session has ended. Talks only to 127.0.0.1.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

struct Options {
    secs: u64,
    settle: u64,
    idle: usize,
    churners: usize,
    streams: usize,
}

fn options() -> Options {
    let mut o = Options {
        secs: 3600,
        settle: 300,
        idle: 500,
        churners: 4,
        streams: 8,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair
            .get(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{} needs a number", pair[0]));
        match pair[0].as_str() {
            "--secs" => o.secs = value,
            "--settle" => o.settle = value,
            "--idle" => o.idle = value as usize,
            "--churners" => o.churners = value as usize,
            "--streams" => o.streams = value as usize,
            other => panic!("unknown option {other}"),
        }
    }
    assert!(o.settle < o.secs, "--settle must be shorter than --secs");
    o
}

#[derive(Default)]
struct Counts {
    churned: AtomicU64,
    streamed_bytes: AtomicU64,
    checks: AtomicU64,
    failures: AtomicU64,
}

fn fail(counts: &Counts, what: String) {
    counts.failures.fetch_add(1, Ordering::Relaxed);
    eprintln!("soak: FAILURE: {what}");
}

/// A small deterministic byte stream (xorshift), so sender and checker agree without storing.
fn fill(seed: &mut u64, buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *b = *seed as u8;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A TCP echo backend in this process.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Starts wsgate and returns it with its client address (read from its log).
fn start_gate(backend: SocketAddr, dir: &std::path::Path) -> (Child, SocketAddr) {
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nidle_timeout = \"60s\"\nping_interval = \"20s\"\n\
             [[route]]\npath = \"/echo\"\nbackend = \"echo\"\n[[route]]\npath = \"/tcp\"\nbackend = \"tcp://{backend}\"\n"
        ),
    )
    .unwrap();
    let bin = std::env::var("WSGATE_BIN").unwrap_or_else(|_| "target/release/wsgate".into());
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn,wsgate::server=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start target/release/wsgate (build it first)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads its log for the address, then keeps draining it so it never blocks on the pipe.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening") {
                if let Some(rest) = line.split("addr=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .ok()
        .and_then(|a| a.parse().ok())
        .expect("wsgate logs its listening address");
    (child, addr)
}

/// Connect, one message of a random size, check the echo, close; at most 50 sessions a
/// second; until `stop`.
async fn churn(addr: SocketAddr, seed: u64, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let mut seed = seed | 1;
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        let mut size = [0u8; 2];
        fill(&mut seed, &mut size);
        let mut payload = vec![0u8; usize::from(u16::from_le_bytes(size))];
        fill(&mut seed, &mut payload);
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            ws.send(Message::binary(payload.clone()))
                .await
                .map_err(|e| format!("send: {e}"))?;
            match ws.next().await {
                Some(Ok(Message::Binary(got))) if got[..] == payload[..] => {}
                other => return Err(format!("echo mismatch: {:?}", other.map(|m| m.is_ok()))),
            }
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
            while let Some(Ok(_)) = ws.next().await {}
            Ok::<_, String>(())
        })
        .await;
        match outcome {
            Ok(Ok(())) => {
                counts.churned.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => fail(&counts, format!("churn: {e}")),
            Err(_) => fail(&counts, "churn: session took over 10 s".into()),
        }
    }
}

/// An idle session that answers pings (tungstenite does, while it reads) until `stop`.
async fn idle(addr: SocketAddr, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo")).await
    else {
        return fail(&counts, "idle: connect failed".into());
    };
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
            Err(_) | Ok(Some(Ok(_))) => {}
            Ok(other) => {
                return fail(
                    &counts,
                    format!("idle session ended: {:?}", other.map(|m| m.err())),
                )
            }
        }
    }
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Streams a deterministic byte stream through the bridge in 8 MiB rounds, paced to about
/// 4 MB/s, comparing the SHA-256 of what was sent and what came back after every round.
async fn stream(addr: SocketAddr, seed: u64, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    const ROUND: usize = 8 << 20;
    const CHUNK: usize = 32 << 10;
    let mut seed = seed | 1;
    while !stop.load(Ordering::Relaxed) {
        let Ok((ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/tcp")).await else {
            fail(&counts, "stream: connect failed".into());
            continue;
        };
        let (mut tx, mut rx) = ws.split();
        let mut round_seed = seed;
        fill(&mut seed, &mut [0u8; 8]);
        let sender = async {
            let mut sent = Sha256::new();
            let mut tick = tokio::time::interval(Duration::from_millis(8));
            let mut chunk = vec![0u8; CHUNK];
            for _ in 0..ROUND / CHUNK {
                tick.tick().await;
                fill(&mut round_seed, &mut chunk);
                sent.update(&chunk);
                if tx.send(Message::binary(chunk.clone())).await.is_err() {
                    break;
                }
            }
            (sent.finalize(), tx)
        };
        let receiver = async {
            let mut got = Sha256::new();
            let mut n = 0;
            while n < ROUND {
                match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        n += b.len();
                        got.update(&b);
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            (got.finalize(), n)
        };
        let ((sent, mut tx), (got, n)) = tokio::join!(sender, receiver);
        let _ = tx.close().await;
        if n != ROUND || sent != got {
            fail(
                &counts,
                format!(
                    "stream: {n} of {ROUND} bytes back, digests equal: {}",
                    sent == got
                ),
            );
        } else {
            counts.checks.fetch_add(1, Ordering::Relaxed);
            counts
                .streamed_bytes
                .fetch_add(ROUND as u64, Ordering::Relaxed);
        }
    }
}

#[tokio::main]
async fn main() {
    let o = options();
    let dir = std::env::temp_dir().join(format!("wsgate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let backend = echo_backend().await;
    let (mut child, addr) = start_gate(backend, &dir);
    let pid = child.id();
    let base_fds = open_fds(pid);
    println!(
        "soak: wsgate pid {pid} on {addr}; {} s, settle {} s, {} idle, {} churners, {} streams; start fds {base_fds}, RSS {} KiB",
        o.secs, o.settle, o.idle, o.churners, o.streams, rss_kib(pid)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    for _ in 0..o.idle {
        tasks.push(tokio::spawn(idle(addr, stop.clone(), counts.clone())));
    }
    for i in 0..o.churners {
        tasks.push(tokio::spawn(churn(
            addr,
            0x9E37 + i as u64,
            stop.clone(),
            counts.clone(),
        )));
    }
    for i in 0..o.streams {
        tasks.push(tokio::spawn(stream(
            addr,
            0xC0FFEE + i as u64,
            stop.clone(),
            counts.clone(),
        )));
    }

    let started = Instant::now();
    let mut reference: Option<u64> = None;
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    while started.elapsed() < Duration::from_secs(o.secs) {
        tick.tick().await;
        let (rss, fds) = (rss_kib(pid), open_fds(pid));
        let t = started.elapsed().as_secs();
        println!(
            "soak: t={t:>5}s rss={rss} KiB fds={fds} churned={} streamed={} MiB checks={} failures={}",
            counts.churned.load(Ordering::Relaxed),
            counts.streamed_bytes.load(Ordering::Relaxed) >> 20,
            counts.checks.load(Ordering::Relaxed),
            counts.failures.load(Ordering::Relaxed),
        );
        if t >= o.settle {
            let r = *reference.get_or_insert(rss);
            peak = peak.max(rss);
            if rss * 10 > r * 11 {
                fail(
                    &counts,
                    format!("RSS {rss} KiB is over 110 % of {r} KiB (at settle)"),
                );
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            fail(&counts, format!("wsgate exited: {status}"));
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    // Every session has ended: wsgate's fds must come back to their start-up count.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut fds = open_fds(pid);
    while fds > base_fds && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fds = open_fds(pid);
    }
    if fds != base_fds {
        fail(
            &counts,
            format!("fds {fds} at the end, {base_fds} at start"),
        );
    }
    let failures = counts.failures.load(Ordering::Relaxed);
    println!(
        "soak: done after {} s: churned {} sessions, streamed {} MiB in {} checked rounds, RSS at settle {} KiB, peak after settle {} KiB, end {} KiB, fds {fds} (start {base_fds}), failures {failures}",
        started.elapsed().as_secs(),
        counts.churned.load(Ordering::Relaxed),
        counts.streamed_bytes.load(Ordering::Relaxed) >> 20,
        counts.checks.load(Ordering::Relaxed),
        reference.unwrap_or(0),
        peak,
        rss_kib(pid),
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(if failures == 0 { 0 } else { 1 });
}
