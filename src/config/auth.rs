//! Validating `[auth]`, `authorize` and `public`: the token sources, the issuers and
//! their key sources, and the rules streams name. The safety rules are checked here,
//! once, so a running gateway never holds a contradictory access config.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use toml::Spanned;

use super::problems::Problems;
use super::raw::{RawAuth, RawAuthorize, RawIssuer};
use super::validate::{choice, positive};
use super::{AuthConfig, AuthMode, Authorize, IssuerConfig, KeySource, TokenSource};

/// The most clock skew `leeway` may allow.
const MAX_LEEWAY: Duration = Duration::from_secs(60);
/// How often a JWKS URL is fetched at least, and the floor of `jwks_refresh`.
const MIN_REFRESH: Duration = Duration::from_secs(30);

pub(super) fn validate_auth(
    p: &mut Problems<'_>,
    raw: RawAuth,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> AuthConfig {
    let mode = choice(
        p,
        &raw.mode,
        "mode",
        &[("none", AuthMode::None), ("jwt", AuthMode::Jwt)],
    );
    let token_sources = match &raw.token_sources {
        None => vec![
            TokenSource::Header,
            TokenSource::Cookie("tailgate_token".into()),
        ],
        Some(list) => {
            if list.get_ref().is_empty() {
                p.at(
                    list.span().start,
                    "`token_sources` must name at least one source",
                );
            }
            list.get_ref()
                .iter()
                .filter_map(|s| token_source(p, s))
                .collect()
        }
    };
    let leeway = match &raw.leeway {
        None => Duration::from_secs(30),
        Some(l) => {
            let d = super::validate::duration(p, &raw.leeway, Duration::from_secs(30));
            if d > MAX_LEEWAY {
                p.at(l.span().start, "`leeway` may be at most 60s");
            }
            d.min(MAX_LEEWAY)
        }
    };
    let mut names = HashSet::new();
    let issuers: Vec<IssuerConfig> = raw
        .issuers
        .iter()
        .filter_map(|i| {
            let at = i.span().start;
            let issuer = issuer(p, i.get_ref(), resolve);
            if let Some(issuer) = &issuer {
                if !names.insert(issuer.iss.clone()) {
                    p.at(at, format!("issuer {:?} is listed twice", issuer.iss));
                }
            }
            issuer
        })
        .collect();
    if mode == AuthMode::Jwt && raw.issuers.is_empty() {
        let at = raw.mode.as_ref().map_or(0, |m| m.span().start);
        p.at(at, "`mode = \"jwt\"` needs at least one `[[auth.issuers]]`");
    }
    AuthConfig {
        mode,
        token_sources,
        leeway,
        issuers,
    }
}

fn token_source(p: &mut Problems<'_>, s: &Spanned<String>) -> Option<TokenSource> {
    let text = s.get_ref();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 64
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let source = match text.split_once(':') {
        None if text == "header" => Some(TokenSource::Header),
        Some(("cookie", name)) if name_ok(name) => Some(TokenSource::Cookie(name.into())),
        Some(("query", name)) if name_ok(name) => Some(TokenSource::Query(name.into())),
        _ => None,
    };
    if source.is_none() {
        p.at(
            s.span().start,
            format!(
                "token source {text:?} must be \"header\", \"cookie:<name>\" or \"query:<name>\" \
                 (names: letters, digits, `-_.`)"
            ),
        );
    }
    source
}

fn issuer(
    p: &mut Problems<'_>,
    raw: &RawIssuer,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Option<IssuerConfig> {
    let before = p.len();
    if raw.iss.get_ref().is_empty() {
        p.at(raw.iss.span().start, "`iss` must not be empty");
    }
    if raw.audience.get_ref().is_empty() {
        p.at(
            raw.audience.span().start,
            "`audience` must name at least one audience",
        );
    }
    if raw.algorithms.get_ref().is_empty() {
        p.at(
            raw.algorithms.span().start,
            "`algorithms` must name at least one algorithm",
        );
    }
    let algorithms: Vec<Algorithm> = raw
        .algorithms
        .get_ref()
        .iter()
        .filter_map(|a| algorithm(p, a))
        .collect();
    let hmac = |a: &Algorithm| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);

    let sources: Vec<(&Spanned<String>, KeySource)> = [
        raw.jwks_file
            .as_ref()
            .map(|f| (f, KeySource::JwksFile(resolve(f.get_ref())))),
        raw.jwks_url.as_ref().map(|u| {
            let refresh = raw
                .jwks_refresh
                .as_ref()
                .map_or(Duration::from_secs(300), |r| {
                    let d = positive(
                        p,
                        &Some(r.clone()),
                        Duration::from_secs(300),
                        "jwks_refresh",
                    );
                    if d < MIN_REFRESH {
                        p.at(r.span().start, "`jwks_refresh` must be at least 30s");
                    }
                    d
                });
            jwks_url(p, u);
            (
                u,
                KeySource::JwksUrl {
                    url: u.get_ref().clone(),
                    refresh,
                },
            )
        }),
        raw.public_key_file
            .as_ref()
            .map(|f| (f, KeySource::PublicKeyFile(resolve(f.get_ref())))),
        raw.secret_env
            .as_ref()
            .map(|e| (e, KeySource::SecretEnv(e.get_ref().clone()))),
        raw.secret_file
            .as_ref()
            .map(|f| (f, KeySource::SecretFile(resolve(f.get_ref())))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let (Some(r), None) = (&raw.jwks_refresh, &raw.jwks_url) {
        p.at(
            r.span().start,
            "`jwks_refresh` only applies with `jwks_url`",
        );
    }
    let keys = match sources.as_slice() {
        [] => {
            p.at(
                raw.iss.span().start,
                "an issuer needs exactly one key source: `jwks_file`, `jwks_url`, \
                 `public_key_file`, `secret_env` or `secret_file`",
            );
            None
        }
        [(at, source)] => {
            // The algorithm confusion of old: an HMAC algorithm verified with a public
            // key's bytes as the secret. Secrets sign HMAC only; public keys never do.
            let secret = matches!(source, KeySource::SecretEnv(_) | KeySource::SecretFile(_));
            for a in raw.algorithms.get_ref() {
                if let Some(alg) = algorithm_quiet(a.get_ref()) {
                    if secret != hmac(&alg) {
                        p.at(
                            a.span().start,
                            if secret {
                                format!("{:?} needs a public key: a secret only verifies HS256/HS384/HS512", a.get_ref())
                            } else {
                                format!("{:?} is HMAC: it needs `secret_env` or `secret_file`, never a public key", a.get_ref())
                            },
                        );
                    }
                }
            }
            if let KeySource::SecretEnv(name) = source {
                if name.is_empty() {
                    p.at(at.span().start, "`secret_env` must name a variable");
                }
            }
            Some(source.clone())
        }
        [_, (second, _), ..] => {
            p.at(
                second.span().start,
                "an issuer takes exactly one key source",
            );
            None
        }
    };
    let issuer = IssuerConfig {
        iss: raw.iss.get_ref().clone(),
        audience: raw
            .audience
            .get_ref()
            .iter()
            .map(|a| a.get_ref().clone())
            .collect(),
        algorithms,
        keys: keys?,
    };
    (p.len() == before).then_some(issuer)
}

/// The algorithms a token may use: every JWS algorithm `jsonwebtoken` verifies, never
/// `none`.
fn algorithm_quiet(name: &str) -> Option<Algorithm> {
    name.parse::<Algorithm>().ok()
}

fn algorithm(p: &mut Problems<'_>, a: &Spanned<String>) -> Option<Algorithm> {
    let parsed = algorithm_quiet(a.get_ref());
    if parsed.is_none() {
        p.at(
            a.span().start,
            format!(
                "unknown algorithm {:?}; use HS256/384/512, RS256/384/512, PS256/384/512, \
                 ES256/384 or EdDSA",
                a.get_ref()
            ),
        );
    }
    parsed
}

/// A JWKS URL is `https`, or `http` only to a loopback host (a test IdP); it is fixed
/// here and never built from a token.
fn jwks_url(p: &mut Problems<'_>, u: &Spanned<String>) {
    let text = u.get_ref();
    let ok = if let Some(rest) = text.strip_prefix("https://") {
        !rest.is_empty()
    } else if let Some(rest) = text.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        host == "localhost" || host == "[::1]" || host.starts_with("127.")
    } else {
        false
    };
    if !ok {
        p.at(
            u.span().start,
            format!("`jwks_url` {text:?} must be https (http only to a loopback host)"),
        );
    }
}

/// An `authorize` rule.
pub(super) fn authorize(p: &mut Problems<'_>, raw: &Spanned<RawAuthorize>) -> Option<Authorize> {
    let before = p.len();
    let r = raw.get_ref();
    let claim = r.claim.get_ref();
    if !(claim.is_empty() || claim.starts_with('/')) {
        p.at(
            r.claim.span().start,
            format!("`claim` {claim:?} must be a JSON Pointer such as \"/roles\""),
        );
    }
    if r.any_of.get_ref().is_empty() {
        p.at(
            r.any_of.span().start,
            "`any_of` must hold at least one value",
        );
    }
    (p.len() == before).then(|| Authorize {
        claim: claim.clone(),
        any_of: r
            .any_of
            .get_ref()
            .iter()
            .map(|v| v.get_ref().clone())
            .collect(),
    })
}

/// The file a relative path in the config names.
pub(super) fn resolver(base: &Path) -> impl Fn(&str) -> PathBuf + '_ {
    move |s: &str| {
        let candidate = PathBuf::from(s);
        if candidate.is_absolute() {
            candidate
        } else {
            base.join(candidate)
        }
    }
}
