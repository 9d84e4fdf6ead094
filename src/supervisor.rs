//! The set of running streams and the sources that feed them: one upstream task per
//! distinct subscription (view or query, key, cluster), one feed and one target (a hub,
//! or a scoped stream's channels) per configured path; and applying a new config as a
//! per-stream diff. The route table it hands out is what the gateway publishes to the
//! HTTP layer.
//!
//! Each source's task runs under a child of the supervisor's cancellation token and
//! in its task tracker; a source whose last stream goes is cancelled. A stream's
//! target outlives re-subscriptions (moving to another source), so clients stay
//! connected. Everything stops when the root token is cancelled.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::{ClientErrors, Config, StreamConfig, StreamPath};
use crate::feed::{Feed, Partitioned, Target};
use crate::hub::{Hub, Settings};
use crate::route::{Route, Routes};
use crate::upstream::{Command, Policy, SourceKey, SourceTask, Target as Upstream};
use crate::wire::{EndReason, Reason};

struct Running {
    route: Arc<Route>,
    source: SourceKey,
    delay: watch::Sender<Duration>,
}

/// A running source: its task's mailbox and how many streams it feeds.
struct Source {
    commands: mpsc::UnboundedSender<Command>,
    cancel: CancellationToken,
    streams: usize,
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
    upstream: Arc<Upstream>,
    policy: Policy,
    streams: BTreeMap<StreamPath, Running>,
    sources: HashMap<SourceKey, Source>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Supervisor {
    /// Starts the streams of `config`.
    pub fn start(
        config: &Config,
        upstream: Arc<Upstream>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Supervisor {
        let mut sup = Supervisor {
            upstream,
            policy: Policy::from(&config.upstream),
            streams: BTreeMap::new(),
            sources: HashMap::new(),
            cancel,
            tracker,
        };
        sup.apply(config);
        sup
    }

    /// The route table of the running streams.
    pub fn routes(&self) -> Routes {
        Routes::new(self.streams.values().map(|r| Arc::clone(&r.route)))
    }

    /// Upstream sessions the running streams share.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Brings the running streams in line with `config`'s streams.
    pub fn apply(&mut self, config: &Config) -> Applied {
        let mut applied = Applied::default();
        let errors = config.server.client_errors;
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
                self.detach(&path, &running.source);
                running.route.target.close(EndReason::Removed);
                applied.removed.push(path.to_string());
            }
        }

        for (path, new) in wanted {
            let Some(running) = self.streams.get(path) else {
                let target = target(new, errors);
                let running = self.spawn(Arc::clone(new), target, Reason::Initial);
                self.streams.insert(path.clone(), running);
                applied.added.push(path.to_string());
                continue;
            };
            let old = Arc::clone(&running.route.config);
            let target = running.route.target.clone();
            if *old == **new {
                // Server-wide settings the hubs encode may still have changed.
                retune(&target, new, errors);
                continue;
            }
            let reshaped = old.shape_differs(new)
                || old.is_scoped() != new.is_scoped()
                || (new.is_scoped() && old.key.is_some() != new.key.is_some());
            if reshaped {
                // A plain stream keeps its hub and clients get a snapshot of the new
                // shape; a scoped stream's channels cannot carry over, so its clients
                // are told to reconnect and find their channel in the new one.
                let plain_kept = matches!(target, Target::Plain(_)) && !new.is_scoped();
                if let Some(running) = self.streams.remove(path) {
                    self.detach(path, &running.source);
                    if !plain_kept {
                        running.route.target.close(EndReason::Reconfigured);
                    }
                }
                let target = if plain_kept {
                    target
                } else {
                    self::target(new, errors)
                };
                if plain_kept {
                    retune(&target, new, errors);
                }
                let running = self.spawn(Arc::clone(new), target, Reason::ConfigChanged);
                self.streams.insert(path.clone(), running);
                applied.resubscribed.push(path.to_string());
            } else if old.upstream_differs(new) {
                retune(&target, new, errors);
                if let Some(running) = self.streams.remove(path) {
                    self.detach(path, &running.source);
                }
                let running = self.spawn(Arc::clone(new), target, Reason::ConfigChanged);
                self.streams.insert(path.clone(), running);
                applied.resubscribed.push(path.to_string());
            } else if let Some(running) = self.streams.get_mut(path) {
                retune(&target, new, errors);
                running.delay.send_replace(new.delay);
                running.route = Arc::new(Route {
                    path: Arc::clone(&running.route.path),
                    config: Arc::clone(new),
                    target,
                });
                applied.retuned.push(path.to_string());
            }
        }
        applied
    }

    /// Starts feeding `config` from its source, starting the source if it is new.
    fn spawn(&mut self, config: Arc<StreamConfig>, target: Target, reason: Reason) -> Running {
        let (delay, delay_rx) = watch::channel(config.delay);
        let key = SourceKey::of(&config);
        let feed = Feed::new(Arc::clone(&config), target.clone(), delay_rx, reason);
        match self.sources.get_mut(&key) {
            Some(source) => {
                source.streams += 1;
                if source
                    .commands
                    .send(Command::Attach(Box::new(feed)))
                    .is_err()
                {
                    warn!(stream = %config.path, "Source task is gone; the stream waits for a restart.");
                }
            }
            None => {
                let (commands, commands_rx) = mpsc::unbounded_channel();
                let cancel = self.cancel.child_token();
                let task = SourceTask {
                    key: key.clone(),
                    target: Arc::clone(&self.upstream),
                    policy: self.policy.clone(),
                    feeds: vec![feed],
                    commands: commands_rx,
                };
                self.tracker.spawn(task.run(cancel.clone()));
                self.sources.insert(
                    key.clone(),
                    Source {
                        commands,
                        cancel,
                        streams: 1,
                    },
                );
            }
        }
        Running {
            route: Arc::new(Route {
                path: config.path.as_str().into(),
                config,
                target,
            }),
            source: key,
            delay,
        }
    }

