//! The route table: the stream each request path serves, by exact path or by
//! template (`/orders/{customer_id}`). The supervisor builds a new table on every
//! change and the gateway swaps it in whole, so a request never sees half a reload;
//! the HTTP layer only reads it.
//!
//! [`heartbeat`] is the one task that sends `: keepalive` to every stream (and lets
//! scoped streams drop idle channels); it stops when its token is cancelled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::StreamConfig;
use crate::feed::Target;

/// How long a scoped stream keeps a channel after its last client left, so a
/// browser that reconnects resumes from the channel's history.
pub const CHANNEL_LINGER: Duration = Duration::from_secs(30);

/// A stream as the HTTP layer sees it.
pub struct Route {
    /// The configured path, shared by every connection's access record.
    pub path: Arc<str>,
    pub config: Arc<StreamConfig>,
    pub target: Target,
}

/// A request path's route, with the values of its template's parameters.
pub struct Found {
    pub route: Arc<Route>,
    /// `(name, value)` in path order, percent-decoded (not yet known to be UTF-8).
    pub params: Vec<(String, Vec<u8>)>,
}

/// Configured path → route, and a matcher for templates.
#[derive(Default)]
pub struct Routes {
    by_path: BTreeMap<String, Arc<Route>>,
    templates: matchit::Router<Arc<Route>>,
}

impl Routes {
    /// The table of `routes`. Validation already refused templates that match the
    /// same requests; one that still conflicts is left out, and said so.
    pub fn new(routes: impl IntoIterator<Item = Arc<Route>>) -> Routes {
        let mut table = Routes::default();
        for route in routes {
            if !route.config.params.is_empty() {
                if let Err(e) = table
                    .templates
                    .insert(route.path.as_ref(), Arc::clone(&route))
                {
                    tracing::error!(stream = %route.path, error = %e, "Template conflicts with another; not routed.");
                    continue;
                }
            }
            table.by_path.insert(route.path.to_string(), route);
        }
        table
    }

    /// The route a request path serves: an exact path first, then a template.
    pub fn find(&self, path: &str) -> Option<Found> {
        if let Some(route) = self
            .by_path
            .get(path)
            .filter(|r| r.config.params.is_empty())
        {
            return Some(Found {
                route: Arc::clone(route),
                params: Vec::new(),
            });
        }
        let matched = self.templates.at(path).ok()?;
        let params = matched
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), crate::wire::percent_decode(v, false)))
            .collect();
        Some(Found {
            route: Arc::clone(matched.value),
            params,
        })
    }

    /// The route configured at exactly this path (a template by its template).
    pub fn get(&self, path: &str) -> Option<&Arc<Route>> {
        self.by_path.get(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Route>)> {
        self.by_path.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_path.values()
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

/// The table the gateway swaps and the HTTP layer reads.
pub type SharedRoutes = Arc<ArcSwap<Routes>>;

/// Sends a heartbeat to every routed stream every `every`, until `cancel` fires.
pub async fn heartbeat(routes: SharedRoutes, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                for route in routes.load().values() {
                    route.target.heartbeat(CHANNEL_LINGER);
                }
            }
        }
    }
}
