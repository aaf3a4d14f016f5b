//! permessage-deflate (RFC 7692): the offer parsed and answered (§5–7), and the compressor
//! and decompressor around zlib-rs (through flate2). The framing around deflate is ours: RSV1
//! on a message's first frame, the `00 00 ff ff` tail taken off after compressing (§7.2.1)
//! and put back before inflating (§7.2.2).
//!
//! Memory is what decides the defaults. A zlib compressor costs about 256 KiB, far more than a
//! session's own state, so wsgate always answers `server_no_context_takeover` and compresses
//! each message with a compressor borrowed from a process-wide pool: an idle session holds no
//! compressor at all. The client's side is `client_no_context_takeover` by default too, so
//! inflaters are pooled the same way; with `compression_context_takeover = true` the client
//! keeps its context (better ratios for small messages) and each session keeps its inflater
//! (allocated at its first compressed message: ~10 KiB of state plus a window of
//! 2^`client_max_window_bits`, which wsgate asks to be at most `compression_window_bits` when
//! the client allows it).

use std::sync::Mutex;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use prometheus_client::metrics::counter::Counter;

/// The tail a sync flush ends with; taken off after compressing, put back to inflate.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Pooled compressors and decompressors kept for reuse, per kind (beyond this they are
/// dropped after use).
const POOL_MAX: usize = 32;

/// How wsgate answers offers, from `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Largest LZ77 window wsgate compresses with, and asks the client to keep to (9–15).
    pub window_bits: u8,
    /// Let the client keep its compression context between messages.
    pub context_takeover: bool,
    /// Messages to the client smaller than this are sent uncompressed.
    pub min_size: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            window_bits: 15,
            context_takeover: false,
            min_size: 64,
        }
    }
}

/// What a session agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The Sec-WebSocket-Extensions value of the 101.
    pub response: String,
    /// Window our compressor uses; 8 (which zlib cannot compress with) means every message
    /// goes uncompressed, which the extension allows.
    pub server_window_bits: u8,
    /// The client starts every message with an empty context.
    pub client_no_context_takeover: bool,
    /// Window our decompressor needs (the most the client may use).
    pub client_window_bits: u8,
    pub min_size: usize,
}

/// One offer's parameters, checked (§7.1).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: the parameter without a value (the client can take any value we name).
    client_max_window_bits: Option<Option<u8>>,
}

/// Picks the first acceptable permessage-deflate offer among the request's
/// Sec-WebSocket-Extensions values and says what wsgate answers; `None` declines (no
/// acceptable offer, or none at all). Offers with unknown, duplicated or malformed parameters
/// are declined, as §5 requires; other extensions are ignored.
pub fn negotiate<'a>(
    header_values: impl IntoIterator<Item = &'a str>,
    config: &DeflateConfig,
) -> Option<Agreed> {
    header_values
        .into_iter()
        .flat_map(split_list)
        .filter_map(|element| parse_offer(&element))
        .next()
        .map(|offer| answer(&offer, config))
}

fn answer(offer: &Offer, config: &DeflateConfig) -> Agreed {
    let mut response = String::from("permessage-deflate; server_no_context_takeover");
    let server_window_bits = match offer.server_max_window_bits {
        Some(asked) => {
            let bits = asked.min(config.window_bits);
            response += &format!("; server_max_window_bits={bits}");
            bits
        }
        None => config.window_bits,
    };
    let client_no_context_takeover = !config.context_takeover || offer.client_no_context_takeover;
    if client_no_context_takeover {
        response += "; client_no_context_takeover";
    }
    // With context takeover the session keeps an inflater: ask the client for a window no
    // bigger than the config's when it lets us name one. 8 is answered as 8, and inflated with
    // 9 (a bigger window decodes a smaller one's output; zlib has no 8).
    let client_window_bits = match offer.client_max_window_bits {
        Some(limit) if !client_no_context_takeover => {
            let bits = limit.unwrap_or(15).min(config.window_bits);
            if bits < 15 {
                response += &format!("; client_max_window_bits={bits}");
            }
            bits.max(9)
        }
        _ => 15,
    };
    Agreed {
        response,
        server_window_bits,
        client_no_context_takeover,
        client_window_bits,
        min_size: config.min_size,
    }
}

/// The elements of a comma-separated header value, commas inside quoted strings kept.
fn split_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        match c {
            _ if escaped => {
                current.push(c);
                escaped = false;
            }
            '\\' if quoted => {
                current.push(c);
                escaped = true;
            }
            '"' => {
                current.push(c);
                quoted = !quoted;
            }
            ',' if !quoted => out.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    out.push(current);
    out.into_iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect()
}

