//! The gate's rules hold for every spelling of a request: one regression test per attack
//! that walked around them (other spellings of a path, a second request on a keep-alive
//! connection, secrets beside the pages, operator files with odd bytes). Each was written to
//! fail on the code before its fix.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(addr: SocketAddr, target: &str, extra: &str) -> RawResponse {
    raw_request(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await
}

/// `/` a public static folder, `/private` a bearer-protected one inside it, `/pub` a public
/// one without a trailing slash, each with a file.
fn public_and_private(dir: &TempDir) -> String {
    let web = dir.path().join("web");
    std::fs::create_dir_all(web.join("private")).unwrap();
    std::fs::create_dir_all(web.join("pub")).unwrap();
    std::fs::write(web.join("index.html"), "public index").unwrap();
    std::fs::write(web.join("pub/index.html"), "pub index").unwrap();
    std::fs::write(web.join("private/secret.html"), "SECRET-page").unwrap();
    std::fs::write(dir.path().join("bearer.txt"), "good-token\n").unwrap();
    "[[listen]]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/\"\nbackend = \"echo\"\nstatic = \"web\"\n\
         [[route]]\npath = \"/pub\"\nbackend = \"echo\"\nstatic = \"web/pub\"\n\
         [[route]]\npath = \"/private\"\nbackend = \"echo\"\nstatic = \"web/private\"\nauth = { bearer = \"bearer.txt\" }\n"
        .to_owned()
}

/// Sends `requests` one after the other on one keep-alive connection and returns everything
/// the gate answered until it closed the connection.
async fn pipelined(addr: SocketAddr, requests: &[&str]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    for r in requests {
        s.write_all(r.as_bytes()).await.unwrap();
    }
    let mut all = Vec::new();
    within("every answer and the close", WAIT, s.read_to_end(&mut all))
        .await
        .unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

async fn gate_in(dir: &TempDir, toml: &str) -> Gate {
    let config = dir.path().join("wsgate.toml");
    std::fs::write(&config, toml).unwrap();
    Gate::from_file(&config).await
}

#[tokio::test]
async fn double_slash_and_encoded_letters_do_not_skip_a_routes_auth() {
    let dir = TempDir::new();
    let gate = gate_in(&dir, &public_and_private(&dir)).await;
    let auth = "Authorization: Bearer good-token\r\n";
    assert_eq!(
        get(gate.addr, "/private/secret.html", auth).await.status,
        200
    );
    for target in [
        "/private/secret.html",
        "//private/secret.html",
        "///private//secret.html",
        "/%70rivate/secret.html",
        "/%70%72%69%76%61%74%65/secret.html",
        "/priv%61te/secret.html",
        "/private/secr%65t.html",
        "http://test//private/secret.html",
        "http://test/%70rivate/secret.html",
    ] {
        let r = get(gate.addr, target, "").await;
        assert_eq!(r.status, 401, "{target}: {r:?}");
        assert!(!r.body.contains("SECRET"), "{target} leaked: {r:?}");
    }
    // Spellings with no one meaning are refused outright.
    for target in [
        "/./private/secret.html",
        "/x/../private/secret.html",
        "/%2e/private/secret.html",
        "/%2E%2E/private/secret.html",
        "/private%2fsecret.html",
        "/private%5Csecret.html",
        "/%2570rivate/secret.html%2500",
        "/private/secret.html%00",
        "/%ff/private",
    ] {
        let r = get(gate.addr, target, "").await;
        assert_eq!(r.status, 400, "{target}: {r:?}");
        assert!(!r.body.contains("SECRET"), "{target} leaked: {r:?}");
    }
    // A WebSocket upgrade to the same route by another spelling is judged by its rules too.
    for target in ["//private", "/%70rivate", "//private/x"] {
        let r = raw_request(gate.addr, upgrade_request(target, "").as_bytes()).await;
        assert_eq!(r.status, 401, "upgrade {target}: {r:?}");
    }
}

#[tokio::test]
async fn a_second_request_on_a_keep_alive_connection_is_judged_by_its_own_path() {
    let dir = TempDir::new();
    let gate = gate_in(&dir, &public_and_private(&dir)).await;
    let text = pipelined(
        gate.addr,
        &[
            "GET /index.html HTTP/1.1\r\nHost: test\r\n\r\n",
            "GET //private/secret.html HTTP/1.1\r\nHost: test\r\n\r\n",
        ],
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 401"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
}

#[tokio::test]
async fn a_redirect_never_points_at_another_host() {
    let dir = TempDir::new();
    let gate = gate_in(&dir, &public_and_private(&dir)).await;
    for target in ["/pub", "//pub", "/%70ub", "///pub"] {
        let r = get(gate.addr, target, "").await;
        assert_eq!(r.status, 301, "{target}: {r:?}");
        assert_eq!(r.header("location"), ["/pub/"], "{target}");
    }
    let r = get(gate.addr, "//pub?x=1", "").await;
    assert_eq!(r.header("location"), ["/pub/?x=1"]);
}

/// An HTTP app that records each request line it is sent and answers 200.
async fn recording_app() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let addr = backend(move |mut s| {
        let seen = s2.clone();
        async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(1) => head.push(b[0]),
                    _ => return,
                }
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            seen.lock()
                .unwrap()
                .push(text.lines().next().unwrap_or("").to_owned());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test]
async fn a_proxy_route_sends_the_app_the_path_its_rules_judged() {
    let (app, seen) = recording_app().await;
    let dir = TempDir::new();
    std::fs::write(dir.path().join("bearer.txt"), "good-token\n").unwrap();
    let gate = gate_in(
        &dir,
        &format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n\
             [[route]]\npath = \"/\"\nbackend = \"ws://{app}\"\n\
             [[route]]\npath = \"/admin\"\nbackend = \"ws://{app}\"\nauth = {{ bearer = \"bearer.txt\" }}\n"
        ),
    )
    .await;
    for target in ["/%61dmin", "//admin/x", "/%41dmin/../admin"] {
        let r = get(gate.addr, target, "").await;
        assert!(r.status == 401 || r.status == 400, "{target}: {r:?}");
    }
    assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock());
    let r = get(gate.addr, "//ok/%7e%41%3b?q=%2F&r=//x", "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        ["GET /ok/~A%3B?q=%2F&r=//x HTTP/1.1"]
    );
}

