//! The RFC 6455 engine: frames, the client-frame decoder, the server-frame writer, text
//! validation and the opening handshake. Everything here but [`writer`] is pure (no I/O) and
//! carries its unit tests; the session code drives it.
//!
//! ```text
//! handshake  request head → 101 answer or a refusal (§4)
//! frame      header parse/encode, masking, close codes (§5, §7.4)
//! decoder    client bytes → Event (data pieces, ping, pong, close) or a Violation
//! utf8       incremental UTF-8 check for text split across frames and reads
//! deflate    permessage-deflate: the offer answered, pooled compressors, bounded inflation
//! writer     FrameWriter: server frames onto the client stream
//! ```

pub mod decoder;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod utf8;
pub(crate) mod writer;
