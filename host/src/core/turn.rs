//! One turn: claim the session, stream the model into the client's frames,
//! save, and send the turn's end frame.
//!
//! A stepped model runs on the turn's own task: when a step returns, its
//! frames go out with one flush, and its pauses are the runtime's timers.
//! Any other model runs on the blocking pool, its sink pushing each frame
//! into a bounded channel that the turn's task forwards. Either way, when the
//! client reads slowly the turn waits (and a blocking model with it), so a
//! slow client cannot grow the host's memory. Cancel, the turn's deadline or
//! a lost lease make the sink answer stop, and the model returns at its next
//! event (a stepped turn is dropped at once).
//!
//! [`run_unsaved`] runs a model once over messages the client gives, with no
//! session to claim or save, through the same sink and frames.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use llm_host_plugin_api::{Message, Role, TurnParams};
use tokio::sync::oneshot;

use super::claim::{self, ClaimError, Claimed};
use super::commit::{self, CommitError};
use super::generate::{generate, RequestRef};
use super::locks::SessionLocks;
use super::ports::{Backends, Frames, Model, NoBackends, SessionStore};
use super::replay::{Recorded, StoredFrames};
use super::request;
use super::rounds::{self, RoundTrips};
use super::settings;
use super::sink::{Failure, Status, TurnControl, TurnSink};
use super::{Prompt, Scope, TurnSettings};
use crate::metrics::metrics;
use crate::protocol::{Framer, Meta, TurnEvent, SOURCE_HOST};

pub use super::report::{Phase, Report};

/// Runs one turn of the scope's session with `model` to its end, including
/// its save and its `interaction.turn` frame; answers how it ended.
/// `locks` keeps turns of one session on this host one at a time. The
/// session's settings apply but for their backend, and no history policy
/// (see [`run_with`]).
pub async fn run<S: SessionStore, M: Model, F: Frames>(
    scope: &Scope<'_, S, F>,
    locks: &SessionLocks,
    model: Arc<M>,
    prompt: Prompt,
    control: Arc<TurnControl>,
) -> Report {
    run_with(scope, locks, &NoBackends, model, prompt, control)
        .await
        .0
}

/// Like [`run`], with `backends`: a prompt that names no backend runs on
/// the one the session's settings name, if configured, instead of `model`
/// (the prompt's, or the connection's); the backend's history policy
/// shapes its requests. Answers how the turn ended and the backend it ran
/// on.
pub async fn run_with<S: SessionStore, M: Model, F: Frames, B: Backends<M>>(
    scope: &Scope<'_, S, F>,
    locks: &SessionLocks,
    backends: &B,
    model: Arc<M>,
    prompt: Prompt,
    control: Arc<TurnControl>,
) -> (Report, Arc<M>) {
    // Every numbered frame of the turn is also kept for replay.
    let recorded = Recorded {
        inner: scope.frames,
        control: &control,
        limit: scope.settings.replay_frames,
    };
    let scope = &Scope {
        host: scope.host,
        attachment: scope.attachment,
        store: scope.store,
        frames: &recorded,
        framer: scope.framer,
        settings: scope.settings,
    };
    let turn = run_turn(scope, locks, backends, model, prompt, control.clone());
    let Some(limit) = scope.settings.turn_timeout else {
        return turn.await;
    };
    tokio::pin!(turn);
    // Past its deadline a turn is stopped, and still runs to its end (the
    // error event, the save, the end frame).
    tokio::select! {
        ran = &mut turn => ran,
        () = tokio::time::sleep(limit) => {
            control.fail(past_deadline(limit));
            turn.await
        }
    }
}

