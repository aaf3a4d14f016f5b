//! Running as a sidecar: admin endpoints and metrics, drain on SIGTERM, reload on SIGHUP and
//! on file change (--watch), JSON logs.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

/// Polls the admin /metrics page until `check` holds (bounded by WAIT).
async fn metrics_until(
    admin: std::net::SocketAddr,
    check: impl Fn(&std::collections::HashMap<String, f64>) -> bool,
) -> std::collections::HashMap<String, f64> {
    let until = Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        let m = parse_metrics(&body);
        if check(&m) {
            return m;
        }
        assert!(
            Instant::now() < until,
            "metrics never reached the expected state:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn get(m: &std::collections::HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_sessions_bytes_messages_closes_and_rejections() {
    let g = Gate::start(
        r#"
[[listen]]
addr = "127.0.0.1:0"
[admin]
addr = "127.0.0.1:0"
[[route]]
path = "/echo"
backend = "echo"
origins = ["https://ok.example"]
"#,
    )
    .await;
    let admin = g.admin.expect("admin listener");
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    assert_eq!(http_get(admin, "/nope").await.0, 404);

    // Two sessions: three 10-byte messages each, closed with 1000 and 4001.
    for code in [1000u16, 4001] {
        let (mut ws, _) = tokio_tungstenite::connect_async(g.url("/echo"))
            .await
            .unwrap();
        for _ in 0..3 {
            ws.send(Message::binary(vec![1u8; 10])).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap().len(), 10);
        }
        ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: code.into(),
            reason: "".into(),
        }))
        .await
        .unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    // Refusals: no route, and a bad origin.
    raw_request(g.addr, upgrade_request("/other", "").as_bytes()).await;
    raw_request(
        g.addr,
        upgrade_request("/echo", "Origin: https://evil.example\r\n").as_bytes(),
    )
    .await;

    let m = metrics_until(admin, |m| {
        get(
            m,
            r#"wsgate_session_duration_seconds_count{route="/echo",http_version="1.1"}"#,
        ) == 2.0
    })
    .await;
    assert_eq!(
        get(
            &m,
            r#"wsgate_sessions_total{route="/echo",http_version="1.1"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_sessions_open{route="/echo",http_version="1.1"}"#
        ),
        0.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_payload_bytes_total{route="/echo",direction="from_client"}"#
        ),
        60.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_payload_bytes_total{route="/echo",direction="to_client"}"#
        ),
        60.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_messages_total{route="/echo",direction="from_client"}"#
        ),
        6.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_messages_total{route="/echo",direction="to_client"}"#
        ),
        6.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_close_codes_total{route="/echo",side="received",code="1000"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_close_codes_total{route="/echo",side="received",code="4xxx"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_close_codes_total{route="/echo",side="sent",code="1000"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_handshake_rejections_total{route="none",reason="no_route"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"wsgate_handshake_rejections_total{route="/echo",reason="origin"}"#
        ),
        1.0
    );
    assert_eq!(
        get(&m, r#"wsgate_backend_connect_seconds_count{route="/echo"}"#),
        2.0
    );
    assert_eq!(get(&m, "wsgate_config_last_reload_success"), 1.0);
    let m = metrics_until(admin, |m| get(m, "wsgate_client_connections") == 0.0).await;
    assert_eq!(get(&m, "wsgate_client_connections"), 0.0);
}

/// SIGTERM: /readyz turns 503, the drain's line counts the open sessions (HTTP/2 streams each
/// one), new connections are refused, the live session keeps working until drain_timeout, then
/// gets 1001, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_1001_and_exits_0() {
    let mut gate = GateProcess::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nhttp2 = true\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\ndrain_timeout = \"1s\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    );
    let admin = gate.admin.unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", gate.addr))
        .await
        .unwrap();
    // Two more sessions, as streams of one HTTP/2 connection: the drain's line counts
    // sessions, not connections.
    let mut h2 = crate::http2::H2Client::plain(gate.addr).await;
    let streams = (h2.ws("/", &[]).await, h2.ws("/", &[]).await);
    gate.signal("TERM");
    let started = Instant::now();
    let draining = gate.wait_for_log("draining");
    assert!(
        draining.contains("sessions=3"),
        "three sessions open at the drain: {draining}"
    );
    // Gone now: the rest is about the HTTP/1.1 session.
    drop((streams, h2));
    assert_eq!(
        http_get(admin, "/readyz").await,
        (503, "draining\n".to_string())
    );
    assert!(
        tokio::net::TcpStream::connect(gate.addr).await.is_err(),
        "listener closed"
    );
    ws.send(Message::text("still served")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("still served")
    );
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(c))) => break c.map(|c| u16::from(c.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected close, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1001));
    assert!(started.elapsed() >= Duration::from_millis(900));
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let child = &mut gate.child;
    let until = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < until,
            "wsgate did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// SIGHUP with a new file: a route is added, a limit changes for new sessions, a listener is
