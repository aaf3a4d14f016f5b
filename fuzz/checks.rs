//! The fuzz targets' bodies, one function each. The cargo-fuzz targets call them, and
//! `tests/it/fuzz_corpus.rs` replays every committed corpus file through them on stable, so the
//! corpus keeps being checked in CI.
//!
//! Each function panics when the code under test misbehaves; any other outcome is fine.

use std::path::Path;

use bytes::BytesMut;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Version};
use wsgate::protocol::decoder::{Decoder, Event};
use wsgate::protocol::handshake;
use wsgate::route::{Backend, MessageMode, Route};
use wsgate::Config;

fn decode_in_pieces(data: &[u8], piece: usize) -> (Vec<Event>, Option<u16>) {
    decode_with(Decoder::new(1 << 16), data, piece)
}

fn decode_with(mut decoder: Decoder, data: &[u8], piece: usize) -> (Vec<Event>, Option<u16>) {
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

/// The largest message the inflate check allows.
const INFLATE_MAX: u64 = 1 << 16;

fn inflating_decoder() -> Decoder {
    use wsgate::protocol::deflate::{negotiate, DeflateConfig, Inflater, Tally};
    let agreed = negotiate(["permessage-deflate"], &DeflateConfig::default())
        .expect("the plain offer is accepted");
    Decoder::with_inflater(INFLATE_MAX, Inflater::new(&agreed, Tally::default()))
}

/// Arbitrary bytes as the payload of one compressed (RSV1) binary message, split over two
/// frames at a point the second byte picks, fed whole and in pieces (the first byte picks
/// their size) to a decoder that agreed on permessage-deflate: never a panic, both agree,
/// and no message inflates past the limit.
pub fn inflate(data: &[u8]) {
    let [piece, split, payload @ ..] = data else {
        return;
    };
    let at = usize::from(*split) * payload.len() / 256;
    let mut frames = wsgate::protocol::frame::encode_frame(
        false,
        wsgate::protocol::frame::OpCode::Binary,
        Some([1, 2, 3, 4]),
        &payload[..at],
    );
    frames[0] |= 0x40;
    frames.extend(wsgate::protocol::frame::encode_frame(
        true,
        wsgate::protocol::frame::OpCode::Continuation,
        Some([5, 6, 7, 8]),
        &payload[at..],
    ));
    let (whole, whole_err) = decode_with(inflating_decoder(), &frames, frames.len());
    let (pieces, pieces_err) =
        decode_with(inflating_decoder(), &frames, usize::from(piece % 17) + 1);
    // Both readings fail or neither does. Which rule is hit first may differ: a message
    // that is both too big and corrupt can get 1009 or 1002 depending on how much of it was
    // inflated in one call.
    assert_eq!(whole_err.is_some(), pieces_err.is_some());
    let (whole, pieces) = (normalise(whole), normalise(pieces));
    for (_, message) in whole.iter().chain(&pieces) {
        assert!(
            message.len() as u64 <= INFLATE_MAX + 1,
            "inflated past the limit"
        );
    }
    match (whole_err, pieces_err) {
        // Without a violation both readings give the same messages (before one, how far
        // each got may differ).
        (None, _) => assert!(whole == pieces, "whole and pieces disagree"),
        (Some(a), Some(b)) => {
            for code in [a, b] {
                assert!([1002, 1007, 1009].contains(&code), "close {code}");
            }
        }
        (Some(_), None) => unreachable!("checked above"),
    }
}

/// Arbitrary client bytes, fed to the decoder whole and in pieces (the first byte picks the
/// piece size): it must never panic, and both must agree on the events and on the violation.
pub fn frame_decoder(data: &[u8]) {
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let (whole, whole_err) = decode_in_pieces(data, data.len());
    let (pieces, pieces_err) = decode_in_pieces(data, usize::from(piece % 17) + 1);
    assert_eq!(whole_err, pieces_err);
    if whole_err.is_none() {
        assert_eq!(normalise(whole), normalise(pieces));
    }
}

/// Arbitrary request heads (method, version, header lines) through the RFC 6455 checks: never
/// a panic, and an accepted handshake always carries a well-formed accept key and one of the
/// route's subprotocols.
pub fn handshake_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = Method::from_bytes(parts.next().unwrap_or("").as_bytes()).unwrap_or(Method::GET);
    let version = match parts.nth(1) {
        Some("HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.trim().as_bytes()),
                HeaderValue::from_bytes(value.trim().as_bytes()),
            ) {
                headers.append(n, v);
            }
        }
    }
    let route = Route::new(
        "/",
        Backend::Echo,
        vec!["binary".into(), "chat".into()],
        vec!["https://ok.example".into()],
        MessageMode::Binary,
    );
    match handshake::check(&method, version, &headers, &route) {
        Ok(accepted) => {
            assert_eq!(accepted.accept.len(), 28);
            assert!(accepted
                .protocol
                .as_deref()
                .is_some_and(|p| p == "binary" || p == "chat"));
        }
        Err(rejection) => assert!(!rejection.reason.is_empty()),
    }
}

