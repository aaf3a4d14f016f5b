//! The proxy route's data path after both upgrades: bytes copied both ways, counted, with the
//! idle timer and the drain signal.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::session_end::SessionEnd;
use crate::stream::{Observed, Observer, PendingSince};

/// One side of a splice as the timers see it: bytes read from it (counted into the route's
/// metric and this session's total), when it last sent anything, and since when a write to it
/// has been stalled.
struct Side {
    counter: Counter,
    total: u64,
    heard: Arc<PendingSince>,
    stalled: Arc<PendingSince>,
}

impl Observer for Side {
    fn read(&mut self, n: usize) {
        self.counter.inc_by(n as u64);
        self.total += n as u64;
        self.heard.reset();
    }

    fn write_blocked(&mut self, blocked: bool) {
        if blocked {
            self.stalled.mark();
        } else {
            self.stalled.clear();
        }
    }
}

/// How a spliced session ended, and the bytes read from each side.
pub(crate) struct Spliced {
    /// `Closed`, `Error`, `IdleTimeout`, `ClientNotReading`, `BackendStuck` or `Shutdown`.
    pub end: SessionEnd,
    pub from_client: u64,
    pub to_client: u64,
}

/// Splices the upgraded client and app connections with 64 KiB buffers each way (a slow side
/// stops the other's reads), until both are done, the client is silent for `idle`, a write to
/// either side has been stalled for `idle` (a side that stopped reading), or `stop` is
/// cancelled (drain). Frames pass through untouched, so no close frame is injected: a cut
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
    let started = Instant::now();
    let clock = || Arc::new(PendingSince::new(started));
    let (heard, client_stalled, app_stalled) = (clock(), clock(), clock());
    heard.mark();
    let mut client = Observed {
        inner: client,
        observer: Side {
            counter: from_client,
            total: 0,
            heard: heard.clone(),
            stalled: client_stalled.clone(),
        },
    };
    let mut app = Observed {
        inner: app,
        observer: Side {
            counter: to_client,
            total: 0,
            heard: clock(),
            stalled: app_stalled.clone(),
        },
    };
    let copy =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut app, 64 * 1024, 64 * 1024);
    // Nothing from the client for `idle`, or a write to either side stalled for `idle`.
    let watch = async {
        loop {
            let deadlines = [heard.since(), client_stalled.since(), app_stalled.since()];
            let wake = deadlines.into_iter().flatten().min().unwrap_or(started) + idle;
            tokio::time::sleep_until(wake).await;
            let now = Instant::now();
            if client_stalled.pending_for(now) >= Some(idle) {
                return SessionEnd::ClientNotReading;
            }
            if app_stalled.pending_for(now) >= Some(idle) {
                return SessionEnd::BackendStuck;
            }
            if heard.pending_for(now) >= Some(idle) {
                return SessionEnd::IdleTimeout;
            }
        }
    };
    let end = tokio::select! {
        r = copy => if r.is_ok() { SessionEnd::Closed } else { SessionEnd::Error },
        end = watch => end,
        () = stop.cancelled() => SessionEnd::Shutdown,
    };
    Spliced {
        end,
        from_client: client.observer.total,
        to_client: app.observer.total,
    }
}
