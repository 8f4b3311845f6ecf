//! The host's sink as a stream handler sees it: every call answers whether
//! to go on, and the emitter remembers whether any output went out (after
//! which a failed request is no longer retried).

use std::thread;
use std::time::{Duration, Instant};

use llm_host_plugin_api::{FinishReason, Flow, LogLevel, Sink, ToolCall, Usage};
use serde_json::Value;

use crate::error::ProviderError;

/// How often a wait looks at whether the turn was cancelled.
pub const CANCEL_POLL: Duration = Duration::from_millis(250);

/// Why a stream stopped before its end.
#[derive(Debug, Clone, PartialEq)]
pub enum Halt {
    /// The host answered stop (the turn was cancelled or its client left):
    /// return at once, sending nothing more.
    Cancelled,
    /// The request or the stream failed.
    Failed(ProviderError),
}

impl From<ProviderError> for Halt {
    fn from(err: ProviderError) -> Self {
        Halt::Failed(err)
    }
}

fn go_on(flow: Flow) -> Result<(), Halt> {
    if flow.is_stop() {
        Err(Halt::Cancelled)
    } else {
        Ok(())
    }
}

/// Forwards a stream's events to the host's [`Sink`]; each method answers
/// `Err(Halt::Cancelled)` when the host says stop.
pub struct Emitter<'s, 'a> {
    sink: &'s mut Sink<'a>,
    started: bool,
    output: bool,
}

impl<'s, 'a> Emitter<'s, 'a> {
    /// Wraps the sink of one turn.
    pub fn new(sink: &'s mut Sink<'a>) -> Self {
        Self {
            sink,
            started: false,
            output: false,
        }
    }

    /// Whether text, reasoning or a tool call went out: from then on a
    /// failure is reported, never retried.
    pub fn has_output(&self) -> bool {
        self.output
    }

    /// Whether the turn was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.sink.is_cancelled()
    }

    /// The generation started; only the first call of a turn is passed on.
    pub fn start(&mut self, id: &str, model_id: &str) -> Result<(), Halt> {
        if self.started {
            return Ok(());
        }
        self.started = true;
        go_on(self.sink.start(id, model_id))
    }

    /// A piece of answer text; empty pieces are skipped.
    pub fn text(&mut self, text: &str) -> Result<(), Halt> {
        if text.is_empty() {
            return Ok(());
        }
        self.output = true;
        go_on(self.sink.text(text))
    }

    /// A piece of reasoning; empty pieces are skipped.
    pub fn reasoning(&mut self, text: &str) -> Result<(), Halt> {
        if text.is_empty() {
            return Ok(());
        }
        self.output = true;
        go_on(self.sink.reasoning(text))
    }

    /// One whole tool call.
    pub fn tool_call(&mut self, call: &ToolCall) -> Result<(), Halt> {
        self.output = true;
        go_on(self.sink.tool_call(call))
    }

    /// Token counts.
    pub fn usage(&mut self, usage: Usage) -> Result<(), Halt> {
        go_on(self.sink.usage(usage))
    }

    /// Something the client should know that is not model output.
    pub fn diagnostic(
        &mut self,
        level: LogLevel,
        message: &str,
        data: Option<&Value>,
    ) -> Result<(), Halt> {
        go_on(self.sink.diagnostic(level, message, data))
    }

    /// The generation ended normally; nothing may follow.
    pub fn end(&mut self, reason: FinishReason) {
        // The host answers stop to everything after `end`.
        let _ = self.sink.end(reason);
    }

    /// The generation failed; nothing may follow.
    pub fn error(&mut self, code: &str, message: &str) {
        let _ = self.sink.error(code, message);
    }

    /// Waits `delay`, looking at the cancel flag meanwhile; answers false
    /// when the turn was cancelled.
    pub fn sleep(&self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if self.is_cancelled() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            thread::sleep(left.min(CANCEL_POLL));
        }
    }
}
