//! One turn: load the session, stream the model into the socket, save.
//!
//! A model adapter runs with a [`TurnSink`] that turns each event into a
//! frame on the spot. A stepped adapter (`ModelAdapter::stepped`) runs on the
//! turn's own task: when a step returns, its frames go to the connection's
//! [`Outbox`] with one flush, and its pauses are the runtime's timers. Any
//! other adapter runs on the blocking pool, its sink pushing each frame into
//! a bounded channel that the turn's task forwards to the outbox. Either
//! way, when the client reads slowly the turn waits (and a blocking adapter
//! with it), so a slow client cannot grow the host's memory. Cancel (a
//! command, or the socket closing) makes the sink answer [`Flow::STOP`], and
//! the adapter returns at its next event (a stepped turn is dropped at once).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    EventSink, EventSink_TO, FinishReason, Flow, LogLevel, Message, Next, PluginError, Role,
    SaveOutcome, ToolCall, TurnParams, TurnWaker, TurnWaker_TO, Usage,
};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

use crate::connection::{Connection, Outbox};
use crate::metrics::metrics;
use crate::protocol::{
    now_ms, Diagnostic, ErrorBody, Framer, Meta, ModelEvent, TurnEvent, SOURCE_HOST, SOURCE_MODEL,
};
use crate::runtime::{ModelBackend, StoreBackend};
use crate::session::{self, Lease, Loaded, MessagesJson, SessionDoc, StoreError};

/// A prompt waiting for its turn.
#[derive(Debug)]
pub struct Prompt {
    /// The user's message.
    pub text: String,
    /// The backend for this turn, when the client named one.
    pub model: Option<String>,
    /// Per-turn parameters (boxed: the prompt queue allocates its slots
    /// up front for every connection).
    pub params: Box<TurnParams>,
}

/// Stops a running turn: the client's cancel, or its deadline.
#[derive(Default, Debug)]
pub struct TurnControl {
    cancelled: AtomicBool,
    /// The deadline in seconds, once it has passed.
    timed_out: std::sync::atomic::AtomicU64,
    /// Wakes a stepped turn that waits (a pause, a pending step) to stop.
    stopped: Notify,
}

impl TurnControl {
    /// Cancels the turn (a cancel command, or the client went away).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.stopped.notify_one();
    }

    /// Stops the turn because it ran past `secs`.
    pub fn time_out(&self, secs: u64) {
        self.timed_out.store(secs.max(1), Ordering::Relaxed);
        self.cancelled.store(true, Ordering::Relaxed);
        self.stopped.notify_one();
    }

    /// Whether the turn must stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The deadline it ran past, if it did.
    fn timed_out(&self) -> Option<u64> {
        Some(self.timed_out.load(Ordering::Relaxed)).filter(|secs| *secs > 0)
    }
}

/// Room a frame usually needs in [`TurnSink`]'s buffer; with less left, the
/// next chunk is allocated.
const FRAME_ROOM: usize = 512;
/// How much buffer a turn's frames take at a time.
const FRAME_CHUNK: usize = 8 * 1024;

/// How a turn ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The model finished.
    Completed,
    /// Cancelled by the client or its disconnect.
    Cancelled,
    /// The model or the store failed.
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
        }
    }
}

