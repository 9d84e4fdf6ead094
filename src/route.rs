//! The route table: the stream each request path serves. The supervisor builds a new
//! table on every change and the gateway swaps it in whole, so a request never sees
//! half a reload; the HTTP layer only reads it.
//!
//! [`heartbeat`] is the one task that sends `: keepalive` to every stream; it stops
//! when its token is cancelled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::StreamConfig;
use crate::hub::Hub;

/// A stream as the HTTP layer sees it.
pub struct Route {
    /// The configured path, shared by every connection's access record.
    pub path: Arc<str>,
    pub config: Arc<StreamConfig>,
    pub hub: Arc<Hub>,
}

/// Path → route.
pub type Routes = BTreeMap<String, Arc<Route>>;

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
                    route.hub.heartbeat();
                }
            }
        }
    }
}
