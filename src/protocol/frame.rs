//! RFC 6455 §5 frame codec: header parse and encode, opcodes, close codes, masking.
//!
//! Pure functions, no I/O. [`FrameHeader::parse`] never consumes anything: it either returns a
//! complete header with its length in bytes, or `Ok(None)` when more bytes are needed, so a read
//! that is cancelled or split anywhere restarts cleanly.

use std::fmt;

/// Largest header a frame can have: 2 + 8 (64-bit length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

/// Largest payload of a control frame (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcode (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// Decodes the low four bits of the first header byte; reserved opcodes are `None`.
    pub fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong: at most 125 bytes, never fragmented.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Why a frame header is not acceptable; every case is a protocol error (close 1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// RSV2 or RSV3 set, or RSV1 on a control frame (RSV1 on data frames is the decoder's
    /// call: it depends on the extension).
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF.
    ReservedOpcode(u8),
    /// Control frame with FIN clear.
    FragmentedControl,
    /// Control frame longer than 125 bytes.
    ControlTooLong,
    /// 64-bit length with the most significant bit set.
    LengthTopBit,
}

impl HeaderError {
    /// A short fixed reason, fit for a close frame.
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::ReservedBits => "reserved bits set",
            HeaderError::ReservedOpcode(_) => "reserved opcode",
            HeaderError::FragmentedControl => "fragmented control frame",
            HeaderError::ControlTooLong => "control frame over 125 bytes",
            HeaderError::LengthTopBit => "64-bit length with top bit set",
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            other => f.write_str(other.reason()),
        }
    }
}

/// A parsed frame header (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate; first frame of a data message
    /// only). RSV2 and RSV3 are never accepted.
    pub rsv1: bool,
    pub opcode: OpCode,
    /// Masking key; clients must always send one, servers never do.
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses a header at the start of `buf` without consuming anything.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold the whole header, and the header with its
    /// encoded length otherwise. Rules that can be checked from the first two bytes are checked
    /// as soon as those bytes are there, so a bad frame fails fast.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, HeaderError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x30 != 0 {
            return Err(HeaderError::ReservedBits);
        }
        let rsv1 = b0 & 0x40 != 0;
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(HeaderError::ReservedOpcode(b0 & 0x0F))?;
        if rsv1 && opcode.is_control() {
            return Err(HeaderError::ReservedBits);
        }
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(HeaderError::FragmentedControl);
            }
            if len7 > MAX_CONTROL_PAYLOAD as u8 {
                return Err(HeaderError::ControlTooLong);
            }
        }
        let len_bytes = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
        if buf.len() < header_len {
            return Ok(None);
        }
        let payload_len = match len7 {
            126 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(HeaderError::LengthTopBit);
                }
                len
            }
            n => u64::from(n),
        };
        let mask = masked.then(|| {
            let at = 2 + len_bytes;
            [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
        });
        Ok(Some((
            FrameHeader {
                fin,
                rsv1,
                opcode,
                mask,
                payload_len,
            },
            header_len,
        )))
    }

    /// Encodes the header into `out` using the minimal length form; returns the bytes written.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (u8::from(self.fin) << 7) | (u8::from(self.rsv1) << 6) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut at = match self.payload_len {
            n @ 0..=125 => {
                out[1] = mask_bit | n as u8;
                2
            }
            n @ 126..=0xFFFF => {
                out[1] = mask_bit | 126;
                out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                4
            }
            n => {
                out[1] = mask_bit | 127;
                out[2..10].copy_from_slice(&n.to_be_bytes());
                10
            }
        };
        if let Some(key) = self.mask {
            out[at..at + 4].copy_from_slice(&key);
            at += 4;
        }
        at
    }
}

/// A whole frame: header in the minimal length form, then the payload, masked when `mask` is
/// given (client frames). For tests, fuzzing and load tools; the server's own writer sends
/// header and payload without copying them together.
pub fn encode_frame(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = FrameHeader {
        fin,
        rsv1: false,
        opcode,
        mask,
        payload_len: payload.len() as u64,
    }
    .encode(&mut header);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[n..], key, 0);
    }
    out
}

/// XORs `buf` with the masking key, `offset` being the position of `buf[0]` within the payload
/// (so a payload unmasked in pieces across reads comes out right).
///
/// Works eight bytes at a time; the compiler turns the loop into vector instructions.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let mut key = key;
    key.rotate_left(offset % 4);
    let key8 = [
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ];
    let key64 = u64::from_ne_bytes(key8);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ key64).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// The plain byte-by-byte mask, kept as the reference the fast one is tested against.
pub fn apply_mask_bytewise(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(offset + i) % 4];
    }
}

/// Close status codes wsgate sends (§7.4.1, plus 1014 from the IANA registry), and the two
/// reserved ones it reports.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const BAD_GATEWAY: u16 = 1014;
    /// Never on the wire: stands for "the close frame had no code" in logs and metrics.
    pub const NO_STATUS: u16 = 1005;
    /// Never on the wire: stands for "no close frame at all" in logs and metrics.
    pub const ABNORMAL: u16 = 1006;
}

