//! Session targets shared by many gateways, as websockify's plugins keep them: Redis
//! (`TokenRedis`, a real `redis-server` started per test on a free port) and signed tokens
//! (`JWTTokenApi`, keys made by openssl, tokens signed by the `jsonwebtoken` crate).

use std::net::SocketAddr;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use crate::common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

/// A `redis-server` on a free loopback port (no persistence), killed when dropped.
struct Redis {
    port: u16,
    password: Option<&'static str>,
    _process: KillOnDrop,
}

impl Redis {
    fn start(password: Option<&'static str>) -> Redis {
        Redis::start_on(unused_addr().port(), password)
    }

    fn start_on(port: u16, password: Option<&'static str>) -> Redis {
        Redis::start_with(port, password, &[])
    }

    /// Also serving TLS on `tls_port` with the test CA's `server.crt` from `certs`.
    fn start_tls(certs: &Path, tls_port: u16) -> Redis {
        let file = |name: &str| certs.join(name).display().to_string();
        Redis::start_with(
            unused_addr().port(),
            None,
            &[
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                file("server.crt"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.crt"),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
        )
    }

    fn start_with(port: u16, password: Option<&'static str>, extra: &[String]) -> Redis {
        let mut cmd = Command::new("redis-server");
        cmd.args(extra);
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server; scripts/test installs it)");
        let redis = Redis {
            port,
            password,
            _process: KillOnDrop(child),
        };
        let started = std::time::Instant::now();
        while redis.try_cmd(&["PING"]).is_err() {
            assert!(started.elapsed() < WAIT, "redis-server to answer on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        match self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    fn try_cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut con)
    }

    fn cmd(&self, args: &[&str]) -> redis::Value {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Clients connected to this server (the asking one included).
    fn clients(&self) -> usize {
        let info = match self.cmd(&["INFO", "clients"]) {
            redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("{other:?}"),
        };
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("connected_clients")
    }
}

/// A backend that writes its name, then echoes.
async fn named(name: &'static str) -> SocketAddr {
    banner_backend(name.as_bytes()).await
}

/// The upgrade's status for `token` on `/`, and the first bytes its backend sent.
async fn through(gate: SocketAddr, token: &str) -> (u16, Vec<u8>) {
    let target = format!("/?token={token}");
    let (r, mut s) = upgrade_head(gate, upgrade_request(&target, "").as_bytes()).await;
    if r.status != 101 {
        return (r.status, r.body.into_bytes());
    }
    let mut ws = tokio::io::BufReader::new(&mut s);
    let frame = within("the backend's banner", WAIT, read_frame(&mut ws)).await;
    (101, frame.expect("a frame").payload)
}

fn gate_toml(backend: &str, limits: &str) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\n{limits}\n[[route]]\npath = \"/\"\nbackend = \"{backend}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_values_in_both_forms_changes_and_deletes_apply_to_the_next_session() {
    let redis = Redis::start(Some("s3cret-redis"));
    let (a, b) = (named("alpha").await, named("beta").await);
    let source = format!("127.0.0.1:{}::s3cret-redis:\\\"desks:eu\\\"", redis.port);
    let gate = GateProcess::start(&gate_toml(&format!("token-redis:{source}"), ""));
    redis.cmd(&["SET", "desks:eu:t1", &a.to_string()]);
    redis.cmd(&["SET", "desks:eu:t2", &format!("{{\"host\": \"{b}\"}}")]);
    redis.cmd(&["SET", "desks:eu:bad", "garbage-value-xyz"]);
    redis.cmd(&["SET", "t1", &b.to_string()]); // outside the namespace: never read
    assert_eq!(through(gate.addr, "t1").await, (101, b"alpha".to_vec()));
    assert_eq!(through(gate.addr, "t2").await, (101, b"beta".to_vec()));
    // A change applies to the next session, a delete too.
    redis.cmd(&["SET", "desks:eu:t1", &format!("{{\"host\":\"{b}\"}}")]);
    assert_eq!(through(gate.addr, "t1").await, (101, b"beta".to_vec()));
    redis.cmd(&["DEL", "desks:eu:t1"]);
    assert_eq!(through(gate.addr, "t1").await.0, 404);
    assert_eq!(through(gate.addr, "nobody").await.0, 404);
    let r = raw_request(gate.addr, upgrade_request("/?token=bad", "").as_bytes()).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (502, "the token's target is malformed\n")
    );
    let r = raw_request(gate.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r.status, 404, "no token");
    // Counted by result; neither the password nor a token in a label or a log line.
    let (_, metrics) = http_get(gate.admin.unwrap(), "/metrics").await;
    let m = parse_metrics(&metrics);
    let count = |result: &str| {
        m.get(&format!(
            "wsgate_token_lookups_total{{route=\"/\",result=\"{result}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(
        (count("found"), count("unknown"), count("invalid")),
        (3.0, 2.0, 1.0),
        "{metrics}"
    );
    assert!(!metrics.contains("s3cret-redis"), "{metrics}");
    gate.wait_for_log("not a target");
    let log = gate.log_text();
    for secret in [
        "s3cret-redis",
        "?token=",
        "desks:eu:t1",
        "garbage-value-xyz",
    ] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
}

/// `rediss://`: the certificate is checked against the system's roots (`SSL_CERT_FILE`
/// names a bundle, as for every TLS client built on rustls-native-certs). A Redis whose
/// certificate is not trusted gets no lookup: 503, as an unreachable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_checks_the_servers_certificate() {
    let certs = TempDir::new();
    gen_certs(certs.path(), "ec", "server", "localhost 127.0.0.1");
    let tls_port = unused_addr().port();
    let redis = Redis::start_tls(certs.path(), tls_port);
    let a = named("alpha").await;
    redis.cmd(&["SET", "t1", &a.to_string()]);
    let backend = format!("token-redis:rediss://localhost:{tls_port}/0");
    let ca = certs.path().join("ca.crt").display().to_string();
    let trusted = GateProcess::start_env(
        &gate_toml(&backend, "connect_timeout = \"2s\""),
        &[],
        &[("SSL_CERT_FILE", &ca)],
    );
    assert_eq!(through(trusted.addr, "t1").await, (101, b"alpha".to_vec()));
    assert_eq!(through(trusted.addr, "t2").await.0, 404);

    // Another CA's bundle: the same server is not believed.
    let other = TempDir::new();
    gen_certs(other.path(), "ec", "server", "localhost");
    let other_ca = other.path().join("ca.crt").display().to_string();
    let untrusted = GateProcess::start_env(
        &gate_toml(&backend, "connect_timeout = \"2s\""),
        &[],
        &[("SSL_CERT_FILE", &other_ca)],
    );
    let started = std::time::Instant::now();
    let r = raw_request(untrusted.addr, upgrade_request("/?token=t1", "").as_bytes()).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503_within_connect_timeout_and_recovers_by_itself() {
    let a = named("alpha").await;
    let redis = Redis::start(None);
    let port = redis.port;
    let gate = GateProcess::start(&gate_toml(
        &format!("token-redis:redis://127.0.0.1:{port}"),
        "connect_timeout = \"1s\"",
    ));
    redis.cmd(&["SET", "t", &a.to_string()]);
    assert_eq!(through(gate.addr, "t").await, (101, b"alpha".to_vec()));
    drop(redis);
    let asked = std::time::Instant::now();
    let r = raw_request(gate.addr, upgrade_request("/?token=t", "").as_bytes()).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), ["1"]);
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "{:?}",
        asked.elapsed()
    );
    let redis = Redis::start_on(port, None);
    redis.cmd(&["SET", "t", &a.to_string()]);
    eventually("sessions through Redis again", 2 * WAIT, || async {
        through(gate.addr, "t").await.0 == 101
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sessions_shares_one_redis_connection() {
    let redis = Redis::start(None);
    let echo = echo_backend().await;
    redis.cmd(&["SET", "t", &echo.to_string()]);
    let gate = GateProcess::start(&gate_toml(
        &format!("token-redis:127.0.0.1:{}", redis.port),
        "",
    ));
    let before = redis.clients();
    let burst: Vec<_> = (0..300)
        .map(|_| {
            let addr = gate.addr;
            tokio::spawn(async move {
                upgrade_head(addr, upgrade_request("/?token=t", "").as_bytes()).await
            })
        })
        .collect();
    let mut held = Vec::new();
    for t in burst {
        let (r, s) = within("a session of the burst", WAIT, t).await.unwrap();
        assert_eq!(r.status, 101, "{r:?}");
        held.push(s);
    }
    let during = redis.clients();
    assert!(
        during <= before + 2,
        "{before} Redis clients before, {during} during the burst"
    );
}

fn openssl(args: &[&str], dir: &Path) {
    let out = output_within(Command::new("openssl").args(args).current_dir(dir), WAIT);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_tokens_of_every_family_name_their_target_and_bad_ones_get_404() {
    let dir = TempDir::new();
    let d = dir.path();
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
        d,
    );
    openssl(&["pkey", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"], d);
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "p256.key",
        ],
        d,
    );
    openssl(
        &["pkey", "-in", "p256.key", "-pubout", "-out", "p256.pub"],
        d,
    );
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            "p384.key",
        ],
        d,
    );
    openssl(
        &["pkey", "-in", "p384.key", "-pubout", "-out", "p384.pub"],
        d,
    );
    let secret = b"0123456789abcdef0123456789abcdef";
    use base64::Engine;
    // As websockify's jwcrypto reads an HS key file: base64url; saved with a final newline.
    let hs_text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret) + "\n";
    std::fs::write(d.join("hs.key"), hs_text).unwrap();
    let echo = echo_backend().await;
    let (host, port) = (echo.ip().to_string(), echo.port());
    let claims = json!({"host": host, "port": port, "exp": now() + 300});
    let pem = |name: &str| std::fs::read(d.join(name)).unwrap();
    for (keyfile, alg, signer) in [
        (
            "rsa.pub",
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap(),
        ),
        (
            "rsa.pub",
            Algorithm::RS512,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap(),
        ),
        (
            "rsa.pub",
            Algorithm::PS256,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap(),
        ),
        (
            "rsa.pub",
            Algorithm::PS384,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap(),
        ),
        (
            "p256.pub",
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&pem("p256.key")).unwrap(),
        ),
        (
            "p384.pub",
            Algorithm::ES384,
            EncodingKey::from_ec_pem(&pem("p384.key")).unwrap(),
        ),
        ("hs.key", Algorithm::HS256, EncodingKey::from_secret(secret)),
        ("hs.key", Algorithm::HS512, EncodingKey::from_secret(secret)),
    ] {
        let config = d.join("wsgate.toml");
        std::fs::write(&config, gate_toml(&format!("token-jwt:{keyfile}"), "")).unwrap();
        let gate = Gate::from_file(&config).await;
        let token = encode(&Header::new(alg), &claims, &signer).unwrap();
        let (r, _s) = upgrade_head(
            gate.addr,
            upgrade_request(&format!("/?token={token}"), "").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 101, "{keyfile} {alg:?}: {r:?}");
        if keyfile != "rsa.pub" {
            continue;
        }
        // Refused like unknown tokens: expired, not yet valid, no claims, another key, the
        // public key used as an HMAC secret (algorithm confusion), a JWE, alg none.
        let rsa = EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap();
        let sign = |claims: serde_json::Value| {
            encode(&Header::new(Algorithm::RS256), &claims, &rsa).unwrap()
        };
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&pem("rsa.pub")),
        )
        .unwrap();
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(r#"{"alg":"none","typ":"JWT"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        for (what, bad) in [
            (
                "expired",
                sign(json!({"host": host, "port": port, "exp": now() - 10})),
            ),
            (
                "not yet valid",
                sign(json!({"host": host, "port": port, "nbf": now() + 300})),
            ),
            ("no claims", sign(json!({}))),
            ("HS with the public key", confused),
            ("JWE", "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d".to_owned()),
            ("alg none", none),
        ] {
            let r = raw_request(
                gate.addr,
                upgrade_request(&format!("/?token={bad}"), "").as_bytes(),
            )
            .await;
            assert_eq!(r.status, 404, "{what}: {r:?}");
        }
    }
}

