//! A turn's model groups: the model runs once, and when it ends calling
//! tools and the client can answer them (command mode), the turn waits for
//! a result per call ([`super::tools`]) and runs the model again with the
//! calls and their results appended, until a group ends otherwise.
//!
//! Every group's frames are numbered on from the last, within the turn's
//! one reservation; the turn's `interaction.turn` end frame comes after the
//! last group. The wait is bounded by `server.tool_timeout_secs`, and a
//! cancel (or the turn's deadline) ends it at once. A call left without a
//! result is saved with an error result, so the stored history holds a
//! result for every call (providers refuse a history without them).

use std::sync::Arc;
use std::time::Duration;

use llm_host_plugin_api::{Message, TurnParams, Usage};

use super::document::MessagesJson;
use super::generate::{generate, RequestRef};
use super::ports::{Frames, Model};
use super::sink::{Failure, Status, TurnControl, TurnSink};

/// What tool round trips need besides the first request: the history the
/// first request was built from, to append to, and how long to wait.
pub(super) struct RoundTrips<'a> {
    /// The session's messages, the prompt included.
    pub messages: Vec<Message>,
    /// Their JSON.
    pub messages_json: MessagesJson,
    /// The session's id, for the requests.
    pub session_id: &'a str,
    /// The turn's id.
    pub interaction_id: &'a str,
    /// The turn's parameters (tools included).
    pub params: &'a TurnParams,
    /// The longest wait for a group's results.
    pub timeout: Duration,
    /// How the requests are made from the history (the session's system
    /// prompt, the history policy's cut, as the first request's).
    pub shape: super::request::Shape,
}

/// What the groups did: the last group's sink and status (none if the
/// host's sink code panicked), the messages to save (each group's answer,
/// with the tool results between them), and the code of a failure of the
/// wait itself (`tool_timeout`).
pub(super) struct Groups {
    pub last: Option<(TurnSink, Status)>,
    pub answers: Vec<Message>,
    pub wait_failure: Option<Failure>,
}

/// Runs the model's groups for one turn, from `request`.
pub(super) async fn run<M: Model>(
    frames: &impl Frames,
    model: Arc<M>,
    request: serde_json::Result<String>,
    sink: TurnSink,
    mut round_trips: Option<RoundTrips<'_>>,
) -> Groups {
    let control = sink.control.clone();
    if round_trips.is_some() {
        control.tools.collect();
    }
    let mut generated = generate(frames, model.clone(), request, sink).await;
    let mut answers = Vec::new();
    let mut usage: Option<Usage> = None;
    loop {
        let Some((mut sink, status)) = generated else {
            return Groups {
                last: None,
                answers,
                wait_failure: None,
            };
        };
        usage = add_usage(usage, sink.usage);
        let answer = sink.assistant_message();
        let calls = answer
            .as_ref()
            .map(|a| a.tool_calls.clone())
            .unwrap_or_default();
        let go_on = status == Status::Completed
            && sink.finish_reason == Some("tool-calls")
            && !calls.is_empty();
        let trips = match round_trips.as_mut() {
            Some(trips) if go_on => trips,
            _ => {
                control.tools.settle();
                answers.extend(answer);
                sink.usage = usage;
                return Groups {
                    last: Some((sink, status)),
                    answers,
                    wait_failure: None,
                };
            }
        };
        let answer = answer.unwrap_or_default();
        control.tools.expect(&calls);
        let waited = wait(&control, trips.timeout).await;
        let missing = match &waited {
            Ok(()) => "no result",
            Err(Waited::Cancelled) => "the turn was cancelled before this call had its result",
            Err(Waited::TimedOut) => "no result within server.tool_timeout_secs",
        };
        let results = control.tools.finish(missing);
        for message in std::iter::once(&answer).chain(&results) {
            trips.messages_json.push(message);
        }
        trips.messages.push(answer.clone());
        trips.messages.extend(results.iter().cloned());
        answers.push(answer);
        answers.extend(results);
        match waited {
            Ok(()) => {}
            Err(stopped) => {
                sink.usage = usage;
                let (status, failure) = match stopped {
                    // Stopped by the host (its deadline, a lost lease): failed.
                    Waited::Cancelled => match control.failure() {
                        Some(failure) => (Status::Failed, Some(failure)),
                        None => (Status::Cancelled, None),
                    },
                    Waited::TimedOut => (
                        Status::Failed,
                        Some(Failure {
                            code: "tool_timeout",
                            message: format!(
                                "the client sent no result for every tool call within {} s \
                                 (server.tool_timeout_secs)",
                                trips.timeout.as_secs()
                            ),
                        }),
                    ),
                };
                return Groups {
                    last: Some((sink, status)),
                    answers,
                    wait_failure: failure,
                };
            }
        }
        let parts = RequestRef {
            session_id: trips.session_id,
            interaction_id: trips.interaction_id,
            backend: model.name(),
            messages: &trips.messages,
            params: trips.params,
        };
        let request = trips.shape.request(parts, &mut trips.messages_json);
        control.tools.collect();
        generated = generate(frames, model.clone(), request, sink.next_group()).await;
    }
}

/// Why a wait for tool results ended early.
enum Waited {
    Cancelled,
    TimedOut,
}

/// Waits until every call has its result, the turn is stopped, or
/// `timeout` passes.
async fn wait(control: &TurnControl, timeout: Duration) -> Result<(), Waited> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if control.is_cancelled() {
            return Err(Waited::Cancelled);
        }
        tokio::select! {
            () = control.tools.all_arrived() => return Ok(()),
            () = control.stopped.notified() => {}
            () = tokio::time::sleep_until(deadline) => return Err(Waited::TimedOut),
        }
    }
}

/// The usage of two groups together.
fn add_usage(total: Option<Usage>, group: Option<Usage>) -> Option<Usage> {
    match (total, group) {
        (Some(a), Some(b)) => Some(Usage {
            input_tokens: a.input_tokens + b.input_tokens,
            output_tokens: a.output_tokens + b.output_tokens,
            total_tokens: a.total_tokens + b.total_tokens,
        }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
#[path = "rounds_tests.rs"]
mod tests;