/// Whether a peer may send `code` in a close frame (§7.4; 1004-1006 and 1015 are reserved for
/// local use and never appear on the wire).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Why a close frame's payload is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosePayloadError {
    /// One byte, or a code that may not be sent: close 1002.
    BadCode,
    /// Reason is not UTF-8: close 1007.
    BadReason,
}

/// Parses a close frame's (unmasked) payload into its code and reason; empty means no code.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, ClosePayloadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ClosePayloadError::BadCode),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ClosePayloadError::BadCode);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ClosePayloadError::BadReason)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Builds a close payload, cutting the reason at a character boundary so the frame stays within
/// 125 bytes.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = FrameHeader {
            fin,
            rsv1: false,
            opcode,
            mask,
            payload_len: len,
        }
        .encode(&mut out);
        out[..n].to_vec()
    }

    /// Sample servers parse the 7-bit length as `b2 | 0x7f`; a length of 5 must read as 5.
    #[test]
    fn seven_bit_length_is_not_or_ed_with_0x7f() {
        let (h, n) = FrameHeader::parse(&[0x81, 0x85, 1, 2, 3, 4])
            .unwrap()
            .unwrap();
        assert_eq!(h.payload_len, 5);
        assert_eq!(n, 6);
        assert_eq!(h.mask, Some([1, 2, 3, 4]));
    }

    /// The length forms switch exactly at 125/126 and 65535/65536, and we emit the minimal one.
    #[test]
    fn length_forms_at_their_boundaries() {
        for (len, header_len) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let bytes = header(true, OpCode::Binary, None, len);
            assert_eq!(bytes.len(), header_len, "len {len}");
            let (h, n) = FrameHeader::parse(&bytes).unwrap().unwrap();
            assert_eq!((h.payload_len, n), (len, header_len));
        }
        assert_eq!(header(true, OpCode::Binary, None, 126)[1], 126);
        assert_eq!(header(true, OpCode::Binary, None, 65536)[1], 127);
    }

    #[test]
    fn partial_header_needs_more_and_consumes_nothing() {
        let bytes = header(true, OpCode::Binary, Some([9, 8, 7, 6]), 70_000);
        for cut in 0..bytes.len() {
            assert_eq!(FrameHeader::parse(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(FrameHeader::parse(&bytes).unwrap().is_some());
    }

    #[test]
    fn rejects_what_the_rfc_forbids() {
        // RSV1 on a data frame is the extension's (the decoder decides); RSV2/RSV3 never;
        // RSV1 never on a control frame.
        let (h, _) = FrameHeader::parse(&[0xC1, 0x80, 1, 2, 3, 4])
            .unwrap()
            .unwrap();
        assert!(h.rsv1);
        for bad in [[0xA1, 0x80], [0x91, 0x80], [0xC9, 0x80], [0xC8, 0x80]] {
            assert_eq!(FrameHeader::parse(&bad), Err(HeaderError::ReservedBits));
        }
        assert_eq!(
            FrameHeader::parse(&[0x83, 0x80]),
            Err(HeaderError::ReservedOpcode(3))
        );
        assert_eq!(
            FrameHeader::parse(&[0x8B, 0x80]),
            Err(HeaderError::ReservedOpcode(0xB))
        );
        assert_eq!(
            FrameHeader::parse(&[0x09, 0x80]),
            Err(HeaderError::FragmentedControl)
        );
        assert_eq!(
            FrameHeader::parse(&[0x89, 0xFE]),
            Err(HeaderError::ControlTooLong)
        );
        let mut top = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        top.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(FrameHeader::parse(&top), Err(HeaderError::LengthTopBit));
    }

    #[test]
    fn fast_mask_matches_bytewise_at_every_alignment_and_offset() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..16 {
            for len in [0, 1, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 200] {
                for offset in 0..4 {
                    let mut fast = data[start..start + len].to_vec();
                    let mut slow = fast.clone();
                    apply_mask(&mut fast, key, offset);
                    apply_mask_bytewise(&mut slow, key, offset);
                    assert_eq!(fast, slow, "start {start} len {len} offset {offset}");
                }
            }
        }
    }

    /// Masks applied in pieces (as reads split a payload) equal one mask over the whole.
    #[test]
    fn mask_offset_carries_across_partial_reads() {
        let key = [1, 2, 3, 4];
        let whole: Vec<u8> = (0..100u8).collect();
        let mut once = whole.clone();
        apply_mask(&mut once, key, 0);
        for cut in 0..whole.len() {
            let mut pieces = whole.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            assert_eq!(pieces, once, "cut at {cut}");
        }
    }

    #[test]
    fn close_codes() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(is_valid_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!is_valid_close_code(bad), "{bad}");
        }
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(parse_close_payload(&[3]), Err(ClosePayloadError::BadCode));
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, b'o', b'k']),
            Ok(Some((1000, "ok")))
        );
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, 0xFF]),
            Err(ClosePayloadError::BadReason)
        );
        assert_eq!(
            parse_close_payload(&[0x03, 0xED]),
            Err(ClosePayloadError::BadCode)
        );
    }

    #[test]
    fn close_payload_stays_within_a_control_frame() {
        let long = "é".repeat(100);
        let p = close_payload(1001, &long);
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
