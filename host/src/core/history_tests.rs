//! History policies: where they cut, and what turns with one send, with
//! the core's fakes. The stored history always stays whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use llm_host_plugin_api::{Message, Role, ToolCall};
use serde_json::Value;

use super::*;
use crate::core::fakes::{prompt, Client, FakeBackends, FakeModel, FakeStore};
use crate::core::locks::SessionLocks;
use crate::core::sink::Status;

fn policy(
    strategy: Strategy,
    max_messages: Option<usize>,
    max_tokens: Option<u64>,
) -> HistoryPolicy {
    HistoryPolicy {
        max_messages,
        max_tokens,
        strategy,
        summarizer: (strategy == Strategy::Summarize).then(|| "sum".to_owned()),
    }
}

/// A system message, two exchanges (the second calling two tools), a prompt.
fn history() -> Vec<Message> {
    let call = |id: &str| ToolCall {
        id: id.to_owned(),
        name: "lookup".to_owned(),
        arguments: "{}".to_owned(),
    };
    let result = |id: &str| Message {
        tool_call_id: Some(id.to_owned()),
        ..Message::new(Role::Tool, "found it")
    };
    vec![
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "one"),
        Message::new(Role::Assistant, "echo: one"),
        Message::new(Role::User, "two"),
        Message {
            tool_calls: vec![call("c1"), call("c2")],
            ..Message::new(Role::Assistant, "")
        },
        result("c1"),
        result("c2"),
        Message::new(Role::Assistant, "echo: two"),
        Message::new(Role::User, "three"),
    ]
}

#[test]
fn tokens_are_bytes_over_four_rounded_up() {
    assert_eq!(estimate_tokens(&Message::new(Role::User, "")), 0);
    assert_eq!(estimate_tokens(&Message::new(Role::User, "abcd")), 1);
    assert_eq!(estimate_tokens(&Message::new(Role::User, "abcde")), 2);
    let calls = &history()[4];
    assert_eq!(estimate_tokens(calls), 4, "two calls of `lookup` `{{}}`");
}

#[test]
fn truncation_keeps_system_messages_and_whole_tool_exchanges() {
    let messages = history();
    let at = |max_messages, strategy| {
        cut(
            &messages,
            &policy(strategy, Some(max_messages), None),
            (0, 0),
            0,
        )
    };
    assert_eq!(
        at(9, Strategy::Truncate).at,
        0,
        "within the limit: nothing cut"
    );
    // Six: the system message, then from the tool call on.
    let six = at(6, Strategy::Truncate);
    assert_eq!((six.at, six.dropped, six.sent), (4, 3, 6));
    // Four or five would split the tool exchange: it goes whole.
    for max in [4, 5] {
        let cut = at(max, Strategy::Truncate);
        assert_eq!((cut.at, cut.dropped, cut.sent), (7, 6, 3), "{max}");
    }
    // A summary counts as a message.
    let cut = at(6, Strategy::Summarize);
    assert_eq!((cut.at, cut.sent), (7, 4));
    // The system message and the prompt are sent even over the limit.
    let one = at(1, Strategy::Truncate);
    assert_eq!((one.at, one.dropped, one.sent), (8, 7, 2));
    // A head (the session's system prompt) counts.
    let head = super::cut(
        &messages,
        &policy(Strategy::Truncate, Some(6), None),
        (1, 3),
        0,
    );
    assert_eq!((head.at, head.sent), (7, 4));
}

#[test]
fn tokens_limit_and_a_kept_summary() {
    let messages = history();
    let tokens: Vec<u64> = messages.iter().map(estimate_tokens).collect();
    let all: u64 = tokens.iter().sum();
    let whole = cut(
        &messages,
        &policy(Strategy::Truncate, None, Some(all)),
        (0, 0),
        0,
    );
    assert_eq!((whole.at, whole.tokens), (0, all));
    let less = cut(
        &messages,
        &policy(Strategy::Truncate, None, Some(all - 1)),
        (0, 0),
        0,
    );
    assert_eq!(less.at, 2, "`one` alone is enough");
    assert_eq!(less.tokens, all - tokens[1]);
    // A kept summary's end is the least cut, when it is a place to cut.
    let loose = policy(Strategy::Summarize, Some(100), None);
    assert_eq!(cut(&messages, &loose, (0, 0), 3).at, 3);
    assert_eq!(
        cut(&messages, &loose, (0, 0), 5).at,
        0,
        "not inside a tool exchange"
    );
    assert_eq!(
        cut(&messages, &loose, (0, 0), 40).at,
        0,
        "not past the history"
    );
}