/// added and the old one removed; a session streaming through it all loses no byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_keeps_live_sessions_intact() {
    let gate = GateProcess::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
    );
    let old_addr = gate.addr;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{old_addr}/echo"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let data = pattern(4 * 1024 * 1024, 21);
    let want = Sha256::digest(&data);
    let (half, rest) = data.split_at(data.len() / 2);
    let rest = rest.to_vec();
    for chunk in half.chunks(64 * 1024) {
        tx.send(Message::binary(chunk.to_vec())).await.unwrap();
    }

    // New file: a new route and a smaller message limit (same listener).
    std::fs::write(
        &gate.config_path,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_message_size = \"1KiB\"\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n[[route]]\npath = \"/new\"\nbackend = \"echo\"\n",
    )
    .unwrap();
    gate.signal("HUP");
    gate.wait_for_log("config reloaded");
    // Same configured address "127.0.0.1:0": the listener is kept, so connect to it again.
    let (mut new_ws, _) = tokio_tungstenite::connect_async(format!("ws://{old_addr}/new"))
        .await
        .unwrap();
    new_ws.send(Message::text("new route")).await.unwrap();
    assert_eq!(
        new_ws.next().await.unwrap().unwrap(),
        Message::text("new route")
    );
    // The new limit applies to new sessions...
    new_ws.send(Message::binary(vec![0u8; 2048])).await.unwrap();
    match new_ws.next().await.unwrap().unwrap() {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1009),
        other => panic!("expected 1009, got {other:?}"),
    }
    // ...while the live session keeps its own (64 KiB messages still pass) and loses nothing.
    let writer = tokio::spawn(async move {
        for chunk in rest.chunks(64 * 1024) {
            tx.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        tx
    });
    assert_eq!(sha256_of_binary(&mut rx, data.len()).await, want.to_vec());
    drop(writer.await.unwrap());
}

/// Listeners follow the file: a second [[listen]] starts; removing the first closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners() {
    let free = unused_addr();
    let gate = GateProcess::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    );
    let (mut live, _) = tokio_tungstenite::connect_async(format!("ws://{}/", gate.addr))
        .await
        .unwrap();
    std::fs::write(
        &gate.config_path,
        format!("[[listen]]\naddr = \"{free}\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n"),
    )
    .unwrap();
    gate.signal("HUP");
    gate.wait_for_log("config reloaded");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{free}/"))
        .await
        .unwrap();
    ws.send(Message::text("on the new listener")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("on the new listener")
    );
    assert!(
        tokio::net::TcpStream::connect(gate.addr).await.is_err(),
        "old listener closed"
    );
    live.send(Message::text("live session kept")).await.unwrap();
    assert_eq!(
        live.next().await.unwrap().unwrap(),
        Message::text("live session kept")
    );
}

/// A bad file is rejected with its error (key and line) logged; the old config stays, and
/// the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_keeps_the_old_config() {
    let gate = GateProcess::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    );
    std::fs::write(
        &gate.config_path,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\nbakend = \"typo\"\n",
    )
    .unwrap();
    gate.signal("HUP");
    let line = gate.wait_for_log("reload rejected");
    assert!(line.contains("line 6") && line.contains("bakend"), "{line}");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", gate.addr))
        .await
        .unwrap();
    ws.send(Message::text("old config")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("old config")
    );
    let m = metrics_until(gate.admin.unwrap(), |m| {
        get(m, r#"wsgate_config_reloads_total{result="failure"}"#) == 1.0
    })
    .await;
    assert_eq!(get(&m, "wsgate_config_last_reload_success"), 0.0);
}

/// --watch: a change of the file is enough, no signal needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_on_file_change() {
    let gate = GateProcess::start_with(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/a\"\nbackend = \"echo\"\n",
        &["--watch"],
    );
    let r = raw_request(gate.addr, upgrade_request("/b", "").as_bytes()).await;
    assert_eq!(r.status, 404);
    std::fs::write(
        &gate.config_path,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/b\"\nbackend = \"echo\"\n",
    )
    .unwrap();
    gate.wait_for_log("config reloaded");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/b", gate.addr))
        .await
        .unwrap();
    ws.send(Message::text("watched")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("watched"));
}