/// One list element as a permessage-deflate offer; `None` for other extensions and for
/// offers wsgate must decline.
fn parse_offer(element: &str) -> Option<Offer> {
    let mut parts = element.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut offer = Offer::default();
    let mut seen = Vec::new();
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (part, None),
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        match (name, value) {
            ("server_no_context_takeover", None) => offer.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => offer.client_no_context_takeover = true,
            ("server_max_window_bits", Some(v)) => {
                offer.server_max_window_bits = Some(window_bits(&v)?)
            }
            ("client_max_window_bits", None) => offer.client_max_window_bits = Some(None),
            ("client_max_window_bits", Some(v)) => {
                offer.client_max_window_bits = Some(Some(window_bits(&v)?))
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// A token or a quoted string's content; `None` when the quotes do not close.
fn unquote(v: &str) -> Option<String> {
    match v.strip_prefix('"') {
        None => Some(v.to_owned()),
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            let mut out = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' { chars.next()? } else { c });
            }
            Some(out)
        }
    }
}

/// 8–15, decimal, no leading zero (§7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// Bytes before and after compression, for `wsgate_deflate_bytes_total`.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub uncompressed: Counter,
    pub compressed: Counter,
}

static COMPRESSORS: Mutex<Vec<(u8, Compress)>> = Mutex::new(Vec::new());
static DECOMPRESSORS: Mutex<Vec<(u8, Decompress)>> = Mutex::new(Vec::new());

fn take<T>(pool: &Mutex<Vec<(u8, T)>>, bits: u8, make: impl FnOnce() -> T) -> T {
    let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    match pool.iter().position(|(b, _)| *b == bits) {
        Some(i) => pool.swap_remove(i).1,
        None => {
            drop(pool);
            make()
        }
    }
}

fn give_back<T>(pool: &Mutex<Vec<(u8, T)>>, bits: u8, item: T) {
    let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < POOL_MAX {
        pool.push((bits, item));
    }
}

/// Compresses whole messages to the client.
#[derive(Debug, Clone)]
pub struct Deflater {
    window_bits: u8,
    min_size: usize,
    tally: Tally,
}

impl Deflater {
    pub fn new(agreed: &Agreed, tally: Tally) -> Deflater {
        Deflater {
            window_bits: agreed.server_window_bits,
            min_size: agreed.min_size,
            tally,
        }
    }

    /// Compresses `payload` into `out` (cleared first) and returns true, or returns false
    /// when the message goes uncompressed: shorter than `min_size`, not made smaller by
    /// deflate (already compressed data), or a window of 8 agreed. A `min_size` of 0
    /// compresses every message, even one deflate makes a few bytes longer (some clients
    /// mishandle uncompressed messages in a compressed session).
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        let compressed = payload.len() >= self.min_size
            && self.window_bits >= 9
            && deflate(payload, self.window_bits, out)
            && (self.min_size == 0 || out.len() < payload.len());
        self.tally.uncompressed.inc_by(payload.len() as u64);
        self.tally
            .compressed
            .inc_by(if compressed { out.len() } else { payload.len() } as u64);
        compressed
    }
}

/// One message through a pooled compressor, sync-flushed, its tail taken off.
fn deflate(payload: &[u8], bits: u8, out: &mut Vec<u8>) -> bool {
    let mut c = take(&COMPRESSORS, bits, || {
        Compress::new_with_window_bits(Compression::default(), false, bits)
    });
    out.clear();
    out.reserve(payload.len() / 2 + 64);
    let mut input = payload;
    let ok = loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.len().max(1024));
        }
        let before = c.total_in();
        if c.compress_vec(input, out, FlushCompress::Sync).is_err() {
            break false;
        }
        input = &input[(c.total_in() - before) as usize..];
        // Done when all input is in and the flush did not fill the output.
        if input.is_empty() && out.len() < out.capacity() {
            break out.ends_with(&TAIL);
        }
    };
    if ok {
        out.truncate(out.len() - TAIL.len());
    }
    c.reset();
    give_back(&COMPRESSORS, bits, c);
    ok
}

/// Past this many inflated bytes in a session, the ratio to its compressed bytes is checked.
pub const AMPLIFICATION_GRACE: u64 = 64 << 20;

/// The most a session's inflated bytes may be of its compressed ones (zlib's ceiling is about
/// 1032:1; real data rarely passes 20:1): past it, the session is a decompression amplifier.
pub const MAX_AMPLIFICATION: u64 = 256;

