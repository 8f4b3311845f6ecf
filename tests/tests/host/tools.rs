//! Client-executed tool round trips (command mode): a model group that ends
//! calling tools makes the turn wait for a `tool_result` per call, then the
//! model runs again with the calls and their results, all in one turn.
//!
//! Here with echo (`call_tools`); `tools/providers.rs` runs the same round
//! trips through the OpenAI, Anthropic and Ollama plugins.

use std::time::{Duration, Instant};

use llm_host_tests::{json, Client, Config, Frame, Host, Turn};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{assert_contiguous, stored};

#[path = "tools/providers.rs"]
mod providers;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The default config plus backend `tools`: echo calling every declared
/// tool, two rounds per prompt.
fn echo_config(server_extra: &str) -> Config {
    let mut config = Config {
        server_extra: server_extra.to_owned(),
        ..Config::default()
    };
    config.models.push((
        "tools".to_owned(),
        "{ call_tools = true, tool_rounds = 2 }".to_owned(),
    ));
    config
}

/// The tools every prompt here declares.
fn tools() -> Value {
    json!([
        {"name": "lookup", "description": "Looks a word up",
         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
        {"name": "search", "description": "Searches the web",
         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    ])
}

fn prompt(text: &str) -> Value {
    json!({"type": "prompt", "id": "p-1", "text": text, "params": {"tools": tools()}})
}

fn result(call_id: &str, content: &str) -> Value {
    json!({"type": "tool_result", "callId": call_id, "content": content})
}

fn failure(call_id: &str, error: &str) -> Value {
    json!({"type": "tool_result", "callId": call_id, "error": error})
}

/// A command-mode socket on session `session` and backend `model`, past
/// its announcement.
async fn connect(host: &Host, session: &str, model: &str) -> Client {
    let mut client = host
        .connect_command(&format!("/v1/ws?session={session}&model={model}"))
        .await;
    let open = client.next_json().await;
    assert_eq!(open.name(), "interaction.session", "{}", open.text);
    client
}

/// Reads one model group into `frames`, up to its model `end` or `error`
/// (or the turn's end); answers the group's `toolCall`s.
async fn read_group(client: &mut Client, frames: &mut Vec<Frame>) -> Vec<Value> {
    let mut calls = Vec::new();
    loop {
        let frame = client.next_json().await;
        let model = frame.name() == "interaction.model";
        if let Some(call) = frame.event().get("toolCall").filter(|_| model) {
            calls.push(call.clone());
        }
        let done = frame.is_turn_end() || (model && matches!(frame.event_type(), "end" | "error"));
        frames.push(frame);
        if done {
            return calls;
        }
    }
}

/// Reads the turn's end frame into `frames`, and the whole turn.
async fn read_end(client: &mut Client, mut frames: Vec<Frame>) -> Turn {
    let end = client.next_json().await;
    assert!(end.is_turn_end(), "the turn ends here: {}", end.text);
    frames.push(end);
    Turn { frames }
}

fn ids(calls: &[Value]) -> Vec<&str> {
    calls.iter().filter_map(|c| c["id"].as_str()).collect()
}

/// The next frame, which must be a `bad_tool_result` diagnostic.
async fn expect_bad_tool_result(client: &mut Client, call_id: &str) -> Frame {
    let frame = client.next_json().await;
    assert!(frame.is_diagnostic(), "a diagnostic: {}", frame.text);
    assert_eq!(frame.diagnostic_code(), "bad_tool_result", "{}", frame.text);
    assert_eq!(frame.entry()["level"], "error", "{}", frame.text);
    assert_eq!(frame.entry()["kind"], "protocol", "{}", frame.text);
    let message = frame.entry()["message"].as_str().unwrap_or_default();
    assert!(message.contains(call_id), "{}", frame.text);
    frame
}

/// A stored session's messages, one line each: `user: TEXT`,
/// `assistant: calls ID ID`, `tool ID: TEXT`.
fn history(session: &Value) -> Vec<String> {
    let messages = session["messages"].as_array().cloned().unwrap_or_default();
    messages
        .iter()
        .map(|m| {
            let content = m["content"].as_str().unwrap_or_default();
            let calls = m["toolCalls"].as_array().map(|calls| {
                let ids: Vec<&str> = calls.iter().filter_map(|c| c["id"].as_str()).collect();
                ids.join(" ")
            });
            match (m["role"].as_str().unwrap_or_default(), calls) {
                (role, Some(calls)) => format!("{role}: calls {calls}"),
                ("tool", None) => format!(
                    "tool {}: {content}",
                    m["toolCallId"].as_str().unwrap_or_default()
                ),
                (role, None) => format!("{role}: {content}"),
            }
        })
        .collect()
}

/// The model frames of `type_` in `turn`.
fn model_events<'a>(turn: &'a Turn, type_: &str) -> Vec<&'a Value> {
    turn.model_frames()
        .into_iter()
        .filter(|f| f.event_type() == type_)
        .map(Frame::event)
        .collect()
}