/// Where a turn's model events go: frames for the socket, and the assistant
/// message assembled from them.
///
/// Runs where the adapter runs (a blocking thread, or the turn's task for a
/// stepped adapter); none of its methods may panic (a panic here would cross
/// the FFI boundary and abort the host).
pub struct TurnSink {
    /// For an adapter on the blocking pool: its frames, with their sequence
    /// numbers, go one by one into this bounded channel, which the turn's
    /// task forwards to the socket.
    out: Option<mpsc::Sender<(u64, WsMessage)>>,
    /// A stepped turn's frames, until its step returns and they are sent
    /// together (at most [`STEP_FRAMES`]).
    batch: Vec<WsMessage>,
    /// Set when a step emitted more than [`STEP_FRAMES`] events.
    step_overflowed: bool,
    /// Where frames are written: each frame is split off as it is done, so
    /// the frames of a turn share a few allocations.
    frames: BytesMut,
    /// The time stamped on a step's events: a step is over in well under a
    /// millisecond, so its events share one reading of the clock.
    step_time: Option<u64>,
    framer: Framer,
    cancel: Arc<TurnControl>,
    interaction_id: String,
    /// The last sequence number used.
    sequence: u64,
    started: bool,
    /// Set once the model's `end` or `error` went out.
    outcome: Option<Status>,
    client_gone: bool,
    text: String,
    reasoning: String,
    tool_calls: Vec<ToolCall>,
    diagnostics: Vec<Diagnostic>,
    /// The last usage the model reported.
    usage: Option<Usage>,
    /// When the turn started, until its first event is timed.
    first_event_due: Option<Instant>,
}

impl TurnSink {
    fn stopped(&self) -> bool {
        self.client_gone
            || self.outcome.is_some()
            || self.cancel.is_cancelled()
            || self.batch.len() >= STEP_FRAMES
    }

    fn flow(&self) -> Flow {
        if self.stopped() {
            Flow::STOP
        } else {
            Flow::CONTINUE
        }
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
        let frame = match Utf8Bytes::try_from(self.frames.split().freeze()) {
            Ok(text) => WsMessage::Text(text),
            // The framer writes JSON text only; never sent.
            Err(_) => return,
        };
        match &self.out {
            Some(out) => {
                if !self.client_gone && out.blocking_send((self.sequence, frame)).is_err() {
                    self.client_gone = true;
                }
            }
            None => self.batch.push(frame),
        }
    }

    /// Sends the frames a step emitted, with one flush (stepped turns).
    async fn send_batch(&mut self, outbox: &Outbox) {
        if self.batch.len() >= STEP_FRAMES {
            self.step_overflowed = true;
        }
        if self.batch.is_empty() {
            return;
        }
        // To a socket already gone, the frames are dropped (their numbers
        // still count as used).
        if !outbox
            .send_numbered(self.batch.drain(..), self.sequence)
            .await
        {
            self.client_gone = true;
        }
    }

    fn ensure_started(&mut self) {
        if !self.started {
            self.started = true;
            self.emit(&ModelEvent::Start {
                id: None,
                model_id: None,
            });
        }
    }

    fn finish(&mut self, status: Status, event: &ModelEvent<'_>) {
        self.ensure_started();
        self.emit(event);
        self.outcome = Some(status);
    }

    /// Completes the model's part of the turn after the adapter returned:
    /// whatever it left out (`start`, `end`, an error for a returned error or
    /// panic, `end` with `cancelled`) is filled in here.
    fn close(&mut self, result: Result<(), PluginError>) -> Status {
        if let Some(status) = self.outcome {
            if let Err(err) = result {
                tracing::warn!(error = %err, "adapter returned an error after its last event");
            }
            return status;
        }
        let diagnostics = std::mem::take(&mut self.diagnostics);
        if let Some(secs) = self.cancel.timed_out() {
            let message = format!("the turn ran longer than {secs} s (server.turn_timeout_secs)");
            let event = ModelEvent::Error {
                error: ErrorBody {
                    code: "turn_timeout",
                    message: &message,
                },
                diagnostics: &diagnostics,
            };
            self.finish(Status::Failed, &event);
            return Status::Failed;
        }
        match result {
            Err(err) => {
                tracing::warn!(turn = %self.interaction_id, error = %err, "model adapter failed");
                let event = ModelEvent::Error {
                    error: ErrorBody {
                        code: err.kind.as_str(),
                        message: err.message.as_str(),
                    },
                    diagnostics: &diagnostics,
                };
                self.finish(Status::Failed, &event);
            }
            Ok(()) => {
                let cancelled = self.client_gone || self.cancel.is_cancelled();
                let (status, reason) = if cancelled {
                    (Status::Cancelled, FinishReason::CANCELLED)
                } else {
                    (Status::Completed, FinishReason::STOP)
                };
                let event = ModelEvent::End {
                    finish_reason: Some(reason.as_str()),
                    diagnostics: &diagnostics,
                };
                self.finish(status, &event);
            }
        }
        self.outcome.unwrap_or(Status::Failed)
    }

