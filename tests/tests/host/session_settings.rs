//! Session settings (`session.update`) and history policies
//! (`[models.NAME] history`) through the real binary. The echo backend
//! reports as input tokens the words of every message it was sent, which
//! shows exactly what reached the model.

use llm_host_tests::{json, words, Client, Config, Frame, Host};
use serde_json::Value;

use crate::common::{assert_echo_turn, stored, stored_messages};

/// The default config plus `limited` (maxTokens at most 10), `trunc`
/// (truncating to three messages), `summ` (summarizing down to three,
/// by `sum`) and `sum`; prompts of at most 64 bytes.
fn config() -> Config {
    let mut config = Config {
        server_extra: "max_prompt_bytes = 64".to_owned(),
        ..Config::default()
    };
    for (name, settings) in [
        ("limited", "{ delay_ms = 0 }\nmax_tokens_limit = 10"),
        ("trunc", "{ delay_ms = 0 }\nhistory = { max_messages = 3 }"),
        (
            "summ",
            "{ delay_ms = 0 }\nhistory = { max_messages = 3, strategy = \"summarize\", \
             summarizer = \"sum\" }",
        ),
        ("sum", "{ delay_ms = 0 }"),
    ] {
        config.models.push((name.to_owned(), settings.to_owned()));
    }
    config
}

/// A command-mode socket on `path`, and its announcement.
async fn connect(host: &Host, path: &str) -> (Client, Frame) {
    let mut client = host.connect_command(path).await;
    let open = client.next_json().await;
    assert_eq!(open.name(), "interaction.session", "{}", open.text);
    (client, open)
}

/// Sends a `session.update` with the fields of `fields`; answers the next
/// frame.
async fn update(client: &mut Client, fields: Value) -> Frame {
    update_later(client, fields).await;
    client.next_json().await
}

/// Sends a `session.update` with the fields of `fields`.
async fn update_later(client: &mut Client, fields: Value) {
    let mut command = json!({"type": "session.update"});
    for (key, value) in fields.as_object().expect("an object") {
        command[key] = value.clone();
    }
    client.send_json(&command).await;
}

fn prompt(text: &str) -> Value {
    json!({"type": "prompt", "text": text})
}

// Settings are answered, applied to later turns (the system prompt first,
// the default parameters), kept with the session and announced when it is
// resumed; the stored history has no system message.
#[tokio::test]
async fn settings_are_answered_applied_kept_and_announced() {
    let host = Host::start(&config());
    let (mut client, open) = connect(&host, "/v1/ws?session=settings-1").await;
    assert!(open.event().get("settings").is_none(), "{}", open.text);
    let updated = update(
        &mut client,
        json!({"system": "Be brief now.", "params": {"maxTokens": 100}}),
    )
    .await;
    assert_eq!(updated.name(), "interaction.session", "{}", updated.text);
    assert_eq!(updated.event_type(), "updated");
    assert_eq!(
        updated.event()["settings"],
        json!({"system": "Be brief now.", "params": {"maxTokens": 100}})
    );

    client.send_json(&prompt("one two")).await;
    let turn = client.read_turn().await;
    let system = words("Be brief now.");
    assert_echo_turn(&turn, "one two", system + 2, "turn-1");
    // maxTokens 3 (the prompt's) wins over the session's 100.
    client
        .send_json(&json!({"type": "prompt", "text": "a b c d e", "params": {"maxTokens": 3}}))
        .await;
    let turn = client.read_turn().await;
    assert_eq!(turn.finish_reason(), Some("length"), "{}", turn.dump());
    assert_eq!(
        stored_messages(&host, "settings-1").await,
        [
            "user: one two",
            "assistant: echo: one two",
            "user: a b c d e",
            "assistant: echo: a b"
        ]
    );
    client.close().await;

    let (mut client, open) = connect(&host, "/v1/ws?session=settings-1").await;
    assert_eq!(
        open.event()["settings"],
        json!({"system": "Be brief now.", "params": {"maxTokens": 100}}),
        "{}",
        open.text
    );
    // Cleared with null; left out: kept.
    let updated = update(&mut client, json!({"system": null})).await;
    assert_eq!(
        updated.event()["settings"],
        json!({"params": {"maxTokens": 100}})
    );
    client.send_json(&prompt("six")).await;
    let history = words("one two echo: one two a b c d e echo: a b");
    assert_echo_turn(&client.read_turn().await, "six", history + 1, "turn-3");
}

