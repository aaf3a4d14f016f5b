//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`) through the same
//! functions the cargo-fuzz targets call, on stable, so CI keeps the corpus checked.

use std::path::Path;

#[path = "../../fuzz/checks.rs"]
mod checks;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the corpus is committed)", dir.display()));
    let mut replayed = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
        replayed += 1;
    }
    assert!(replayed > 0, "{}: empty corpus", dir.display());
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", checks::frame_decoder);
}

#[test]
fn handshake_request_corpus() {
    replay("handshake_request", checks::handshake_request);
}

#[test]
fn config_corpus() {
    replay("config", checks::config);
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", checks::proxy_header);
}

#[test]
fn inflate_corpus() {
    replay("inflate", checks::inflate);
}

#[test]
fn request_path_corpus() {
    replay("request_path", checks::request_path);
}

#[test]
fn token_file_corpus() {
    replay("token_file", checks::token_file);
}

#[test]
fn auth_files_corpus() {
    replay("auth_files", checks::auth_files);
}

#[test]
fn token_values_corpus() {
    replay("token_values", checks::token_values);
}