    fn assistant_message(&mut self) -> Option<Message> {
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
}

fn optional(text: RStr<'_>) -> Option<&str> {
    Some(text.as_str()).filter(|t| !t.is_empty())
}

impl EventSink for TurnSink {
    fn start(&mut self, id: RStr<'_>, model_id: RStr<'_>) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        if !self.started {
            self.started = true;
            self.emit(&ModelEvent::Start {
                id: optional(id),
                model_id: optional(model_id),
            });
        }
        self.flow()
    }

    fn text(&mut self, text: RStr<'_>) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        self.ensure_started();
        self.text.push_str(text.as_str());
        self.emit(&ModelEvent::Delta {
            text: Some(text.as_str()),
            reasoning: None,
            tool_call: None,
        });
        self.flow()
    }

    fn reasoning(&mut self, text: RStr<'_>) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        self.ensure_started();
        self.reasoning.push_str(text.as_str());
        self.emit(&ModelEvent::Delta {
            text: None,
            reasoning: Some(text.as_str()),
            tool_call: None,
        });
        self.flow()
    }

    fn tool_call(&mut self, id: RStr<'_>, name: RStr<'_>, arguments: RStr<'_>) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        self.ensure_started();
        let call = ToolCall {
            id: id.to_string(),
            name: name.to_string(),
            arguments: arguments.to_string(),
        };
        self.emit(&ModelEvent::Delta {
            text: None,
            reasoning: None,
            tool_call: Some(&call),
        });
        self.tool_calls.push(call);
        self.flow()
    }

    fn usage(&mut self, usage: Usage) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        self.ensure_started();
        self.usage = Some(usage);
        self.emit(&ModelEvent::Usage {
            usage: usage.into(),
        });
        self.flow()
    }

    fn end(&mut self, reason: FinishReason) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        let status = if reason == FinishReason::CANCELLED {
            Status::Cancelled
        } else {
            Status::Completed
        };
        let diagnostics = std::mem::take(&mut self.diagnostics);
        self.finish(
            status,
            &ModelEvent::End {
                finish_reason: Some(reason.as_str()),
                diagnostics: &diagnostics,
            },
        );
        Flow::STOP
    }

    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        let code = optional(code).unwrap_or("model_error");
        let diagnostics = std::mem::take(&mut self.diagnostics);
        self.finish(
            Status::Failed,
            &ModelEvent::Error {
                error: ErrorBody {
                    code,
                    message: message.as_str(),
                },
                diagnostics: &diagnostics,
            },
        );
        Flow::STOP
    }

    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, data_json: RStr<'_>) -> Flow {
        if self.stopped() {
            return Flow::STOP;
        }
        let data = optional(data_json).and_then(|json| serde_json::from_str(json).ok());
        self.diagnostics.push(Diagnostic {
            level: level.as_str().to_owned(),
            message: message.to_string(),
            data,
        });
        self.flow()
    }

    fn is_cancelled(&self) -> bool {
        self.client_gone || self.cancel.is_cancelled()
    }
}

