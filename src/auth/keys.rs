//! An issuer's verification keys, looked up by `kid`: one key from a PEM file or an
//! HMAC secret, or a JWKS document from a file (re-read when it changes) or a URL
//! (fetched at start, every `jwks_refresh`, and at most every 30 s when a token names
//! a key it does not hold). A failed read or fetch keeps the last good keys. The URL
//! is the configured one, never anything from a token.
//!
//! The tasks that watch a file or refresh a URL stop when their token is cancelled.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::AuthError;
use crate::config::KeySource;
use crate::error::error_chain;

/// How often a JWKS file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);
/// The least time between two fetches a token's unknown `kid` may cause.
const REFETCH_FLOOR: Duration = Duration::from_secs(30);
/// How long a request waits for a fetch its unknown `kid` caused.
const FETCH_WAIT: Duration = Duration::from_secs(5);
/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// One verification key and what it may verify.
pub(super) struct Key {
    pub key: DecodingKey,
    /// The key's own algorithm, when the JWK names one: a token must use it.
    pub alg: Option<Algorithm>,
}

/// The keys of one issuer at one time.
#[derive(Default)]
pub(super) struct Keys {
    by_kid: HashMap<String, Arc<Key>>,
    /// Keys without a `kid` (a PEM file, a secret, or such JWKs).
    unnamed: Vec<Arc<Key>>,
}

impl Keys {
    /// The keys that may have signed a token with this `kid`: the named one, or,
    /// for a token without a `kid`, every key.
    pub fn candidates(&self, kid: Option<&str>) -> Vec<Arc<Key>> {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .cloned()
                .into_iter()
                .chain(self.unnamed.iter().cloned())
                .collect(),
            None => self
                .unnamed
                .iter()
                .chain(self.by_kid.values())
                .cloned()
                .collect(),
        }
    }

    fn from_jwks(text: &[u8]) -> Result<Keys, String> {
        let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Keys::default();
        for jwk in &set.keys {
            let key = jwk_key(jwk)?;
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), Arc::new(key));
                }
                None => keys.unnamed.push(Arc::new(key)),
            }
        }
        Ok(keys)
    }

    fn single(key: DecodingKey) -> Keys {
        Keys {
            by_kid: HashMap::new(),
            unnamed: vec![Arc::new(Key { key, alg: None })],
        }
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }
}

fn jwk_key(jwk: &Jwk) -> Result<Key, String> {
    let key = DecodingKey::from_jwk(jwk).map_err(|e| {
        format!(
            "key {:?} cannot verify: {e}",
            jwk.common.key_id.as_deref().unwrap_or("(no kid)")
        )
    })?;
    let alg = jwk
        .common
        .key_algorithm
        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
    Ok(Key { key, alg })
}

/// The keys of one issuer, kept current.
pub(super) struct KeySet {
    current: ArcSwap<Keys>,
    /// For a JWKS URL: fetching, and when a fetch last started.
    url: Option<UrlSource>,
}

struct UrlSource {
    url: String,
    client: HttpClient,
    /// When the last fetch started; held while a fetch runs, so one runs at a time.
    last_attempt: Mutex<Option<Instant>>,
    /// Fetches finished so far, so a request that waited for one knows it happened.
    fetches: std::sync::atomic::AtomicU64,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

impl KeySet {
    /// Loads the keys of `source` and starts what keeps them current.
    pub async fn start(
        source: &KeySource,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<KeySet>, AuthError> {
        let set = match source {
            KeySource::SecretEnv(var) => {
                let secret = std::env::var(var).map_err(|_| AuthError::MissingEnv(var.clone()))?;
                Arc::new(KeySet::fixed(secret_key(secret.as_bytes(), var)?))
            }
            KeySource::SecretFile(path) => {
                let text = read(path).await?;
                let secret = trim_newline(&text);
                Arc::new(KeySet::fixed(secret_key(
                    secret,
                    &path.display().to_string(),
                )?))
            }
            KeySource::PublicKeyFile(path) => {
                let pem = read(path).await?;
                Arc::new(KeySet::fixed(public_key(&pem).map_err(|message| {
                    AuthError::Keys {
                        from: path.display().to_string(),
                        message,
                    }
                })?))
            }
            KeySource::JwksFile(path) => {
                let text = read(path).await?;
                let keys = Keys::from_jwks(&text).map_err(|message| AuthError::Keys {
                    from: path.display().to_string(),
                    message,
                })?;
                let set = Arc::new(KeySet {
                    current: ArcSwap::from_pointee(keys),
                    url: None,
                });
                tracker.spawn(watch_file(
                    path.clone(),
                    crate::config::digest(&text),
                    Arc::clone(&set),
                    cancel.clone(),
                ));
                set
            }
            KeySource::JwksUrl { url, refresh } => {
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_webpki_roots()
                    .https_or_http()
                    .enable_http1()
                    .build();
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build(connector);
                let set = Arc::new(KeySet {
                    current: ArcSwap::from_pointee(Keys::default()),
                    url: Some(UrlSource {
                        url: url.clone(),
                        client,
                        last_attempt: Mutex::new(None),
                        fetches: std::sync::atomic::AtomicU64::new(0),
                    }),
                });
                // At start: without keys nothing verifies, but an identity provider that
                // is down for a moment must not keep the gateway from starting.
                set.fetch().await;
                tracker.spawn(refresh_url(Arc::clone(&set), *refresh, cancel.clone()));
                set
            }
        };
        Ok(set)
    }

    fn fixed(key: DecodingKey) -> KeySet {
        KeySet {
            current: ArcSwap::from_pointee(Keys::single(key)),
            url: None,
        }
    }

    pub fn keys(&self) -> Arc<Keys> {
        self.current.load_full()
    }

    /// For a token whose `kid` no key has: fetch the URL again, unless a fetch
    /// started less than 30 s ago. A burst of such tokens makes one fetch: the others
    /// wait for it and look again. Returns whether the keys may have changed.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let Some(source) = &self.url else {
            return false;
        };
        use std::sync::atomic::Ordering;
        let seen = source.fetches.load(Ordering::Acquire);
        let fetched = async {
            let mut last = source.last_attempt.lock().await;
            if source.fetches.load(Ordering::Acquire) != seen {
                // A fetch finished while this request waited for the lock.
                return true;
            }
            match *last {
                Some(at) if at.elapsed() < REFETCH_FLOOR => false,
                _ => self.fetch_locked(source, &mut last).await,
            }
        };
        tokio::time::timeout(FETCH_WAIT, fetched)
            .await
            .unwrap_or(false)
    }

