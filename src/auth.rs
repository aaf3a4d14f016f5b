//! Auth before the upgrade, per route (`auth = { basic = FILE }`, `{ bearer = FILE }` or
//! `{ client_cert_names = [..] }`). The files are read with the config, so a reload reads
//! them again. Nothing here logs a credential.
//!
//! - **basic**: Apache htpasswd lines `user:hash`, bcrypt hashes only (`$2y$`, `$2b$`,
//!   `$2a$`, as `htpasswd -B` writes them). Any other kind of hash stops the config load:
//!   MD5-crypt, SHA-1 and crypt(3) are too weak to offer. An unknown user is checked against
//!   a dummy hash, so the answer takes as long as for a known one.
//! - **bearer**: one token per line (blank lines and `#` comments skipped), presented as
//!   `Authorization: Bearer T`, or, because a browser cannot set headers on a WebSocket, as an
//!   `access_token` query parameter or cookie. Compared in constant time against every token.
//! - **client_cert_names**: on mTLS listeners, the client certificate's subject common name
//!   must be one of the list (websockify's `ClientCertCNAuth`).

use std::sync::Arc;

use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
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
    #[error("line {line}: user {user:?} is listed twice")]
    DuplicateUser { line: usize, user: String },
    #[error("line {line}: a token must be one word of printable characters")]
    BadToken { line: usize },
    #[error("no entries")]
    Empty,
}

/// Users and their bcrypt hashes.
#[derive(Debug)]
pub struct Htpasswd {
    users: Vec<(String, String)>,
    /// A hash of a random password at the first user's cost, checked for an unknown user.
    dummy: String,
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
            let bcrypt = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p))
                && bcrypt::verify("", hash).is_ok();
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
        Ok(Htpasswd { users, dummy })
    }

    /// Whether `password` is `user`'s. Slow on purpose (bcrypt): call it off the async
    /// workers.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let known = self.users.iter().find(|(u, _)| u == user);
        let hash = known.map_or(self.dummy.as_str(), |(_, h)| h.as_str());
        let matches = bcrypt::verify(password, hash).unwrap_or(false);
        known.is_some() && matches
    }
}

/// Accepted bearer tokens.
#[derive(Debug)]
pub struct BearerTokens {
    tokens: Vec<String>,
}

impl BearerTokens {
    pub fn parse(bytes: &[u8]) -> Result<BearerTokens, AuthFileError> {
        let mut tokens = Vec::new();
        for (n, line) in operator_lines(bytes) {
            let line = line.ok_or(AuthFileError::NotUtf8 { line: n })?;
            if !line.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(AuthFileError::BadToken { line: n });
            }
            tokens.push(line.to_owned());
        }
        if tokens.is_empty() {
            return Err(AuthFileError::Empty);
        }
        Ok(BearerTokens { tokens })
    }

    /// Whether `token` is one of the file's, comparing against every one in constant time.
    pub fn accepts(&self, token: &str) -> bool {
        let mut found = subtle::Choice::from(0);
        for t in &self.tokens {
            found |= t.as_bytes().ct_eq(token.as_bytes());
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
    /// Checks the request; `Err` is the refusal (401 with a challenge, or 403). Basic auth
    /// runs bcrypt on the blocking pool.
    pub async fn check(&self, presented: Presented<'_>) -> Result<(), Rejection> {
        match self {
            Auth::Basic(users) => {
                let challenge =
                    HeaderValue::from_static("Basic realm=\"wsgate\", charset=\"UTF-8\"");
                let Some((user, password)) = basic_credentials(presented.headers) else {
                    return Err(unauthorized("credentials_missing", challenge));
                };
                let users = users.clone();
                let ok = tokio::task::spawn_blocking(move || users.verify(&user, &password))
                    .await
                    .unwrap_or(false);
                if ok {
                    Ok(())
                } else {
                    Err(unauthorized("credentials_refused", challenge))
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
