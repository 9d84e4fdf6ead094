//! Access control: finding a request's token, verifying it as a JWT of a configured
//! issuer, and deciding whether it opens a stream.
//!
//! Verification follows the advisories peers' users hit: the issuer is matched
//! exactly, and its keys are the only ones tried (keys are looked up by (issuer,
//! `kid`), so one issuer's `kid` never verifies another's tokens); the algorithm must
//! be in the issuer's allowlist and fit the key (a secret only verifies HMAC, a public
//! key never does), so the token's own `alg` chooses nothing on its own; `none` does
//! not exist here; `aud` and `exp` are required, `nbf` is honoured, and claims of the
//! wrong JSON type make a token invalid. Tokens never reach logs, metrics or error
//! texts: errors name what was wrong, not the token.
//!
//! [`Auth::start`] loads every issuer's keys and starts the tasks that keep them
//! current (`keys`); they stop with the token given to it.

mod keys;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthConfig, AuthMode, Authorize, StreamConfig, TokenSource};
use keys::KeySet;

/// The longest token read; anything longer is not a token of ours.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no JWT crypto provider is available")]
    NoCrypto,
    #[error("secret variable {0} is not set")]
    MissingEnv(String),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("keys from {from}: {message}")]
    Keys { from: String, message: String },
}

/// Why a token is not accepted. The texts are for logs and metrics: they never hold
/// the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    TooLarge,
    Malformed,
    UnknownIssuer,
    Algorithm,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Audience,
    MissingClaim(&'static str),
    ClaimType(&'static str),
}

impl TokenError {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenError::TooLarge => "token too large",
            TokenError::Malformed => "malformed token",
            TokenError::UnknownIssuer => "unknown issuer",
            TokenError::Algorithm => "algorithm not allowed for this issuer and key",
            TokenError::UnknownKey => "unknown key",
            TokenError::Signature => "bad signature",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not valid yet",
            TokenError::Audience => "wrong audience",
            TokenError::MissingClaim(c) => c,
            TokenError::ClaimType(c) => c,
        }
    }
}

/// Why a request may not open a stream, and what it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No token: `401`.
    Missing,
    /// A token that does not verify: `401` with `error="invalid_token"`.
    Invalid(TokenError),
    /// A valid token the stream's rules do not admit: `403`.
    Forbidden,
}

impl Denial {
    pub fn status(self) -> u16 {
        match self {
            Denial::Missing | Denial::Invalid(_) => 401,
            Denial::Forbidden => 403,
        }
    }

    /// The `WWW-Authenticate` header of a `401`.
    pub fn challenge(self) -> Option<&'static str> {
        match self {
            Denial::Missing => Some("Bearer realm=\"tailgate\""),
            Denial::Invalid(_) => Some("Bearer realm=\"tailgate\", error=\"invalid_token\""),
            Denial::Forbidden => None,
        }
    }

    /// The short JSON body: never the token.
    pub fn body(self) -> &'static str {
        match self {
            Denial::Missing => "{\"error\":\"unauthorized\"}\n",
            Denial::Invalid(_) => "{\"error\":\"invalid_token\"}\n",
            Denial::Forbidden => "{\"error\":\"forbidden\"}\n",
        }
    }

    /// The label of `auth_denied_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::Missing => "missing",
            Denial::Invalid(TokenError::Expired) => "expired",
            Denial::Invalid(_) => "invalid",
            Denial::Forbidden => "forbidden",
        }
    }
}

/// A verified token: what a connection keeps to be checked again on reload and to
/// end at expiry.
#[derive(Debug)]
pub struct Credential {
    /// Kept to verify again when the keys or rules change.
    token: Box<str>,
    pub claims: Value,
    pub subject: Option<String>,
    /// The last second the token is accepted in: `exp` plus the leeway, seconds since
    /// the epoch.
    pub expires: u64,
}

impl Credential {
    /// Time left until the token stops verifying: `exp` is valid through its whole
    /// second (validation refuses only once the clock is past it), so that is the
    /// start of the next second.
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(self.expires.saturating_add(1)).saturating_sub(now)
    }
}

struct Issuer {
    audience: Vec<String>,
    algorithms: Vec<Algorithm>,
    keys: Arc<KeySet>,
}

