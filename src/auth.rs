//! Auth before the upgrade, per route (`auth = { basic = FILE }`, `{ bearer = FILE }` or
//! `{ client_cert_names = [..] }`). The files are read with the config, so a reload reads
//! them again. Nothing here logs a credential.
//!
//! - **basic**: Apache htpasswd lines `user:hash`, bcrypt hashes only (`$2y$`, `$2b$`,
//!   `$2a$`, as `htpasswd -B` writes them). Any other kind of hash stops the config load:
//!   MD5-crypt, SHA-1 and crypt(3) are too weak to offer. An unknown user is checked against
//!   a dummy hash at the highest cost in the file, so the answer takes as long as for a known
//!   one. bcrypt is slow on purpose, so it must cost an attacker more than us:
//!   - it runs on a pool as large as the machine's cores, with a queue of four checks per
//!     core; past that the request gets 503 with Retry-After at once, and a check still
//!     queued when its client leaves is never run;
//!   - a header that passed is remembered for [`REMEMBER_FOR`] by an HMAC of it under a key
//!     made at start (never the header itself), so a page load of dozens of files costs one
//!     bcrypt. A reload reads the file again and forgets them all.
//! - **bearer**: one token per line (blank lines and `#` comments skipped), presented as
//!   `Authorization: Bearer T`, or, because a browser cannot set headers on a WebSocket, as an
//!   `access_token` query parameter or cookie. SHA-256 digests are compared in constant time
//!   against every token, so neither a token's text nor its length shows in the timing.
//! - **client_cert_names**: on mTLS listeners, the client certificate's subject common name
//!   must be one of the list (websockify's `ClientCertCNAuth`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::StatusCode;
use subtle::ConstantTimeEq;

use crate::params::{cookie, query_param};
use crate::protocol::handshake::Rejection;
use crate::token_file::operator_lines;

/// A route's auth.
#[derive(Debug, Clone)]
pub enum Auth {
    Basic(Arc<Htpasswd>),
    Bearer(Arc<BearerTokens>),
    ClientCertNames(Vec<String>),
}

/// Two routes' auth is the same when it is the same kind read from the same file (or the same
/// list of names).
impl PartialEq for Auth {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Auth::Basic(a), Auth::Basic(b)) => Arc::ptr_eq(a, b),
            (Auth::Bearer(a), Auth::Bearer(b)) => Arc::ptr_eq(a, b),
            (Auth::ClientCertNames(a), Auth::ClientCertNames(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Auth {}

/// A file wsgate cannot use for auth; the config load stops with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFileError {
    #[error("line {line}: not `user:hash`")]
    NotUserHash { line: usize },
    #[error("line {line}: not UTF-8")]
    NotUtf8 { line: usize },
    #[error(
        "line {line}: user {user:?} has a hash that is not bcrypt (make it with `htpasswd -B`)"
    )]
    NotBcrypt { line: usize, user: String },
    #[error("line {line}: user {user:?} has a bcrypt cost over 17 (htpasswd -B takes 4 to 17)")]
    CostTooHigh { line: usize, user: String },
    #[error("line {line}: user {user:?} is listed twice")]
    DuplicateUser { line: usize, user: String },
    #[error("line {line}: a token must be one word of printable characters")]
    BadToken { line: usize },
    #[error("no entries")]
    Empty,
}

/// The highest bcrypt cost taken (Apache's `htpasswd -B -C` goes up to 17; each step doubles
/// the work, and 17 already costs seconds a check).
const MAX_BCRYPT_COST: u32 = 17;

/// How long a Basic header that passed is taken without running bcrypt again.
pub const REMEMBER_FOR: Duration = Duration::from_secs(60);

/// At most this many headers are remembered; past it, expired ones are dropped, and a new
/// one is not remembered until there is room.
const REMEMBER_AT_MOST: usize = 4096;