/// Inflates the client's compressed messages, a bounded piece at a time.
#[derive(Debug)]
pub struct Inflater {
    /// This session's compressed bytes in, and what they inflated to.
    session_wire: u64,
    session_inflated: u64,
    window_bits: u8,
    /// The client keeps its context: so must we, for the whole session.
    takeover: bool,
    ctx: Option<Decompress>,
    /// The message held a final deflate block: the rest of it is ignored.
    ended: bool,
    tally: Tally,
}

/// The compressed data is not valid deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflateError;

/// What one call to [`Inflater::inflate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflated {
    /// Input bytes consumed.
    pub consumed: usize,
    /// The output room was filled: call again (even with no input) for more.
    pub more: bool,
}

impl Inflater {
    pub fn new(agreed: &Agreed, tally: Tally) -> Inflater {
        Inflater {
            session_wire: 0,
            session_inflated: 0,
            window_bits: agreed.client_window_bits,
            takeover: !agreed.client_no_context_takeover,
            ctx: None,
            ended: false,
            tally,
        }
    }

    /// The tail to feed after a message's last compressed byte (§7.2.2).
    pub fn tail() -> &'static [u8] {
        &TAIL
    }

    /// Inflates from `input` into `out`, adding at most `room` bytes (`out`'s spare capacity
    /// is filled, not zeroed first: pass a fresh or cleared vector).
    pub fn inflate(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        room: usize,
    ) -> Result<Inflated, InflateError> {
        if self.ended {
            self.session_wire += input.len() as u64;
            self.tally.compressed.inc_by(input.len() as u64);
            return Ok(Inflated {
                consumed: input.len(),
                more: false,
            });
        }
        let bits = self.window_bits;
        let ctx = self.ctx.get_or_insert_with(|| {
            take(&DECOMPRESSORS, bits, || {
                Decompress::new_with_window_bits(false, bits)
            })
        });
        out.reserve_exact(room);
        let (before_in, before_out) = (ctx.total_in(), ctx.total_out());
        let status = ctx.decompress_vec(input, out, FlushDecompress::Sync);
        let produced = (ctx.total_out() - before_out) as usize;
        let status = status.map_err(|_| InflateError)?;
        let consumed = (ctx.total_in() - before_in) as usize;
        self.session_wire += consumed as u64;
        self.session_inflated += produced as u64;
        self.tally.compressed.inc_by(consumed as u64);
        self.tally.uncompressed.inc_by(produced as u64);
        if status == Status::StreamEnd {
            // A final deflate block (BFINAL): whatever follows in this message, however it is
            // split over frames and reads, is ignored; the context starts afresh after it.
            self.ended = true;
            self.tally
                .compressed
                .inc_by((input.len() - consumed) as u64);
            return Ok(Inflated {
                consumed: input.len(),
                more: false,
            });
        }
        Ok(Inflated {
            consumed,
            // The spare room was filled: there may be more.
            more: produced > 0 && out.len() == out.capacity(),
        })
    }

    /// Whether this session has inflated more than [`MAX_AMPLIFICATION`] times what it
    /// received compressed, once past [`AMPLIFICATION_GRACE`]: a few MB on the wire must not
    /// become GBs for the backend (or the CPU).
    pub fn amplifies(&self) -> bool {
        self.session_inflated > AMPLIFICATION_GRACE
            && self.session_inflated > MAX_AMPLIFICATION.saturating_mul(self.session_wire)
    }

    /// The message is complete: without context takeover the decompressor goes back to the
    /// pool, so an idle session holds none.
    pub fn message_done(&mut self) {
        if std::mem::take(&mut self.ended) {
            if let Some(ctx) = self.ctx.as_mut() {
                ctx.reset(false);
            }
        }
        if !self.takeover {
            if let Some(mut ctx) = self.ctx.take() {
                ctx.reset(false);
                give_back(&DECOMPRESSORS, self.window_bits, ctx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agree(offer: &str) -> Option<Agreed> {
        negotiate([offer], &DeflateConfig::default())
    }

    #[test]
    fn offers_are_parsed_and_answered() {
        let a = agree("permessage-deflate").unwrap();
        assert_eq!(
            a.response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!((a.server_window_bits, a.client_window_bits), (15, 15));

        let a =
            agree("permessage-deflate; client_max_window_bits; server_max_window_bits=10").unwrap();
        assert!(
            a.response.contains("server_max_window_bits=10"),
            "{}",
            a.response
        );
        assert_eq!(a.server_window_bits, 10);

        // Quoted values, several offers: the first acceptable one wins.
        let a = agree(
            "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=7, permessage-deflate; server_max_window_bits=\"12\"",
        )
        .unwrap();
        assert_eq!(a.server_window_bits, 12);

        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown",
            "permessage-deflate; server_max_window_bits=\"10",
            "x-other",
        ] {
            assert_eq!(agree(bad), None, "{bad}");
        }
        assert_eq!(
            negotiate(Vec::<&str>::new(), &DeflateConfig::default()),
            None
        );
        // Across two header lines.
        let two = negotiate(
            ["permessage-deflate; bogus", "permessage-deflate"],
            &DeflateConfig::default(),
        );
        assert!(two.is_some());
    }

    #[test]
    fn context_takeover_and_client_window_when_configured() {
        let config = DeflateConfig {
            window_bits: 11,
            context_takeover: true,
            min_size: 0,
        };
        let a = negotiate(["permessage-deflate; client_max_window_bits"], &config).unwrap();
        assert_eq!(
            a.response,
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=11"
        );
        assert!(!a.client_no_context_takeover);
        assert_eq!((a.server_window_bits, a.client_window_bits), (11, 11));
        // Without client_max_window_bits in the offer, the client may use 15.
        let a = negotiate(["permessage-deflate"], &config).unwrap();
        assert_eq!(a.client_window_bits, 15);
        // The client asks to reset: granted.
        let a = negotiate(["permessage-deflate; client_no_context_takeover"], &config).unwrap();
        assert!(a.client_no_context_takeover);
        // 8 for the server: agreed, and every message goes uncompressed.
        let a = negotiate(["permessage-deflate; server_max_window_bits=8"], &config).unwrap();
        assert_eq!(a.server_window_bits, 8);
        let mut d = Deflater::new(&a, Tally::default());
        assert!(!d.compress(&[b'a'; 1000], &mut Vec::new()));
    }

    fn roundtrip(agreed: &Agreed, messages: &[Vec<u8>]) {
        let mut d = Deflater::new(agreed, Tally::default());
        let mut i = Inflater::new(agreed, Tally::default());
        for m in messages {
            let mut wire = Vec::new();
            if !d.compress(m, &mut wire) {
                continue;
            }
            let mut input: Vec<u8> = wire;
            input.extend_from_slice(Inflater::tail());
            let mut out = Vec::new();
            let mut at = 0;
            loop {
                let r = i.inflate(&input[at..], &mut out, 1000).unwrap();
                at += r.consumed;
                if at == input.len() && !r.more {
                    break;
                }
            }
            i.message_done();
            assert_eq!(&out, m);
        }
    }

    #[test]
    fn messages_round_trip() {
        let a = agree("permessage-deflate").unwrap();
        let text: Vec<u8> = "{\"type\":\"user\",\"message\":\"héllo\"}\n"
            .repeat(500)
            .into_bytes();
        roundtrip(&a, &[text.clone(), b"short".to_vec(), text]);
    }

    #[test]
    fn incompressible_and_small_messages_go_as_they_are() {
        let a = agree("permessage-deflate").unwrap();
        let tally = Tally::default();
        let mut d = Deflater::new(&a, tally.clone());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!d.compress(&noise, &mut Vec::new()));
        assert!(!d.compress(b"tiny", &mut Vec::new()));
        assert!(d.compress(&[b'z'; 4096], &mut Vec::new()));
        assert_eq!(tally.uncompressed.get(), 4096 + 4 + 4096);
        assert!(tally.compressed.get() < 4096 + 4 + 100);
        // min_size 0: every message compressed, the noise a little longer for it.
        let every = Agreed { min_size: 0, ..a };
        let mut d = Deflater::new(&every, Tally::default());
        let mut out = Vec::new();
        assert!(d.compress(&noise, &mut out));
        assert!(out.len() >= noise.len() && out.len() < noise.len() + 64);
        assert!(d.compress(b"", &mut out));
    }

    #[test]
    fn a_bomb_inflates_only_as_far_as_asked() {
        let a = agree("permessage-deflate").unwrap();
        let mut wire = Vec::new();
        let zeros = vec![0u8; 8 << 20];
        assert!(deflate(&zeros, 15, &mut wire));
        assert!(wire.len() < 16 << 10, "{}", wire.len());
        let mut i = Inflater::new(&a, Tally::default());
        let mut out = Vec::new();
        let r = i.inflate(&wire, &mut out, 64 << 10).unwrap();
        assert_eq!(out.len(), 64 << 10);
        assert!(r.more);
        assert!(out.capacity() <= 128 << 10, "{}", out.capacity());
        // The rest comes out a piece at a time, never more than asked for.
        let mut total = out.len();
        let mut at = r.consumed;
        loop {
            out.clear();
            let r = i.inflate(&wire[at..], &mut out, 64 << 10).unwrap();
            at += r.consumed;
            assert!(out.len() <= 64 << 10);
            total += out.len();
            if !r.more && at == wire.len() {
                break;
            }
        }
        assert_eq!(total, 8 << 20);
    }
}
