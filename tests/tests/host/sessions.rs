//! Sessions and turns: history, resuming, queueing, cancelling.

use llm_host_tests::{http, json, words, Config, Host, Turn};

use crate::common::{
    assert_contiguous, assert_echo_turn, assert_session_open, stored_messages, Envelope,
};

// History reaches the model across turns and across a reconnect with ?session=, and turn ids continue.
#[tokio::test]
async fn history_persists_across_turns_and_reconnects() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=history-1").await;
    assert_session_open(&client.next_json().await, Envelope::Flat, false, "echo", 0);

    client.send_text("one two three").await;
    let turn = client.read_turn().await;
    let mut history = words("one two three");
    assert_echo_turn(&turn, "one two three", history, "turn-1");
    history += words("echo: one two three");

    client.send_text("four five").await;
    let turn = client.read_turn().await;
    history += words("four five");
    assert_echo_turn(&turn, "four five", history, "turn-2");
    history += words("echo: four five");
    let last = turn.end().sequence();
    client.close().await;

    let mut client = host.connect("/v1/ws?session=history-1").await;
    assert_session_open(
        &client.next_json().await,
        Envelope::Flat,
        true,
        "echo",
        last,
    );
    client.send_text("six").await;
    let turn = client.read_turn().await;
    history += words("six");
    assert_echo_turn(&turn, "six", history, "turn-3");
    assert_contiguous(&turn, last + 1);

    // Another session on the same host starts empty.
    let mut other = host.connect("/v1/ws?session=history-2").await;
    assert_session_open(&other.next_json().await, Envelope::Flat, false, "echo", 0);
    other.send_text("seven").await;
    assert_echo_turn(&other.read_turn().await, "seven", 1, "turn-1");
}

// A connection's next turn sees what another connection's turn added to the session in between.
#[tokio::test]
async fn turns_of_two_connections_take_turns_on_one_history() {
    let host = Host::start_default();
    let mut a = host.connect("/v1/ws?session=alternate-1").await;
    let mut b = host.connect("/v1/ws?session=alternate-1").await;
    a.next_json().await;
    b.next_json().await;

    // Each socket follows every turn of the session, whichever sent it.
    a.send_text("one two").await;
    let turn = a.read_turn().await;
    let mut history = words("one two");
    assert_echo_turn(&turn, "one two", history, "turn-1");
    assert_eq!(b.read_turn().await.sequences(), turn.sequences());
    history += words("echo: one two");

    b.send_text("three").await;
    let turn = b.read_turn().await;
    history += words("three");
    assert_echo_turn(&turn, "three", history, "turn-2");
    assert_eq!(a.read_turn().await.sequences(), turn.sequences());
    history += words("echo: three");
    let last = turn.end().sequence();

    // `a` saved the session one version ago: its copy is stale.
    a.send_text("four").await;
    let turn = a.read_turn().await;
    history += words("four");
    assert_echo_turn(&turn, "four", history, "turn-3");
    assert_contiguous(&turn, last + 1);
    assert_eq!(b.read_turn().await.sequences(), turn.sequences());
    let last = turn.end().sequence();

    b.send_text("five").await;
    let turn = b.read_turn().await;
    history += words("echo: four five");
    assert_echo_turn(&turn, "five", history, "turn-4");
    assert_contiguous(&turn, last + 1);
    assert_eq!(a.read_turn().await.sequences(), turn.sequences());
}

// A session deleted while a connection is open is not brought back by its next turn: that turn starts an empty history.
#[tokio::test]
async fn a_session_deleted_while_connected_starts_over() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=deleted-1").await;
    client.next_json().await;
    client.send_text("one two three").await;
    let turn = client.read_turn().await;
    assert_echo_turn(&turn, "one two three", 3, "turn-1");
    let last = turn.end().sequence();

    let reply = http(host.addr(), "DELETE", "/v1/sessions/deleted-1").await;
    assert_eq!(reply.status, 204, "{}", reply.body);

    client.send_text("four").await;
    let turn = client.read_turn().await;
    // Turn ids and sequence numbers go on: the connection already used them.
    assert_echo_turn(&turn, "four", 1, "turn-2");
    assert_contiguous(&turn, last + 1);
    assert_eq!(
        stored_messages(&host, "deleted-1").await,
        ["user: four", "assistant: echo: four"]
    );
}

