//! The proxy route's data path after both upgrades: bytes copied both ways, counted, with the
//! idle timer and the drain signal.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::session_end::SessionEnd;

/// Counts bytes as they pass and notes that the client sent something.
struct Counted<S> {
    inner: S,
    counter: Counter,
    /// This session's bytes read through here.
    total: u64,
    activity: Option<Arc<AtomicBool>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counter.inc_by(n as u64);
            self.total += n as u64;
            if let Some(a) = &self.activity {
                a.store(true, Ordering::Relaxed);
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a spliced session ended, and the bytes read from each side.
pub(crate) struct Spliced {
    /// `Closed`, `Error`, `IdleTimeout` or `Shutdown`.
    pub end: SessionEnd,
    pub from_client: u64,
    pub to_client: u64,
}

/// Splices the upgraded client and app connections with 64 KiB buffers each way (a slow side
/// stops the other's reads), until both are done, the client is silent for `idle`, or `stop`
/// is cancelled (drain). Frames pass through untouched, so no close frame is injected: a cut
/// session ends with a TCP close.
pub(crate) async fn splice<C, B>(
    client: C,
    app: B,
    idle: Duration,
    stop: &CancellationToken,
    from_client: Counter,
    to_client: Counter,
) -> Spliced
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(AtomicBool::new(false));
    let mut client = Counted {
        inner: client,
        counter: from_client,
        total: 0,
        activity: Some(activity.clone()),
    };
    let mut app = Counted {
        inner: app,
        counter: to_client,
        total: 0,
        activity: None,
    };
    let copy =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut app, 64 * 1024, 64 * 1024);
    let idle_watch = async {
        let mut deadline = Instant::now() + idle;
        loop {
            tokio::time::sleep_until(deadline).await;
            if !activity.swap(false, Ordering::Relaxed) {
                return;
            }
            deadline = Instant::now() + idle;
        }
    };
    let end = tokio::select! {
        r = copy => if r.is_ok() { SessionEnd::Closed } else { SessionEnd::Error },
        () = idle_watch => SessionEnd::IdleTimeout,
        () = stop.cancelled() => SessionEnd::Shutdown,
    };
    Spliced {
        end,
        from_client: client.total,
        to_client: app.total,
    }
}
