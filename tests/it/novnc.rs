//! examples/novnc for real: TigerVNC's Xvnc (Debian) with its screen painted, wsgate serving
//! noVNC's client (npm @novnc/novnc, in examples/novnc/web) and bridging its WebSocket, and
//! headless Chromium running the page (tests/browser/novnc_driver.py). The RFB connection
//! must come up, the canvas must show the screen's colour, and a pointer move on the page
//! must move the X server's pointer. Once with websockify's command line, once with a token
//! file choosing between two VNC servers, once over HTTP/2 (wss, the page and its WebSocket
//! on one TLS connection).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A running Xvnc with its root window painted one colour.
struct Xvnc {
    _child: KillOnDrop,
    display: String,
    port: u16,
}

impl Xvnc {
    fn start(colour: &str) -> Xvnc {
        let port = unused_addr().port();
        // -displayfd 1: Xvnc picks a free display and writes its number to stdout once ready.
        let mut child = Command::new("Xvnc")
            .args(["-displayfd", "1", "-rfbport", &port.to_string()])
            .args([
                "-SecurityTypes",
                "None",
                "-geometry",
                "320x240",
                "-depth",
                "24",
            ])
            .args(["-localhost", "-nolisten", "tcp", "-AlwaysShared"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvnc (tigervnc-standalone-server; scripts/test installs it)");
        let stdout = child.stdout.take().unwrap();
        let child = KillOnDrop(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let number = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("Xvnc reported its display in time");
        let display = format!(":{}", number.trim());
        let out = output_within(
            Command::new(python())
                .arg(format!("{ROOT}/tests/novnc/x11.py"))
                .args(["paint", &display, colour]),
            WAIT,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Xvnc {
            _child: child,
            display,
            port,
        }
    }
}

fn novnc_web() -> PathBuf {
    let web = Path::new(ROOT).join("examples/novnc/web");
    assert!(
        web.join("node_modules/@novnc/novnc/core/rfb.js").exists(),
        "noVNC's client is missing: run `npm ci --prefix examples/novnc/web` (scripts/test does)"
    );
    web
}

/// Runs the driver over `cases` (url, display, colour, pointer target) and checks each result.
fn drive(cases: &[(String, &Xvnc, &str, (u32, u32))]) {
    let profile = TempDir::new();
    drive_in(profile.path(), cases);
}

/// As [`drive`], with Chromium's profile in `profile` (one that trusts a test CA).
fn drive_in(profile: &Path, cases: &[(String, &Xvnc, &str, (u32, u32))]) {
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|(url, x, colour, (px, py))| {
            serde_json::json!({"url": url, "display": x.display, "colour": colour, "at": [px, py]})
        })
        .collect();
    let report = json_output(
        Command::new(python())
            .arg(format!("{ROOT}/tests/browser/novnc_driver.py"))
            .arg(chromium())
            .arg(profile)
            .arg(serde_json::Value::Array(json).to_string()),
        Duration::from_secs(150),
    );
    let results = report.as_array().expect("a list of results");
    assert_eq!(results.len(), cases.len());
    for (r, (url, _, colour, (px, py))) in results.iter().zip(cases) {
        assert_eq!(r["error"], serde_json::Value::Null, "{url}: {r}");
        assert_eq!(r["state"], "connected", "{url}: {r}");
        assert_eq!(r["size"], serde_json::json!([320, 240]), "{url}: {r}");
        assert_eq!(
            r["pixel"], *colour,
            "{url}: the canvas shows the screen: {r}"
        );
        assert_eq!(
            r["pointer"],
            serde_json::json!([px, py]),
            "{url}: the page's pointer move reached the X server: {r}"
        );
    }
}

#[test]
fn novnc_in_chromium_through_websockify_command_line() {
    let web = novnc_web();
    let vnc = Xvnc::start("ff0000");
    let gate = GateProcess::start_cli(
        &[
            "--web",
            web.to_str().unwrap(),
            "127.0.0.1:0",
            &format!("127.0.0.1:{}", vnc.port),
        ],
        TempDir::new(),
    );
    drive(&[(
        format!("http://{}/index.html", gate.addr),
        &vnc,
        "ff0000",
        (101, 67),
    )]);
}

#[test]
fn novnc_token_file_chooses_between_two_vnc_servers() {
    let web = novnc_web();
    let red = Xvnc::start("ff0000");
    let blue = Xvnc::start("0000ff");
    let dir = TempDir::new();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "red: 127.0.0.1:{}\nblue: 127.0.0.1:{}\n",
            red.port, blue.port
        ),
    )
    .unwrap();
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nstatic = \"{}\"\nbackend = \"token-file:{}\"\n",
        web.display(),
        tokens.display()
    ));
    drive(&[
        (
            format!("http://{}/?token=blue", gate.addr),
            &blue,
            "0000ff",
            (40, 200),
        ),
        (
            format!("http://{}/?token=red", gate.addr),
            &red,
            "ff0000",
            (250, 30),
        ),
    ]);
}

/// The example's config over wss: HTTP/2 by ALPN, so noVNC's page, its modules and its
/// WebSocket (an RFC 8441 stream) share one TLS connection.
#[test]
fn novnc_over_http2() {
    let web = novnc_web();
    let vnc = Xvnc::start("00ff00");
    let dir = TempDir::new();
    gen_certs(dir.path(), "ec", "server", "localhost");
    let profile = dir.path().join("profile");
    crate::browser::trust_in_profile(&profile, &dir.path().join("ca.crt"));
    let d = dir.path().display();
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{d}/server.crt\", key = \"{d}/server.key\" }}\n\
         [[route]]\npath = \"/\"\nstatic = \"{}\"\nbackend = \"tcp://127.0.0.1:{}\"\n",
        web.display(),
        vnc.port
    ));
    drive_in(
        &profile,
        &[(
            format!("https://localhost:{}/index.html", gate.addr.port()),
            &vnc,
            "00ff00",
            (77, 99),
        )],
    );
    let upgraded = gate.wait_for_log(" upgraded ");
    assert!(upgraded.contains("http_version=\"2\""), "{upgraded}");
}
