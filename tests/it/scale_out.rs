//! Scale-out, for real: Debian's HAProxy in TCP mode with send-proxy-v2 and /readyz health
//! checks in front of two wsgate processes, each bridging to two backend replicas with
//! send_proxy_protocol. 500 sessions spread over both; every replica sees each session's real
//! client; one instance gets SIGTERM while sessions stream SHA-256-checked data: HAProxy sends
//! new sessions to the other, the old ones end with 1001 after drain_timeout, nothing is lost.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate::protocol::frame::OpCode;
use wsgate::proxy_protocol::{parse, ProxyHeader};

use crate::common::*;

const SESSIONS: usize = 500;
const STREAMS_PER_GATE: usize = 20;

/// A backend replica: reads wsgate's PROXY v2 header, records the client it names, echoes.
async fn replica() -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
    let clients = Arc::new(Mutex::new(Vec::new()));
    let record = clients.clone();
    let addr = backend(move |mut s| {
        let record = record.clone();
        async move {
            let mut head = Vec::new();
            let source = loop {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(b[0]);
                match parse(&head) {
                    Ok(Some((ProxyHeader::Proxied { source, .. }, _))) => break source,
                    Ok(None) => continue,
                    _ => return,
                }
            };
            record.lock().unwrap().push(source);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    (addr, clients)
}

/// A WebSocket session through HAProxy: the stream and the client's own address.
async fn open_session(front: SocketAddr) -> (tokio::io::BufReader<TcpStream>, SocketAddr) {
    let (r, s) = upgrade_head(front, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 101, "{r:?}");
    let local = s.local_addr().unwrap();
    (tokio::io::BufReader::new(s), local)
}

/// Round trips of 1 KiB chunks until `count` are done or the server closes; returns the
/// close code (if any), how many round trips went through, whether every echoed byte matched
/// (SHA-256 of all sent against all received), and when it ended.
async fn stream(
    ws: tokio::io::BufReader<TcpStream>,
    seed: u64,
    count: usize,
) -> (Option<u16>, usize, bool, Instant) {
    let (code, trips, intact) = round_trips(ws, seed, count).await;
    (code, trips, intact, Instant::now())
}

async fn round_trips(
    mut ws: tokio::io::BufReader<TcpStream>,
    seed: u64,
    count: usize,
) -> (Option<u16>, usize, bool) {
    let (mut sent, mut got) = (Sha256::new(), Sha256::new());
    for i in 0..count {
        let chunk = pattern(1024, seed * 100_000 + i as u64);
        let frame = client_frame(true, OpCode::Binary, &chunk, [7, 7, 7, 7]);
        if ws.get_mut().write_all(&frame).await.is_err() {
            return (None, i, sent.finalize() == got.finalize());
        }
        let mut echoed = 0;
        while echoed < chunk.len() {
            let Some(f) = within("an echo or a close", WAIT, read_frame(&mut ws)).await else {
                return (None, i, sent.finalize() == got.finalize());
            };
            if f.opcode == OpCode::Close {
                let code = (f.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                // The chunk in flight when the close came is not counted; all before it is.
                return (code, i, sent.finalize() == got.finalize());
            }
            echoed += f.payload.len();
            if echoed == chunk.len() {
                sent.update(&chunk);
                got.update(&f.payload);
            } else {
                got.update(&f.payload);
            }
        }
        // Paced: about 50 round trips a second per session.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (None, count, sent.finalize() == got.finalize())
}

/// A server's status (UP, DOWN, …) from HAProxy's stats socket (`show stat`, CSV).
async fn server_status(socket: &std::path::Path, server: &str) -> Option<String> {
    let mut s = tokio::net::UnixStream::connect(socket).await.ok()?;
    s.write_all(b"show stat\n").await.ok()?;
    let mut out = String::new();
    within("HAProxy's stats", WAIT, s.read_to_string(&mut out))
        .await
        .ok()?;
    let header: Vec<&str> = out
        .lines()
        .next()?
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let column = header.iter().position(|c| *c == "status")?;
    out.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > column && f[0] == "gates" && f[1] == server)
        .map(|f| f[column].to_owned())
}

fn gate_config(replicas: &[SocketAddr]) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\ndrain_timeout = \"3s\"\nclose_timeout = \"1s\"\n[[route]]\npath = \"/\"\nbackend = [\"tcp://{}\", \"tcp://{}\"]\nsend_proxy_protocol = \"v2\"\n",
        replicas[0], replicas[1]
    )
}

/// The client ports each gate's log names in its `upgraded` lines.
fn upgraded_ports(gate: &GateProcess) -> HashSet<u16> {
    gate.lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("upgraded"))
        .filter_map(|l| l.split("peer=127.0.0.1:").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_spreads_sessions_and_drains_an_instance_without_losing_a_byte() {
    let (r1, seen1) = replica().await;
    let (r2, seen2) = replica().await;
    let gates = [
        GateProcess::start(&gate_config(&[r1, r2])),
        GateProcess::start(&gate_config(&[r1, r2])),
    ];
    let front = unused_addr();
    let stats_dir = TempDir::new();
    let stats = stats_dir.path().join("haproxy.sock");
    let _haproxy = Haproxy::start(
        &haproxy_for_gates(
            front,
            &gates,
            &format!("  maxconn 5000\n  stats socket {}\n", stats.display()),
            "  retries 3\n  option redispatch\n",
        ),
        front,
    )
    .await;

    // 500 sessions through HAProxy, 50 at a time.
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS / 50 {
        let batch: Vec<_> = (0..50).map(|_| tokio::spawn(open_session(front))).collect();
        for b in batch {
            sessions.push(within("a session through HAProxy", WAIT, b).await.unwrap());
        }
    }
    let clients: HashSet<SocketAddr> = sessions.iter().map(|(_, a)| *a).collect();
    eventually("both gates to log every session", WAIT, || async {
        gates.iter().map(|g| upgraded_ports(g).len()).sum::<usize>() == SESSIONS
    })
    .await;
    let per_gate: Vec<HashSet<u16>> = gates.iter().map(upgraded_ports).collect();
    println!(
        "scale-out split: gate0 {} sessions, gate1 {} sessions",
        per_gate[0].len(),
        per_gate[1].len()
    );
    assert!(per_gate[0].len() >= SESSIONS / 4 && per_gate[1].len() >= SESSIONS / 4);
    // Every replica connection carried the real client (through HAProxy and wsgate).
    eventually("the replicas to see every session", WAIT, || async {
        seen1.lock().unwrap().len() + seen2.lock().unwrap().len() == SESSIONS
    })
    .await;
    let seen: HashSet<SocketAddr> = seen1
        .lock()
        .unwrap()
        .iter()
        .chain(seen2.lock().unwrap().iter())
        .copied()
        .collect();
    assert_eq!(
        seen, clients,
        "each backend saw each session's real client address"
    );
    assert!(!seen1.lock().unwrap().is_empty() && !seen2.lock().unwrap().is_empty());

    // Stream on 20 sessions of each gate; then SIGTERM gate 0.
    let mut streams: HashMap<usize, Vec<_>> = HashMap::new();
    for (i, (ws, addr)) in sessions.into_iter().enumerate() {
        let gate = usize::from(per_gate[1].contains(&addr.port()));
        let list = streams.entry(gate).or_default();
        if list.len() < STREAMS_PER_GATE {
            // Bounded: 400 round trips (about 8 s) at most.
            list.push(tokio::spawn(stream(ws, i as u64, 400)));
        }
    }
    let admin0 = gates[0].admin.unwrap();
    eventually("gate 0's streams to be under way", WAIT, || async {
        metric(
            admin0,
            "wsgate_payload_bytes_total{route=\"/\",direction=\"from_client\"}",
        )
        .await
            > (STREAMS_PER_GATE * 10 * 1024) as f64
    })
    .await;
    gates[0].signal("TERM");
    let signalled = Instant::now();
    eventually("gate 0's /readyz to say 503", WAIT, || async {
        http_get(admin0, "/readyz").await.0 != 200
    })
    .await;
    // New sessions go to gate 1 once HAProxy has seen it (checks every 100 ms); until then
    // a new connection may still be handed to gate 0 as its listener closes.
    eventually("HAProxy to mark gate 0 down", WAIT, || async {
        server_status(&stats, "gate0").await.as_deref() == Some("DOWN")
    })
    .await;
    let before = upgraded_ports(&gates[1]).len();
    let mut late = Vec::new();
    for _ in 0..20 {
        late.push(open_session(front).await);
    }
    // Their `upgraded` lines reach the collected logs a moment after the 101.
    let late_ports: HashSet<u16> = late.iter().map(|(_, a)| a.port()).collect();
    eventually("every late session in gate 1's log", WAIT, || async {
        late_ports.is_subset(&upgraded_ports(&gates[1]))
    })
    .await;
    assert!(
        late_ports.is_disjoint(&upgraded_ports(&gates[0])),
        "no session after the SIGTERM is on gate 0"
    );
    assert_eq!(upgraded_ports(&gates[1]).len(), before + 20);

    for (gate, list) in streams {
        for s in list {
            let (code, trips, intact, ended) =
                within("a stream to end", Duration::from_secs(30), s)
                    .await
                    .unwrap();
            assert!(intact, "gate {gate}: every echoed byte matched");
            if gate == 0 {
                assert_eq!(code, Some(1001), "gate 0's sessions end with 1001");
                // drain_timeout 3 s, then the close; a round trip of slack.
                let after = ended.duration_since(signalled);
                assert!(
                    after >= Duration::from_secs(3) && after < Duration::from_millis(4500),
                    "closed {after:?} after SIGTERM; drain_timeout is 3 s"
                );
            } else {
                assert_eq!((code, trips), (None, 400), "gate 1's sessions go on");
            }
        }
    }
    drop(late);
}
