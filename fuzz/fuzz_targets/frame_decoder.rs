//! Arbitrary client bytes, fed to the decoder in pieces: it must never panic, never consume
//! bytes it did not use, and decode the same events whether fed at once or in pieces.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wsgate::protocol::decoder::{Decoder, Event};

fn run(data: &[u8], piece: usize) -> (Vec<Event>, Option<u16>) {
    let mut decoder = Decoder::new(1 << 16);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break,
                Err(v) => return (events, Some(v.code)),
            }
        }
    }
    (events, None)
}

/// Joins data pieces so that outputs from different read sizes compare equal.
fn normalise(events: Vec<Event>) -> Vec<(u8, Vec<u8>)> {
    let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
    for e in events {
        match e {
            Event::Data { payload, first, .. } => match out.last_mut() {
                Some((0, d)) if !first => d.extend_from_slice(&payload),
                _ => out.push((0, payload.to_vec())),
            },
            Event::Ping(p) => out.push((1, p.to_vec())),
            Event::Pong(p) => out.push((2, p.to_vec())),
            Event::Close(c) => out.push((3, format!("{c:?}").into_bytes())),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, data)) = data.split_first() else { return };
    let (whole, whole_err) = run(data, data.len());
    let (pieces, pieces_err) = run(data, usize::from(piece % 17) + 1);
    assert_eq!(whole_err, pieces_err);
    if whole_err.is_none() {
        assert_eq!(normalise(whole), normalise(pieces));
    }
});
