//! Tool round trips: when a model group of a turn ends calling tools, the
//! turn waits for the client's result of each call (a `tool_result`
//! command), then runs the next group with them.
//!
//! [`ToolResults`] is where the results meet the waiting turn: the
//! connection delivers what the client sends, the turn waits until every
//! call has its result. A client may answer a call as soon as it sees it,
//! before the turn has gone on to wait: while a group of a turn with round
//! trips runs, each call it makes is announced as its frame is made, and a
//! result for it is kept for the wait. A result for a call the turn did not
//! make, a second result for one call, or any result while no turn waits
//! or collects changes nothing and is answered with why ([`Refused`]).

use std::sync::Mutex;

use llm_host_plugin_api::{Message, Role, ToolCall};
use tokio::sync::Notify;

/// What a tool gave: its text, or why it failed.
pub type Outcome = Result<String, String>;

/// Why a tool result was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No turn waits for tool results.
    NotWaiting,
    /// The waiting turn made no call with this id.
    UnknownCall,
    /// This call has its result already.
    Twice,
}

impl Refused {
    /// What the client is told.
    pub fn message(self, call_id: &str) -> String {
        match self {
            Refused::NotWaiting => {
                format!(
                    "no turn is waiting for tool results; the result for `{call_id}` was ignored"
                )
            }
            Refused::UnknownCall => {
                format!("the running turn made no tool call `{call_id}`; the result was ignored")
            }
            Refused::Twice => {
                format!("tool call `{call_id}` has its result already; this one was ignored")
            }
        }
    }
}

/// The calls a turn waits on, each with its result once it came.
type Waiting = Vec<(ToolCall, Option<Outcome>)>;

/// The calls a turn waits on, and the results that came.
#[derive(Default, Debug)]
pub struct ToolResults {
    state: Mutex<State>,
    arrived: Notify,
}

#[derive(Default, Debug)]
struct State {
    /// The calls of the group that ended, once the turn waits.
    waiting: Option<Waiting>,
    /// While a group runs (of a turn with round trips): the ids of the
    /// calls it made so far, each with a result that came early.
    early: Option<Vec<(String, Option<Outcome>)>>,
}

impl ToolResults {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the client's `outcome` for call `call_id`.
    pub fn deliver(&self, call_id: &str, outcome: Outcome) -> Result<(), Refused> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let slot = match (&mut state.waiting, &mut state.early) {
            (Some(calls), _) => calls
                .iter_mut()
                .find(|(call, _)| call.id == call_id)
                .map(|(_, slot)| slot),
            (None, Some(made)) => made
                .iter_mut()
                .find(|(id, _)| id == call_id)
                .map(|(_, slot)| slot),
            (None, None) => return Err(Refused::NotWaiting),
        };
        let slot = slot.ok_or(Refused::UnknownCall)?;
        if slot.is_some() {
            return Err(Refused::Twice);
        }
        *slot = Some(outcome);
        drop(guard);
        self.arrived.notify_one();
        Ok(())
    }

    /// A group of a turn with round trips starts: its calls are announced
    /// as they are made, and results for them kept until the wait.
    pub(super) fn collect(&self) {
        self.lock().early = Some(Vec::new());
    }

    /// The running group made call `call_id` (its frame is not sent yet);
    /// nothing unless the group [collects](Self::collect).
    pub(super) fn announce(&self, call_id: &str) {
        if let Some(made) = self.lock().early.as_mut() {
            made.push((call_id.to_owned(), None));
        }
    }

    /// The group ended without waiting: results that came early for it are
    /// dropped, and later ones refused.
    pub(super) fn settle(&self) {
        self.lock().early = None;
    }

    /// Starts waiting for the results of `calls`, with those that came
    /// while their group ran.
    pub(super) fn expect(&self, calls: &[ToolCall]) {
        let mut state = self.lock();
        let mut early = state.early.take().unwrap_or_default();
        let slots = calls
            .iter()
            .map(|call| {
                let came = early
                    .iter_mut()
                    .find(|(id, _)| *id == call.id)
                    .and_then(|(_, outcome)| outcome.take());
                (call.clone(), came)
            })
            .collect();
        state.waiting = Some(slots);
    }

    /// Waits until every expected call has its result.
    pub(super) async fn all_arrived(&self) {
        loop {
            let arrived = self.arrived.notified();
            {
                let state = self.lock();
                let done = state
                    .waiting
                    .as_ref()
                    .is_none_or(|calls| calls.iter().all(|(_, slot)| slot.is_some()));
                if done {
                    return;
                }
            }
            arrived.await;
        }
    }

    /// Stops waiting; answers a `tool` message per expected call, in the
    /// order the model made them: the client's result, or for a call
    /// without one, `missing` (so the history a later turn sends holds a
    /// result for every call, as providers require).
    pub(super) fn finish(&self, missing: &str) -> Vec<Message> {
        let calls = {
            let mut state = self.lock();
            state.early = None;
            state.waiting.take().unwrap_or_default()
        };
        calls
            .into_iter()
            .map(|(call, outcome)| {
                let content = match outcome {
                    Some(Ok(content)) => content,
                    Some(Err(error)) => format!("error: {error}"),
                    None => format!("error: {missing}"),
                };
                Message {
                    tool_call_id: Some(call.id),
                    ..Message::new(Role::Tool, content)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.to_owned(),
            name: "lookup".to_owned(),
            arguments: "{}".to_owned(),
        }
    }

    #[tokio::test]
    async fn results_are_taken_once_each_for_the_calls_waited_on() {
        let results = ToolResults::default();
        assert_eq!(
            results.deliver("a", Ok("x".into())),
            Err(Refused::NotWaiting)
        );
        results.expect(&[call("a"), call("b")]);
        assert_eq!(
            results.deliver("c", Ok("x".into())),
            Err(Refused::UnknownCall)
        );
        assert_eq!(results.deliver("b", Err("down".into())), Ok(()));
        assert_eq!(
            results.deliver("b", Ok("again".into())),
            Err(Refused::Twice)
        );
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), results.all_arrived());
        assert!(waiting.await.is_err(), "a is still missing");
        assert_eq!(results.deliver("a", Ok("found".into())), Ok(()));
        results.all_arrived().await;
        let messages = results.finish("unused");
        let shown: Vec<_> = messages
            .iter()
            .map(|m| (m.tool_call_id.as_deref(), m.content.as_str(), m.role))
            .collect();
        assert_eq!(
            shown,
            [
                (Some("a"), "found", Role::Tool),
                (Some("b"), "error: down", Role::Tool)
            ]
        );
        assert_eq!(
            results.deliver("a", Ok("late".into())),
            Err(Refused::NotWaiting)
        );
    }

    #[tokio::test]
    async fn calls_without_a_result_are_answered_as_missing() {
        let results = ToolResults::default();
        results.expect(&[call("a"), call("b")]);
        results.deliver("b", Ok("fine".into())).expect("taken");
        let messages = results.finish("the turn was cancelled");
        assert_eq!(messages[0].content, "error: the turn was cancelled");
        assert_eq!(messages[1].content, "fine");
    }
}
