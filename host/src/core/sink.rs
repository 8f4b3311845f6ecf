//! Where a turn's model events go: numbered frames for the client, and the
//! assistant message assembled from them. [`TurnControl`] stops a turn.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use llm_host_plugin_api::{FinishReason, Message, Role, ToolCall, Usage};
use tokio::sync::{mpsc, Notify};

use super::ports::Frames;
use crate::metrics::metrics;
use crate::protocol::{now_ms, Diagnostic, ErrorBody, Framer, Meta, ModelEvent, SOURCE_MODEL};

/// Why the host stopped a turn, when it was not the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The error event's code (`turn_timeout`, `lease_lost`, ...).
    pub code: &'static str,
    /// For people.
    pub message: String,
}

/// Stops a running turn: the client's cancel, or the host (its deadline, a
/// lost lease, a deleted session).
#[derive(Default, Debug)]
pub struct TurnControl {
    cancelled: AtomicBool,
    /// Why the host stopped it, if it did.
    failure: Mutex<Option<Failure>>,
    /// Wakes a turn that waits (a pause, a pending step, a busy session).
    pub(super) stopped: Notify,
    /// Set just before the turn's end frame goes out: from then on there
    /// is nothing left to cancel.
    ended: AtomicBool,
    /// The results of the tool calls the turn waits on.
    pub tools: super::tools::ToolResults,
    /// The numbered frames the turn sent, the last `server.replay_frames`
    /// (see [`super::replay`]).
    frames: Mutex<super::replay::FrameLog>,
    /// The owner of the session the turn claimed, once it claimed it: who
    /// may follow the turn.
    owner: std::sync::OnceLock<String>,
}

impl TurnControl {
    /// Cancels the turn (a cancel command, or the client went away).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.stopped.notify_one();
    }

    /// Stops the turn, which fails with `failure` (the first one given wins).
    pub fn fail(&self, failure: Failure) {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(failure);
        self.cancel();
    }

    /// The turn is ending: its end frame is about to go out.
    pub(super) fn end(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// Whether the turn's end frame has gone out (or is about to): a cancel
    /// that comes now has nothing to cancel.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Whether the turn must stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The turn claimed a session of `owner`.
    pub(super) fn claimed_for(&self, owner: &str) {
        let _ = self.owner.set(owner.to_owned());
    }

    /// The owner of the session the turn claimed, once it claimed it.
    pub fn owner(&self) -> Option<&str> {
        self.owner.get().map(String::as_str)
    }

    /// Records frames the turn sends, numbered through `through`.
    pub(super) fn record(&self, frames: &[Bytes], through: u64, limit: usize) {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(frames, through, limit);
    }

    /// Reads the turn's frames sent so far.
    pub fn frames<T>(&self, read: impl FnOnce(&super::replay::FrameLog) -> T) -> T {
        read(&self.frames.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Why the host stopped the turn, if it did.
    pub fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How a turn ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The model finished.
    Completed,
    /// Cancelled by the client or its disconnect.
    Cancelled,
    /// The model, the store or the host's limits failed it.
    Failed,
}

impl Status {
    /// As the `interaction.turn` frame says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
        }
    }
}

/// Room a frame usually needs in the sink's buffer; with less left, the
/// next chunk is allocated.
const FRAME_ROOM: usize = 512;
/// How much buffer a turn's frames take at a time.
const FRAME_CHUNK: usize = 8 * 1024;

/// The most events one step may emit: past it the sink answers stop, and the
/// turn fails (a step emits what is ready, a few dozen events, and returns).
pub const STEP_FRAMES: usize = 1024;

