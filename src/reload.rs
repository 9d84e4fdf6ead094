//! Hot reload: every trigger (file events, SIGHUP, the fallback poll) feeds one channel
//! that the gateway's control loop drains, and [`check`] reads and validates the whole
//! file before anything changes; the gateway applies what it accepts. Reading and validating run on the blocking pool, so a huge
//! or hostile file never holds up a runtime worker.
//!
//! The watcher watches the config file's *directory* and filters by name, so editors
//! that save by renaming a temp file over the original and Kubernetes' `..data`
//! symlink swaps are both seen. In-place writes count only once the writer closes the
//! file, so a slow partial write is never read half-way; a debounce folds bursts into
//! one reload, and a content digest ([`config::digest`]) skips saves that changed nothing. A poll
//! compares the digest every [`POLL_EVERY`] for filesystems where notify sees nothing; it stays out of
//! the way while the watcher knows a write to the file is still open, so a writer that
//! pauses mid-file is not read half-way by the poll either.
//!
//! The watcher task and the signal task stop when the gateway's token is cancelled.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::{self, Config};

/// Quiet time that ends a burst of file events.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Fallback poll interval.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// How long an open write (seen by the watcher, not yet closed) holds the poll back;
/// past this the close event is assumed lost.
const OPEN_WRITE_LIMIT: Duration = Duration::from_secs(60);

/// When the watcher saw data written to the file without the writer closing it yet:
/// milliseconds since `origin` plus one, or 0 when no write is open.
struct OpenWrite {
    origin: Instant,
    since: AtomicU64,
}

impl OpenWrite {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Marks a write as open, keeping the first mark of a write already open; a mark
    /// past the limit (its close event lost) is replaced.
    fn begin(&self) {
        if !self.in_progress() {
            self.since.store(self.now(), Ordering::Relaxed);
        }
    }

    fn end(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    fn in_progress(&self) -> bool {
        let since = self.since.load(Ordering::Relaxed);
        since != 0 && self.now().saturating_sub(since) < OPEN_WRITE_LIMIT.as_millis() as u64
    }
}

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    File,
    Signal,
    Poll,
}

/// Hash of the file's content, or `None` if it cannot be read.
fn content_digest(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|b| config::digest(&b))
}

/// Keeps the notify watcher alive; dropping it stops the events.
pub struct WatcherGuard {
    _watcher: Option<RecommendedWatcher>,
}

/// Starts the file watcher, the SIGHUP listener and the poll.
pub fn spawn_watchers(
    path: &Path,
    loaded: u64,
    triggers: mpsc::Sender<Trigger>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> WatcherGuard {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();

    let (raw_tx, raw_rx) = mpsc::unbounded_channel::<()>();
    let open_write = Arc::new(OpenWrite {
        origin: Instant::now(),
        since: AtomicU64::new(0),
    });
    let seen_by_watcher = Arc::clone(&open_write);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let event = match res {
            Ok(event) => event,
            // Events may have been lost: reload and let the content digest decide.
            Err(_) => {
                let _ = raw_tx.send(());
                return;
            }
        };
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()));
        let relevant = match event.kind {
            // Data written in place counts when the writer closes the file.
            EventKind::Modify(ModifyKind::Data(_)) => {
                if ours {
                    seen_by_watcher.begin();
                }
                false
            }
            // Closed, replaced or removed: no write to this file is open.
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Create(_)
            | EventKind::Remove(_) => {
                if ours {
                    seen_by_watcher.end();
                }
                true
            }
            EventKind::Access(_) => false,
            _ => true,
        };
        // Kubernetes replaces a mounted file by swapping its `..data` symlink.
        let swapped = || {
            event.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".."))
            })
        };
        if relevant && (ours || event.paths.is_empty() || swapped()) {
            let _ = raw_tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "Cannot watch the config directory; relying on polling and SIGHUP.");
            None
        }
    };

    tracker.spawn(debounce(raw_rx, triggers.clone(), cancel.clone()));
    tracker.spawn(poll(
        path,
        loaded,
        open_write,
        triggers.clone(),
        cancel.clone(),
    ));
    // Installed before returning: a SIGHUP that arrives before the handler exists
    // would terminate the process.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => {
            tracker.spawn(sighup(hup, triggers, cancel));
        }
        Err(e) => warn!(error = %e, "Cannot listen for SIGHUP."),
    }
    WatcherGuard { _watcher: watcher }
}

async fn debounce(
    mut raw: mpsc::UnboundedReceiver<()>,
    triggers: mpsc::Sender<Trigger>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = raw.recv() => if got.is_none() { return },
        }
        // Wait until the burst goes quiet.
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = raw.recv() => if got.is_none() { return },
                _ = tokio::time::sleep(DEBOUNCE) => break,
            }
        }
        if triggers.send(Trigger::File).await.is_err() {
            return;
        }
    }
}

