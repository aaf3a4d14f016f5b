//! Arbitrary bytes through the operator-file parsers (auth_files). See `fuzz/checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::auth_files(data));
