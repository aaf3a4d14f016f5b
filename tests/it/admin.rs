//! Live session control on the admin listener: the list, closing one session with a code its
//! client sees, closing every session of a route (and backend), the admin token, and the
//! page in Chromium.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

async fn post(addr: SocketAddr, target: &str, extra: &str) -> RawResponse {
    raw_request(
        addr,
        format!("POST {target} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await
}

async fn get(addr: SocketAddr, target: &str, extra: &str) -> RawResponse {
    raw_request(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await
}

fn sessions(r: &RawResponse) -> Vec<serde_json::Value> {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), ["application/json"]);
    serde_json::from_str::<serde_json::Value>(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", r.body))
        .as_array()
        .unwrap()
        .clone()
}

/// An echo backend that reports each connection's end (EOF or reset) on a channel.
async fn watched_echo() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send(());
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test]
async fn sessions_are_listed_and_one_is_closed_with_the_code_its_client_sees() {
    let (echo, mut ended) = watched_echo().await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/vnc\"\nbackend = \"tcp://{echo}\"\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n"
    ))
    .await;
    let admin = gate.admin.unwrap();
    let (mut a, _) = tokio_tungstenite::connect_async(gate.url("/vnc"))
        .await
        .unwrap();
    let (mut b, _) = tokio_tungstenite::connect_async(gate.url("/echo"))
        .await
        .unwrap();
    a.send(Message::binary(vec![7u8; 1000])).await.unwrap();
    assert_eq!(
        within("the echo", WAIT, a.next())
            .await
            .unwrap()
            .unwrap()
            .len(),
        1000
    );
    let list = sessions(&get(admin, "/sessions", "").await);
    assert_eq!(list.len(), 2, "{list:?}");
    let vnc = list
        .iter()
        .find(|s| s["route"] == "/vnc")
        .expect("the /vnc session");
    assert_eq!(vnc["backend"], format!("tcp://{echo}"));
    assert_eq!(vnc["bytes_from_client"], 1000);
    assert_eq!(vnc["bytes_to_client"], 1000);
    assert!(vnc["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let started = vnc["started"].as_str().unwrap();
    assert!(
        started.len() == 20 && started.ends_with('Z') && started.as_bytes()[10] == b'T',
        "{started}"
    );
    let id = vnc["id"].as_u64().unwrap();

    // Refused: a code an operator may not send, an id that is not live.
    assert_eq!(
        post(admin, &format!("/sessions/{id}/close?code=1006"), "")
            .await
            .status,
        400
    );
    assert_eq!(
        post(admin, &format!("/sessions/{id}/close?code=1002"), "")
            .await
            .status,
        400
    );
    assert_eq!(post(admin, "/sessions/99999/close", "").await.status, 404);
    assert_eq!(
        get(admin, &format!("/sessions/{id}/close"), "")
            .await
            .status,
        404
    );

    let asked = std::time::Instant::now();
    let r = post(
        admin,
        &format!("/sessions/{id}/close?code=4001&reason=moved%20to%20desk%202"),
        "",
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "{\"closed\":1}"));
    let close = loop {
        match within("the operator's close", WAIT, a.next()).await {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(close.code, CloseCode::Library(4001));
    assert_eq!(close.reason.as_str(), "moved to desk 2");
    within("the backend connection to close", WAIT, ended.recv()).await;
    // The other session goes on; the closed one leaves the list.
    b.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        within("b's echo", WAIT, b.next()).await.unwrap().unwrap(),
        Message::text("still here")
    );
    eventually("the closed session to leave the list", WAIT, || async {
        sessions(&get(admin, "/sessions", "").await).len() == 1
    })
    .await;
}

#[tokio::test]
async fn every_session_of_a_route_and_backend_is_closed_at_once() {
    let (one, _) = watched_echo().await;
    let (two, _) = watched_echo().await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/desk\"\nbackend = [\"tcp://{one}\", \"tcp://{two}\"]\nbalance = \"round_robin\"\n\
         [[route]]\npath = \"/other\"\nbackend = \"echo\"\n"
    ))
    .await;
    let admin = gate.admin.unwrap();
    let mut clients = Vec::new();
    for path in ["/desk", "/desk", "/desk", "/desk", "/other"] {
        clients.push(
            tokio_tungstenite::connect_async(gate.url(path))
                .await
                .unwrap()
                .0,
        );
    }
    eventually("five sessions listed", WAIT, || async {
        sessions(&get(admin, "/sessions", "").await).len() == 5
    })
    .await;
    assert_eq!(post(admin, "/sessions/close", "").await.status, 400);
    let r = post(
        admin,
        &format!("/sessions/close?route=/desk&backend=tcp://{one}&code=1013"),
        "",
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "{\"closed\":2}"));
    let r = post(admin, "/sessions/close?route=%2Fdesk", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "{\"closed\":2}"));
    let mut codes = Vec::new();
    for ws in clients.iter_mut().take(4) {
        let code = loop {
            match within("a close", WAIT, ws.next()).await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        };
        codes.push(code);
    }
    codes.sort();
    assert_eq!(codes, [Some(1001), Some(1001), Some(1013), Some(1013)]);
    // The closed clients finish the close handshake (their reply is flushed on close).
    for mut ws in clients.drain(..4) {
        let _ = ws.close(None).await;
    }
    eventually("the closed sessions to leave the list", WAIT, || async {
        sessions(&get(admin, "/sessions", "").await).len() == 1
    })
    .await;
    let left = sessions(&get(admin, "/sessions", "").await);
    assert_eq!(left[0]["route"], "/other");
}

