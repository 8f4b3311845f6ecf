//! History policies (`[models.NAME] history`, README.md): how much of a
//! session's history a backend is sent. The stored history stays whole; a
//! policy only shapes the model request (see [`super::request`]).
//!
//! - `truncate` drops the oldest messages first until the request is within
//!   `max_messages` and `max_tokens`, always keeping system messages and
//!   never splitting a tool exchange (an assistant message with tool calls
//!   and the tool results after it go or stay together). The prompt itself
//!   is always sent, even when it alone is over the limits.
//! - `summarize` cuts the same way (counting one more message: the
//!   summary), and sends in place of the dropped part a system message with
//!   a summary of it, asked of the `summarizer` backend. The summary is kept
//!   with the session ([`HistorySummary`]) and asked again only when more
//!   must be dropped (then of the old summary and the newly dropped
//!   messages). When the summarizer fails the turn goes on truncated.
//!
//! Tokens are estimated, not counted: a message is its text's bytes
//! (content, reasoning, tool call names and arguments) divided by 4, rounded
//! up ([`estimate_tokens`]); the session's system prompt counts as a message
//! like any other, the summary as one message of no tokens.

use std::sync::Arc;
use std::time::Instant;

use llm_host_plugin_api::{Message, Role, TurnParams};
use serde::{Deserialize, Serialize};

use super::generate::{generate, RequestRef};
use super::ports::{Frames, Model};
use super::sink::{Status, TurnControl, TurnSink};

/// How a policy shortens what a backend is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Drop the oldest messages.
    Truncate,
    /// Drop the oldest messages and send a summary of them instead.
    Summarize,
}

/// A backend's history policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryPolicy {
    /// The most messages a request holds (system messages included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<usize>,
    /// The most tokens a request's messages hold, estimated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// What is done with the messages over the limits.
    pub strategy: Strategy,
    /// `summarize`: the backend asked for summaries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summarizer: Option<String>,
}

/// A summary of a session's oldest messages, kept with the session.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HistorySummary {
    /// How many of the history's first messages it stands for (system
    /// messages among them are sent all the same).
    pub messages: usize,
    /// The summary.
    pub text: String,
}

/// What the summary message a request carries says, before the summary.
pub const SUMMARY_PREFIX: &str = "Summary of the earlier conversation:";

/// The instructions the summarizer is sent, before the transcript.
pub const SUMMARIZER_SYSTEM: &str = "Summarize the conversation the user gives for whoever \
     continues it: keep names, facts, decisions and open questions. Answer with the summary only.";

/// The estimated tokens of `message`: the bytes of its text (content,
/// reasoning, tool call names and arguments) divided by 4, rounded up.
pub fn estimate_tokens(message: &Message) -> u64 {
    let calls: usize = message
        .tool_calls
        .iter()
        .map(|call| call.name.len() + call.arguments.len())
        .sum();
    let bytes = message.content.len() + message.reasoning.as_ref().map_or(0, String::len) + calls;
    (bytes as u64).div_ceil(4)
}

/// Where a policy cuts a history, and what is then sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cut {
    /// The history's first `at` messages are not sent (system messages
    /// among them are).
    pub at: usize,
    /// Messages not sent (not counting system messages, which always are).
    pub dropped: usize,
    /// Messages sent: the head, the history's, and a summary's place.
    pub sent: usize,
    /// Their estimated tokens.
    pub tokens: u64,
}

