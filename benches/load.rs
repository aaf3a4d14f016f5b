//! Load benchmark: wsgate's bridge, proxy and wss paths beside the anchors, in one run, on
//! loopback, with the same client and the same backends. Each server runs as its own
//! process: a TCP echo (the bridge's backend), a plain tokio relay (`copy_bidirectional`,
//! 64 KiB buffers) in front of it, a ws app (a wsgate echo route) behind wsgate's proxy
//! route and behind Debian's nginx (a config the bench writes: one worker, 64 KiB proxy
//! buffers, ws and wss; its columns stay empty when nginx is not installed).
//!
//! Run: `cargo bench --bench load` (LOAD_SECS=N each phase's length, default 2; LOAD_REPS=N
//! how often each phase runs, the order of the servers rotated each time, default 3, the
//! median is reported; LOAD_IDLE=N the idle sessions held for memory, default 1000;
//! LOAD_ROWS=prefix,… only the rows whose name starts with one of these, e.g.
//! "ws bridge new connections" or "wss").
//!
//! Measures: single-connection throughput (64 KiB messages, every echoed byte checked
//! against what was sent), round trips per second (32-byte messages, 64 connections, each
//! echo checked), new connections per second (handshake, TLS for wss, one message, close),
//! the server's CPU per unit, TLS handshakes with and without session resumption, and KiB per
//! idle session (RSS growth / N, from a fresh process each time). One table, with the ratio
//! and the target of each row.
//! Then an over-capacity flood (LOAD_FLOOD=N connections, default 5000, 0 to skip) against
//! max_connections = 100: admitted clients' handshake latency and wsgate's CPU, quiet and
//! during the flood (LOAD_ONLY=flood runs only this). LOAD_ONLY=proxy_protocol compares new
//! connections/s on a plain listener and on a proxy_protocol one (the PROXY parsing cost).
//! LOAD_ONLY=deflate compares one text route (JSON lines, `framing = "lines"`) used by clients
//! that offer permessage-deflate and by clients that do not: round trips/s, wsgate's CPU per
//! round trip, bytes on the wire, and KiB per idle and per active session.
//! Then (LOAD_ONLY=h2 for only this) WebSockets over HTTP/2 (RFC 8441) through wsgate's wss
//! proxy route beside Debian's HAProxy (RFC 8441 on its frontend, HTTP/1.1 to the same ws
//! app): new sessions per second on open connections, round trips with 64 streams on 4
//! connections, one stream's throughput beside wsgate's own HTTP/1.1 wss, and KiB per idle
//! stream; with the stack's floor beside them (`h2_floor`: the same crates, nothing of
//! wsgate's; like wsgate, it runs a connection's streams on the connection's task).
//! LOAD_H2_BASELINE=path/to/wsgate adds another build of wsgate (say, main's) to the
//! new-session and round-trip rotations, for an A/B of a change within one run;
//! LOAD_H2_FLOOR2=spawn adds a floor with a task per stream (or `current`: the floor on a
//! current-thread runtime; `connect`: the floor with tokio's connect, the request sent once
//! tokio has seen the socket writable) beside the floor.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use wsgate::protocol::frame::{encode_frame, FrameHeader, OpCode};
use wsgate::stream::Io;

#[path = "../tests/support/h2io.rs"]
mod h2io;

const ROLE: &str = "WSGATE_LOAD_ROLE";

/// How long a measured server may send nothing before its phase is ended.
const STALL: Duration = Duration::from_secs(10);

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("echo") => return serve_role(None),
        Ok("h2floor") => return h2_floor(),
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
    if std::env::var("LOAD_ONLY").as_deref() == Ok("h2") {
        h2_bench(phase, reps, idle);
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

    anchors(phase, reps, idle);
    if rows_wanted("h2") {
        h2_bench(phase, reps, idle);
    }
    let flood: usize = std::env::var("LOAD_FLOOD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    if flood > 0 && rows_wanted("flood") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(over_capacity_flood(flood, phase));
    }
}

/// LOAD_ROWS=a,b runs only the rows whose name starts with one of these (for profiling one
/// path: "ws bridge new connections", "wss bridge new connections (resumed)", "wss proxy",
/// "ws", "flood"); no commas inside one; unset runs all.
fn rows_wanted(name: &str) -> bool {
    match std::env::var("LOAD_ROWS") {
        Ok(rows) => rows.split(',').any(|r| name.starts_with(r.trim())),
        Err(_) => true,
    }
}

/// Worker threads of every tokio server the bench starts (wsgate, the relay, the backends):
/// LOAD_WORKERS, default 1, as nginx runs here with one worker process, so every server has
/// the same share of the machine.
fn workers() -> String {
    std::env::var("LOAD_WORKERS").unwrap_or_else(|_| "1".into())
}

/// A freshly started server for a memory figure: its RSS reader, where to connect, and the
/// process (stopped when dropped).
type Fresh = (Box<dyn Fn() -> f64>, Target, Box<dyn std::any::Any>);

/// One measured server: where the client connects, and whose CPU is counted.
struct Peer {
    target: Target,
    pid: u32,
}

/// One line of the anchors table.
struct Row {
    path: &'static str,
    measure: String,
    wsgate: f64,
    relay: Option<f64>,
    nginx: Option<f64>,
    /// What the row is held to.
    target: Goal,
}

enum Goal {
    /// wsgate / relay at least this.
    RelayAtLeast(f64),
    /// wsgate / relay at most this (CPU).
    RelayAtMost(f64),
    /// wsgate / nginx at least this.
    NginxAtLeast(f64),
    /// wsgate / nginx at most this (CPU, memory).
    NginxAtMost(f64),
    /// wsgate at most this (KiB).
    AtMost(f64),
    /// Reported, no target.
    None,
}

