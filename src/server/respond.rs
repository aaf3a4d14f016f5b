//! Responses the server builds itself: plain text, refusals (logged and counted here, in one
//! place), and an app's answer passed through to the client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tracing::info;

use super::conn::Conn;
use super::h2_stream::H2Body;
use crate::metrics::RejectionLabels;
use crate::protocol::handshake::Rejection;
use crate::proxy::forward::ForwardError;
use crate::proxy::headers::passthrough_headers;

/// What a response body may fail with: hyper's errors (a passed-through app body) or I/O
/// errors (a static file).
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(super) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A client request's body: hyper's (HTTP/1.1), or an HTTP/2 stream's DATA (wsgate serves
/// HTTP/2 on the h2 crate itself, see `h2_stream`).
pub(super) enum RequestBody {
    Http1(Incoming),
    H2(H2Body),
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Http1(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            RequestBody::H2(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Http1(body) => body.is_end_stream(),
            RequestBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Http1(body) => body.size_hint(),
            RequestBody::H2(body) => body.size_hint(),
        }
    }
}

pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(super) fn text_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn count_rejection(conn: &Conn, route: Option<&str>, reason: &str) {
    conn.state
        .metrics
        .rejections
        .get_or_create(&RejectionLabels {
            route: route.unwrap_or("none").to_owned(),
            reason: reason.to_owned(),
        })
        .inc();
}

/// A refusal: status, the one-line reason as body, `Connection: close`.
pub(super) fn refuse(conn: &Conn, route: Option<&str>, rejection: Rejection) -> Response<Body> {
    info!(
        peer = %conn.peer,
        route = route.unwrap_or("-"),
        status = rejection.status.as_u16(),
        reason = rejection.label,
        "refused"
    );
    count_rejection(conn, route, rejection.label);
    let mut response = text_response(rejection.status, format!("{}\n", rejection.reason));
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    for (name, value) in rejection.headers {
        headers.insert(name, value);
    }
    response
}

/// The app's response for the client: its status, headers (hop-by-hop ones dropped) and
/// streamed body.
pub(super) fn passthrough<B>(response: Response<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let mut out = Response::new(body.map_err(Into::into).boxed_unsync());
    *out.status_mut() = parts.status;
    *out.headers_mut() = passthrough_headers(&parts.headers);
    out
}

/// The client's answer when forwarding to a proxy route's app failed.
pub(super) fn forward_failed(conn: &Conn, route: &str, error: ForwardError) -> Response<Body> {
    match error {
        ForwardError::Refused(rejection) => refuse(conn, Some(route), rejection),
        ForwardError::AppRefused(response) => {
            // The app refused the upgrade: its status and body go to the client as they are.
            info!(
                route,
                status = response.status().as_u16(),
                "backend refused the upgrade"
            );
            count_rejection(conn, Some(route), "backend_refused");
            let mut out = passthrough(response);
            out.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            out
        }
    }
}
