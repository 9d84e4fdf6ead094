//! The set of running streams: one hub and one upstream task per configured path, the
//! routing table the HTTP layer reads, and applying a new config as a per-stream diff.
//!
//! Each stream's upstream task runs under a child of the supervisor's cancellation token
//! and in its task tracker. Removing or re-subscribing a stream cancels its task; a hub
//! outlives re-subscriptions so clients stay connected. One heartbeat task serves every
//! hub. Everything stops when the root token is cancelled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, StreamConfig, StreamPath};
use crate::hub::{Hub, Settings};
use crate::route::{Route, Routes};
use crate::upstream::{Policy, StreamTask, Target};
use crate::wire::{EndReason, Reason};

struct Running {
    route: Arc<Route>,
    cancel: CancellationToken,
    delay: watch::Sender<Duration>,
}

/// What one application of a config changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub resubscribed: Vec<String>,
    pub retuned: Vec<String>,
}

pub struct Supervisor {
    target: Arc<Target>,
    policy: Policy,
    streams: BTreeMap<StreamPath, Running>,
    routes: Arc<ArcSwap<Routes>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Supervisor {
    /// Starts the streams of `config` and the shared heartbeat.
    pub fn start(
        config: &Config,
        target: Arc<Target>,
        routes: Arc<ArcSwap<Routes>>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Supervisor {
        let mut sup = Supervisor {
            target,
            policy: Policy::from(&config.upstream),
            streams: BTreeMap::new(),
            routes,
            cancel,
            tracker,
        };
        sup.spawn_heartbeat(config.server.heartbeat);
        sup.apply(config);
        sup
    }

    fn spawn_heartbeat(&self, every: Duration) {
        let routes = Arc::clone(&self.routes);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
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
        });
    }

    /// Brings the running streams in line with `config`'s streams.
    pub fn apply(&mut self, config: &Config) -> Applied {
        let mut applied = Applied::default();
        let wanted: BTreeMap<&StreamPath, &Arc<StreamConfig>> =
            config.streams.iter().map(|s| (&s.path, s)).collect();

        let gone: Vec<StreamPath> = self
            .streams
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(running) = self.streams.remove(&path) {
                running.cancel.cancel();
                running.route.hub.close(EndReason::Removed);
                applied.removed.push(path.to_string());
            }
        }

        for (path, new) in wanted {
            match self.streams.get_mut(path) {
                None => {
                    let hub = Hub::new(Settings::new(new, config.server.client_errors));
                    let running = self.spawn(Arc::clone(new), hub, Reason::Initial);
                    self.streams.insert(path.clone(), running);
                    applied.added.push(path.to_string());
                }
                Some(running) if running.route.config == *new => {
                    // Server-wide settings the hub encodes may still have changed.
                    let settings = Settings::new(new, config.server.client_errors);
                    running.route.hub.update_settings(settings);
                }
                Some(running) => {
                    let hub = Arc::clone(&running.route.hub);
                    hub.update_settings(Settings::new(new, config.server.client_errors));
                    if running.route.config.upstream_differs(new) {
                        running.cancel.cancel();
                        let replacement = self.spawn(Arc::clone(new), hub, Reason::ConfigChanged);
                        self.streams.insert(path.clone(), replacement);
                        applied.resubscribed.push(path.to_string());
                    } else {
                        running.delay.send_replace(new.delay);
                        running.route = Arc::new(Route {
                            config: Arc::clone(new),
                            hub,
                        });
                        applied.retuned.push(path.to_string());
                    }
                }
            }
        }

        let routes: Routes = self
            .streams
            .iter()
            .map(|(p, r)| (p.to_string(), Arc::clone(&r.route)))
            .collect();
        self.routes.store(Arc::new(routes));
        if !(applied.added.is_empty()
            && applied.removed.is_empty()
            && applied.resubscribed.is_empty()
            && applied.retuned.is_empty())
        {
            info!(
                added = ?applied.added,
                removed = ?applied.removed,
                resubscribed = ?applied.resubscribed,
                retuned = ?applied.retuned,
                "Streams updated."
            );
        }
        applied
    }

    fn spawn(&self, config: Arc<StreamConfig>, hub: Arc<Hub>, reason: Reason) -> Running {
        let cancel = self.cancel.child_token();
        let (delay, delay_rx) = watch::channel(config.delay);
        let task = StreamTask {
            stream: Arc::clone(&config),
            target: Arc::clone(&self.target),
            policy: self.policy.clone(),
            hub: Arc::clone(&hub),
            delay: delay_rx,
            reason,
        };
        self.tracker.spawn(task.run(cancel.clone()));
        Running {
            route: Arc::new(Route { config, hub }),
            cancel,
            delay,
        }
    }

    /// Ends every client stream with `end` (reason `shutdown`) and stops the tasks.
    pub fn shutdown(&mut self) {
        for running in self.streams.values() {
            running.route.hub.close(EndReason::Shutdown);
            running.cancel.cancel();
        }
        if self.streams.is_empty() {
            warn!("Shutdown with no streams configured.");
        }
    }
}