#[tokio::test]
async fn the_admin_token_guards_everything_but_health_and_readiness() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("admin.tokens"), "s3cret-admin\n").unwrap();
    let config = dir.path().join("wsgate.toml");
    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\nauth = { bearer = \"admin.tokens\" }\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    )
    .unwrap();
    let gate = Gate::from_file(&config).await;
    let admin = gate.admin.unwrap();
    for open in ["/healthz", "/readyz"] {
        assert_eq!(get(admin, open, "").await.status, 200, "{open}");
    }
    for guarded in ["/", "/sessions", "/metrics"] {
        let r = get(admin, guarded, "").await;
        assert_eq!(r.status, 401, "{guarded}: {r:?}");
        assert_eq!(r.header("www-authenticate"), ["Bearer realm=\"wsgate\""]);
        let wrong = get(admin, guarded, "Authorization: Bearer nope\r\n").await;
        assert_eq!(wrong.status, 401, "{guarded}");
        let right = get(admin, guarded, "Authorization: Bearer s3cret-admin\r\n").await;
        assert_eq!(right.status, 200, "{guarded}");
    }
    assert_eq!(post(admin, "/sessions/1/close", "").await.status, 401);
    assert_eq!(
        get(admin, "/sessions?access_token=s3cret-admin", "")
            .await
            .status,
        200
    );
    let page = get(admin, "/?access_token=s3cret-admin", "").await;
    assert_eq!(page.header("content-type"), ["text/html; charset=utf-8"]);
    assert!(
        page.body.contains("Live sessions")
            && !page.body.contains("http://")
            && !page.body.contains("https://")
    );
}

/// A proxy route's byte stream cannot take an injected close frame: an operator's close cuts
/// the session (as the drain does), and both connections close.
#[tokio::test]
async fn an_operators_close_cuts_a_proxied_session() {
    let app = Gate::route("/", "echo", "", "").await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"ws://{}\"\n",
        app.addr
    ))
    .await;
    let admin = gate.admin.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(gate.url("/"))
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    within("the echo", WAIT, ws.next()).await.unwrap().unwrap();
    let list = sessions(&get(admin, "/sessions", "").await);
    assert!(
        list[0]["bytes_from_client"].as_u64().unwrap() > 0,
        "{list:?}"
    );
    let id = list[0]["id"].as_u64().unwrap();
    assert_eq!(
        post(admin, &format!("/sessions/{id}/close"), "")
            .await
            .status,
        200
    );
    let end = within("the cut", WAIT, ws.next()).await;
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
}

#[test]
fn the_admin_page_in_chromium_shows_a_session_and_closes_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = TempDir::new();
    std::fs::write(dir.path().join("admin.tokens"), "page-token\n").unwrap();
    let config = dir.path().join("wsgate.toml");
    std::fs::write(
        &config,
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\nauth = { bearer = \"admin.tokens\" }\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    )
    .unwrap();
    let gate = rt.block_on(Gate::from_file(&config));
    let admin = gate.admin.unwrap();
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(gate.url("/")))
        .unwrap();
    let list = rt.block_on(get(
        admin,
        "/sessions",
        "Authorization: Bearer page-token\r\n",
    ));
    let id = sessions(&list)[0]["id"].as_u64().unwrap();
    let profile = TempDir::new();
    let report = json_output(
        Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/browser/admin_driver.py"
            ))
            .arg(chromium())
            .arg(profile.path())
            .arg(format!("http://{admin}/?access_token=page-token"))
            .arg(id.to_string()),
        Duration::from_secs(90),
    );
    assert_eq!(report["row"][1], "/", "{report}");
    assert_eq!(report["row"][3], "echo", "{report}");
    let close = rt.block_on(async {
        loop {
            match within("the page's close", WAIT, ws.next()).await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    });
    assert_eq!(close, Some(1001));
}
