//! Several backends per route: failover before the client gets an answer, passive health
//! (ejection and recovery), the balance modes, and live sessions kept across a reload that
//! changes the list.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn gate_toml(backends: &[String], route_extra: &str, limits: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\n{limits}\n[[route]]\npath = \"/\"\nbackend = [{list}]\n{route_extra}\n"
    )
}

/// Sessions open on `backend` (a tcp:// one), from the gateway's own count.
async fn open_on(admin: std::net::SocketAddr, backend: std::net::SocketAddr) -> f64 {
    metric(
        admin,
        &format!("wsgate_backend_sessions_open{{route=\"/\",backend=\"tcp://{backend}\"}}"),
    )
    .await
}

fn failures(m: &std::collections::HashMap<String, f64>, backend: &str) -> f64 {
    m.get(&format!(
        "wsgate_backend_connect_failures_total{{route=\"/\",backend=\"{backend}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_refusing_backend_is_skipped_before_the_client_gets_an_answer() {
    let (dead, _held) = refusing_addr();
    let dead = format!("tcp://{dead}");
    let live = echo_backend().await;
    let gate = Gate::start(&gate_toml(
        &[dead.clone(), format!("tcp://{live}")],
        "balance = \"first\"",
        "",
    ))
    .await;
    let mut ws = raw_ws(gate.addr, "/").await;
    ws.get_mut()
        .write_all(&client_frame(
            true,
            wsgate::protocol::frame::OpCode::Binary,
            b"hi",
            [1, 2, 3, 4],
        ))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut ws).await.unwrap().payload, b"hi");
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert_eq!(failures(&m, &dead), 1.0);
}

#[tokio::test]
async fn when_every_backend_fails_the_client_gets_502() {
    let ((a, _held_a), (b, _held_b)) = (refusing_addr(), refusing_addr());
    let (a, b) = (format!("tcp://{a}"), format!("tcp://{b}"));
    let gate = Gate::start(&gate_toml(&[a.clone(), b.clone()], "", "")).await;
    let (r, _) = upgrade_head(gate.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 502, "{r:?}");
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert_eq!(failures(&m, &a) + failures(&m, &b), 2.0);
}

