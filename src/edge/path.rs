//! The one canonical form of a request path. Every request's target is made canonical once,
//! before anything looks at it; that one path selects the route, is what auth and limits
//! judge, what the file server serves and what a proxy route sends to its app. So no other
//! spelling of a path (`//private`, `/%70rivate`, `/./private`) can reach what a route's
//! rules guard without passing them.
//!
//! The form, as nginx (`merge_slashes`) and Envoy (`normalize_path`, `merge_slashes`) make it:
//! - percent-encoded unreserved characters (RFC 3986 §2.3: letters, digits, `-._~`) are
//!   decoded; other escapes stay encoded, their hex digits upper-cased (§6.2.2.1);
//! - runs of `/` are merged into one.
//!
//! Refused (the request gets 400), because no canonical form could say what the client meant
//! without guessing: dot segments (`.` and `..`, plain or encoded), encoded `/`, `\`, NUL or
//! control bytes, a raw `\` or control byte, a bad escape, bytes that are not UTF-8 once
//! decoded, and `%25` (an encoded `%`) hiding any of those from a second decoder (`%252e`,
//! `%252f`, `%2500`, `%2525`). Pure: no I/O.

use std::borrow::Cow;

/// Why a path has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form (`*`, an empty path): nothing to route.
    NotAbsolute,
    /// A `.` or `..` segment, plain or encoded.
    DotSegment,
    /// `%2F` or `%5C`: a separator that a later decoder would split on.
    EncodedSeparator,
    /// NUL or another control byte, raw or encoded, or a raw `\`.
    ControlOrBackslash,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
    /// `%25` followed by an escape of something refused here (a second decoding would
    /// reveal it).
    DoubleEncoded,
}

