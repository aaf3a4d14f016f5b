//! Buffers held only while data flows.
//!
//! An idle session waits in a read, and a read needs somewhere to put its bytes. If every
//! session kept its own read buffer for that, 10,000 idle sessions would hold 10,000 empty
//! buffers. Instead, a session that holds no unconsumed bytes gives its buffer back before it
//! waits, and the read that wakes it lands in a block that belongs to the worker thread
//! ([`poll_read_lazily`]); only then does the session get a buffer of its own. The proxy
//! splice goes further: it reads into the thread's scratch buffer ([`with_scratch`]) and
//! writes the bytes on at once, keeping only what the writer did not take.
//!
//! Both are borrowed only inside a single poll, never across an `.await`, so a task that
//! moves to another worker thread does not take them along.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncRead;

/// The largest single read: the per-direction bound of every session buffer.
pub(crate) const SCRATCH_LEN: usize = 64 * 1024;

/// Reads through [`LANDING`] at least this long are handed over without a copy.
const HAND_OVER_AT: usize = 4 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
    /// Where [`poll_read_lazily`] lands a read for a session that holds no buffer. A read of
    /// [`HAND_OVER_AT`] bytes or more is split off and handed to the session as it is (the
    /// rest of the block lands the next reads); a shorter one is copied out, so a few bytes
    /// never keep a whole block alive.
    static LANDING: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Runs `f` with this thread's scratch buffer (`SCRATCH_LEN` bytes).
///
/// `f` must not call `with_scratch` itself.
pub(crate) fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|s| f(&mut s.borrow_mut()[..]))
}

/// Reads into `buf`: up to `size` bytes (more if `buf` already has the room), at least one
/// unless at EOF, appended to what `buf` holds.
///
/// While `buf` is empty the read does not hold on to its memory: if the read has to wait,
/// `buf`'s allocation is released first, and the bytes that end the wait land in the
/// thread's block: a short read is copied into an allocation of just its size, a long one
/// (4 KiB or more) becomes `buf` itself. A `buf` that still holds bytes (a frame not yet
/// complete), or an empty one with `size` free bytes (data is flowing), is read into
/// directly.
pub(crate) fn poll_read_lazily<R: AsyncRead + ?Sized>(
    reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    size: usize,
) -> Poll<io::Result<usize>> {
    let size = size.max(1);
    if !buf.is_empty() {
        if buf.capacity() - buf.len() < size {
            buf.reserve(size);
        }
        return tokio_util::io::poll_read_buf(reader, cx, buf);
    }
    if buf.capacity() >= size {
        let read = tokio_util::io::poll_read_buf(reader, cx, buf);
        if read.is_pending() {
            // Waiting with nothing held: give the buffer back.
            *buf = BytesMut::new();
        }
        return read;
    }
    let size = size.min(SCRATCH_LEN);
    let read = LANDING.with(|landing| {
        let mut landing = landing.borrow_mut();
        if landing.capacity() < size {
            landing.reserve(SCRATCH_LEN);
        }
        ready!(tokio_util::io::poll_read_buf(
            reader,
            cx,
            &mut (&mut *landing).limit(size)
        ))?;
        let n = landing.len();
        if n >= HAND_OVER_AT {
            *buf = landing.split();
        } else {
            buf.extend_from_slice(&landing);
            landing.clear();
        }
        Poll::Ready(Ok(n))
    });
    if read.is_pending() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
    read
}

/// [`poll_read_lazily`] as a future: cancel-safe (bytes are only ever appended to `buf`).
pub(crate) async fn read_lazily<R: AsyncRead + ?Sized>(
    mut reader: Pin<&mut R>,
    buf: &mut BytesMut,
    size: usize,
) -> io::Result<usize> {
    poll_fn(|cx| poll_read_lazily(reader.as_mut(), cx, buf, size)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn an_empty_buffer_is_given_back_while_waiting_and_bytes_arrive_whole() {
        let (mut peer, mut ours) = tokio::io::duplex(1 << 20);
        let mut buf = BytesMut::with_capacity(4096);
        // Nothing to read: the read waits, and the buffer's memory is released.
        let waited = poll_fn(|cx| {
            Poll::Ready(poll_read_lazily(Pin::new(&mut ours), cx, &mut buf, 4096).is_pending())
        })
        .await;
        assert!(waited);
        assert_eq!(buf.capacity(), 0, "an idle read holds no buffer");
        // Bytes arrive: they come through the scratch buffer into a buffer of their size.
        peer.write_all(b"hello").await.unwrap();
        let n = read_lazily(Pin::new(&mut ours), &mut buf, 4096)
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (5, &b"hello"[..]));
        assert!(
            buf.capacity() < 4096,
            "sized to what arrived: {}",
            buf.capacity()
        );
        // A buffer that holds bytes is read into directly and grows as asked.
        let big = vec![7u8; 100_000];
        peer.write_all(&big).await.unwrap();
        let mut total = 5;
        while total < 5 + big.len() {
            total += read_lazily(Pin::new(&mut ours), &mut buf, 64 * 1024)
                .await
                .unwrap();
        }
        assert_eq!(&buf[..5], b"hello");
        assert!(buf[5..].iter().all(|&b| b == 7));
        assert_eq!(buf.len(), 5 + big.len());
        // EOF reads as 0.
        drop(peer);
        let mut rest = BytesMut::new();
        assert_eq!(
            read_lazily(Pin::new(&mut ours), &mut rest, 10)
                .await
                .unwrap(),
            0
        );
    }

    /// Long reads are handed over from the landing block, short ones copied out of it: either
    /// way each session gets exactly its own bytes, read after read.
    #[tokio::test]
    async fn reads_landing_in_the_shared_block_stay_each_sessions_own() {
        let mut sessions = Vec::new();
        for i in 0..6u8 {
            let (mut peer, ours) = tokio::io::duplex(1 << 20);
            // Alternately long (handed over) and short (copied).
            let len = if i % 2 == 0 { 20_000 } else { 100 };
            peer.write_all(&vec![i; len]).await.unwrap();
            sessions.push((peer, ours, BytesMut::new(), len));
        }
        for _ in 0..2 {
            for (_, ours, buf, len) in sessions.iter_mut() {
                let mut got = 0;
                while got < *len {
                    got += read_lazily(Pin::new(ours), buf, 64 * 1024).await.unwrap();
                }
            }
            for (i, (peer, _, buf, len)) in sessions.iter_mut().enumerate() {
                assert_eq!(buf.len(), *len);
                assert!(
                    buf.iter().all(|&b| b == i as u8),
                    "session {i} got another's bytes"
                );
                buf.clear();
                peer.write_all(&vec![i as u8; *len]).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_read_into_no_buffer_is_at_most_what_was_asked_and_the_scratch() {
        let (mut peer, mut ours) = tokio::io::duplex(1 << 20);
        peer.write_all(&vec![1u8; 200_000]).await.unwrap();
        let mut buf = BytesMut::new();
        let n = read_lazily(Pin::new(&mut ours), &mut buf, 10)
            .await
            .unwrap();
        assert_eq!(n, 10);
        let mut other = BytesMut::new();
        let n = read_lazily(Pin::new(&mut ours), &mut other, 1 << 20)
            .await
            .unwrap();
        assert!(n <= SCRATCH_LEN, "{n}");
    }
}