// A session the store forgot (ttl_secs) while a connection stayed open is not brought back by its next turn.
#[tokio::test]
async fn a_session_expired_while_connected_starts_over() {
    let config = Config {
        store: "brief".to_owned(),
        extra: "\n[stores.brief]\nplugin = \"memory\"\nsettings = { ttl_secs = 1 }\n".to_owned(),
        ..Config::default()
    };
    let host = Host::start(&config);
    let mut client = host.connect("/v1/ws?session=expired-1").await;
    client.next_json().await;
    client.send_text("one two three").await;
    assert_echo_turn(&client.read_turn().await, "one two three", 3, "turn-1");

    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    client.send_text("four").await;
    assert_echo_turn(&client.read_turn().await, "four", 1, "turn-2");
    assert_eq!(
        stored_messages(&host, "expired-1").await,
        ["user: four", "assistant: echo: four"]
    );
}

// A reload that would replace the in-process store (new settings: a new, empty memory
// store) is refused and named: the sessions in memory, and the turn in flight, are kept.
#[tokio::test]
async fn a_reload_never_empties_the_memory_store() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=replaced-1").await;
    client.next_json().await;
    client.send_text("one two three").await;
    assert_echo_turn(&client.read_turn().await, "one two three", 3, "turn-1");

    let text = Config::default().to_toml().replace(
        "[stores.memory]\nplugin = \"memory\"\n",
        "[stores.memory]\nplugin = \"memory\"\nsettings = { ttl_secs = 3600 }\n",
    );
    host.workdir().write_config(&text);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let refused = loop {
        let status = http(host.addr(), "GET", "/v1/plugins").await.json();
        if let Some(message) = status["lastError"]["message"].as_str() {
            break message.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload was not refused; /v1/plugins: {status:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    assert!(
        refused.contains("stores.memory") && refused.contains("Restart the host"),
        "{refused}"
    );

    client.send_text("four").await;
    let history = words("one two three echo: one two three four");
    assert_echo_turn(&client.read_turn().await, "four", history, "turn-2");
    assert_eq!(
        stored_messages(&host, "replaced-1").await,
        [
            "user: one two three",
            "assistant: echo: one two three",
            "user: four",
            "assistant: echo: four"
        ]
    );
}

// A prompt sent while a turn runs is queued and runs after it, in order.
#[tokio::test]
async fn a_prompt_sent_during_a_turn_runs_after_it() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?model=slow_echo").await;
    client.next_json().await;

    client.send_text("first prompt here").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    // Turn 1 is streaming now (100 ms per word): this one has to wait.
    client.send_text("second prompt").await;
    frames.extend(client.read_turn().await.frames);
    let first = Turn { frames };
    let second = client.read_turn().await;

    assert!(first.diagnostics().is_empty(), "{}", first.dump());
    assert_echo_turn(&first, "first prompt here", 3, "turn-1");
    let history = words("first prompt here echo: first prompt here second prompt");
    assert_echo_turn(&second, "second prompt", history, "turn-2");
    let last = assert_contiguous(&first, 1);
    assert_contiguous(&second, last + 1);
}

// Past max_queued_prompts a prompt is refused with a queue_full diagnostic and never runs.
#[tokio::test]
async fn a_full_queue_refuses_prompts() {
    let host = Host::start(&Config {
        max_queued_prompts: 1,
        ..Config::default()
    });
    let mut client = host.connect("/v1/ws?model=slow_echo").await;
    client.next_json().await;

    client.send_text("running one two three").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    client.send_text("queued").await;
    client.send_text("refused").await;
    // The refused prompt's end (status `refused`) comes between the turns'
    // frames; it belongs to neither turn.
    let mut refused = Vec::new();
    let mut turns = Vec::new();
    while turns.len() < 2 {
        let turn = client.read_turn().await;
        frames.extend(turn.frames);
        let end = frames.pop().expect("a turn end");
        if end.event()["status"] == "refused" {
            refused.push(end);
            continue;
        }
        frames.push(end);
        turns.push(Turn {
            frames: std::mem::take(&mut frames),
        });
    }
    assert_eq!(refused.len(), 1, "one refused end");
    assert!(refused[0].event().get("interactionId").is_none());
    let second = turns.pop().expect("two turns");
    let first = turns.pop().expect("two turns");

    let diagnostics: Vec<_> = first
        .diagnostics()
        .into_iter()
        .chain(second.diagnostics())
        .collect();
    let dump = format!("{}\n---\n{}", first.dump(), second.dump());
    assert_eq!(diagnostics.len(), 1, "one prompt was refused:\n{dump}");
    assert_eq!(diagnostics[0].diagnostic_code(), "queue_full", "{dump}");
    assert_eq!(diagnostics[0].entry()["kind"], "protocol", "{dump}");
    assert_eq!(first.interaction_id(), "turn-1", "{dump}");
    assert_eq!(first.status(), "completed", "{dump}");
    assert_eq!(second.text(), "echo: queued", "{dump}");
    assert_eq!(second.interaction_id(), "turn-2", "{dump}");

    // The refused prompt never ran: the next turn is turn-3, with this prompt.
    client.send_text("later").await;
    let third = client.read_turn().await;
    assert_eq!(third.text(), "echo: later", "{}", third.dump());
    assert_eq!(third.interaction_id(), "turn-3", "{}", third.dump());
}

// {"type":"cancel"} stops the running turn: model end "cancelled", turn "cancelled", partial text kept.
#[tokio::test]
async fn cancel_stops_the_running_turn_and_keeps_its_text() {
    let host = Host::start_default();
    let mut client = host.connect_command("/v1/ws?model=slow").await;
    assert_session_open(&client.next_json().await, Envelope::Flat, false, "slow", 0);

    client
        .send_json(&json!({"type": "prompt", "text": "count"}))
        .await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    client.send_json(&json!({"type": "cancel"})).await;
    frames.extend(client.read_turn().await.frames);
    let cancelled = Turn { frames };
    let dump = cancelled.dump();

    assert_eq!(cancelled.status(), "cancelled", "{dump}");
    assert_eq!(cancelled.interaction_id(), "turn-1", "{dump}");
    assert_eq!(cancelled.finish_reason(), Some("cancelled"), "{dump}");
    assert_eq!(
        cancelled.model_types().last().copied(),
        Some("end"),
        "the model group ends with its end event:\n{dump}"
    );
    let partial = cancelled.text();
    assert!(
        words(&partial) < 100,
        "the backend stopped early (100 tokens unstopped):\n{dump}"
    );
    assert!(cancelled.diagnostics().is_empty(), "{dump}");
    let last = assert_contiguous(&cancelled, 1);

    // The connection goes on; the next turn's input holds the partial answer.
    client
        .send_json(&json!({"type": "prompt", "text": "after cancel", "model": "echo"}))
        .await;
    let turn = client.read_turn().await;
    let history = words("count") + words(&partial) + words("after cancel");
    assert_echo_turn(&turn, "after cancel", history, "turn-2");
    assert_contiguous(&turn, last + 1);
}

// A cancel with no running turn is answered with a warning and changes nothing.
#[tokio::test]
async fn cancel_without_a_turn_warns() {
    let host = Host::start_default();
    let mut client = host.connect_command("/v1/ws").await;
    client.next_json().await;

    client.send_json(&json!({"type": "cancel"})).await;
    let diagnostic = client.next_json().await;
    assert_eq!(
        diagnostic.name(),
        "interaction.diagnostic",
        "{}",
        diagnostic.text
    );
    assert_eq!(diagnostic.entry()["level"], "warn", "{}", diagnostic.text);
    assert_eq!(
        diagnostic.entry()["kind"],
        "protocol",
        "{}",
        diagnostic.text
    );
    assert_eq!(
        diagnostic.diagnostic_code(),
        "nothing_to_cancel",
        "{}",
        diagnostic.text
    );
    assert_eq!(diagnostic.sequence(), 0, "{}", diagnostic.text);

    client
        .send_json(&json!({"type": "prompt", "text": "still here"}))
        .await;
    let turn = client.read_turn().await;
    assert_echo_turn(&turn, "still here", 2, "turn-1");
    assert_contiguous(&turn, 1);
}

// With server.reconnect_grace_secs = 0, closing the socket mid-turn cancels
// it at once; resuming shows the turn counted and its text kept.
#[tokio::test]
async fn a_disconnect_mid_turn_cancels_it_and_the_session_resumes_after_it() {
    let host = Host::start(&Config {
        server_extra: "reconnect_grace_secs = 0\n".to_owned(),
        ..Config::default()
    });
    let mut client = host.connect("/v1/ws?session=drop-1&model=slow").await;
    client.next_json().await;
    client.send_text("count").await;
    let frames = client.read_until("interaction.model", "delta").await;
    let seen = frames.last().expect("a delta").sequence();
    client.close().await;

    // Resumed on `echo` by name: without it, the session would go on with
    // `slow`, the backend its last turn ran on.
    let mut client = host.connect("/v1/ws?session=drop-1&model=echo").await;
    let open = client.next_json().await;
    assert_eq!(open.event()["resumed"], true, "{}", open.text);
    let last = open.event()["lastSequence"]
        .as_u64()
        .unwrap_or_else(|| panic!("lastSequence is an integer: {}", open.text));
    assert!(
        last >= seen,
        "the cancelled turn's events were counted: \
         saw sequence {seen} before closing, resumed at {last}"
    );

    client.send_text("after drop").await;
    let turn = client.read_turn().await;
    let dump = turn.dump();
    assert_eq!(turn.interaction_id(), "turn-2", "{dump}");
    assert_eq!(turn.text(), "echo: after drop", "{dump}");
    assert_contiguous(&turn, last + 1);
    // History: "count", a partial answer of at least "token0" and far fewer
    // than 100 tokens (the backend stopped), then "after drop".
    let input = turn.input_tokens().unwrap_or_default();
    assert!(
        (1 + 1 + 2..1 + 100 + 2).contains(&input),
        "inputTokens {input} should count the first prompt, the partial answer and this prompt:\n{dump}"
    );
}

// A session deleted while its turn runs is not recreated by the turn's save: the turn
// ends failed with `session_deleted`, and the session stays gone.
#[tokio::test]
async fn a_session_deleted_during_its_turn_stays_deleted() {
    let host = Host::start_default();
    let mut client = host
        .connect("/v1/ws?session=doomed-1&model=slow_echo")
        .await;
    client.next_json().await;
    client.send_text("first").await;
    assert_eq!(client.read_turn().await.status(), "completed");
    client.send_text("a b c d e f").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    let reply = http(host.addr(), "DELETE", "/v1/sessions/doomed-1").await;
    assert_eq!(reply.status, 204, "{}", reply.body);
    frames.extend(client.read_turn().await.frames);
    let turn = Turn { frames };
    assert_eq!(turn.status(), "failed", "{}", turn.dump());
    let codes: Vec<&str> = turn
        .diagnostics()
        .iter()
        .map(|d| d.diagnostic_code())
        .collect();
    assert_eq!(codes, ["session_deleted"], "{}", turn.dump());
    let reply = http(host.addr(), "GET", "/v1/sessions/doomed-1").await;
    assert_eq!(reply.status, 404, "{}", reply.body);
}

// The backend a session's turns ran on is stored with it: a client that
// resumes without `?model=` goes on with it; once that backend is gone from
// the config, the session goes on with the default and the client is told.
#[tokio::test]
async fn a_resumed_session_keeps_its_backend() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=chosen-1&model=short").await;
    assert_session_open(&client.next_json().await, Envelope::Flat, false, "short", 0);
    client.send_text("anything").await;
    assert_eq!(client.read_turn().await.text(), "token0 token1 token2");
    client.close().await;

    let mut client = host.connect("/v1/ws?session=chosen-1").await;
    let open = client.next_json().await;
    assert_eq!(open.event()["model"], "short", "{}", open.text);
    client.send_text("again").await;
    assert_eq!(client.read_turn().await.text(), "token0 token1 token2");
    client.close().await;

    // Naming another backend moves the session to it.
    let mut client = host.connect("/v1/ws?session=chosen-1&model=echo").await;
    client.next_json().await;
    client.send_text("moved").await;
    assert_eq!(client.read_turn().await.text(), "echo: moved");
    client.close().await;
    let mut client = host.connect("/v1/ws?session=chosen-2&model=short").await;
    client.next_json().await;
    client.send_text("x").await;
    client.read_turn().await;
    client.close().await;

    // `short` removed from the config: chosen-2 goes on with the default.
    let mut config = Config::default();
    config.models.retain(|(name, _)| name != "short");
    host.workdir().write_config(&config.to_toml());
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut client = host.connect("/v1/ws?session=chosen-2").await;
    let open = client.next_json().await;
    assert_eq!(open.event()["model"], "echo", "{}", open.text);
    let told = client.next_json().await;
    assert_eq!(told.diagnostic_code(), "model_unavailable", "{}", told.text);
    client.send_text("still here").await;
    assert_eq!(client.read_turn().await.text(), "echo: still here");
}