    /// Stops feeding the stream at `path` from `key`; a source left without streams
    /// is stopped, which ends its upstream session.
    fn detach(&mut self, path: &StreamPath, key: &SourceKey) {
        let Some(source) = self.sources.get_mut(key) else {
            return;
        };
        source.streams = source.streams.saturating_sub(1);
        if source.streams == 0 {
            source.cancel.cancel();
            self.sources.remove(key);
        } else {
            let _ = source.commands.send(Command::Detach(path.clone()));
        }
    }

    /// Ends every client stream with `end` (reason `shutdown`) and stops the tasks.
    pub fn shutdown(&mut self) {
        for running in self.streams.values() {
            running.route.target.close(EndReason::Shutdown);
        }
        for source in self.sources.values() {
            source.cancel.cancel();
        }
        if self.streams.is_empty() {
            warn!("Shutdown with no streams configured.");
        }
    }
}

/// A new stream's target: one hub, or a scoped stream's channels.
fn target(config: &StreamConfig, errors: ClientErrors) -> Target {
    let settings = Settings::new(config, errors);
    if config.is_scoped() {
        Target::Partitioned(Partitioned::new(
            config.key.is_some(),
            settings,
            config.max_partitions,
        ))
    } else {
        Target::Plain(Hub::new(settings))
    }
}

/// Applies the settings that change without touching the upstream.
fn retune(target: &Target, config: &StreamConfig, errors: ClientErrors) {
    let settings = Settings::new(config, errors);
    match target {
        Target::Plain(hub) => hub.update_settings(settings),
        Target::Partitioned(p) => p.update_settings(settings, config.max_partitions),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Resume;

    fn config(streams: &str) -> Config {
        crate::config::parse(std::path::Path::new("/x/streams.toml"), streams).expect("valid")
    }

    fn route<'a>(routes: &'a Routes, path: &str) -> &'a Arc<Route> {
        routes.get(path).expect("routed")
    }

    fn hub<'a>(routes: &'a Routes, path: &str) -> &'a Arc<Hub> {
        match &route(routes, path).target {
            Target::Plain(hub) => hub,
            Target::Partitioned(_) => panic!("{path} is scoped"),
        }
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
            Upstream::new(&before.upstream, Some(([127, 0, 0, 1], 1).into())).expect("target"),
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
            new.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            ["/new", "/requeried", "/same", "/tuned"]
        );
        // An unchanged stream keeps its route; changed ones keep their hub, so their
        // clients stay connected; the retuned one runs its new settings.
        assert!(Arc::ptr_eq(route(&old, "/same"), route(&new, "/same")));
        for path in ["/tuned", "/requeried"] {
            assert!(Arc::ptr_eq(hub(&old, path), hub(&new, path)), "{path}");
        }
        assert_eq!(route(&new, "/tuned").config.delay, Duration::from_secs(1));
        assert!(frames(hub(&new, "/tuned"))
            .await
            .starts_with("retry: 2000\n\n"));
        // The removed stream's clients are told so.
        assert!(frames(hub(&old, "/gone"))
            .await
            .contains("event: end\ndata: {\"reason\":\"removed\"}"));
        // The same config again changes nothing.
        assert!(sup.apply(&after).is_empty());
        cancel.cancel();
    }

    /// Streams on the same view, key and cluster share one source, however many
    /// there are and whatever their templates, filters and columns; a reload keeps
    /// the sharing right as streams come, go and move.
    #[tokio::test(start_paused = true)]
    async fn streams_share_sources_across_reloads() {
        let streams = |list: &[(&str, &str)]| {
            config(
                &list
                    .iter()
                    .map(|(p, rest)| format!("[[streams]]\npath = \"{p}\"\n{rest}\n"))
                    .collect::<String>(),
            )
        };
        let first = streams(&[
            ("/all", "view = \"orders\""),
            ("/by/{customer}", "view = \"orders\""),
            ("/slim", "view = \"orders\"\ncolumns = [\"id\"]"),
            ("/keyed", "view = \"orders\"\nkey = [\"id\"]"),
            ("/other", "view = \"sensors\""),
        ]);
        let upstream = Arc::new(
            Upstream::new(&first.upstream, Some(([127, 0, 0, 1], 1).into())).expect("target"),
        );
        let cancel = CancellationToken::new();
        let mut sup = Supervisor::start(&first, upstream, cancel.clone(), TaskTracker::new());
        // orders (diff), orders (keyed), sensors.
        assert_eq!(sup.sources(), 3);
        assert!(matches!(
            route(&sup.routes(), "/by/{customer}").target,
            Target::Partitioned(_)
        ));
        let second = streams(&[
            ("/all", "view = \"orders\""),
            (
                "/by/{customer}",
                "view = \"orders\"\nfilters = [\"status\"]",
            ),
            ("/keyed", "view = \"sensors\"\nkey = [\"id\"]"),
            ("/other", "view = \"sensors\""),
        ]);
        sup.apply(&second);
        // orders (diff), sensors (keyed), sensors (diff).
        assert_eq!(sup.sources(), 3);
        let third = streams(&[("/other", "view = \"sensors\"")]);
        sup.apply(&third);
        assert_eq!(sup.sources(), 1);
        cancel.cancel();
    }
}
