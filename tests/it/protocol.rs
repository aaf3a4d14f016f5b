//! RFC 6455 framing on the wire, with raw frames against the echo route: one regression test
//! per classic mistake of the sample servers wsgate replaces, and each close code.

use crate::common::*;
use tokio::io::AsyncWriteExt;
use wsgate::protocol::frame::{close_payload, OpCode};

const KEY4: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

async fn echo_gate(limits: &str) -> Gate {
    Gate::route("/", "echo", limits, "").await
}

/// Sample servers read the 7-bit length as `b2 | 0x7f`, so every short frame looks 127 long.
#[tokio::test]
async fn seven_bit_length_is_read_as_is_not_or_ed_with_0x7f() {
    let g = echo_gate("").await;
    let mut ws = raw_ws(g.addr, "/").await;
    ws.write_all(&client_frame(true, OpCode::Text, b"Hello", KEY4))
        .await
        .unwrap();
    let f = read_frame(&mut ws).await.unwrap();
    assert_eq!(
        (f.opcode, f.payload.as_slice(), f.fin),
        (OpCode::Text, &b"Hello"[..], true)
    );
    assert_eq!(f.header_len, 2);
}

/// 125, 126, 65535 and 65536 bytes sit at the length-form boundaries; each must round-trip
/// and come back in the minimal form (2, 4, 4, 10 header bytes).
#[tokio::test]
async fn length_forms_at_125_126_65535_65536() {
    let g = echo_gate("").await;
    let mut ws = raw_ws(g.addr, "/").await;
    for (len, header_len) in [(125, 2), (126, 4), (65535, 4), (65536, 10)] {
        let data = pattern(len, len as u64);
        ws.write_all(&client_frame(true, OpCode::Binary, &data, KEY4))
            .await
            .unwrap();
        let f = read_frame(&mut ws).await.unwrap();
        assert_eq!(f.payload.len(), len);
        assert!(f.payload == data, "len {len}");
        assert_eq!(f.header_len, header_len, "minimal length form for {len}");
    }
}

/// Sample servers answer a ping with a ping; it must be a pong with the same payload.
#[tokio::test]
async fn ping_is_answered_with_pong_not_ping() {
    let g = echo_gate("").await;
    let mut ws = raw_ws(g.addr, "/").await;
    ws.write_all(&client_frame(true, OpCode::Ping, b"are you there", KEY4))
        .await
        .unwrap();
    let f = read_frame(&mut ws).await.unwrap();
    assert_eq!(f.opcode, OpCode::Pong);
    assert_eq!(f.payload, b"are you there");
}

/// Sample servers split a >125-byte message into unrelated frames; a message must come back
/// as one message, however the client fragmented it.
#[tokio::test]
async fn message_over_125_bytes_is_not_split_into_unrelated_frames() {
    let g = echo_gate("").await;
    let mut ws = raw_ws(g.addr, "/").await;
    let data = pattern(1000, 5);
    let mut bytes = client_frame(false, OpCode::Binary, &data[..400], KEY4);
    bytes.extend(client_frame(true, OpCode::Ping, b"mid", KEY4));
    bytes.extend(client_frame(true, OpCode::Continuation, &data[400..], KEY4));
    ws.write_all(&bytes).await.unwrap();
    let pong = read_frame(&mut ws).await.unwrap();
    assert_eq!(pong.opcode, OpCode::Pong);
    let mut got = Vec::new();
    let first = read_frame(&mut ws).await.unwrap();
    assert_eq!(first.opcode, OpCode::Binary);
    got.extend(first.payload);
    let mut fin = first.fin;
    while !fin {
        let f = read_frame(&mut ws).await.unwrap();
        assert_eq!(
            f.opcode,
            OpCode::Continuation,
            "a fragment, not a new message"
        );
        got.extend(f.payload);
        fin = f.fin;
    }
    assert!(got == data);
}

/// Sample servers accept unmasked client frames; that is a protocol error (1002).
#[tokio::test]
async fn unmasked_client_frame_is_closed_with_1002() {
    let g = echo_gate("").await;
    let mut ws = raw_ws(g.addr, "/").await;
    ws.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(read_until_close(&mut ws).await, Some(1002));
    assert!(
        expect_eof(&mut ws).await,
        "the connection is closed after a protocol error"
    );
}