/// Users and their bcrypt hashes.
#[derive(Debug)]
pub struct Htpasswd {
    users: Vec<(String, String)>,
    /// A hash of a random password at the highest cost in the file, checked for an unknown
    /// user.
    dummy: String,
    /// HMACs of Authorization headers that passed, with when they stop counting.
    remembered: Mutex<HashMap<[u8; 32], Instant>>,
    /// bcrypt checks run so far (what remembering and the pool save shows here).
    checks_run: AtomicUsize,
}

/// The key remembered headers are MACed with, made at start.
fn remember_key() -> &'static ring::hmac::Key {
    static KEY: OnceLock<ring::hmac::Key> = OnceLock::new();
    KEY.get_or_init(|| {
        ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the system's random numbers")
    })
}

/// The HMAC a header is remembered by.
fn remembered_as(header: &[u8]) -> [u8; 32] {
    let tag = ring::hmac::sign(remember_key(), header);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The checks bcrypt may run at once (the cores) and how many may wait (four per core).
struct BcryptPool {
    running: tokio::sync::Semaphore,
    admitted: AtomicUsize,
    limit: usize,
}

fn bcrypt_pool() -> &'static BcryptPool {
    static POOL: OnceLock<BcryptPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        BcryptPool {
            running: tokio::sync::Semaphore::new(cores),
            admitted: AtomicUsize::new(0),
            limit: cores * 5,
        }
    })
}

/// A place in the bcrypt pool (running or queued), given back when dropped.
struct Admitted(&'static BcryptPool);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pool is full: the client gets 503 and Retry-After at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl Htpasswd {
    /// Whether the Basic header `header` (its `user:password` already decoded) passes:
    /// remembered, or checked by bcrypt on the bounded pool. Cancel-safe: dropped while
    /// queued, the check never runs.
    async fn check(
        self: &Arc<Self>,
        header: &[u8],
        user: String,
        password: String,
    ) -> Result<bool, Busy> {
        let key = remembered_as(header);
        if self.is_remembered(&key) {
            return Ok(true);
        }
        let pool = bcrypt_pool();
        if pool.admitted.fetch_add(1, Ordering::AcqRel) >= pool.limit {
            pool.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        let _admitted = Admitted(pool);
        let permit = pool.running.acquire().await.map_err(|_| Busy)?;
        let users = self.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let _running = permit;
            users.verify(&user, &password)
        })
        .await
        .unwrap_or(false);
        if ok {
            self.remember(key);
        }
        Ok(ok)
    }

    /// How many bcrypt checks ran.
    pub fn checks_run(&self) -> usize {
        self.checks_run.load(Ordering::Relaxed)
    }

    fn is_remembered(&self, key: &[u8; 32]) -> bool {
        let remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        remembered
            .get(key)
            .is_some_and(|until| *until > Instant::now())
    }

    fn remember(&self, key: [u8; 32]) {
        let now = Instant::now();
        let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if remembered.len() >= REMEMBER_AT_MOST {
            remembered.retain(|_, until| *until > now);
        }
        if remembered.len() < REMEMBER_AT_MOST {
            remembered.insert(key, now + REMEMBER_FOR);
        }
    }
}

