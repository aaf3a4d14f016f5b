//! How a session ended: one bounded set of reasons, shown as `end` in the session's log line.
//! Decoder violations carry theirs; the bridge and the proxy splice pick the rest.

/// Why a session ended. The first reason recorded wins; [`SessionEnd::as_str`] is the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent a close frame.
    ClientClose,
    /// The backend closed its side (FIN); everything it sent was delivered, then close 1000.
    BackendEof,
    /// The backend reset or failed: close 1014.
    BackendError,
    /// The backend sent invalid UTF-8 on a text route: close 1014.
    BackendInvalidUtf8,
    /// The client broke a §5 rule: close 1002.
    ProtocolError,
    /// The client sent invalid UTF-8: close 1007.
    InvalidUtf8,
    /// The client's message exceeded max_message_size: close 1009.
    MessageTooBig,
    /// Nothing heard from the client for idle_timeout: close 1001.
    IdleTimeout,
    /// wsgate is draining: close 1001.
    Shutdown,
    /// An operator closed it through the admin listener (with the code they chose).
    ClosedByOperator,
    /// The client's connection ended without a close frame.
    ClientGone,
    /// Writing to the client failed.
    ClientError,
    /// The client did not read our frames for idle_timeout.
    ClientNotReading,
    /// The backend did not read for idle_timeout while client data waited: close 1011.
    BackendStuck,
    /// The echo's whole-message buffering would exceed the process-wide budget: close 1013.
    TryAgainLater,
    /// The peer did not finish the close handshake within close_timeout.
    CloseTimeout,
    /// Proxy route: both sides closed (the close handshake passed through).
    Closed,
    /// Proxy route: one side failed.
    Error,
    /// Nothing recorded a reason (should not happen; kept so the log line always has one).
    Unknown,
}

impl SessionEnd {
    /// The fixed label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::ClientClose => "client_close",
            SessionEnd::BackendEof => "backend_eof",
            SessionEnd::BackendError => "backend_error",
            SessionEnd::BackendInvalidUtf8 => "backend_invalid_utf8",
            SessionEnd::ProtocolError => "protocol_error",
            SessionEnd::InvalidUtf8 => "invalid_utf8",
            SessionEnd::MessageTooBig => "message_too_big",
            SessionEnd::IdleTimeout => "idle_timeout",
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::ClosedByOperator => "closed_by_operator",
            SessionEnd::ClientGone => "client_gone",
            SessionEnd::ClientError => "client_error",
            SessionEnd::ClientNotReading => "client_not_reading",
            SessionEnd::BackendStuck => "backend_stuck",
            SessionEnd::TryAgainLater => "try_again_later",
            SessionEnd::CloseTimeout => "close_timeout",
            SessionEnd::Closed => "closed",
            SessionEnd::Error => "error",
            SessionEnd::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the outside may do to a live session: see what it moved (the admin listener's list)
/// and end it, by the drain (close 1001) or by an operator's close with a code of their own.
/// Made per session. It watches the server's drain token beside its own rather than being a
/// child of it: a child token takes the parent's lock when made and when dropped, and that is
/// a tenth of what listing sessions costs a new connection.
#[derive(Debug, Default)]
pub(crate) struct SessionControl {
    drain: tokio_util::sync::CancellationToken,
    own: tokio_util::sync::CancellationToken,
    operator_close: std::sync::OnceLock<(u16, String)>,
    /// Payload bytes (bridge) or wire bytes (proxy) each way so far.
    pub(crate) bytes_from_client: std::sync::atomic::AtomicU64,
    pub(crate) bytes_to_client: std::sync::atomic::AtomicU64,
}

impl SessionControl {
    /// A session's control; `drain` is the server's drain token.
    pub(crate) fn new(drain: tokio_util::sync::CancellationToken) -> SessionControl {
        SessionControl {
            drain,
            ..SessionControl::default()
        }
    }

    /// Resolves when the session must end: the drain, or [`SessionControl::close`].
    /// Cancel-safe.
    pub(crate) async fn stopped(&self) {
        tokio::select! {
            () = self.drain.cancelled() => {}
            () = self.own.cancelled() => {}
        }
    }

    /// Ends the session with `code` and `reason` (bridge routes send that close frame; proxy
    /// routes, whose byte stream cannot take an injected frame, are cut). The first close
    /// asked for wins; returns whether this call is what stopped the session.
    pub(crate) fn close(&self, code: u16, reason: String) -> bool {
        let stopped = self.drain.is_cancelled() || self.own.is_cancelled();
        let first = !stopped && self.operator_close.set((code, reason)).is_ok();
        self.own.cancel();
        first
    }

    /// The operator's close, when the session was stopped by one rather than by the drain.
    pub(crate) fn operator_close(&self) -> Option<&(u16, String)> {
        self.operator_close.get()
    }
}
