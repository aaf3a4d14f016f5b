//! permessage-deflate (RFC 7692) on bridge and echo routes: the answer to each kind of offer,
//! Python `websockets` (compression on by default) and tokio-tungstenite (none) on the same
//! route, the metrics, and decompression bombs — one, then a flood from 100 clients — with
//! wsgate's memory and CPU measured.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use flate2::{Compress, Compression, FlushCompress};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use wsgate::protocol::frame::OpCode;

/// `wsgate_deflate_bytes_total` for a route, direction and form, from parsed metrics.
fn deflate_bytes(
    metrics: &std::collections::HashMap<String, f64>,
    route: &str,
    direction: &str,
    form: &str,
) -> f64 {
    metrics[&format!(
        "wsgate_deflate_bytes_total{{route=\"{route}\",direction=\"{direction}\",form=\"{form}\"}}"
    )]
}

/// The Sec-WebSocket-Extensions a 101 carries for `offer` (and its status).
async fn answer(addr: SocketAddr, path: &str, offer: Option<&str>) -> (u16, Vec<String>) {
    let extra = offer
        .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
        .unwrap_or_default();
    let (r, _s) = upgrade_head(addr, upgrade_request(path, &extra).as_bytes()).await;
    (r.status, r.header("sec-websocket-extensions"))
}

