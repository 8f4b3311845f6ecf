//! A turn's model requests: the history as stored, or shaped by the
//! session's settings (a system prompt at the head, [`super::settings`]) and
//! by the backend's history policy (the oldest messages cut, a summary in
//! their place, [`super::history`]).
//!
//! Without a policy the request is written as before, the history's JSON
//! text spliced in as it is kept (a system prompt is written in front of
//! it). With one that cuts, the request lists the messages it sends
//! (O(history), no message copied); a summary to ask for first copies the
//! messages that are sent, since the claim is kept meanwhile.

use std::sync::Arc;

use llm_host_plugin_api::{Message, Role, TurnParams};
use serde::Serialize;

use super::document::MessagesJson;
use super::generate::RequestRef;
use super::history::{self, Cut, HistoryPolicy, HistorySummary, Strategy, SUMMARY_PREFIX};
use super::ports::{Frames, Model, SessionStore};
use super::sink::TurnControl;
use super::Scope;

/// How a turn's requests are made from its history.
#[derive(Debug, Clone, Default)]
pub(super) struct Shape {
    /// The session's system prompt, sent first.
    pub system: Option<Message>,
    /// The summary sent in place of the messages cut.
    pub summary: Option<Message>,
    /// The history's first `cut` messages are not sent, except its system
    /// messages.
    pub cut: usize,
}

impl Shape {
    /// The request for `parts`, whose messages `json` is the text of.
    pub fn request(
        &self,
        parts: RequestRef<'_>,
        json: &mut MessagesJson,
    ) -> serde_json::Result<String> {
        if self.cut == 0 && self.summary.is_none() {
            return parts.to_json_headed(json, self.system.as_ref());
        }
        let history = parts.messages;
        let cut = self.cut.min(history.len());
        let messages: Vec<&Message> = self
            .system
            .iter()
            .chain(history[..cut].iter().filter(|m| m.role == Role::System))
            .chain(self.summary.iter())
            .chain(&history[cut..])
            .collect();
        serde_json::to_string(&Listed {
            session_id: parts.session_id,
            interaction_id: parts.interaction_id,
            backend: parts.backend,
            messages,
            params: parts.params,
        })
    }
}

/// A model request listing the messages it sends (as [`RequestRef`]).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Listed<'a> {
    session_id: &'a str,
    interaction_id: &'a str,
    backend: &'a str,
    messages: Vec<&'a Message>,
    params: &'a TurnParams,
}

/// The summary message sent in place of the messages cut.
pub(super) fn summary_message(text: &str) -> Message {
    Message::new(Role::System, format!("{SUMMARY_PREFIX} {text}"))
}

/// A turn's first request, shaped.
pub(super) struct Prepared<M> {
    /// How the turn's later requests (tool round trips) are made; a
    /// summary asked for first is added to it.
    pub shape: Shape,
    /// The first request, or the summary to ask for before it.
    pub first: First<M>,
    /// What the policy cut, if it cut anything.
    pub cut: Option<Cut>,
}

/// The first request of a turn.
pub(super) enum First<M> {
    /// Written.
    Ready(serde_json::Result<String>),
    /// Written once a summary is had.
    Summarize(Box<SummaryJob<M>>),
}

/// A summary to ask for before the first request.
pub(super) struct SummaryJob<M> {
    /// The backend to ask; none when it is not configured.
    summarizer: Option<Arc<M>>,
    /// Its name.
    name: String,
    /// What to summarize.
    transcript: String,
    /// The messages the summary will stand for.
    covers: usize,
    /// The most tokens the summary may take.
    max_tokens: Option<u64>,
    /// The messages sent: the system messages of the part cut, then the
    /// rest of the history.
    sent: Vec<Message>,
    /// How many of `sent` are of the part cut.
    kept_system: usize,
}

