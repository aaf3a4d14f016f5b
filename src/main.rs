//! The `wsgate` command: CLI, logging, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wsgate::{Config, Server};

/// WebSocket gateway: bridges WebSocket clients to TCP/unix backends.
///
/// Quick start, like websockify: `wsgate 127.0.0.1:8080 127.0.0.1:5900` listens on the first
/// address and bridges every WebSocket path to the TCP service at the second.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Run from this TOML config file.
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["listen", "target", "check_config"])]
    config: Option<PathBuf>,

    /// Validate this config file, print what is wrong (key and line), and exit.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "target"])]
    check_config: Option<PathBuf>,

    /// Quick mode: address to listen on, e.g. 127.0.0.1:8080.
    #[arg(requires = "target")]
    listen: Option<String>,

    /// Quick mode: backend, e.g. 127.0.0.1:5900, tcp://host:port, unix:/path or echo.
    target: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    if let Some(path) = cli.check_config {
        return match Config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} route(s))",
                    path.display(),
                    c.listen.len(),
                    c.routes.routes().len()
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
        (Some(path), _, _) => Config::load(path).map_err(|e| e.to_string()),
        (None, Some(listen), Some(target)) => Config::quick(listen, target),
        _ => Err("give --config FILE, or LISTEN and TARGET (see --help)".to_owned()),
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
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("wsgate: {e}");
                return ExitCode::FAILURE;
            }
        };
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown signal received");
}