#[test]
fn transcripts() {
    let messages = history();
    assert_eq!(
        transcript(Some("They met."), &messages[..8]),
        "Summary of the earlier conversation: They met.\nuser: one\nassistant: echo: one\n\
         user: two\nassistant called lookup({})\nassistant called lookup({})\n\
         tool: found it\ntool: found it\nassistant: echo: two\n"
    );
}

/// Backends `fake` (with `policy`) and `sum`.
fn fakes(policy: HistoryPolicy) -> (FakeBackends, Arc<FakeModel>, Arc<FakeModel>) {
    let fake = Arc::new(FakeModel::named("fake", Duration::ZERO));
    let sum = Arc::new(FakeModel::named("sum", Duration::ZERO));
    let backends = FakeBackends {
        models: vec![fake.clone(), sum.clone()],
        policies: HashMap::from([("fake".to_owned(), policy)]),
    };
    (backends, fake, sum)
}

/// The diagnostics a client was sent about history, as their data.
fn history_diagnostics(client: &Client) -> Vec<Value> {
    client
        .frames
        .all()
        .into_iter()
        .filter(|f| {
            f["data"]["entry"]["data"]["code"]
                .as_str()
                .is_some_and(|code| code.starts_with("history_"))
        })
        .map(|f| {
            let mut data = f["data"]["entry"]["data"].clone();
            data["level"] = f["data"]["entry"]["level"].clone();
            data
        })
        .collect()
}

async fn turns(client: &Client, backends: &FakeBackends, model: &Arc<FakeModel>, texts: &[&str]) {
    let locks = SessionLocks::default();
    for text in texts {
        let (report, _) = client
            .prompt_on(&locks, backends, model, prompt(text))
            .await;
        assert_eq!(report.status, Status::Completed, "{text}");
    }
}

