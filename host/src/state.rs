//! The host's running state: the active set of adapters, the loader, reload
//! bookkeeping, connection slots, shutdown; and the reload itself (two
//! phases, see [`crate::plugins::reload`]) with the file watcher that
//! triggers it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::core::locks::SessionLocks;
use crate::core::TurnSettings;
use crate::limits::{ConnectionSlots, Tally, TurnRate};
use crate::metrics::metrics;
use crate::plugins::loader::Loader;
use crate::plugins::reload::{absolute, describe, relevant, Fingerprint, Outcome, Reloader};
use crate::plugins::runtime::Active;
use crate::protocol::now_ms;

/// Everything the host serves from. One per process, shared by every
/// connection through an `Arc`; lives until the process ends.
pub struct HostState {
    /// The active adapters and config; a turn takes one snapshot and keeps it.
    pub active: ArcSwap<Active>,
    /// Per-session turn locks.
    pub locks: SessionLocks,
    /// Each session's sockets on this host and its running turn.
    pub hubs: crate::web::hub::Hubs,
    /// Loads plugin libraries (and remembers every one it loaded).
    pub loader: Loader,
    /// Reload bookkeeping and the channel that tells sessions about reloads.
    pub reloader: Reloader,
    /// The config file the host was started with.
    pub config_path: PathBuf,
    /// This process's id among hosts sharing a store (in turn leases).
    pub instance: String,
    /// Open connections, against `server.max_connections`.
    pub connections: ConnectionSlots,
    /// Connections accepted and not upgraded, by client address.
    pub pending: Tally,
    /// Open session sockets by API key id (in open mode: client address).
    pub key_connections: Tally,
    /// Prompts waiting behind running turns, by API key id (in open mode:
    /// client address).
    pub key_queued: Tally,
    /// Turns per minute per API key.
    pub turn_rate: TurnRate,
    /// Becomes true when the host starts shutting down.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Set when the host is asked to stop, `server.drain_secs` before
    /// `shutdown`: load balancers see `/readyz` fail while it still serves.
    pub draining: std::sync::atomic::AtomicBool,
    /// The address the host listens on, once bound.
    pub listening: std::sync::OnceLock<std::net::SocketAddr>,
    /// The default store's last readiness check.
    pub readiness: Readiness,
}

/// The default store's readiness. However often `/readyz` is asked, one
/// ping is in flight at a time, and a store that answered is not asked
/// again for [`Readiness::FRESH`]: the unauthenticated route cannot make
/// the host hammer its store. A failure is not kept, so readiness comes
/// back with the store. The store's error goes to the log when readiness is
/// lost (and a line when it comes back), not on every failed check.
#[derive(Default)]
pub struct Readiness {
    /// The store checked, when, and whether it answered.
    last: tokio::sync::Mutex<Option<Checked>>,
}

/// A store's name, when it was checked, and whether it answered.
type Checked = (String, tokio::time::Instant, bool);

impl Readiness {
    /// How long an answer is reused.
    pub const FRESH: Duration = Duration::from_secs(1);

    /// Whether store `name` answers, asking `ping` unless a fresh answer
    /// for it is kept.
    pub async fn check<F, Fut>(&self, name: &str, ping: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), crate::core::ports::StoreError>>,
    {
        let mut last = self.last.lock().await;
        if let Some((store, at, answered)) = last.as_ref() {
            if store == name && *answered && at.elapsed() < Self::FRESH {
                return true;
            }
        }
        let was_failing = last
            .as_ref()
            .is_some_and(|(store, _, answered)| store == name && !answered);
        let answered = match ping().await {
            Ok(()) => {
                if was_failing {
                    tracing::info!(store = name, "ready again: the default store answers");
                }
                true
            }
            Err(err) => {
                if !was_failing {
                    tracing::warn!(
                        store = name,
                        error = %err,
                        "not ready: the default store does not answer"
                    );
                }
                false
            }
        };
        *last = Some((name.to_owned(), tokio::time::Instant::now(), answered));
        answered
    }
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// config.toml is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The config, plugins or adapters have problems; every one is listed.
    #[error("{}", .0.join("\n"))]
    Problems(Vec<String>),
}