// ---------------------------------------------------------------------------
// echo
// ---------------------------------------------------------------------------

// Two rounds of two calls, one answered with an error: one turn, three
// model groups numbered on from each other, one end; the history holds
// every call and result in the calls' order.
#[tokio::test]
async fn two_rounds_of_tool_calls_run_in_one_turn_and_are_stored() {
    let host = Host::start(&echo_config(""));
    let mut client = connect(&host, "tools-1", "tools").await;
    client.send_json(&prompt("find it")).await;

    let mut frames = Vec::new();
    let calls = read_group(&mut client, &mut frames).await;
    let arguments = r#"{"prompt":"find it"}"#;
    assert_eq!(
        calls,
        [
            json!({"id": "call_1_0", "name": "lookup", "arguments": arguments}),
            json!({"id": "call_1_1", "name": "search", "arguments": arguments}),
        ]
    );
    // Answered in the other order: stored in the calls' order.
    client
        .send_json(&failure("call_1_1", "search is down"))
        .await;
    client.send_json(&result("call_1_0", "red apple")).await;
    let calls = read_group(&mut client, &mut frames).await;
    assert_eq!(ids(&calls), ["call_4_0", "call_4_1"]);
    client.send_json(&result("call_4_0", "green pear")).await;
    client.send_json(&result("call_4_1", "blue plum")).await;
    let calls = read_group(&mut client, &mut frames).await;
    assert!(calls.is_empty(), "{calls:?}");
    let turn = read_end(&mut client, frames).await;
    let dump = turn.dump();

    assert_eq!(
        turn.text(),
        "echo: find it red apple error: search is down green pear blue plum",
        "{dump}"
    );
    assert_eq!(turn.status(), "completed", "{dump}");
    assert_eq!(turn.interaction_id(), "turn-1", "{dump}");
    assert_eq!(turn.end().event()["promptId"], "p-1", "{dump}");
    assert!(turn.diagnostics().is_empty(), "{dump}");
    assert_eq!(model_events(&turn, "start").len(), 3, "{dump}");
    let finishes: Vec<&Value> = model_events(&turn, "end")
        .into_iter()
        .map(|end| &end["finishReason"])
        .collect();
    assert_eq!(finishes, ["tool-calls", "tool-calls", "stop"], "{dump}");
    let last = assert_contiguous(&turn, 1);
    let ends = turn.frames.iter().filter(|f| f.is_turn_end()).count();
    assert_eq!(ends, 1, "{dump}");
    // Nothing more of the turn follows its end: the next frame answers a cancel.
    client.send_json(&json!({"type": "cancel"})).await;
    let next = client.next_json().await;
    assert_eq!(next.diagnostic_code(), "nothing_to_cancel", "{}", next.text);
    assert_eq!(next.sequence(), last, "{}", next.text);

    let session = stored(&host, "tools-1").await;
    assert_eq!(
        history(&session),
        [
            "user: find it",
            "assistant: calls call_1_0 call_1_1",
            "tool call_1_0: red apple",
            "tool call_1_1: error: search is down",
            "assistant: calls call_4_0 call_4_1",
            "tool call_4_0: green pear",
            "tool call_4_1: blue plum",
            "assistant: echo: find it red apple error: search is down green pear blue plum",
        ],
        "{session}"
    );
    let call = &session["messages"][1]["toolCalls"][0];
    assert_eq!(call["name"], "lookup", "{session}");
    assert_eq!(call["arguments"], arguments, "{session}");
    assert_eq!(session["lastSequence"], last, "{session}");
}

