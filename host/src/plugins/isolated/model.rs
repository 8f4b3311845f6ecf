//! A model backend whose plugin runs in a child process: the turn core's
//! [`Model`](crate::core::ports::Model) port over [`Child`], with restarts.
//!
//! Its turns run in steps on the async workers ([`super::stepped`]): a turn
//! opens an id on the current child, sends its request, and each step hands
//! the events the child sent to the turn's sink; a stop (the client's
//! cancel, the turn deadline, a client gone) is sent on as CANCEL. When the
//! child dies, every turn on it fails `plugin_crashed`, naming the signal;
//! the next turn starts a new child, after a backoff that doubles from
//! [`FIRST_BACKOFF`] to [`MAX_BACKOFF`] while children keep crashing (a turn
//! that completes resets it). A turn that hears nothing from the child
//! within `first_event_timeout_ms` has the child killed, which then counts
//! as a crash. Each call's time, from sending its request to its end, is
//! observed in `llm_host_plugin_call_seconds{backend}`.
//!
//! One is built per backend per active set; a reload that changes the
//! backend builds another (a new child) and this one lives on while turns
//! of the old set run on it. Dropped, it stops its child ([`super`]'s
//! "Hot reload").

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_host_plugin_api::FinishReason;
use serde::Serialize;

use super::child::{Child, Launch, Refusal};
use super::stepped::{SteppedTurn, TurnQueue};
use super::wire::{to_child, Encoder, Event};
use crate::config::ProcessLimits;
use crate::core::ports::{ModelError, Wake};
use crate::core::sink::TurnSink;

/// The first pause before a crashed child is started again.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a child may take to load its plugin and build the adapter.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a child no longer used may take to exit before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often a caller waiting out the backoff looks again for a live child.
const POLL: Duration = Duration::from_millis(20);

/// The error code of a turn whose child died.
pub const CRASHED: &str = "plugin_crashed";

/// A backend's child process and its history.
pub struct IsolatedModel {
    launch: Launch,
    limits: ProcessLimits,
    child: Mutex<Option<Arc<Child>>>,
    /// Held by the caller that starts a new child.
    restarting: Mutex<()>,
    health: Arc<Mutex<Health>>,
}

/// What `GET /v1/plugins` shows of a backend's child.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `running`, `crashed` (a new child starts with the next turn) or
    /// `failed` (the last start failed).
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
    pub(super) backoff: Duration,
    #[serde(skip)]
    pub(super) not_before: Option<Instant>,
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

impl IsolatedModel {
    /// Starts the backend's first child; fails if it cannot load the plugin
    /// or the plugin refuses the settings.
    pub fn start(launch: Launch, limits: ProcessLimits) -> Result<Self, String> {
        let model = Self {
            launch,
            limits,
            child: Mutex::new(None),
            restarting: Mutex::new(()),
            health: Arc::new(Mutex::new(Health {
                state: "running",
                backoff: FIRST_BACKOFF,
                ..Health::default()
            })),
        };
        let child = model.spawn()?;
        *model.lock_child() = Some(child);
        Ok(model)
    }

    /// The child's state, for the admin API.
    pub fn health(&self) -> Health {
        let mut health = lock(&self.health).clone();
        health.running_turns = self
            .lock_child()
            .as_ref()
            .filter(|c| c.alive())
            .map_or(0, |c| c.running());
        health
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Arc<Child>>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self) -> Result<Arc<Child>, String> {
        let health = self.health.clone();
        let backend = self.launch.backend.clone();
        let on_exit = Box::new(move |pid: u32, why: Option<String>| {
            let Some((why, backoff)) = record_exit(&health, pid, why) else {
                return;
            };
            crate::metrics::metrics().plugin_crash(&backend);
            tracing::error!(
                backend = %backend,
                pid,
                restart_in_ms = backoff.as_millis() as u64,
                "plugin process crashed: {why}; its turns in flight failed `{CRASHED}`; \
                 a new one starts with the backend's next turn"
            );
        });
        let child = Child::spawn(
            &self.launch,
            self.limits.memory_limit_mb,
            START_TIMEOUT,
            on_exit,
        )?;
        let mut health = lock(&self.health);
        health.state = "running";
        health.pid = Some(child.pid);
        tracing::info!(backend = %self.launch.backend, pid = child.pid, "plugin process started");
        Ok(child)
    }

    /// The running child, if it is alive.
    fn live(&self) -> Option<Arc<Child>> {
        self.lock_child().as_ref().filter(|c| c.alive()).cloned()
    }