#[tokio::test]
async fn a_token_directory_and_links_into_it_are_never_served() {
    let dir = TempDir::new();
    let web = dir.path().join("web");
    std::fs::create_dir_all(web.join("tokens")).unwrap();
    std::fs::write(web.join("index.html"), "public").unwrap();
    std::fs::write(web.join("tokens/a.cfg"), "vm1: 127.0.0.1:5901\n").unwrap();
    std::fs::write(dir.path().join("outside.cfg"), "vm2: 127.0.0.1:5902\n").unwrap();
    std::os::unix::fs::symlink(web.join("tokens/a.cfg"), web.join("link.cfg")).unwrap();
    std::os::unix::fs::symlink(web.join("tokens"), web.join("tok")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside.cfg"), web.join("out.cfg")).unwrap();
    let gate = gate_in(
        &dir,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/\"\nstatic = \"web\"\nbackend = \"token-file:web/tokens\"\n\
         [[route]]\npath = \"/other\"\nbackend = \"token-file:outside.cfg\"\n",
    )
    .await;
    assert_eq!(get(gate.addr, "/index.html", "").await.status, 200);
    for target in [
        "/tokens/a.cfg",
        "//tokens/a.cfg",
        "/%74okens/a.cfg",
        "/tokens/",
        "/link.cfg",
        "/tok/a.cfg",
        "/out.cfg",
    ] {
        let r = get(gate.addr, target, "").await;
        assert_eq!(r.status, 404, "{target}: {r:?}");
        assert!(!r.body.contains("127.0.0.1"), "{target} leaked: {r:?}");
    }
    // A file added to the token directory later is hidden too.
    std::fs::write(web.join("tokens/b.cfg"), "vm3: 127.0.0.1:5903\n").unwrap();
    assert_eq!(get(gate.addr, "/tokens/b.cfg", "").await.status, 404);
}

#[tokio::test]
async fn a_page_request_then_an_upgrade_on_one_connection_takes_the_routes_place() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path().join("web")).unwrap();
    std::fs::write(dir.path().join("web/index.html"), "page").unwrap();
    let gate = gate_in(
        &dir,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/\"\nbackend = \"echo\"\nstatic = \"web\"\n\
         [[route]]\npath = \"/full\"\nbackend = \"echo\"\nmax_connections = 1\n",
    )
    .await;
    let (first, _held) = upgrade_head(gate.addr, upgrade_request("/full", "").as_bytes()).await;
    assert_eq!(first.status, 101);
    let upgrade = upgrade_request("/full", "");
    let text = pipelined(
        gate.addr,
        &["GET /index.html HTTP/1.1\r\nHost: test\r\n\r\n", &upgrade],
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 503"), "the route is full: {text}");
    assert!(!text.contains("101 Switching"), "{text}");
}