/// Reports a change the watcher missed, once the content has been stable for two polls
/// and no write the watcher saw is still open.
async fn poll(
    path: PathBuf,
    loaded: u64,
    open_write: Arc<OpenWrite>,
    triggers: mpsc::Sender<Trigger>,
    cancel: CancellationToken,
) {
    let mut reported = Some(loaded);
    let mut previous = reported;
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = content_digest(&path);
        if open_write.in_progress() {
            previous = None;
            continue;
        }
        if now.is_some() && now == previous && now != reported {
            reported = now;
            if triggers.send(Trigger::Poll).await.is_err() {
                return;
            }
        }
        previous = now;
    }
}

async fn sighup(
    mut hup: tokio::signal::unix::Signal,
    triggers: mpsc::Sender<Trigger>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = hup.recv() => {
                if got.is_none() || triggers.send(Trigger::Signal).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// What reading the config file found.
#[derive(Debug)]
enum Loaded {
    Unreadable(std::io::Error),
    /// The content digest is the one last seen.
    Unchanged,
    /// New content with this digest, and what validating it gave.
    Parsed(u64, Box<Result<Config, config::ConfigError>>),
}

/// Reads `path` and, unless its digest is `seen`, validates it. Blocking: the file may
/// be large, slow to read, or full of problems.
fn load_blocking(path: &Path, seen: Option<u64>) -> Loaded {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) => return Loaded::Unreadable(e),
    };
    let digest = config::digest(&text);
    if seen == Some(digest) {
        return Loaded::Unchanged;
    }
    let text = String::from_utf8_lossy(&text);
    Loaded::Parsed(digest, Box::new(config::parse(path, &text)))
}

/// [`load_blocking`] on the blocking pool.
async fn load(path: PathBuf, seen: Option<u64>) -> Result<Loaded, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || load_blocking(&path, seen)).await
}

/// What a reload trigger found.
#[derive(Debug)]
pub enum Outcome {
    /// The file's content is what was last seen.
    Unchanged,
    /// The file cannot be read or is invalid; the running config stays. The text
    /// names the file and, for an invalid one, every problem with its position.
    Rejected(String),
    /// A valid config to run: `config` is the new file with the fields that need a
    /// restart kept at their running values, which `refused` names.
    Accepted {
        config: Box<Config>,
        refused: Vec<String>,
    },
}

/// Re-reads and validates the file (on the blocking pool). Nothing is applied here:
/// the caller runs an accepted config and reports the outcome.
///
/// Cancel-safe: nothing changes before the file has been read and validated, so a
/// caller may drop this future (say, at shutdown) while it waits for that.
pub async fn check(running: &Config, seen: &mut Option<u64>) -> Outcome {
    let path = running.source.clone();
    let loaded = match load(path.clone(), *seen).await {
        Ok(loaded) => loaded,
        // The blocking task panicked (a bug) or the runtime is stopping: a failed
        // reload. `seen` stays, so the next trigger tries again.
        Err(e) => return Outcome::Rejected(format!("validating {} failed: {e}", path.display())),
    };
    match loaded {
        // Reported once: the next unreadable read finds `seen` already cleared.
        Loaded::Unreadable(e) => match seen.take() {
            Some(_) => Outcome::Rejected(format!("cannot read {}: {e}", path.display())),
            None => Outcome::Unchanged,
        },
        Loaded::Unchanged => Outcome::Unchanged,
        Loaded::Parsed(digest, parsed) => {
            *seen = Some(digest);
            match *parsed {
                Ok(new) => {
                    let (config, refused) = reconcile(running, new);
                    Outcome::Accepted {
                        config: Box::new(config),
                        refused,
                    }
                }
                Err(e) => Outcome::Rejected(e.to_string()),
            }
        }
    }
}

