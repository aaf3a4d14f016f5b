//! PEM files → rustls server configs for `wss://` listeners: certificate chains, keys in
//! PKCS#8, PKCS#1 or SEC1 form (RSA, ECDSA, Ed25519), certificates chosen by SNI with a
//! default, optional client-certificate checks. TLS 1.2 and 1.3 only, ALPN `http/1.1`.
//!
//! Files are read when the config is loaded (start, `--check-config`, reload), so a missing
//! file or a key that does not match its certificate stops wsgate before it serves anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::server::{
    ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert, WebPkiClientVerifier,
};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{
    version, CipherSuite, ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite,
};

/// The files behind a listener's TLS settings (paths already made absolute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to; none = no client certificates.
    pub client_ca: Option<PathBuf>,
    /// Extra certificates, each served to clients asking for one of its names (SNI).
    pub sni: Vec<SniCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The listeners' provider: ring's suites with AES-128-GCM ahead of AES-256-GCM, then
/// ChaCha20-Poly1305, used in this order whatever the client lists first (as Go's and Caddy's
/// servers do). AES-128-GCM is TLS 1.3's mandatory suite and what browsers ask for; clients
/// that put AES-256 first (OpenSSL, rustls) would otherwise get a SHA-384 key schedule
/// (SHA-512 blocks: 10 % of a resumed handshake's CPU in the load bench's profile, against
/// 2.4 % for SHA-256 with the CPU's SHA extensions) and 14 AES rounds instead of 10.
fn server_provider() -> Arc<CryptoProvider> {
    let mut provider = ring::default_provider();
    let rank = |suite: &SupportedCipherSuite| match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    // Stable: TLS 1.3 suites stay ahead of TLS 1.2 ones within each rank.
    provider.cipher_suites.sort_by_key(rank);
    Arc::new(provider)
}

/// Why a listener's or a backend's TLS settings cannot be built; the message names the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file that cannot be read or holds nothing usable; `what` says which setting it is.
    #[error("{what} {}: {detail}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("key {} does not fit certificate {}: {detail}", key.display(), cert.display())]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        detail: String,
    },
    #[error("no system trust roots found; set ca = \"…\" on the route")]
    NoSystemRoots,
    #[error("TLS setup: {0}")]
    Setup(tokio_rustls::rustls::Error),
}

fn file_error(what: &'static str, path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

/// Reads a certificate chain and its key, and checks that they belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error("certificate", cert, e))?;
    if chain.is_empty() {
        return Err(file_error(
            "certificate",
            cert,
            "no CERTIFICATE in the file",
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        file_error(
            "key",
            key,
            format!("{e} (PKCS#8, PKCS#1 or SEC1 PEM expected)"),
        )
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| TlsError::KeyMismatch {
        key: key.to_owned(),
        cert: cert.to_owned(),
        detail: e.to_string(),
    })
}

/// Reads a CA bundle into a root store; `what` names the setting in errors.
fn read_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(what, path, e))?;
    for c in certs {
        roots.add(c).map_err(|e| file_error(what, path, e))?;
    }
    Ok(roots)
}

/// Serves the certificate whose names include the client's SNI, else the default one.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|name| self.by_name.get(&name.to_ascii_lowercase()));
        Some(chosen.unwrap_or(&self.default).clone())
    }
}

/// Builds the rustls server config for a listener; with `http2`, ALPN offers `h2` first
/// (`http/1.1` stays for clients without it).
pub(crate) fn server_config(files: &TlsFiles, http2: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = server_provider();
    let default = Arc::new(certified_key(&files.cert, &files.key, &provider)?);
    let mut by_name = HashMap::new();
    for sni in &files.sni {
        let key = Arc::new(certified_key(&sni.cert, &sni.key, &provider)?);
        for name in &sni.names {
            by_name.insert(name.to_ascii_lowercase(), key.clone());
        }
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(TlsError::Setup)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = read_roots("client_ca", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error("client_ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    config.alpn_protocols = match http2 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"http/1.1".to_vec()],
    };
    config.ignore_client_order = true;
    if files.client_ca.is_some() {
        // No resumption where client certificates are checked: rustls does not compare
        // client-auth settings when it resumes, so a ticket from a listener without
        // client_ca (or from before a reload that replaced it) would skip the check. Every
        // handshake here is a full one, verified against the CA loaded now.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        // Returning clients skip the full handshake: TLS 1.3 tickets (and TLS 1.2 session
        // tickets) from one process-wide ticketer, so they stay valid across reloads; its
        // keys rotate every 6 hours. TLS 1.2 session IDs use rustls's in-memory cache. The
        // ticketer is shared only by listeners that check no client certificate.
        config.ticketer = ticketer()?;
    }
    Ok(Arc::new(config))
}

/// The process's session-ticket keys (made once; rotated by rustls every 6 hours).
fn ticketer() -> Result<Arc<dyn ProducesTickets>, TlsError> {
    static TICKETER: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let made = ring::Ticketer::new().map_err(TlsError::Setup)?;
    Ok(TICKETER.get_or_init(|| made).clone())
}

/// The TLS client config for tls:// and wss:// backends: the certificates in `ca`, or the
/// system's trust roots when there is none.
pub(crate) fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(ca) => read_roots("ca", ca)?,
        None => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
            roots
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