// The session's backend runs later turns whose prompt names none, and is
// announced; a prompt naming one runs on it.
#[tokio::test]
async fn the_sessions_backend_runs_later_turns() {
    let host = Host::start(&config());
    let (mut client, _) = connect(&host, "/v1/ws?session=settings-2").await;
    let updated = update(&mut client, json!({"model": "short"})).await;
    assert_eq!(updated.event()["settings"], json!({"model": "short"}));
    client.send_json(&prompt("hello")).await;
    let turn = client.read_turn().await;
    assert_eq!(turn.text(), "token0 token1 token2", "{}", turn.dump());
    client
        .send_json(&json!({"type": "prompt", "text": "hi", "model": "echo"}))
        .await;
    assert_eq!(client.read_turn().await.text(), "echo: hi");
    client.close().await;

    let (_client, open) = connect(&host, "/v1/ws?session=settings-2").await;
    assert_eq!(open.event()["model"], "short", "{}", open.text);
}

// Bad values get an error diagnostic and change nothing; an update that
// changes nothing makes no session.
#[tokio::test]
async fn bad_updates_change_nothing() {
    let host = Host::start(&config());
    let (mut client, _) = connect(&host, "/v1/ws?session=settings-3").await;
    for (bad, code) in [
        (json!({"model": "gpt"}), "unknown_model"),
        (json!({"system": "x".repeat(65)}), "prompt_too_long"),
        (
            json!({"model": "limited", "params": {"maxTokens": 50}}),
            "max_tokens_too_large",
        ),
        (json!({"system": 5}), "bad_frame"),
        (json!({"params": {"tools": [["lookup"]]}}), "bad_frame"),
        (json!({"text": "hi"}), "bad_frame"),
    ] {
        let frame = update(&mut client, bad.clone()).await;
        assert_eq!(frame.diagnostic_code(), code, "{bad}: {}", frame.text);
        assert_eq!(frame.entry()["level"], "error", "{}", frame.text);
    }
    let answer = update(&mut client, json!({})).await;
    assert_eq!(answer.event_type(), "updated", "{}", answer.text);
    assert_eq!(answer.event()["settings"], json!({}));
    let reply = llm_host_tests::http(host.addr(), "GET", "/v1/sessions/settings-3").await;
    assert_eq!(reply.status, 404, "nothing was saved: {}", reply.body);

    // Within the limits: taken.
    let answer = update(
        &mut client,
        json!({"model": "limited", "params": {"maxTokens": 10}, "system": "x".repeat(64)}),
    )
    .await;
    assert_eq!(answer.event_type(), "updated", "{}", answer.text);
}

// An update sent while a turn runs is answered after it and applies from
// the next turn.
#[tokio::test]
async fn an_update_during_a_turn_applies_from_the_next() {
    let host = Host::start(&config());
    let (mut client, _) = connect(&host, "/v1/ws?session=settings-4&model=slow_echo").await;
    client.send_json(&prompt("a b c d e")).await;
    update_later(&mut client, json!({"system": "S", "model": "echo"})).await;
    let turn = client.read_turn().await;
    assert_eq!(turn.input_tokens(), Some(5), "{}", turn.dump());
    let updated = client.next_json().await;
    assert_eq!(updated.event_type(), "updated", "{}", updated.text);
    client.send_json(&prompt("f")).await;
    let history = words("S a b c d e echo: a b c d e f");
    assert_echo_turn(&client.read_turn().await, "f", history, "turn-2");
}

