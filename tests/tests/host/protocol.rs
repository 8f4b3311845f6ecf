//! The wire protocol: envelopes, frames, sequences, modes, per-turn options.

use llm_host_tests::{json, words, Client, Config, Host, Turn};

use crate::common::{
    assert_contiguous, assert_echo_turn, assert_generated_session_id, assert_session_open,
    assert_shape, Envelope,
};

/// Checks, byte for byte, the turn the guide's flow gives for "Hello, world"
/// as the session's first turn.
fn assert_hello_world_turn(turn: &Turn, envelope: Envelope) {
    let dump = turn.dump();
    let names: Vec<&str> = turn.frames.iter().map(|frame| frame.name()).collect();
    assert_eq!(
        names,
        [
            "interaction.model",
            "interaction.model",
            "interaction.model",
            "interaction.model",
            "interaction.model",
            "interaction.model",
            "interaction.turn",
        ],
        "frames of the turn:\n{dump}"
    );
    assert_eq!(
        turn.model_types(),
        ["start", "delta", "delta", "delta", "usage", "end"],
        "{dump}"
    );
    let bodies: Vec<String> = turn
        .frames
        .iter()
        .map(|frame| assert_shape(frame, envelope, frame.name()))
        .collect();
    assert!(
        bodies[0].starts_with(r#"{"type":"start""#),
        "start event: {}",
        bodies[0]
    );
    assert_eq!(bodies[1], r#"{"type":"delta","text":"echo:"}"#);
    assert_eq!(bodies[2], r#"{"type":"delta","text":" Hello,"}"#);
    assert_eq!(bodies[3], r#"{"type":"delta","text":" world"}"#);
    assert_eq!(
        bodies[4],
        r#"{"type":"usage","usage":{"inputTokens":2,"outputTokens":3,"totalTokens":5}}"#
    );
    assert_eq!(bodies[5], r#"{"type":"end","finishReason":"stop"}"#);
    assert_eq!(
        bodies[6],
        r#"{"type":"end","status":"completed","interactionId":"turn-1"}"#
    );
    for frame in turn.model_frames() {
        assert_eq!(
            frame.meta()["interactionId"],
            "turn-1",
            "model events carry the turn's id: {}",
            frame.text
        );
    }
    if let Some(id) = turn.end().meta().get("interactionId") {
        assert_eq!(id, "turn-1", "{}", turn.end().text);
    }
    assert_contiguous(turn, 1);
}

// The guide's flow (plain text prompt, flat envelope) gives exactly the documented frames.
#[tokio::test]
async fn guide_flow_with_the_flat_envelope() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws").await;
    assert_eq!(client.protocol, None, "plain mode selects no subprotocol");
    let open = client.next_json().await;
    let session_id = assert_session_open(&open, Envelope::Flat, false, "echo", 0);
    assert_generated_session_id(&session_id);

    client.send_text("Hello, world").await;
    let turn = client.read_turn().await;
    assert_hello_world_turn(&turn, Envelope::Flat);
}

// With envelope = "nested" every frame is {"name","data":{"event":{"kind","event","meta"}}}.
#[tokio::test]
async fn guide_flow_with_the_nested_envelope() {
    let host = Host::start(&Config::nested());
    let mut client = host.connect("/v1/ws?session=nested-1").await;
    let open = client.next_json().await;
    let session_id = assert_session_open(&open, Envelope::Nested, false, "echo", 0);
    assert_eq!(session_id, "nested-1");

    client.send_text("Hello, world").await;
    let turn = client.read_turn().await;
    assert_hello_world_turn(&turn, Envelope::Nested);

    // Host diagnostics are nested too, with `entry` in place of `event`.
    client.send_binary(vec![1, 2, 3]).await;
    let diagnostic = client.next_json().await;
    assert_shape(&diagnostic, Envelope::Nested, "interaction.diagnostic");
    assert_eq!(diagnostic.diagnostic_code(), "binary_frame");
}

// `/` upgrades like `/v1/ws`.
#[tokio::test]
async fn the_root_path_serves_the_protocol_too() {
    let host = Host::start_default();
    let mut client = host.connect("/?session=root-path").await;
    let open = client.next_json().await;
    assert_eq!(
        assert_session_open(&open, Envelope::Flat, false, "echo", 0),
        "root-path"
    );
    client.send_text("Hello, world").await;
    let turn = client.read_turn().await;
    assert_hello_world_turn(&turn, Envelope::Flat);
}

// Sequences rise by exactly one per turn event across turns and reconnects;
// frames outside turns carry the last sequence without advancing it.
#[tokio::test]
async fn sequences_have_no_gaps_or_repeats_across_turns_and_reconnects() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=seq-1").await;
    assert_session_open(&client.next_json().await, Envelope::Flat, false, "echo", 0);

    client.send_text("a b").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.interaction_id(), "turn-1", "{}", turn.dump());
    let mut last = assert_contiguous(&turn, 1);

    // A bad frame between turns: a diagnostic at the current sequence.
    client.send_binary(b"not a prompt".to_vec()).await;
    let diagnostic = client.next_json().await;
    assert_eq!(
        diagnostic.diagnostic_code(),
        "binary_frame",
        "{}",
        diagnostic.text
    );
    assert_eq!(
        diagnostic.sequence(),
        last,
        "a frame outside a turn carries the last sequence: {}",
        diagnostic.text
    );

    client.send_text("c").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.interaction_id(), "turn-2", "{}", turn.dump());
    last = assert_contiguous(&turn, last + 1);
    client.close().await;

    let mut client = host.connect("/v1/ws?session=seq-1").await;
    let open = client.next_json().await;
    assert_session_open(&open, Envelope::Flat, true, "echo", last);

    // A turn on another backend (3 synthetic tokens) numbers its events the same way.
    let mut client_b = host.connect("/v1/ws?session=seq-1&model=short").await;
    let open = client_b.next_json().await;
    assert_session_open(&open, Envelope::Flat, true, "short", last);
    client_b.send_text("d").await;
    let turn = client_b.read_turn().await;
    assert_eq!(turn.interaction_id(), "turn-3", "{}", turn.dump());
    assert_eq!(
        turn.deltas(),
        ["token0", " token1", " token2"],
        "{}",
        turn.dump()
    );
    last = assert_contiguous(&turn, last + 1);
    client_b.close().await;
    // The other socket of the session followed that turn.
    assert_eq!(client.read_turn().await.sequences(), turn.sequences());

    client.send_text("e").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.interaction_id(), "turn-4", "{}", turn.dump());
    assert_contiguous(&turn, last + 1);
}