// Results for no call the turn waits on, a second result for one call,
// and results while no turn runs are answered `bad_tool_result` and change
// nothing: the turn goes on with the first results.
#[tokio::test]
async fn bad_tool_results_are_refused_and_change_nothing() {
    let host = Host::start(&echo_config(""));
    let mut client = connect(&host, "tools-2", "tools").await;
    // No turn yet.
    client.send_json(&result("call_1_0", "early")).await;
    let early = expect_bad_tool_result(&mut client, "call_1_0").await;
    assert_eq!(early.sequence(), 0, "takes no number: {}", early.text);

    client.send_json(&prompt("find it")).await;
    let mut frames = Vec::new();
    let calls = read_group(&mut client, &mut frames).await;
    assert_eq!(ids(&calls), ["call_1_0", "call_1_1"]);
    client.send_json(&result("call_9_9", "WRONG unknown")).await;
    frames.push(expect_bad_tool_result(&mut client, "call_9_9").await);
    client.send_json(&result("call_1_0", "red apple")).await;
    client.send_json(&failure("call_1_0", "WRONG twice")).await;
    frames.push(expect_bad_tool_result(&mut client, "call_1_0").await);
    client.send_json(&result("call_1_0", "WRONG again")).await;
    frames.push(expect_bad_tool_result(&mut client, "call_1_0").await);
    client.send_json(&result("call_1_1", "blue plum")).await;

    let calls = read_group(&mut client, &mut frames).await;
    assert_eq!(ids(&calls), ["call_4_0", "call_4_1"]);
    // A call of the round before is no call of this one.
    client.send_json(&result("call_1_1", "WRONG stale")).await;
    frames.push(expect_bad_tool_result(&mut client, "call_1_1").await);
    client.send_json(&result("call_4_0", "green")).await;
    client.send_json(&result("call_4_1", "pear")).await;
    read_group(&mut client, &mut frames).await;
    let turn = read_end(&mut client, frames).await;
    let dump = turn.dump();
    assert_eq!(turn.status(), "completed", "{dump}");
    assert_eq!(
        turn.text(),
        "echo: find it red apple blue plum green pear",
        "{dump}"
    );
    assert_eq!(turn.diagnostics().len(), 4, "{dump}");
    let last = assert_contiguous(&turn, 1);
    // The diagnostics take no number: each carries the last one sent.
    let mut sent = 0;
    for frame in &turn.frames {
        if frame.is_diagnostic() {
            assert_eq!(frame.sequence(), sent, "{dump}");
        }
        sent = frame.sequence();
    }

    // After the turn.
    client.send_json(&result("call_4_0", "late")).await;
    let late = expect_bad_tool_result(&mut client, "call_4_0").await;
    assert_eq!(late.sequence(), last, "takes no number: {}", late.text);
    let session = stored(&host, "tools-2").await;
    assert_eq!(
        history(&session),
        [
            "user: find it",
            "assistant: calls call_1_0 call_1_1",
            "tool call_1_0: red apple",
            "tool call_1_1: blue plum",
            "assistant: calls call_4_0 call_4_1",
            "tool call_4_0: green",
            "tool call_4_1: pear",
            "assistant: echo: find it red apple blue plum green pear",
        ],
        "{session}"
    );
    assert_eq!(session["lastSequence"], last, "{session}");
}