// Truncation: the oldest messages are not sent (the input tokens show it),
// the client is told, and the stored history stays whole.
#[tokio::test]
async fn a_truncating_backend_is_sent_the_newest_messages() {
    let host = Host::start(&config());
    let (mut client, _) = connect(&host, "/v1/ws?session=history-t&model=trunc").await;
    for (text, tokens) in [("one", 1), ("two", 1 + 2 + 1)] {
        client.send_json(&prompt(text)).await;
        let turn = client.read_turn().await;
        assert_echo_turn(&turn, text, tokens, turn.interaction_id());
        assert!(turn.diagnostics().is_empty(), "{}", turn.dump());
    }
    client.send_json(&prompt("three")).await;
    let turn = client.read_turn().await;
    assert_echo_turn(&turn, "three", words("two echo: two three"), "turn-3");
    let told = turn.diagnostics();
    assert_eq!(told.len(), 1, "{}", turn.dump());
    assert_eq!(told[0].diagnostic_code(), "history_truncated");
    assert_eq!(told[0].entry()["level"], "info");
    assert_eq!(told[0].entry()["data"]["dropped"], 2);
    assert_eq!(told[0].entry()["data"]["sent"], 3);
    assert_eq!(stored_messages(&host, "history-t").await.len(), 6);
}

// Summaries: the summarizer (echo: deterministic) is asked for a summary
// of what is cut, which is sent in its place; it is asked again only when
// more must be cut.
#[tokio::test]
async fn a_summarizing_backend_is_sent_a_summary() {
    let host = Host::start(&config());
    let (mut client, _) = connect(&host, "/v1/ws?session=history-s&model=summ").await;
    for text in ["one", "two"] {
        client.send_json(&prompt(text)).await;
        client.read_turn().await;
    }
    client.send_json(&prompt("three")).await;
    let turn = client.read_turn().await;
    let summary =
        "Summary of the earlier conversation: echo: user: one assistant: echo: one user: two";
    assert_echo_turn(
        &turn,
        "three",
        words(summary) + words("echo: two three"),
        "turn-3",
    );
    let told = turn.diagnostics();
    assert_eq!(told.len(), 1, "{}", turn.dump());
    assert_eq!(told[0].diagnostic_code(), "history_summarized");
    assert_eq!(told[0].entry()["data"]["fresh"], true);
    assert_eq!(told[0].entry()["data"]["dropped"], 3);

    // The next turn cuts two more: a new summary, of the old one and them.
    client.send_json(&prompt("four")).await;
    let turn = client.read_turn().await;
    let again = format!(
        "Summary of the earlier conversation: echo: {summary} assistant: echo: two user: three"
    );
    assert_echo_turn(
        &turn,
        "four",
        words(&again) + words("echo: three four"),
        "turn-4",
    );
    assert_eq!(turn.diagnostics()[0].entry()["data"]["fresh"], true);
    assert_eq!(stored_messages(&host, "history-s").await.len(), 8);
}

// `GET /v1/sessions/{id}` shows the session's settings and its history
// summary as they are kept, and neither when the session has none.
#[tokio::test]
async fn the_stored_session_shows_its_settings_and_summary() {
    let host = Host::start(&config());
    let (mut client, _) = connect(&host, "/v1/ws?session=shown-1&model=summ").await;
    client.send_json(&prompt("one")).await;
    client.read_turn().await;
    let plain = stored(&host, "shown-1").await;
    assert_eq!(plain["turns"], 1, "{plain}");
    for absent in ["settings", "summary"] {
        assert!(plain.get(absent).is_none(), "{absent}: {plain}");
    }

    for text in ["two", "three"] {
        client.send_json(&prompt(text)).await;
        client.read_turn().await;
    }
    let summarized = stored(&host, "shown-1").await;
    assert!(summarized.get("settings").is_none(), "{summarized}");
    assert_eq!(
        summarized["summary"],
        json!({"messages": 3, "text": "echo: user: one assistant: echo: one user: two"}),
        "{summarized}"
    );

    let settings = json!({"system": "Be brief.", "model": "echo",
                          "params": {"maxTokens": 100, "temperature": 0.5}});
    let updated = update(&mut client, settings.clone()).await;
    assert_eq!(updated.event()["settings"], settings, "{}", updated.text);
    let shown = stored(&host, "shown-1").await;
    assert_eq!(shown["settings"], settings, "{shown}");
    assert_eq!(shown["summary"], summarized["summary"], "{shown}");
    assert_eq!(shown["messages"], summarized["messages"], "{shown}");

    // A session whose settings are cleared again shows none.
    update(
        &mut client,
        json!({"system": null, "model": null, "params": null}),
    )
    .await;
    let cleared = stored(&host, "shown-1").await;
    assert!(cleared.get("settings").is_none(), "{cleared}");
    assert_eq!(cleared["summary"]["messages"], 3, "{cleared}");
}
