//! The `wsgate` command: CLI, logging, signals (SIGTERM/SIGINT drain, SIGHUP reload).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};
use wsgate::{Config, Handle, Server};

/// WebSocket gateway: bridges WebSocket clients to TCP/unix backends.
///
/// Quick start, like websockify: `wsgate 127.0.0.1:8080 127.0.0.1:5900` listens on the first
/// address and bridges every WebSocket path to the TCP service at the second.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Run from this TOML config file (SIGHUP reloads it).
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["listen", "target", "check_config"])]
    config: Option<PathBuf>,

    /// Validate this config file, print what is wrong (key and line), and exit.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "target"])]
    check_config: Option<PathBuf>,

    /// Also reload when the config file changes (checked every second).
    #[arg(long, requires = "config")]
    watch: bool,

    /// Log line format; filter with RUST_LOG (default "info").
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Quick mode: address to listen on, e.g. 127.0.0.1:8080.
    #[arg(requires = "target")]
    listen: Option<String>,

    /// Quick mode: backend, e.g. 127.0.0.1:5900, tcp://host:port, unix:/path or echo.
    target: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }

    if let Some(path) = cli.check_config {
        return match Config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} route(s){})",
                    path.display(),
                    c.listen.len(),
                    c.routes.routes().len(),
                    if c.admin.is_some() { ", admin" } else { "" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wsgate: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config = match (&cli.config, &cli.listen, &cli.target) {
        (Some(path), _, _) => Config::load(path),
        (None, Some(listen), Some(target)) => Config::quick(listen, target),
        _ => {
            eprintln!("wsgate: give --config FILE, or LISTEN and TARGET (see --help)");
            return ExitCode::from(2);
        }
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::from(2);
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("wsgate: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Signal handlers are installed before the listeners are announced, so a signal sent
        // as soon as wsgate says "listening" is never met by the default action (exit).
        let stop = shutdown_signal();
        if let Some(path) = &cli.config {
            server = server.with_config_path(path.clone());
            let handle = server.handle();
            match signal(SignalKind::hangup()) {
                Ok(hup) => {
                    tokio::spawn(reload_on_sighup(hup, handle.clone()));
                }
                Err(_) => warn!("cannot listen for SIGHUP; reload by signal is off"),
            }
            if cli.watch {
                tokio::spawn(reload_on_change(handle, path.clone()));
            }
        }
        server.run(stop).await;
        ExitCode::SUCCESS
    })
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either signal.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
        info!("shutdown signal received");
    }
}

async fn reload_on_sighup(mut hup: Signal, handle: Handle) {
    while hup.recv().await.is_some() {
        info!("SIGHUP: reloading config");
        let _ = handle.reload().await;
    }
}

/// Polls the file once a second and reloads when its contents change (polling also sees
/// the symlink swaps Kubernetes uses for mounted ConfigMaps).
async fn reload_on_change(handle: Handle, path: PathBuf) {
    let read = |p: &Path| std::fs::read(p).ok();
    let mut last = read(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = read(&path);
        if now.is_some() && now != last {
            info!(path = %path.display(), "config file changed: reloading");
            let _ = handle.reload().await;
            last = now;
        }
    }
}