/// Runs one turn of `conn`'s session to the end, including its save and its
/// `interaction.turn` frame. `cancel` is this turn's cancel flag.
pub async fn run(conn: &Connection, prompt: Prompt, cancel: Arc<TurnControl>) {
    let started = Instant::now();
    let active = conn.host.active.load_full();
    let backend = prompt
        .model
        .or_else(|| conn.model())
        .and_then(|name| active.models.get(&name))
        .or_else(|| active.default_model())
        .cloned();
    let store = active
        .stores
        .get(&conn.store())
        .or_else(|| active.store())
        .cloned();
    let (Some(backend), Some(store)) = (backend, store) else {
        let turn = format!("turn-{}", conn.turns.load(Ordering::Relaxed) + 1);
        conn.diagnostic(
            "error",
            "host",
            "no_backend",
            "no model backend or store is configured",
        )
        .await;
        end_turn(conn, conn.sequence(), &turn, Status::Failed).await;
        return;
    };

    let lock = conn.host.locks.get(&conn.session_id);
    let _turns_of_this_session = lock.lock().await;

    let user = Message::new(Role::User, prompt.text);
    let mut claimed = match claim(conn, &store, &user, &cancel).await {
        Ok(Some(claimed)) => claimed,
        Ok(None) => {
            // Cancelled while another host's turn held the session.
            let turn = format!("turn-{}", conn.turns.load(Ordering::Relaxed) + 1);
            end_turn(conn, conn.sequence(), &turn, Status::Cancelled).await;
            return;
        }
        Err(err) => {
            let turn = format!("turn-{}", conn.turns.load(Ordering::Relaxed) + 1);
            store_failed(
                conn,
                &err,
                "the session could not be loaded; the prompt was not run",
            )
            .await;
            end_turn(conn, conn.sequence(), &turn, Status::Failed).await;
            return;
        }
    };
    let interaction_id = format!("turn-{}", claimed.doc.turns);
    conn.turns.fetch_max(claimed.doc.turns, Ordering::Relaxed);

    let request = RequestRef {
        session_id: &conn.session_id,
        interaction_id: &interaction_id,
        backend: &backend.name,
        messages: &claimed.doc.messages,
        params: &prompt.params,
    }
    .to_json(&mut claimed.messages_json);
    let sink = TurnSink {
        out: None,
        batch: Vec::new(),
        step_overflowed: false,
        frames: BytesMut::new(),
        step_time: None,
        framer: conn.framer,
        cancel,
        interaction_id: interaction_id.clone(),
        sequence: claimed.doc.last_sequence,
        started: false,
        outcome: None,
        client_gone: false,
        text: String::new(),
        reasoning: String::new(),
        tool_calls: Vec::new(),
        diagnostics: Vec::new(),
        usage: None,
        first_event_due: Some(started),
    };
    // A store in this process is reached by no other host: no lease to renew.
    let lease = (!store.in_process).then(|| {
        Renewal::start(
            conn,
            &store,
            claimed.doc.clone(),
            claimed.messages_json.clone(),
            claimed.version,
            claimed.owner.clone(),
        )
    });
    let generated = generate(&conn.out, backend, request, sink).await;
    if let Some(lease) = lease {
        claimed.version = lease.stop().await;
    }
    let (mut status, last_model_sequence, answer) = match generated {
        Some((mut sink, status)) => {
            if let Some(usage) = sink.usage {
                let tokens = &metrics().tokens;
                tokens
                    .get_or_create(&[("kind", "input")])
                    .inc_by(usage.input_tokens);
                tokens
                    .get_or_create(&[("kind", "output")])
                    .inc_by(usage.output_tokens);
            }
            (status, sink.sequence, sink.assistant_message())
        }
        None => (Status::Failed, conn.sequence(), None),
    };

    // The turn's end frame takes the next number; it is saved with the turn.
    let end_sequence = last_model_sequence + 1;
    match commit(conn, &store, claimed, answer, end_sequence).await {
        Ok(saved) => {
            *conn.cached.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((store.name.clone(), saved));
        }
        Err(err) => {
            store_failed(conn, &err, "the turn could not be saved").await;
            status = Status::Failed;
        }
    }
    // Counted before the turn's last frame goes out: a client that reads
    // the metrics after it finds the turn in them.
    metrics()
        .turn_seconds
        .observe(started.elapsed().as_secs_f64());
    end_turn(conn, end_sequence, &interaction_id, status).await;
}

