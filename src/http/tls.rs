//! TLS on the public listener (SPEC §8): `--tls-cert` and `--tls-key`, TLS
//! 1.2 and 1.3 with rustls (ring), HTTP/1.1 by ALPN.
//!
//! [`ServerTls`] holds the `ServerConfig` in force in an `ArcSwap`: the accept
//! loop takes it for each new connection, and [`ServerTls::reload`] swaps in
//! a new one when both files read again make a valid pair. A renewal written
//! file by file (the certificate first, then the key) goes through a moment
//! where they do not match: that read is refused (logged) and the pair in
//! force stays until the next change event brings a matching one. Open
//! connections keep the certificate they were accepted with.
//!
//! Never logs key material; messages name the files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate chain and key files of the public listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The public listener's TLS settings, reloadable.
pub struct ServerTls {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
    /// The bytes of the pair in force (certificate, key): a change event that
    /// leaves them as they are swaps nothing.
    loaded: Mutex<(Vec<u8>, [u8; 32])>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks both files: `Err` says which and why.
    pub fn load(files: TlsFiles) -> Result<Arc<ServerTls>, String> {
        let (cert, key) = read_pair(&files)?;
        let config = server_config(&files, &cert, &key)?;
        Ok(Arc::new(ServerTls {
            config: ArcSwap::from_pointee(config),
            loaded: Mutex::new((cert, crate::payload::sha256(&key))),
            files,
        }))
    }

    /// The files.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the certificate in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// Reads both files again; swaps in the pair when it is valid and new.
    /// `Ok(true)`: swapped; `Ok(false)`: the files hold the pair in force.
    pub fn reload(&self) -> Result<bool, String> {
        let (cert, key) = read_pair(&self.files)?;
        let digest = crate::payload::sha256(&key);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == cert && loaded.1 == digest {
            return Ok(false);
        }
        let config = server_config(&self.files, &cert, &key)?;
        self.config.store(Arc::new(config));
        *loaded = (cert, digest);
        Ok(true)
    }

    /// Reloads (and logs the outcome), for the watcher and SIGHUP.
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok(true) => tracing::info!(
                cert = %self.files.cert.display(),
                "TLS certificate reloaded: new connections get it"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "TLS certificate not reloaded: the one in force stays (a renewal half-written is retried on its next change)"
            ),
        }
    }

    /// Watches the directories of both files (not recursively) and reloads on
    /// any change in them, debounced. Dropping the handle stops it.
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> notify::Result<TlsWatch> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut debouncer =
            new_debouncer(debounce, None, move |res: DebounceEventResult| match res {
                Ok(events) if !events.is_empty() => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(errors) => {
                    for e in errors {
                        tracing::warn!(error = %e, "TLS file watcher error");
                    }
                }
            })?;
        let mut dirs: Vec<PathBuf> = [&self.files.cert, &self.files.key]
            .iter()
            .map(|f| dir_of(f))
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            debouncer.watch(d, RecursiveMode::NonRecursive)?;
        }
        let me = self.clone();
        let task = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                while rx.try_recv().is_ok() {} // one reload for a burst
                let me = me.clone();
                let _ = tokio::task::spawn_blocking(move || me.reload_logged()).await;
            }
        });
        Ok(TlsWatch {
            _debouncer: debouncer,
            task,
        })
    }
}

/// Keeps the TLS file watcher alive.
pub struct TlsWatch {
    _debouncer: notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn dir_of(f: &Path) -> PathBuf {
    match f.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn read_pair(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    Ok((read(&files.cert)?, read(&files.key)?))
}

/// TLS 1.2 and 1.3 (ring), no client certificates, ALPN `http/1.1`.
fn server_config(files: &TlsFiles, cert: &[u8], key: &[u8]) -> Result<ServerConfig, String> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{}: not a PEM certificate chain ({e})",
                files.cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate (PEM `BEGIN CERTIFICATE`)",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
        format!(
            "{}: no private key (PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`)",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in {} does not belong to the certificate in {}",
                files.key.display(),
                files.cert.display()
            ),
            e => format!("{} and {}: {e}", files.cert.display(), files.key.display()),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
