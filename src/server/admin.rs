//! The admin listener: `/healthz` (liveness), `/readyz` (503 while draining), `/metrics`, and
//! the live sessions — `GET /sessions` (JSON), `POST /sessions/{id}/close`, `POST
//! /sessions/close?route=…[&backend=…]`, and `/`, a small page that shows them. With
//! `[admin] auth = { bearer = FILE }` every path but `/healthz` and `/readyz` needs one of the
//! file's tokens (`Authorization: Bearer`, or an `access_token` query parameter or cookie).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::sleep;

use super::respond::{text_response, Body};
use super::sessions::{operator_code_allowed, to_json};
use super::State;
use crate::auth::{Auth, Presented};
use crate::params::query_param;
use crate::protocol::frame::close_code;

/// The page at `/`: plain HTML and a script, no build step, nothing fetched from elsewhere.
const PAGE: &str = include_str!("admin_page.html");

/// The longest close reason that fits a close frame (125 bytes less the code).
const MAX_REASON: usize = 123;

/// Serves the admin endpoints until the task is aborted.
pub(super) async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

async fn respond(state: &State, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    match path {
        "/healthz" => return text_response(StatusCode::OK, "ok\n".into()),
        "/readyz" if state.draining.load(Ordering::Acquire) => {
            return text_response(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        }
        "/readyz" => return text_response(StatusCode::OK, "ready\n".into()),
        _ => {}
    }
    if let Some(tokens) = state.config().admin_auth.clone() {
        let presented = Presented {
            headers: req.headers(),
            query: req.uri().query(),
            cert_names: &[],
        };
        if let Err(refused) = Auth::Bearer(tokens).check(presented).await {
            let mut r = text_response(refused.status, format!("{}\n", refused.reason));
            for (name, value) in refused.headers {
                r.headers_mut().insert(name, value);
            }
            return r;
        }
    }
    let query = req.uri().query();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            let mut r = text_response(StatusCode::OK, state.metrics_text());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/") => typed(StatusCode::OK, PAGE.into(), "text/html; charset=utf-8"),
        (&Method::GET, "/sessions") => json(StatusCode::OK, to_json(&state.sessions.list())),
        (&Method::POST, "/sessions/close") => {
            let Some(route) = query_param(query, "route") else {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "give ?route=PATH (and optionally &backend=SPEC)\n".into(),
                );
            };
            let backend = query_param(query, "backend");
            let (code, reason) = match close_asked(query) {
                Ok(c) => c,
                Err(r) => return r,
            };
            // Counted: the sessions this request stopped (not those already closing).
            let closed = state
                .sessions
                .list()
                .iter()
                .filter(|s| {
                    *s.route == *route
                        && backend
                            .as_ref()
                            .map_or(true, |b| *b == s.backend.to_string())
                })
                .filter(|s| s.control.close(code, reason.clone()))
                .count();
            json(StatusCode::OK, format!("{{\"closed\":{closed}}}"))
        }
        (&Method::POST, p) if p.starts_with("/sessions/") && p.ends_with("/close") => {
            let id = &p["/sessions/".len()..p.len() - "/close".len()];
            let Some(session) = id.parse().ok().and_then(|id| state.sessions.get(id)) else {
                return text_response(StatusCode::NOT_FOUND, "no such session\n".into());
            };
            let (code, reason) = match close_asked(query) {
                Ok(c) => c,
                Err(r) => return r,
            };
            let closed = u8::from(session.control.close(code, reason));
            json(StatusCode::OK, format!("{{\"closed\":{closed}}}"))
        }
        (_, "/" | "/metrics" | "/sessions" | "/sessions/close") => {
            text_response(StatusCode::METHOD_NOT_ALLOWED, "wrong method\n".into())
        }
        _ => text_response(
            StatusCode::NOT_FOUND,
            "not found: try /, /sessions, /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// The close code and reason a close request asks for: `code` (default 1001; 1000, 1001,
/// 1008, 1013 and 4000–4999 allowed) and `reason` (at most 123 bytes).
#[allow(clippy::result_large_err)]
fn close_asked(query: Option<&str>) -> Result<(u16, String), Response<Body>> {
    let bad = |text: &str| text_response(StatusCode::BAD_REQUEST, format!("{text}\n"));
    let code = match query_param(query, "code") {
        None => close_code::GOING_AWAY,
        Some(c) => match c.parse::<u16>() {
            Ok(c) if operator_code_allowed(c) => c,
            _ => return Err(bad("code must be 1000, 1001, 1008, 1013 or 4000-4999")),
        },
    };
    let reason = query_param(query, "reason").unwrap_or_default();
    if reason.len() > MAX_REASON {
        return Err(bad("reason must be at most 123 bytes"));
    }
    Ok((code, reason))
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    typed(status, body, "application/json")
}

fn typed(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut r = text_response(status, body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