/// Shapes the turn's first request from `parts` (whose messages `json` is
/// the text of): `system` first, and `policy` applied with the session's
/// `kept` summary and `summarizer` (looked up by name).
pub(super) fn prepare<M>(
    parts: RequestRef<'_>,
    json: &mut MessagesJson,
    system: Option<Message>,
    policy: Option<&HistoryPolicy>,
    kept: Option<&HistorySummary>,
    summarizer: impl FnOnce(&str) -> Option<Arc<M>>,
) -> Prepared<M> {
    let head = system
        .as_ref()
        .map_or((0, 0), |m| (1, history::estimate_tokens(m)));
    let summarizes = policy.is_some_and(|p| p.strategy == Strategy::Summarize);
    let min = kept.filter(|_| summarizes).map_or(0, |s| s.messages);
    let cut = policy.map(|policy| history::cut(parts.messages, policy, head, min));
    let Some((cut, policy)) = cut.filter(|cut| cut.at > 0).zip(policy) else {
        let shape = Shape {
            system,
            ..Shape::default()
        };
        let first = First::Ready(shape.request(parts, json));
        return Prepared {
            shape,
            first,
            cut: None,
        };
    };
    let mut shape = Shape {
        system,
        summary: None,
        cut: cut.at,
    };
    let kept = kept.filter(|s| summarizes && s.messages <= cut.at);
    if summarizes && kept.is_none_or(|s| s.messages < cut.at) {
        let name = policy.summarizer.clone().unwrap_or_default();
        let from = kept.map_or(0, |s| s.messages);
        let messages = parts.messages;
        let job = SummaryJob {
            summarizer: summarizer(&name),
            name,
            transcript: history::transcript(kept.map(|s| s.text.as_str()), &messages[from..cut.at]),
            covers: cut.at,
            max_tokens: policy.max_tokens.map(|max| (max / 4).max(16)),
            sent: messages[..cut.at]
                .iter()
                .filter(|m| m.role == Role::System)
                .chain(&messages[cut.at..])
                .cloned()
                .collect(),
            kept_system: messages[..cut.at]
                .iter()
                .filter(|m| m.role == Role::System)
                .count(),
        };
        return Prepared {
            shape,
            first: First::Summarize(Box::new(job)),
            cut: Some(cut),
        };
    }
    shape.summary = kept.map(|s| summary_message(&s.text));
    let first = First::Ready(shape.request(parts, json));
    Prepared {
        shape,
        first,
        cut: Some(cut),
    }
}

/// The first request once its summary, if it needs one, is had; with the
/// summary to keep with the session when one was asked for.
pub(super) async fn first_request<S: SessionStore, M: Model, F: Frames>(
    scope: &Scope<'_, S, F>,
    prepared: &mut Prepared<M>,
    parts: RequestRef<'_>,
    control: &Arc<TurnControl>,
) -> (serde_json::Result<String>, Option<HistorySummary>) {
    let first = std::mem::replace(&mut prepared.first, First::Ready(Ok(String::new())));
    let job = match first {
        First::Ready(request) => {
            if let Some(cut) = prepared.cut {
                tell(scope, &prepared.shape, cut, None, None).await;
            }
            return (request, None);
        }
        First::Summarize(job) => job,
    };
    let SummaryJob {
        summarizer,
        name,
        transcript,
        covers,
        max_tokens,
        sent,
        kept_system,
    } = *job;
    let summary = match summarizer {
        None => Err(format!("summarizer `{name}` is not configured")),
        Some(model) => {
            history::summarize(
                model,
                parts.session_id,
                parts.interaction_id,
                transcript,
                max_tokens,
                control,
            )
            .await
        }
    };
    let (kept, failure) = match summary {
        Ok(text) => {
            prepared.shape.summary = Some(summary_message(&text));
            (
                Some(HistorySummary {
                    messages: covers,
                    text,
                }),
                None,
            )
        }
        Err(why) => (None, Some(why)),
    };
    // The messages sent, with the part cut's system messages first.
    let shape = Shape {
        cut: kept_system,
        ..prepared.shape.clone()
    };
    let request = shape.request(
        RequestRef {
            messages: &sent,
            ..parts
        },
        &mut MessagesJson::default(),
    );
    if let Some(cut) = prepared.cut {
        tell(scope, &prepared.shape, cut, Some(kept.is_some()), failure).await;
    }
    (request, kept)
}

/// Tells the client what the policy cut for this turn: `history_truncated`
/// (warn when a summary was wanted and could not be had) or
/// `history_summarized` (`fresh`: the summary was asked for this turn).
async fn tell<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    shape: &Shape,
    cut: Cut,
    fresh: Option<bool>,
    failure: Option<String>,
) {
    let summarized = shape.summary.is_some();
    // A cut made with room for a summary that was not had sends one less.
    let sent = cut.sent - usize::from(failure.is_some());
    let (level, code, message) = match (summarized, &failure) {
        (true, _) => (
            "info",
            "history_summarized",
            format!(
                "the backend's history policy sent a summary in place of the {} oldest \
                 messages ({} messages sent)",
                cut.dropped, sent
            ),
        ),
        (false, None) => (
            "info",
            "history_truncated",
            format!(
                "the backend's history policy left out the {} oldest messages ({} messages \
                 sent)",
                cut.dropped, sent
            ),
        ),
        (false, Some(why)) => (
            "warn",
            "history_truncated",
            format!(
                "no summary ({why}); the backend's history policy left out the {} oldest \
                 messages ({} messages sent)",
                cut.dropped, sent
            ),
        ),
    };
    let mut data = serde_json::json!({
        "code": code,
        "dropped": cut.dropped,
        "sent": sent,
        "estimatedTokens": cut.tokens,
    });
    if summarized {
        data["fresh"] = fresh.unwrap_or(false).into();
    }
    let entry = crate::protocol::DiagnosticEntry {
        level,
        kind: "host",
        message: &message,
        data: Some(data),
    };
    let framer = scope.framer;
    scope
        .frames
        .send_stamped(|sequence| {
            let meta = crate::protocol::Meta::now(sequence, crate::protocol::SOURCE_HOST, None);
            bytes::Bytes::from(framer.diagnostic(&entry, &meta))
        })
        .await;
}