impl HostState {
    /// Reads the config at `path`, loads the plugin directory and builds every
    /// configured adapter. Reports every problem at once.
    pub fn boot(path: &Path) -> Result<Arc<HostState>, BootError> {
        // The staging directory comes from the config; read it first (a
        // config that does not even parse fails here, alone).
        let config = match Config::load_checked(path) {
            Ok((config, _)) => config,
            Err(err) => return Err(BootError::Config(err)),
        };
        let loader = Loader::new(config.plugins.staging_dir.clone(), config.base_dir.clone());
        let (catalog, active) =
            Active::assemble(path, &loader, None).map_err(BootError::Problems)?;
        clean_staging(&loader, &active, None);
        metrics().by_key.store(
            active.config.server.metrics_by_key,
            std::sync::atomic::Ordering::Relaxed,
        );
        let reloader = Reloader::new(&active.config, &catalog);
        Ok(Arc::new(HostState {
            active: ArcSwap::from_pointee(active),
            locks: SessionLocks::default(),
            hubs: Default::default(),
            loader,
            reloader,
            config_path: path.to_owned(),
            instance: format!("host-{}", uuid::Uuid::new_v4()),
            connections: ConnectionSlots::default(),
            turn_rate: TurnRate::default(),
            pending: Tally::default(),
            key_connections: Tally::default(),
            key_queued: Tally::default(),
            shutdown: tokio::sync::watch::channel(false).0,
            draining: std::sync::atomic::AtomicBool::new(false),
            listening: std::sync::OnceLock::new(),
            readiness: Readiness::default(),
        }))
    }

    /// How turns run under the active config.
    pub fn turn_settings(&self) -> TurnSettings {
        self.active.load().config.server.turn_settings()
    }

    /// Whether the host is shutting down.
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Whether the host was asked to stop: from then on `/readyz` answers
    /// 503, while it still serves for `server.drain_secs` before it stops.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire) || self.stopping()
    }
}

/// Reloads config.toml and the plugin directory now. `why` is logged.
pub async fn reload(host: &Arc<HostState>, why: &str) -> Result<Outcome, String> {
    let _one_at_a_time = host.reloader.lock.lock().await;
    let prepared = {
        let host = host.clone();
        tokio::task::spawn_blocking(move || prepare(&host))
            .await
            .map_err(|err| format!("reload task failed: {err}"))?
    };
    let reloader = &host.reloader;
    match prepared {
        Ok(None) => {
            metrics()
                .reloads
                .get_or_create(&[("result", "unchanged")])
                .inc();
            tracing::info!(trigger = why, "reload: nothing changed");
            // The running set matches what is on disk: an earlier failure
            // no longer stands.
            reloader.status().last_error = None;
            Ok(Outcome::Unchanged)
        }
        Ok(Some((active, notice))) => {
            metrics()
                .reloads
                .get_or_create(&[("result", "applied")])
                .inc();
            metrics().by_key.store(
                active.config.server.metrics_by_key,
                std::sync::atomic::Ordering::Relaxed,
            );
            host.active.store(Arc::new(active));
            {
                let mut status = reloader.status();
                status.reloads += 1;
                status.last_reload_ms = Some(now_ms());
                status.last_error = None;
            }
            for change in &notice.changes {
                tracing::info!(trigger = why, "reloaded: {change}");
            }
            let changes = notice.changes.clone();
            let _ = reloader.notices.send(Arc::new(notice));
            Ok(Outcome::Reloaded(changes))
        }
        Err(message) => {
            metrics()
                .reloads
                .get_or_create(&[("result", "failed")])
                .inc();
            tracing::error!(
                trigger = why,
                "reload refused, the running set keeps serving:\n{message}"
            );
            reloader.status().last_error = Some((now_ms(), message.clone()));
            Err(message)
        }
    }
}

/// Adds this host's pending usage counts to the default store every
/// `server.usage_flush_secs`, until shutdown (see [`crate::usage`]).
pub fn flush_usage_periodically(host: Arc<HostState>) {
    tokio::spawn(async move {
        let mut stopping = host.shutdown.subscribe();
        loop {
            let every = host.active.load().config.server.usage_flush_secs;
            let stopped = tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(every)) => false,
                stopped = stopping.wait_for(|stop| *stop) => {
                    drop(stopped);
                    true
                }
            };
            if stopped {
                return;
            }
            flush_usage(&host).await;
        }
    });
}