/// Where a turn's model events go: frames for the client, and the assistant
/// message assembled from them. Each method answers whether the model
/// should go on.
///
/// Runs where the model runs (a blocking thread, or the turn's task for a
/// stepped model); none of its methods may panic (a panic here would cross
/// the FFI boundary and abort the host).
pub struct TurnSink {
    /// For a model on the blocking pool: its frames, with their sequence
    /// numbers, go one by one into this bounded channel, which the turn's
    /// task forwards to the client.
    pub(super) out: Option<mpsc::Sender<(u64, Bytes)>>,
    /// A stepped turn's frames, until its step returns and they are sent
    /// together (at most [`STEP_FRAMES`]).
    pub(super) batch: Vec<Bytes>,
    /// Set when a step emitted more than [`STEP_FRAMES`] events.
    pub(super) step_overflowed: bool,
    /// Where frames are written: each frame is split off as it is done, so
    /// the frames of a turn share a few allocations.
    frames: BytesMut,
    /// The time stamped on a step's events: a step is over in well under a
    /// millisecond, so its events share one reading of the clock.
    pub(super) step_time: Option<u64>,
    framer: Framer,
    pub(super) control: Arc<TurnControl>,
    interaction_id: String,
    /// The last sequence number used.
    pub(super) sequence: u64,
    /// The last number the model's events may take: the rest of the turn's
    /// reservation is kept for its error and end frames.
    last_model_sequence: u64,
    /// Set when the model emitted more events than the turn may number.
    reservation_spent: bool,
    started: bool,
    /// Set once the model's `end` or `error` went out.
    outcome: Option<Status>,
    client_gone: bool,
    text: String,
    reasoning: String,
    tool_calls: Vec<ToolCall>,
    diagnostics: Vec<Diagnostic>,
    /// The last usage the model reported.
    pub(super) usage: Option<Usage>,
    /// When the turn started, until its first event is timed.
    first_event_due: Option<Instant>,
    /// When the turn started.
    turn_started: Instant,
    /// How long after the turn started its first output (text, reasoning
    /// or a tool call) came.
    pub(super) first_output: Option<std::time::Duration>,
    /// The code of the model's error event, if it failed.
    pub(super) error_code: Option<String>,
    /// Why the model's generation ended (`stop`, `length`, `tool-calls`,
    /// `cancelled`), once its end event went out.
    pub(super) finish_reason: Option<&'static str>,
}

impl TurnSink {
    /// A sink for turn `interaction_id`, numbering after `sequence` and at
    /// most through `reserved` (the end frame included).
    pub(super) fn new(
        framer: Framer,
        control: Arc<TurnControl>,
        interaction_id: String,
        sequence: u64,
        reserved: u64,
        started: Instant,
    ) -> Self {
        Self {
            out: None,
            batch: Vec::new(),
            step_overflowed: false,
            frames: BytesMut::new(),
            step_time: None,
            framer,
            control,
            interaction_id,
            sequence,
            last_model_sequence: reserved.saturating_sub(2),
            reservation_spent: false,
            started: false,
            outcome: None,
            client_gone: false,
            text: String::new(),
            reasoning: String::new(),
            tool_calls: Vec::new(),
            diagnostics: Vec::new(),
            usage: None,
            first_event_due: Some(started),
            turn_started: started,
            first_output: None,
            error_code: None,
            finish_reason: None,
        }
    }

    /// A sink for the turn's next model group (after tool results): its
    /// frames numbered on from this one's, within the same reservation.
    pub(super) fn next_group(&self) -> TurnSink {
        let mut next = TurnSink::new(
            self.framer,
            self.control.clone(),
            self.interaction_id.clone(),
            self.sequence,
            self.last_model_sequence + 2,
            self.turn_started,
        );
        // The turn's first event and output were timed by the first group.
        next.first_event_due = None;
        next.first_output = self.first_output;
        next
    }

    /// Whether the model must stop.
    pub(super) fn stopped(&self) -> bool {
        self.client_gone
            || self.outcome.is_some()
            || self.reservation_spent
            || self.control.is_cancelled()
            || self.batch.len() >= STEP_FRAMES
    }

    fn go_on(&self) -> bool {
        !self.stopped()
    }

