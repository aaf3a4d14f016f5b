//! [`FrameWriter`]: server frames (unmasked, minimal length form) onto the client stream.

use bytes::Buf;
use tokio::io::AsyncWriteExt;

use super::deflate::Deflater;
use super::frame::{
    close_code, close_payload, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};
use crate::stream::BoxWrite;

/// Writes server frames (unmasked, minimal length form) to the client.
///
/// Once a close frame has been sent, further data and ping frames are dropped, as §5.5.1
/// requires; the close itself is sent at most once.
/// Messages up to this size are compressed where they are sent; larger ones on the blocking
/// pool.
const COMPRESS_INLINE_AT_MOST: usize = 64 * 1024;

pub(crate) struct FrameWriter {
    io: BoxWrite,
    close_sent: Option<u16>,
    /// Set while a frame is being written; still set if that write was cancelled half-way,
    /// after which nothing more may be written (it would land inside the cut frame).
    in_frame: bool,
    /// permessage-deflate, when the session agreed on it.
    deflater: Option<Deflater>,
}

impl FrameWriter {
    pub(crate) fn new(io: BoxWrite) -> Self {
        FrameWriter {
            io,
            close_sent: None,
            in_frame: false,
            deflater: None,
        }
    }

    /// Whole data messages are compressed from now on (RSV1 set), when that makes them
    /// smaller.
    pub(crate) fn with_deflater(mut self, deflater: Deflater) -> Self {
        self.deflater = Some(deflater);
        self
    }

    /// The code of the close frame sent, if one was.
    pub(crate) fn close_sent(&self) -> Option<u16> {
        self.close_sent
    }

    /// Sends one frame. Not cancel-safe: a frame cut short leaves the stream unusable, and
    /// every later send fails instead of writing into it.
    pub(crate) async fn send(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
    ) -> std::io::Result<()> {
        if self.close_sent.is_some() {
            return Ok(());
        }
        // Whole data messages only: a compressed message's RSV1 goes on its first frame, and
        // every message wsgate sends is one frame.
        if let (Some(deflater), true, false) = (&mut self.deflater, fin, opcode.is_control()) {
            let mut compressed = Vec::new();
            let done = if payload.len() > COMPRESS_INLINE_AT_MOST {
                // A large message is compressed on the blocking pool, so one client's
                // megabytes never hold an async worker (and every session on it) for
                // milliseconds.
                let (mut d, owned) = (deflater.clone(), payload.to_vec());
                let job = tokio::task::spawn_blocking(move || {
                    let ok = d.compress(&owned, &mut compressed);
                    (ok, compressed)
                });
                let (ok, out) = job.await.map_err(std::io::Error::other)?;
                compressed = out;
                ok
            } else {
                deflater.compress(payload, &mut compressed)
            };
            if done {
                return self.write_frame(opcode, true, true, &compressed).await;
            }
        }
        self.send_unchecked(opcode, fin, payload).await
    }

    async fn send_unchecked(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.write_frame(opcode, fin, false, payload).await
    }

    async fn write_frame(
        &mut self,
        opcode: OpCode,
        fin: bool,
        rsv1: bool,
        payload: &[u8],
    ) -> std::io::Result<()> {
        if self.in_frame {
            return Err(std::io::Error::other("an earlier frame was cut short"));
        }
        let mut header = [0u8; MAX_HEADER_LEN];
        let n = FrameHeader {
            fin,
            rsv1,
            opcode,
            mask: None,
            payload_len: payload.len() as u64,
        }
        .encode(&mut header);
        let mut frame = (&header[..n]).chain(payload);
        self.in_frame = true;
        self.io.write_all_buf(&mut frame).await?;
        self.in_frame = false;
        // Over TLS the last record may still sit in the TLS layer's buffer: push it out now,
        // not at the next write (which could be a ping 30 s later).
        self.io.flush().await
    }

    /// Sends a pong answering a ping (same payload), unless a close was already sent.
    pub(crate) async fn pong(&mut self, payload: &[u8]) -> std::io::Result<()> {
        debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        self.send(OpCode::Pong, true, payload).await
    }

    /// Sends the close frame once; `None` sends an empty close (the answer to an empty one).
    pub(crate) async fn close(&mut self, code: Option<u16>, reason: &str) -> std::io::Result<()> {
        if self.close_sent.is_some() {
            return Ok(());
        }
        self.close_sent = Some(code.unwrap_or(close_code::NO_STATUS));
        let payload = code.map(|c| close_payload(c, reason)).unwrap_or_default();
        self.send_unchecked(OpCode::Close, true, &payload).await?;
        self.io.flush().await
    }

    /// Half-closes the client TCP connection (FIN) after the close handshake.
    pub(crate) async fn shutdown(&mut self) -> std::io::Result<()> {
        self.io.shutdown().await
    }
}