async fn end_turn(conn: &Connection, sequence: u64, interaction_id: &str, status: Status) {
    metrics()
        .turns
        .get_or_create(&[("status", status.as_str())])
        .inc();
    let meta = Meta::now(sequence, SOURCE_HOST, Some(interaction_id));
    let frame = conn.framer.turn(
        &TurnEvent::End {
            status: status.as_str(),
            interaction_id,
        },
        &meta,
    );
    conn.out
        .send_numbered([WsMessage::text(frame)], sequence)
        .await;
}

/// Runs the adapter, in steps on this task or on the blocking pool; gives the
/// sink back with the status, or nothing if the host's own sink code panicked
/// (the adapter's panics are caught inside the plugin).
async fn generate(
    outbox: &Outbox,
    backend: Arc<ModelBackend>,
    request: serde_json::Result<String>,
    mut sink: TurnSink,
) -> Option<(TurnSink, Status)> {
    let request = match request {
        Ok(json) => json,
        Err(err) => {
            let status = sink.close(Err(PluginError::internal(err.to_string())));
            sink.send_batch(outbox).await;
            return Some((sink, status));
        }
    };
    if backend.stepped {
        return Some(step(outbox, &backend, &request, sink).await);
    }
    let (frames, mut ready) = mpsc::channel(BLOCKING_FRAMES);
    sink.out = Some(frames);
    let adapter = tokio::task::spawn_blocking(move || {
        let result = backend
            .adapter
            .generate(
                RStr::from(request.as_str()),
                EventSink_TO::from_ptr(&mut sink, TD_Opaque),
            )
            .into_result();
        let status = sink.close(result);
        sink.out = None;
        (sink, status)
    });
    // Forward the adapter's frames as they come, every frame that is ready
    // with one flush, until it returns and its last frames are out.
    let mut batch = Vec::new();
    while let Some((mut through, frame)) = ready.recv().await {
        batch.push(frame);
        while let Ok((sequence, frame)) = ready.try_recv() {
            batch.push(frame);
            through = sequence;
        }
        if !outbox.send_numbered(batch.drain(..), through).await {
            // The socket is gone: the adapter's next frame finds the
            // channel closed and its sink answers stop.
            ready.close();
        }
    }
    adapter
        .await
        .map_err(|err| tracing::error!(error = %err, "turn task failed"))
        .ok()
}

/// Frames an adapter on the blocking pool may have waiting for the socket
/// before it waits itself.
const BLOCKING_FRAMES: usize = 64;

/// The most events one step may emit: past it the sink answers stop, and the
/// turn fails (a step emits what is ready, a few dozen events, and returns).
pub const STEP_FRAMES: usize = 1024;

/// Wakes a stepped turn whose step answered pending.
struct StepWaker(Arc<Notify>);

impl TurnWaker for StepWaker {
    fn wake(&self) {
        // Keeps one wake for a turn not waiting yet; never panics.
        self.0.notify_one();
    }
}