#[test]
fn websockify_plugin_command_lines_become_their_backends() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("hs.key"), "c2VjcmV0\n").unwrap();
    for (args, backend) in [
        (
            &[
                "--token-plugin",
                "TokenRedis",
                "--token-source",
                "redis.lan:6379:0::vnc",
                "6080",
            ][..],
            "token-redis:redis.lan:6379:0::vnc",
        ),
        (
            &[
                "--token-plugin",
                "websockify.token_plugins.JWTTokenApi",
                "--token-source",
                "hs.key",
                "6080",
            ],
            "token-jwt:hs.key",
        ),
    ] {
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .arg("--print-config")
                .args(args)
                .current_dir(dir.path()),
            WAIT,
        );
        let toml = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(toml.contains(&format!("backend = \"{backend}\"")), "{toml}");
        let file = dir.path().join("printed.toml");
        std::fs::write(&file, toml.as_bytes()).unwrap();
        let check = output_within(
            Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .arg("--check-config")
                .arg(&file),
            WAIT,
        );
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// The fleet, for real: Debian's HAProxy (round robin, PROXY v2, /readyz checks) in front of
/// two wsgate processes that share one Redis. A token written once reaches its target through
/// both; each gateway lists the sessions it holds, with the client HAProxy named; a session is
/// closed through the admin API of the gateway that holds it, and the client sees the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_behind_haproxy_share_one_redis() {
    let redis = Redis::start(Some("fleet-pw"));
    let desk = named("desk-7").await;
    redis.cmd(&["SET", "vnc:desk7", &format!("{{\"host\":\"{desk}\"}}")]);
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/\"\nbackend = \"token-redis:127.0.0.1:{}::fleet-pw:vnc\"\n",
        redis.port
    );
    let gates = [GateProcess::start(&config), GateProcess::start(&config)];
    let front = unused_addr();
    let _haproxy = Haproxy::start(
        &haproxy_for_gates(front, &gates, "  maxconn 500\n", ""),
        front,
    )
    .await;
    // Sessions through HAProxy until both gateways hold some (round robin alternates; a
    // health check that is late on a loaded machine may send a few in a row to one).
    let mut held = Vec::new();
    let mut listed: Vec<Vec<serde_json::Value>> = vec![Vec::new(), Vec::new()];
    for _ in 0..20 {
        let (r, s) = upgrade_head(front, upgrade_request("/?token=desk7", "").as_bytes()).await;
        assert_eq!(r.status, 101, "{r:?}");
        let client = s.local_addr().unwrap();
        let mut ws = tokio::io::BufReader::new(s);
        let banner = within("the desk's banner", WAIT, read_frame(&mut ws))
            .await
            .unwrap();
        assert_eq!(banner.payload, b"desk-7");
        held.push((ws, client));
        for (g, list) in gates.iter().zip(listed.iter_mut()) {
            let (_, body) = http_get(g.admin.unwrap(), "/sessions").await;
            *list = serde_json::from_str(&body).unwrap();
        }
        if held.len() >= 4 && listed.iter().all(|l| !l.is_empty()) {
            break;
        }
    }
    assert!(listed.iter().all(|l| !l.is_empty()), "{listed:?}");
    assert_eq!(listed[0].len() + listed[1].len(), held.len(), "{listed:?}");
    // Close the first client's session on whichever gateway holds it.
    let (mut ws, client) = held.remove(0);
    let (holder, session) = gates
        .iter()
        .zip(&listed)
        .find_map(|(g, list)| {
            list.iter()
                .find(|s| s["peer"] == client.to_string())
                .map(|s| (g, s["id"].as_u64().unwrap()))
        })
        .expect("a gateway lists the session with the client HAProxy named");
    let r = raw_request(
        holder.admin.unwrap(),
        format!("POST /sessions/{session}/close?code=4000&reason=reassigned HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let code = within(
        "the operator's close through HAProxy",
        WAIT,
        read_until_close(&mut ws),
    )
    .await;
    assert_eq!(code, Some(4000));
    // The others go on.
    for (ws, _) in &mut held {
        ws.get_mut()
            .write_all(&client_frame(
                true,
                wsgate::protocol::frame::OpCode::Binary,
                b"ping",
                [1, 2, 3, 4],
            ))
            .await
            .unwrap();
        let echoed = within("an echo after the close", WAIT, read_frame(ws))
            .await
            .unwrap();
        assert_eq!(echoed.payload, b"ping");
    }
}

