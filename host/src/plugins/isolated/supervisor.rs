//! A plugin's child process over its life, for a model backend and a store
//! alike: the running child, its health for the admin API, and a new child
//! after a crash, started by the first caller that needs it once the backoff
//! has passed.
//!
//! The backoff doubles from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`] while
//! children keep crashing or fail to start; an answered call resets it
//! ([`Supervisor::answered`]). A caller waiting for a new child waits on the
//! runtime (a sleep, then the start on a blocking thread), so a turn or a
//! store call that is given up meanwhile (a cancel, the store timeout) stops
//! waiting at once; a start already under way goes on and the next caller
//! takes its child.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::child::{Child, Launch};

/// The first pause before a crashed child is started again.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a child may take to load its plugin and build the adapter.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a child no longer used may take to exit before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the child runs, for its log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A model backend's turns.
    Model,
    /// A store's calls.
    Store,
}

/// A child process and its history.
pub struct Supervisor {
    launch: Launch,
    memory_limit_mb: Option<u64>,
    role: Role,
    child: Mutex<Option<Arc<Child>>>,
    /// Held while a new child is due or starting, by the caller waiting
    /// out the backoff, then by the start itself; the others wait for it.
    restarting: Arc<tokio::sync::Mutex<()>>,
    /// The last start after a crash: its number, and why it failed if it
    /// did (told to every caller that waited for it).
    last_start: Mutex<(u64, Option<String>)>,
    health: Arc<Mutex<Health>>,
}

/// What `GET /v1/plugins` shows of a child.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `running`, `crashed` (a new child starts with the next turn or call)
    /// or `failed` (the last start failed).
    pub state: &'static str,
    /// The running child's process id.
    pub pid: Option<u32>,
    /// Children started after the first.
    pub restarts: u64,
    /// Children that died.
    pub crashes: u64,
    /// The last crash: when (Unix ms) and what happened.
    pub last_crash: Option<Crash>,
    /// Turns running in the child now.
    pub running_turns: usize,
    #[serde(skip)]
    backoff: Duration,
    #[serde(skip)]
    not_before: Option<Instant>,
}

/// A child's death.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Crash {
    /// When, Unix ms.
    pub at_ms: u64,
    /// What happened.
    pub reason: String,
}

impl Supervisor {
    /// Starts the first child; fails if it cannot load the plugin or the
    /// plugin refuses the settings. Blocks.
    pub fn start(
        launch: Launch,
        memory_limit_mb: Option<u64>,
        role: Role,
    ) -> Result<Arc<Self>, String> {
        let supervisor = Self {
            launch: Launch {
                store: role == Role::Store,
                ..launch
            },
            memory_limit_mb,
            role,
            child: Mutex::new(None),
            restarting: Arc::new(tokio::sync::Mutex::new(())),
            last_start: Mutex::new((0, None)),
            health: Arc::new(Mutex::new(Health {
                state: "running",
                backoff: FIRST_BACKOFF,
                ..Health::default()
            })),
        };
        let child = supervisor.spawn()?;
        *supervisor.lock_child() = Some(child);
        Ok(Arc::new(supervisor))
    }

    /// The backend's (or store's) name in config.
    pub fn name(&self) -> &str {
        &self.launch.backend
    }

    /// The child's state; `running_turns` counts the ids open on it.
    pub fn health(&self) -> Health {
        let mut health = lock(&self.health).clone();
        health.running_turns = self.current().map_or(0, |c| c.running());
        health
    }

    /// A call or turn was answered: the child works, the backoff resets.
    pub fn answered(&self) {
        lock(&self.health).backoff = FIRST_BACKOFF;
    }

    /// The running child, if it is alive.
    pub fn current(&self) -> Option<Arc<Child>> {
        self.lock_child().as_ref().filter(|c| c.alive()).cloned()
    }

