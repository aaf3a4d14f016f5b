//! The `wsgate` command: CLI, logging, signals (SIGTERM/SIGINT drain, SIGHUP reload).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};
use wsgate::config::QuickArgs;
use wsgate::{Config, Handle, Server};

/// WebSocket gateway: bridges WebSocket clients to TCP/unix backends.
///
/// Quick mode takes websockify's command line: `wsgate --web /usr/share/novnc 6080
/// localhost:5900` serves noVNC's pages on port 6080 (all interfaces) and bridges its
/// WebSocket to the VNC server. `--print-config` writes the equivalent config file.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Run from this TOML config file (SIGHUP reloads it).
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["listen", "target", "check_config", "web", "cert", "token_source", "target_config", "unix_target", "unix_listen", "heartbeat", "print_config"])]
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

    /// Quick mode: print the config file this command line stands for, and exit.
    #[arg(long)]
    print_config: bool,

    /// Quick mode: [SOURCE_ADDR:]SOURCE_PORT to listen on (a bare port: all interfaces).
    listen: Option<String>,

    /// Quick mode: TARGET_ADDR:TARGET_PORT (or tcp://, unix:, tls://, echo).
    target: Option<String>,

    #[command(flatten)]
    websockify: WebsockifyArgs,
}

/// websockify's options (quick mode).
#[derive(Args, Debug)]
#[command(next_help_heading = "websockify options")]
struct WebsockifyArgs {
    /// websockify: serve the files in DIR on plain GET and HEAD requests.
    #[arg(long, value_name = "DIR")]
    web: Option<String>,

    /// websockify: TLS certificate (PEM); its key too unless --key.
    #[arg(long, value_name = "FILE")]
    cert: Option<String>,

    /// websockify: TLS private key (PEM), when not in the --cert file.
    #[arg(long, value_name = "FILE")]
    key: Option<String>,

    /// websockify: refuse plain ws:// (without it a --cert port takes both).
    #[arg(long)]
    ssl_only: bool,

    /// websockify: TokenFile or ReadOnlyTokenFile (both re-read the file when it changes),
    /// TokenRedis (SOURCE: host[:port[:db[:password[:namespace]]]] or redis://…) or JWTTokenApi
    /// (SOURCE: the key file).
    #[arg(long, value_name = "NAME", requires = "token_source")]
    token_plugin: Option<String>,

    /// websockify: token file or directory, lines `token: host:port`.
    #[arg(long, value_name = "PATH", requires = "token_plugin")]
    token_source: Option<String>,

    /// websockify: the same as --token-plugin TokenFile --token-source PATH.
    #[arg(long, value_name = "PATH", conflicts_with = "token_source")]
    target_config: Option<String>,

    /// websockify: exit after SECS with no connection open.
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,

    /// websockify: ping a client silent for SECS (wsgate's ping_interval).
    #[arg(long, value_name = "SECS")]
    heartbeat: Option<u64>,

    /// websockify: connect to the target over TLS.
    #[arg(long)]
    ssl_target: bool,

    /// websockify: the target is this unix socket.
    #[arg(long, value_name = "PATH")]
    unix_target: Option<String>,

    /// websockify: listen on this unix socket instead of a port (the one argument left is
    /// then the target).
    #[arg(long, value_name = "PATH")]
    unix_listen: Option<String>,

    /// websockify: the --unix-listen socket's permission bits, octal (default 600).
    #[arg(long, value_name = "MODE", requires = "unix_listen")]
    unix_listen_mode: Option<String>,

    /// websockify: clients must present a certificate signed by --cafile.
    #[arg(long, requires = "cafile")]
    verify_client: bool,

    /// websockify: CA bundle for --verify-client.
    #[arg(long, value_name = "FILE", requires = "verify_client")]
    cafile: Option<String>,

    /// websockify: ClientCertCNAuth (the only auth plugin taken; see the README).
    #[arg(long, value_name = "NAME", requires = "auth_source")]
    auth_plugin: Option<String>,

    /// websockify: for ClientCertCNAuth, the allowed common names, space-separated.
    #[arg(long, value_name = "ARG", requires = "auth_plugin")]
    auth_source: Option<String>,

    /// websockify: accepted and needless (wsgate never lists directories).
    #[arg(long)]
    file_only: bool,

