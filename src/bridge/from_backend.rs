//! Backend → client: the backend's bytes, one frame per read.

use tokio::io::AsyncReadExt;

use super::{Shared, INITIAL_READ_BUF, MAX_READ_BUF};
use crate::protocol::frame::{close_code, OpCode};
use crate::protocol::utf8::Utf8Validator;
use crate::route::MessageMode;
use crate::session_end::SessionEnd;
use crate::stream::BoxRead;

/// Backend → client: one frame per read. In text mode an incomplete UTF-8 sequence at the end
/// of a read waits for the next one, and invalid UTF-8 ends the session with 1014. Once the
/// session is closing, backend output is read and discarded until its EOF.
pub(super) async fn pump(s: &Shared, mut backend: BoxRead, mode: MessageMode) {
    let text = mode == MessageMode::Text;
    let opcode = if text { OpCode::Text } else { OpCode::Binary };
    let mut buf = vec![0u8; INITIAL_READ_BUF];
    let mut utf8 = Utf8Validator::default();
    let mut carry = 0;
    loop {
        let read = backend.read(&mut buf[carry..]).await;
        let n = match read {
            Ok(0) => {
                if !s.is_closing() {
                    if carry > 0 {
                        s.close(
                            SessionEnd::BackendInvalidUtf8,
                            Some(close_code::BAD_GATEWAY),
                            "backend sent incomplete UTF-8",
                        )
                        .await;
                    } else {
                        s.close(SessionEnd::BackendEof, Some(close_code::NORMAL), "")
                            .await;
                    }
                }
                return;
            }
            Ok(n) => n,
            Err(_) => {
                if !s.is_closing() {
                    s.close(
                        SessionEnd::BackendError,
                        Some(close_code::BAD_GATEWAY),
                        "backend connection reset",
                    )
                    .await;
                }
                return;
            }
        };
        if s.is_closing() {
            carry = 0;
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
        buf.copy_within(send_len..filled, 0);
        carry = filled - send_len;
        if n == buf.len() - (filled - n) && buf.len() < MAX_READ_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
