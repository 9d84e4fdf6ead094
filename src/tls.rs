//! The public listener's certificate: loading and checking a certificate/key pair, the
//! resolver that hands rustls the pair in force (swapped atomically, so a new pair
//! applies to the next handshake and open connections keep theirs), and the task that
//! reloads the pair when its files change.
//!
//! A pair is used only once both files parse and the key is the one the leaf
//! certificate certifies; anything less keeps the pair in force, logs one error per
//! bad content and sets [`Certificates::reload_successful`] to false. Config
//! validation checks a pair with the same [`load_pair`], so `tailgate check`, a start
//! and a reload all refuse what the watcher would refuse.
//!
//! The watch task ([`watch`]) follows the config watcher's pattern (`reload`): notify
//! on the files' *directories*, filtered by name (so a rename over a file and
//! Kubernetes' `..data` symlink swap are seen), a debounce, and a poll every
//! [`POLL_EVERY`] as a backstop. Content digests decide whether anything changed. It
//! stops when its token is cancelled.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How often the certificate and key files are read even if notify reported nothing.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// The protocols offered in ALPN, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The files of a pair, as the config names them (resolved against its directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which file of a pair a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
}

/// Why a pair cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        which: Which,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} is not valid PEM: {reason}", .path.display())]
    BadPem {
        which: Which,
        path: PathBuf,
        reason: String,
    },
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", .0.display())]
    NoKey(PathBuf),
    #[error("the private key in {} cannot be used: {reason}", .path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("the first certificate in {} cannot be read: {reason}", .path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("the private key in {} does not match the first certificate in {}", .key.display(), .cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl PairError {
    /// The file to blame: the one whose config key a problem report points at.
    pub fn which(&self) -> Which {
        match self {
            PairError::Read { which, .. } | PairError::BadPem { which, .. } => *which,
            PairError::NoCertificate(_) | PairError::BadCertificate { .. } => Which::Cert,
            PairError::NoKey(_) | PairError::BadKey { .. } | PairError::Mismatch { .. } => {
                Which::Key
            }
        }
    }
}

/// The crypto this gateway serves TLS with (ring, as everywhere else in it).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a pair: the certificate file holds the leaf first and then its
/// chain, the key file one private key, and the key is the leaf's. Blocking (two small
/// reads).
pub fn load_pair(files: &PairFiles) -> Result<Arc<CertifiedKey>, PairError> {
    let contents = Contents::read(files)?;
    pair_from_pem(files, &contents.cert, &contents.key)
}

/// Both files' bytes, read one after the other, so a pair and its digest come from
/// the same read.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Contents {
    fn read(files: &PairFiles) -> Result<Contents, PairError> {
        let cert = std::fs::read(&files.cert).map_err(|source| PairError::Read {
            which: Which::Cert,
            path: files.cert.clone(),
            source,
        })?;
        let key = std::fs::read(&files.key).map_err(|source| PairError::Read {
            which: Which::Key,
            path: files.key.clone(),
            source,
        })?;
        Ok(Contents { cert, key })
    }

    fn digest(&self) -> u64 {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        self.cert.hash(&mut h);
        self.key.hash(&mut h);
        h.finish()
    }

    /// The digest, and the pair if it is usable.
    fn load(files: &PairFiles) -> (Option<u64>, Result<Arc<CertifiedKey>, PairError>) {
        match Contents::read(files) {
            Ok(c) => (Some(c.digest()), pair_from_pem(files, &c.cert, &c.key)),
            Err(e) => (None, Err(e)),
        }
    }
}

fn pair_from_pem(
    files: &PairFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, PairError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PairError::BadPem {
            which: Which::Cert,
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(PairError::NoCertificate(files.cert.clone()));
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(PairError::NoKey(files.key.clone()))
        }
        Err(e) => {
            return Err(PairError::BadPem {
                which: Which::Key,
                path: files.key.clone(),
                reason: e.to_string(),
            })
        }
    };
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| PairError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        Ok(()) => Ok(Arc::new(pair)),
        // A key that cannot tell its public half: nothing to compare, as rustls does.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(pair))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(PairError::Mismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
        Err(e) => Err(PairError::BadCertificate {
            path: files.cert.clone(),
            reason: e.to_string(),
        }),
    }
}

/// The pair in force and how its reloads went. rustls asks it for the pair at every
/// handshake; a connection keeps the pair it was opened with.
#[derive(Debug)]
pub struct Certificates {
    current: ArcSwap<CertifiedKey>,
    files: Mutex<PairFiles>,
    /// False while the files on disk hold a pair that cannot be used.
    reload_successful: AtomicBool,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// When the pair in force was loaded, in seconds since the epoch.
    loaded_unix: AtomicU64,
    /// Why the files on disk are not in force, while they are not.
    error: Mutex<Option<String>>,
    /// The digest of the contents loaded at start: the watcher's first baseline, so a
    /// change made before it first reads the files is still seen as one.
    initial_digest: u64,
}

