//! A model backend whose plugin runs in a child process: the turn core's
//! [`Model`](crate::core::ports::Model) port over [`Child`], with restarts.
//!
//! Its turns run as a blocking model's do (on the blocking pool, frames
//! through the sink's bounded channel). A turn opens an id on the current
//! child, sends its request and hands each event the child sends to the
//! turn's sink; a stop (the client's cancel, the turn deadline, a client
//! gone) is sent on as CANCEL. When the child dies, every turn on it fails
//! `plugin_crashed`, naming the signal; the next turn starts a new child,
//! after a backoff that doubles from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`]
//! while children keep crashing (a turn that completes resets it). A turn
//! that hears nothing from the child within `first_event_timeout_ms` has
//! the child killed, which then counts as a crash. Each call's time, from
//! sending its request to its end, is observed in
//! `llm_host_plugin_call_seconds{backend}`.
//!
//! One is built per backend per active set; a reload that changes the
//! backend builds another (a new child) and this one lives on while turns
//! of the old set run on it. Dropped, it stops its child ([`super`]'s
//! "Hot reload").

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_host_plugin_api::FinishReason;
use serde::Serialize;

use super::child::{Child, Incoming, Launch, Refusal};
use super::runner::WINDOW;
use super::wire::{to_child, Encoder, Event};
use crate::config::ProcessLimits;
use crate::core::ports::ModelError;
use crate::core::sink::TurnSink;

/// The first pause before a crashed child is started again.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a child may take to load its plugin and build the adapter.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a child no longer used may take to exit before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often a waiting turn looks whether it was stopped.
const POLL: Duration = Duration::from_millis(20);

/// The error code of a turn whose child died.
pub const CRASHED: &str = "plugin_crashed";

/// A backend's child process and its history.
pub struct IsolatedModel {
    launch: Launch,
    limits: ProcessLimits,
    child: Mutex<Option<Arc<Child>>>,
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
            let mut health = lock(&health);
            // A call may have started the next child before this one's
            // reader got here: its state is not this one's to change.
            let newer = health.pid.is_some_and(|running| running != pid);
            if !newer {
                health.pid = None;
            }
            let Some(why) = why else { return };
            if !newer {
                health.state = "crashed";
            }
            health.crashes += 1;
            health.last_crash = Some(Crash {
                at_ms: crate::protocol::now_ms(),
                reason: why.clone(),
            });
            health.not_before = Some(Instant::now() + health.backoff);
            let backoff = health.backoff;
            health.backoff = (health.backoff * 2).min(MAX_BACKOFF);
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

    /// The running child, started (after its backoff) if it died. `None`:
    /// the turn was stopped while it waited.
    fn running(&self, sink: &TurnSink) -> Result<Option<Arc<Child>>, ModelError> {
        loop {
            let mut slot = self.lock_child();
            if let Some(child) = slot.as_ref().filter(|c| c.alive()) {
                return Ok(Some(child.clone()));
            }
            let wait = lock(&self.health).not_before.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            if !wait.is_zero() {
                drop(slot);
                if sink.is_cancelled() {
                    return Ok(None);
                }
                std::thread::sleep(wait.min(POLL));
                continue;
            }
            match self.spawn() {
                Ok(child) => {
                    lock(&self.health).restarts += 1;
                    crate::metrics::metrics().plugin_restart(&self.launch.backend);
                    *slot = Some(child.clone());
                    return Ok(Some(child));
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

    /// Runs a turn in the child (see the module doc); blocks.
    pub fn generate(&self, request: &str, sink: &mut TurnSink) -> Result<(), ModelError> {
        let Some(child) = self.running(sink)? else {
            return Ok(());
        };
        let (turn, incoming) = match child.open(self.limits.max_concurrent_turns) {
            Ok(opened) => opened,
            Err(Refusal::Busy) => {
                return Err(ModelError {
                    code: "unavailable".to_owned(),
                    message: format!(
                        "backend `{}` runs at most {} turns at once \
                         (isolation.max_concurrent_turns); try again shortly",
                        self.launch.backend, self.limits.max_concurrent_turns
                    ),
                })
            }
            Err(Refusal::Dead(why)) => return Err(crashed(why)),
        };
        let _open = Opened(&child, turn);
        let mut enc = Encoder::default();
        enc.begin(to_child::GENERATE, turn).str(request).finish();
        // Time in the child, from here to the call's end however it ends.
        let _timed = Timed(&self.launch.backend, Instant::now());
        // A child that cannot take it is gone: its crash comes below.
        child.send(&enc.buf);

        let first_due = Duration::from_millis(self.limits.first_event_timeout_ms);
        let started = Instant::now();
        let mut answered = false;
        let mut stopped_at: Option<Instant> = None;
        let mut taken: u64 = 0;
        loop {
            match incoming.recv_timeout(POLL) {
                Ok(Incoming::Event(event)) => {
                    answered = true;
                    taken += 1;
                    if stopped_at.is_none() {
                        let last = matches!(event, Event::End(_) | Event::Error(..));
                        if !deliver(sink, event) && !last {
                            stopped_at = Some(Instant::now());
                            cancel(&child, turn, &mut enc);
                        }
                    }
                    if taken.is_multiple_of(WINDOW / 4) {
                        enc.buf.clear();
                        enc.begin(to_child::ACK, turn).u64(taken).finish();
                        child.send(&enc.buf);
                    }
                }
                Ok(Incoming::Done(result)) => {
                    if result.is_ok() {
                        lock(&self.health).backoff = FIRST_BACKOFF;
                    }
                    return result;
                }
                Ok(Incoming::Crashed(why)) => return Err(crashed(why)),
                Ok(Incoming::Reply(_)) => {
                    return Err(ModelError::internal(
                        "the plugin's process answered a turn with a store's frame",
                    ))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(crashed("the plugin's process is gone".to_owned()))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if stopped_at.is_none() && sink.is_cancelled() {
                        stopped_at = Some(Instant::now());
                        cancel(&child, turn, &mut enc);
                    }
                    if !answered && started.elapsed() >= first_due {
                        child.kill(format!(
                            "did not answer a turn within {} ms \
                             (isolation.first_event_timeout_ms) and was killed",
                            self.limits.first_event_timeout_ms
                        ));
                        // Its end comes as Crashed.
                        answered = true;
                    } else if stopped_at.is_some_and(|at| at.elapsed() >= first_due) {
                        // It took the cancel but does not finish: leave the
                        // turn to it (its later frames are dropped).
                        return Ok(());
                    }
                }
            }
        }
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

/// Forgets the turn on the child when the call ends.
struct Opened<'a>(&'a Child, u64);

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}

/// Observes the call's time in the child (backend, since) when it ends.
struct Timed<'a>(&'a str, Instant);

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        crate::metrics::metrics().plugin_call(self.0, self.1.elapsed());
    }
}

fn cancel(child: &Child, turn: u64, enc: &mut Encoder) {
    enc.buf.clear();
    enc.begin(to_child::CANCEL, turn).finish();
    child.send(&enc.buf);
}

fn crashed(message: String) -> ModelError {
    ModelError {
        code: CRASHED.to_owned(),
        message,
    }
}

pub(super) fn lock(health: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    health.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands one event to the turn's sink; answers whether to go on.
fn deliver(sink: &mut TurnSink, event: Event) -> bool {
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