    /// The running child, started (after its backoff) if it died. Blocks
    /// while a child starts;
    /// the child's slot is locked only to read or set it, so a turn on the
    /// async workers asking for the live child never waits for a start.
    fn running(&self) -> Result<Arc<Child>, ModelError> {
        loop {
            if let Some(child) = self.live() {
                return Ok(child);
            }
            // One caller starts the next child; the others wait here.
            let restarting = self.restarting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(child) = self.live() {
                return Ok(child);
            }
            let wait = lock(&self.health).not_before.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            if !wait.is_zero() {
                drop(restarting);
                std::thread::sleep(wait.min(POLL));
                continue;
            }
            match self.spawn() {
                Ok(child) => {
                    lock(&self.health).restarts += 1;
                    crate::metrics::metrics().plugin_restart(&self.launch.backend);
                    *self.lock_child() = Some(child.clone());
                    return Ok(child);
                }
                Err(why) => {
                    let mut health = lock(&self.health);
                    health.state = "failed";
                    health.not_before = Some(Instant::now() + health.backoff);
                    health.backoff = (health.backoff * 2).min(MAX_BACKOFF);
                    tracing::error!(backend = %self.launch.backend, "plugin process could not be restarted: {why}");
                    return Err(crashed(format!(
                        "the plugin's process could not be restarted: {why}"
                    )));
                }
            }
        }
    }

    /// Why a turn could not be opened on the child.
    fn refused(&self, refusal: Refusal) -> ModelError {
        match refusal {
            Refusal::Busy => ModelError {
                code: "unavailable".to_owned(),
                message: format!(
                    "backend `{}` runs at most {} turns at once \
                     (isolation.max_concurrent_turns); try again shortly",
                    self.launch.backend, self.limits.max_concurrent_turns
                ),
            },
            Refusal::Dead(why) => crashed(why),
        }
    }

    /// Starts a turn in the child, run in steps ([`SteppedTurn`]): the
    /// core's path for these backends. Takes no thread unless the child
    /// must be started again first: that (its backoff included) blocks, in
    /// `block_in_place` on the host's runtime.
    pub fn start_turn(&self, request: &str, wake: Wake) -> Result<SteppedTurn, ModelError> {
        let child = match self.live() {
            Some(child) => child,
            None => {
                let restart = || self.running();
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime)
                        if runtime.runtime_flavor()
                            == tokio::runtime::RuntimeFlavor::MultiThread =>
                    {
                        tokio::task::block_in_place(restart)
                    }
                    _ => restart(),
                }?
            }
        };
        let queue = TurnQueue::new(wake);
        let turn = child
            .open_queue(self.limits.max_concurrent_turns, queue.clone())
            .map_err(|refusal| self.refused(refusal))?;
        let mut enc = Encoder::default();
        enc.begin(to_child::GENERATE, turn).str(request).finish();
        // A child that cannot take it is gone: its crash comes in the queue.
        child.send(&enc.buf);
        Ok(SteppedTurn::new(
            child,
            turn,
            queue,
            self.launch.backend.clone(),
            self.health.clone(),
            Duration::from_millis(self.limits.first_event_timeout_ms),
        ))
    }
}

/// The backend left the active set (a reload replaced or removed it, or the
/// reload that built it failed) and no turn holds it any more: its child is
/// stopped, and killed if it does not exit within [`STOP_GRACE`].
impl Drop for IsolatedModel {
    fn drop(&mut self) {
        let Some(child) = self.lock_child().take() else {
            return;
        };
        if child.alive() {
            tracing::info!(
                backend = %self.launch.backend,
                pid = child.pid,
                "plugin process stopped: its backend is no longer in use and no turn runs on it"
            );
        }
        child.retire(STOP_GRACE);
    }
}

/// Records child `pid`'s exit in `health`: when it crashed (`why`), counts
/// it and sets the backoff before the next start, answering why and that
/// backoff. A newer child may already run (a call started it before this
/// one's reader got here): then the state and pid stay the newer one's.
pub(super) fn record_exit(
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

pub(super) fn crashed(message: String) -> ModelError {
    ModelError {
        code: CRASHED.to_owned(),
        message,
    }
}

pub(super) fn lock(health: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    health.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands one event to the turn's sink; answers whether to go on.
pub(super) fn deliver(sink: &mut TurnSink, event: Event) -> bool {
    match event {
        Event::Start(id, model) => sink.start(&id, &model),
        Event::Text(text) => sink.text(&text),
        Event::Reasoning(text) => sink.reasoning(&text),
        Event::ToolCall(id, name, arguments) => sink.tool_call(&id, &name, &arguments),
        Event::Usage(usage) => sink.usage(usage),
        Event::End(reason) => sink.end(FinishReason(reason)),
        Event::Error(code, message) => sink.error(&code, &message),
        Event::Diagnostic(level, message, data) => sink.diagnostic(&level, &message, &data),
    }
}