// Truncation: the oldest messages are not sent, the client is told how
// many, and the stored history stays whole. Without a policy nothing is.
#[tokio::test(start_paused = true)]
async fn a_truncating_policy_cuts_the_request_not_the_history() {
    let store = FakeStore::new(false);
    let client = Client::new("host-1", &store, "s", "alice");
    let (backends, fake, _) = fakes(policy(Strategy::Truncate, Some(3), None));
    turns(&client, &backends, &fake, &["one", "two", "three"]).await;
    let sent = fake.sent();
    assert_eq!(sent[1], ["user: one", "assistant: echo: one", "user: two"]);
    assert_eq!(
        sent[2],
        ["user: two", "assistant: echo: two", "user: three"]
    );
    let told = history_diagnostics(&client);
    assert_eq!(told.len(), 1, "only the turn that was cut: {told:?}");
    assert_eq!(told[0]["code"], "history_truncated");
    assert_eq!(told[0]["level"], "info");
    assert_eq!(
        (told[0]["dropped"].as_u64(), told[0]["sent"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(store.messages("s").len(), 6, "the history stays whole");

    // The same turns without a policy send everything.
    let store = FakeStore::new(false);
    let client = Client::new("host-1", &store, "s", "alice");
    let (mut backends, fake, _) = fakes(policy(Strategy::Truncate, Some(3), None));
    backends.policies.clear();
    turns(&client, &backends, &fake, &["one", "two", "three"]).await;
    assert_eq!(fake.sent()[2].len(), 5);
    assert!(history_diagnostics(&client).is_empty());
}

// Summaries: asked of the summarizer for what is cut, sent as a system
// message in its place, kept with the session, asked again (of the old
// summary and what is newly cut) only when more must be cut.
#[tokio::test(start_paused = true)]
async fn a_summarizing_policy_keeps_its_summary() {
    let store = FakeStore::new(true);
    let client = Client::new("host-1", &store, "s", "alice");
    let (backends, fake, sum) = fakes(policy(Strategy::Summarize, Some(3), None));
    turns(&client, &backends, &fake, &["one", "two", "three"]).await;
    let first = "echo: user: one assistant: echo: one user: two";
    assert_eq!(
        sum.sent(),
        [[
            format!("system: {SUMMARIZER_SYSTEM}"),
            "user: user: one\nassistant: echo: one\nuser: two\n".to_owned()
        ]]
    );
    assert_eq!(
        fake.sent()[2],
        [
            format!("system: {SUMMARY_PREFIX} {first}"),
            "assistant: echo: two".to_owned(),
            "user: three".to_owned()
        ]
    );
    let doc = store.doc("s").expect("stored");
    assert_eq!(doc["summary"]["messages"], 3);
    assert_eq!(doc["summary"]["text"], first);
    assert_eq!(doc["messages"].as_array().map(Vec::len), Some(6));
    let told = history_diagnostics(&client);
    assert_eq!(told.len(), 1);
    assert_eq!(told[0]["code"], "history_summarized");
    assert_eq!(
        (told[0]["dropped"].as_u64(), told[0]["sent"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(told[0]["fresh"], true);

    // More must be cut: the old summary and the newly cut messages.
    turns(&client, &backends, &fake, &["four"]).await;
    let asked = sum.sent();
    assert_eq!(asked.len(), 2);
    assert_eq!(
        asked[1][1],
        format!("user: {SUMMARY_PREFIX} {first}\nassistant: echo: two\nuser: three\n")
    );
    assert_eq!(store.doc("s").expect("stored")["summary"]["messages"], 5);

    // A looser policy cuts where the summary ends, and asks for nothing.
    let (mut looser, _, _) = fakes(policy(Strategy::Summarize, Some(50), None));
    looser.models = vec![fake.clone(), sum.clone()];
    turns(&client, &looser, &fake, &["five"]).await;
    assert_eq!(sum.sent().len(), 2, "the kept summary is used");
    let last = fake.sent().pop().expect("sent");
    assert!(
        last[0].starts_with(&format!("system: {SUMMARY_PREFIX}")),
        "{last:?}"
    );
    assert_eq!(last.len(), 5, "{last:?}");
    let told = history_diagnostics(&client);
    assert_eq!(told.last().expect("told")["fresh"], false);
}

// A summarizer that cannot answer: the turn goes on truncated, the client
// is warned, and no summary is kept.
#[tokio::test(start_paused = true)]
async fn without_a_summary_the_turn_goes_on_truncated() {
    let store = FakeStore::new(false);
    let client = Client::new("host-1", &store, "s", "alice");
    let mut missing = policy(Strategy::Summarize, Some(3), None);
    missing.summarizer = Some("gone".to_owned());
    let (backends, fake, _) = fakes(missing);
    turns(&client, &backends, &fake, &["one", "two", "three"]).await;
    assert_eq!(fake.sent()[2], ["assistant: echo: two", "user: three"]);
    let told = history_diagnostics(&client);
    assert_eq!(told.len(), 1);
    assert_eq!(
        (told[0]["code"].as_str(), told[0]["level"].as_str()),
        (Some("history_truncated"), Some("warn"))
    );
    assert_eq!(told[0]["sent"], 2);
    assert!(store.doc("s").expect("stored").get("summary").is_none());
}

// Tool round trips: every group's request is made as the first was: the
// session's system prompt first, the same cut.
#[tokio::test(start_paused = true)]
async fn round_trips_keep_the_system_prompt_and_the_cut() {
    use crate::core::sink::TurnControl;
    use crate::core::tools::Refused;
    let store = FakeStore::new(false);
    let client = Client::new("host-1", &store, "s", "alice");
    let (backends, fake, _) = fakes(policy(Strategy::Truncate, Some(4), None));
    turns(&client, &backends, &fake, &["one", "two"]).await;
    let locks = SessionLocks::default();
    let system = crate::core::settings::SettingsUpdate {
        system: Some(Some("S".to_owned())),
        ..Default::default()
    };
    crate::core::settings::update(&client.scope(), &locks, &system)
        .await
        .expect("updated");
    let mut plan = prompt("plan");
    plan.round_trips = true;
    plan.params.tools = vec![llm_host_plugin_api::ToolSpec {
        name: "lookup".to_owned(),
        ..Default::default()
    }];
    let control = Arc::new(TurnControl::default());
    let deliver = async {
        for id in ["call-4-0", "call-6-0"] {
            loop {
                match control.tools.deliver(id, Ok(format!("found {id}"))) {
                    Ok(()) => break,
                    Err(Refused::NotWaiting | Refused::UnknownCall) => {
                        assert!(!control.has_ended(), "the turn ended before {id}");
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                    Err(Refused::Twice) => panic!("twice"),
                }
            }
        }
    };
    let scope = client.scope();
    let running = crate::core::turn::run_with(
        &scope,
        &locks,
        &backends,
        fake.clone(),
        plan,
        control.clone(),
    );
    let ((report, _), ()) = tokio::join!(running, deliver);
    assert_eq!(report.status, Status::Completed);
    let sent = fake.sent();
    assert_eq!(sent.len(), 5, "two turns, three groups");
    for request in &sent[2..] {
        assert_eq!(
            request[..3],
            ["system: S", "user: two", "assistant: echo: two"]
        );
    }
    assert_eq!(sent[4].len(), 1 + 3 + 2 * 2, "{:?}", sent[4]);
    assert_eq!(store.messages("s").len(), 4 + 1 + 4 + 1, "stored whole");
}