#[tokio::test]
async fn offers_are_answered_with_what_wsgate_honours() {
    let echo = echo_backend().await;
    let g = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\ncompression_window_bits = 12\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n[[route]]\npath = \"/tcp\"\nbackend = \"tcp://{echo}\"\n[[route]]\npath = \"/off\"\nbackend = \"echo\"\ncompression = false\n"
    ))
    .await;
    let plain = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    for (offer, want) in [
        (Some("permessage-deflate"), Some(plain.to_owned())),
        (
            Some("permessage-deflate; client_max_window_bits"),
            Some(plain.to_owned()),
        ),
        (
            Some("permessage-deflate; server_max_window_bits=10; client_no_context_takeover"),
            Some(
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_no_context_takeover"
                    .to_owned(),
            ),
        ),
        // Asking for more than the config allows gets the config's window.
        (
            Some("permessage-deflate; server_max_window_bits=15"),
            Some(
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=12; client_no_context_takeover"
                    .to_owned(),
            ),
        ),
        // The first acceptable of several offers; unknown extensions skipped.
        (
            Some("x-webkit-deflate-frame, permessage-deflate; bogus=1, permessage-deflate; server_max_window_bits=9"),
            Some(
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_no_context_takeover"
                    .to_owned(),
            ),
        ),
        // Malformed or duplicated parameters: declined, the connection goes on without it.
        (Some("permessage-deflate; server_max_window_bits=16"), None),
        (Some("permessage-deflate; server_max_window_bits"), None),
        (
            Some("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
            None,
        ),
        (Some("permessage-deflate; server_no_context_takeover=yes"), None),
        (None, None),
    ] {
        let (status, got) = answer(g.addr, "/", offer).await;
        assert_eq!(status, 101, "{offer:?}");
        assert_eq!(got.first().cloned(), want, "{offer:?}");
        let (_, bridge) = answer(g.addr, "/tcp", offer).await;
        assert_eq!(bridge, got, "a bridge route answers as the echo does");
    }
    let (status, off) = answer(g.addr, "/off", Some("permessage-deflate")).await;
    assert_eq!((status, off), (101, vec![]), "compression = false declines");

    let err = wsgate::Config::parse(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"ws://127.0.0.1:1\"\ncompression = true\n",
        "t.toml",
        std::path::Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("line 6") && err.contains("route.compression"),
        "{err}"
    );
    let err = wsgate::Config::parse(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\ncompression_window_bits = 8\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
        "t.toml",
        std::path::Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 4") && err.contains("9 to 15"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_compresses_tungstenite_does_not_and_both_get_every_message() {
    let g = Gate::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n",
    )
    .await;
    let url = g.url("/");
    let report = tokio::task::spawn_blocking(move || {
        json_output(
            std::process::Command::new(python())
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/peers/deflate_client.py"
                ))
                .arg(&url),
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert!(
        report["extensions"]
            .as_str()
            .unwrap()
            .starts_with("permessage-deflate"),
        "{report}"
    );
    assert_eq!(report["intact"], true, "{report}");
    let sent = report["bytes"].as_f64().unwrap();

    // The metrics: the text compressed well; every byte that came in went out.
    let metrics = parse_metrics(&g.handle.metrics_text());
    let m = |direction: &str, form: &str| deflate_bytes(&metrics, "/", direction, form);
    assert_eq!(m("from_client", "uncompressed"), sent);
    assert_eq!(m("to_client", "uncompressed"), sent);
    assert!(m("to_client", "compressed") < sent * 0.5, "{metrics:?}");
    assert!(m("from_client", "compressed") < sent * 0.5, "{metrics:?}");

    // tokio-tungstenite offers no extension: the same route, uncompressed.
    let (mut ws, response) = tokio_tungstenite::connect_async(g.url("/")).await.unwrap();
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    let text = "plain ✓ ".repeat(10_000);
    ws.send(Message::text(text.clone())).await.unwrap();
    let echoed = within("the uncompressed echo", WAIT, ws.next()).await;
    assert_eq!(echoed.unwrap().unwrap(), Message::text(text));
}

/// A deflate stream (sync-flushed, tail taken off) of `mib` MiB of zeros.
fn bomb(mib: usize) -> Vec<u8> {
    let zeros = vec![0u8; 1 << 20];
    deflated(&vec![&zeros[..]; mib])
}

/// One permessage-deflate message body: `pieces` one after the other, compressed (the
/// stream sync-flushed and its tail taken off, §7.2.1).
fn deflated(pieces: &[&[u8]]) -> Vec<u8> {
    let mut c = Compress::new(Compression::best(), false);
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let flush = if i + 1 == pieces.len() {
            FlushCompress::Sync
        } else {
            FlushCompress::None
        };
        let mut input = *piece;
        loop {
            out.reserve(64 << 10);
            let before = c.total_in();
            c.compress_vec(input, &mut out, flush).unwrap();
            input = &input[(c.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Opens a session offering permessage-deflate, sends `wire` as one compressed binary
/// message, and returns the close code wsgate answers with.
async fn send_bomb(addr: SocketAddr, path: &str, wire: &[u8]) -> Option<u16> {
    let (r, s) = upgrade_head(
        addr,
        upgrade_request(path, "Sec-WebSocket-Extensions: permessage-deflate\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 101, "{r:?}");
    assert!(!r.header("sec-websocket-extensions").is_empty());
    let (read, mut write) = s.into_split();
    let mut frame = client_frame(true, OpCode::Binary, wire, [1, 2, 3, 4]);
    frame[0] |= 0x40; // RSV1: compressed
                      // Written beside the read: wsgate closes as soon as the inflated size is over.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&frame).await;
        write
    });
    let mut read = tokio::io::BufReader::new(read);
    let code = within(
        "the close after the bomb",
        WAIT,
        read_until_close(&mut read),
    )
    .await;
    drop(writer.await);
    code
}

/// utime + stime of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After "(comm)": state is field 3; utime and stime are fields 14 and 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bomb_gets_1009_after_max_message_size_and_a_flood_stays_bounded() {
    const CLIENTS: usize = 100;
    // 1 GiB of zeros in about 1 MiB on the wire.
    let wire = std::sync::Arc::new(bomb(1024));
    assert!(wire.len() < 2 << 20, "{}", wire.len());
    // The flood goes through a bridge route (inflated bytes stream to a backend that drops
    // them); the echo route, which holds whole messages, gets one bomb first.
    let sink = backend(|mut s| async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let gate = GateProcess::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_message_size = \"4MiB\"\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{sink}\"\n"
    ));
    let pid = gate.child.id();
    assert_eq!(send_bomb(gate.addr, "/echo", &wire).await, Some(1009));
    assert_eq!(send_bomb(gate.addr, "/", &wire).await, Some(1009));
    let rss_before = gate.rss_kib();
    let cpu_before = cpu_ticks(pid);

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let wire = wire.clone();
        let addr = gate.addr;
        clients.push(tokio::spawn(
            async move { send_bomb(addr, "/", &wire).await },
        ));
    }
    let mut peak = 0;
    for c in clients {
        assert_eq!(
            within("a bomb's 1009", WAIT * 3, c).await.unwrap(),
            Some(1009)
        );
        peak = peak.max(gate.rss_kib());
    }
    let cpu = cpu_ticks(pid) - cpu_before;
    println!(
        "deflate bombs: {CLIENTS} × 1 GiB (1 MiB on the wire): RSS {rss_before} KiB before, peak seen {peak} KiB; CPU {} ms",
        cpu * 10
    );
    // Each bomb may inflate 4 MiB before its 1009 (and is read off the wire whole): a few
    // milliseconds each, where inflating 1 GiB would take about a second.
    assert!(cpu < 300, "{} ms of CPU for {CLIENTS} bombs", cpu * 10);
    assert!(
        peak < rss_before + 128 * 1024,
        "RSS grew from {rss_before} KiB to {peak} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_negotiates_deflate_and_its_messages_arrive_intact() {
    let chromium = chromium();
    let echo = echo_backend().await;
    let g = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/text\"\nbackend = \"tcp://{echo}\"\nmessage = \"text\"\n[[route]]\npath = \"/bin\"\nbackend = \"tcp://{echo}\"\n"
    ))
    .await;
    let base = format!("ws://{}", g.addr);
    let report = tokio::task::spawn_blocking(move || {
        let profile = TempDir::new();
        json_output(
            std::process::Command::new(python())
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/browser/deflate_driver.py"
                ))
                .arg(chromium)
                .arg(profile.path())
                .arg(base),
            Duration::from_secs(150),
        )
    })
    .await
    .unwrap();
    for kind in ["text", "binary"] {
        let r = &report[kind];
        assert!(
            r["extensions"]
                .as_str()
                .unwrap()
                .contains("permessage-deflate"),
            "{kind}: {report}"
        );
        assert_eq!(r["same"], true, "{kind}: {report}");
    }
    // wsgate's metrics: the browser's messages came in compressed and went out compressed.
    let metrics = parse_metrics(&g.handle.metrics_text());
    for route in ["/text", "/bin"] {
        let m = |direction: &str, form: &str| deflate_bytes(&metrics, route, direction, form);
        assert!(
            m("from_client", "uncompressed") >= (1 << 20) as f64,
            "{route}"
        );
        assert!(
            m("from_client", "compressed") < m("from_client", "uncompressed") / 2.0,
            "{route}: {metrics:?}"
        );
        assert!(
            m("to_client", "compressed") < m("to_client", "uncompressed") / 2.0,
            "{route}: {metrics:?}"
        );
    }
}

