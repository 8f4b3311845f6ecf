//! Tool round trips through the whole turn, with fakes: groups, their
//! frames' numbers, what is saved, and the ways a wait ends.

use std::sync::Arc;
use std::time::Duration;

use llm_host_plugin_api::{ToolSpec, TurnParams};

use crate::core::fakes::{Client, FakeModel, FakeStore};
use crate::core::locks::SessionLocks;
use crate::core::sink::{Status, TurnControl};
use crate::core::tools::Refused;
use crate::core::turn::{self, Report};
use crate::core::Prompt;

fn prompt(text: &str, round_trips: bool) -> Prompt {
    let tool = |name: &str| ToolSpec {
        name: name.to_owned(),
        ..ToolSpec::default()
    };
    Prompt {
        id: None,
        text: text.to_owned(),
        model: None,
        params: Box::new(TurnParams {
            tools: vec![tool("lookup"), tool("weather")],
            ..TurnParams::default()
        }),
        round_trips,
    }
}

/// Delivers `result` for `call_id` once the turn waits for it.
async fn deliver(control: &TurnControl, call_id: &str, result: Result<&str, &str>) {
    let outcome = result.map(str::to_owned).map_err(str::to_owned);
    loop {
        match control.tools.deliver(call_id, outcome.clone()) {
            Ok(()) => return,
            Err(Refused::NotWaiting | Refused::UnknownCall) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(Refused::Twice) => panic!("{call_id} delivered twice"),
        }
    }
}

async fn run(client: &Client, prompt: Prompt, control: Arc<TurnControl>) -> Report {
    let locks = SessionLocks::default();
    let model = Arc::new(FakeModel::new(Duration::ZERO));
    turn::run(&client.scope(), &locks, model, prompt, control).await
}

/// The stored messages of session `s` as "role: content" (tool calls as
/// their ids).
fn stored(store: &FakeStore) -> Vec<String> {
    let doc = store.doc("s").expect("stored");
    doc["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let calls: Vec<&str> = m["toolCalls"]
                .as_array()
                .map(|calls| calls.iter().filter_map(|c| c["id"].as_str()).collect())
                .unwrap_or_default();
            let content = m["content"].as_str().unwrap_or_default();
            match (m["role"].as_str().unwrap_or_default(), calls.is_empty()) {
                (role, false) => format!("{role}: calls {}", calls.join(" ")),
                ("tool", _) => format!(
                    "tool {}: {content}",
                    m["toolCallId"].as_str().unwrap_or_default()
                ),
                (role, true) => format!("{role}: {content}"),
            }
        })
        .collect()
}

// A client answers each call the moment it sees the group end calling
// tools (before the turn has gone on to wait): every result is taken, and
// the turn goes on at once. (They were refused `NotWaiting`, and the turn
// waited for results that had been thrown away until its tool timeout.)
#[tokio::test]
async fn results_sent_as_soon_as_the_group_ends_are_taken() {
    let store = FakeStore::new(true);
    let client = Client::new("host-1", &store, "s", "");
    let control = Arc::new(TurnControl::default());
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let (control, answers, calls) = (control.clone(), answers.clone(), calls.clone());
        *client.frames.on_frame.lock().expect("lock") = Some(Box::new(move |frame| {
            let event = &frame["data"]["event"];
            if let Some(id) = event["toolCall"]["id"].as_str() {
                calls.lock().expect("lock").push(id.to_owned());
            }
            if event["type"] == "end" && event["finishReason"] == "tool-calls" {
                for id in calls.lock().expect("lock").drain(..) {
                    let taken = control.tools.deliver(&id, Ok(format!("answer to {id}")));
                    answers.lock().expect("lock").push((id, taken));
                }
            }
        }));
    }
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        run(&client, prompt("plan my day", true), control),
    )
    .await
    .expect("the turn went on without waiting for its tool timeout");
    assert_eq!(
        report.status,
        Status::Completed,
        "{:?}",
        client.frames.all()
    );
    let answers = answers.lock().expect("lock").clone();
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert!(
        answers.iter().all(|(_, taken)| taken.is_ok()),
        "{answers:?}"
    );
}