/// Runs a stepped adapter's turn on this task: each step's frames go out as
/// one batch, its pauses and pending waits end early when the turn is
/// cancelled, and the stepper is dropped as soon as the turn stops.
async fn step(
    outbox: &Outbox,
    backend: &ModelBackend,
    request: &str,
    mut sink: TurnSink,
) -> (TurnSink, Status) {
    sink.batch.reserve(96);
    let control = sink.cancel.clone();
    let woken = Arc::new(Notify::new());
    let waker = TurnWaker_TO::from_value(StepWaker(woken.clone()), TD_Opaque);
    // Registered once for the whole turn, not at every pause.
    let stopped = control.stopped.notified();
    tokio::pin!(stopped);
    let result = match backend
        .adapter
        .start(RStr::from(request), waker)
        .into_result()
    {
        Err(err) => Err(err),
        Ok(mut stepper) => loop {
            if sink.stopped() {
                break Ok(());
            }
            sink.step_time = Some(now_ms());
            let step = stepper
                .step(EventSink_TO::from_ptr(&mut sink, TD_Opaque))
                .into_result();
            sink.step_time = None;
            // A pause counts from the step's answer, not from after the send.
            let answered = tokio::time::Instant::now();
            sink.send_batch(outbox).await;
            let next = match step {
                Ok(_) if sink.step_overflowed => {
                    break Err(PluginError::internal(format!(
                        "a step emitted more than {STEP_FRAMES} events without returning; \
                         a step emits what is ready and answers READY for more"
                    )))
                }
                Ok(step) => step.next(),
                Err(err) => break Err(err),
            };
            if sink.stopped() {
                break Ok(());
            }
            match next {
                Next::Done => break Ok(()),
                Next::Ready => tokio::task::yield_now().await,
                Next::Sleep(pause) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(answered + pause) => {}
                        _ = &mut stopped => {}
                    }
                }
                Next::Pending => {
                    tokio::select! {
                        _ = woken.notified() => {}
                        _ = &mut stopped => {}
                    }
                }
                Next::Unknown(kind) => {
                    break Err(PluginError::internal(format!(
                        "the adapter's step answered kind {kind}, which this host does not know \
                         (the plugin was built against a newer plugin-api)"
                    )))
                }
            }
        },
    };
    let status = sink.close(result);
    sink.send_batch(outbox).await;
    (sink, status)
}

/// How long a turn's claim on its session lasts without renewal. A host
/// that dies mid-turn blocks the session's next turn for at most this long.
const LEASE: Duration = Duration::from_secs(30);
/// How often a running turn renews its claim.
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// A session claimed for one turn: saved with the user message, the turn
/// counted, and a lease naming this host, at `version`.
struct Claimed {
    doc: SessionDoc,
    version: u64,
    owner: String,
    /// The JSON text of `doc.messages`.
    messages_json: MessagesJson,
}

/// Claims the session for a turn. On a store in this process, the session
/// as loaded is the claim (one host, one turn of a session at a time; the
/// answer's save is conditional on it), and the connection's cached copy is
/// taken as loaded, unparsed, when the store still holds exactly it
/// ([`session::refresh`]). Otherwise several hosts (or connections on
/// several hosts) may share a session: a turn first saves, conditionally on
/// the version it loaded, the user message and a lease naming this host, so
/// that no other host streams on the session (and uses its sequence numbers)
/// until the turn is saved or the lease runs out. A live lease of another
/// host is waited for. `Ok(None)`: the turn was cancelled while waiting.
async fn claim(
    conn: &Connection,
    store: &Arc<StoreBackend>,
    user: &Message,
    cancel: &TurnControl,
) -> Result<Option<Claimed>, StoreError> {
    let mut wait = Duration::from_millis(10);
    let mut cached = conn
        .cached
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .filter(|(name, _)| *name == store.name)
        .map(|(_, loaded)| loaded);
    loop {
        let loaded = match cached.take() {
            // The claim's save below is conditional on its version: a stale
            // copy conflicts, and the next round loads.
            Some(loaded) if !store.in_process => Some(loaded),
            // An in-process claim saves nothing that would catch a stale
            // copy: the store must still hold exactly this one.
            Some(loaded) => session::refresh(store, &conn.session_id, Some(loaded)).await?,
            None => session::load(store, &conn.session_id).await?,
        };
        let Loaded {
            mut doc,
            version,
            owner,
            mut messages_json,
        } = loaded.unwrap_or_else(|| Loaded {
            owner: conn.owner.clone(),
            ..Loaded::default()
        });
        let now = now_ms();
        let held_elsewhere = !store.in_process
            && doc
                .lease
                .as_ref()
                .is_some_and(|l| l.holder != conn.host.instance && l.expires_ms > now);
        if held_elsewhere {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
            continue;
        }
        // Never reuse a number this connection already sent, even if a save was lost.
        doc.last_sequence = doc.last_sequence.max(conn.sequence());
        doc.turns = doc.turns.max(conn.turns.load(Ordering::Relaxed)) + 1;
        doc.messages.push(user.clone());
        messages_json.push(user);
        if store.in_process {
            // No other host reaches this store, and this host runs one turn
            // of a session at a time: the answer's save is the only one.
            return Ok(Some(Claimed {
                doc,
                version,
                owner,
                messages_json,
            }));
        }
        doc.lease = Some(Lease {
            holder: conn.host.instance.clone(),
            turn: format!("turn-{}", doc.turns),
            expires_ms: now + LEASE.as_millis() as u64,
        });
        match session::save(
            store,
            &conn.session_id,
            version,
            &owner,
            &doc,
            &mut messages_json,
        )
        .await?
        {
            SaveOutcome::Saved { version } => {
                return Ok(Some(Claimed {
                    doc,
                    version,
                    owner,
                    messages_json,
                }))
            }
            SaveOutcome::Conflict { .. } => continue,
        }
    }
}

