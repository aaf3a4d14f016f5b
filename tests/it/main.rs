//! wsgate's integration tests, one binary (one link of tokio, hyper and rustls), a module per
//! feature. Every test binds 127.0.0.1 on ports the OS picks, and every wait is bounded.

// The helpers in `common` are `pub` for the test modules; nothing here is an API.
#![allow(unreachable_pub)]

mod admin;
mod auth;
mod browser;
mod chat;
mod cli;
mod client_limits;
mod codec_props;
mod common;
mod deflate;
mod deploy;
mod docs;
mod failover;
mod fleet;
mod fuzz_corpus;
#[path = "../support/h2io.rs"]
mod h2io;
mod handshake;
mod hardening;
mod http2;
mod limits;
mod lines;
mod novnc;
mod operations;
mod protocol;
mod proxy;
mod proxy_protocol;
mod python_peer;
mod relay;
mod scale_out;
mod security;
mod tls;
mod unix_listen;
mod websockify;
