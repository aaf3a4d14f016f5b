//! An upgraded session from start to end: the bridge or the proxy splice run on the client's
//! connection, the route's metrics kept, and one log line written when it ends.

use std::sync::Arc;

use ::h2::{RecvStream, SendStream};
use bytes::{Bytes, BytesMut};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, Span};

use super::accept::ConnectionSlot;
use super::balance::OnBackend;
use super::client_limits::Held;
use super::h2_stream::H2Io;
use super::keepalive::Watched;
use super::listen::{ClientStream, Peer, UnixClient};
use super::State;
use crate::bridge::{self, SessionLimits, Summary};
use crate::metrics::RouteMetrics;
use crate::protocol::frame::close_code;
use crate::proxy::exchange::AppStream;
use crate::proxy::splice::splice;
use crate::route::Backend;
use crate::session_end::SessionControl;
use crate::stream::{BoxRead, BoxWrite};

pub(super) struct Session {
    pub(super) state: Arc<State>,
    pub(super) peer: Peer,
    /// `1.1` or `2`: what the handshake came over (log line and metrics).
    pub(super) http_version: &'static str,
    /// The route's path (metrics labels, log lines) and the backend it connected to.
    pub(super) route_path: Arc<str>,
    /// Shared with the session's entry in the admin list (made once per session).
    pub(super) backend_name: Arc<Backend>,
    /// The route's session metrics (found once, when the request was handled).
    pub(super) metrics: Arc<RouteMetrics>,
    pub(super) limits: SessionLimits,
}

/// What a session relays to.
pub(super) enum SessionBackend {
    /// The bridge: a byte stream, or `None` for the built-in echo.
    Bridge(Option<(BoxRead, BoxWrite)>),
    /// A proxy route: the app's side of the upgrade, its 101 checked.
    Proxy(AppStream),
}

/// The connection's places under its limits (the connection slot, the per-client and
/// per-route places, the backend's count): held until the session ends.
pub(super) type Places = (Option<ConnectionSlot>, Option<Held>, OnBackend);

/// Where the client's side of a session comes from.
pub(super) enum ClientSide {
    /// HTTP/1.1: the connection, once hyper has sent the 101 and handed it over.
    Http1(OnUpgrade),
    /// HTTP/2 (RFC 8441): the stream's receiving side; its sending side comes with the 200.
    H2(RecvStream),
}

/// The client's side of a running session.
enum ClientIo {
    Http1(Upgraded),
    H2(H2Io),
}

/// A session agreed on (its 101 or 200 is the request's answer), waiting for the client's
/// side: the connection's own task runs it once the answer is sent (HTTP/1.1: after hyper
/// hands the connection over; HTTP/2: in the stream's future, beside the connection's other
/// streams).
pub(super) struct Pending {
    pub(super) session: Session,
    pub(super) client: ClientSide,
    pub(super) backend: SessionBackend,
    pub(super) places: Places,
}

impl Pending {
    /// Waits for the client's side (an HTTP/1.1 upgrade is already fulfilled once hyper's
    /// connection future has ended; an HTTP/2 stream's sending side is `h2_send`, given once
    /// the 200 is sent), then runs the session; the places are held until it ends. One future
    /// holds the session: `run` borrows it rather than taking a second copy into its own
    /// state. (Not an `async fn`: the parts are moved into the future once, not kept twice in
    /// it.)
    ///
    /// `span` is the connection's (`conn{id}`). It is entered around the session's log lines,
    /// not on every poll of its data path: nothing in between logs.
    pub(super) fn run(
        self,
        h2_send: Option<SendStream<Bytes>>,
        span: Span,
    ) -> impl std::future::Future<Output = ()> + Send {
        let Pending {
            session,
            client,
            backend,
            places,
        } = self;
        async move {
            let _places = places;
            let client = match (client, h2_send) {
                (ClientSide::Http1(on_upgrade), _) => match on_upgrade.await {
                    Ok(upgraded) => ClientIo::Http1(upgraded),
                    Err(e) => return span.in_scope(|| debug!(error = %e, "upgrade failed")),
                },
                (ClientSide::H2(recv), Some(send)) => ClientIo::H2(H2Io::new(send, recv)),
                (ClientSide::H2(_), None) => return,
            };
            session.run(client, backend, &span).await
        }
    }
}

