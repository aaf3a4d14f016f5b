//! Values a browser can put on a WebSocket request: query parameters and cookies (a browser
//! cannot set headers on a WebSocket, so tokens travel this way). Pure functions.

use hyper::header::{HeaderMap, COOKIE};

/// The first value of query parameter `name`, decoded as a form value (`%XX`, `+` is a
/// space). `None` when absent or not UTF-8 once decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(key)? == name).then(|| decode(value)).flatten()
    })
}

/// The value of cookie `name` from the request's Cookie headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
        })
}

/// Form decoding: `+` is a space, then [`percent_decode`].
fn decode(s: &str) -> Option<String> {
    percent_decode(&s.replace('+', " "))
}

/// `%XX` decoded; `None` for a bad escape or bytes that are not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn query_params() {
        let q = Some("path=websockify&token=abc%2Fd&token=second&x");
        assert_eq!(query_param(q, "token").as_deref(), Some("abc/d"));
        assert_eq!(query_param(q, "path").as_deref(), Some("websockify"));
        assert_eq!(query_param(q, "x").as_deref(), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "token"), None);
        assert_eq!(
            query_param(Some("access_token=a+b%20c"), "access_token").as_deref(),
            Some("a b c")
        );
        assert_eq!(query_param(Some("token=%zz"), "token"), None);
        assert_eq!(query_param(Some("token=%+1"), "token"), None);
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("xtoken=no; a=1"));
        h.append(COOKIE, HeaderValue::from_static("token=\"yes\"; b=2"));
        assert_eq!(cookie(&h, "token").as_deref(), Some("yes"));
        assert_eq!(cookie(&h, "b").as_deref(), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