impl Row {
    fn print(&self) {
        let fmt = |v: Option<f64>| match v {
            Some(v) if v >= 100.0 => format!("{v:.0}"),
            Some(v) => format!("{v:.1}"),
            None => "—".to_string(),
        };
        let ratio = |base: Option<f64>| base.map(|b| self.wsgate / b);
        let (ratio, goal, met) = match self.target {
            Goal::RelayAtLeast(k) => {
                let r = ratio(self.relay);
                (r, format!("≥ {k:.1}× relay"), r.map(|r| r >= k))
            }
            Goal::RelayAtMost(k) => {
                let r = ratio(self.relay);
                (r, format!("≤ {k:.1}× relay"), r.map(|r| r <= k))
            }
            Goal::NginxAtLeast(k) => {
                let r = ratio(self.nginx);
                (r, format!("≥ {k:.1}× nginx"), r.map(|r| r >= k))
            }
            Goal::NginxAtMost(k) => {
                let r = ratio(self.nginx);
                (r, format!("≤ {k:.1}× nginx"), r.map(|r| r <= k))
            }
            Goal::AtMost(v) => (
                ratio(self.relay.or(self.nginx)),
                format!("≤ {v:.0}"),
                Some(self.wsgate <= v),
            ),
            Goal::None => (ratio(self.relay.or(self.nginx)), String::new(), None),
        };
        let ratio = ratio.map_or("—".to_string(), |r| format!("{r:.2}×"));
        let met = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {ratio} | {goal} {met} |",
            self.path,
            self.measure,
            fmt(Some(self.wsgate)),
            fmt(self.relay),
            fmt(self.nginx),
        );
    }
}

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` against each peer `reps` times, the order rotated each time; the median rate and
/// the median CPU µs per unit (unit = what the rate counts, per second) of each.
fn measure_rotated(reps: usize, f: &dyn Fn(&Target) -> f64, peers: &[&Peer]) -> Vec<(f64, f64)> {
    let mut runs = vec![(Vec::new(), Vec::new()); peers.len()];
    for rep in 0..reps.max(1) {
        for k in 0..peers.len() {
            let i = (k + rep) % peers.len();
            let c0 = cpu_secs(peers[i].pid);
            let t0 = Instant::now();
            let v = f(&peers[i].target);
            let cpu = cpu_secs(peers[i].pid) - c0;
            runs[i].0.push(v);
            runs[i].1.push(cpu * 1e6 / (v * t0.elapsed().as_secs_f64()));
        }
    }
    runs.into_iter()
        .map(|(v, c)| (median(v), median(c)))
        .collect()
}

/// A development CA and a localhost certificate in `dir` (certs/gen-dev-certs.sh).
fn dev_certs(dir: &std::path::Path) {
    let made = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-certs.sh"
    ))
    .arg(dir)
    .arg("localhost")
    .output()
    .expect("certs/gen-dev-certs.sh (needs openssl)");
    assert!(made.status.success());
}

/// The load table: wsgate's bridge, proxy and wss paths beside a plain tokio relay and
/// Debian's nginx (when installed), all in front of the same backends, in one run.
fn anchors(phase: Duration, reps: usize, idle: usize) {
    let dir = std::env::temp_dir().join(format!("wsgate-load-{}", std::process::id()));
    dev_certs(&dir);
    // The backends: a TCP echo for the bridge and the relay, a ws app (a wsgate echo route in
    // its own process) for the proxies.
    let echo = Server::spawn_role("echo", None);
    let app = Server::spawn_wsgate(&["127.0.0.1:0", "echo"]);
    // wsgate's bridge (ws and wss listeners) in front of the echo, its proxy route (ws and
    // wss) in front of the app.
    let two_listeners = |name: &str, backend: String| {
        let (plain, tls) = (free_addr(), free_addr());
        let conf = config_file(
            &dir,
            name,
            format!(
                "[[listen]]\naddr = \"{plain}\"\n[[listen]]\naddr = \"{tls}\"\ntls = {{ cert = \"{0}/server.crt\", key = \"{0}/server.key\" }}\n[[route]]\npath = \"/\"\nbackend = \"{backend}\"\n",
                dir.display(),
            ),
        );
        (conf, tls)
    };
    let (bridge_conf, bridge_tls) = two_listeners("bridge.toml", format!("tcp://{}", echo.addr));
    let (proxy_conf, proxy_tls) = two_listeners("proxy.toml", format!("ws://{}", app.addr));
    let bridge = Server::spawn_config(&bridge_conf);
    let proxy = Server::spawn_config(&proxy_conf);
    let relay = Server::spawn_role("relay", Some(echo.addr));
    let nginx_installed = Command::new("nginx")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    let nginx = nginx_installed.then(|| Nginx::start(&dir.join("nginx"), app.addr, &dir));

    let full = tls_connector(&dir.join("ca.crt"), false);
    let resuming = tls_connector(&dir.join("ca.crt"), true);
    let tls = |addr, connector: &TlsConnector| Target {
        tls: Some(connector.clone()),
        ..Target::ws(addr)
    };
    let peer = |target: Target, pid: u32| Peer { target, pid };
    let g_ws = peer(Target::ws(bridge.addr), bridge.child.id());
    let g_wss = peer(tls(bridge_tls, &full), bridge.child.id());
    let g_wss_resumed = peer(tls(bridge_tls, &resuming), bridge.child.id());
    let p_ws = peer(Target::ws(proxy.addr), proxy.child.id());
    let p_wss = peer(tls(proxy_tls, &full), proxy.child.id());
    let raw = peer(Target::raw(relay.addr), relay.child.id());
    let n = nginx.as_ref().map(|n| {
        let pid = n.worker();
        (
            peer(Target::ws(n.plain), pid),
            peer(tls(n.tls, &full), pid),
            peer(tls(n.tls, &resuming), pid),
        )
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let measure = |f: &dyn Fn(&Target) -> f64, peers: &[&Peer]| measure_rotated(reps, f, peers);
    // Memory from a fresh process each time: the median of `reps` (at most 3) fresh starts.
    let fresh_memory = |start: &dyn Fn() -> Fresh| {
        median(
            (0..reps.clamp(1, 3))
                .map(|_| {
                    let (rss, target, _process) = start();
                    rt.block_on(idle_memory(&*rss, &target, idle))
                })
                .collect(),
        )
    };
    let fresh_wsgate = |conf: std::path::PathBuf,
                        tls_addr: Option<std::net::SocketAddr>,
                        connector: TlsConnector| {
        move || -> Fresh {
            // The config's ports are taken by the running instance: a copy on new ones.
            let text = std::fs::read_to_string(&conf).unwrap();
            let addrs: Vec<String> = text
                .lines()
                .filter_map(|l| l.strip_prefix("addr = \""))
                .map(|a| a.trim_end_matches('"').to_string())
                .collect();
            let (plain, tls) = (free_addr(), free_addr());
            let text = text
                .replace(&addrs[0], &plain.to_string())
                .replace(&addrs[1], &tls.to_string());
            let fresh = config_file(&conf.with_file_name("fresh"), "fresh.toml", text);
            let server = Server::spawn_config(&fresh);
            let pid = server.child.id();
            let target = match tls_addr {
                None => Target::ws(plain),
                Some(_) => Target {
                    tls: Some(connector.clone()),
                    ..Target::ws(tls)
                },
            };
            (Box::new(move || rss_kib_of(pid)), target, Box::new(server))
        }
    };

    let ng = |i: usize| n.as_ref().map(|n| [&n.0, &n.1, &n.2][i]);
    let mut rows = Vec::new();
    let mut add = |row: Row| {
        row.print();
        rows.push(row);
    };
    println!(
        "phase {}s, {reps} runs each (median), order rotated; machine: {} cores; wsgate and the relay: {} worker thread(s) (LOAD_WORKERS); nginx: {}",
        phase.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        workers(),
        if nginx_installed {
            "Debian's nginx, 1 worker, proxy_buffer_size 64k, proxy_buffers 4 64k"
        } else {
            "not installed (its columns are empty)"
        }
    );
    println!("\n| path | measure | wsgate | plain relay | nginx | ratio | target |\n|---|---|---:|---:|---:|---:|---|");

    // Rows from one measurement: `r[0]` is wsgate, then the baselines in `peers`' order
    // (`relay` / `nginx`: their index in `r`, when measured).
    let row = |path: &'static str,
               measure: &str,
               value: f64,
               relay: Option<f64>,
               nginx: Option<f64>,
               target: Goal| Row {
        path,
        measure: measure.to_string(),
        wsgate: value,
        relay,
        nginx,
        target,
    };
    let rate = |r: &[(f64, f64)], at: Option<usize>| at.and_then(|i| r.get(i)).map(|x| x.0);
    let cpu = |r: &[(f64, f64)], at: Option<usize>| at.and_then(|i| r.get(i)).map(|x| x.1);
    let held = format!("KiB per idle session ({idle} held, fresh process)");
    let (relay_at, nginx_at) = (Some(1), Some(1));

    // -- ws bridge --
    if rows_wanted("ws bridge throughput") {
        let r = measure(&|t| rt.block_on(throughput(t, phase)), &[&g_ws, &raw]);
        add(row(
            "ws bridge",
            "MB/s, 1 conn, 64 KiB messages",
            r[0].0,
            rate(&r, relay_at),
            None,
            Goal::RelayAtLeast(1.0),
        ));
        add(row(
            "ws bridge",
            "CPU µs per MB",
            r[0].1,
            cpu(&r, relay_at),
            None,
            Goal::None,
        ));
    }
    if rows_wanted("ws bridge round trips") {
        let r = measure(&|t| rt.block_on(round_trips(t, 64, phase)), &[&g_ws, &raw]);
        add(row(
            "ws bridge",
            "round trips/s, 64 conns, 32 B",
            r[0].0,
            rate(&r, relay_at),
            None,
            Goal::RelayAtLeast(1.0),
        ));
        add(row(
            "ws bridge",
            "CPU µs per round trip",
            r[0].1,
            cpu(&r, relay_at),
            None,
            Goal::RelayAtMost(1.0),
        ));
    }
    if rows_wanted("ws bridge new connections") {
        let mut peers = vec![&g_ws, &raw];
        peers.extend(ng(0));
        let r = measure(&|t| rt.block_on(new_connections(t, phase)), &peers);
        add(row(
            "ws bridge",
            "new connections/s (nginx: its ws proxy)",
            r[0].0,
            rate(&r, relay_at),
            rate(&r, Some(2)),
            Goal::NginxAtLeast(1.5),
        ));
        add(row(
            "ws bridge",
            "CPU µs per new connection",
            r[0].1,
            cpu(&r, relay_at),
            cpu(&r, Some(2)),
            Goal::None,
        ));
    }
    if rows_wanted("ws bridge memory") {
        let g = fresh_memory(&fresh_wsgate(bridge_conf.clone(), None, full.clone()));
        let r = fresh_memory(&|| {
            let relay = Server::spawn_role("relay", Some(echo.addr));
            let pid = relay.child.id();
            let target = Target::raw(relay.addr);
            (Box::new(move || rss_kib_of(pid)), target, Box::new(relay))
        });
        add(row("ws bridge", &held, g, Some(r), None, Goal::AtMost(8.0)));
    }
    // -- ws proxy route (only with nginx to compare) --
    if let Some(nginx_ws) = ng(0) {
        let peers = [&p_ws, nginx_ws];
        if rows_wanted("ws proxy throughput") {
            let r = measure(&|t| rt.block_on(throughput(t, phase)), &peers);
            add(row(
                "ws proxy route",
                "MB/s, 1 conn, 64 KiB messages",
                r[0].0,
                None,
                rate(&r, nginx_at),
                Goal::NginxAtLeast(1.0),
            ));
        }
        if rows_wanted("ws proxy round trips") {
            let r = measure(&|t| rt.block_on(round_trips(t, 64, phase)), &peers);
            add(row(
                "ws proxy route",
                "round trips/s, 64 conns, 32 B",
                r[0].0,
                None,
                rate(&r, nginx_at),
                Goal::NginxAtLeast(1.0),
            ));
            add(row(
                "ws proxy route",
                "CPU µs per round trip",
                r[0].1,
                None,
                cpu(&r, nginx_at),
                Goal::NginxAtMost(1.0),
            ));
        }
        if rows_wanted("ws proxy new connections") {
            let r = measure(&|t| rt.block_on(new_connections(t, phase)), &peers);
            add(row(
                "ws proxy route",
                "new connections/s",
                r[0].0,
                None,
                rate(&r, nginx_at),
                Goal::NginxAtLeast(1.0),
            ));
            add(row(
                "ws proxy route",
                "CPU µs per new connection",
                r[0].1,
                None,
                cpu(&r, nginx_at),
                Goal::NginxAtMost(1.0),
            ));
        }
        if rows_wanted("ws proxy memory") {
            let g = fresh_memory(&fresh_wsgate(proxy_conf.clone(), None, full.clone()));
            let k = fresh_memory(&|| {
                let fresh = Nginx::start(
                    &dir.join(format!("nginx-{}", free_addr().port())),
                    app.addr,
                    &dir,
                );
                let pid = fresh.worker();
                let target = Target::ws(fresh.plain);
                (Box::new(move || rss_kib_of(pid)), target, Box::new(fresh))
            });
            add(row(
                "ws proxy route",
                &held,
                g,
                None,
                Some(k),
                Goal::NginxAtMost(1.0),
            ));
        }
    }
    // -- wss (nginx: its wss proxy, when installed) --
    let mut wss_peers = vec![&g_wss];
    wss_peers.extend(ng(1));
    if rows_wanted("wss bridge throughput") {
        let r = measure(&|t| rt.block_on(throughput(t, phase)), &wss_peers);
        add(row(
            "wss bridge",
            "MB/s, 1 conn (nginx: its wss proxy)",
            r[0].0,
            None,
            rate(&r, nginx_at),
            Goal::NginxAtLeast(1.5),
        ));
    }
    if rows_wanted("wss bridge new connections (full TLS)") {
        let r = measure(&|t| rt.block_on(new_connections(t, phase)), &wss_peers);
        add(row(
            "wss bridge",
            "new connections/s, full TLS handshakes",
            r[0].0,
            None,
            rate(&r, nginx_at),
            Goal::NginxAtLeast(1.5),
        ));
        add(row(
            "wss bridge",
            "CPU µs per new connection, full TLS handshakes",
            r[0].1,
            None,
            cpu(&r, nginx_at),
            Goal::None,
        ));
    }
    if rows_wanted("wss bridge new connections (resumed)") {
        let mut peers = vec![&g_wss_resumed];
        peers.extend(ng(2));
        RESUMED.store(0, Ordering::Relaxed);
        HANDSHAKES.store(0, Ordering::Relaxed);
        let r = measure(&|t| rt.block_on(new_connections(t, phase)), &peers);
        let share = RESUMED.load(Ordering::Relaxed) as f64
            / HANDSHAKES.load(Ordering::Relaxed).max(1) as f64;
        let name = format!(
            "new connections/s, returning clients ({:.0} % of all handshakes resumed)",
            share * 100.0
        );
        add(row(
            "wss bridge",
            &name,
            r[0].0,
            None,
            rate(&r, nginx_at),
            Goal::NginxAtLeast(1.5),
        ));
        add(row(
            "wss bridge",
            "CPU µs per new connection, returning clients",
            r[0].1,
            None,
            cpu(&r, nginx_at),
            Goal::None,
        ));
    }
    if rows_wanted("wss bridge memory") {
        let g = fresh_memory(&fresh_wsgate(
            bridge_conf.clone(),
            Some(bridge_tls),
            full.clone(),
        ));
        add(row("wss bridge", &held, g, None, None, Goal::AtMost(16.0)));
    }
    let mut pwss_peers = vec![&p_wss];
    pwss_peers.extend(ng(1));
    if rows_wanted("wss proxy throughput") {
        let r = measure(&|t| rt.block_on(throughput(t, phase)), &pwss_peers);
        add(row(
            "wss proxy route",
            "MB/s, 1 conn",
            r[0].0,
            None,
            rate(&r, nginx_at),
            Goal::NginxAtLeast(1.0),
        ));
    }
    if rows_wanted("wss proxy round trips") {
        let r = measure(&|t| rt.block_on(round_trips(t, 64, phase)), &pwss_peers);
        add(row(
            "wss proxy route",
            "round trips/s, 64 conns",
            r[0].0,
            None,
            rate(&r, nginx_at),
            Goal::NginxAtLeast(1.0),
        ));
    }
    if rows_wanted("wss proxy new connections") {
        let r = measure(&|t| rt.block_on(new_connections(t, phase)), &pwss_peers);
        add(row(
            "wss proxy route",
            "new connections/s, full TLS handshakes",
            r[0].0,
            None,
            rate(&r, nginx_at),
            Goal::NginxAtLeast(1.0),
        ));
    }
    if rows_wanted("wss proxy memory") {
        let g = fresh_memory(&fresh_wsgate(
            proxy_conf.clone(),
            Some(proxy_tls),
            full.clone(),
        ));
        add(row(
            "wss proxy route",
            &held,
            g,
            None,
            None,
            Goal::AtMost(16.0),
        ));
    }
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
    // The whole table once more, together, for copying.
    println!("\n| path | measure | wsgate | plain relay | nginx | ratio | target |\n|---|---|---:|---:|---:|---:|---|");
    for row in &rows {
        row.print();
    }
}

/// TLS handshakes the bench's clients made, and how many of them resumed a session.
static HANDSHAKES: AtomicU64 = AtomicU64::new(0);
static RESUMED: AtomicU64 = AtomicU64::new(0);

/// Where a client connects, and how: raw TCP, WebSocket, or WebSocket over TLS.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    ws: bool,
    tls: Option<TlsConnector>,
    /// Send a PROXY v1 header first (a listener with proxy_protocol = true).
    proxy_header: bool,
    /// WebSockets as streams of these open HTTP/2 connections (RFC 8441), taken in turn.
    h2: Option<H2Pool>,
}

/// Open HTTP/2 connections (TLS, ALPN h2) that new WebSockets are opened on, in turn.
#[derive(Clone)]
struct H2Pool {
    senders: Arc<Vec<h2::client::SendRequest<Bytes>>>,
    next: Arc<AtomicU64>,
}

impl H2Pool {
    /// `n` connections to `addr`, each with the server's SETTINGS in hand.
    async fn connect(addr: SocketAddr, connector: &TlsConnector, n: usize) -> H2Pool {
        let mut senders = Vec::with_capacity(n);
        for _ in 0..n {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
            let (sender, conn) = h2::client::Builder::new()
                .initial_window_size(1 << 20)
                .initial_connection_window_size(1 << 30)
                .handshake(tls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let sender = sender.ready().await.unwrap();
            // The server's SETTINGS (extended CONNECT on, its stream cap) before the first
            // stream: bounded, 10 s.
            let started = Instant::now();
            while sender.current_max_send_streams() == usize::MAX {
                assert!(started.elapsed() < Duration::from_secs(10), "no SETTINGS");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            senders.push(sender);
        }
        H2Pool {
            senders: Arc::new(senders),
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A WebSocket on the next connection: extended CONNECT, and its 200.
    async fn websocket(&self, addr: SocketAddr) -> h2io::H2Io {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.senders.len();
        let mut sender = self.senders[i].clone().ready().await.unwrap();
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("https://localhost:{}/", addr.port()))
            .header("sec-websocket-version", "13")
            .extension(h2::ext::Protocol::from_static("websocket"))
            .body(())
            .unwrap();
        let (response, send) = sender.send_request(req, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200, "extended CONNECT answered");
        h2io::H2Io::new(send, response.into_body())
    }
}

impl Target {
    fn raw(addr: SocketAddr) -> Target {
        Target {
            addr,
            ws: false,
            tls: None,
            proxy_header: false,
            h2: None,
        }
    }
    fn ws(addr: SocketAddr) -> Target {
        Target {
            addr,
            ws: true,
            tls: None,
            proxy_header: false,
            h2: None,
        }
    }
}

/// A client TLS config trusting the run's CA; `resume` keeps rustls's in-memory session
/// store (tickets), so a returning client resumes; without it every handshake is a full one.
fn tls_connector(ca: &std::path::Path, resume: bool) -> TlsConnector {
    tls_connector_alpn(ca, resume, &[])
}

/// As [`tls_connector`], offering these ALPN protocols.
fn tls_connector_alpn(ca: &std::path::Path, resume: bool, alpn: &[&[u8]]) -> TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    }
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
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
        cmd.env(ROLE, role).env("TOKIO_WORKER_THREADS", workers());
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
        Server::spawn_wsgate_from(env!("CARGO_BIN_EXE_wsgate"), args)
    }

    fn spawn_wsgate_from(binary: &str, args: &[&str]) -> Server {
        let mut cmd = Command::new(binary);
        // LOAD_SESSION_LOG=off drops the two info lines each session writes (upgraded,
        // session ended), as the anchors run with their logs off.
        let filter = match std::env::var("LOAD_SESSION_LOG").as_deref() {
            Ok("off") => "warn,wsgate::server=info,wsgate::server::session=warn",
            _ => "warn,wsgate::server=info",
        };
        cmd.args(args)
            .env("RUST_LOG", filter)
            .env("TOKIO_WORKER_THREADS", workers());
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

/// The floor of wsgate's stack for RFC 8441 proxying: the least a proxy built on the same
/// crates (tokio, tokio-rustls, h2) can do per stream, with nothing of wsgate's in it (no
/// routes, checks, limits, logs, metrics or timers). TLS with ALPN h2, wsgate's windows and
/// stream cap; each extended CONNECT becomes a TCP connection to the app with a fixed HTTP/1.1
/// upgrade request, the app's 101 answered as 200, then `copy_bidirectional`. It tells how
/// much of the gap to HAProxy is wsgate's own and how much the stack's.
fn h2_floor() {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let dir = std::path::PathBuf::from(std::env::var("WSGATE_LOAD_CERTS").unwrap());
    let app: SocketAddr = std::env::var("WSGATE_LOAD_TARGET")
        .unwrap()
        .parse()
        .unwrap();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let mut config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    // WSGATE_LOAD_FLOOR_MODE: "inline" (the bench's floor) runs every stream of a connection
    // on the connection's own task, as wsgate does; "spawn" a task per stream; "current"
    // inline on a current-thread runtime; "connect" with tokio's connect (LOAD_H2_FLOOR2 runs
    // one beside the floor).
    let mode = std::env::var("WSGATE_LOAD_FLOOR_MODE").unwrap_or_default();
    let rt = match mode.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .unwrap();
    let inline = mode != "spawn";
    // As wsgate does (backend.rs, `dial`), the upgrade request is sent as soon as connect()
    // returns, unless the mode is "connect".
    let early = mode != "connect";
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        eprintln!("addr={}", listener.local_addr().unwrap());
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::Builder::new()
                    .enable_connect_protocol()
                    .max_concurrent_streams(128)
                    .initial_window_size(256 * 1024)
                    .initial_connection_window_size((1 << 31) - 1)
                    .handshake::<_, Bytes>(tls)
                    .await
                else {
                    return;
                };
                if !inline {
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        tokio::spawn(floor_stream(req, respond, app, early));
                    }
                    return;
                }
                let mut streams = futures_util::stream::FuturesUnordered::new();
                loop {
                    tokio::select! {
                        accepted = conn.accept() => match accepted {
                            Some(Ok((req, respond))) => {
                                streams.push(floor_stream(req, respond, app, early))
                            }
                            _ => return,
                        },
                        Some(()) = futures_util::StreamExt::next(&mut streams), if !streams.is_empty() => {}
                    }
                }
            });
        }
    });
}

/// One stream of [`h2_floor`]: the app's upgrade, the 200, then bytes both ways.
async fn floor_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    app: SocketAddr,
    early: bool,
) {
    let upgrade = format!(
        "GET / HTTP/1.1\r\nHost: {app}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut tcp = if early {
        // The request written on the socket before tokio knows it is connected (on loopback
        // the handshake completes within connect()), sparing the wait for its writability.
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM.nonblocking(),
            None,
        )
        .unwrap();
        socket.set_tcp_nodelay(true).unwrap();
        match socket.connect(&app.into()) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return,
            _ => {}
        }
        let sent = socket.send(upgrade.as_bytes()).unwrap_or(0);
        let mut tcp = TcpStream::from_std(socket.into()).unwrap();
        if tcp.write_all(&upgrade.as_bytes()[sent..]).await.is_err() {
            return;
        }
        tcp
    } else {
        let Ok(mut tcp) = TcpStream::connect(app).await else {
            return;
        };
        tcp.set_nodelay(true).unwrap();
        if tcp.write_all(upgrade.as_bytes()).await.is_err() {
            return;
        }
        tcp
    };
    let mut head = Vec::with_capacity(512);
    let end = loop {
        let mut buf = [0u8; 512];
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > 8192 {
            return;
        }
    };
    if !head.starts_with(b"HTTP/1.1 101") {
        return;
    }
    let Ok(send) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    let mut client = h2io::H2Io::new(send, req.into_body());
    if end < head.len() && client.write_all(&head[end..]).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut tcp).await;
}

// ---- a minimal client: raw TCP, or WebSocket with our own masked frames ----

struct Client {
    stream: Box<dyn Io>,
    ws: bool,
    inbuf: Vec<u8>,
    /// An HTTP/2 stream: its close ends with our END_STREAM.
    h2: bool,
}

impl Client {
    async fn connect(target: &Target) -> Client {
        if let Some(pool) = &target.h2 {
            return Client {
                stream: Box::new(pool.websocket(target.addr).await),
                ws: true,
                inbuf: Vec::new(),
                h2: true,
            };
        }
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
                let tls = connector.connect(name, tcp).await.unwrap();
                HANDSHAKES.fetch_add(1, Ordering::Relaxed);
                if tls.get_ref().1.handshake_kind()
                    == Some(tokio_rustls::rustls::HandshakeKind::Resumed)
                {
                    RESUMED.fetch_add(1, Ordering::Relaxed);
                }
                Box::new(tls)
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
        Client {
            stream,
            ws,
            inbuf,
            h2: false,
        }
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

    /// Reads until `expected.len()` payload bytes have arrived (frame headers are parsed and
    /// skipped) and checks they are the bytes sent: a fast wrong echo cannot win.
    async fn read_payload(&mut self, expected: &[u8]) {
        let want = expected.len();
        let mut got = Vec::with_capacity(want);
        let mut buf = vec![0u8; 64 * 1024];
        let mut remaining_in_frame = 0usize;
        loop {
            // Consume what is buffered.
            loop {
                if remaining_in_frame > 0 {
                    let take = remaining_in_frame.min(self.inbuf.len());
                    got.extend(self.inbuf.drain(..take));
                    remaining_in_frame -= take;
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
                    got.append(&mut self.inbuf);
                    break;
                }
                if got.len() >= want && remaining_in_frame == 0 {
                    break;
                }
            }
            if got.len() >= want && remaining_in_frame == 0 {
                assert_eq!(got, expected, "the echo differs from what was sent");
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
        // An HTTP/2 stream: our END_STREAM too (the server waits for it, RFC 8441).
        if self.h2 {
            let _ = self.stream.shutdown().await;
        }
    }
}

/// MB/s of payload echoed through one connection, writer and reader running at once.
async fn throughput(target: &Target, phase: Duration) -> f64 {
    let ws = target.ws;
    // A server that stopped answering on this connection in an earlier phase (Debian's
    // HAProxy has) ends this one too, said, rather than hanging the bench.
    let Ok(client) = tokio::time::timeout(STALL, Client::connect(target)).await else {
        eprintln!(
            "warning: {} opened no session within {STALL:?}; its throughput phase ends here",
            target.addr
        );
        return 0.0;
    };
    // 64 KiB that repeat with no shorter period, checked on the way back.
    let pattern: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let msg = client.message(&pattern);
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
        // A server that stops echoing ends the phase (said, and its rate shows it) rather
        // than hanging the bench.
        let Ok(read) = tokio::time::timeout(STALL, r.read(&mut buf)).await else {
            eprintln!(
                "warning: {} sent nothing for {STALL:?}; its throughput phase ends here",
                target.addr
            );
            break;
        };
        let n = read.unwrap();
        assert!(n > 0, "server closed");
        if !ws {
            check_echo(&pattern, payload, &buf[..n]);
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
                check_echo(&pattern, payload, &pending[at..at + take]);
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

/// Checks that `echoed`, found at stream offset `at`, is the repeating `pattern`.
fn check_echo(pattern: &[u8], at: u64, mut echoed: &[u8]) {
    let mut i = (at % pattern.len() as u64) as usize;
    while !echoed.is_empty() {
        let take = echoed.len().min(pattern.len() - i);
        assert!(
            echoed[..take] == pattern[i..i + take],
            "the echo differs from what was sent at byte {at}"
        );
        echoed = &echoed[take..];
        i = 0;
    }
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
            let mut i = 0u8;
            while Instant::now() < deadline {
                // Each message different from the last.
                let payload = [i; 32];
                i = i.wrapping_add(1);
                c.stream.write_all(&c.message(&payload)).await.unwrap();
                c.read_payload(&payload).await;
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
                let payload = [0x63u8; 32];
                c.stream.write_all(&c.message(&payload)).await.unwrap();
                c.read_payload(&payload).await;
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
        c.read_payload(b"hi").await;
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

// ---- WebSockets over HTTP/2 (RFC 8441), beside HAProxy ----

/// Puts the optional peers that are there at the end of a rotation; where each one's result
/// lands in the rotation's results.
fn extra_peers<'a, const N: usize>(
    peers: &mut Vec<(&'a Target, u32)>,
    extras: [&'a Option<(Target, u32)>; N],
) -> [Option<usize>; N] {
    extras.map(|extra| {
        extra.as_ref().map(|(target, pid)| {
            peers.push((target, *pid));
            peers.len() - 1
        })
    })
}

/// A table row for an optional peer: its rate and CPU, and two ratios (rate, CPU) against
/// what it is compared with.
fn compared_row(
    label: &str,
    shown: (f64, f64),
    ratio: (f64, f64),
    prefix: &str,
    of: &str,
    tag: &str,
) {
    println!(
        "| {label} | {:.0} / {:.1} | {prefix}{:.3}× / {:.3}× {of} | | | ({tag}) |",
        shown.0, shown.1, ratio.0, ratio.1
    );
}

/// wsgate's wss proxy route (HTTP/2 by ALPN) and Debian's HAProxy (RFC 8441 on its frontend,
/// one thread), both in front of the same ws app over HTTP/1.1: new WebSocket sessions per
/// second on already-open HTTP/2 connections (beside wsgate's own new wss connections with
/// full TLS handshakes), round trips with 64 streams on 4 connections, one stream's
/// throughput (beside wsgate's HTTP/1.1 wss on the same listener), and KiB per idle stream
/// (`idle` streams over 10 connections, fresh process).
fn h2_bench(phase: Duration, reps: usize, idle: usize) {
    let dir = std::env::temp_dir().join(format!("wsgate-load-h2-{}", std::process::id()));
    dev_certs(&dir);
    let app = Server::spawn_wsgate(&["127.0.0.1:0", "echo"]);
    let conf_for = |name: &str, backend: &str| {
        config_file(
            &dir,
            name,
            format!(
                "[[listen]]\naddr = \"{}\"\ntls = {{ cert = \"{d}/server.crt\", key = \"{d}/server.key\" }}\n[limits]\nmax_streams_per_connection = 128\n[[route]]\npath = \"/\"\nbackend = \"{backend}\"\n",
                free_addr(),
                d = dir.display(),
            ),
        )
    };
    let app_backend = format!("ws://{}", app.addr);
    let gate_conf = |name: &str| conf_for(name, &app_backend);
    let gate = Server::spawn_config(&gate_conf("h2.toml"));
    // Another build of wsgate with the same config, for an A/B within this run.
    let baseline = std::env::var("LOAD_H2_BASELINE").ok().map(|binary| {
        let conf = gate_conf("h2baseline.toml");
        Server::spawn_wsgate_from(&binary, &["--config", conf.to_str().unwrap()])
    });
    // The echo route: what multiplexing saves, without an app's connection per session.
    let echo_gate = Server::spawn_config(&conf_for("h2echo.toml", "echo"));
    let haproxy = Haproxy::start(&dir, app.addr, false);
    let haproxy_duties = Haproxy::start(&dir, app.addr, true);
    // The stack's floor (see `h2_floor`), in front of the same app.
    let floor_in = |mode: &str| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(ROLE, "h2floor")
            .env("TOKIO_WORKER_THREADS", workers())
            .env("WSGATE_LOAD_TARGET", app.addr.to_string())
            .env("WSGATE_LOAD_CERTS", &dir)
            .env("WSGATE_LOAD_FLOOR_MODE", mode);
        Server::start(cmd, "addr=")
    };
    let floor = floor_in("inline");
    // LOAD_H2_FLOOR2=spawn|current|connect: a second floor, built another way, beside the first.
    let floor2_mode = std::env::var("LOAD_H2_FLOOR2").ok();
    let floor2 = floor2_mode.as_deref().map(floor_in);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h2_tls = tls_connector_alpn(&dir.join("ca.crt"), false, &[b"h2"]);
    let full = tls_connector(&dir.join("ca.crt"), false);
    let over_h2 = |addr: SocketAddr, conns: usize| Target {
        h2: Some(rt.block_on(H2Pool::connect(addr, &h2_tls, conns))),
        ..Target::ws(addr)
    };
    let measure = |f: &dyn Fn(&Target) -> f64, peers: &[(&Target, u32)]| {
        let peers: Vec<Peer> = peers
            .iter()
            .map(|(target, pid)| Peer {
                target: (*target).clone(),
                pid: *pid,
            })
            .collect();
        measure_rotated(reps, f, &peers.iter().collect::<Vec<_>>())
    };
    let (gate_pid, haproxy_pid) = (gate.child.id(), haproxy.child.id());
    println!(
        "\nWebSockets over HTTP/2 (RFC 8441): wsgate's wss proxy route and Debian's HAProxy {} (1 thread), both to the same ws app over HTTP/1.1; phase {}s, {reps} runs each (median)\n",
        haproxy.version,
        phase.as_secs()
    );
    println!("| measure | wsgate h2 | HAProxy h2 | wsgate HTTP/1.1 wss | ratio | target |\n|---|---:|---:|---:|---:|---|");
    let line = |measure: &str,
                ours: f64,
                hap: Option<f64>,
                h1: Option<f64>,
                goal: &str,
                ratio: f64,
                met: bool| {
        let f = |v: Option<f64>| {
            v.map_or("—".into(), |v| {
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
        };
        println!(
            "| {measure} | {} | {} | {} | {ratio:.2}× | {goal} {} |",
            f(Some(ours)),
            f(hap),
            f(h1),
            match (goal.starts_with('('), met) {
                (true, _) => "",
                (false, true) => "met",
                (false, false) => "**not met**",
            }
        );
    };

    // New sessions on open connections (16 at a time over 4 connections), and wsgate's own
    // new wss connections with full handshakes on the same listener: on the echo route
    // (nothing behind wsgate), then on the proxy route beside HAProxy.
    let e4 = over_h2(echo_gate.addr, 4);
    let echo_full = Target {
        tls: Some(full.clone()),
        ..Target::ws(echo_gate.addr)
    };
    let echo_pid = echo_gate.child.id();
    let r = measure(
        &|t| rt.block_on(new_connections(t, phase)),
        &[(&e4, echo_pid), (&echo_full, echo_pid)],
    );
    line(
        "echo route: new WebSocket sessions/s on 4 open connections (HTTP/1.1: new wss connections/s, full TLS handshakes)",
        r[0].0,
        None,
        Some(r[1].0),
        "≥ 5× wsgate HTTP/1.1",
        r[0].0 / r[1].0,
        r[0].0 >= 5.0 * r[1].0,
    );
    line(
        "echo route: CPU µs per new session",
        r[0].1,
        None,
        Some(r[1].1),
        "(HTTP/1.1)",
        r[0].1 / r[1].1,
        true,
    );
    drop(e4);
    let (g4, h4) = (over_h2(gate.addr, 4), over_h2(haproxy.addr, 4));
    let f4 = over_h2(floor.addr, 4);
    let floor_pid = floor.child.id();
    let d4 = over_h2(haproxy_duties.addr, 4);
    let duties_pid = haproxy_duties.child.id();
    // wsgate's HTTP/1.1 wss with full handshakes, on a twin of the h2 gate (same binary, same
    // config): the process measured beside HAProxy serves only what HAProxy serves. A process
    // that also made thousands of full TLS handshakes between its h2 turns spent 3-4 % more
    // CPU per h2 session (an A/A with LOAD_H2_BASELINE: 1.043x when the measured process also
    // served the handshakes, 0.967x when the baseline did).
    let twin = Server::spawn_config(&gate_conf("h2twin.toml"));
    let twin_pid = twin.child.id();
    let wss_full = Target {
        tls: Some(full.clone()),
        ..Target::ws(twin.addr)
    };
    let b4 = baseline.as_ref().map(|b| {
        let target = over_h2(b.addr, 4);
        // A session on each connection now: a connection with no stream yet is closed at
        // the accept-time deadline (10 s), and its turn may come later than that.
        for _ in 0..4 {
            rt.block_on(async { Client::connect(&target).await.close().await });
        }
        (target, b.child.id())
    });
    let mut peers = vec![
        (&g4, gate_pid),
        (&h4, haproxy_pid),
        (&wss_full, twin_pid),
        (&f4, floor_pid),
        (&d4, duties_pid),
    ];
    let fl2 = floor2.as_ref().map(|f| (over_h2(f.addr, 4), f.child.id()));
    let [base_at, floor2_at] = extra_peers(&mut peers, [&b4, &fl2]);
    // The optional peers' rows: LOAD_H2_BASELINE's build beside this one, and the floor built
    // another way beside the floor (at `floor` in the results).
    let beside_baseline = |what: &str, r: &[(f64, f64)], at: Option<usize>| {
        if let Some(at) = at {
            let (ours, base) = (r[0], r[at]);
            compared_row(
                &format!("LOAD_H2_BASELINE's wsgate: {what}"),
                base,
                (ours.0 / base.0, ours.1 / base.1),
                "this build ",
                "of it",
                "A/B",
            );
        }
    };
    let beside_floor2 = |what: &str, r: &[(f64, f64)], floor: usize, at: Option<usize>| {
        if let (Some(mode), Some(at)) = (&floor2_mode, at) {
            let (other, floor) = (r[at], r[floor]);
            compared_row(
                &format!("floor built another way ({mode}): {what}"),
                other,
                (other.0 / floor.0, other.1 / floor.1),
                "",
                "of the floor",
                "experiment",
            );
        }
    };
    let r = measure(&|t| rt.block_on(new_connections(t, phase)), &peers);
    beside_floor2("new sessions/s, CPU µs per session", &r, 3, floor2_at);
    line(
        "proxy route: new WebSocket sessions/s on 4 open connections (HTTP/1.1: new wss connections/s, full TLS handshakes)",
        r[0].0,
        Some(r[1].0),
        Some(r[2].0),
        "(wsgate HTTP/1.1)",
        r[0].0 / r[2].0,
        true,
    );
    // A rate beside HAProxy's (held to ≥ 1.0×), then the CPU per unit beside it.
    let beside_haproxy = |rate: &str, cpu: &str, r: &[(f64, f64)]| {
        let (ours, theirs) = (r[0], r[1]);
        let goal = "≥ 1.0× HAProxy";
        line(
            rate,
            ours.0,
            Some(theirs.0),
            None,
            goal,
            ours.0 / theirs.0,
            ours.0 >= theirs.0,
        );
        line(
            cpu,
            ours.1,
            Some(theirs.1),
            None,
            "(HAProxy)",
            ours.1 / theirs.1,
            true,
        );
    };
    // The floor's rate and CPU, beside HAProxy's and wsgate's (reported, no target).
    let beside_floor = |what: &str, floor: &(f64, f64), ours: &(f64, f64), hap: &(f64, f64)| {
        println!(
            "| {what} | {:.0} / {:.1} | HAProxy {:.2}× / {:.2}×, wsgate {:.2}× / {:.2}× of the floor | | | (reported) |",
            floor.0,
            floor.1,
            floor.0 / hap.0,
            floor.1 / hap.1,
            ours.0 / floor.0,
            ours.1 / floor.1,
        );
    };
    beside_haproxy(
        "proxy route: new WebSocket sessions/s, beside HAProxy",
        "proxy route: CPU µs per new session",
        &r,
    );
    beside_floor(
        "stack floor (tokio + h2 + rustls, nothing else): new sessions/s, CPU µs per session",
        &r[3],
        &r[0],
        &r[1],
    );
    println!(
        "| HAProxy doing wsgate's per-session duties (a log line, X-Forwarded-For/-Proto/-Host, X-Real-IP): new sessions/s, CPU µs per session | {:.0} / {:.1} | {:.2}× / {:.2}× of HAProxy without them; wsgate {:.2}× / {:.2}× of it | | | (reported) |",
        r[4].0,
        r[4].1,
        r[4].0 / r[1].0,
        r[4].1 / r[1].1,
        r[0].0 / r[4].0,
        r[0].1 / r[4].1,
    );
    beside_baseline("new sessions/s, CPU µs per session", &r, base_at);
    drop(d4);
    // Round trips: 64 streams over 4 connections.
    let mut peers = vec![(&g4, gate_pid), (&h4, haproxy_pid), (&f4, floor_pid)];
    let [base_at, floor2_at] = extra_peers(&mut peers, [&b4, &fl2]);
    let r = measure(&|t| rt.block_on(round_trips(t, 64, phase)), &peers);
    beside_floor2("round trips/s, CPU µs per round trip", &r, 2, floor2_at);
    beside_baseline("round trips/s, CPU µs per round trip", &r, base_at);
    beside_haproxy(
        "proxy route: round trips/s, 64 streams on 4 connections, 32 B",
        "proxy route: CPU µs per round trip",
        &r,
    );
    beside_floor(
        "stack floor (tokio + h2 + rustls, nothing else): round trips/s, CPU µs per round trip",
        &r[2],
        &r[0],
        &r[1],
    );
    drop((g4, h4, f4, b4, baseline, fl2, floor2));
    // One stream's throughput, beside one HTTP/1.1 wss connection to the same listener.
    let (g1, h1) = (over_h2(gate.addr, 1), over_h2(haproxy.addr, 1));
    let f1 = over_h2(floor.addr, 1);
    let r = measure(
        &|t| rt.block_on(throughput(t, phase)),
        &[
            (&g1, gate_pid),
            (&h1, haproxy_pid),
            (&wss_full, twin_pid),
            (&f1, floor_pid),
        ],
    );
    line(
        "proxy route: MB/s, 1 stream, 64 KiB messages (HTTP/1.1: 1 wss connection)",
        r[0].0,
        Some(r[1].0),
        Some(r[2].0),
        "≥ 0.8× wsgate HTTP/1.1",
        r[0].0 / r[2].0,
        r[0].0 >= 0.8 * r[2].0,
    );
    beside_floor(
        "stack floor (tokio + h2 + rustls, nothing else): MB/s of 1 stream, CPU µs per MB",
        &r[3],
        &r[0],
        &r[1],
    );
    drop((g1, h1, f1));
    // Memory: idle streams over 10 connections, a fresh wsgate each time.
    let kib = median(
        (0..reps.clamp(1, 3))
            .map(|i| {
                let fresh = Server::spawn_config(&gate_conf(&format!("fresh{i}.toml")));
                let pid = fresh.child.id();
                let target = over_h2(fresh.addr, 10);
                let before = rss_kib_of(pid);
                let held = rt.block_on(async {
                    let mut held = Vec::with_capacity(idle);
                    for _ in 0..idle {
                        let mut c = Client::connect(&target).await;
                        let msg = c.message(b"hi");
                        c.stream.write_all(&msg).await.unwrap();
                        c.read_payload(b"hi").await;
                        held.push(c);
                    }
                    held
                });
                let after = rss_kib_of(pid);
                drop(held);
                (after - before) / idle as f64
            })
            .collect(),
    );
    line(
        &format!("proxy route: KiB per idle WebSocket stream ({idle} over 10 connections, fresh process)"),
        kib,
        None,
        None,
        "≤ 16",
        kib / 16.0,
        kib <= 16.0,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's HAProxy in the foreground, one thread: TLS with ALPN h2 and http/1.1 on its
/// frontend (RFC 8441 there), HTTP/1.1 to `app`.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    version: String,
}

impl Haproxy {
    /// Debian's HAProxy in front of `app`. With `duties`, it does per session what wsgate does
    /// by default: a log line (`option httplog`, to stdout, which goes nowhere, as wsgate's
    /// stderr does here) and the forwarding headers (X-Forwarded-For, -Proto, -Host and
    /// X-Real-IP); without, nothing but the proxying.
    fn start(dir: &std::path::Path, app: SocketAddr, duties: bool) -> Haproxy {
        let pem = dir.join("haproxy.pem");
        let mut both = std::fs::read(dir.join("server.crt")).unwrap();
        both.extend(std::fs::read(dir.join("server.key")).unwrap());
        std::fs::write(&pem, both).unwrap();
        let addr = free_addr();
        let (global, defaults, frontend) = match duties {
            false => ("", "", ""),
            true => (
                "  log stdout format raw local0 info\n",
                "  log global\n  option httplog\n  option forwardfor\n",
                "  http-request set-header X-Forwarded-Proto https\n  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n  http-request set-header X-Real-IP %[src]\n",
            ),
        };
        let conf = config_file(
            dir,
            if duties { "haproxy-duties.cfg" } else { "haproxy.cfg" },
            format!(
                "global\n  nbthread 1\n  maxconn 4000\n{global}defaults\n  mode http\n{defaults}  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 1h\nfrontend fe\n  bind {addr} ssl crt {} alpn h2,http/1.1\n{frontend}  default_backend app\nbackend app\n  server app {app}\n",
                pem.display()
            ),
        );
        let version = Command::new("haproxy")
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or("?")
                    .to_owned()
            })
            .expect("haproxy (Debian's haproxy package)");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy");
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "HAProxy did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy {
            child,
            addr,
            version,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