#[tokio::test]
async fn two_calls_in_a_group_and_two_groups_in_one_turn() {
    let store = FakeStore::new(true);
    let client = Client::new("host-1", &store, "s", "");
    let control = Arc::new(TurnControl::default());
    let answering = async {
        deliver(&control, "call-1-1", Ok("cold")).await;
        deliver(&control, "call-1-0", Ok("found")).await;
        deliver(&control, "call-4-0", Err("offline")).await;
        deliver(&control, "call-4-1", Ok("rain")).await;
    };
    let (report, ()) = tokio::join!(
        run(&client, prompt("plan my day", true), control.clone()),
        answering
    );
    assert_eq!(
        report.status,
        Status::Completed,
        "{:?}",
        client.frames.all()
    );
    assert_eq!(client.frames.text(), "echo: found cold error: offline rain");
    assert_eq!(
        stored(&store),
        [
            "user: plan my day",
            "assistant: calls call-1-0 call-1-1",
            "tool call-1-0: found",
            "tool call-1-1: cold",
            "assistant: calls call-4-0 call-4-1",
            "tool call-4-0: error: offline",
            "tool call-4-1: rain",
            "assistant: echo: found cold error: offline rain",
        ]
    );
    // Three model groups, numbered on without a gap, one end frame last.
    let frames = client.frames.all();
    let starts = frames
        .iter()
        .filter(|f| f["data"]["event"]["type"] == "start")
        .count();
    assert_eq!(starts, 3);
    let sequences = client.frames.turn_sequences();
    let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
    assert_eq!(sequences, expected);
    let ends: Vec<_> = frames
        .iter()
        .filter(|f| f["name"] == "interaction.turn")
        .collect();
    assert_eq!(ends.len(), 1);
    assert_eq!(frames.last(), ends.last().copied());
    // The next turn starts after them, and calls with fresh ids.
    let next = Arc::new(TurnControl::default());
    let answering = async {
        deliver(&next, "call-9-0", Ok("a")).await;
        deliver(&next, "call-9-1", Ok("b")).await;
        deliver(&next, "call-12-0", Ok("c")).await;
        deliver(&next, "call-12-1", Ok("d")).await;
    };
    let (report, ()) = tokio::join!(run(&client, prompt("again", true), next.clone()), answering);
    assert_eq!(report.status, Status::Completed);
    assert_eq!(stored(&store).len(), 16);
}

#[tokio::test]
async fn a_cancel_while_waiting_ends_the_turn_and_saves_every_call_answered() {
    let store = FakeStore::new(true);
    let client = Client::new("host-1", &store, "s", "");
    let control = Arc::new(TurnControl::default());
    let cancelling = async {
        deliver(&control, "call-1-0", Ok("found")).await;
        control.cancel();
    };
    let (report, ()) = tokio::join!(
        run(&client, prompt("plan", true), control.clone()),
        cancelling
    );
    assert_eq!(report.status, Status::Cancelled);
    let saved = stored(&store);
    assert_eq!(saved[2], "tool call-1-0: found");
    assert!(
        saved[3].starts_with("tool call-1-1: error: the turn was cancelled"),
        "{saved:?}"
    );
    assert_eq!(saved.len(), 4);
    assert_eq!(
        control.tools.deliver("call-1-1", Ok("late".into())),
        Err(Refused::NotWaiting)
    );
}

#[tokio::test(start_paused = true)]
async fn results_that_never_come_fail_the_turn_after_the_tool_timeout() {
    let store = FakeStore::new(true);
    let client = Client::new("host-1", &store, "s", "");
    let mut scope = client.scope();
    scope.settings.tool_timeout = Duration::from_secs(30);
    let locks = SessionLocks::default();
    let model = Arc::new(FakeModel::new(Duration::ZERO));
    let report = turn::run(&scope, &locks, model, prompt("plan", true), Arc::default()).await;
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.code.as_deref(), Some("tool_timeout"));
    assert!(client.frames.codes().contains(&"tool_timeout".to_owned()));
    let saved = stored(&store);
    assert_eq!(saved.len(), 4, "{saved:?}");
    assert!(saved[3].contains("no result within server.tool_timeout_secs"));
}

#[tokio::test]
async fn a_client_that_cannot_answer_gets_the_calls_and_the_turn_ends() {
    let store = FakeStore::new(true);
    let client = Client::new("host-1", &store, "s", "");
    let report = run(&client, prompt("plan", false), Arc::default()).await;
    assert_eq!(report.status, Status::Completed);
    assert_eq!(report.finish_reason, Some("tool-calls"));
    assert_eq!(
        stored(&store),
        ["user: plan", "assistant: calls call-1-0 call-1-1"]
    );
}