    /// websockify: debug logging (as RUST_LOG=debug).
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `RUST_LOG` (else `default_level`) as a filter. The usual forms ("info",
/// "wsgate=debug,hyper=warn") become a per-target filter, decided once per call site;
/// span and field directives ("[conn{id=7}]=debug") need `EnvFilter`, which also takes a lock
/// and a hash lookup whenever a span is entered or left, on every poll of every session
/// (about 1 % of a round trip's CPU in the load bench's profile).
fn log_filter(default_level: &str) -> Box<dyn Layer<Registry> + Send + Sync> {
    let configured = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let Some(configured) = configured else {
        return Box::new(default_level.parse::<Targets>().expect("a level"));
    };
    // Targets would read "[conn]=debug" as a target named "[conn]".
    let spans = configured.contains('[');
    match configured.parse::<Targets>() {
        Ok(targets) if !spans => Box::new(targets),
        _ => Box::new(EnvFilter::try_new(&configured).unwrap_or_else(|e| {
            eprintln!(
                "wsgate: RUST_LOG={configured:?} not understood ({e}); logging at {default_level}"
            );
            default_level.into()
        })),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if cli.websockify.verbose {
        "debug"
    } else {
        "info"
    };
    // Lines are buffered and written by a thread of their own (at most 100 ms later);
    // `_flush` writes what is left when main returns.
    let (writer, _flush) = wsgate::log_writer::buffered(std::io::stderr());
    let logs = tracing_subscriber::fmt::layer()
        .with_timer(wsgate::log_time::Timestamps)
        .with_writer(writer)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(log_filter(default_level));
    match cli.log_format {
        LogFormat::Text => registry.with(logs).init(),
        LogFormat::Json => registry
            .with(logs.json().with_current_span(true).with_span_list(false))
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
    let config = match (&cli.config, quick_args(&cli)) {
        (Some(path), _) => Config::load(path),
        (None, Ok(Some(args))) if cli.print_config => {
            return match args.to_toml() {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("wsgate: {e}");
                    ExitCode::from(2)
                }
            };
        }
        (None, Ok(Some(args))) => {
            if args.cafile.is_some() && !args.ssl_only {
                eprintln!("wsgate: --verify-client implies --ssl-only: plain ws:// clients are refused (they have no certificate)");
            }
            args.to_config()
        }
        (None, Ok(None)) => {
            eprintln!("wsgate: give --config FILE, or [SOURCE_ADDR:]SOURCE_PORT and a target (see --help)");
            return ExitCode::from(2);
        }
        (None, Err(e)) => {
            eprintln!("wsgate: {e}");
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
        let signalled = shutdown_signal();
        let idle_exit = cli.websockify.idle_timeout.map(Duration::from_secs);
        let handle = server.handle();
        let stop = async move {
            match idle_exit {
                Some(limit) => tokio::select! {
                    _ = signalled => {}
                    _ = exit_when_idle(handle, limit) => {}
                },
                None => signalled.await,
            }
        };
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

/// websockify's options as [`QuickArgs`]; `Ok(None)` when no listen address was given.
fn quick_args(cli: &Cli) -> Result<Option<QuickArgs>, String> {
    // With --unix-listen, websockify takes no listen address: the first argument is the target.
    let (listen, target) = match (&cli.websockify.unix_listen, &cli.listen, &cli.target) {
        (None, None, _) => return Ok(None),
        (None, Some(listen), target) => (listen.clone(), target.clone()),
        (Some(_), target, None) => (String::new(), target.clone()),
        (Some(_), _, Some(_)) => {
            return Err(
                "with --unix-listen, give no listen address: the one argument is the target".into(),
            )
        }
    };
    let token_source = match (
        &cli.websockify.token_plugin,
        &cli.websockify.token_source,
        &cli.websockify.target_config,
    ) {
        (Some(plugin), Some(source), None) => match plugin.rsplit('.').next() {
            Some("TokenFile" | "ReadOnlyTokenFile") => Some(format!("token-file:{source}")),
            Some("TokenRedis") => Some(format!("token-redis:{source}")),
            Some("JWTTokenApi") => Some(format!("token-jwt:{source}")),
            _ => {
                return Err(format!(
                    "--token-plugin {plugin}: TokenFile, ReadOnlyTokenFile, TokenRedis and JWTTokenApi are taken"
                ))
            }
        },
        (None, None, Some(source)) => Some(format!("token-file:{source}")),
        _ => None,
    };
    let cert_names = match (&cli.websockify.auth_plugin, &cli.websockify.auth_source) {
        (Some(plugin), Some(names)) => match plugin.rsplit('.').next() {
            Some("ClientCertCNAuth") => names.split_whitespace().map(str::to_owned).collect(),
            _ => {
                return Err(format!(
                    "--auth-plugin {plugin}: only ClientCertCNAuth is taken; for passwords or tokens use a config file's route auth"
                ))
            }
        },
        _ => Vec::new(),
    };
    if cli.websockify.idle_timeout == Some(0) {
        return Err("--idle-timeout must be at least 1".into());
    }
    Ok(Some(QuickArgs {
        listen,
        unix_listen: cli.websockify.unix_listen.clone(),
        unix_listen_mode: cli.websockify.unix_listen_mode.clone(),
        target,
        web: cli.websockify.web.clone(),
        cert: cli.websockify.cert.clone(),
        key: cli.websockify.key.clone(),
        ssl_only: cli.websockify.ssl_only,
        token_source,
        heartbeat: cli.websockify.heartbeat,
        ssl_target: cli.websockify.ssl_target,
        unix_target: cli.websockify.unix_target.clone(),
        cafile: cli.websockify.cafile.clone(),
        cert_names,
    }))
}

/// Resolves once no connection has been open for `limit` (websockify's --idle-timeout),
/// counting from start.
async fn exit_when_idle(handle: Handle, limit: Duration) {
    let tick = (limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut idle_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if handle.open_connections() > 0 {
            idle_since = tokio::time::Instant::now();
        } else if idle_since.elapsed() >= limit {
            info!(idle_timeout = ?limit, "no connection for the idle timeout: exiting");
            return;
        }
    }
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
