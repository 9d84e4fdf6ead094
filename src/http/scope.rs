//! Which hub a client of a stream reads: a plain stream's one hub, or the channel of
//! a scoped stream that its template values, query filters and token's scope name.
//!
//! Every value from the request is parsed here as its column's type (learned from
//! the upstream's row description) into a canonical form that only ever keys a map:
//! none reaches SQL. Both responders (hyper's and the fast path) call [`channel`].

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;

use super::access::End;
use crate::auth::{Auth, Credential};
use crate::feed::partitioned::{ChannelError, ChannelKey, Filter, PartKey, Partitioned, Resolved};
use crate::feed::values::ValueKind;
use crate::feed::Target;
use crate::hub::Hub;
use crate::route::{Found, Route};
use crate::telemetry::{Metrics, Refusal};
use crate::wire::EndReason;

/// Query values one request may carry across all its filters.
const MAX_FILTER_VALUES: usize = 64;

/// Values a scope claim may hold (an array means IN over them).
const MAX_SCOPE_VALUES: usize = 1000;

/// Parameter names are echoed in errors only this far.
const MAX_NAME_ECHO: usize = 64;

/// Why a request cannot have its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refused {
    /// `400`: a template value or query parameter that is unknown, empty, oversized
    /// or not of its column's type.
    BadParameter { parameter: String, error: String },
    /// `403`: the token has no usable scope claim, or a value outside it was asked
    /// for.
    OutOfScope(&'static str),
    /// The stream holds `max_partitions` channels: the overload answer.
    Full,
    /// The stream's relation is not described yet, or lacks a column: come back later.
    Unavailable,
}

impl Refused {
    /// Counts the refusal where it belongs and says how the connection ended.
    pub(super) fn note(&self, route: &Route, metrics: &Metrics) -> End {
        match self {
            Refused::BadParameter { .. } => End::BadRequest,
            Refused::OutOfScope(_) => {
                route.target.denied("forbidden");
                End::Denied
            }
            Refused::Full => {
                metrics.refused(Refusal::MaxPartitions);
                End::Told(EndReason::Overloaded)
            }
            Refused::Unavailable => End::Told(EndReason::Unavailable),
        }
    }

    /// The answer's status, or the end reason of the overload answer.
    pub(super) fn answer(&self) -> Result<u16, EndReason> {
        match self {
            Refused::BadParameter { .. } => Ok(400),
            Refused::OutOfScope(_) => Ok(403),
            Refused::Full => Err(EndReason::Overloaded),
            Refused::Unavailable => Err(EndReason::Unavailable),
        }
    }

    fn bad(parameter: &str, error: impl Into<String>) -> Refused {
        let mut parameter = parameter.to_string();
        if parameter.len() > MAX_NAME_ECHO {
            let mut end = MAX_NAME_ECHO;
            while !parameter.is_char_boundary(end) {
                end -= 1;
            }
            parameter.truncate(end);
            parameter.push('…');
        }
        Refused::BadParameter {
            parameter,
            error: error.into(),
        }
    }

    /// The JSON body of a `400` (the parameter's name and what is wrong with it;
    /// never its value).
    pub(super) fn body(&self) -> String {
        let mut body = match self {
            Refused::BadParameter { parameter, error } => serde_json::json!({
                "error": format!("parameter {parameter:?} {error}"),
                "parameter": parameter,
            })
            .to_string(),
            Refused::OutOfScope(why) => serde_json::json!({ "error": why }).to_string(),
            Refused::Full => r#"{"error":"overloaded"}"#.to_string(),
            Refused::Unavailable => r#"{"error":"unavailable"}"#.to_string(),
        };
        body.push('\n');
        body
    }
}

/// The hub a client of `found` reads, creating a scoped stream's channel if it is the
/// first.
pub(super) fn channel(
    found: &Found,
    query: Option<&str>,
    credential: Option<&Credential>,
    auth: &Auth,
) -> Result<Arc<Hub>, Refused> {
    let p = match &found.route.target {
        Target::Plain(hub) => return Ok(Arc::clone(hub)),
        Target::Partitioned(p) => p,
    };
    let key = channel_key(found, p, query, credential, auth)?;
    p.channel(key).map_err(|e| match e {
        ChannelError::TooMany => Refused::Full,
        ChannelError::NotReady => Refused::Unavailable,
    })
}

/// What [`channel`] would answer, without creating a channel (for `HEAD`).
pub(super) fn check(
    found: &Found,
    query: Option<&str>,
    credential: Option<&Credential>,
    auth: &Auth,
) -> Result<(), Refused> {
    match &found.route.target {
        Target::Plain(_) => Ok(()),
        Target::Partitioned(p) => channel_key(found, p, query, credential, auth).map(|_| ()),
    }
}