// With the subprotocol, text frames are JSON commands; without it, the same text is a prompt.
#[tokio::test]
async fn the_subprotocol_selects_command_mode() {
    let host = Host::start_default();

    let mut commands = host.connect_command("/v1/ws").await;
    assert_eq!(commands.protocol.as_deref(), Some("llm-host.v1"));
    commands.next_json().await;
    commands
        .send_json(&json!({"type": "prompt", "text": "Hello, world"}))
        .await;
    let turn = commands.read_turn().await;
    assert_hello_world_turn(&turn, Envelope::Flat);

    let mut plain = host.connect("/v1/ws").await;
    plain.next_json().await;
    plain.send_text(r#"{"type":"cancel"}"#).await;
    let turn = plain.read_turn().await;
    assert_eq!(
        turn.text(),
        r#"echo: {"type":"cancel"}"#,
        "in plain mode a JSON text is a prompt like any other:\n{}",
        turn.dump()
    );
    assert!(turn.diagnostics().is_empty(), "{}", turn.dump());
}

// `params.maxTokens` reaches the backend: echo stops after 2 tokens with finishReason "length".
#[tokio::test]
async fn per_turn_params_reach_the_model() {
    let host = Host::start_default();
    let mut client = host.connect_command("/v1/ws").await;
    client.next_json().await;
    client
        .send_json(&json!({
            "type": "prompt",
            "text": "one two three four",
            "params": {"maxTokens": 2, "temperature": 0.2},
        }))
        .await;
    let turn = client.read_turn().await;
    let dump = turn.dump();
    assert_eq!(turn.deltas(), ["echo:", " one"], "{dump}");
    assert_eq!(turn.finish_reason(), Some("length"), "{dump}");
    assert_eq!(
        turn.model_event("usage")
            .map(|usage| usage["usage"]["outputTokens"].clone()),
        Some(json!(2)),
        "{dump}"
    );
    assert_eq!(turn.status(), "completed", "{dump}");

    // The params were for that turn only.
    client
        .send_json(&json!({"type": "prompt", "text": "five six seven"}))
        .await;
    let turn = client.read_turn().await;
    let history = words("one two three four") + words("echo: one") + words("five six seven");
    assert_echo_turn(&turn, "five six seven", history, "turn-2");
}

// A command's `model` picks the backend for that prompt only; the connection's stays the default.
#[tokio::test]
async fn a_prompt_can_name_its_model() {
    let host = Host::start_default();
    let mut client = host.connect_command("/v1/ws").await;
    assert_session_open(&client.next_json().await, Envelope::Flat, false, "echo", 0);

    client
        .send_json(&json!({"type": "prompt", "text": "hello there", "model": "short"}))
        .await;
    let turn = client.read_turn().await;
    assert_eq!(turn.text(), "token0 token1 token2", "{}", turn.dump());
    assert_eq!(turn.status(), "completed", "{}", turn.dump());

    client
        .send_json(&json!({"type": "prompt", "text": "again"}))
        .await;
    let turn = client.read_turn().await;
    let history = words("hello there") + words("token0 token1 token2") + words("again");
    assert_echo_turn(&turn, "again", history, "turn-2");
}

// `?model=` picks the connection's backend and the announcement names it.
#[tokio::test]
async fn the_model_query_picks_the_connection_backend() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?model=short").await;
    assert_session_open(&client.next_json().await, Envelope::Flat, false, "short", 0);
    client.send_text("anything at all").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.text(), "token0 token1 token2", "{}", turn.dump());
}

// Session ids: exactly 128 allowed chars are accepted and announced as given.
#[tokio::test]
async fn the_longest_valid_session_id_is_accepted() {
    let host = Host::start_default();
    let alphabet = "AZaz09._:-";
    let id: String = alphabet.chars().cycle().take(128).collect();
    let mut client: Client = host.connect(&format!("/v1/ws?session={id}")).await;
    let open = client.next_json().await;
    assert_eq!(
        assert_session_open(&open, Envelope::Flat, false, "echo", 0),
        id
    );
}