/// Adds this host's pending usage counts to the default store now; a
/// failure is logged, and the counts wait for the next flush.
pub async fn flush_usage(host: &HostState) {
    let active = host.active.load_full();
    let Some(store) = active.store() else {
        return;
    };
    let limit = active.config.server.turn_settings().store_timeout;
    if let Err(err) = crate::usage::pending().flush(store, limit).await {
        tracing::warn!(store = %store.name, error = %err, "usage not stored yet; will retry");
    }
}

/// Removes the staged copies neither `active` nor the generation before it
/// (`previous`) was built from, once unused for `plugins.staging_grace_secs`.
fn clean_staging(loader: &Loader, active: &Active, previous: Option<&Active>) {
    let keep = active
        .staged()
        .chain(previous.into_iter().flat_map(Active::staged))
        .cloned()
        .collect();
    let grace = Duration::from_secs(active.config.plugins.staging_grace_secs);
    loader.clean_staging(&keep, grace);
}

type Prepared = Option<(Active, crate::plugins::reload::Notice)>;

fn prepare(host: &HostState) -> Result<Prepared, String> {
    let old = host.active.load_full();
    let assembled = Active::assemble(&host.config_path, &host.loader, Some(&old));
    let (catalog, active) = match assembled {
        Ok(done) => done,
        Err(problems) => return Err(problems.join("\n")),
    };
    if let Some(addr) = host.listening.get() {
        if let Some(problem) = active.config.auth.exposure_problem(*addr) {
            return Err(problem);
        }
    }
    host.reloader.status().record_scan(&catalog);
    clean_staging(&host.loader, &active, Some(&*old));
    let fingerprint = Fingerprint::of(&active.config, &catalog);
    let mut current = host
        .reloader
        .fingerprint
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if *current == fingerprint {
        return Ok(None);
    }
    *current = fingerprint;
    drop(current);
    let notice = describe(&old, &active);
    Ok(Some((active, notice)))
}

/// Watches config.toml and the plugin directory, and reloads after changes
/// settle (no event for `debounce`). Runs until the host stops.
pub fn watch(host: Arc<HostState>, debounce: Duration) -> Result<(), String> {
    let config_path = absolute(&host.config_path);
    let config_dir = config_path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    let plugin_dir = Arc::new(Mutex::new(absolute(&host.active.load().config.plugins.dir)));

    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watched_dir = plugin_dir.clone();
    let watched_config = config_path.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let dir = watched_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if relevant(&event, &watched_config, &dir) {
            let _ = tx.send(());
        }
    })
    .map_err(|err| format!("cannot watch files: {err}"))?;
    watcher
        .watch(&config_dir, RecursiveMode::NonRecursive)
        .map_err(|err| format!("cannot watch {}: {err}", config_dir.display()))?;
    let initial_dir = plugin_dir.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if initial_dir != config_dir {
        watcher
            .watch(&initial_dir, RecursiveMode::NonRecursive)
            .map_err(|err| format!("cannot watch {}: {err}", initial_dir.display()))?;
    }
    tracing::info!(
        config = %config_path.display(),
        plugins = %initial_dir.display(),
        "watching for changes"
    );

    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait until the files have been quiet for the whole window: a
            // library still being copied keeps producing events.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let _ = reload(&host, "file change").await;
            let now_dir = absolute(&host.active.load().config.plugins.dir);
            let mut dir = plugin_dir.lock().unwrap_or_else(|p| p.into_inner());
            if *dir != now_dir {
                if *dir != config_dir {
                    let _ = watcher.unwatch(&dir);
                }
                if let Err(err) = watcher.watch(&now_dir, RecursiveMode::NonRecursive) {
                    tracing::error!(dir = %now_dir.display(), error = %err, "cannot watch the new plugin directory");
                }
                *dir = now_dir;
            }
        }
    });
    Ok(())
}
