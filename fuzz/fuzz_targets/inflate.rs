//! Arbitrary bytes as a compressed message's payload, through a decoder that agreed on
//! permessage-deflate, whole and in pieces. See `fuzz/checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::inflate(data));