async fn run_turn<S: SessionStore, M: Model, F: Frames, B: Backends<M>>(
    scope: &Scope<'_, S, F>,
    locks: &SessionLocks,
    backends: &B,
    model: Arc<M>,
    prompt: Prompt,
    control: Arc<TurnControl>,
) -> (Report, Arc<M>) {
    let started = Instant::now();
    let attachment = scope.attachment;
    let lock = locks.get(&attachment.session_id);
    let _turns_of_this_session = lock.lock().await;

    let prompt_id = prompt.id.as_deref();
    let user = Message::new(Role::User, prompt.text);
    let claim_began = started.elapsed();
    let claimed = claim::claim(scope, &user, &control).await;
    // A claim cancelled while another host held the session did not fail.
    let claim_ok = matches!(claimed, Ok(_) | Err(ClaimError::Cancelled));
    let claim_phase = Phase::until_now(started, claim_began, claim_ok);
    let mut claimed = match claimed {
        Ok(claimed) => claimed,
        Err(err) => {
            let turn = attachment.next_turn_id();
            let code = match &err {
                ClaimError::Cancelled => None,
                ClaimError::NotYours(_) => Some("session_not_found"),
                ClaimError::HistoryFull { .. } => Some("history_full"),
                ClaimError::Store(_) => Some("store_unavailable"),
            };
            let status = match &err {
                ClaimError::Cancelled => Status::Cancelled,
                ClaimError::NotYours(id) => {
                    let message = format!("no session `{id}`; the prompt was not run");
                    scope
                        .diagnostic("error", "host", "session_not_found", &message)
                        .await;
                    Status::Failed
                }
                ClaimError::HistoryFull { bytes, limit } => {
                    let message = format!(
                        "the session's history is {bytes} bytes and this prompt would take it \
                         past {limit} (server.max_history_bytes); start a new session"
                    );
                    scope
                        .diagnostic("error", "host", "history_full", &message)
                        .await;
                    Status::Failed
                }
                ClaimError::Store(err) => {
                    store_failed(
                        scope,
                        err,
                        "the session could not be loaded; the prompt was not run",
                    )
                    .await;
                    Status::Failed
                }
            };
            control.end();
            end_unclaimed(scope, &turn, prompt_id, status).await;
            let mut report = Report::new(status, turn, code, started);
            report.claim = Some(claim_phase);
            return (report, model);
        }
    };
    control.claimed_for(&claimed.owner);
    let interaction_id = format!("turn-{}", claimed.doc.turns);
    attachment
        .turns
        .fetch_max(claimed.doc.turns, std::sync::atomic::Ordering::Relaxed);

    let model = settings::choose(
        backends,
        &claimed.doc.settings,
        model,
        prompt.model.is_some(),
    );
    let mut params = prompt.params;
    if let Some(defaults) = &claimed.doc.settings.params {
        *params = settings::merge_params(defaults, std::mem::take(&mut *params));
    }
    // Saved with the turn: a client resuming without naming a backend goes
    // on with this one.
    if claimed.doc.model.as_deref() != Some(model.name()) {
        claimed.doc.model = Some(model.name().to_owned());
    }
    let parts = RequestRef {
        session_id: &attachment.session_id,
        interaction_id: &interaction_id,
        backend: model.name(),
        messages: &claimed.doc.messages,
        params: &params,
    };
    let mut prepared = request::prepare(
        parts,
        &mut claimed.messages_json,
        claimed.doc.settings.system_message(),
        backends.history(model.name()),
        claimed.doc.summary.as_ref(),
        |name| backends.model(name),
    );
    let sink = TurnSink::new(
        scope.framer,
        control.clone(),
        interaction_id.clone(),
        claimed.doc.last_sequence,
        claimed.reserved,
        started,
    );
    // A client that can send tool results gets round trips when it
    // declared tools; the turn then builds its later requests on a copy of
    // the history (the lease keeper holds the claim meanwhile).
    let mut round_trips = (prompt.round_trips && !params.tools.is_empty()).then(|| RoundTrips {
        messages: claimed.doc.messages.clone(),
        messages_json: claimed.messages_json.clone(),
        session_id: &attachment.session_id,
        interaction_id: &interaction_id,
        params: &params,
        timeout: scope.settings.tool_timeout,
        shape: Default::default(),
    });
    // The lease is renewed while the model runs, in this task.
    let (done, finished) = oneshot::channel();
    let model_began = started.elapsed();
    let ran = model.clone();
    let generating = async {
        let parts = RequestRef {
            session_id: &attachment.session_id,
            interaction_id: &interaction_id,
            backend: model.name(),
            messages: &[],
            params: &params,
        };
        let (request, summary) =
            request::first_request(scope, &mut prepared, parts, &control).await;
        if let Some(trips) = round_trips.as_mut() {
            trips.shape = std::mem::take(&mut prepared.shape);
        }
        let groups = rounds::run(scope.frames, model, request, sink, round_trips).await;
        let model_ended = started.elapsed();
        let _ = done.send(());
        (groups, model_ended, summary)
    };
    let (generated, kept) = if claimed.token.is_some() {
        // Boxed: a turn on an in-process store (most turns) does not carry
        // the keeper's state in its own future.
        let keeping = Box::pin(claim::keep(scope, claimed, &control, finished));
        tokio::join!(generating, keeping)
    } else {
        (generating.await, claimed)
    };
    claimed = kept;
    let (groups, model_ended, summary) = generated;
    if summary.is_some() {
        claimed.doc.summary = summary;
    }
    let mut report = Report::new(Status::Failed, interaction_id.clone(), None, started);
    report.claim = Some(claim_phase);
    let answers = groups.answers;
    let (mut status, last_model_sequence) = match groups.last {
        Some((mut sink, status)) => {
            report.took(&mut sink);
            count_tokens(sink.usage);
            (status, sink.sequence)
        }
        None => (Status::Failed, attachment.sequence()),
    };
    if let Some(failure) = groups.wait_failure {
        scope
            .diagnostic("error", "host", failure.code, &failure.message)
            .await;
        report.code.get_or_insert_with(|| failure.code.to_owned());
    }
    report.model = Some(Phase {
        start: model_began,
        duration: model_ended.saturating_sub(model_began),
        ok: status != Status::Failed,
    });

    // The turn's end frame takes the next number; it is saved with the turn.
    let end_sequence = last_model_sequence + 1;
    let commit_began = started.elapsed();
    // Saved with the turn's frames: the end frame it will have if the save
    // goes through.
    let end = end_frame(scope, end_sequence, &interaction_id, prompt_id, status);
    let replay =
        control.frames(|log| log.stored(Some((end_sequence, &end)), scope.settings.replay_frames));
    let saved = save(scope, claimed, answers, end_sequence, status, replay).await;
    report.commit = Some(Phase::until_now(started, commit_began, saved.1.is_none()));
    let saved_as = status;
    status = saved.0;
    if let Some(code) = saved.1 {
        report.code.get_or_insert_with(|| code.to_owned());
    }
    // Counted before the turn's last frame goes out: a client that reads
    // the metrics after it finds the turn in them.
    metrics()
        .turn_seconds
        .observe(started.elapsed().as_secs_f64());
    control.end();
    let end = if status == saved_as {
        end
    } else {
        end_frame(scope, end_sequence, &interaction_id, prompt_id, status)
    };
    send_end(scope, end, end_sequence, status).await;
    report.status = status;
    report.duration = started.elapsed();
    (report, ran)
}