/// Proxy routes: an app that fails the upgrade (503) or does not answer within
/// connect_timeout is failed over to the next app.
#[tokio::test]
async fn ws_apps_that_refuse_or_time_out_are_failed_over() {
    let refusing =
        fixed_reply(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
    let silent = backend(|s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let good = backend(|s| async move {
        if let Ok(mut ws) = tokio_tungstenite::accept_async(s).await {
            use futures_util::{SinkExt, StreamExt};
            while let Some(Ok(m)) = ws.next().await {
                if m.is_binary() && ws.send(m).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    let gate = Gate::start(&gate_toml(
        &[
            format!("ws://{refusing}"),
            format!("ws://{silent}"),
            format!("ws://{good}"),
        ],
        "balance = \"first\"",
        "connect_timeout = \"1s\"",
    ))
    .await;
    let started = std::time::Instant::now();
    let (r, _s) = upgrade_head(gate.addr, upgrade_request("/", "").as_bytes()).await;
    let took = started.elapsed();
    assert_eq!(r.status, 101, "{r:?}");
    // One connect_timeout spent on the silent app, the refusal costs next to nothing.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "failover took {took:?}"
    );
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert_eq!(failures(&m, &format!("ws://{refusing}")), 1.0);
    assert_eq!(failures(&m, &format!("ws://{silent}")), 1.0);
}

/// An app's 4xx is its answer to this client: passed on, no failover, nothing counted against
/// the app, so bad upgrades from a client cannot eject healthy apps.
#[tokio::test]
async fn an_apps_4xx_is_passed_on_and_never_ejects_it() {
    let refusing = fixed_reply(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope").await;
    let (other, _seen) = (echo_backend().await, ());
    let gate = Gate::start(&gate_toml(
        &[format!("ws://{refusing}"), format!("ws://{other}")],
        "balance = \"first\"\neject_after = 1",
        "",
    ))
    .await;
    for _ in 0..3 {
        let r = raw_request(gate.addr, upgrade_request("/", "").as_bytes()).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.body, "nope");
    }
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert_eq!(failures(&m, &format!("ws://{refusing}")), 0.0);
    assert_eq!(
        m.get(&format!(
            "wsgate_backend_ejections_total{{route=\"/\",backend=\"ws://{refusing}\"}}"
        ))
        .copied()
        .unwrap_or(0.0),
        0.0
    );
}

/// An app whose only answer is a fixed byte string.
async fn fixed_reply(reply: &'static [u8]) -> std::net::SocketAddr {
    backend(move |mut s| async move {
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head).await;
        let _ = s.write_all(reply).await;
    })
    .await
}

/// eject_after failures in a row skip a backend for eject_for; then it is tried again.
#[tokio::test]
async fn a_failing_backend_is_ejected_then_tried_again() {
    let (dead, _held) = refusing_addr();
    let dead = format!("tcp://{dead}");
    let live = echo_backend().await;
    let gate = Gate::start(&gate_toml(
        &[dead.clone(), format!("tcp://{live}")],
        "balance = \"first\"\neject_after = 2\neject_for = \"1s\"",
        "",
    ))
    .await;
    let admin = gate.admin.unwrap();
    let handshake = || async {
        assert_eq!(
            upgrade_head(gate.addr, upgrade_request("/", "").as_bytes())
                .await
                .0
                .status,
            101
        );
    };
    handshake().await;
    handshake().await;
    let ejected_at = std::time::Instant::now();
    let m = parse_metrics(&http_get(admin, "/metrics").await.1);
    assert_eq!(failures(&m, &dead), 2.0);
    assert_eq!(
        m.get(&format!(
            "wsgate_backend_ejections_total{{route=\"/\",backend=\"{dead}\"}}"
        )),
        Some(&1.0)
    );
    // While ejected it is not tried: more handshakes, no more failures.
    for _ in 0..5 {
        handshake().await;
    }
    let m = parse_metrics(&http_get(admin, "/metrics").await.1);
    assert_eq!(failures(&m, &dead), 2.0, "skipped while ejected");
    // After eject_for it is tried again.
    eventually(
        "the ejected backend to be tried again",
        Duration::from_secs(5),
        || async {
            handshake().await;
            failures(&parse_metrics(&http_get(admin, "/metrics").await.1), &dead) == 3.0
        },
    )
    .await;
    let back = ejected_at.elapsed();
    assert!(back >= Duration::from_secs(1), "tried again after {back:?}");
}

#[tokio::test]
async fn round_robin_and_least_connections_spread_sessions() {
    let a = echo_backend().await;
    let b = echo_backend().await;
    let gate = Gate::start(&gate_toml(
        &[format!("tcp://{a}"), format!("tcp://{b}")],
        "",
        "",
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(raw_ws(gate.addr, "/").await);
    }
    let admin = gate.admin.unwrap();
    assert_eq!(
        (open_on(admin, a).await, open_on(admin, b).await),
        (5.0, 5.0),
        "round robin"
    );

    let c = echo_backend().await;
    let d = echo_backend().await;
    let gate = Gate::start(&gate_toml(
        &[format!("tcp://{c}"), format!("tcp://{d}")],
        "balance = \"least_connections\"",
        "",
    ))
    .await;
    let first = raw_ws(gate.addr, "/").await;
    let _second = raw_ws(gate.addr, "/").await;
    let admin = gate.admin.unwrap();
    assert_eq!(
        (open_on(admin, c).await, open_on(admin, d).await),
        (1.0, 1.0)
    );
    drop(first);
    // c's session ends; the next two go to c first (0 open), then by count.
    eventually("c's session to end", WAIT, || async {
        open_on(admin, c).await == 0.0
    })
    .await;
    let _third = raw_ws(gate.addr, "/").await;
    assert_eq!(open_on(admin, c).await, 1.0, "the least busy backend");
}

/// A reload that changes the list: live sessions stay on the backend they started with,
/// new ones go to the new list.
#[tokio::test]
async fn live_sessions_keep_their_backend_across_a_reload() {
    let a = echo_backend().await;
    let b = echo_backend().await;
    let dir = TempDir::new();
    let path = dir.path().join("wsgate.toml");
    let toml = |list: &[String]| gate_toml(list, "", "");
    std::fs::write(&path, toml(&[format!("tcp://{a}")])).unwrap();
    let mut gate = Gate::from_file(&path).await;
    let handle = gate.handle.clone();
    let addr = gate.addr;
    let mut live = raw_ws(addr, "/").await;
    std::fs::write(&path, toml(&[format!("tcp://{b}")])).unwrap();
    handle.reload().await.unwrap();
    live.get_mut()
        .write_all(&client_frame(
            true,
            wsgate::protocol::frame::OpCode::Binary,
            b"still a",
            [1, 2, 3, 4],
        ))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut live).await.unwrap().payload, b"still a");
    let new = raw_ws(addr, "/").await;
    let admin = gate.admin.unwrap();
    assert_eq!(
        (open_on(admin, a).await, open_on(admin, b).await),
        (1.0, 1.0)
    );
    drop((live, new));
    within("the server to stop", WAIT, gate.stop())
        .await
        .unwrap();
}
