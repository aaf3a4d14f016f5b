//! Arbitrary bytes through the operator-file parsers (token_file). See `fuzz/checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::token_file(data));