impl Session {
    /// Runs the session to its end. Cancel-safe only in that dropping it drops both
    /// connections (the drain, and an operator through the admin listener, stop it through
    /// its [`SessionControl`] instead).
    async fn run(&self, client: ClientIo, backend: SessionBackend, span: &Span) {
        let m = &self.state.metrics;
        let route = &self.route_path;
        let of_route = &self.metrics;
        of_route.sessions_total.inc();
        of_route.sessions_open.inc();
        let mut counters = of_route.counters.clone();
        if self.limits.deflate.is_some() {
            counters = counters.with_deflate(m, route);
        }
        span.in_scope(|| {
            info!(peer = %self.peer, route = %route, backend = %self.backend_name, http_version = self.http_version, "upgraded");
        });
        // Listed on the admin listener while it runs; its stop is the drain's child.
        let control = Arc::new(SessionControl::new(self.state.sessions_stop.clone()));
        let _listed = self.state.sessions.register(
            route,
            &self.peer,
            Arc::clone(&self.backend_name),
            control.clone(),
        );
        let started = Instant::now();
        let summary = match backend {
            SessionBackend::Bridge(backend) => {
                let (read, initial, write) = match client {
                    ClientIo::Http1(upgraded) => split_upgraded(upgraded),
                    ClientIo::H2(stream) => {
                        let (read, write) = stream.into_halves();
                        (
                            Box::pin(read) as BoxRead,
                            BytesMut::new(),
                            Box::pin(write) as BoxWrite,
                        )
                    }
                };
                bridge::run(
                    read,
                    initial,
                    write,
                    backend,
                    &self.limits,
                    &control,
                    counters,
                    &self.state.message_budget,
                )
                .await
            }
            SessionBackend::Proxy(app) => {
                let idle = self.limits.idle_timeout;
                let (from, to) = (
                    counters.bytes_from_client.clone(),
                    counters.bytes_to_client.clone(),
                );
                let spliced = match client {
                    ClientIo::Http1(upgraded) => {
                        splice(TokioIo::new(upgraded), app, idle, &control, from, to).await
                    }
                    ClientIo::H2(stream) => splice(stream, app, idle, &control, from, to).await,
                };
                Summary {
                    bytes_from_client: spliced.from_client,
                    bytes_to_client: spliced.to_client,
                    ..Summary::ended(spliced.end)
                }
            }
        };
        let duration = started.elapsed();
        of_route.sessions_open.dec();
        of_route.session_seconds.observe(duration.as_secs_f64());
        of_route.count_close(m, route, true, summary.close_sent);
        of_route.count_close(m, route, false, summary.close_received);
        span.in_scope(|| {
            info!(
                peer = %self.peer,
                route = %route,
                backend = %self.backend_name,
                http_version = self.http_version,
                bytes_in = summary.bytes_from_client,
                bytes_out = summary.bytes_to_client,
                messages_in = summary.messages_from_client,
                messages_out = summary.messages_to_client,
                duration_ms = duration.as_millis() as u64,
                close_sent = summary.close_sent.unwrap_or(0),
                close_received = summary.close_received.unwrap_or(close_code::ABNORMAL),
                end = summary.end.as_str(),
                "session ended"
            );
        });
    }
}

/// Takes the client connection back from hyper: the plain stream (TCP or unix) or TLS over
/// one, without the keep-alive read wrapper (no extra layer on the data path), with the
/// bytes hyper had already read behind the request.
fn split_upgraded(upgraded: Upgraded) -> (BoxRead, BytesMut, BoxWrite) {
    let upgraded = match plain::<TcpStream>(upgraded).or_else(plain::<UnixClient>) {
        Ok(parts) => return parts,
        Err(upgraded) => upgraded,
    };
    match tls::<TcpStream>(upgraded).or_else(tls::<UnixClient>) {
        Ok(parts) => parts,
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            (Box::pin(read), BytesMut::new(), Box::pin(write))
        }
    }
}

type Parts = (BoxRead, BytesMut, BoxWrite);

/// The halves of a plain stream of kind `S`, or the upgrade back when it is another kind.
fn plain<S: ClientStream>(upgraded: Upgraded) -> Result<Parts, Upgraded> {
    let parts = upgraded.downcast::<TokioIo<Watched<S>>>()?;
    let (read, write) = parts.io.into_inner().inner.into_halves();
    Ok((read, BytesMut::from(&parts.read_buf[..]), write))
}

/// The halves of TLS over a stream of kind `S`, or the upgrade back when it is another kind.
fn tls<S: ClientStream>(upgraded: Upgraded) -> Result<Parts, Upgraded> {
    let parts = upgraded.downcast::<TokioIo<Watched<TlsStream<S>>>>()?;
    // A TLS session has one state for both directions: split behind a lock.
    let (read, write) = tokio::io::split(parts.io.into_inner().inner);
    Ok((
        Box::pin(read),
        BytesMut::from(&parts.read_buf[..]),
        Box::pin(write),
    ))
}
