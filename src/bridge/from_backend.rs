//! Backend → client: the backend's bytes, one frame per read (`framing = "stream"`), or one
//! message per line (`framing = "lines"`).

use std::sync::Arc;

use bytes::{Buf, BytesMut};

use super::budget::MessageBudget;
use super::{SessionLimits, Shared, INITIAL_READ_BUF, MAX_READ_BUF};
use crate::protocol::frame::{close_code, OpCode};
use crate::protocol::utf8::Utf8Validator;
use crate::route::MessageMode;
use crate::scratch::read_lazily;
use crate::session_end::SessionEnd;
use crate::stream::BoxRead;

/// Backend → client: one frame per read. In text mode an incomplete UTF-8 sequence at the end
/// of a read waits for the next one, and invalid UTF-8 ends the session with 1014. Once the
/// session is closing, backend output is read and discarded until its EOF.
pub(super) async fn pump(s: &Shared<'_>, mut backend: BoxRead, mode: MessageMode) {
    let text = mode == MessageMode::Text;
    let opcode = if text { OpCode::Text } else { OpCode::Binary };
    // Holds only the incomplete UTF-8 sequence at the end of a read (text mode) between
    // reads; an idle session holds no buffer (see `scratch`).
    let mut buf = BytesMut::new();
    let mut read_size = INITIAL_READ_BUF;
    let mut utf8 = Utf8Validator::default();
    loop {
        let carry = buf.len();
        let read = read_lazily(backend.as_mut(), &mut buf, read_size).await;
        let n = match read {
            Ok(0) => return backend_ended(s, false, carry > 0).await,
            Ok(n) => n,
            Err(_) => return backend_ended(s, true, false).await,
        };
        if s.is_closing() {
            buf.clear();
            continue;
        }
        let filled = carry + n;
        let mut send_len = filled;
        if text {
            if utf8.feed(&buf[carry..filled]).is_err() {
                s.close(
                    SessionEnd::BackendInvalidUtf8,
                    Some(close_code::BAD_GATEWAY),
                    "backend sent invalid UTF-8",
                )
                .await;
                continue;
            }
            send_len = filled - utf8.pending_len();
        }
        if send_len > 0 {
            let mut writer = s.writer.lock().await;
            let _pending = s.client_write.start();
            if writer.send(opcode, true, &buf[..send_len]).await.is_err() {
                s.start_closing(SessionEnd::ClientError);
                return;
            }
            if writer.close_sent().is_none() {
                s.count_to_client(send_len);
            }
        }
        buf.advance(send_len);
        if n >= read_size && read_size < MAX_READ_BUF {
            read_size *= 2;
        }
    }
}

/// Backend → client, one message per line: the backend's output is split at `\n` (not
/// included). A line that spans reads is held — counted against the message budget (close
/// 1013 over it) and at most `max_message_size` long (close 1009 past it); in text mode each
/// line must be UTF-8 (else 1014). A last line without `\n` is sent when the backend ends.
pub(super) async fn pump_lines(
    s: &Shared<'_>,
    mut backend: BoxRead,
    limits: &SessionLimits,
    budget: &Arc<MessageBudget>,
) {
    let text = limits.message == MessageMode::Text;
    let opcode = if text { OpCode::Text } else { OpCode::Binary };
    // Empty between reads: an idle session holds no buffer (see `scratch`).
    let mut buf = BytesMut::new();
    let mut read_size = INITIAL_READ_BUF;
    let mut line: Vec<u8> = Vec::new();
    let mut held = budget.reservation();
    loop {
        buf.clear();
        let n = match read_lazily(backend.as_mut(), &mut buf, read_size).await {
            Ok(0) => {
                // A last line without its newline is still a line.
                if !s.is_closing() && !line.is_empty() && !send_line(s, opcode, text, &line).await {
                    return;
                }
                return backend_ended(s, false, false).await;
            }
            Ok(n) => n,
            Err(_) => return backend_ended(s, true, false).await,
        };
        if s.is_closing() {
            // Read and dropped until the backend's EOF.
            continue;
        }
        let mut rest = &buf[..n];
        let mut too_long = false;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let (piece, after) = (&rest[..end], &rest[end + 1..]);
            if (line.len() + piece.len()) as u64 > limits.max_message_size {
                too_long = true;
                break;
            }
            let ok = if line.is_empty() {
                send_line(s, opcode, text, piece).await
            } else {
                line.extend_from_slice(piece);
                let ok = send_line(s, opcode, text, &line).await;
                line.clear();
                line.shrink_to(INITIAL_READ_BUF);
                held.release();
                ok
            };
            if !ok {
                return;
            }
            rest = after;
        }
        if too_long || (line.len() + rest.len()) as u64 > limits.max_message_size {
            s.close(
                SessionEnd::MessageTooBig,
                Some(close_code::MESSAGE_TOO_BIG),
                "backend line longer than max_message_size",
            )
            .await;
            continue;
        }
        if !rest.is_empty() {
            if !held.grow(rest.len() as u64) {
                s.close(
                    SessionEnd::TryAgainLater,
                    Some(close_code::TRY_AGAIN_LATER),
                    "server busy: message buffers full",
                )
                .await;
                continue;
            }
            line.extend_from_slice(rest);
        }
        if n >= read_size && read_size < MAX_READ_BUF {
            read_size *= 2;
        }
    }
}

/// Sends one whole line as a message; false when the session must end (invalid UTF-8 in text
/// mode: close 1014; the client failed).
async fn send_line(s: &Shared<'_>, opcode: OpCode, text: bool, line: &[u8]) -> bool {
    if text && std::str::from_utf8(line).is_err() {
        s.close(
            SessionEnd::BackendInvalidUtf8,
            Some(close_code::BAD_GATEWAY),
            "backend sent invalid UTF-8",
        )
        .await;
        return false;
    }
    let mut writer = s.writer.lock().await;
    let _pending = s.client_write.start();
    if writer.send(opcode, true, line).await.is_err() {
        s.start_closing(SessionEnd::ClientError);
        return false;
    }
    if writer.close_sent().is_none() {
        s.count_to_client(line.len());
    }
    true
}

/// The backend's end: EOF (`reset` false) or a failed read. Unless the session is already
/// closing, it closes with 1000 after a clean EOF, or 1014 for a reset or for EOF inside a
/// UTF-8 sequence (`incomplete`, text mode).
async fn backend_ended(s: &Shared<'_>, reset: bool, incomplete: bool) {
    if s.is_closing() {
        return;
    }
    let (end, code, reason) = match (reset, incomplete) {
        (true, _) => (
            SessionEnd::BackendError,
            close_code::BAD_GATEWAY,
            "backend connection reset",
        ),
        (false, true) => (
            SessionEnd::BackendInvalidUtf8,
            close_code::BAD_GATEWAY,
            "backend sent incomplete UTF-8",
        ),
        (false, false) => (SessionEnd::BackendEof, close_code::NORMAL, ""),
    };
    s.close(end, Some(code), reason).await;
}