    /// The running child, or a new one once the backoff has passed. Waits
    /// without holding a thread; dropped while it waits, it stops waiting.
    /// A start under way goes on, holding the restart lock until its child
    /// is in place, so the next caller takes that child and never starts a
    /// second one; when that start failed, every caller that waited for it
    /// is told so at once (the next caller tries again after the backoff).
    pub async fn running(self: &Arc<Self>) -> Result<Arc<Child>, String> {
        if let Some(child) = self.current() {
            return Ok(child);
        }
        let seen = self.lock_last_start().0;
        let restarting = self.restarting.clone().lock_owned().await;
        if let Some(child) = self.current() {
            return Ok(child);
        }
        if let (attempt, Some(why)) = &*self.lock_last_start() {
            if *attempt > seen {
                return Err(self.restart_failed(why));
            }
        }
        let not_before = lock(&self.health).not_before;
        if let Some(not_before) = not_before {
            tokio::time::sleep_until(not_before.into()).await;
        }
        let this = self.clone();
        let started = tokio::task::spawn_blocking(move || {
            let _restarting = restarting;
            this.restart()
        });
        started
            .await
            .unwrap_or_else(|_| Err(self.restart_failed("its start was lost")))
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Arc<Child>>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_last_start(&self) -> std::sync::MutexGuard<'_, (u64, Option<String>)> {
        self.last_start.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new child in place of the dead one; blocks.
    fn restart(&self) -> Result<Arc<Child>, String> {
        if let Some(child) = self.current() {
            return Ok(child);
        }
        let started = self.spawn();
        {
            let mut last = self.lock_last_start();
            last.0 += 1;
            last.1 = started.as_ref().err().cloned();
        }
        match started {
            Ok(child) => {
                lock(&self.health).restarts += 1;
                crate::metrics::metrics().plugin_restart(&self.launch.backend);
                *self.lock_child() = Some(child.clone());
                Ok(child)
            }
            Err(why) => {
                let mut health = lock(&self.health);
                health.state = "failed";
                health.not_before = Some(Instant::now() + health.backoff);
                health.backoff = (health.backoff * 2).min(MAX_BACKOFF);
                match self.role {
                    Role::Model => tracing::error!(
                        backend = %self.launch.backend,
                        "plugin process could not be restarted: {why}"
                    ),
                    Role::Store => tracing::error!(
                        store = %self.launch.backend,
                        "store plugin process could not be restarted: {why}"
                    ),
                }
                Err(self.restart_failed(&why))
            }
        }
    }

    /// What the callers of a restart that failed are told.
    fn restart_failed(&self, why: &str) -> String {
        match self.role {
            Role::Model => format!("the plugin's process could not be restarted: {why}"),
            Role::Store => format!("the store's plugin process could not be restarted: {why}"),
        }
    }

    fn spawn(&self) -> Result<Arc<Child>, String> {
        let health = self.health.clone();
        let name = self.launch.backend.clone();
        let role = self.role;
        let on_exit = Box::new(move |pid: u32, why: Option<String>| {
            let Some((why, backoff)) = record_exit(&health, pid, why) else {
                return;
            };
            crate::metrics::metrics().plugin_crash(&name);
            let restart_in_ms = backoff.as_millis() as u64;
            match role {
                Role::Model => tracing::error!(
                    backend = %name,
                    pid,
                    restart_in_ms,
                    "plugin process crashed: {why}; its turns in flight failed `{}`; \
                     a new one starts with the backend's next turn",
                    super::model::CRASHED
                ),
                Role::Store => tracing::error!(
                    store = %name,
                    pid,
                    restart_in_ms,
                    "store plugin process crashed: {why}; its calls in flight failed; \
                     a new one starts with the store's next call"
                ),
            }
        });
        let child = Child::spawn(&self.launch, self.memory_limit_mb, START_TIMEOUT, on_exit)?;
        let mut health = lock(&self.health);
        health.state = "running";
        health.pid = Some(child.pid);
        match self.role {
            Role::Model => {
                tracing::info!(backend = %self.launch.backend, pid = child.pid, "plugin process started")
            }
            Role::Store => {
                tracing::info!(store = %self.launch.backend, pid = child.pid, "store plugin process started")
            }
        }
        Ok(child)
    }
}

/// The backend or store left the active set and nothing holds it any more:
/// its child is stopped, and killed if it does not exit within
/// [`STOP_GRACE`]. Nothing of it counts as a crash.
impl Drop for Supervisor {
    fn drop(&mut self) {
        let Some(child) = self.lock_child().take() else {
            return;
        };
        if child.alive() {
            match self.role {
                Role::Model => tracing::info!(
                    backend = %self.launch.backend,
                    pid = child.pid,
                    "plugin process stopped: its backend is no longer in use and no turn runs on it"
                ),
                Role::Store => tracing::info!(
                    store = %self.launch.backend,
                    pid = child.pid,
                    "store plugin process stopped: its store is no longer in use"
                ),
            }
        }
        child.retire(STOP_GRACE);
    }
}

/// Records child `pid`'s exit in `health`: when it crashed (`why`), counts
/// it and sets the backoff before the next start, answering why and that
/// backoff. A newer child may already run (a call started it before this
/// one's reader got here): then the state and pid stay the newer one's.
fn record_exit(
    health: &Mutex<Health>,
    pid: u32,
    why: Option<String>,
) -> Option<(String, Duration)> {
    let mut health = lock(health);
    let newer = health.pid.is_some_and(|running| running != pid);
    if !newer {
        health.pid = None;
    }
    let why = why?;
    if !newer {
        health.state = "crashed";
    }
    health.crashes += 1;
    health.last_crash = Some(Crash {
        at_ms: crate::protocol::now_ms(),
        reason: why.clone(),
    });
    let backoff = health.backoff;
    health.not_before = Some(Instant::now() + backoff);
    health.backoff = (backoff * 2).min(MAX_BACKOFF);
    Some((why, backoff))
}

fn lock(health: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    health.lock().unwrap_or_else(|p| p.into_inner())
}
