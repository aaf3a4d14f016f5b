//! [`Decoder`]: client frames in, message events out.
//!
//! A pure state machine over a byte buffer: it turns client frames into [`Event`]s, streaming
//! data payloads out as they arrive (a message is never buffered whole), and enforces every §5
//! rule with the close code it calls for.

use bytes::{Buf, Bytes, BytesMut};

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
}

impl Decoder {
    pub fn new(max_message_size: u64) -> Self {
        Decoder {
            state: State::Header,
            message: None,
            first_pending: false,
            message_len: 0,
            max_message_size,
            utf8: Utf8Validator::default(),
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
                            self.utf8.reset();
                        }
                        OpCode::Continuation => {}
                    }
                    self.message_len = self.message_len.saturating_add(header.payload_len);
                    if self.message_len > self.max_message_size {
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
                        return self.data_piece(Bytes::new()).map(Some);
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
                    return self.data_piece(piece.freeze()).map(Some);
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
    /// the message) when its last byte has been delivered.
    fn data_piece(&mut self, payload: Bytes) -> Result<Event, Violation> {
        let State::Payload { remaining, fin, .. } = self.state else {
            unreachable!("data_piece outside a payload");
        };
        let kind = self
            .message
            .expect("a data frame always belongs to a message");
        let frame_done = remaining == 0;
        let message_done = frame_done && fin;
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
        Ok(Event::Data {
            kind,
            payload,
            first,
            fin: message_done,
        })
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
}
