//! [`Decoder`]: client frames in, message events out.
//!
//! A pure state machine over a byte buffer: it turns client frames into [`Event`]s, streaming
//! data payloads out as they arrive (a message is never buffered whole), and enforces every §5
//! rule with the close code it calls for.

use bytes::{Buf, Bytes, BytesMut};

use super::deflate::Inflater;
use super::frame::{
    apply_mask, close_code, parse_close_payload, ClosePayloadError, FrameHeader, OpCode,
};
use super::utf8::Utf8Validator;
use crate::session_end::SessionEnd;

/// Data message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

/// What the client sent, as the bridge needs it.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A piece of a data message, already unmasked (and UTF-8-checked for text so far).
    /// `first` marks the message's first piece, `fin` its last; every data frame yields at
    /// least one piece, so an empty frame still shows up.
    Data {
        kind: MessageKind,
        payload: Bytes,
        first: bool,
        fin: bool,
    },
    Ping(Bytes),
    Pong(Bytes),
    /// A valid close frame: its code (if any) and reason.
    Close(Option<(u16, String)>),
}

/// A rule the client broke: the close code to send, a short reason, and how the session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
    pub end: SessionEnd,
}

impl Violation {
    fn protocol(reason: &'static str) -> Self {
        Violation {
            code: close_code::PROTOCOL_ERROR,
            reason,
            end: SessionEnd::ProtocolError,
        }
    }

    fn invalid_utf8(reason: &'static str) -> Self {
        Violation {
            code: close_code::INVALID_PAYLOAD,
            reason,
            end: SessionEnd::InvalidUtf8,
        }
    }

    fn too_big() -> Self {
        Violation {
            code: close_code::MESSAGE_TOO_BIG,
            reason: "message too big",
            end: SessionEnd::MessageTooBig,
        }
    }

    fn amplified() -> Self {
        Violation {
            code: close_code::MESSAGE_TOO_BIG,
            reason: "compressed messages inflate too much",
            end: SessionEnd::MessageTooBig,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Waiting for a frame header.
    Header,
    /// Inside a data frame's payload.
    Payload {
        remaining: u64,
        mask: [u8; 4],
        offset: usize,
        fin: bool,
    },
    /// A control frame whose whole payload must be buffered before it is acted on.
    Control { header: FrameHeader },
}

/// Decodes client frames from a buffer the caller fills; see [`Decoder::decode`].
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Type of the message in progress, if one was started and not finished.
    message: Option<MessageKind>,
    /// True until the message in progress has produced its first piece.
    first_pending: bool,
    message_len: u64,
    max_message_size: u64,
    utf8: Utf8Validator,
    /// permessage-deflate, when the session agreed on it.
    inflater: Option<Inflater>,
    /// The message in progress is compressed (RSV1 on its first frame).
    compressed: bool,
    /// Bytes the compressed message in progress inflated to so far.
    inflated_len: u64,
    /// Compressed input received and not yet inflated.
    pending: Option<Pending>,
}

/// A compressed message's input waiting to be inflated, a bounded piece per event.
#[derive(Debug)]
struct Pending {
    input: Bytes,
    /// This input ends the message: the §7.2.2 tail follows it.
    message_fin: bool,
    tail_fed: bool,
    /// The inflater has more output for what it was given.
    more: bool,
}

/// Most bytes one inflated data event carries.
const INFLATE_PIECE: u64 = 64 * 1024;

impl Decoder {
    pub fn new(max_message_size: u64) -> Self {
        Decoder {
            state: State::Header,
            message: None,
            first_pending: false,
            message_len: 0,
            max_message_size,
            utf8: Utf8Validator::default(),
            inflater: None,
            compressed: false,
            inflated_len: 0,
            pending: None,
        }
    }

    /// A decoder for a session that agreed on permessage-deflate: messages with RSV1 are
    /// inflated, and what they inflate to counts against `max_message_size` as it comes out.
    pub fn with_inflater(max_message_size: u64, inflater: Inflater) -> Self {
        Decoder {
            inflater: Some(inflater),
            ..Decoder::new(max_message_size)
        }
    }

    /// How many more bytes the decoder wants buffered before it can make progress, when that
    /// is known (a control frame's payload), so the caller can size its read.
    pub fn wants(&self) -> usize {
        match &self.state {
            State::Control { header } => header.payload_len as usize,
            _ => 0,
        }
    }