#[tokio::test]
async fn the_client_behind_a_trusted_proxy_is_judged_per_request() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path().join("web")).unwrap();
    std::fs::write(dir.path().join("web/index.html"), "page").unwrap();
    let gate = gate_in(
        &dir,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections_per_ip = 1\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[route]]\npath = \"/\"\nbackend = \"echo\"\nstatic = \"web\"\n",
    )
    .await;
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let (held, _s) = upgrade_head(
        gate.addr,
        upgrade_request("/", &xff("192.0.2.9")).as_bytes(),
    )
    .await;
    assert_eq!(held.status, 101);
    // One proxy connection: a request for another client, then one for the client that
    // already holds its one place.
    let plain = format!("GET / HTTP/1.1\r\nHost: test\r\n{}\r\n", xff("192.0.2.1"));
    let upgrade = upgrade_request("/", &xff("192.0.2.9"));
    let text = pipelined(gate.addr, &[&plain, &upgrade]).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("HTTP/1.1 503"),
        "192.0.2.9 is at its limit: {text}"
    );
}

#[test]
fn a_client_ca_listener_never_takes_plain_clients() {
    let dir = TempDir::new();
    gen_certs(dir.path(), "ec", "srv", "localhost");
    let ca = dir.path().join("ca.crt");
    assert!(ca.exists(), "gen_certs makes the CA");
    let toml = "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = { cert = \"srv.crt\", key = \"srv.key\", client_ca = \"ca.crt\" }\nallow_plain = true\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n";
    let Err(err) = wsgate::Config::parse(toml, "mtls.toml", dir.path()) else {
        panic!("client_ca with allow_plain is refused");
    };
    let text = err.to_string();
    assert!(
        text.contains("allow_plain") && text.contains("client_ca"),
        "{text}"
    );
    assert!(text.contains("line 4"), "{text}");
    // websockify's --verify-client without --ssl-only: TLS only, and it says so.
    let out = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args([
                "--print-config",
                "--cert",
                "srv.crt",
                "--key",
                "srv.key",
                "--verify-client",
                "--cafile",
                "ca.crt",
                "6080",
                "127.0.0.1:5900",
            ])
            .current_dir(dir.path()),
        WAIT,
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(!printed.contains("allow_plain = true"), "{printed}");
    assert!(printed.contains("implies --ssl-only"), "{printed}");
}

/// Regression: refusal bodies carried the OS's words ("Connection refused (os error 111)");
/// the client gets a fixed text and the detail stays in the log.
#[tokio::test]
async fn refusals_carry_fixed_texts_not_the_systems_words() {
    let (dead, _held) = refusing_addr();
    for backend in [format!("tcp://{dead}"), format!("ws://{dead}")] {
        let gate = Gate::route("/", &backend, "", "").await;
        let r = raw_request(gate.addr, upgrade_request("/", "").as_bytes()).await;
        assert_eq!(r.status, 502, "{r:?}");
        assert_eq!(r.body, "the backend cannot be reached\n", "{backend}");
    }
    let gate = Gate::route("/", &format!("ws://{dead}"), "", "").await;
    let r = get(gate.addr, "/page", "").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (502, "the backend cannot be reached\n")
    );
}

/// Regression: every target a token file named became two metric series
/// (`backend_connect_failures`, `backend_sessions_open`), never freed. Sessions are counted
/// under the token source as the config names it.
#[tokio::test]
async fn what_a_token_file_names_never_becomes_a_metric_label() {
    let dir = TempDir::new();
    let echo = echo_backend().await;
    let mut tokens = format!("good: {echo}\n");
    // Held while the test runs: a port freed at once could be taken by another test.
    let mut refusing = Vec::new();
    for i in 0..40 {
        let (addr, held) = refusing_addr();
        refusing.push(held);
        tokens += &format!("t{i}: {addr}\n");
    }
    std::fs::write(dir.path().join("tokens"), tokens).unwrap();
    let gate = gate_in(
        &dir,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"token-file:tokens\"\n",
    )
    .await;
    for i in 0..40 {
        let r = raw_request(
            gate.addr,
            upgrade_request(&format!("/?token=t{i}"), "").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 502, "{r:?}");
    }
    let (open, _s) = upgrade_head(gate.addr, upgrade_request("/?token=good", "").as_bytes()).await;
    assert_eq!(open.status, 101);
    let (_, text) = http_get(gate.admin.unwrap(), "/metrics").await;
    let by_target: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("backend=\"tcp://"))
        .collect();
    assert!(by_target.is_empty(), "{by_target:#?}");
    let source = format!(
        "backend=\"token-file:{}\"",
        dir.path().join("tokens").display()
    );
    let m = parse_metrics(&text);
    let failures = format!("wsgate_backend_connect_failures_total{{route=\"/\",{source}}}");
    let open_now = format!("wsgate_backend_sessions_open{{route=\"/\",{source}}}");
    assert_eq!(m.get(&failures), Some(&40.0), "{text}");
    assert_eq!(m.get(&open_now), Some(&1.0), "{text}");
}

