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
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/\"\nbackend = \"echo\"\nstatic = \"web\"\n\
         [[route]]\npath = \"/pub\"\nbackend = \"echo\"\nstatic = \"web/pub\"\n\
         [[route]]\npath = \"/private\"\nbackend = \"echo\"\nstatic = \"web/private\"\nauth = {{ bearer = \"bearer.txt\" }}\n"
    )
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
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(
        b"GET /index.html HTTP/1.1\r\nHost: test\r\n\r\nGET //private/secret.html HTTP/1.1\r\nHost: test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut all = Vec::new();
    within("both answers", WAIT, s.read_to_end(&mut all))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&all);
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
