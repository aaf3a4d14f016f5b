//! Static pages on a route (`static = "DIR"`): plain GET and HEAD requests are answered from
//! DIR by tower-http's `ServeDir` (content types, `index.html`, ETag and Last-Modified with
//! 304s, ranges, HEAD), through a file-system backend of ours that keeps every open inside DIR.
//!
//! What is never served, whatever the request says:
//! - a path outside DIR: `..` (plain or percent-encoded), absolute paths, encoded separators,
//!   backslashes and NUL are refused before `ServeDir` sees them, `ServeDir` refuses `..` and
//!   prefixes again, and every open is checked against DIR after symlinks are resolved;
//! - a directory listing (a directory without `index.html` is 404);
//! - dot files and dot directories (`.htpasswd`, `.git/`);
//! - the files wsgate itself reads (the config, token, auth and key files, and everything
//!   below a token directory) when they lie in DIR: the config names them and they are
//!   hidden by their resolved path, so a symlink to one is hidden too.

use std::future::Future;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tower_http::services::fs::{Backend, ServeDir, TokioBackend};

use crate::params::percent_decode;

/// A route's static directory.
#[derive(Debug, Clone)]
pub struct StaticDir {
    inner: Confined,
}

/// Two `StaticDir`s are the same when they serve the same directory.
impl PartialEq for StaticDir {
    fn eq(&self, other: &Self) -> bool {
        self.inner.root == other.inner.root
    }
}

impl Eq for StaticDir {}

/// `ServeDir`'s file system, confined to one directory.
#[derive(Debug, Clone)]
struct Confined {
    /// Canonical (symlinks resolved) path of DIR.
    root: Arc<Path>,
    /// Canonical paths of files and directories in DIR that are never served (nor anything
    /// below them).
    hidden: Arc<[PathBuf]>,
}

impl StaticDir {
    /// DIR must exist and be a directory. `hidden` lists the files (and token directories)
    /// wsgate reads itself; those inside DIR, or holding it, are never served (those outside
    /// cannot be anyway).
    pub fn new(dir: &Path, hidden: &[PathBuf]) -> io::Result<StaticDir> {
        let root = std::fs::canonicalize(dir)?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory",
            ));
        }
        let hidden = hidden
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .filter(|p| p.starts_with(&root) || root.starts_with(p))
            .collect();
        Ok(StaticDir {
            inner: Confined {
                root: root.into(),
                hidden,
            },
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Answers a GET or HEAD for `path` (the request path with the route's prefix taken off;
    /// `prefix` is that prefix, for redirects to a directory's trailing slash).
    pub async fn serve<B>(&self, req: &Request<B>, prefix: &str, path: &str) -> Response<Body> {
        if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
            let mut response = status(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD here");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        if !is_safe(path) {
            return status(StatusCode::NOT_FOUND, "not found");
        }
        let mut inner = Request::new(Empty::<Bytes>::new());
        *inner.method_mut() = req.method().clone();
        *inner.headers_mut() = req.headers().clone();
        *inner.uri_mut() = match path.parse() {
            Ok(uri) => uri,
            Err(_) => return status(StatusCode::NOT_FOUND, "not found"),
        };
        let mut service = ServeDir::with_backend(&self.inner.root, self.inner.clone())
            .redirect_path_prefix(prefix.trim_end_matches('/'));
        let response = match service.try_call(inner).await {
            Ok(r) => r,
            // A directory without index.html, a missing or refused file.
            Err(e) if is_not_found(&e) => return status(StatusCode::NOT_FOUND, "not found"),
            Err(e) => {
                tracing::warn!(error = %e, "static file could not be read");
                return status(StatusCode::INTERNAL_SERVER_ERROR, "file could not be read");
            }
        };
        let (mut parts, body) = response.into_parts();
        if parts.status == StatusCode::NOT_FOUND {
            return status(StatusCode::NOT_FOUND, "not found");
        }
        if parts.headers.get(header::CONTENT_TYPE)
            == Some(&HeaderValue::from_static("application/javascript"))
        {
            // RFC 9239's one type for JavaScript, classic scripts and modules (.mjs) alike.
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript"),
            );
        }
        if parts.status.is_success() || parts.status == StatusCode::NOT_MODIFIED {
            // Revalidated on every use (a 304 when unchanged), so an upgrade of the files is
            // seen at once.
            parts
                .headers
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            parts.headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
        }
        Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
    }
}

/// A response body: a file from `ServeDir`, or a short text of ours.
pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{text}\n")))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn is_not_found(e: &io::Error) -> bool {
    const ENOTDIR: i32 = 20;
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
    ) || e.raw_os_error() == Some(ENOTDIR)
}

/// Whether a request path (still percent-encoded, query excluded) is one we pass on: no
/// encoded separators, backslashes, NUL or control bytes, and, once decoded, no `.` or `..`
/// segment and no segment starting with a dot.
fn is_safe(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if ["%2f", "%5c", "%00"].iter().any(|e| lower.contains(e)) {
        return false;
    }
    let Some(decoded) = percent_decode(path) else {
        return false;
    };
    if decoded.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return false;
    }
    decoded
        .split('/')
        .skip(1)
        .all(|segment| !segment.starts_with('.'))
}

impl Confined {
    /// The real path of `path` if it may be served: inside the root once symlinks are
    /// resolved, no dot segment below the root, not a hidden file. Anything else is NotFound,
    /// so the client learns nothing about what is outside.
    async fn check(&self, path: &Path) -> io::Result<PathBuf> {
        let not_found = || io::Error::new(io::ErrorKind::NotFound, "not served");
        let below = path.strip_prefix(&self.root).map_err(|_| not_found())?;
        let dotted = below.components().any(|c| match c {
            Component::Normal(name) => name.to_string_lossy().starts_with('.'),
            _ => true,
        });
        if dotted {
            return Err(not_found());
        }
        let real = tokio::fs::canonicalize(path).await?;
        let hidden = self.hidden.iter().any(|h| real.starts_with(h));
        if !real.starts_with(&self.root) || hidden {
            return Err(not_found());
        }
        Ok(real)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

impl Backend for Confined {
    type File = <TokioBackend as Backend>::File;
    type Metadata = std::fs::Metadata;
    type OpenFuture = BoxFuture<Self::File>;
    type MetadataFuture = BoxFuture<std::fs::Metadata>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        let me = self.clone();
        Box::pin(async move {
            let real = me.check(&path).await?;
            TokioBackend.open(real).await
        })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        let me = self.clone();
        Box::pin(async move {
            let real = me.check(&path).await?;
            tokio::fs::metadata(real).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused_before_serve_dir() {
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/.%2e/x",
            "/a%2f..%2fb",
            "/a%2F..",
            "/a\\..\\b",
            "/a%5c..",
            "/a%00.html",
            "/.htpasswd",
            "/.git/config",
            "/a/./b",
            "/%zz",
            "/%ff",
        ] {
            assert!(!is_safe(bad), "{bad} should be refused");
        }
        for good in ["/", "/index.html", "/core/rfb.js", "/a%20b.txt", "/a..b/c"] {
            assert!(is_safe(good), "{good} should pass");
        }
    }
}
