//! Reload: a new config applied while the server runs. New listeners are bound first (any
//! failure changes nothing), then the config is swapped for new connections, then listeners
//! no longer configured are closed. Live sessions keep the config they started with.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::listen::Bound;
use super::{accept, Handle, State};
use crate::config::{Config, ConfigError, ListenAddr, Listener};
use crate::metrics::ResultLabel;

/// Why a reload was not applied; the old config stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (quick mode)")]
    NoConfigFile,
    #[error("draining: reload ignored")]
    Draining,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] std::io::Error),
    #[error("loading the config failed")]
    LoadFailed,
}

/// One listening address: its accept loop and the TLS settings new connections get.
pub(super) struct ListenerSlot {
    pub(super) bound: ListenAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// What new connections get, swapped on reload (new certificates, PROXY protocol on/off).
    settings: Arc<RwLock<ListenerSettings>>,
}

/// A listener's settings for the connections it accepts.
#[derive(Clone)]
pub(super) struct ListenerSettings {
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) proxy_protocol: bool,
    /// TLS listeners: plain connections are taken too (told apart by the first byte).
    pub(super) allow_plain: bool,
    /// The listener checks client certificates (`client_ca`): a handshake that ends without
    /// one is closed, whatever rustls decided.
    pub(super) client_ca: bool,
    /// HTTP/2: by ALPN on TLS, with prior knowledge on plain connections.
    pub(super) http2: bool,
}

impl ListenerSettings {
    pub(super) fn of(listener: &Listener) -> ListenerSettings {
        ListenerSettings {
            tls: listener
                .tls
                .as_ref()
                .map(|t| TlsAcceptor::from(t.server.clone())),
            proxy_protocol: listener.proxy_protocol,
            http2: listener.http2,
            allow_plain: listener.allow_plain,
            client_ca: listener
                .tls
                .as_ref()
                .is_some_and(|t| t.files.client_ca.is_some()),
        }
    }
}

impl ListenerSlot {
    /// Stops accepting and waits for the accept loop to end (the socket is closed then).
    pub(super) async fn close(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl State {
    pub(super) fn start_listener(
        self: &Arc<Self>,
        configured: ListenAddr,
        settings: ListenerSettings,
        listener: Bound,
    ) {
        let bound = listener.local(&configured);
        let stop = CancellationToken::new();
        let settings = Arc::new(RwLock::new(settings));
        let task = tokio::spawn(accept::run(
            listener,
            self.clone(),
            stop.clone(),
            settings.clone(),
        ));
        self.listeners.lock().unwrap().insert(
            configured,
            ListenerSlot {
                bound,
                stop,
                task,
                settings,
            },
        );
    }
}

impl Handle {
    /// Reads the config file again and applies it; on any error the old config stays. Reloads
    /// run one after the other, never interleaved.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let _one_at_a_time = self.state.reloading.lock().await;
        let Some(path) = self.state.config_path.lock().unwrap().clone() else {
            return Err(ReloadError::NoConfigFile);
        };
        // Off the async workers: loading checks every htpasswd hash (bcrypt) and reads the
        // TLS and token files, which would stall every session on this worker meanwhile.
        let load = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path))
        };
        let result = match load.await {
            Ok(Ok(config)) => self.apply(config).await,
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ReloadError::LoadFailed),
        };
        let m = &self.state.metrics;
        let label = ResultLabel {
            result: if result.is_ok() { "success" } else { "failure" }.into(),
        };
        m.reloads.get_or_create(&label).inc();
        m.last_reload_success.set(i64::from(result.is_ok()));
        match &result {
            Ok(()) => info!(path = %path.display(), "config reloaded"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "config reload rejected; keeping the old config")
            }
        }
        result
    }

    /// Applies a validated config: binds new listeners first (any failure changes nothing),
    /// swaps the config for new connections, then closes listeners no longer configured.
    /// The caller holds `reloading`.
    async fn apply(&self, config: Config) -> Result<(), ReloadError> {
        let state = &self.state;
        if state.draining.load(Ordering::Acquire) {
            return Err(ReloadError::Draining);
        }
        let old = state.config();
        if old.admin != config.admin {
            warn!("[admin] addr changes take effect at restart");
        }
        if old.limits.message_buffer_budget != config.limits.message_buffer_budget {
            warn!("limits.message_buffer_budget changes take effect at restart");
        }
        let existing: Vec<ListenAddr> = state.listeners.lock().unwrap().keys().cloned().collect();
        let mut fresh = Vec::new();
        for l in &config.listen {
            if !existing.contains(&l.addr) {
                let listener = Bound::bind(&l.addr, l.mode).await?;
                fresh.push((l.addr.clone(), ListenerSettings::of(l), listener));
            }
        }
        let removed: Vec<ListenAddr> = existing
            .into_iter()
            .filter(|a| !config.listen.iter().any(|l| l.addr == *a))
            .collect();
        // Kept listeners take the new settings (renewed certificates) for new connections.
        {
            let slots = state.listeners.lock().unwrap();
            for l in &config.listen {
                if let Some(slot) = slots.get(&l.addr) {
                    *slot.settings.write().unwrap() = ListenerSettings::of(l);
                }
            }
        }
        *state.config.write().unwrap() = Arc::new(config);
        for (configured, settings, listener) in fresh {
            info!(addr = %listener.local(&configured), "listening");
            state.start_listener(configured, settings, listener);
        }
        for addr in removed {
            let slot = state.listeners.lock().unwrap().remove(&addr);
            if let Some(slot) = slot {
                let bound = slot.bound.clone();
                slot.close().await;
                info!(addr = %bound, "listener closed");
            }
        }
        Ok(())
    }
}
