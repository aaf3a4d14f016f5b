//! One HTTP/2 stream as wsgate serves it, straight on the h2 crate: the request's body, the
//! response's head and its body sent under flow control (a client that withholds its window
//! for `send_timeout` gets the stream reset), and a WebSocket stream (RFC 8441) as a byte
//! stream: DATA frames both ways, the client's END_STREAM as EOF, shutdown as wsgate's.
//!
//! hyper's HTTP/2 server would put each stream's request on a task, and each upgraded
//! stream's writes through a channel to one more task per stream (with a copy per write);
//! here a stream is one task from its request to its session's end, and the session writes
//! into the stream itself.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::h2::server::SendResponse;
use ::h2::{Reason, RecvStream, SendStream};
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::respond::{Body, BoxError};

/// A request's body: the stream's DATA (each piece's window given back as it is taken), then
/// its trailers.
pub(super) struct H2Body {
    recv: RecvStream,
    /// `Content-Length`, when the request gave one.
    len: Option<u64>,
    data_done: bool,
}

impl H2Body {
    pub(super) fn new(recv: RecvStream, headers: &HeaderMap) -> H2Body {
        let len = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        H2Body {
            recv,
            len,
            data_done: false,
        }
    }

    /// The stream's receiving side, for a WebSocket.
    pub(super) fn into_recv(self) -> RecvStream {
        self.recv
    }
}

impl HttpBody for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Why a response could not be sent whole.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error("the client did not open its window within send_timeout")]
    Stalled,
    #[error("the client reset the stream")]
    Reset,
    #[error(transparent)]
    H2(#[from] ::h2::Error),
    #[error("the response body failed: {0}")]
    Body(BoxError),
}

/// Sends a response's head (HTTP/1.1's connection headers taken off: HTTP/2 has none), with
/// END_STREAM when `end`; the stream's sending side back to go on with.
pub(super) fn send_head(
    respond: &mut SendResponse<Bytes>,
    response: Response<()>,
    end: bool,
) -> Result<SendStream<Bytes>, ::h2::Error> {
    let (mut parts, ()) = response.into_parts();
    strip_connection_headers(&mut parts.headers);
    respond.send_response(Response::from_parts(parts, ()), end)
}

/// Sends a whole response: its head (with `Content-Length` when the body is not empty, its
/// size is known and the head has none), then its body as the client's window allows, waiting at most
/// `send_timeout` each time for the window to open.
pub(super) async fn send_response(
    respond: &mut SendResponse<Bytes>,
    response: Response<Body>,
    send_timeout: Duration,
) -> Result<(), SendError> {
    let (mut parts, body) = response.into_parts();
    let end = body.is_end_stream();
    // An empty answer (a 204, a 304, a refusal's empty 200) gets none: END_STREAM says it.
    if let (false, Some(len)) = (end, body.size_hint().exact()) {
        if !parts.headers.contains_key(header::CONTENT_LENGTH) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let mut send = send_head(respond, Response::from_parts(parts, ()), end)?;
    if end {
        return Ok(());
    }
    let sent = pipe_body(&mut send, body, send_timeout).await;
    if let Err(e) = &sent {
        let reason = match e {
            SendError::Stalled | SendError::Reset => Reason::CANCEL,
            _ => Reason::INTERNAL_ERROR,
        };
        send.send_reset(reason);
    }
    sent
}

async fn pipe_body(
    send: &mut SendStream<Bytes>,
    mut body: Body,
    send_timeout: Duration,
) -> Result<(), SendError> {
    loop {
        // The next piece of the body, unless the client resets the stream meanwhile.
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return Err(SendError::Reset),
        };
        let frame = match frame {
            None => {
                send.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(e)) => return Err(SendError::Body(e)),
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers)?;
                    return Ok(());
                }
                continue;
            }
        };
        while data.has_remaining() {
            send.reserve_capacity(data.len());
            let window = tokio::time::timeout(send_timeout, poll_fn(|cx| capacity(send, cx)));
            let n = window.await.map_err(|_| SendError::Stalled)??;
            send.send_data(data.split_to(n.min(data.len())), false)?;
        }
    }
}

/// Waits until the stream may send (its window and the connection's both open); how much.
fn capacity(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Result<usize, SendError>> {
    loop {
        let n = send.capacity();
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(e.into())),
            None => return Poll::Ready(Err(SendError::Reset)),
        }
    }
}

/// Takes off the headers HTTP/2 forbids (RFC 9113 §8.2.2): they belong to HTTP/1.1's
/// connection, and a refusal or an app's passed-through answer may carry them.
fn strip_connection_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// The receiving side of a WebSocket stream: DATA as bytes, the client's END_STREAM (or its
/// RST_STREAM with NO_ERROR or CANCEL) as EOF. Each piece's window goes back to the client as
/// it is read, so a stream that is not read holds at most its own window.
pub(crate) struct H2Read {
    recv: RecvStream,
    buf: Bytes,
}

/// The sending side of a WebSocket stream: a write sends what the stream's window allows
/// (waiting while it is shut), so nothing piles up in h2's buffers; shutdown is END_STREAM.
pub(crate) struct H2Write {
    send: SendStream<Bytes>,
    ended: bool,
}

/// A WebSocket stream, both sides: what a proxy route splices.
pub(crate) struct H2Io {
    read: H2Read,
    write: H2Write,
}

impl H2Io {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Io {
        H2Io {
            read: H2Read {
                recv,
                buf: Bytes::new(),
            },
            write: H2Write { send, ended: false },
        }
    }

    /// Both sides on their own (the bridge reads and writes on separate futures): unlike a
    /// TLS connection, an HTTP/2 stream's two directions share nothing to lock.
    pub(super) fn into_halves(self) -> (H2Read, H2Write) {
        (self.read, self.write)
    }
}

impl AsyncRead for H2Read {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.buf = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                        Some(Reason::STREAM_CLOSED) => {
                            Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))
                        }
                        _ => Err(std::io::Error::other(e)),
                    })
                }
            }
        }
        let n = out.remaining().min(self.buf.len());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Write {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Asked for only when there is something to send, and only as much: capacity held
        // while idle would hold the connection's window too. (Asking again for what is
        // already asked is a no-op in h2; each call takes the connection's lock, so this asks
        // without looking first.)
        self.send.reserve_capacity(buf.len());
        let n = match ready!(capacity(&mut self.send, cx)) {
            Ok(n) => n.min(buf.len()),
            Err(SendError::H2(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            Err(_) => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        };
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(std::io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // h2's connection task writes what the stream has sent.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.ended {
            self.ended = true;
            // Fails only when the stream is already over (the client reset it): nothing to end.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, out)
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}