fn channel_key(
    found: &Found,
    p: &Partitioned,
    query: Option<&str>,
    credential: Option<&Credential>,
    auth: &Auth,
) -> Result<ChannelKey, Refused> {
    let config = &found.route.config;
    let resolved = p.resolved().ok_or(Refused::Unavailable)?;
    // The template's values, in path order (the first partition columns).
    let mut template = Vec::with_capacity(found.params.len());
    for ((name, raw), (_, kind)) in found.params.iter().zip(&resolved.parts) {
        let text = std::str::from_utf8(raw).map_err(|_| Refused::bad(name, "is not UTF-8"))?;
        let value = kind.parse(text).map_err(|e| Refused::bad(name, e))?;
        template.push(value);
    }
    let filter = filters(config.filters.as_slice(), &resolved, query, auth)?;
    let Some(scope) = &config.scope else {
        return Ok(ChannelKey::new(vec![join(&template, None)], &filter));
    };
    let (_, kind) = resolved.parts[resolved.parts.len() - 1];
    let allowed = scope_values(credential, &scope.claim, kind)?;
    // A filter on the scope's own column must stay inside the scope: the query never
    // widens it. (Validation refuses a template parameter on that column.)
    let outside = resolved
        .filters
        .get(&scope.column)
        .and_then(|(col, _)| filter.get(col))
        .is_some_and(|values| !values.is_subset(&allowed));
    if outside {
        return Err(Refused::OutOfScope("a value outside the token's scope"));
    }
    let parts = allowed
        .iter()
        .map(|v| join(&template, Some(v)))
        .collect::<Vec<_>>();
    Ok(ChannelKey::new(parts, &filter))
}

/// A partition key: the template's values, then the scope's value.
fn join(template: &[Box<str>], scope: Option<&str>) -> PartKey {
    let mut key = String::new();
    for (n, v) in template.iter().map(AsRef::as_ref).chain(scope).enumerate() {
        if n > 0 {
            key.push('\0');
        }
        key.push_str(v);
    }
    key.into()
}

/// The query's filters: every parameter must be a configured filter (or the resume
/// id, or a token), and every value parse as its column's type.
fn filters(
    allowed: &[String],
    resolved: &Resolved,
    query: Option<&str>,
    auth: &Auth,
) -> Result<Filter, Refused> {
    let mut filter = Filter::new();
    let mut count = 0;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let name = String::from_utf8(crate::wire::percent_decode(k, true))
            .map_err(|_| Refused::bad(&String::from_utf8_lossy(k.as_bytes()), "is not UTF-8"))?;
        if name == "last_event_id" || auth.query_params().any(|q| q == name) {
            continue;
        }
        if !allowed.contains(&name) {
            return Err(Refused::bad(&name, "is not a filter of this stream"));
        }
        // Resolved with the stream's filters; absent only mid-reload.
        let (col, kind) = *resolved.filters.get(&name).ok_or(Refused::Unavailable)?;
        count += 1;
        if count > MAX_FILTER_VALUES {
            return Err(Refused::bad(
                &name,
                format!("is one value too many: at most {MAX_FILTER_VALUES} filter values"),
            ));
        }
        let text = String::from_utf8(crate::wire::percent_decode(v, true))
            .map_err(|_| Refused::bad(&name, "is not UTF-8"))?;
        let value = kind.parse(&text).map_err(|e| Refused::bad(&name, e))?;
        filter.entry(col).or_default().insert(value);
    }
    Ok(filter)
}

/// The scope's values from the token's claim at `pointer`, canonical for `kind`.
/// Values that are not of the column's type can match no row and are left out; a
/// claim that is missing, null or leaves nothing is a `403`.
fn scope_values(
    credential: Option<&Credential>,
    pointer: &str,
    kind: ValueKind,
) -> Result<BTreeSet<Box<str>>, Refused> {
    const MISSING: Refused = Refused::OutOfScope("the token has no scope claim");
    let claim = credential
        .and_then(|c| c.claims.pointer(pointer))
        .ok_or(MISSING)?;
    let items: &[Value] = match claim {
        Value::Array(items) => items,
        other => std::slice::from_ref(other),
    };
    if items.len() > MAX_SCOPE_VALUES {
        return Err(Refused::OutOfScope(
            "the token's scope claim holds too many values",
        ));
    }
    let values: BTreeSet<Box<str>> = items
        .iter()
        .filter_map(|v| match v {
            Value::String(s) => kind.parse(s).ok(),
            Value::Number(n) => kind.parse(&n.to_string()).ok(),
            Value::Bool(b) => kind.parse(&b.to_string()).ok(),
            _ => None,
        })
        .collect();
    if values.is_empty() {
        return Err(MISSING);
    }
    Ok(values)
}
