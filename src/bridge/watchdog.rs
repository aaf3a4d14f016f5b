//! The session's timers, run beside the two pumps so that no wait in them goes unwatched:
//! the idle timeout, pings, a side that stopped reading, and the drain signal.
//!
//! Each pump only records what it waits on (when it last heard from the client, since when a
//! write to either side has been pending); the watchdog decides. Once the session is closing,
//! the close countdown in [`super::run`] bounds everything and the watchdog is done.

use tokio::time::{sleep_until, timeout_at, Instant};

use super::{SessionLimits, Shared};
use crate::protocol::frame::{close_code, OpCode};
use crate::session_end::SessionEnd;

/// Watches the session until it starts closing.
///
/// - nothing heard from the client for `idle_timeout` → close 1001 (`idle_timeout`);
/// - a write to the client pending for `idle_timeout` → the client does not read: the session
///   is closing (`client_not_reading`; no close frame can get through);
/// - a write to the backend pending for `idle_timeout` → the backend does not read: close
///   1011 (`backend_stuck`);
/// - a client silent for `ping_interval` is pinged;
/// - the session's `stop` cancelled → close 1001 (`shutdown`), or the operator's code
///   (`closed_by_operator`).
pub(super) async fn run(s: &Shared<'_>, limits: &SessionLimits) {
    let control = s.control;
    let mut closing = s.closing.subscribe();
    let mut last_ping = s.started;
    loop {
        if closing.borrow_and_update().is_some() {
            return;
        }
        let heard = s.last_heard();
        let idle_at = heard + limits.idle_timeout;
        let ping_at = heard.max(last_ping) + limits.ping_interval;
        let client_stuck_at = s.client_write.since().map(|t| t + limits.idle_timeout);
        let backend_stuck_at = s.backend_write.since().map(|t| t + limits.idle_timeout);
        let wake = [
            Some(idle_at),
            Some(ping_at),
            client_stuck_at,
            backend_stuck_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(idle_at);
        tokio::select! {
            biased;
            () = control.stopped() => {
                match control.operator_close() {
                    Some((code, reason)) => {
                        s.close(SessionEnd::ClosedByOperator, Some(*code), reason).await;
                    }
                    None => {
                        s.close(SessionEnd::Shutdown, Some(close_code::GOING_AWAY), "server shutting down").await;
                    }
                }
                return;
            }
            _ = closing.changed() => continue,
            () = sleep_until(wake) => {}
        }
        let now = Instant::now();
        // Re-read: the pumps may have moved on while we slept.
        let heard = s.last_heard();
        if s.client_write.pending_for(now) >= Some(limits.idle_timeout) {
            s.start_closing(SessionEnd::ClientNotReading);
            return;
        }
        if s.backend_write.pending_for(now) >= Some(limits.idle_timeout) {
            s.close(
                SessionEnd::BackendStuck,
                Some(close_code::INTERNAL_ERROR),
                "backend is not reading",
            )
            .await;
            return;
        }
        // Checked after the stuck sides: a client we stopped reading (backpressure) is not idle.
        if now >= heard + limits.idle_timeout {
            s.close(
                SessionEnd::IdleTimeout,
                Some(close_code::GOING_AWAY),
                "idle timeout",
            )
            .await;
            return;
        }
        if now >= heard.max(last_ping) + limits.ping_interval {
            last_ping = now;
            // Skip the ping if a frame is being written: the link is busy anyway.
            let Ok(mut writer) = s.writer.try_lock() else {
                continue;
            };
            let _pending = s.client_write.start();
            let sent = timeout_at(
                heard + limits.idle_timeout,
                writer.send(OpCode::Ping, true, b""),
            )
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    s.start_closing(SessionEnd::ClientGone);
                    return;
                }
                // Not even two bytes could be written: the client does not read.
                Err(_) => {
                    s.start_closing(SessionEnd::ClientNotReading);
                    return;
                }
            }
        }
    }
}