/// Listing many sessions never holds up the data path: with 10,000 live sessions listed over
/// and over, another session's round trips stay quick (the list is copied out under a short
/// lock; sessions touch it only when they start and end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_thousands_of_sessions_does_not_stall_the_data_path() {
    let gate = GateProcess::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_connections = 10100\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    );
    let mut idle = Vec::new();
    for _ in 0..10_000 / 100 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                let addr = gate.addr;
                tokio::spawn(async move {
                    upgrade_head(addr, upgrade_request("/", "").as_bytes()).await
                })
            })
            .collect();
        for b in batch {
            let (r, s) = within("an idle session", WAIT, b).await.unwrap();
            assert_eq!(r.status, 101);
            idle.push(s);
        }
    }
    let admin = gate.admin.unwrap();
    let listing = tokio::spawn(async move {
        let mut sizes = Vec::new();
        for _ in 0..20 {
            let (_, body) = http_get(admin, "/sessions").await;
            sizes.push(body.len());
        }
        sizes
    });
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", gate.addr))
        .await
        .unwrap();
    let mut slowest = Duration::ZERO;
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while !listing.is_finished() {
        assert!(started.elapsed() < 6 * WAIT, "the listing ends");
        use futures_util::{SinkExt, StreamExt};
        let sent = std::time::Instant::now();
        ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
            1u8;
            32
        ]))
        .await
        .unwrap();
        within("the echo", WAIT, ws.next()).await.unwrap().unwrap();
        slowest = slowest.max(sent.elapsed());
        rounds += 1;
    }
    let sizes = listing.await.unwrap();
    assert!(sizes.iter().all(|&n| n > 10_000 * 100), "{sizes:?}");
    println!(
        "{rounds} round trips while 10,000 sessions were listed 20 times; slowest {slowest:?}"
    );
    assert!(
        slowest < Duration::from_millis(100),
        "slowest round trip {slowest:?}"
    );
    drop(idle);
}