    fn emit(&mut self, event: &ModelEvent<'_>) {
        let metrics = metrics();
        metrics.events.inc();
        if let Some(started) = self.first_event_due.take() {
            metrics
                .first_event_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        self.sequence += 1;
        let meta = Meta {
            sequence: self.sequence,
            timestamp: self.step_time.unwrap_or_else(now_ms),
            source_id: SOURCE_MODEL,
            interaction_id: Some(&self.interaction_id),
        };
        if self.frames.capacity() < FRAME_ROOM {
            self.frames.reserve(FRAME_CHUNK);
        }
        self.framer.write_model(&mut self.frames, event, &meta);
        let frame = self.frames.split().freeze();
        match &self.out {
            Some(out) => {
                if !self.client_gone && out.blocking_send((self.sequence, frame)).is_err() {
                    self.client_gone = true;
                }
            }
            None => self.batch.push(frame),
        }
    }

    /// Emits a model event unless the turn's numbers are spent.
    fn emit_model(&mut self, event: &ModelEvent<'_>) {
        if self.sequence >= self.last_model_sequence {
            self.reservation_spent = true;
            return;
        }
        self.emit(event);
    }

    /// Sends the frames a step emitted, with one flush (stepped turns).
    pub(super) async fn send_batch(&mut self, frames: &impl Frames) {
        if self.batch.len() >= STEP_FRAMES {
            self.step_overflowed = true;
        }
        if self.batch.is_empty() {
            return;
        }
        // To a client already gone, the frames are dropped (their numbers
        // still count as used).
        if !frames.send_numbered(&mut self.batch, self.sequence).await {
            self.client_gone = true;
        }
    }

    fn ensure_started(&mut self) {
        if !self.started {
            self.started = true;
            self.emit_model(&ModelEvent::Start {
                id: None,
                model_id: None,
            });
        }
    }

    fn finish(&mut self, status: Status, event: &ModelEvent<'_>) {
        if !self.started {
            self.started = true;
            self.emit(&ModelEvent::Start {
                id: None,
                model_id: None,
            });
        }
        self.emit(event);
        self.outcome = Some(status);
    }

    /// Times the turn's first output (the time to first token).
    fn output(&mut self) {
        if self.first_output.is_none() {
            let after = self.turn_started.elapsed();
            self.first_output = Some(after);
            metrics().first_token_seconds.observe(after.as_secs_f64());
        }
    }

    fn fail_with(&mut self, code: &str, message: &str) -> Status {
        self.error_code = Some(code.to_owned());
        let diagnostics = std::mem::take(&mut self.diagnostics);
        let event = ModelEvent::Error {
            error: ErrorBody { code, message },
            diagnostics: &diagnostics,
        };
        self.finish(Status::Failed, &event);
        Status::Failed
    }

    /// Completes the model's part of the turn after the model returned:
    /// whatever it left out (`start`, `end`, an error for a returned error,
    /// `end` with `cancelled`) is filled in here.
    pub(super) fn close(&mut self, result: Result<(), super::ports::ModelError>) -> Status {
        if let Some(status) = self.outcome {
            if let Err(err) = result {
                tracing::warn!(error = %err.message, "model returned an error after its last event");
            }
            return status;
        }
        if let Some(failure) = self.control.failure() {
            return self.fail_with(failure.code, &failure.message);
        }
        if self.reservation_spent {
            let message = format!(
                "the turn emitted more events than a turn may (server.max_turn_events, \
                 {} numbers reserved); it was stopped",
                self.last_model_sequence
            );
            return self.fail_with("turn_too_long", &message);
        }
        match result {
            Err(err) => {
                tracing::warn!(turn = %self.interaction_id, code = %err.code, error = %err.message, "model failed");
                self.fail_with(&err.code, &err.message)
            }
            Ok(()) => {
                let cancelled = self.client_gone || self.control.is_cancelled();
                let (status, reason) = if cancelled {
                    (Status::Cancelled, FinishReason::CANCELLED)
                } else {
                    (Status::Completed, FinishReason::STOP)
                };
                let diagnostics = std::mem::take(&mut self.diagnostics);
                self.finish_reason = Some(reason.as_str());
                let event = ModelEvent::End {
                    finish_reason: Some(reason.as_str()),
                    diagnostics: &diagnostics,
                };
                self.finish(status, &event);
                status
            }
        }
    }

    /// The answer the turn assembled, if the model said anything.
    pub(super) fn assistant_message(&mut self) -> Option<Message> {
        if self.text.is_empty() && self.reasoning.is_empty() && self.tool_calls.is_empty() {
            return None;
        }
        Some(Message {
            role: Role::Assistant,
            content: std::mem::take(&mut self.text),
            reasoning: Some(std::mem::take(&mut self.reasoning)).filter(|r| !r.is_empty()),
            tool_calls: std::mem::take(&mut self.tool_calls),
            tool_call_id: None,
        })
    }

    /// The generation started (`id`, `model_id`: empty when unknown).
    pub fn start(&mut self, id: &str, model_id: &str) -> bool {
        if self.stopped() {
            return false;
        }
        if !self.started {
            self.started = true;
            self.emit_model(&ModelEvent::Start {
                id: optional(id),
                model_id: optional(model_id),
            });
        }
        self.go_on()
    }

    /// A piece of answer text.
    pub fn text(&mut self, text: &str) -> bool {
        if self.stopped() {
            return false;
        }
        self.ensure_started();
        self.output();
        self.text.push_str(text);
        self.emit_model(&ModelEvent::Delta {
            text: Some(text),
            reasoning: None,
            tool_call: None,
        });
        self.go_on()
    }

    /// A piece of reasoning.
    pub fn reasoning(&mut self, text: &str) -> bool {
        if self.stopped() {
            return false;
        }
        self.ensure_started();
        self.output();
        self.reasoning.push_str(text);
        self.emit_model(&ModelEvent::Delta {
            text: None,
            reasoning: Some(text),
            tool_call: None,
        });
        self.go_on()
    }

    /// A whole tool call.
    pub fn tool_call(&mut self, id: &str, name: &str, arguments: &str) -> bool {
        if self.stopped() {
            return false;
        }
        self.ensure_started();
        self.output();
        let call = ToolCall {
            id: id.to_owned(),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        };
        // Before its frame is made: a client may answer it at once.
        self.control.tools.announce(id);
        self.emit_model(&ModelEvent::Delta {
            text: None,
            reasoning: None,
            tool_call: Some(&call),
        });
        self.tool_calls.push(call);
        self.go_on()
    }

    /// Token counts.
    pub fn usage(&mut self, usage: Usage) -> bool {
        if self.stopped() {
            return false;
        }
        self.ensure_started();
        self.usage = Some(usage);
        self.emit_model(&ModelEvent::Usage {
            usage: usage.into(),
        });
        self.go_on()
    }

    /// The generation ended.
    pub fn end(&mut self, reason: FinishReason) -> bool {
        if self.stopped() {
            return false;
        }
        let status = if reason == FinishReason::CANCELLED {
            Status::Cancelled
        } else {
            Status::Completed
        };
        let diagnostics = std::mem::take(&mut self.diagnostics);
        self.finish_reason = Some(reason.as_str());
        self.finish(
            status,
            &ModelEvent::End {
                finish_reason: Some(reason.as_str()),
                diagnostics: &diagnostics,
            },
        );
        false
    }

    /// The generation failed (`code` empty: `model_error`).
    pub fn error(&mut self, code: &str, message: &str) -> bool {
        if self.stopped() {
            return false;
        }
        let code = optional(code).unwrap_or("model_error");
        self.fail_with(code, message);
        false
    }

    /// A diagnostic, reported with the turn's end.
    pub fn diagnostic(&mut self, level: &str, message: &str, data_json: &str) -> bool {
        if self.stopped() {
            return false;
        }
        let data = optional(data_json).and_then(|json| serde_json::from_str(json).ok());
        self.diagnostics.push(Diagnostic {
            level: level.to_owned(),
            message: message.to_owned(),
            data,
        });
        self.go_on()
    }

    /// Whether the model should stop (it may ask between events).
    pub fn is_cancelled(&self) -> bool {
        self.client_gone || self.control.is_cancelled()
    }
}

fn optional(text: &str) -> Option<&str> {
    Some(text).filter(|t| !t.is_empty())
}