/// A conversation to run without a session ([`run_unsaved`]).
#[derive(Debug, Clone, Copy)]
pub struct Unsaved<'a> {
    /// The run's id: the model request's `interactionId` and the frames'.
    pub interaction_id: &'a str,
    /// The conversation as the client gave it, ending with the message the
    /// model answers.
    pub messages: &'a [Message],
    /// Per-turn parameters.
    pub params: &'a TurnParams,
}

/// Runs `model` once over `unsaved`'s messages, with no session: nothing is
/// loaded, claimed or saved, and no other turn is waited for. Its frames go
/// into `frames` as a turn's do, numbered from 1: the model's events, then
/// the `interaction.turn` end frame. `control` stops it, as does
/// `settings.turn_timeout` (model error `turn_timeout`); like a turn, it is
/// counted in the turn metrics. For clients that keep their conversation
/// themselves (the OpenAI-compatible HTTP API without a session).
pub async fn run_unsaved<M: Model, F: Frames>(
    frames: &F,
    framer: Framer,
    settings: TurnSettings,
    model: Arc<M>,
    unsaved: Unsaved<'_>,
    control: Arc<TurnControl>,
) -> Report {
    let started = Instant::now();
    let interaction_id = unsaved.interaction_id;
    let request = serde_json::to_string(&RequestRef {
        session_id: "",
        interaction_id,
        backend: model.name(),
        messages: unsaved.messages,
        params: unsaved.params,
    });
    let sink = TurnSink::new(
        framer,
        control.clone(),
        interaction_id.to_owned(),
        0,
        settings.max_turn_events,
        started,
    );
    let generating = generate(frames, model, request, sink);
    let model_began = started.elapsed();
    let generated = match settings.turn_timeout {
        None => generating.await,
        Some(limit) => {
            tokio::pin!(generating);
            tokio::select! {
                generated = &mut generating => generated,
                () = tokio::time::sleep(limit) => {
                    control.fail(past_deadline(limit));
                    generating.await
                }
            }
        }
    };
    let mut report = Report::new(Status::Failed, interaction_id.to_owned(), None, started);
    let (status, last_sequence) = match generated {
        Some((mut sink, status)) => {
            report.took(&mut sink);
            count_tokens(sink.usage);
            (status, sink.sequence)
        }
        None => (Status::Failed, 0),
    };
    report.model = Some(Phase::until_now(
        started,
        model_began,
        status != Status::Failed,
    ));
    let metrics = metrics();
    metrics
        .turn_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics
        .turns
        .get_or_create(&[("status", status.as_str())])
        .inc();
    let end_sequence = last_sequence + 1;
    control.end();
    let frame = framer.turn(
        &TurnEvent::End {
            status: status.as_str(),
            interaction_id,
            prompt_id: None,
        },
        &Meta::now(end_sequence, SOURCE_HOST, Some(interaction_id)),
    );
    frames
        .send_numbered(&mut vec![Bytes::from(frame)], end_sequence)
        .await;
    report.status = status;
    report.duration = started.elapsed();
    report
}

