//! The admin listener: `/healthz` (liveness), `/readyz` (503 while draining), `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::sleep;

use super::respond::{text_response, Body};
use super::State;

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
                async move { Ok::<_, Infallible>(respond(&state, req.uri().path())) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn respond(state: &State, path: &str) -> Response<Body> {
    match path {
        "/healthz" => text_response(StatusCode::OK, "ok\n".into()),
        "/readyz" if state.draining.load(Ordering::Acquire) => {
            text_response(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        }
        "/readyz" => text_response(StatusCode::OK, "ready\n".into()),
        "/metrics" => {
            let mut r = text_response(StatusCode::OK, state.metrics_text());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text_response(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}