/// Sends `frame` (already masked) `times` times on a raw session to `path`, reading
/// everything wsgate sends meanwhile; returns the close code it ended with, if any.
async fn flood(addr: SocketAddr, path: &str, frame: Vec<u8>, times: usize) -> Option<u16> {
    let (r, s) = upgrade_head(
        addr,
        upgrade_request(path, "Sec-WebSocket-Extensions: permessage-deflate\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 101, "{r:?}");
    let (read, mut write) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..times {
            if write.write_all(&frame).await.is_err() {
                break;
            }
        }
        write
    });
    let mut read = tokio::io::BufReader::new(read);
    let code = within("the flood's end", 6 * WAIT, read_until_close(&mut read)).await;
    writer.abort();
    code
}

/// Regression: permessage-deflate bounded each message but not a session: 3.1 MB from a
/// client became 3.2 GB for a bridge backend (1028×). Past 64 MiB inflated, a session that
/// inflates over 256× what it sent compressed is closed with 1009, and the backend got no
/// more than the grace and one piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_inflates_over_256_times_is_closed_with_1009() {
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = received.clone();
    let sink = backend(move |mut s| {
        let counted = counted.clone();
        async move {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                if n == 0 {
                    break;
                }
                counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
    .await;
    let gate = Gate::start(&format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[limits]\nmax_message_size = \"4MiB\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://{sink}\"\n"
    ))
    .await;
    // 3 MiB of zeros in about 3 KiB: each message is within max_message_size.
    let wire = bomb(3);
    let mut frame = client_frame(true, OpCode::Binary, &wire, [9, 8, 7, 6]);
    frame[0] |= 0x40;
    // 40 messages would be 120 MiB for the backend.
    assert_eq!(flood(gate.addr, "/", frame, 40).await, Some(1009));
    let got = received.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        got <= (64 << 20) + (64 << 10),
        "the backend got {got} bytes"
    );
    assert!(got >= 60 << 20, "the grace was let through: {got}");
}

/// Regression: the echo route inflated and recompressed large messages on the async workers
/// without yielding, so two clients flooding compressible 8 MiB messages took both cores and
/// another client's echo went from 0.4 ms to 274 ms. Now inflating yields between pieces and
/// large messages are compressed on the blocking pool: that client's p99 stays under 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_flood_leaves_other_sessions_their_turn() {
    let gate = GateProcess::start(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/echo\"\nbackend = \"echo\"\n",
    );
    // Compressible like real data (about 4:1), 8 MiB.
    let mut text = Vec::with_capacity(8 << 20);
    let mut x: u64 = 7;
    while text.len() < 8 << 20 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.extend_from_slice(
            format!(
                "{{\"id\":{},\"value\":{},\"name\":\"user\"}}\n",
                x >> 44,
                x >> 52
            )
            .as_bytes(),
        );
    }
    let wire = deflated(&[&text[..]]);
    let mut frame = client_frame(true, OpCode::Binary, &wire, [1, 3, 5, 7]);
    frame[0] |= 0x40;
    let floods: Vec<_> = (0..2)
        .map(|_| tokio::spawn(flood(gate.addr, "/echo", frame.clone(), 1000)))
        .collect();
    let (mut probe, _) = within(
        "the probe session",
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/echo", gate.addr)),
    )
    .await
    .unwrap();
    // Bounded: 300 round trips, 10 ms apart.
    let mut rtts = Vec::with_capacity(300);
    for i in 0..300u32 {
        let sent = std::time::Instant::now();
        probe
            .send(Message::binary(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
        let echoed = within("the probe's echo", WAIT, probe.next()).await;
        assert_eq!(echoed.unwrap().unwrap().into_data(), &i.to_be_bytes()[..]);
        rtts.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for f in &floods {
        assert!(!f.is_finished(), "the flood went on for the whole probe");
        f.abort();
    }
    rtts.sort();
    let p99 = rtts[rtts.len() * 99 / 100];
    println!(
        "echo during a compression flood: p50 {:?}, p99 {p99:?}, max {:?}",
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
}