/// --log-format json: every line is JSON, and a session's lines carry its connection id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_carry_the_connection_id() {
    let gate = GateProcess::start_with(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        &["--log-format", "json"],
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", gate.addr))
        .await
        .unwrap();
    ws.send(Message::text("log me")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let end = gate.wait_for_log("session ended");
    let lines = gate.lines.lock().unwrap().clone();
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let end: serde_json::Value = serde_json::from_str(&end).unwrap();
    let id = end["span"]["id"]
        .as_u64()
        .expect("session end line carries the connection id");
    assert_eq!(end["fields"]["end"], "client_close");
    assert!(end["fields"]["bytes_in"].as_u64() == Some(6));
    let earlier = parsed
        .iter()
        .find(|v| v["fields"]["message"] == "upgraded")
        .expect("an earlier line of the session");
    assert_eq!(earlier["span"]["id"].as_u64(), Some(id));
}

/// Two reloads at the same moment (SIGHUP and --watch both firing) are applied one after the
/// other: the second starts only when the first has finished, even while the first waits
/// for a removed listener to close.
#[tokio::test]
async fn simultaneous_reloads_are_applied_one_after_the_other() {
    let dir = TempDir::new();
    let path = dir.path().join("wsgate.toml");
    let (a, b) = (unused_addr(), unused_addr());
    let config = |addr| {
        format!("[[listen]]\naddr = \"{addr}\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n")
    };
    std::fs::write(&path, config(a)).unwrap();
    let mut gate = Gate::from_file(&path).await;
    let handle = gate.handle.clone();
    // Move the listener from a to b: the first reload waits for a's accept loop to end.
    std::fs::write(&path, config(b)).unwrap();
    let finished = std::sync::Mutex::new(Vec::new());
    let (first, second) = tokio::join!(
        async {
            let r = handle.reload().await;
            finished.lock().unwrap().push("first");
            r
        },
        async {
            let r = handle.reload().await;
            finished.lock().unwrap().push("second");
            r
        }
    );
    first.expect("first reload");
    second.expect("second reload");
    assert_eq!(
        *finished.lock().unwrap(),
        ["first", "second"],
        "never interleaved"
    );
    assert_eq!(handle.local_addrs(), vec![b]);
    assert!(tokio::net::TcpStream::connect(a).await.is_err(), "a closed");
    let m = parse_metrics(&handle.metrics_text());
    assert_eq!(
        get(&m, r#"wsgate_config_reloads_total{result="success"}"#),
        2.0
    );
    within("the server to stop", WAIT, gate.stop())
        .await
        .unwrap();
}

/// Reload under load: 200 sessions stream SHA-256-checked data through a bridge route and a
/// new handshake arrives every millisecond while the config is reloaded twice (a limit
/// changed, a route added). No session loses a byte; every handshake gets its 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_nothing() {
    const SESSIONS: usize = 200;
    const BYTES: usize = 256 * 1024;
    let backend = echo_backend().await;
    let dir = TempDir::new();
    let path = dir.path().join("wsgate.toml");
    let config = |extra: &str| {
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections = 1000\n{extra}\n[[route]]\npath = \"/\"\nbackend = \"tcp://{backend}\"\n")
    };
    std::fs::write(&path, config("")).unwrap();
    let mut gate = Gate::from_file(&path).await;
    let handle = gate.handle.clone();
    let addr = gate.addr;

    let streams: Vec<_> = (0..SESSIONS)
        .map(|i| {
            tokio::spawn(async move {
                let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
                    .await
                    .expect("session connects");
                let (mut tx, mut rx) = ws.split();
                let data = pattern(BYTES, i as u64);
                let want = Sha256::digest(&data);
                let writer = tokio::spawn(async move {
                    for chunk in data.chunks(16 * 1024) {
                        tx.send(Message::binary(chunk.to_vec())).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    tx
                });
                let got = sha256_of_binary(&mut rx, BYTES).await;
                drop(writer.await.unwrap());
                got == want.to_vec()
            })
        })
        .collect();
    let handshaking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let upgraded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let churn = {
        let (handshaking, upgraded) = (handshaking.clone(), upgraded.clone());
        tokio::spawn(async move {
            let mut other = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            // Bounded: at most 20,000 handshakes (20 s at one a millisecond).
            for _ in 0..20_000 {
                if !handshaking.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                let (r, _s) = upgrade_head(addr, upgrade_request("/", "").as_bytes()).await;
                if r.status == 101 {
                    upgraded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    other.push(r.status);
                }
            }
            other
        })
    };
    // Reload while the sessions are mid-stream.
    eventually("the sessions to be streaming", WAIT, || async {
        let m = parse_metrics(&handle.metrics_text());
        get(
            &m,
            r#"wsgate_payload_bytes_total{route="/",direction="from_client"}"#,
        ) > 4e6
    })
    .await;
    std::fs::write(&path, config("idle_timeout = \"4m\"")).unwrap();
    handle.reload().await.expect("first reload");
    std::fs::write(
        &path,
        config("idle_timeout = \"3m\"") + "[[route]]\npath = \"/new\"\nbackend = \"echo\"\n",
    )
    .unwrap();
    handle.reload().await.expect("second reload");
    let mut intact = 0;
    for s in streams {
        if within("a streaming session to finish", Duration::from_secs(60), s)
            .await
            .unwrap()
        {
            intact += 1;
        }
    }
    // Handshakes went on across both reloads: 50 more after the second one.
    let after_reloads = upgraded.load(std::sync::atomic::Ordering::Relaxed);
    eventually("50 handshakes after the reloads", WAIT, || async {
        upgraded.load(std::sync::atomic::Ordering::Relaxed) >= after_reloads + 50
    })
    .await;
    handshaking.store(false, std::sync::atomic::Ordering::Relaxed);
    let other = within("the handshake churn to stop", WAIT, churn)
        .await
        .unwrap();
    assert_eq!(intact, SESSIONS, "every session's data arrived intact");
    assert!(other.is_empty(), "handshakes answered with {other:?}");
    let m = parse_metrics(&handle.metrics_text());
    assert_eq!(
        get(&m, r#"wsgate_config_reloads_total{result="success"}"#),
        2.0
    );
    within("the server to stop", WAIT, gate.stop())
        .await
        .unwrap();
}
