//! The proxy route's data path after both upgrades: bytes copied both ways, counted, with the
//! idle timer and the drain signal.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::on_wake::{OnWake, WakeGate};
use crate::scratch::with_scratch;
use crate::session_end::{SessionControl, SessionEnd};
use crate::stream::{Observed, Observer, PendingSince};

/// One side of a splice as the timers see it: bytes read from it (counted into the route's
/// metric and this session's total), when it last sent anything (the client's side only: the
/// idle timer watches the client), and since when a write to it has been stalled. It borrows
/// the splice's clocks and the session's counts: both live as long as the splice.
struct Side<'a> {
    counter: Counter,
    /// The session's live counts (the admin listener reads them): this side's reads go to
    /// `bytes_from_client` when it is the client, else to `bytes_to_client`.
    live: &'a SessionControl,
    is_client: bool,
    heard: Option<&'a PendingSince>,
    stalled: &'a PendingSince,
}

impl Observer for Side<'_> {
    fn read(&mut self, n: usize) {
        self.counter.inc_by(n as u64);
        let live = if self.is_client {
            &self.live.bytes_from_client
        } else {
            &self.live.bytes_to_client
        };
        live.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(heard) = self.heard {
            heard.reset();
        }
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

/// Splices the upgraded client and app connections (reads of up to 64 KiB; a slow side stops
/// the other's reads), until both are done, the client is silent for `idle`, a write to
/// either side has been stalled for `idle` (a side that stopped reading), or `control`'s stop
/// is cancelled (drain, an operator's close). Frames pass through untouched, so no close frame
/// is injected: a cut session ends with a TCP close.
pub(crate) async fn splice<C, B>(
    client: C,
    app: B,
    idle: Duration,
    control: &Arc<SessionControl>,
    from_client: Counter,
    to_client: Counter,
) -> Spliced
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let clock = || PendingSince::new(started);
    let (heard, client_stalled, app_stalled) = (clock(), clock(), clock());
    heard.mark();
    let mut client = Observed {
        inner: client,
        observer: Side {
            counter: from_client,
            live: control,
            is_client: true,
            heard: Some(&heard),
            stalled: &client_stalled,
        },
    };
    let mut app = Observed {
        inner: app,
        observer: Side {
            counter: to_client,
            live: control,
            is_client: false,
            heard: None,
            stalled: &app_stalled,
        },
    };
    let copy = Both {
        client: &mut client,
        app: &mut app,
        up: Direction::default(),
        down: Direction::default(),
        up_gate: WakeGate::default(),
        down_gate: WakeGate::default(),
    };
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
    // The timers and the drain signal, polled only when one of them woke the task.
    let timers = OnWake::new(async {
        tokio::select! {
            end = watch => end,
            () = control.stopped() => match control.operator_close() {
                Some(_) => SessionEnd::ClosedByOperator,
                None => SessionEnd::Shutdown,
            },
        }
    });
    let end = tokio::select! {
        r = copy => if r.is_ok() { SessionEnd::Closed } else { SessionEnd::Error },
        end = timers => end,
    };
    Spliced {
        end,
        from_client: control.bytes_from_client.load(Ordering::Relaxed),
        to_client: control.bytes_to_client.load(Ordering::Relaxed),
    }
}

/// One direction of the splice. Bytes are read into the thread's scratch buffer and written
/// on at once; only what the writer does not take right away is copied into `held` (at most
/// one read, 64 KiB), and reading stops until it is written. So an idle session, or one
/// whose writes keep up, holds no buffer at all.
#[derive(Default)]
struct Direction {
    held: Vec<u8>,
    /// Written of `held` so far.
    at: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader is at EOF; the writer is shut down once `held` is written.
    eof: bool,
    done: bool,
}

