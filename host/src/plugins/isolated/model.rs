//! A model backend whose plugin runs in a child process: the turn core's
//! [`Model`](crate::core::ports::Model) port over a [`Supervisor`]'s child,
//! with restarts.
//!
//! Its turns run in steps on the async workers ([`super::stepped`]): a turn
//! opens an id on the current child, sends its request, and each step hands
//! the events the child sent to the turn's sink; a stop (the client's
//! cancel, the turn deadline, a client gone) is sent on as CANCEL. When the
//! child dies, every turn on it fails `plugin_crashed`, naming the signal;
//! the next turn starts a new child, after a backoff that doubles from
//! [`super::supervisor::FIRST_BACKOFF`] to [`super::supervisor::MAX_BACKOFF`]
//! while children keep crashing (a turn that completes resets it). A turn
//! that hears nothing from the child within `first_event_timeout_ms` has the
//! child killed, which then counts as a crash. Each call's time, from sending its request to its end, is
//! observed in `llm_host_plugin_call_seconds{backend}`.
//!
//! One is built per backend per active set; a reload that changes the
//! backend builds another (a new child) and this one lives on while turns
//! of the old set run on it. Dropped, it stops its child ([`super`]'s
//! "Hot reload").

use std::sync::Arc;

use llm_host_plugin_api::FinishReason;

use super::child::Launch;
use super::stepped::SteppedTurn;
use super::supervisor::{Health, Role, Supervisor};
use super::wire::Event;
use crate::config::ProcessLimits;
use crate::core::ports::{ModelError, Wake};
use crate::core::sink::TurnSink;

/// The error code of a turn whose child died.
pub const CRASHED: &str = "plugin_crashed";

/// A backend's child process.
pub struct IsolatedModel {
    supervisor: Arc<Supervisor>,
    limits: ProcessLimits,
}

impl IsolatedModel {
    /// Starts the backend's first child; fails if it cannot load the plugin
    /// or the plugin refuses the settings.
    pub fn start(launch: Launch, limits: ProcessLimits) -> Result<Self, String> {
        let supervisor = Supervisor::start(launch, limits.memory_limit_mb, Role::Model)?;
        Ok(Self { supervisor, limits })
    }

    /// The child's state, for the admin API.
    pub fn health(&self) -> Health {
        self.supervisor.health()
    }

    /// Starts a turn in the child, run in steps ([`SteppedTurn`]): the
    /// core's path for these backends. Takes no thread: when the child died,
    /// the turn's first steps wait for the new one (its backoff, its start),
    /// and a turn stopped meanwhile stops waiting.
    pub fn start_turn(&self, request: &str, wake: Wake) -> Result<SteppedTurn, ModelError> {
        SteppedTurn::start(&self.supervisor, self.limits, request, wake)
    }
}

pub(super) fn crashed(message: String) -> ModelError {
    ModelError {
        code: CRASHED.to_owned(),
        message,
    }
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