impl Htpasswd {
    /// Reads an htpasswd file. Checks every hash (bcrypt at its cost): call it off the async
    /// workers.
    pub fn parse(bytes: &[u8]) -> Result<Htpasswd, AuthFileError> {
        let mut users: Vec<(String, String)> = Vec::new();
        for (n, line) in operator_lines(bytes) {
            let line = line.ok_or(AuthFileError::NotUtf8 { line: n })?;
            let (user, hash) = line
                .split_once(':')
                .filter(|(u, h)| !u.is_empty() && !h.is_empty())
                .ok_or(AuthFileError::NotUserHash { line: n })?;
            let prefixed = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p));
            // Checked before the hash is tried: a cost of 31 would take hours to verify once.
            let cost = hash.get(4..6).and_then(|c| c.parse::<u32>().ok());
            if prefixed && cost.is_some_and(|c| c > MAX_BCRYPT_COST) {
                return Err(AuthFileError::CostTooHigh {
                    line: n,
                    user: user.to_owned(),
                });
            }
            let bcrypt = prefixed && bcrypt::verify("", hash).is_ok();
            if !bcrypt {
                return Err(AuthFileError::NotBcrypt {
                    line: n,
                    user: user.to_owned(),
                });
            }
            if users.iter().any(|(u, _)| u == user) {
                return Err(AuthFileError::DuplicateUser {
                    line: n,
                    user: user.to_owned(),
                });
            }
            users.push((user.to_owned(), hash.to_owned()));
        }
        // Unknown users cost what the dearest known one costs: the highest cost in the file.
        let Some(cost) = users
            .iter()
            .filter_map(|(_, h)| h.get(4..6).and_then(|c| c.parse::<u32>().ok()))
            .max()
        else {
            return Err(AuthFileError::Empty);
        };
        let random: [u8; 16] = std::array::from_fn(|i| (users.len() * 31 + i * 7) as u8);
        let dummy = bcrypt::hash(random, cost).map_err(|_| AuthFileError::Empty)?;
        Ok(Htpasswd {
            users,
            dummy,
            remembered: Mutex::new(HashMap::new()),
            checks_run: AtomicUsize::new(0),
        })
    }

    /// Whether `password` is `user`'s. Slow on purpose (bcrypt): call it off the async
    /// workers.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.checks_run.fetch_add(1, Ordering::Relaxed);
        let known = self.users.iter().find(|(u, _)| u == user);
        let hash = known.map_or(self.dummy.as_str(), |(_, h)| h.as_str());
        let matches = bcrypt::verify(password, hash).unwrap_or(false);
        known.is_some() && matches
    }
}

/// Accepted bearer tokens, as SHA-256 digests (fixed length, so comparing them shows
/// nothing of a token's length).
#[derive(Debug)]
pub struct BearerTokens {
    digests: Vec<[u8; 32]>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

impl BearerTokens {
    pub fn parse(bytes: &[u8]) -> Result<BearerTokens, AuthFileError> {
        let mut tokens = Vec::new();
        for (n, line) in operator_lines(bytes) {
            let line = line.ok_or(AuthFileError::NotUtf8 { line: n })?;
            if !line.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(AuthFileError::BadToken { line: n });
            }
            tokens.push(sha256(line.as_bytes()));
        }
        if tokens.is_empty() {
            return Err(AuthFileError::Empty);
        }
        Ok(BearerTokens { digests: tokens })
    }

    /// Whether `token` is one of the file's: its digest compared against every one in
    /// constant time.
    pub fn accepts(&self, token: &str) -> bool {
        let presented = sha256(token.as_bytes());
        let mut found = subtle::Choice::from(0);
        for t in &self.digests {
            found |= t.ct_eq(&presented);
        }
        found.into()
    }
}

/// What a request carries that auth looks at.
pub struct Presented<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    /// Common names of the client certificate (mTLS listeners), empty without one.
    pub cert_names: &'a [String],
}

impl Auth {
    /// Checks the request; `Err` is the refusal (401 with a challenge, 403, or 503 when
    /// the bcrypt pool is full). Basic auth runs bcrypt on the bounded pool unless the header
    /// passed within [`REMEMBER_FOR`]. Cancel-safe.
    pub async fn check(&self, presented: Presented<'_>) -> Result<(), Rejection> {
        match self {
            Auth::Basic(users) => {
                let challenge =
                    HeaderValue::from_static("Basic realm=\"wsgate\", charset=\"UTF-8\"");
                let Some((user, password)) = basic_credentials(presented.headers) else {
                    return Err(unauthorized("credentials_missing", challenge));
                };
                let header = presented
                    .headers
                    .get(AUTHORIZATION)
                    .map_or(&b""[..], HeaderValue::as_bytes);
                match users.check(header, user, password).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(unauthorized("credentials_refused", challenge)),
                    Err(Busy) => Err(Rejection::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "auth_busy",
                        "too many credential checks at once; try again later",
                    )
                    .with_header(RETRY_AFTER, HeaderValue::from_static("1"))),
                }
            }
            Auth::Bearer(tokens) => match bearer_token(&presented) {
                None => Err(unauthorized(
                    "credentials_missing",
                    HeaderValue::from_static("Bearer realm=\"wsgate\""),
                )),
                Some(t) if tokens.accepts(&t) => Ok(()),
                Some(_) => Err(unauthorized(
                    "credentials_refused",
                    HeaderValue::from_static("Bearer realm=\"wsgate\", error=\"invalid_token\""),
                )),
            },
            Auth::ClientCertNames(allowed) => {
                if presented.cert_names.iter().any(|n| allowed.contains(n)) {
                    Ok(())
                } else if presented.cert_names.is_empty() {
                    Err(Rejection::new(
                        StatusCode::FORBIDDEN,
                        "client_certificate_missing",
                        "a client certificate is required",
                    ))
                } else {
                    Err(Rejection::new(
                        StatusCode::FORBIDDEN,
                        "client_certificate_refused",
                        "this client certificate's name is not allowed",
                    ))
                }
            }
        }
    }
}