/// The running access control of one config.
pub struct Auth {
    mode: AuthMode,
    sources: Vec<TokenSource>,
    leeway: Duration,
    issuers: HashMap<String, Issuer>,
}

impl Auth {
    /// Loads every issuer's keys and starts keeping them current until `cancel`.
    pub async fn start(
        config: &AuthConfig,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Auth>, AuthError> {
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            return Err(AuthError::NoCrypto);
        }
        let mut issuers = HashMap::new();
        if config.mode == AuthMode::Jwt {
            for issuer in &config.issuers {
                let keys = KeySet::start(&issuer.keys, cancel, tracker).await?;
                issuers.insert(
                    issuer.iss.clone(),
                    Issuer {
                        audience: issuer.audience.clone(),
                        algorithms: issuer.algorithms.clone(),
                        keys,
                    },
                );
            }
        }
        Ok(Arc::new(Auth {
            mode: config.mode,
            sources: config.token_sources.clone(),
            leeway: config.leeway,
            issuers,
        }))
    }

    /// An `Auth` that admits everyone (`mode = "none"`).
    pub fn none() -> Arc<Auth> {
        Arc::new(Auth {
            mode: AuthMode::None,
            sources: Vec::new(),
            leeway: Duration::ZERO,
            issuers: HashMap::new(),
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Whether `stream` needs a token.
    pub fn protects(&self, stream: &StreamConfig) -> bool {
        self.mode == AuthMode::Jwt && !stream.public
    }

    /// The query parameters that may carry a token, for redacting logged URLs.
    pub fn query_params(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().filter_map(|s| match s {
            TokenSource::Query(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The request's token, from the first configured source that has one: `header`
    /// looks up a request header by lower-case name, `query` is the query string.
    pub fn token<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a [u8]>,
        query: Option<&'a str>,
    ) -> Option<Cow<'a, str>> {
        self.sources.iter().find_map(|source| match source {
            TokenSource::Header => header("authorization")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(bearer)
                .map(Cow::Borrowed),
            TokenSource::Cookie(name) => header("cookie")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|cookies| cookie(cookies, name))
                .map(Cow::Borrowed),
            TokenSource::Query(name) => query.and_then(|q| crate::wire::query_param(q, name)),
        })
    }

    /// Decides whether a request with `token` may open `stream`: `Ok(None)` for a
    /// stream that needs no token, `Ok(Some(credential))` for an admitted token.
    pub async fn admit(
        &self,
        stream: &StreamConfig,
        token: Option<&str>,
    ) -> Result<Option<Arc<Credential>>, Denial> {
        if !self.protects(stream) {
            return Ok(None);
        }
        let token = token.ok_or(Denial::Missing)?;
        let credential = self.verify(token).await.map_err(Denial::Invalid)?;
        authorized(stream.authorize.as_ref(), &credential.claims)?;
        Ok(Some(Arc::new(credential)))
    }

    /// Whether a caller with `credential` (already verified, or none) may open
    /// `stream`: for listing the streams a caller may see.
    pub fn allows(&self, stream: &StreamConfig, credential: Option<&Credential>) -> bool {
        !self.protects(stream)
            || credential.is_some_and(|c| authorized(stream.authorize.as_ref(), &c.claims).is_ok())
    }

    /// Checks an open connection again, after the rules or keys changed: its token
    /// must still verify and be admitted.
    pub async fn recheck(
        &self,
        stream: &StreamConfig,
        credential: Option<&Credential>,
    ) -> Result<(), Denial> {
        if !self.protects(stream) {
            return Ok(());
        }
        let credential = credential.ok_or(Denial::Forbidden)?;
        let again = self
            .verify(&credential.token)
            .await
            .map_err(|_| Denial::Forbidden)?;
        authorized(stream.authorize.as_ref(), &again.claims)
    }

    /// Verifies `token` as a JWT of one of the issuers.
    pub async fn verify(&self, token: &str) -> Result<Credential, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        // The claims are read before the signature is checked only to pick whose keys
        // and allowlist apply, and to name a failure; the signature then decides.
        let unverified = unverified_claims(token)?;
        let iss = match unverified.get("iss") {
            Some(Value::String(iss)) => iss.clone(),
            Some(_) => return Err(TokenError::ClaimType("iss")),
            None => return Err(TokenError::MissingClaim("iss")),
        };
        let issuer = self.issuers.get(&iss).ok_or(TokenError::UnknownIssuer)?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[iss.as_str()]);
        validation.set_audience(&issuer.audience);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();

        let kid = header.kid.as_deref();
        let mut candidates = issuer.keys.keys().candidates(kid);
        if kid.is_some() && candidates.is_empty() && issuer.keys.refetch_for_unknown_kid().await {
            candidates = issuer.keys.keys().candidates(kid);
        }
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey);
        }
        let mut last = TokenError::Algorithm;
        for key in candidates {
            if key.alg.is_some_and(|a| a != header.alg) {
                continue;
            }
            match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
                Ok(data) => return self.credential(token, data.claims),
                Err(e) => {
                    last = token_error(e.kind(), &unverified);
                    // A claim problem is the token's, whichever key checked it.
                    if !matches!(last, TokenError::Signature | TokenError::Algorithm) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// The credential of a verified token, once its claims have the right types.
    fn credential(&self, token: &str, claims: Value) -> Result<Credential, TokenError> {
        let number = |name: &'static str| match claims.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(TokenError::ClaimType(name)),
            Some(_) => Err(TokenError::ClaimType(name)),
        };
        let exp = number("exp")?.ok_or(TokenError::MissingClaim("exp"))?;
        number("nbf")?;
        number("iat")?;
        if !matches!(claims.get("iss"), Some(Value::String(_))) {
            return Err(TokenError::ClaimType("iss"));
        }
        match claims.get("aud") {
            Some(Value::String(_)) => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
            _ => return Err(TokenError::ClaimType("aud")),
        }
        let subject = match claims.get("sub") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(TokenError::ClaimType("sub")),
        };
        Ok(Credential {
            token: token.into(),
            subject,
            expires: exp.saturating_add(self.leeway.as_secs()),
            claims,
        })
    }
}

/// Whether `claims` satisfy `rule`: the claim at the JSON Pointer equals one of the
/// values, or is an array holding one. A stream without a rule admits any valid token.
fn authorized(rule: Option<&Authorize>, claims: &Value) -> Result<(), Denial> {
    let Some(rule) = rule else {
        return Ok(());
    };
    let matches = |v: &Value| {
        v.as_str()
            .is_some_and(|s| rule.any_of.iter().any(|a| a == s))
    };
    match claims.pointer(&rule.claim) {
        Some(Value::Array(items)) if items.iter().any(matches) => Ok(()),
        Some(v) if matches(v) => Ok(()),
        _ => Err(Denial::Forbidden),
    }
}

/// What a verification failure means; `claims` (unverified) tell a claim of the wrong
/// type from a missing one, which `jsonwebtoken` reports alike.
fn token_error(kind: &jsonwebtoken::errors::ErrorKind, claims: &Value) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    let claim = |c: &str| -> &'static str {
        match c {
            "exp" => "exp",
            "aud" => "aud",
            "nbf" => "nbf",
            "sub" => "sub",
            _ => "iss",
        }
    };
    match kind {
        K::InvalidSignature => TokenError::Signature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::InvalidKeyFormat => {
            TokenError::Algorithm
        }
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::Audience,
        K::InvalidIssuer => TokenError::UnknownIssuer,
        K::MissingRequiredClaim(c) if claims.get(c.as_str()).is_some() => {
            TokenError::ClaimType(claim(c))
        }
        K::MissingRequiredClaim(c) => TokenError::MissingClaim(claim(c)),
        K::InvalidClaimFormat(c) => TokenError::ClaimType(claim(c)),
        _ => TokenError::Malformed,
    }
}

/// The claims, read without verifying anything.
fn unverified_claims(token: &str) -> Result<Value, TokenError> {
    let payload = token.split('.').nth(1).ok_or(TokenError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Value = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    if !claims.is_object() {
        return Err(TokenError::Malformed);
    }
    Ok(claims)
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name)
            .then_some(v.trim().trim_matches('"'))
            .filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests;
