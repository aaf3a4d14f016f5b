//! Incremental UTF-8 validation for text that arrives in pieces (client text messages, and
//! backend bytes framed as text).

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
