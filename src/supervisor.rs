//! The set of running streams: one hub and one upstream task per configured path, and
//! applying a new config as a per-stream diff. The route table it hands out is what
//! the gateway publishes to the HTTP layer.
//!
//! Each stream's upstream task runs under a child of the supervisor's cancellation token
//! and in its task tracker. Removing or re-subscribing a stream cancels its task; a hub
//! outlives re-subscriptions so clients stay connected. Everything stops when the root
//! token is cancelled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

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

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.resubscribed.is_empty()
            && self.retuned.is_empty()
    }
}

pub struct Supervisor {
    target: Arc<Target>,
    policy: Policy,
    streams: BTreeMap<StreamPath, Running>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Supervisor {
    /// Starts the streams of `config`.
    pub fn start(
        config: &Config,
        target: Arc<Target>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Supervisor {
        let mut sup = Supervisor {
            target,
            policy: Policy::from(&config.upstream),
            streams: BTreeMap::new(),
            cancel,
            tracker,
        };
        sup.apply(config);
        sup
    }

    /// The route table of the running streams.
    pub fn routes(&self) -> Routes {
        self.streams
            .iter()
            .map(|(p, r)| (p.to_string(), Arc::clone(&r.route)))
            .collect()
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
                            path: Arc::clone(&running.route.path),
                            config: Arc::clone(new),
                            hub,
                        });
                        applied.retuned.push(path.to_string());
                    }
                }
            }
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
            route: Arc::new(Route {
                path: config.path.as_str().into(),
                config,
                hub,
            }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Resume;

    fn config(streams: &str) -> Config {
        crate::config::parse(std::path::Path::new("/x/streams.toml"), streams).expect("valid")
    }

    /// Frames a fresh subscriber of `hub` is handed at once.
    async fn frames(hub: &Arc<Hub>) -> String {
        let mut sub = hub.subscribe(Resume::Fresh);
        let mut out = Vec::new();
        while let Ok(true) =
            tokio::time::timeout(Duration::from_millis(1), sub.next(&mut out)).await
        {}
        out.iter().map(|b| String::from_utf8_lossy(b)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_config_is_applied_as_a_per_stream_diff() {
        let stream = |path: &str, rest: &str| format!("[[streams]]\npath = \"{path}\"\n{rest}\n");
        let before = config(
            &[
                stream("/same", "view = \"v\""),
                stream("/tuned", "view = \"v\""),
                stream("/requeried", "view = \"v\""),
                stream("/gone", "view = \"v\""),
            ]
            .concat(),
        );
        // Nothing listens on port 1: the upstream tasks retry in the background.
        let target = Arc::new(
            Target::new(&before.upstream, Some(([127, 0, 0, 1], 1).into())).expect("target"),
        );
        let cancel = CancellationToken::new();
        let mut sup = Supervisor::start(&before, target, cancel.clone(), TaskTracker::new());
        let old = sup.routes();
        assert_eq!(old.len(), 4);

        let after = config(
            &[
                stream("/same", "view = \"v\""),
                stream(
                    "/tuned",
                    "view = \"v\"\ndelay = \"1s\"\nretry = \"2s\"\nevent = \"e\"",
                ),
                stream("/requeried", "view = \"w\""),
                stream("/new", "view = \"v\""),
            ]
            .concat(),
        );
        let applied = sup.apply(&after);
        assert_eq!(
            applied,
            Applied {
                added: vec!["/new".into()],
                removed: vec!["/gone".into()],
                resubscribed: vec!["/requeried".into()],
                retuned: vec!["/tuned".into()],
            }
        );
        let new = sup.routes();
        assert_eq!(
            new.keys().collect::<Vec<_>>(),
            ["/new", "/requeried", "/same", "/tuned"]
        );
        // An unchanged stream keeps its route; changed ones keep their hub, so their
        // clients stay connected; the retuned one runs its new settings.
        assert!(Arc::ptr_eq(&old["/same"], &new["/same"]));
        for path in ["/tuned", "/requeried"] {
            assert!(Arc::ptr_eq(&old[path].hub, &new[path].hub), "{path}");
        }
        assert_eq!(new["/tuned"].config.delay, Duration::from_secs(1));
        assert!(frames(&new["/tuned"].hub)
            .await
            .starts_with("retry: 2000\n\n"));
        // The removed stream's clients are told so.
        assert!(frames(&old["/gone"].hub)
            .await
            .contains("event: end\ndata: {\"reason\":\"removed\"}"));
        // The same config again changes nothing.
        assert!(sup.apply(&after).is_empty());
        cancel.cancel();
    }
}