    /// Takes the next event out of `buf`, consuming exactly the bytes it used.
    ///
    /// Returns `Ok(None)` when `buf` holds no further complete event; bytes of an incomplete
    /// header are left in place, so this can be called again after more bytes were appended
    /// (cancel-safe by construction: it does no I/O).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, Violation> {
        loop {
            if self.pending.is_some() {
                if let Some(event) = self.inflate_piece()? {
                    return Ok(Some(event));
                }
            }
            match self.state {
                State::Header => {
                    let Some((header, header_len)) =
                        FrameHeader::parse(buf).map_err(|e| Violation::protocol(e.reason()))?
                    else {
                        return Ok(None);
                    };
                    let Some(mask) = header.mask else {
                        return Err(Violation::protocol("client frame not masked"));
                    };
                    match header.opcode {
                        OpCode::Close | OpCode::Ping | OpCode::Pong => {
                            buf.advance(header_len);
                            self.state = State::Control { header };
                            continue;
                        }
                        OpCode::Continuation if self.message.is_none() => {
                            return Err(Violation::protocol("continuation without a message"));
                        }
                        OpCode::Continuation if header.rsv1 => {
                            return Err(Violation::protocol("RSV1 set on a continuation frame"));
                        }
                        OpCode::Text | OpCode::Binary if header.rsv1 && self.inflater.is_none() => {
                            return Err(Violation::protocol("reserved bits set"));
                        }
                        OpCode::Text | OpCode::Binary if self.message.is_some() => {
                            return Err(Violation::protocol("new message inside a fragmented one"));
                        }
                        OpCode::Text | OpCode::Binary => {
                            self.message = Some(if header.opcode == OpCode::Text {
                                MessageKind::Text
                            } else {
                                MessageKind::Binary
                            });
                            self.first_pending = true;
                            self.message_len = 0;
                            self.compressed = header.rsv1;
                            self.inflated_len = 0;
                            self.utf8.reset();
                        }
                        OpCode::Continuation => {}
                    }
                    self.message_len = self.message_len.saturating_add(header.payload_len);
                    // A compressed message may be a little longer on the wire than what it
                    // inflates to (stored blocks); what it inflates to is checked as it comes.
                    let limit = match self.compressed {
                        true => self.max_message_size + self.max_message_size / 256 + 1024,
                        false => self.max_message_size,
                    };
                    if self.message_len > limit {
                        return Err(Violation::too_big());
                    }
                    buf.advance(header_len);
                    self.state = State::Payload {
                        remaining: header.payload_len,
                        mask,
                        offset: 0,
                        fin: header.fin,
                    };
                    if header.payload_len == 0 {
                        match self.data_piece(Bytes::new())? {
                            Some(event) => return Ok(Some(event)),
                            None => continue,
                        }
                    }
                }
                State::Payload {
                    remaining,
                    mask,
                    offset,
                    fin,
                } => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = remaining.min(buf.len() as u64) as usize;
                    let mut piece = buf.split_to(take);
                    apply_mask(&mut piece, mask, offset);
                    self.state = State::Payload {
                        remaining: remaining - take as u64,
                        mask,
                        offset: offset + take,
                        fin,
                    };
                    match self.data_piece(piece.freeze())? {
                        Some(event) => return Ok(Some(event)),
                        None => continue,
                    }
                }
                State::Control { header } => {
                    let len = header.payload_len as usize;
                    if buf.len() < len {
                        return Ok(None);
                    }
                    let mut payload = buf.split_to(len);
                    if let Some(mask) = header.mask {
                        apply_mask(&mut payload, mask, 0);
                    }
                    self.state = State::Header;
                    let payload = payload.freeze();
                    return Ok(Some(match header.opcode {
                        OpCode::Ping => Event::Ping(payload),
                        OpCode::Pong => Event::Pong(payload),
                        _ => match parse_close_payload(&payload) {
                            Ok(close) => {
                                Event::Close(close.map(|(code, reason)| (code, reason.to_owned())))
                            }
                            Err(ClosePayloadError::BadCode) => {
                                return Err(Violation::protocol("invalid close code"))
                            }
                            Err(ClosePayloadError::BadReason) => {
                                return Err(Violation::invalid_utf8("close reason is not UTF-8"))
                            }
                        },
                    }));
                }
            }
        }
    }

    /// Wraps the next piece of the current data frame into an event, finishing the frame (and
    /// the message) when its last byte has been delivered. A compressed message's piece goes
    /// to the inflater instead; `None` when it gave nothing yet.
    #[inline(always)]
    fn data_piece(&mut self, payload: Bytes) -> Result<Option<Event>, Violation> {
        let State::Payload { remaining, fin, .. } = self.state else {
            unreachable!("data_piece outside a payload");
        };
        let kind = self
            .message
            .expect("a data frame always belongs to a message");
        let frame_done = remaining == 0;
        let message_done = frame_done && fin;
        if self.compressed {
            return self.compressed_piece(payload, frame_done, message_done);
        }
        if kind == MessageKind::Text {
            let bad = Violation::invalid_utf8("invalid UTF-8 in text message");
            self.utf8.feed(&payload).map_err(|_| bad.clone())?;
            if message_done && !self.utf8.is_complete() {
                return Err(bad);
            }
        }
        if frame_done {
            self.state = State::Header;
        }
        if message_done {
            self.message = None;
        }
        let first = std::mem::take(&mut self.first_pending);
        Ok(Some(Event::Data {
            kind,
            payload,
            first,
            fin: message_done,
        }))
    }

    /// A compressed message's piece: queued for the inflater, and its first output if any.
    /// (Out of line, so that `data_piece` stays small enough to inline into `decode`.)
    #[inline(never)]
    fn compressed_piece(
        &mut self,
        payload: Bytes,
        frame_done: bool,
        message_done: bool,
    ) -> Result<Option<Event>, Violation> {
        if frame_done {
            self.state = State::Header;
        }
        self.pending = Some(Pending {
            input: payload,
            message_fin: message_done,
            tail_fed: false,
            more: false,
        });
        self.inflate_piece()
    }

    /// The next inflated piece of the compressed message in progress (at most
    /// [`INFLATE_PIECE`] bytes, and never more than one byte past `max_message_size`, so a
    /// bomb costs a bounded amount of memory and CPU before its 1009). `None` when the input
    /// so far is used up and the message has more frames to come.
    #[inline(never)]
    fn inflate_piece(&mut self) -> Result<Option<Event>, Violation> {
        let bad = || Violation::protocol("invalid compressed data");
        let Some(kind) = self.message else {
            self.pending = None;
            return Ok(None);
        };
        loop {
            let Some(p) = self.pending.as_mut() else {
                return Ok(None);
            };
            if p.input.is_empty() && !p.more {
                if !p.message_fin {
                    self.pending = None;
                    return Ok(None);
                }
                if p.tail_fed {
                    return Err(bad());
                }
                p.input = Bytes::from_static(Inflater::tail());
                p.tail_fed = true;
            }
            let inflater = self.inflater.as_mut().ok_or_else(bad)?;
            let allowance = self.max_message_size.saturating_sub(self.inflated_len);
            // Room for what this input likely inflates to (text: a few times its size), at
            // most a piece, and never much past the limit.
            let guess = (p.input.len() as u64).saturating_mul(8).max(4096);
            let room = INFLATE_PIECE.min(guess).min(allowance.saturating_add(1)) as usize;
            let mut out = Vec::with_capacity(room);
            let r = inflater
                .inflate(&p.input, &mut out, room)
                .map_err(|_| bad())?;
            if inflater.amplifies() {
                return Err(Violation::amplified());
            }
            if r.consumed == 0 && !r.more && out.is_empty() && !p.input.is_empty() {
                return Err(bad());
            }
            p.input.advance(r.consumed);
            p.more = r.more;
            let done = p.message_fin && p.tail_fed && p.input.is_empty() && !p.more;
            if out.is_empty() && !done {
                continue;
            }
            self.inflated_len += out.len() as u64;
            if self.inflated_len > self.max_message_size {
                return Err(Violation::too_big());
            }
            if kind == MessageKind::Text {
                let invalid = Violation::invalid_utf8("invalid UTF-8 in text message");
                self.utf8.feed(&out).map_err(|_| invalid.clone())?;
                if done && !self.utf8.is_complete() {
                    return Err(invalid);
                }
            }
            if done {
                self.pending = None;
                self.message = None;
                inflater.message_done();
            }
            let first = std::mem::take(&mut self.first_pending);
            return Ok(Some(Event::Data {
                kind,
                payload: Bytes::from(out),
                first,
                fin: done,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::close_payload;

    fn client_frame(fin: bool, opcode: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        crate::protocol::frame::encode_frame(fin, opcode, Some(key), payload)
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, Violation> {
        let mut buf = BytesMut::from(bytes);
        let mut events = Vec::new();
        while let Some(e) = decoder.decode(&mut buf)? {
            events.push(e);
        }
        Ok(events)
    }

    #[test]
    fn unmasked_client_frame_is_a_protocol_error() {
        let mut d = Decoder::new(1 << 20);
        let err = decode_all(&mut d, &[0x81, 0x02, b'h', b'i']).unwrap_err();
        assert_eq!(err.code, 1002);
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let key = [1, 2, 3, 4];
        let mut bytes = client_frame(false, OpCode::Text, b"hel", key);
        bytes.extend(client_frame(true, OpCode::Ping, b"p", key));
        bytes.extend(client_frame(false, OpCode::Continuation, b"", key));
        bytes.extend(client_frame(true, OpCode::Continuation, b"lo", key));
        let events = decode_all(&mut Decoder::new(100), &bytes).unwrap();
        assert_eq!(
            events,
            vec![
                Event::Data {
                    kind: MessageKind::Text,
                    payload: Bytes::from_static(b"hel"),
                    first: true,
                    fin: false
                },
                Event::Ping(Bytes::from_static(b"p")),
                Event::Data {
                    kind: MessageKind::Text,
                    payload: Bytes::new(),
                    first: false,
                    fin: false
                },
                Event::Data {
                    kind: MessageKind::Text,
                    payload: Bytes::from_static(b"lo"),
                    first: false,
                    fin: true
                },
            ]
        );
    }

    #[test]
    fn continuation_and_nesting_rules() {
        let key = [5, 6, 7, 8];
        let lone = client_frame(true, OpCode::Continuation, b"x", key);
        assert_eq!(
            decode_all(&mut Decoder::new(100), &lone).unwrap_err().code,
            1002
        );
        let mut nested = client_frame(false, OpCode::Binary, b"a", key);
        nested.extend(client_frame(true, OpCode::Binary, b"b", key));
        assert_eq!(
            decode_all(&mut Decoder::new(100), &nested)
                .unwrap_err()
                .code,
            1002
        );
    }

    #[test]
    fn message_size_limit_counts_all_fragments() {
        let key = [0; 4];
        let mut bytes = client_frame(false, OpCode::Binary, &[0; 60], key);
        bytes.extend(client_frame(true, OpCode::Continuation, &[0; 60], key));
        let err = decode_all(&mut Decoder::new(100), &bytes).unwrap_err();
        assert_eq!(err.code, 1009);
        assert!(decode_all(&mut Decoder::new(120), &bytes).is_ok());
    }

    #[test]
    fn close_frames() {
        let key = [9, 9, 9, 9];
        let ok = client_frame(true, OpCode::Close, &close_payload(1000, "bye"), key);
        assert_eq!(
            decode_all(&mut Decoder::new(100), &ok).unwrap(),
            vec![Event::Close(Some((1000, "bye".into())))]
        );
        let one = client_frame(true, OpCode::Close, &[3], key);
        assert_eq!(
            decode_all(&mut Decoder::new(100), &one).unwrap_err().code,
            1002
        );
        let bad_utf8 = client_frame(true, OpCode::Close, &[3, 232, 0xC0], key);
        assert_eq!(
            decode_all(&mut Decoder::new(100), &bad_utf8)
                .unwrap_err()
                .code,
            1007
        );
    }

    #[test]
    fn invalid_utf8_text_fails_at_the_bad_byte() {
        let key = [1, 1, 1, 1];
        let mut bytes = client_frame(false, OpCode::Text, b"ok", key);
        bytes.extend(client_frame(false, OpCode::Continuation, &[0xFF], key));
        let mut d = Decoder::new(100);
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(d.decode(&mut buf), Ok(Some(Event::Data { .. }))));
        assert_eq!(d.decode(&mut buf).unwrap_err().code, 1007);
        // A message that ends inside a sequence is invalid too.
        let cut = client_frame(true, OpCode::Text, &[b'a', 0xE2, 0x82], key);
        assert_eq!(
            decode_all(&mut Decoder::new(100), &cut).unwrap_err().code,
            1007
        );
    }

    /// A compressed client frame: RSV1 set on `first` frames.
    fn compressed_frame(fin: bool, rsv1: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = client_frame(fin, opcode, payload, [1, 2, 3, 4]);
        if rsv1 {
            f[0] |= 0x40;
        }
        f
    }

    fn deflated(data: &[u8]) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    fn inflating(max: u64) -> Decoder {
        use crate::protocol::deflate::{negotiate, DeflateConfig, Inflater, Tally};
        let agreed = negotiate(["permessage-deflate"], &DeflateConfig::default()).unwrap();
        Decoder::with_inflater(max, Inflater::new(&agreed, Tally::default()))
    }

    fn message(events: &[Event]) -> Vec<u8> {
        events
            .iter()
            .flat_map(|e| match e {
                Event::Data { payload, .. } => payload.to_vec(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn rsv1_needs_the_extension_and_the_first_frame() {
        let one = compressed_frame(true, true, OpCode::Text, &deflated(b"hi"));
        let err = decode_all(&mut Decoder::new(100), &one).unwrap_err();
        assert_eq!((err.code, err.reason), (1002, "reserved bits set"));
        let mut on_continuation = compressed_frame(false, true, OpCode::Text, &deflated(b"a"));
        on_continuation.extend(compressed_frame(true, true, OpCode::Continuation, b""));
        assert_eq!(
            decode_all(&mut inflating(100), &on_continuation)
                .unwrap_err()
                .code,
            1002
        );
    }

    #[test]
    fn compressed_messages_fragmented_and_interleaved_with_pings() {
        let text = "héllo wörld ".repeat(300);
        let wire = deflated(text.as_bytes());
        let (a, b) = wire.split_at(wire.len() / 2);
        let mut bytes = compressed_frame(false, true, OpCode::Text, a);
        bytes.extend(client_frame(true, OpCode::Ping, b"p", [5, 6, 7, 8]));
        bytes.extend(compressed_frame(true, false, OpCode::Continuation, b));
        // Then an uncompressed message in the same session, and an empty compressed one.
        bytes.extend(client_frame(true, OpCode::Binary, b"raw", [9, 9, 9, 9]));
        bytes.extend(compressed_frame(true, true, OpCode::Binary, &deflated(b"")));
        let mut d = inflating(1 << 20);
        // Fed a byte at a time: every split point must give the same events.
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for byte in &bytes {
            buf.extend_from_slice(&[*byte]);
            while let Some(e) = d.decode(&mut buf).unwrap() {
                events.push(e);
            }
        }
        let pings = events
            .iter()
            .filter(|e| matches!(e, Event::Ping(_)))
            .count();
        assert_eq!(pings, 1);
        // The data events, grouped into messages at each fin.
        let mut messages: Vec<Vec<u8>> = vec![Vec::new()];
        for e in &events {
            if let Event::Data { payload, fin, .. } = e {
                messages.last_mut().unwrap().extend_from_slice(payload);
                if *fin {
                    messages.push(Vec::new());
                }
            }
        }
        messages.pop();
        assert_eq!(
            messages,
            vec![text.into_bytes(), b"raw".to_vec(), Vec::new()]
        );
        assert!(message(&events).len() > 3000);
    }

    #[test]
    fn a_bomb_is_cut_at_max_message_size() {
        let zeros = vec![0u8; 64 << 20];
        let wire = deflated(&zeros);
        assert!(wire.len() < 100 << 10, "{}", wire.len());
        let mut d = inflating(1 << 20);
        let mut buf = BytesMut::from(&compressed_frame(true, true, OpCode::Binary, &wire)[..]);
        let mut out = 0;
        let err = loop {
            match d.decode(&mut buf) {
                Ok(Some(Event::Data { payload, .. })) => {
                    assert!(payload.len() <= 64 << 10);
                    out += payload.len();
                }
                Ok(other) => panic!("{other:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.code, 1009);
        assert!(out <= 1 << 20, "inflated {out} bytes before the 1009");
        // Invalid deflate data: 1002.
        let junk = compressed_frame(true, true, OpCode::Binary, &[0xff; 32]);
        assert_eq!(
            decode_all(&mut inflating(100), &junk).unwrap_err().code,
            1002
        );
        // Invalid UTF-8 inside compressed text: 1007.
        let bad = compressed_frame(true, true, OpCode::Text, &deflated(&[0xc3, 0x28]));
        assert_eq!(
            decode_all(&mut inflating(100), &bad).unwrap_err().code,
            1007
        );
    }
}