fn unauthorized(label: &'static str, challenge: HeaderValue) -> Rejection {
    Rejection::new(StatusCode::UNAUTHORIZED, label, "authentication required")
        .with_header(WWW_AUTHENTICATE, challenge)
}

/// `Authorization: Basic base64(user:password)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The bearer token: the Authorization header, else the `access_token` query parameter, else
/// the `access_token` cookie.
fn bearer_token(p: &Presented<'_>) -> Option<String> {
    let header = p
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    header
        .or_else(|| query_param(p.query, "access_token"))
        .or_else(|| cookie(p.headers, "access_token"))
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htpasswd_takes_bcrypt_only() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let users = Htpasswd::parse(format!("# users\nalice:{hash}\n\n").as_bytes()).unwrap();
        assert!(users.verify("alice", "secret"));
        assert!(!users.verify("alice", "Secret"));
        assert!(!users.verify("bob", "secret"));
        for (text, err) in [
            (
                "bob:$apr1$xyz$abc".to_owned(),
                AuthFileError::NotBcrypt {
                    line: 1,
                    user: "bob".into(),
                },
            ),
            (
                "bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=".to_owned(),
                AuthFileError::NotBcrypt {
                    line: 1,
                    user: "bob".into(),
                },
            ),
            (
                "\nbob:rl0lPzRMNVmBk".to_owned(),
                AuthFileError::NotBcrypt {
                    line: 2,
                    user: "bob".into(),
                },
            ),
            ("nohash".to_owned(), AuthFileError::NotUserHash { line: 1 }),
            (
                format!("a:{hash}\na:{hash}"),
                AuthFileError::DuplicateUser {
                    line: 2,
                    user: "a".into(),
                },
            ),
            ("# nobody".to_owned(), AuthFileError::Empty),
        ] {
            assert_eq!(Htpasswd::parse(text.as_bytes()).unwrap_err(), err, "{text}");
        }
        assert!(Htpasswd::parse(b"x:$2y$10$tooshort").is_err());
        // A cost that would take hours is refused before it is tried.
        let slow = format!("x:$2y$31${}", &hash[7..]);
        assert_eq!(
            Htpasswd::parse(slow.as_bytes()).unwrap_err(),
            AuthFileError::CostTooHigh {
                line: 1,
                user: "x".into()
            }
        );
    }

    fn basic(user_password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        );
        h.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
        h
    }

    fn check_basic(
        auth: &Auth,
        headers: &HeaderMap,
    ) -> impl std::future::Future<Output = Result<(), Rejection>> + Send + 'static {
        let auth = auth.clone();
        let headers = headers.clone();
        async move {
            auth.check(Presented {
                headers: &headers,
                query: None,
                cert_names: &[],
            })
            .await
        }
    }

    /// A page load of dozens of files with the same good header costs one bcrypt; a wrong
    /// password is never remembered.
    async fn a_header_that_passed_is_remembered_not_checked_again() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = Arc::new(Htpasswd::parse(format!("alice:{hash}\n").as_bytes()).unwrap());
        let auth = Auth::Basic(users.clone());
        let good = basic("alice:pw");
        for _ in 0..30 {
            assert!(check_basic(&auth, &good).await.is_ok());
        }
        assert_eq!(users.checks_run(), 1);
        let bad = basic("alice:wrong");
        for _ in 0..3 {
            assert_eq!(check_basic(&auth, &bad).await.unwrap_err().status, 401);
        }
        assert_eq!(users.checks_run(), 4);
    }

    /// Past the pool and its queue, checks are refused at once (503), and checks still queued
    /// when their client leaves never run. (One test with the remembering one: the pool is
    /// the process's, and flooding it would refuse a test running beside it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bcrypt_is_remembered_bounded_and_dropped_with_its_client() {
        a_header_that_passed_is_remembered_not_checked_again().await;
        let hash = bcrypt::hash("pw", 10).unwrap();
        let users = Arc::new(Htpasswd::parse(format!("alice:{hash}\n").as_bytes()).unwrap());
        let auth = Auth::Basic(users.clone());
        let tasks: Vec<_> = (0..200)
            .map(|i| tokio::spawn(check_basic(&auth, &basic(&format!("alice:bad{i}")))))
            .collect();
        // The pool admits cores × 5; the rest are refused without waiting for bcrypt.
        let limit = bcrypt_pool().limit;
        let started = Instant::now();
        while tasks.iter().filter(|t| t.is_finished()).count() < 200 - limit {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the refusals come at once"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut busy = 0;
        let mut pending = Vec::new();
        for t in tasks {
            if t.is_finished() {
                let r = t.await.unwrap();
                if r.as_ref().is_err_and(|e| e.status == 503) {
                    busy += 1;
                }
            } else {
                pending.push(t);
            }
        }
        // Clients that leave: abort what is still queued or running.
        for t in &pending {
            t.abort();
        }
        for t in pending {
            if let Ok(r) = t.await {
                if r.is_err_and(|e| e.status == 503) {
                    busy += 1;
                }
            }
        }
        assert!(busy >= 200 - limit, "{busy} refused, limit {limit}");
        // Give the pool's running checks time to finish: at most the cores ran (and a few
        // that had started before the abort), never the queued ones.
        let started = Instant::now();
        while bcrypt_pool().admitted.load(Ordering::Acquire) > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the pool drains"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert!(
            users.checks_run() <= cores * 2,
            "{} ran",
            users.checks_run()
        );
    }

    #[test]
    fn unknown_users_cost_the_dearest_hash() {
        let cheap = bcrypt::hash("a", 4).unwrap();
        let dear = bcrypt::hash("b", 6).unwrap();
        let users = Htpasswd::parse(format!("a:{cheap}\nb:{dear}\n").as_bytes()).unwrap();
        assert_eq!(&users.dummy[4..6], "06");
    }

    #[test]
    fn bearer_tokens() {
        let tokens = BearerTokens::parse(b"# t\nabc123\n\nxyz-789\n").unwrap();
        assert!(tokens.accepts("abc123"));
        assert!(tokens.accepts("xyz-789"));
        assert!(!tokens.accepts("abc12"));
        assert!(!tokens.accepts(""));
        assert_eq!(
            BearerTokens::parse(b"a b").unwrap_err(),
            AuthFileError::BadToken { line: 1 }
        );
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  abc123 "));
        let p = |headers, query| Presented {
            headers,
            query,
            cert_names: &[],
        };
        assert_eq!(bearer_token(&p(&h, None)).as_deref(), Some("abc123"));
        let empty = HeaderMap::new();
        assert_eq!(
            bearer_token(&p(&empty, Some("access_token=q"))).as_deref(),
            Some("q")
        );
        assert_eq!(bearer_token(&p(&empty, None)), None);
    }

    #[test]
    fn basic_header() {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic YWxpY2U6czpl"), // alice:s:e
        );
        assert_eq!(basic_credentials(&h), Some(("alice".into(), "s:e".into())));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_credentials(&h), None);
    }
}