/// The config to run after a reload: `new`, except for fields that cannot change live,
/// which keep their running values and are named in the second result.
pub fn reconcile(running: &Config, mut new: Config) -> (Config, Vec<String>) {
    let mut refused = Vec::new();
    macro_rules! keep {
        ($($section:ident . $field:ident),* $(,)?) => {$(
            if running.$section.$field != new.$section.$field {
                refused.push(concat!(stringify!($section), ".", stringify!($field)).to_string());
                new.$section.$field = running.$section.$field.clone();
            }
        )*};
    }
    keep!(
        server.listen,
        server.admin_listen,
        server.log_format,
        server.heartbeat,
        server.shutdown_grace,
        upstream.target,
        upstream.password,
        upstream.connect_timeout,
        upstream.progress_timeout,
        upstream.backoff_initial,
        upstream.backoff_max,
        upstream.ca_file,
        upstream.max_row_bytes,
        embedded.init,
        embedded.legacy,
        embedded.retain,
        embedded.tick,
        embedded.schedule,
    );
    // Turning TLS on or off changes what the listener speaks; other files for a
    // listener that stays on TLS are applied (the certificate watcher follows them).
    if running.server.tls.is_some() != new.server.tls.is_some() {
        refused.push("server.tls".to_string());
        new.server.tls = running.server.tls.clone();
    }
    (new, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the current-thread runtime `#[tokio::test]` uses, a read and parse on the
    /// runtime would run to the end on `load`'s first poll, before the task beside it
    /// could run at all.
    #[tokio::test]
    async fn reading_and_validating_leave_the_runtime_free() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("streams.toml");
        std::fs::write(&path, "[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("write");
        let beside = std::sync::atomic::AtomicBool::new(false);
        let (loaded, ()) = futures::future::join(
            async {
                let loaded = load(path.clone(), None).await;
                (loaded, beside.load(Ordering::Relaxed))
            },
            async { beside.store(true, Ordering::Relaxed) },
        )
        .await;
        let (loaded, ran_before_the_end) = loaded;
        assert!(ran_before_the_end, "the load never yielded to the runtime");
        let Ok(Loaded::Parsed(digest, parsed)) = loaded else {
            panic!("{loaded:?}");
        };
        let c = parsed.expect("valid");
        assert_eq!(c.streams.len(), 1);
        // The same content again is recognised, and a missing file is reported.
        assert!(matches!(
            load(path.clone(), Some(digest)).await,
            Ok(Loaded::Unchanged)
        ));
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(
            load(path, Some(digest)).await,
            Ok(Loaded::Unreadable(_))
        ));
    }

    #[test]
    fn unreloadable_fields_are_refused_by_name() {
        let path = Path::new("/x/streams.toml");
        let a = config::parse(path, "[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("valid");
        let b = config::parse(
            path,
            "[server]\nlisten = \"127.0.0.1:9000\"\nsend_timeout = \"5s\"\n\
             [embedded]\ntick = \"2s\"\n[[streams]]\npath = \"/b\"\nview = \"v\"\n",
        )
        .expect("valid");
        let (effective, refused) = reconcile(&a, b);
        assert_eq!(refused, vec!["server.listen", "embedded.tick"]);
        assert_eq!(effective.server.listen, a.server.listen);
        assert_eq!(effective.server.send_timeout, Duration::from_secs(5));
        assert_eq!(effective.streams[0].path.as_str(), "/b");
    }

    /// Events closer than the debounce apart fold into one trigger, sent when the
    /// burst has been quiet for the debounce.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_file_events_is_one_reload_after_it_goes_quiet() {
        let (raw_tx, raw_rx) = mpsc::unbounded_channel();
        let (tx, mut triggers) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        tokio::spawn(debounce(raw_rx, tx, cancel.clone()));
        let start = tokio::time::Instant::now();
        for gap in [0, 40, 90, 30] {
            tokio::time::sleep(Duration::from_millis(gap)).await;
            raw_tx.send(()).expect("send");
        }
        let last = tokio::time::Instant::now();
        assert_eq!(triggers.recv().await, Some(Trigger::File));
        assert_eq!(tokio::time::Instant::now() - last, DEBOUNCE);
        assert!(last - start >= Duration::from_millis(160));
        // Nothing more without new events; a later event is its own reload.
        assert!(
            tokio::time::timeout(Duration::from_secs(10), triggers.recv())
                .await
                .is_err()
        );
        raw_tx.send(()).expect("send");
        assert_eq!(triggers.recv().await, Some(Trigger::File));
        cancel.cancel();
    }

    /// The poll reports a change once the content has been the same for two polls,
    /// never while the watcher knows a write is open, and once per change.
    #[tokio::test(start_paused = true)]
    async fn the_poll_reports_a_stable_change_once_and_waits_for_open_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("streams.toml");
        std::fs::write(&path, "a").expect("write");
        let open_write = Arc::new(OpenWrite {
            origin: Instant::now(),
            since: AtomicU64::new(0),
        });
        let (tx, mut triggers) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        tokio::spawn(poll(
            path.clone(),
            config::digest(b"a"),
            Arc::clone(&open_write),
            tx,
            cancel.clone(),
        ));
        // Unchanged content: nothing, however long.
        assert!(tokio::time::timeout(POLL_EVERY * 5, triggers.recv())
            .await
            .is_err());

        // A write seen by the poll: reported at the second poll that sees it.
        std::fs::write(&path, "b").expect("write");
        let written = tokio::time::Instant::now();
        let got = tokio::time::timeout(POLL_EVERY * 3, triggers.recv())
            .await
            .expect("reported");
        assert_eq!(got, Some(Trigger::Poll));
        let took = tokio::time::Instant::now() - written;
        assert!(took >= POLL_EVERY && took <= POLL_EVERY * 2, "{took:?}");
        assert!(
            tokio::time::timeout(POLL_EVERY * 5, triggers.recv())
                .await
                .is_err(),
            "reported once"
        );

        // While a write is open (the watcher saw data but no close), the poll waits.
        open_write.begin();
        std::fs::write(&path, "c").expect("write");
        assert!(
            tokio::time::timeout(POLL_EVERY * 5, triggers.recv())
                .await
                .is_err(),
            "held while open"
        );
        open_write.end();
        assert_eq!(
            tokio::time::timeout(POLL_EVERY * 3, triggers.recv())
                .await
                .expect("after close"),
            Some(Trigger::Poll)
        );
        cancel.cancel();
    }
}
