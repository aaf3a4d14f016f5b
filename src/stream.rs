//! The byte streams a session moves data through: the boxed halves of the client's and a
//! bridge backend's connections (split so both directions run on their own), and a wrapper
//! that reports a stream's traffic to whoever times it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Boxed read half of a byte stream.
pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;

/// Boxed write half of a byte stream.
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// A whole byte stream (TCP or TLS), for the proxy's HTTP client.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A moment shared between a session's tasks without a lock (milliseconds since `origin`):
/// since when a write to one side has been pending (none while it is not), or when a side
/// was last heard from. The session timers read it.
pub(crate) struct PendingSince {
    origin: Instant,
    /// Milliseconds since `origin` plus one; 0 while no write is pending.
    millis: AtomicU64,
}

impl PendingSince {
    pub(crate) fn new(origin: Instant) -> Self {
        PendingSince {
            origin,
            millis: AtomicU64::new(0),
        }
    }

    /// Marks a write as pending (from now, unless it already was).
    pub(crate) fn mark(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        let _ = self
            .millis
            .compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Sets the time to now, pending or not.
    pub(crate) fn reset(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.millis.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn clear(&self) {
        self.millis.store(0, Ordering::Relaxed);
    }

    /// Marks a write as pending until the guard is dropped.
    pub(crate) fn start(&self) -> PendingGuard<'_> {
        self.reset();
        PendingGuard(self)
    }

    pub(crate) fn since(&self) -> Option<Instant> {
        match self.millis.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.origin + Duration::from_millis(ms - 1)),
        }
    }

    pub(crate) fn pending_for(&self, now: Instant) -> Option<Duration> {
        self.since().map(|t| now.saturating_duration_since(t))
    }
}

pub(crate) struct PendingGuard<'a>(&'a PendingSince);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// Told about the traffic through an [`Observed`] stream.
pub(crate) trait Observer {
    /// `n` bytes were read (n > 0).
    fn read(&mut self, n: usize);
    /// A write could not proceed (`true`) or went through (`false`).
    fn write_blocked(&mut self, _blocked: bool) {}
}

/// A stream whose reads (and stalled writes) are reported to an observer; the data passes
/// through untouched.
pub(crate) struct Observed<S, O> {
    pub(crate) inner: S,
    pub(crate) observer: O,
}

impl<S: AsyncRead + Unpin, O: Observer + Unpin> AsyncRead for Observed<S, O> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.observer.read(n);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin, O: Observer + Unpin> AsyncWrite for Observed<S, O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.observer.write_blocked(result.is_pending());
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.observer.write_blocked(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A byte stream with bytes already taken from it (read ahead of its reader): they are read
/// first, then the stream itself. A unix client's peeked bytes, the bytes an app sent right
/// behind its 101.
pub(crate) struct ReadAhead<S> {
    pub(crate) ahead: BytesMut,
    pub(crate) inner: S,
}

impl<S> ReadAhead<S> {
    pub(crate) fn new(inner: S, ahead: BytesMut) -> Self {
        ReadAhead { ahead, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = buf.remaining().min(this.ahead.len());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