/// A snapshot of [`Certificates`]' state, for the metrics and the listing.
#[derive(Debug, Clone)]
pub struct Status {
    pub files: PairFiles,
    pub reload_successful: bool,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub loaded_unix: u64,
    pub error: Option<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Certificates {
    /// Starts with `files`' pair, which must be usable.
    pub fn load(files: PairFiles) -> Result<Arc<Certificates>, PairError> {
        let contents = Contents::read(&files)?;
        let pair = pair_from_pem(&files, &contents.cert, &contents.key)?;
        Ok(Arc::new(Certificates {
            initial_digest: contents.digest(),
            current: ArcSwap::new(pair),
            files: Mutex::new(files),
            reload_successful: AtomicBool::new(true),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            loaded_unix: AtomicU64::new(unix_now()),
            error: Mutex::new(None),
        }))
    }

    /// The rustls server config of a listener serving this pair, offering [`ALPN`].
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions();
        // ring supports every default version, so this cannot fail; `expect` would
        // still be a panic on a runtime path, so fall back to TLS 1.3 alone.
        let builder = match builder {
            Ok(b) => b,
            Err(_) => {
                rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            }
        };
        let mut config = builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// The pair in force.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    pub fn status(&self) -> Status {
        let r = Ordering::Relaxed;
        Status {
            files: self
                .files
                .lock()
                .map(|f| f.clone())
                .unwrap_or_else(|e| e.into_inner().clone()),
            reload_successful: self.reload_successful.load(r),
            reloads_ok: self.reloads_ok.load(r),
            reloads_failed: self.reloads_failed.load(r),
            loaded_unix: self.loaded_unix.load(r),
            error: self.error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn files(&self) -> PairFiles {
        self.files
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn set_files(&self, files: PairFiles) {
        match self.files.lock() {
            Ok(mut f) => *f = files,
            Err(e) => *e.into_inner() = files,
        }
    }

    fn loaded(&self, pair: Arc<CertifiedKey>) {
        self.current.store(pair);
        self.reload_successful.store(true, Ordering::Relaxed);
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.loaded_unix.store(unix_now(), Ordering::Relaxed);
        if let Ok(mut e) = self.error.lock() {
            *e = None;
        }
    }

    fn failed(&self, error: String) {
        self.reload_successful.store(false, Ordering::Relaxed);
        self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.error.lock() {
            *e = Some(error);
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Notify on the directories of `files`, sending a nudge for events that may concern
/// them (see `reload::spawn_watchers`, whose filter this follows). `None` when the
/// directories cannot be watched: the poll still runs.
fn watch_dirs(files: &PairFiles, nudge: mpsc::UnboundedSender<()>) -> Option<RecommendedWatcher> {
    let names: Vec<OsString> = [&files.cert, &files.key]
        .iter()
        .filter_map(|p| p.file_name().map(OsString::from))
        .collect();
    let mut dirs: Vec<PathBuf> = [&files.cert, &files.key]
        .iter()
        .map(|p| {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            p.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        })
        .collect();
    dirs.dedup();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else {
            // Events may have been lost: read again and let the digest decide.
            let _ = nudge.send(());
            return;
        };
        let relevant = match event.kind {
            // Data written in place counts when the writer closes the file; our own
            // reads are events too, and must not wake us.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Data(_)) => false,
            _ => true,
        };
        let ours = event.paths.is_empty()
            || event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    names.iter().any(|ours| ours == n) || n.to_string_lossy().starts_with("..")
                })
            });
        if relevant && ours {
            let _ = nudge.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "Cannot watch the TLS certificate's files; polling them.");
            return None;
        }
    };
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            warn!(dir = %dir.display(), error = %e, "Cannot watch the TLS certificate's directory; polling it.");
            return None;
        }
    }
    Some(watcher)
}

