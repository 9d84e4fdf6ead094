//! The file as written: serde types that mirror each section with
//! `deny_unknown_fields`, read section by section so every unknown or mistyped key is
//! reported, not only the first.

use serde::Deserialize;
use toml::Spanned;

use super::problems::Problems;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) heartbeat: Option<Spanned<String>>,
    pub(super) send_timeout: Option<Spanned<String>>,
    pub(super) shutdown_grace: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_lifetime: Option<Spanned<String>>,
    pub(super) cors_origins: Option<Vec<String>>,
    pub(super) head_timeout: Option<Spanned<String>>,
    pub(super) keepalive_timeout: Option<Spanned<String>>,
    pub(super) client_errors: Option<Spanned<String>>,
    pub(super) admin_listen: Option<Spanned<String>>,
    pub(super) log_format: Option<Spanned<String>>,
    pub(super) max_connections_per_ip: Option<Spanned<i64>>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) overload_retry: Option<Spanned<String>>,
    pub(super) cors_credentials: Option<Spanned<bool>>,
    pub(super) mux_max_streams: Option<Spanned<i64>>,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) http2_max_streams: Option<Spanned<i64>>,
}

/// `[server] tls = { cert_file = "..", key_file = ".." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: Spanned<String>,
    pub(super) key_file: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<Spanned<String>>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) progress_timeout: Option<Spanned<String>>,
    pub(super) backoff_initial: Option<Spanned<String>>,
    pub(super) backoff_max: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) max_row_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEmbedded {
    pub(super) init: Option<Spanned<String>>,
    pub(super) legacy: Option<bool>,
    pub(super) retain: Option<Spanned<String>>,
    pub(super) tick: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) schedule: Vec<Spanned<RawSchedule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    pub(super) every: Spanned<String>,
    pub(super) sql: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) delay: Option<Spanned<String>>,
    pub(super) retry: Option<Spanned<String>>,
    pub(super) event: Option<Spanned<String>>,
    pub(super) history: Option<Spanned<i64>>,
    pub(super) history_bytes: Option<Spanned<i64>>,
    pub(super) client_queue: Option<Spanned<i64>>,
    pub(super) authorize: Option<Spanned<RawAuthorize>>,
    pub(super) max_partitions: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    pub(super) path: Spanned<String>,
    pub(super) view: Option<Spanned<String>>,
    pub(super) query: Option<Spanned<String>>,
    pub(super) event: Option<Spanned<String>>,
    pub(super) delay: Option<Spanned<String>>,
    pub(super) retry: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) cluster: Option<Spanned<String>>,
    pub(super) history: Option<Spanned<i64>>,
    pub(super) history_bytes: Option<Spanned<i64>>,
    pub(super) client_queue: Option<Spanned<i64>>,
    pub(super) public: Option<Spanned<bool>>,
    pub(super) authorize: Option<Spanned<RawAuthorize>>,
    pub(super) filters: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) columns: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) scope: Option<Spanned<RawScope>>,
    pub(super) max_partitions: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScope {
    pub(super) column: Spanned<String>,
    pub(super) claim: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthorize {
    pub(super) claim: Spanned<String>,
    pub(super) any_of: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) mode: Option<Spanned<String>>,
    pub(super) token_sources: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) leeway: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) issuers: Vec<Spanned<RawIssuer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    pub(super) iss: Spanned<String>,
    pub(super) audience: Spanned<Vec<Spanned<String>>>,
    pub(super) algorithms: Spanned<Vec<Spanned<String>>>,
    pub(super) jwks_file: Option<Spanned<String>>,
    pub(super) jwks_url: Option<Spanned<String>>,
    pub(super) jwks_refresh: Option<Spanned<String>>,
    pub(super) public_key_file: Option<Spanned<String>>,
    pub(super) secret_env: Option<Spanned<String>>,
    pub(super) secret_file: Option<Spanned<String>>,
}