    /// Fetches the JWKS URL once (the periodic refresh).
    async fn fetch(&self) -> bool {
        let Some(source) = &self.url else {
            return false;
        };
        let mut last = source.last_attempt.lock().await;
        self.fetch_locked(source, &mut last).await
    }

    /// Fetches while holding the lock, so one fetch runs at a time; on failure the
    /// last good keys stay.
    async fn fetch_locked(&self, source: &UrlSource, last: &mut Option<Instant>) -> bool {
        *last = Some(Instant::now());
        let got = get(&source.client, &source.url).await;
        source
            .fetches
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        match got {
            Ok(body) => match Keys::from_jwks(&body) {
                Ok(keys) => {
                    info!(url = %source.url, keys = keys.len(), "JWKS fetched.");
                    self.current.store(Arc::new(keys));
                    true
                }
                Err(e) => {
                    warn!(url = %source.url, error = %e, "JWKS unusable; keeping the last good keys.");
                    false
                }
            },
            Err(e) => {
                warn!(url = %source.url, error = %e, "JWKS fetch failed; keeping the last good keys.");
                false
            }
        }
    }
}

async fn get(client: &HttpClient, url: &str) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let request = hyper::Request::get(uri)
        .header("accept", "application/json")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| error_chain(&e))?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(response.into_body(), MAX_JWKS_BYTES).collect(),
    )
    .await
    .map_err(|_| "timed out reading the body".to_string())?
    .map_err(|e| format!("reading the body: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

async fn refresh_url(set: Arc<KeySet>, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                set.fetch().await;
            }
        }
    }
}

/// Re-reads a JWKS file when its content changes; a file that cannot be read or
/// parsed keeps the last good keys.
async fn watch_file(path: PathBuf, mut digest: u64, set: Arc<KeySet>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(FILE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(text) = tokio::fs::read(&path).await else {
            continue;
        };
        let now = crate::config::digest(&text);
        if now == digest {
            continue;
        }
        match Keys::from_jwks(&text) {
            Ok(keys) => {
                digest = now;
                info!(file = %path.display(), keys = keys.len(), "JWKS file reloaded.");
                set.current.store(Arc::new(keys));
            }
            // Perhaps half-written: the next change (or poll) tries again.
            Err(e) => {
                warn!(file = %path.display(), error = %e, "JWKS file unusable; keeping the last good keys.")
            }
        }
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })
}

fn trim_newline(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

/// An HMAC key; an empty secret would accept tokens anyone can sign.
fn secret_key(secret: &[u8], from: &str) -> Result<DecodingKey, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::Keys {
            from: from.to_string(),
            message: "the HMAC secret is empty".into(),
        });
    }
    DecodingKey::from_secret(secret).map_err(|e| AuthError::Keys {
        from: from.to_string(),
        message: e.to_string(),
    })
}

/// A public key from PEM: RSA, EC or Ed25519, whichever the file holds.
fn public_key(pem: &[u8]) -> Result<DecodingKey, String> {
    DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|e| format!("not an RSA, EC or Ed25519 public key in PEM: {e}"))
}
