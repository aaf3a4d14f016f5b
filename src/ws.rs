//! The server side of a WebSocket connection: frames in, message events out, and frames back.
//!
//! [`Decoder`] is a pure state machine over a byte buffer: it turns client frames into
//! [`Event`]s, streaming data payloads out as they arrive (a message is never buffered whole),
//! and enforces every §5 rule with the close code it calls for. [`FrameWriter`] encodes server
//! frames (unmasked, minimal length form) onto any `AsyncWrite`.

use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::frame::{
    apply_mask, close_code, close_payload, parse_close_payload, ClosePayloadError, FrameHeader,
    OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};

/// Text that is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Incremental UTF-8 check for text that arrives in pieces: fails as soon as a byte makes the
/// text invalid, and carries an incomplete sequence (at most 3 bytes) into the next piece.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

impl Utf8Validator {
    /// Feeds the next piece. Fails at the first byte that makes the text invalid; an
    /// incomplete sequence at the end is kept (see [`Utf8Validator::pending_len`]).
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), InvalidUtf8> {
        let mut rest = piece;
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let need = utf8_width(self.pending[0]) - have;
            let take = need.min(rest.len());
            self.pending[have..have + take].copy_from_slice(&rest[..take]);
            rest = &rest[take..];
            let now = have + take;
            match std::str::from_utf8(&self.pending[..now]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.pending_len = now as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &rest[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Bytes at the end of what was fed that form a still-incomplete sequence (0 to 3).
    pub fn pending_len(&self) -> usize {
        usize::from(self.pending_len)
    }

    /// True when no incomplete sequence is pending (a text message may end here).
    pub fn is_complete(&self) -> bool {
        self.pending_len == 0
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
    }
}

/// Length of the UTF-8 sequence a lead byte starts (only called on a pending lead byte, which
/// `from_utf8` has already accepted as a possible start).
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// Data message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

/// What the client sent, as the relay needs it.
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

/// A rule the client broke: the close code to send and a short reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    fn protocol(reason: &'static str) -> Self {
        Violation {
            code: close_code::PROTOCOL_ERROR,
            reason,
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
                        return Err(Violation {
                            code: close_code::MESSAGE_TOO_BIG,
                            reason: "message too big",
                        });
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
                                return Err(Violation {
                                    code: close_code::INVALID_PAYLOAD,
                                    reason: "close reason is not UTF-8",
                                })
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
            let bad = Violation {
                code: close_code::INVALID_PAYLOAD,
                reason: "invalid UTF-8 in text message",
            };
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

/// Boxed write half of the client connection.
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// Writes server frames (unmasked, minimal length form) to the client.
///
/// Once a close frame has been sent, further data and ping frames are dropped, as §5.5.1
/// requires; the close itself is sent at most once.
pub struct FrameWriter {
    io: BoxWrite,
    close_sent: Option<u16>,
}

impl FrameWriter {
    pub fn new(io: BoxWrite) -> Self {
        FrameWriter {
            io,
            close_sent: None,
        }
    }

    /// The code of the close frame sent, if one was.
    pub fn close_sent(&self) -> Option<u16> {
        self.close_sent
    }

    /// Sends one frame. Not cancel-safe: a frame cut short leaves the stream unusable, so
    /// callers only cancel it when they are about to drop the connection.
    pub async fn send(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) -> std::io::Result<()> {
        if self.close_sent.is_some() {
            return Ok(());
        }
        self.send_unchecked(opcode, fin, payload).await
    }

    async fn send_unchecked(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut header = [0u8; MAX_HEADER_LEN];
        let n = FrameHeader {
            fin,
            opcode,
            mask: None,
            payload_len: payload.len() as u64,
        }
        .encode(&mut header);
        let mut frame = (&header[..n]).chain(payload);
        self.io.write_all_buf(&mut frame).await
    }

    /// Sends a pong answering a ping (same payload), unless a close was already sent.
    pub async fn pong(&mut self, payload: &[u8]) -> std::io::Result<()> {
        debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        self.send(OpCode::Pong, true, payload).await
    }

    /// Sends the close frame once; `None` sends an empty close (the answer to an empty one).
    pub async fn close(&mut self, code: Option<u16>, reason: &str) -> std::io::Result<()> {
        if self.close_sent.is_some() {
            return Ok(());
        }
        self.close_sent = Some(code.unwrap_or(1005));
        let payload = code.map(|c| close_payload(c, reason)).unwrap_or_default();
        self.send_unchecked(OpCode::Close, true, &payload).await?;
        self.io.flush().await
    }

    /// Half-closes the client TCP connection (FIN) after the close handshake.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        crate::frame::encode_frame(fin, opcode, Some(key), payload)
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
    fn utf8_validator_carries_sequences_and_fails_fast() {
        let text = "aé€😀".as_bytes();
        for cut in 0..=text.len() {
            let mut v = Utf8Validator::default();
            v.feed(&text[..cut]).unwrap();
            v.feed(&text[cut..]).unwrap();
            assert!(v.is_complete(), "cut {cut}");
        }
        // Byte by byte.
        let mut v = Utf8Validator::default();
        for b in text {
            v.feed(std::slice::from_ref(b)).unwrap();
        }
        assert!(v.is_complete());
        // 0xF4 0x90 can never start a valid sequence: fail at once, not at the end.
        let mut v = Utf8Validator::default();
        assert!(v.feed(&[0xF4]).is_ok());
        assert!(v.feed(&[0x90]).is_err());
        let mut v = Utf8Validator::default();
        assert!(v.feed(&[b'a', 0xED, 0xA0]).is_err(), "surrogate");
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
