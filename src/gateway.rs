//! Wiring: builds the engine (when `url = "embedded"`), the listener, the supervisor and
//! the HTTP server from a config, and runs them until shutdown.
//!
//! [`Gateway::build`] binds and starts everything, so tests can start a gateway on port
//! 0 and read its address. [`Gateway::run_until_stopped`] drives the control loop: it
//! applies reloads, and on shutdown ends every stream with `end`, lets the HTTP server
//! drain within the grace period, then stops the engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::auth::{Auth, AuthError};
use crate::config::{Config, PairFiles, UpstreamTarget};
use crate::error::error_chain;
use crate::http::{self, AppState};
use crate::reload::{self, Trigger};
use crate::route::{self, SharedRoutes};
use crate::supervisor::Supervisor;
use crate::telemetry::Metrics;
use crate::tls::Certificates;
use crate::upstream::{ConnectError, Target};
use tailgate_engine::{self as engine, EngineConfig, RunningEngine, Scheduled};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("starting the embedded engine failed")]
    Engine(#[from] engine::EngineError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid upstream")]
    Upstream(#[from] ConnectError),
    #[error("access control cannot start")]
    Auth(#[from] AuthError),
    #[error("the TLS certificate cannot be used")]
    Tls(#[from] crate::tls::PairError),
}

pub struct Gateway {
    config: Config,
    listener: TcpListener,
    addr: SocketAddr,
    /// The admin listener and its address, when `admin_listen` is set.
    admin: Option<(TcpListener, SocketAddr)>,
    state: Arc<AppState>,
    supervisor: Supervisor,
    engine: Option<RunningEngine>,
    shutdown: CancellationToken,
    /// Cancels the streams and the engine once clients have been told `end`.
    inner: CancellationToken,
    tracker: TaskTracker,
    /// Reload requests from the watcher, the poll and SIGHUP.
    triggers: mpsc::Receiver<Trigger>,
    /// Watching starts before `build` returns, so no edit after loading is missed.
    watcher: reload::WatcherGuard,
    /// Stops the running access control's key tasks when a reload replaces it.
    auth_tasks: CancellationToken,
    /// The public listener's TLS, when `[server] tls` is set.
    tls: Option<Tls>,
}

/// The public listener's certificate, and where its watcher is told of other files.
struct Tls {
    certs: Arc<Certificates>,
    files: watch::Sender<PairFiles>,
}

impl Gateway {
    pub async fn build(config: Config) -> Result<Gateway, GatewayError> {
        let shutdown = CancellationToken::new();
        let inner = CancellationToken::new();
        let tracker = TaskTracker::new();

        let engine = match config.upstream.target {
            UpstreamTarget::Embedded => {
                let engine_config = EngineConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    init: config.embedded.init.clone(),
                    legacy: config.embedded.legacy,
                    retain: config.embedded.retain,
                    tick: config.embedded.tick,
                    schedule: config
                        .embedded
                        .schedule
                        .iter()
                        .map(|w| Scheduled {
                            every: w.every,
                            sql: w.sql.clone(),
                        })
                        .collect(),
                };
                let running = engine::start(engine_config, inner.child_token()).await?;
                info!(addr = %running.local_addr(), "Embedded development engine started.");
                Some(running)
            }
            UpstreamTarget::Url(_) => None,
        };
        let target = Arc::new(Target::new(
            &config.upstream,
            engine.as_ref().map(RunningEngine::local_addr),
        )?);

        let bind_error = |source| GatewayError::Bind {
            addr: config.server.listen,
            source,
        };
        let listener = http::bind(config.server.listen).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let admin = match config.server.admin_listen {
            Some(admin_addr) => {
                let admin_error = |source| GatewayError::Bind {
                    addr: admin_addr,
                    source,
                };
                let admin = http::bind(admin_addr).map_err(admin_error)?;
                let bound = admin.local_addr().map_err(admin_error)?;
                Some((admin, bound))
            }
            None => None,
        };

        // Loaded before anything starts: a pair that went bad since validation stops
        // the start here.
        let tls = match &config.server.tls {
            Some(files) => {
                let certs = Certificates::load(files.clone())?;
                let (files, watched) = watch::channel(files.clone());
                tracker.spawn(crate::tls::watch(
                    Arc::clone(&certs),
                    watched,
                    inner.clone(),
                ));
                Some(Tls { certs, files })
            }
            None => None,
        };

        let supervisor =
            Supervisor::start(&config, Arc::clone(&target), inner.clone(), tracker.clone());
        let routes: SharedRoutes = Arc::new(ArcSwap::from_pointee(supervisor.routes()));
        tracker.spawn(route::heartbeat(
            Arc::clone(&routes),
            config.server.heartbeat,
            inner.clone(),
        ));
        let auth_tasks = inner.child_token();
        let auth = Auth::start(&config.auth, &auth_tasks, &tracker).await?;
        let metrics = Arc::new(Metrics::default());
        if let Some(tls) = &tls {
            let _ = metrics.tls.set(Arc::clone(&tls.certs));
        }
        let state = Arc::new(AppState {
            auth: ArcSwap::new(auth),
            routes,
            metrics,
            server: ArcSwap::from_pointee(config.server.clone()),
            config_path: config.source.clone(),
            per_ip: Arc::new(http::PerIp::default()),
        });
        let (trigger_tx, triggers) = mpsc::channel(16);
        let watcher = reload::spawn_watchers(
            &config.source,
            config.digest,
            trigger_tx,
            inner.clone(),
            &tracker,
        );
        let admin_addr = admin
            .as_ref()
            .map_or_else(|| "none".to_string(), |(_, a)| a.to_string());
        info!(
            %addr,
            admin = %admin_addr,
            tls = tls.is_some(),
            streams = config.streams.len(),
            "Gateway listening."
        );
        Ok(Gateway {
            config,
            listener,
            addr,
            admin,
            state,
            supervisor,
            engine,
            shutdown,
            inner,
            tracker,
            triggers,
            watcher,
            auth_tasks,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// The embedded engine's address, when there is one.
    pub fn engine_addr(&self) -> Option<SocketAddr> {
        self.engine.as_ref().map(RunningEngine::local_addr)
    }

    /// Cancelling this token shuts the gateway down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.state.metrics)
    }

    /// Serves until the shutdown token fires, applying reloads meanwhile.
    pub async fn run_until_stopped(self) {
        let Gateway {
            config,
            listener,
            admin,
            state,
            supervisor,
            engine: _engine,
            shutdown,
            inner,
            tracker,
            mut triggers,
            watcher,
            auth_tasks,
            tls,
            ..
        } = self;
        let grace = config.server.shutdown_grace;
        let server = tokio::spawn(http::serve(
            listener,
            http::Listener::Public,
            Arc::clone(&state),
            tls.as_ref().map(|t| t.certs.server_config()),
            shutdown.clone(),
            grace,
        ));
        // Plain HTTP: probes and scrapes on a private address (see `http`).
        let admin = admin.map(|(admin, _)| {
            tokio::spawn(http::serve(
                admin,
                http::Listener::Admin,
                Arc::clone(&state),
                None,
                shutdown.clone(),
                grace,
            ))
        });
        let mut control = Control {
            digest: Some(config.digest),
            config,
            supervisor,
            state,
            auth_tasks,
            inner: inner.clone(),
            tracker: tracker.clone(),
            tls_files: tls.map(|t| t.files),
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(trigger) = triggers.recv() => {
                    // Validating a huge file takes a while; shutdown need not wait for it.
                    let outcome = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        outcome = reload::check(&control.config, &mut control.digest) => outcome,
                    };
                    control.apply(outcome, trigger).await;
                }
            }
        }
        drop(watcher);
        info!("Shutting down.");
        control.supervisor.shutdown();
        let servers = futures::future::join(server, async {
            if let Some(admin) = admin {
                let _ = admin.await;
            }
        });
        if tokio::time::timeout(grace + Duration::from_millis(500), servers)
            .await
            .is_err()
        {
            warn!("HTTP server did not stop within the grace period.");
        }
        inner.cancel();
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
}

/// What the control loop changes when a reload is applied.
struct Control {
    config: Config,
    /// The digest of the file last seen, so unchanged saves are skipped.
    digest: Option<u64>,
    supervisor: Supervisor,
    state: Arc<AppState>,
    auth_tasks: CancellationToken,
    inner: CancellationToken,
    tracker: TaskTracker,
    /// Tells the certificate watcher of other files named by a reload.
    tls_files: Option<watch::Sender<PairFiles>>,
}

impl Control {
    /// Runs what a reload found: an accepted config goes to the supervisor, access
    /// control is rebuilt if `[auth]` changed, the route table and server settings the
    /// HTTP layer reads are swapped, and open connections whose rules changed check
    /// their credentials again; a rejected one is recorded. Logs one line either way.
    async fn apply(&mut self, outcome: reload::Outcome, trigger: Trigger) {
        let (config, refused) = match outcome {
            reload::Outcome::Unchanged => return,
            reload::Outcome::Rejected(reason) => return self.reject(trigger, reason),
            reload::Outcome::Accepted { config, refused } => (*config, refused),
        };
        let auth_changed = config.auth != self.config.auth;
        if auth_changed {
            let tasks = self.inner.child_token();
            match Auth::start(&config.auth, &tasks, &self.tracker).await {
                Ok(auth) => {
                    self.auth_tasks.cancel();
                    self.auth_tasks = tasks;
                    self.state.auth.store(auth);
                }
                Err(e) => {
                    tasks.cancel();
                    // Seen again on the next save or SIGHUP, once the keys are fixed.
                    self.digest = None;
                    let reason = format!("access control: {}", error_chain(&e));
                    return self.reject(trigger, reason);
                }
            }
        }
        let before = self.state.routes.load_full();
        let applied = self.supervisor.apply(&config);
        let routes = Arc::new(self.supervisor.routes());
        self.state.routes.store(Arc::clone(&routes));
        self.state.server.store(Arc::new(config.server.clone()));
        // Validated as a pair already; the watcher loads it (or reports it, if it went
        // bad since) for the next handshake.
        if let (Some(tx), Some(files)) = (&self.tls_files, &config.server.tls) {
            tx.send_if_modified(|current| {
                let changed = current != files;
                if changed {
                    *current = files.clone();
                }
                changed
            });
        }
        // After both swaps, so a connection that checks again sees the new rules.
        for (path, route) in routes.iter() {
            let rules_changed = before.get(path).is_some_and(|old| {
                old.config.public != route.config.public
                    || old.config.authorize != route.config.authorize
            });
            if auth_changed || rules_changed {
                route.target.recheck();
            }
        }
        self.state.metrics.reload_ok();
        info!(
            ?trigger,
            added = ?applied.added,
            removed = ?applied.removed,
            resubscribed = ?applied.resubscribed,
            retuned = ?applied.retuned,
            auth_changed,
            needs_restart = ?refused,
            "Config reloaded."
        );
        self.config = config;
    }

    fn reject(&self, trigger: Trigger, reason: String) {
        error!(
            ?trigger,
            "Config reload rejected; keeping the running config.\n{reason}"
        );
        self.state.metrics.reload_failed(reason);
    }
}