/// Reloads the pair when its files change, and switches to other files when a config
/// reload names them (`files`). A usable new pair is swapped in at once. An unusable
/// one is reported once it has been read the same twice in a row (a pair written file
/// by file passes through a mismatch, which is not worth an error), and once per
/// content; the pair in force stays.
pub async fn watch(
    certs: Arc<Certificates>,
    mut files: watch::Receiver<PairFiles>,
    cancel: CancellationToken,
) {
    let mut watching = certs.files();
    let (nudge, mut nudged) = mpsc::unbounded_channel();
    let mut _watcher = watch_dirs(&watching, nudge.clone());
    // The contents in force (or last reported as unusable), and the last contents seen.
    let mut settled = Some(certs.initial_digest);
    let mut previous = settled;
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut renamed = false;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            Some(()) = nudged.recv() => {
                // Until the burst goes quiet.
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = nudged.recv() => {}
                        _ = tokio::time::sleep(crate::reload::DEBOUNCE) => break,
                    }
                }
            }
            changed = files.changed() => {
                if changed.is_err() {
                    // The gateway dropped its sender: it is stopping.
                    return;
                }
                let named = files.borrow_and_update().clone();
                if named != watching {
                    watching = named;
                    certs.set_files(watching.clone());
                    _watcher = watch_dirs(&watching, nudge.clone());
                    renamed = true;
                }
            }
        }
        let f = watching.clone();
        let Ok((now, loaded)) = tokio::task::spawn_blocking(move || Contents::load(&f)).await
        else {
            continue;
        };
        if now == settled && !renamed {
            previous = now;
            continue;
        }
        match loaded {
            Ok(pair) => {
                certs.loaded(pair);
                info!(
                    cert_file = %watching.cert.display(),
                    key_file = %watching.key.display(),
                    "TLS certificate reloaded; new connections get it."
                );
                settled = now;
            }
            // Unusable, or unreadable (perhaps mid-swap) twice in a row: report it once
            // and keep what is in force.
            Err(e) if now == previous || renamed => {
                let reason = crate::error::error_chain(&e);
                error!(
                    error = %reason,
                    "TLS certificate reload failed; keeping the certificate in force."
                );
                certs.failed(reason);
                settled = now;
            }
            Err(_) => {}
        }
        previous = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> PairFiles {
        PairFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_pair_is_checked_file_by_file_and_as_a_pair() {
        let dir = tempfile::tempdir().expect("dir");
        let f = files(dir.path());
        let (cert, key) = pair("a.test");
        let (_, other_key) = pair("b.test");

        let err = load_pair(&f).expect_err("missing");
        assert!(
            matches!(
                err,
                PairError::Read {
                    which: Which::Cert,
                    ..
                }
            ),
            "{err}"
        );
        std::fs::write(&f.cert, &cert).expect("write");
        assert_eq!(load_pair(&f).expect_err("no key").which(), Which::Key);

        std::fs::write(&f.key, "not pem at all").expect("write");
        assert!(matches!(load_pair(&f), Err(PairError::NoKey(_))));
        std::fs::write(&f.key, &other_key).expect("write");
        let err = load_pair(&f).expect_err("mismatch");
        assert!(matches!(err, PairError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");

        std::fs::write(&f.key, &key).expect("write");
        let loaded = load_pair(&f).expect("a good pair");
        assert_eq!(loaded.cert.len(), 1);

        // The key where the certificate should be, and a truncated certificate.
        std::fs::write(&f.cert, &key).expect("write");
        assert!(matches!(load_pair(&f), Err(PairError::NoCertificate(_))));
        std::fs::write(&f.cert, &cert[..cert.len() / 2]).expect("write");
        assert_eq!(load_pair(&f).expect_err("truncated").which(), Which::Cert);
        // Valid PEM around bytes that are no certificate.
        std::fs::write(
            &f.cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = load_pair(&f).expect_err("garbage DER");
        assert_eq!(err.which(), Which::Cert, "{err}");
    }

    /// Real time: the watcher reads files on the blocking pool.
    #[tokio::test]
    async fn the_watcher_swaps_good_pairs_and_keeps_the_pair_in_force_on_a_bad_one() {
        let dir = tempfile::tempdir().expect("dir");
        let f = files(dir.path());
        let (cert, key) = pair("one.test");
        std::fs::write(&f.cert, &cert).expect("write");
        std::fs::write(&f.key, &key).expect("write");
        let certs = Certificates::load(f.clone()).expect("load");
        let first = certs.current();
        let (_tx, rx) = watch::channel(f.clone());
        let cancel = CancellationToken::new();
        tokio::spawn(watch(Arc::clone(&certs), rx, cancel.clone()));
        let within = |limit: Duration| tokio::time::Instant::now() + limit;

        // A bad key: reported, and the first pair stays.
        let (_, stray) = pair("stray.test");
        std::fs::write(&f.key, &stray).expect("write");
        let deadline = within(Duration::from_secs(10));
        while certs.status().reload_successful {
            assert!(tokio::time::Instant::now() < deadline, "never reported");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = certs.status();
        assert_eq!(status.reloads_failed, 1);
        assert!(status
            .error
            .as_deref()
            .unwrap_or("")
            .contains("does not match"));
        assert!(Arc::ptr_eq(&certs.current(), &first));

        // A good new pair: swapped in.
        let (cert2, key2) = pair("two.test");
        std::fs::write(&f.cert, &cert2).expect("write");
        std::fs::write(&f.key, &key2).expect("write");
        let deadline = within(Duration::from_secs(10));
        while !certs.status().reload_successful {
            assert!(tokio::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_ne!(certs.current().cert[0], first.cert[0]);
        assert_eq!(
            certs.status().reloads_failed,
            1,
            "the bad pair was reported once"
        );
        cancel.cancel();
    }
}