/// Sample servers restart the mask at each read; a frame written one byte at a time must
/// unmask exactly as the same frame written at once.
#[tokio::test]
async fn mask_offset_survives_partial_reads() {
    let g = echo_gate("").await;
    let mut ws = raw_ws(g.addr, "/").await;
    let data = pattern(300, 9);
    let frame = client_frame(true, OpCode::Binary, &data, KEY4);
    for b in &frame {
        ws.write_all(std::slice::from_ref(b)).await.unwrap();
        ws.flush().await.unwrap();
    }
    let f = read_frame(&mut ws).await.unwrap();
    assert!(f.payload == data);
    // And many frames in one write.
    let mut many = Vec::new();
    for i in 0..50u8 {
        many.extend(client_frame(true, OpCode::Binary, &[i; 3], KEY4));
    }
    ws.write_all(&many).await.unwrap();
    for i in 0..50u8 {
        assert_eq!(read_frame(&mut ws).await.unwrap().payload, vec![i; 3]);
    }
}

async fn expect_close_code(frames: Vec<u8>, limits: &str, code: u16) {
    let g = echo_gate(limits).await;
    let mut ws = raw_ws(g.addr, "/").await;
    ws.write_all(&frames).await.unwrap();
    assert_eq!(read_until_close(&mut ws).await, Some(code));
    assert!(expect_eof(&mut ws).await);
}

#[tokio::test]
async fn protocol_violations_are_1002() {
    let rsv = {
        let mut f = client_frame(true, OpCode::Text, b"x", KEY4);
        f[0] |= 0x40;
        f
    };
    let reserved_opcode = {
        let mut f = client_frame(true, OpCode::Text, b"x", KEY4);
        f[0] = 0x80 | 0x3;
        f
    };
    let fragmented_ping = client_frame(false, OpCode::Ping, b"x", KEY4);
    let long_ping = client_frame(true, OpCode::Ping, &[0u8; 126], KEY4);
    let lone_continuation = client_frame(true, OpCode::Continuation, b"x", KEY4);
    let mut nested = client_frame(false, OpCode::Text, b"a", KEY4);
    nested.extend(client_frame(true, OpCode::Text, b"b", KEY4));
    let top_bit = {
        let mut f = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1];
        f.extend_from_slice(&KEY4);
        f
    };
    let bad_close_code = client_frame(true, OpCode::Close, &close_payload(1005, ""), KEY4);
    let one_byte_close = client_frame(true, OpCode::Close, &[1], KEY4);
    for (name, frames) in [
        ("rsv", rsv),
        ("reserved opcode", reserved_opcode),
        ("fragmented ping", fragmented_ping),
        ("126-byte ping", long_ping),
        ("lone continuation", lone_continuation),
        ("nested message", nested),
        ("64-bit length top bit", top_bit),
        ("close code 1005", bad_close_code),
        ("1-byte close", one_byte_close),
    ] {
        eprintln!("case: {name}");
        expect_close_code(frames, "", 1002).await;
    }
}

#[tokio::test]
async fn invalid_utf8_is_1007() {
    expect_close_code(
        client_frame(true, OpCode::Text, b"ok\xC0\xAF", KEY4),
        "",
        1007,
    )
    .await;
    let mut split = client_frame(false, OpCode::Text, "€".as_bytes().get(..2).unwrap(), KEY4);
    split.extend(client_frame(true, OpCode::Continuation, b"", KEY4));
    expect_close_code(split, "", 1007).await;
    let mut reason = vec![0x03, 0xE8];
    reason.extend_from_slice(b"\xFF");
    expect_close_code(client_frame(true, OpCode::Close, &reason, KEY4), "", 1007).await;
}

#[tokio::test]
async fn message_over_max_message_size_is_1009() {
    // Announced by one frame header: refused before its payload arrives.
    let header_only = {
        let mut f = vec![0x82, 0xFF, 0, 0, 0, 0, 0x10, 0, 0, 0];
        f.extend_from_slice(&KEY4);
        f
    };
    expect_close_code(header_only, "max_message_size = \"1KiB\"", 1009).await;
    // Reached across fragments.
    let mut fragments = client_frame(false, OpCode::Binary, &[0; 800], KEY4);
    fragments.extend(client_frame(true, OpCode::Continuation, &[0; 800], KEY4));
    expect_close_code(fragments, "max_message_size = \"1KiB\"", 1009).await;
}

#[tokio::test]
async fn close_handshake_from_client_is_answered_and_tcp_closed() {
    let g = echo_gate("").await;
    let mut ws = raw_ws(g.addr, "/").await;
    ws.write_all(&client_frame(
        true,
        OpCode::Close,
        &close_payload(1000, "done"),
        KEY4,
    ))
    .await
    .unwrap();
    assert_eq!(read_until_close(&mut ws).await, Some(1000));
    assert!(expect_eof(&mut ws).await);
}