/// The JSON of a [`ModelRequest`], written from borrowed parts (the history
/// is not copied to be sent).
#[derive(serde::Serialize, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct RequestRef<'a> {
    session_id: &'a str,
    interaction_id: &'a str,
    backend: &'a str,
    messages: &'a [Message],
    params: &'a TurnParams,
}

impl RequestRef<'_> {
    /// The request's JSON, as `serde_json::to_string(self)` writes it, with
    /// the history taken from `json`, the text of `self.messages`.
    fn to_json(self, json: &mut MessagesJson) -> serde_json::Result<String> {
        let shell = serde_json::to_string(&RequestRef {
            messages: &[],
            ..self
        })?;
        json.splice(self.messages, &shell)
    }
}

/// Renews a turn's lease while the model streams; [`Renewal::stop`] gives
/// back the version the session is at.
struct Renewal {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

impl Renewal {
    fn start(
        conn: &Connection,
        store: &Arc<StoreBackend>,
        mut doc: SessionDoc,
        mut messages_json: MessagesJson,
        mut version: u64,
        owner: String,
    ) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (store, id) = (store.clone(), conn.session_id.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return version,
                    _ = tokio::time::sleep(RENEW_EVERY) => {}
                }
                if let Some(lease) = doc.lease.as_mut() {
                    lease.expires_ms = now_ms() + LEASE.as_millis() as u64;
                }
                match session::save(&store, &id, version, &owner, &doc, &mut messages_json).await {
                    Ok(SaveOutcome::Saved { version: now }) => version = now,
                    Ok(SaveOutcome::Conflict { current }) => {
                        tracing::warn!(session = %id, version, current, "turn lease lost");
                        return version;
                    }
                    Err(err) => {
                        tracing::warn!(session = %id, error = %err, "cannot renew the turn lease")
                    }
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// Saves the finished turn: the answer appended, the end sequence recorded,
/// the lease released, conditionally on `claimed.version` (the claim's, or
/// its last renewal's). If the session changed meanwhile (the lease ran out
/// and another host took it), the answer goes on top of the newer state.
async fn commit(
    conn: &Connection,
    store: &Arc<StoreBackend>,
    claimed: Claimed,
    answer: Option<Message>,
    end_sequence: u64,
) -> Result<Loaded, StoreError> {
    let Claimed {
        mut doc,
        mut version,
        owner,
        mut messages_json,
    } = claimed;
    let turns = doc.turns;
    for _ in 0..8 {
        if let Some(answer) = &answer {
            doc.messages.push(answer.clone());
            messages_json.push(answer);
        }
        doc.last_sequence = doc.last_sequence.max(end_sequence);
        doc.turns = doc.turns.max(turns);
        if doc
            .lease
            .as_ref()
            .is_some_and(|l| l.holder == conn.host.instance)
        {
            doc.lease = None;
        }
        match session::save(
            store,
            &conn.session_id,
            version,
            &owner,
            &doc,
            &mut messages_json,
        )
        .await?
        {
            SaveOutcome::Saved { version } => {
                return Ok(Loaded {
                    doc,
                    version,
                    owner,
                    messages_json,
                })
            }
            SaveOutcome::Conflict { current } => {
                tracing::warn!(session = %conn.session_id, version, current, "turn save conflict; merging");
                let newer = session::load(store, &conn.session_id)
                    .await?
                    .unwrap_or_default();
                version = newer.version;
                doc = newer.doc;
                messages_json = newer.messages_json;
            }
        }
    }
    Err(StoreError::Contended(store.name.clone()))
}

async fn store_failed(conn: &Connection, err: &StoreError, what: &str) {
    tracing::error!(session = %conn.session_id, error = %err, "{what}");
    let message = format!("{what}: {err}");
    conn.diagnostic("error", "store", "store_unavailable", &message)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_host_plugin_api::ModelRequest;

    #[test]
    fn the_borrowed_request_is_a_model_request() {
        let messages = vec![
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "echo: hi"),
        ];
        let params = TurnParams {
            max_tokens: Some(7),
            ..TurnParams::default()
        };
        let json = serde_json::to_string(&RequestRef {
            session_id: "s",
            interaction_id: "turn-2",
            backend: "echo",
            messages: &messages,
            params: &params,
        })
        .expect("serializes");
        let parsed: ModelRequest = serde_json::from_str(&json).expect("parses");
        assert_eq!(
            parsed,
            ModelRequest {
                session_id: "s".into(),
                interaction_id: "turn-2".into(),
                backend: "echo".into(),
                messages,
                params,
            }
        );
    }

    #[test]
    fn the_spliced_request_is_what_serde_json_writes() {
        let history = [
            Message::new(Role::System, "Say \"hi\".\n\u{1}\\"),
            Message::new(Role::User, "\"messages\":[] caf\u{e9} \u{1f600}"),
            Message {
                reasoning: Some("Look it up.".to_owned()),
                tool_calls: vec![ToolCall {
                    id: "call-1".to_owned(),
                    name: "search".to_owned(),
                    arguments: r#"{"q":"a \"b\""}"#.to_owned(),
                }],
                ..Message::new(Role::Assistant, "")
            },
            Message {
                tool_call_id: Some("call-1".to_owned()),
                ..Message::new(Role::Tool, "found")
            },
            Message::new(Role::Assistant, "hi"),
        ];
        let mut extra = serde_json::Map::new();
        extra.insert("messages".to_owned(), serde_json::json!([]));
        extra.insert("mirostat".to_owned(), serde_json::json!({"tau": 5.0}));
        let params = [
            TurnParams::default(),
            TurnParams {
                temperature: Some(0.7),
                max_tokens: Some(7),
                stop: vec!["\n\n".to_owned()],
                tools: vec![llm_host_plugin_api::ToolSpec {
                    name: "search".to_owned(),
                    description: "Searches.".to_owned(),
                    parameters: serde_json::json!({"type": "object"}),
                }],
                extra,
                ..TurnParams::default()
            },
        ];
        for params in &params {
            // The history as turns build it, from empty to the whole of it.
            let mut json = MessagesJson::new(&[]).expect("serializes");
            for len in 0..=history.len() {
                if len > 0 {
                    json.push(&history[len - 1]);
                }
                let request = RequestRef {
                    session_id: "session-\"x\"",
                    interaction_id: "turn-3",
                    backend: "echo",
                    messages: &history[..len],
                    params,
                };
                assert_eq!(
                    request.to_json(&mut json).expect("writes"),
                    serde_json::to_string(&request).expect("serializes")
                );
                // A text not known yet is written from the messages.
                assert_eq!(
                    request
                        .to_json(&mut MessagesJson::default())
                        .expect("writes"),
                    serde_json::to_string(&request).expect("serializes")
                );
            }
        }
    }
}