fn htpasswd_line(user: &str, password: &str, cost: &str) -> String {
    let out = output_within(
        std::process::Command::new("htpasswd").args(["-nbB", "-C", cost, user, password]),
        WAIT,
    );
    assert!(
        out.status.success(),
        "htpasswd (apache2-utils; scripts/test installs it)"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn basic(user_password: &str) -> String {
    use base64::Engine;
    format!(
        "Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

/// Regression: page requests skipped the per-client rate, so a few hundred bad Basic
/// attempts on pages took every core. Now each credential check takes a token of the rate:
/// good credentials give theirs back, a burst of bad ones costs at most the burst in checks
/// and the rest get 429 at once.
#[tokio::test]
async fn bad_credentials_on_pages_cost_the_clients_rate_good_ones_never_run_out() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path().join("web")).unwrap();
    std::fs::write(dir.path().join("web/index.html"), "page").unwrap();
    std::fs::write(
        dir.path().join("users"),
        htpasswd_line("alice", "pw", "4") + "\n",
    )
    .unwrap();
    let gate = gate_in(
        &dir,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nhandshakes_per_ip_per_second = 1\nhandshakes_per_ip_burst = 3\n\
         [[route]]\npath = \"/\"\nbackend = \"echo\"\nstatic = \"web\"\nauth = { basic = \"users\" }\n",
    )
    .await;
    for _ in 0..10 {
        let r = get(gate.addr, "/index.html", &basic("alice:pw")).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let bad: Vec<_> = (0..12)
        .map(|i| {
            let addr = gate.addr;
            tokio::spawn(
                async move { get(addr, "/index.html", &basic(&format!("alice:x{i}"))).await },
            )
        })
        .collect();
    let mut statuses = Vec::new();
    for t in bad {
        statuses.push(
            within("a bad attempt's answer", WAIT, t)
                .await
                .unwrap()
                .status,
        );
    }
    let checked = statuses.iter().filter(|&&s| s == 401).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert!(checked <= 3 && checked + limited == 12, "{statuses:?}");
}

/// Regression: a reload with 16 cost-12 htpasswd users checked every hash on the async
/// workers and stalled every session for seconds. Loading runs off them now: echo round trips
/// during the reload stay under 250 ms. (One async worker, as `TOKIO_WORKER_THREADS=1` runs
/// wsgate: whatever blocks it stalls every session.)
#[tokio::test]
async fn a_reload_with_costly_hashes_never_stalls_sessions() {
    let dir = TempDir::new();
    let hash = htpasswd_line("u", "pw", "12");
    let hash = hash.split_once(':').unwrap().1;
    let users: String = (0..16).map(|i| format!("user{i}:{hash}\n")).collect();
    std::fs::write(dir.path().join("users"), users).unwrap();
    let gate = gate_in(
        &dir,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n\
         [[route]]\npath = \"/private\"\nbackend = \"echo\"\nauth = { basic = \"users\" }\n",
    )
    .await;
    let (mut ws, _) = within(
        "the echo session",
        WAIT,
        tokio_tungstenite::connect_async(gate.url("/")),
    )
    .await
    .unwrap();
    use futures_util::{SinkExt, StreamExt};
    let handle = gate.handle.clone();
    let reload = tokio::spawn(async move { handle.reload().await });
    let mut slowest = std::time::Duration::ZERO;
    let mut rounds = 0;
    let started = std::time::Instant::now();
    while !reload.is_finished() {
        assert!(started.elapsed() < 4 * WAIT, "the reload ends");
        let sent = std::time::Instant::now();
        ws.send(tokio_tungstenite::tungstenite::Message::binary(
            b"x".to_vec(),
        ))
        .await
        .unwrap();
        within("the echo", WAIT, ws.next()).await.unwrap().unwrap();
        slowest = slowest.max(sent.elapsed());
        rounds += 1;
    }
    within("the reload", WAIT, reload)
        .await
        .unwrap()
        .expect("reload");
    assert!(
        rounds > 10,
        "the reload took {rounds} round trips: too short to judge"
    );
    assert!(
        slowest < std::time::Duration::from_millis(250),
        "slowest round trip during the reload: {slowest:?}"
    );
}

/// Regression: a 20 MB page to a client that never reads held its connection (and its
/// `max_connections` place) forever, whatever the timeouts. A write blocked for
/// `send_timeout` closes the connection now, and its place is free again.
#[tokio::test]
async fn a_client_that_stops_reading_a_page_is_cut_at_send_timeout() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path().join("web")).unwrap();
    std::fs::write(dir.path().join("web/big.bin"), vec![7u8; 20 << 20]).unwrap();
    std::fs::write(dir.path().join("web/index.html"), "page").unwrap();
    let gate = gate_in(
        &dir,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [limits]\nsend_timeout = \"1s\"\nhandshake_timeout = \"1s\"\nkeepalive_timeout = \"2s\"\nmax_connections = 1\n\
         [[route]]\npath = \"/\"\nbackend = \"echo\"\nstatic = \"web\"\n",
    )
    .await;
    let admin = gate.admin.unwrap();
    let mut stuck = TcpStream::connect(gate.addr).await.unwrap();
    stuck
        .write_all(b"GET /big.bin HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let sent = std::time::Instant::now();
    eventually("the stalled response to be cut", 3 * WAIT / 2, || async {
        metric(admin, "wsgate_send_timeouts_total").await == 1.0
    })
    .await;
    let took = sent.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1000)
            && took < std::time::Duration::from_millis(1800),
        "cut after {took:?}, send_timeout is 1s"
    );
    // Its place under max_connections = 1 is free again.
    let r = get(gate.addr, "/index.html", "").await;
    assert_eq!(r.status, 200, "{r:?}");
    drop(stuck);
}

