//! Per-client and per-route limits: max_connections_per_ip (IPv6 per /64), the per-client
//! handshake rate (token bucket), a route's own max_connections. Over a limit: 503 or 429
//! with Retry-After, no backend connect, counted with a bounded reason.

use wsgate::proxy_protocol::encode_v2;

use crate::common::*;

fn rejections(m: &std::collections::HashMap<String, f64>, route: &str, reason: &str) -> f64 {
    m.get(&format!(
        "wsgate_handshake_rejections_total{{route=\"{route}\",reason=\"{reason}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

#[tokio::test]
async fn connections_per_client_address_are_limited_and_released() {
    let gate = Gate::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections_per_ip = 2\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    )
    .await;
    let first = raw_ws(gate.addr, "/").await;
    let _second = raw_ws(gate.addr, "/").await;
    let (r, _) = upgrade_head(gate.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), vec!["1".to_string()]);
    drop(first);
    eventually("the place to be given back", WAIT, || async {
        upgrade_head(gate.addr, upgrade_request("/", "").as_bytes())
            .await
            .0
            .status
            == 101
    })
    .await;
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert!(rejections(&m, "/", "per_ip_connections") >= 1.0);
}

/// IPv6 clients count per /64 (the client addresses come from PROXY v2 headers here).
#[tokio::test]
async fn ipv6_clients_count_per_64() {
    let gate = Gate::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[limits]\nmax_connections_per_ip = 1\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    )
    .await;
    let dst = "[2001:db8::1]:443".parse().unwrap();
    let upgrade_from = |src: &str| {
        let mut req = encode_v2(src.parse().unwrap(), dst);
        req.extend_from_slice(upgrade_request("/", "").as_bytes());
        req
    };
    let (r, _held) = upgrade_head(gate.addr, &upgrade_from("[2001:db8:1:2::a]:1000")).await;
    assert_eq!(r.status, 101);
    let (r, _) = upgrade_head(gate.addr, &upgrade_from("[2001:db8:1:2:ffff::b]:1000")).await;
    assert_eq!(r.status, 503, "same /64: {r:?}");
    let (r, _other) = upgrade_head(gate.addr, &upgrade_from("[2001:db8:1:3::a]:1000")).await;
    assert_eq!(r.status, 101, "another /64");
}

#[tokio::test]
async fn handshake_rate_per_client_is_429_with_retry_after() {
    let backend = echo_backend().await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nhandshakes_per_ip_per_second = 1\nhandshakes_per_ip_burst = 2\n[[route]]\npath = \"/\"\nbackend = \"tcp://{backend}\"\n"
    ))
    .await;
    for _ in 0..2 {
        let (r, _s) = upgrade_head(gate.addr, upgrade_request("/", "").as_bytes()).await;
        assert_eq!(r.status, 101);
    }
    let (r, _) = upgrade_head(gate.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("retry-after"), vec!["1".to_string()]);
    let m = parse_metrics(&http_get(gate.admin.unwrap(), "/metrics").await.1);
    assert_eq!(rejections(&m, "/", "per_ip_rate"), 1.0);
    // Refused before any backend connect: two sessions, two connect times.
    assert_eq!(
        m.get("wsgate_backend_connect_seconds_count{route=\"/\"}")
            .copied(),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_route_has_its_own_max_connections() {
    let gate = Gate::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/small\"\nbackend = \"echo\"\nmax_connections = 1\n[[route]]\npath = \"/big\"\nbackend = \"echo\"\n",
    )
    .await;
    let _one = raw_ws(gate.addr, "/small").await;
    let (r, _) = upgrade_head(gate.addr, upgrade_request("/small", "").as_bytes()).await;
    assert_eq!(r.status, 503, "{r:?}");
    let (r, _s) = upgrade_head(gate.addr, upgrade_request("/big", "").as_bytes()).await;
    assert_eq!(r.status, 101, "other routes are not affected");
}