// A cancel while the turn waits ends it `cancelled`; every call keeps a
// result in the history (an error for those without one), and the
// session goes on.
#[tokio::test]
async fn a_cancel_while_waiting_ends_the_turn_with_error_results() {
    let host = Host::start(&echo_config(""));
    let mut client = connect(&host, "tools-3", "tools").await;
    client.send_json(&prompt("find it")).await;
    let mut frames = Vec::new();
    let calls = read_group(&mut client, &mut frames).await;
    assert_eq!(ids(&calls), ["call_1_0", "call_1_1"]);
    client.send_json(&result("call_1_0", "red apple")).await;
    client.send_json(&json!({"type": "cancel"})).await;
    let turn = read_end(&mut client, frames).await;
    let dump = turn.dump();
    assert_eq!(turn.status(), "cancelled", "{dump}");
    assert_eq!(turn.end().event()["promptId"], "p-1", "{dump}");
    assert_eq!(model_events(&turn, "start").len(), 1, "{dump}");
    let last = assert_contiguous(&turn, 1);

    let session = stored(&host, "tools-3").await;
    let lines = history(&session);
    assert_eq!(
        lines[..3],
        [
            "user: find it",
            "assistant: calls call_1_0 call_1_1",
            "tool call_1_0: red apple",
        ],
        "{session}"
    );
    assert_eq!(lines.len(), 4, "{session}");
    assert!(
        lines[3].starts_with("tool call_1_1: error: ") && lines[3].contains("cancelled"),
        "{session}"
    );
    assert_eq!(session["lastSequence"], last, "{session}");

    // The next prompt runs on that history.
    client
        .send_json(&json!({"type": "prompt", "text": "again"}))
        .await;
    let next = client.read_turn().await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
    assert_eq!(next.text(), "echo: again", "{}", next.dump());
    assert_contiguous(&next, last + 1);
}

// No results within server.tool_timeout_secs: the turn fails with
// `tool_timeout`, and the calls are stored with error results.
#[tokio::test]
async fn no_results_within_the_tool_timeout_fail_the_turn() {
    let host = Host::start(&echo_config("tool_timeout_secs = 1"));
    let mut client = connect(&host, "tools-4", "tools").await;
    let started = Instant::now();
    client.send_json(&prompt("find it")).await;
    let turn = client.read_turn().await;
    let took = started.elapsed();
    let dump = turn.dump();
    assert_eq!(turn.status(), "failed", "{dump}");
    assert_eq!(turn.finish_reason(), Some("tool-calls"), "{dump}");
    let codes: Vec<&str> = turn
        .diagnostics()
        .iter()
        .map(|d| d.diagnostic_code())
        .collect();
    assert_eq!(codes, ["tool_timeout"], "{dump}");
    let diagnostic = turn.diagnostics()[0].entry();
    assert_eq!(diagnostic["level"], "error", "{dump}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_contiguous(&turn, 1);

    let session = stored(&host, "tools-4").await;
    let lines = history(&session);
    assert_eq!(lines.len(), 4, "{session}");
    for (line, id) in lines[2..].iter().zip(["call_1_0", "call_1_1"]) {
        assert!(
            line.starts_with(&format!("tool {id}: error: ")) && line.contains("tool_timeout_secs"),
            "{session}"
        );
    }
    // A result that comes too late is refused.
    client.send_json(&result("call_1_0", "late")).await;
    expect_bad_tool_result(&mut client, "call_1_0").await;
}

// Outside command mode there are no round trips: a plain-mode prompt
// declares no tools (echo answers at once), and an OpenAI-API request with
// tools gets the calls back after one group, without waiting.
#[tokio::test]
async fn outside_command_mode_a_turn_is_one_group() {
    let host = Host::start(&echo_config(""));
    let mut client = host.connect("/v1/ws?session=tools-5&model=tools").await;
    client.next_json().await;
    client.send_text("find it").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "echo: find it", "{}", turn.dump());
    assert_eq!(model_events(&turn, "start").len(), 1, "{}", turn.dump());

    let started = Instant::now();
    let body = json!({
        "model": "tools",
        "messages": [{"role": "user", "content": "find it"}],
        "tools": [
            {"type": "function", "function": {"name": "lookup"}},
            {"type": "function", "function": {"name": "search"}},
        ],
    });
    let (status, answer) = post_json(&host, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it did not wait"
    );
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = calls
        .iter()
        .filter_map(|c| c["function"]["name"].as_str())
        .collect();
    assert_eq!(names, ["lookup", "search"], "{answer}");
}

/// POSTs `body` as JSON and answers the status and the JSON body.
async fn post_json(host: &Host, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        host.addr(),
        body.len()
    );
    let exchange = async {
        let mut stream = TcpStream::connect(host.addr()).await.expect("connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        String::from_utf8_lossy(&raw).into_owned()
    };
    let raw = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("an answer within 20 s");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    let json = serde_json::from_str(body).unwrap_or_else(|err| panic!("{err}: {raw}"));
    (status, json)
}