/// A request body to an app that trickles (under 1 KiB/s) or stalls is cut once
/// `send_timeout` has passed, as Apache's mod_reqtimeout MinRate does; nginx's per-read timer
/// would let the trickle hold its place forever.
#[tokio::test]
async fn a_trickled_or_stalled_request_body_is_cut_at_send_timeout() {
    let app = backend(|mut s| async move {
        // Reads everything and never answers (connect_timeout is longer than the test).
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let dir = TempDir::new();
    let gate = gate_in(
        &dir,
        &format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
             [limits]\nsend_timeout = \"1s\"\nconnect_timeout = \"10s\"\n\
             [[route]]\npath = \"/\"\nbackend = \"ws://{app}\"\n"
        ),
    )
    .await;
    let admin = gate.admin.unwrap();
    for (case, trickle) in [("trickled at 500 B/s", true), ("stalled", false)] {
        let before = metric(admin, "wsgate_send_timeouts_total").await;
        let mut s = TcpStream::connect(gate.addr).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[b'x'; 100]).await.unwrap();
        let sent = std::time::Instant::now();
        // Bounded: 50 pieces of 100 bytes, 200 ms apart, or until the gate closes.
        let mut closed_after = None;
        for _ in 0..50 {
            let mut b = [0u8; 1];
            match tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut b)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed_after = Some(sent.elapsed());
                    break;
                }
                Ok(Ok(_)) => panic!("{case}: no answer was expected before the cut"),
                Err(_) => {}
            }
            if trickle && s.write_all(&[b'x'; 100]).await.is_err() {
                closed_after = Some(sent.elapsed());
                break;
            }
        }
        let took = closed_after.unwrap_or_else(|| panic!("{case}: never cut"));
        assert!(
            took >= std::time::Duration::from_millis(1000)
                && took < std::time::Duration::from_millis(1800),
            "{case}: cut after {took:?}, send_timeout is 1s"
        );
        assert_eq!(
            metric(admin, "wsgate_send_timeouts_total").await,
            before + 1.0,
            "{case}"
        );
    }
}

/// Regression: a plain request to a proxy route whose app never answers held the connection
/// forever. The app's answer must begin within connect_timeout: 504 then.
#[tokio::test]
async fn an_app_that_never_answers_a_page_gets_504_at_connect_timeout() {
    let silent = backend(|mut s| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let gate = Gate::route(
        "/",
        &format!("ws://{silent}"),
        "connect_timeout = \"1s\"",
        "",
    )
    .await;
    let sent = std::time::Instant::now();
    let r = get(gate.addr, "/page", "").await;
    let took = sent.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        took >= std::time::Duration::from_millis(1000)
            && took < std::time::Duration::from_millis(1500),
        "504 after {took:?}, connect_timeout is 1s"
    );
}
