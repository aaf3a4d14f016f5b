//! Arbitrary request heads through the RFC 6455 handshake checks. See `fuzz/checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::handshake_request(data));
