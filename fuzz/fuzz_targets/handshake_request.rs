//! Arbitrary request heads (method, version, header lines) through the RFC 6455 checks:
//! never a panic, and an accepted handshake always carries a well-formed accept key.
#![no_main]

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Version};
use libfuzzer_sys::fuzz_target;
use wsgate::route::{Backend, MessageMode};
use wsgate::protocol::handshake;
use wsgate::route::Route;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = Method::from_bytes(parts.next().unwrap_or("").as_bytes()).unwrap_or(Method::GET);
    let version = match parts.nth(1) {
        Some("HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.trim().as_bytes()),
                HeaderValue::from_bytes(value.trim().as_bytes()),
            ) {
                headers.append(n, v);
            }
        }
    }
    let route = Route::new(
        "/",
        Backend::Echo,
        vec!["binary".into(), "chat".into()],
        vec!["https://ok.example".into()],
        MessageMode::Binary,
    );
    match handshake::check(&method, version, &headers, &route) {
        Ok(accepted) => {
            assert_eq!(accepted.accept.len(), 28);
            assert!(accepted.protocol.as_deref().is_some_and(|p| p == "binary" || p == "chat"));
        }
        Err(rejection) => assert!(!rejection.reason.is_empty()),
    }
});