/// Where `policy` cuts `messages` (the history, the prompt last), with
/// `head` (count, tokens) sent before the history. The cut is at least
/// `min` (where a kept summary ends) when that is a place it may be.
pub fn cut(messages: &[Message], policy: &HistoryPolicy, head: (usize, u64), min: usize) -> Cut {
    let n = messages.len();
    let slot = usize::from(policy.strategy == Strategy::Summarize);
    let fits = |sent: usize, tokens: u64| {
        policy.max_messages.is_none_or(|max| sent <= max)
            && policy.max_tokens.is_none_or(|max| tokens <= max)
    };
    let min = if min < n && valid_cut(messages, min) {
        min
    } else {
        0
    };
    let mut sent = head.0 + n;
    let mut tokens = head.1 + messages.iter().map(estimate_tokens).sum::<u64>();
    let whole = Cut {
        at: 0,
        dropped: 0,
        sent,
        tokens,
    };
    if min == 0 && fits(sent, tokens) {
        return whole;
    }
    let mut dropped = 0;
    let mut last = whole;
    for at in 1..n {
        let leaving = &messages[at - 1];
        if leaving.role != Role::System {
            sent -= 1;
            tokens -= estimate_tokens(leaving);
            dropped += 1;
        }
        if !valid_cut(messages, at) {
            continue;
        }
        last = Cut {
            at,
            dropped,
            sent: sent + slot,
            tokens,
        };
        if at >= min && fits(sent + slot, tokens) {
            return last;
        }
    }
    last
}

/// Whether the history may be cut before `messages[at]`: not between a
/// tool call and its results.
fn valid_cut(messages: &[Message], at: usize) -> bool {
    messages.get(at).is_some_and(|m| m.role != Role::Tool)
}

/// The text a summarizer is asked to summarize: the summary so far, then
/// each message of `messages` that is not a system message, a line (or
/// more) each: `ROLE: TEXT`, tool calls as `assistant called NAME(ARGS)`.
pub fn transcript(previous: Option<&str>, messages: &[Message]) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    if let Some(previous) = previous {
        let _ = writeln!(text, "{SUMMARY_PREFIX} {previous}");
    }
    for message in messages.iter().filter(|m| m.role != Role::System) {
        let role = match message.role {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            _ => "other",
        };
        if !message.content.is_empty() || message.tool_calls.is_empty() {
            let _ = writeln!(text, "{role}: {}", message.content);
        }
        for call in &message.tool_calls {
            let _ = writeln!(text, "{role} called {}({})", call.name, call.arguments);
        }
    }
    text
}

/// Asks `summarizer` for a summary of `transcript` (in at most
/// `max_tokens` tokens), through the model port and no client: its frames
/// are dropped. Answers the summary, or why there is none.
pub(super) async fn summarize<M: Model>(
    summarizer: Arc<M>,
    session_id: &str,
    interaction_id: &str,
    transcript: String,
    max_tokens: Option<u64>,
    control: &Arc<TurnControl>,
) -> Result<String, String> {
    let messages = [
        Message::new(Role::System, SUMMARIZER_SYSTEM),
        Message::new(Role::User, transcript),
    ];
    let params = TurnParams {
        max_tokens,
        ..TurnParams::default()
    };
    let request = serde_json::to_string(&RequestRef {
        session_id,
        interaction_id,
        backend: summarizer.name(),
        messages: &messages,
        params: &params,
    });
    let framer = crate::protocol::Framer {
        envelope: crate::protocol::Envelope::Flat,
    };
    let sink = TurnSink::new(
        framer,
        control.clone(),
        format!("{interaction_id}-summary"),
        0,
        u64::MAX,
        Instant::now(),
    );
    let name = summarizer.name().to_owned();
    match generate(&Nowhere, summarizer, request, sink).await {
        Some((mut sink, Status::Completed)) => match sink.assistant_message() {
            Some(answer) if !answer.content.trim().is_empty() => Ok(answer.content),
            _ => Err(format!("summarizer `{name}` answered nothing")),
        },
        Some((sink, status)) => Err(format!(
            "summarizer `{name}` ended {}{}",
            status.as_str(),
            sink.error_code
                .as_deref()
                .map(|code| format!(" ({code})"))
                .unwrap_or_default()
        )),
        None => Err(format!("summarizer `{name}` did not finish")),
    }
}

/// Frames no one reads: a summarizer's.
struct Nowhere;

impl Frames for Nowhere {
    async fn send_numbered(&self, frames: &mut Vec<bytes::Bytes>, _through: u64) -> bool {
        frames.clear();
        true
    }

    async fn send_stamped(&self, _make: impl FnOnce(u64) -> bytes::Bytes + Send) -> bool {
        true
    }
}

#[cfg(test)]
#[path = "history_tests.rs"]
mod tests;