impl PathError {
    /// The one-line reason the client is told (fixed text).
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the request path must start with /",
            PathError::DotSegment => "the request path has a . or .. segment",
            PathError::EncodedSeparator => "the request path has an encoded / or \\",
            PathError::ControlOrBackslash => "the request path has a control byte or \\",
            PathError::BadEscape => "the request path has a bad %-escape",
            PathError::NotUtf8 => "the request path is not UTF-8 once decoded",
            PathError::DoubleEncoded => "the request path hides an escape behind %25",
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for PathError {}

/// The canonical form of `path` (a request target's path, query excluded), borrowed when it
/// already is canonical.
pub fn canonical(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let plain = !bytes
        .iter()
        .any(|&b| b == b'%' || b == b'\\' || b < 0x20 || b == 0x7f)
        && !path.contains("//");
    if plain {
        if !path.is_ascii() {
            // A raw non-ASCII byte cannot come from a valid request line, but check anyway.
            std::str::from_utf8(bytes).map_err(|_| PathError::NotUtf8)?;
        }
        check_segments(path)?;
        return Ok(Cow::Borrowed(path));
    }
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    // The decoded bytes, to check UTF-8 (escapes of non-ASCII bytes stay encoded in `out`).
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let v = hex_pair(bytes, i + 1).ok_or(PathError::BadEscape)?;
                i += 3;
                if is_unreserved(v) {
                    out.push(v);
                } else {
                    refused_byte(v, PathError::EncodedSeparator)?;
                    out.extend([b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 0xf)]]);
                }
                decoded.push(v);
                continue;
            }
            b'/' if out.last() == Some(&b'/') => {}
            _ => {
                if b == b'\\' || b < 0x20 || b == 0x7f {
                    return Err(PathError::ControlOrBackslash);
                }
                out.push(b);
                decoded.push(b);
            }
        }
        i += 1;
    }
    std::str::from_utf8(&decoded).map_err(|_| PathError::NotUtf8)?;
    // Checked on the result, not the input: a decoded letter may complete what follows a
    // `%25` (`%25%32%65` and `%252%65` both become `%252e`).
    if hides_behind_percent(&out) {
        return Err(PathError::DoubleEncoded);
    }
    // Raw bytes were copied as they came and escapes made ASCII: UTF-8 if `decoded` is.
    let out = String::from_utf8(out).map_err(|_| PathError::NotUtf8)?;
    check_segments(&out)?;
    Ok(Cow::Owned(out))
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The byte a `%XX` at `at` stands for.
fn hex_pair(bytes: &[u8], at: usize) -> Option<u8> {
    let pair = bytes.get(at..at + 2)?;
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Refuses the bytes no escape may carry: separators (as `separator`) and control bytes.
fn refused_byte(v: u8, separator: PathError) -> Result<(), PathError> {
    match v {
        b'/' | b'\\' => Err(separator),
        0..=0x1f | 0x7f => Err(PathError::ControlOrBackslash),
        _ => Ok(()),
    }
}

/// Whether `path` holds `%25` followed by an escape a second decoder would turn into
/// something refused here (see [`hides_something`]).
fn hides_behind_percent(path: &[u8]) -> bool {
    path.windows(3)
        .enumerate()
        .filter(|(_, w)| *w == b"%25")
        .any(|(i, _)| hex_pair(path, i + 3).is_some_and(hides_something))
}

/// Whether an escape behind `%25` would, decoded once more, be one this module refuses or
/// decodes: a separator, a control byte, a dot, or `%` itself.
fn hides_something(v: u8) -> bool {
    refused_byte(v, PathError::EncodedSeparator).is_err() || v == b'.' || v == b'%'
}

fn check_segments(path: &str) -> Result<(), PathError> {
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn attack_spellings_become_the_plain_path() {
        for (raw, want) in [
            ("/private/secret.html", "/private/secret.html"),
            ("//private/secret.html", "/private/secret.html"),
            ("/%70rivate/secret.html", "/private/secret.html"),
            ("/%70RIVATE", "/pRIVATE"),
            ("///private//x///", "/private/x/"),
            ("/a%7Eb%2db%5f", "/a~b-b_"),
            ("/a%20b", "/a%20b"),
            ("/a%3bb", "/a%3Bb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/a..b/c.", "/a..b/c."),
            ("/100%2541", "/100%2541"),
            ("/", "/"),
        ] {
            assert_eq!(canonical(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        use PathError::*;
        for (raw, why) in [
            ("/./private", DotSegment),
            ("/a/../private", DotSegment),
            ("/%2e%2e/etc/passwd", DotSegment),
            ("/%2E/private", DotSegment),
            ("/.%2e", DotSegment),
            ("/a/..", DotSegment),
            ("/private%2fsecret", EncodedSeparator),
            ("/private%5Csecret", EncodedSeparator),
            ("/a\\b", ControlOrBackslash),
            ("/a%00.html", ControlOrBackslash),
            ("/a%0a", ControlOrBackslash),
            ("/a%7f", ControlOrBackslash),
            ("/a%zz", BadEscape),
            ("/a%4", BadEscape),
            ("/a%", BadEscape),
            ("/%ff", NotUtf8),
            ("/%C3", NotUtf8),
            ("/%252e%252e/x", DoubleEncoded),
            ("/a%252fb", DoubleEncoded),
            ("/a%255Cb", DoubleEncoded),
            ("/a%2500", DoubleEncoded),
            ("/a%252525", DoubleEncoded),
            // Regression (fuzz target request_path): a decoded letter completed the escape
            // behind `%25`, and the canonical form was refused when made canonical again.
            ("/%60/%252%65$*", DoubleEncoded),
            ("/%25%32%65", DoubleEncoded),
            ("*", NotAbsolute),
            ("", NotAbsolute),
        ] {
            assert_eq!(canonical(raw), Err(why), "{raw}");
        }
    }

    /// Decodes every escape: what a server that decodes once before it routes would see.
    fn fully_decoded(path: &str) -> Vec<u8> {
        let b = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match (b[i], hex_pair(b, i + 1)) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        out
    }

    /// The segments a decoding server sees, empty ones (repeated slashes) dropped.
    fn segments(decoded: &[u8]) -> Vec<Vec<u8>> {
        decoded
            .split(|&b| b == b'/')
            .filter(|s| !s.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Paths from the attack alphabet: a canonical form is canonical again unchanged, has
        /// no `//`, no dot segment and no escape a second decoder could turn into one; and it
        /// means what the raw path meant to a server that decodes once before it routes.
        #[test]
        fn canonical_paths_mean_what_the_raw_path_meant(
            raw in proptest::string::string_regex("/[/.%250-9a-fA-FpPrRiI\\\\~_-]{0,24}").unwrap()
        ) {
            if let Ok(c) = canonical(&raw) {
                let again = canonical(&c);
                prop_assert_eq!(again.as_deref(), Ok(&*c));
                prop_assert!(!c.contains("//"));
                prop_assert!(c.split('/').all(|s| s != "." && s != ".."));
                prop_assert_eq!(segments(&fully_decoded(&c)), segments(&fully_decoded(&raw)));
                let once = fully_decoded(&c);
                prop_assert!(!once.contains(&b'\\') && !once.iter().any(u8::is_ascii_control));
                prop_assert!(segments(&once).iter().all(|s| s != b"." && s != b".."));
            }
        }
    }
}