/// Arbitrary text as a config file: never a panic; a refusal always says what is wrong.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, "fuzz.toml", Path::new("/nonexistent-wsgate-fuzz")) {
        Ok(config) => {
            assert!(!config.listen.is_empty());
            assert!(!config.routes.routes().is_empty());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Arbitrary bytes as the start of a connection on a `proxy_protocol` listener: never a
/// panic; a header found is found the same way in any longer buffer, and every shorter prefix
/// of it asks for more bytes (the reader relies on both to read exactly the header).
pub fn proxy_header(data: &[u8]) {
    use wsgate::proxy_protocol::parse;
    if let Ok(Some((header, len))) = parse(data) {
        assert!(len > 0 && len <= data.len());
        assert_eq!(parse(&data[..len]), Ok(Some((header, len))));
        for cut in [0, 1, len / 2, len - 1] {
            assert_eq!(
                parse(&data[..cut.min(len - 1)]),
                Ok(None),
                "prefix of {cut}"
            );
        }
    }
}

/// Arbitrary bytes as a request path: never a panic; a canonical form is canonical again
/// unchanged, merges slashes, holds no dot segment, and no escape in it decodes to a
/// separator, a control byte or a dot.
pub fn request_path(data: &[u8]) {
    use wsgate::edge::path::canonical;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = canonical(text) {
        let again = canonical(&c).expect("a canonical path is canonical");
        assert_eq!(again, c);
        assert!(c.starts_with('/') && !c.contains("//"));
        assert!(c.split('/').all(|s| s != "." && s != ".."));
        let upper = c.to_ascii_uppercase();
        for hidden in ["%2F", "%5C", "%00", "%2E", "%7F", "%252E", "%252F"] {
            assert!(!upper.contains(hidden), "{c:?} holds {hidden}");
        }
    }
}

/// Arbitrary bytes as a token file: never a panic; every target found is `host:port` with a
/// port, and the lines reported bad are numbered inside the file.
pub fn token_file(data: &[u8]) {
    let mut targets = std::collections::HashMap::new();
    let bad = wsgate::token_file::parse(data, &mut targets);
    let lines = data.split(|&b| b == b'\n').count();
    assert!(
        bad.iter().all(|&n| n >= 1 && n <= lines),
        "{bad:?} of {lines}"
    );
    for target in targets.values() {
        let (host, port) = target.rsplit_once(':').expect("host:port");
        assert!(
            !host.is_empty() && port.parse::<u16>().is_ok(),
            "{target:?}"
        );
    }
}

/// Arbitrary bytes as htpasswd and bearer files: never a panic; a refusal names a line
/// inside the file.
pub fn auth_files(data: &[u8]) {
    use wsgate::auth::{AuthFileError, BearerTokens, Htpasswd};
    let lines = data.split(|&b| b == b'\n').count();
    for err in [Htpasswd::parse(data).err(), BearerTokens::parse(data).err()]
        .into_iter()
        .flatten()
    {
        let line = match &err {
            AuthFileError::NotUserHash { line }
            | AuthFileError::NotUtf8 { line }
            | AuthFileError::BadToken { line }
            | AuthFileError::NotBcrypt { line, .. }
            | AuthFileError::CostTooHigh { line, .. }
            | AuthFileError::DuplicateUser { line, .. } => *line,
            AuthFileError::Empty => 1,
        };
        assert!(line >= 1 && line <= lines, "{err} of {lines}");
    }
}

/// Arbitrary bytes as a Redis value and as JWT claims: never a panic; a target found is
/// `host:port` with a port.
pub fn token_values(data: &[u8]) {
    let check = |target: &str| {
        let (host, port) = target.rsplit_once(':').expect("host:port");
        assert!(
            !host.is_empty() && port.parse::<u16>().is_ok(),
            "{target:?}"
        );
    };
    if let Ok(target) = wsgate::targets::redis::parse_value(data) {
        check(&target);
    }
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(target) = wsgate::targets::jwt::claims_target(&claims) {
            check(&target);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wsgate::targets::redis::parse_source(text);
    }
}
