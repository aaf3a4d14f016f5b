//! Arbitrary bytes as Redis token values, JWT claims and Redis sources. See `fuzz/checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::token_values(data));