/// Why a turn past its deadline is stopped.
fn past_deadline(limit: std::time::Duration) -> Failure {
    Failure {
        code: "turn_timeout",
        message: format!(
            "the turn ran longer than {} s (server.turn_timeout_secs)",
            limit.as_secs()
        ),
    }
}

/// Counts the tokens a model reported in `llm_host_tokens_total`.
fn count_tokens(usage: Option<llm_host_plugin_api::Usage>) {
    if let Some(usage) = usage {
        let tokens = &metrics().tokens;
        tokens
            .get_or_create(&[("kind", "input")])
            .inc_by(usage.input_tokens);
        tokens
            .get_or_create(&[("kind", "output")])
            .inc_by(usage.output_tokens);
    }
}

/// Commits the turn; answers its status, failed if it was not saved (with
/// the code the client was told).
async fn save<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    claimed: Claimed,
    answers: Vec<Message>,
    end_sequence: u64,
    status: Status,
    replay: Option<StoredFrames>,
) -> (Status, Option<&'static str>) {
    match commit::commit(scope, claimed, answers, end_sequence, replay).await {
        Ok(saved) => {
            scope.attachment.remember(scope.store.name(), saved);
            (status, None)
        }
        Err(CommitError::Store(err)) => {
            store_failed(scope, &err, "the turn could not be saved").await;
            (Status::Failed, Some("store_unavailable"))
        }
        Err(err) => {
            tracing::warn!(session = %scope.attachment.session_id, error = %err, "turn not saved");
            scope
                .diagnostic("error", "host", err.code(), &err.to_string())
                .await;
            (Status::Failed, Some(err.code()))
        }
    }
}

async fn store_failed<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    err: &super::ports::StoreError,
    what: &str,
) {
    tracing::error!(session = %scope.attachment.session_id, error = %err, "{what}");
    let message = format!("{what}: {}", err.public());
    scope
        .diagnostic("error", "store", "store_unavailable", &message)
        .await;
}

/// Sends the turn's `interaction.turn` end frame, numbered `sequence`.
pub async fn end_turn<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    sequence: u64,
    interaction_id: &str,
    prompt_id: Option<&str>,
    status: Status,
) {
    let frame = end_frame(scope, sequence, interaction_id, prompt_id, status);
    send_end(scope, frame, sequence, status).await;
}

/// Sends the end frame of a turn that never claimed its session: it takes
/// no number, and is stamped with the last number sent, as a diagnostic
/// outside a turn is.
async fn end_unclaimed<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    interaction_id: &str,
    prompt_id: Option<&str>,
    status: Status,
) {
    metrics()
        .turns
        .get_or_create(&[("status", status.as_str())])
        .inc();
    scope
        .frames
        .send_stamped(|sequence| end_frame(scope, sequence, interaction_id, prompt_id, status))
        .await;
}

/// The turn's `interaction.turn` end frame, numbered `sequence`.
fn end_frame<S, F>(
    scope: &Scope<'_, S, F>,
    sequence: u64,
    interaction_id: &str,
    prompt_id: Option<&str>,
    status: Status,
) -> Bytes {
    let meta = Meta::now(sequence, SOURCE_HOST, Some(interaction_id));
    let frame = scope.framer.turn(
        &TurnEvent::End {
            status: status.as_str(),
            interaction_id,
            prompt_id,
        },
        &meta,
    );
    Bytes::from(frame)
}

/// Sends `frame`, the turn's end frame of `status` numbered `sequence`.
async fn send_end<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    frame: Bytes,
    sequence: u64,
    status: Status,
) {
    metrics()
        .turns
        .get_or_create(&[("status", status.as_str())])
        .inc();
    scope.frames.send_numbered(&mut vec![frame], sequence).await;
}

#[cfg(test)]
#[path = "turn_tests.rs"]
mod tests;
