//! Sessions and turns: history, resuming, queueing, cancelling.

use llm_host_tests::{json, words, Config, Host, Turn};

use crate::common::{assert_contiguous, assert_echo_turn, assert_session_open, Envelope};

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
    frames.extend(client.read_turn().await.frames);
    let first = Turn { frames };
    let second = client.read_turn().await;

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

// Closing the socket mid-turn cancels it; resuming shows the turn counted and its text kept.
#[tokio::test]
async fn a_disconnect_mid_turn_cancels_it_and_the_session_resumes_after_it() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=drop-1&model=slow").await;
    client.next_json().await;
    client.send_text("count").await;
    let frames = client.read_until("interaction.model", "delta").await;
    let seen = frames.last().expect("a delta").sequence();
    client.close().await;

    let mut client = host.connect("/v1/ws?session=drop-1").await;
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