impl Direction {
    /// [`Direction::poll_copy`] with the direction's own waker (`gate`'s), if that fired since
    /// it was last polled; otherwise where it stands.
    #[inline]
    fn poll_gated<R, W>(
        &mut self,
        gate: &mut WakeGate,
        cx: &Context<'_>,
        reader: Pin<&mut R>,
        writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if gate.open(cx) {
            self.poll_copy(&mut Context::from_waker(gate.waker()), reader, writer)
        } else if self.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Moves bytes until the reader has nothing (Pending), the writer is full (Pending), or
    /// the reader's EOF has been passed on as the writer's shutdown (Ready).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.at < self.held.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.held[self.at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.at += n;
                self.unflushed = true;
            }
            if !self.held.is_empty() {
                self.held = Vec::new();
                self.at = 0;
            }
            if self.eof {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let read = with_scratch(|scratch| {
                let mut read = ReadBuf::new(scratch);
                ready!(reader.as_mut().poll_read(cx, &mut read))?;
                let data = read.filled();
                if data.is_empty() {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                let mut at = 0;
                while at < data.len() {
                    match writer.as_mut().poll_write(cx, &data[at..]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(n)) => at += n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                }
                if at > 0 {
                    self.unflushed = true;
                }
                if at < data.len() {
                    self.held = data[at..].to_vec();
                }
                Poll::Ready(Ok(()))
            });
            match read {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read now: what was written goes out (a TLS writer may
                    // hold the last record until flushed).
                    if self.unflushed {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Both directions until both are done (each reader's EOF passed on as a shutdown), or the
/// first error. Each direction is polled only when its own waker fired: a message one way
/// wakes the task through one socket, and polling the other direction then would only
/// re-register its wakers. (Safe because the two never wait on the same waker slot: up
/// reads the client and writes the app, down reads the app and writes the client.)
struct Both<'a, C: ?Sized, A: ?Sized> {
    client: &'a mut C,
    app: &'a mut A,
    up: Direction,
    down: Direction,
    up_gate: WakeGate,
    down_gate: WakeGate,
}

impl<C, A> Future for Both<'_, C, A>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (client, app) = (&mut *this.client, &mut *this.app);
        let up = this.up.poll_gated(
            &mut this.up_gate,
            cx,
            Pin::new(&mut *client),
            Pin::new(&mut *app),
        )?;
        let down =
            this.down
                .poll_gated(&mut this.down_gate, cx, Pin::new(app), Pin::new(client))?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    /// A megabyte each way through 1 KiB pipes (so most writes take only part of a read and
    /// the rest is held), read slowly on one side: every byte arrives, in order, and each
    /// side's EOF reaches the other as a shutdown.
    #[tokio::test]
    async fn every_byte_arrives_in_order_through_slow_narrow_sides() {
        let (client, gate_client) = tokio::io::duplex(1024);
        let (app, gate_app) = tokio::io::duplex(1024);
        let control = Arc::new(SessionControl::new(CancellationToken::new()));
        let session = tokio::spawn(async move {
            splice(
                gate_client,
                gate_app,
                Duration::from_secs(30),
                &control,
                Counter::default(),
                Counter::default(),
            )
            .await
        });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let up = {
            let data = data.clone();
            let (mut r, mut w) = tokio::io::split(client);
            tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
                // The app's bytes, read 100 at a time.
                let mut got = Vec::new();
                let mut piece = [0u8; 100];
                loop {
                    let n = r.read(&mut piece).await.unwrap();
                    if n == 0 {
                        break got;
                    }
                    got.extend_from_slice(&piece[..n]);
                }
            })
        };
        let mut from_client = Vec::new();
        let reversed: Vec<u8> = data.iter().rev().copied().collect();
        let (mut ar, mut aw) = tokio::io::split(app);
        let (read, write) = tokio::join!(ar.read_to_end(&mut from_client), async {
            aw.write_all(&reversed).await.unwrap();
            aw.shutdown().await
        });
        read.unwrap();
        write.unwrap();
        let to_client = tokio::time::timeout(Duration::from_secs(30), up)
            .await
            .expect("the client side finished")
            .unwrap();
        assert!(from_client == data, "client → app bytes differ");
        assert!(to_client == reversed, "app → client bytes differ");
        let spliced = session.await.unwrap();
        assert_eq!(spliced.end, SessionEnd::Closed);
        assert_eq!(
            (spliced.from_client, spliced.to_client),
            (1_000_000, 1_000_000)
        );
    }
}