/// The file as written, section by section. A section that failed to deserialize is
/// `None`, and its problem is already recorded.
pub(super) struct RawConfig {
    pub(super) server: Option<RawServer>,
    pub(super) upstream: Option<RawUpstream>,
    pub(super) embedded: Option<RawEmbedded>,
    pub(super) defaults: Option<RawDefaults>,
    pub(super) auth: Option<RawAuth>,
    /// `None` for an entry that failed to deserialize.
    pub(super) streams: Vec<Option<RawStream>>,
}

impl RawConfig {
    pub(super) fn from_text(text: &str, problems: &mut Problems<'_>) -> Option<RawConfig> {
        use toml::de::{DeTable, DeValue, ValueDeserializer};
        if text.trim().is_empty() {
            problems.at(0, "the file is empty");
            return None;
        }
        let root = match DeTable::parse(text) {
            Ok(root) => root,
            Err(e) => {
                problems.toml(&e);
                return None;
            }
        };
        let mut raw = RawConfig {
            server: Some(RawServer::default()),
            upstream: Some(RawUpstream::default()),
            embedded: Some(RawEmbedded::default()),
            defaults: Some(RawDefaults::default()),
            auth: Some(RawAuth::default()),
            streams: Vec::new(),
        };
        /// Reads a table, reporting every unknown or mistyped key, not only the first.
        /// Unknown keys are dropped and the rest is read on, so the entry's other
        /// problems are reported too; a mistyped key makes the entry unreadable (its
        /// value cannot stand in for the key, and leaving it out would invent problems
        /// such as a missing `path`).
        fn section<T: for<'de> Deserialize<'de>>(
            value: Spanned<DeValue<'_>>,
            problems: &mut Problems<'_>,
        ) -> Option<T> {
            let span = value.span();
            let DeValue::Table(table) = value.get_ref() else {
                return T::deserialize(ValueDeserializer::from(value))
                    .map_err(|e| problems.toml(&e))
                    .ok();
            };
            // Most tables read whole; only the others are taken apart key by key.
            if let Ok(read) = T::deserialize(ValueDeserializer::from(value.clone())) {
                return Some(read);
            }
            let mut good = table.clone();
            let mut mistyped = false;
            for (key, item) in table.iter() {
                let mut alone = toml::de::DeTable::new();
                alone.insert(key.clone(), item.clone());
                let alone = Spanned::new(span.clone(), DeValue::Table(alone));
                // Alone, a key also lacks the required ones; the whole table says that.
                match T::deserialize(ValueDeserializer::from(alone)) {
                    Err(e) if !e.message().starts_with("missing field") => {
                        let message = e.message().trim();
                        let name = key.get_ref().as_ref();
                        let offset = e.span().unwrap_or_else(|| item.span()).start;
                        if message.starts_with("unknown field") {
                            problems.at(offset, message.to_string());
                            good.remove(key.get_ref().as_ref());
                        } else {
                            problems.at(offset, format!("`{name}`: {message}"));
                            mistyped = true;
                        }
                    }
                    _ => {}
                }
            }
            if mistyped {
                return None;
            }
            T::deserialize(ValueDeserializer::from(Spanned::new(
                span,
                DeValue::Table(good),
            )))
            .map_err(|e| problems.toml(&e))
            .ok()
        }
        for (key, value) in root.into_inner() {
            let name = key.get_ref().as_ref();
            match name {
                "server" => raw.server = section(value, problems),
                "upstream" => raw.upstream = section(value, problems),
                "embedded" => raw.embedded = section(value, problems),
                "defaults" => raw.defaults = section(value, problems),
                "auth" => raw.auth = section(value, problems),
                "streams" => {
                    let start = value.span().start;
                    match value.into_inner() {
                        DeValue::Array(entries) => {
                            for entry in entries {
                                raw.streams.push(section(entry, problems));
                            }
                        }
                        _ => problems.at(start, "`streams` must be an array of tables: [[streams]]"),
                    }
                }
                other => problems.at(
                    key.span().start,
                    format!(
                        "unknown section `{other}`, expected one of `server`, `upstream`, `embedded`, `auth`, `defaults`, `streams`"
                    ),
                ),
            }
        }
        Some(raw)
    }
}
