//! Attacks on replay (`?since=N`), a session's turn followed by several
//! sockets, and the reconnect grace. A test that fails names a defect in
//! its comment; the others pin behaviours worth keeping.

use std::time::{Duration, Instant};

use llm_host_tests::{Client, Config, Frame, Host, Turn};
use serde_json::json;

use crate::common::assert_contiguous;

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdef00";

/// The default config plus `[server]` lines and backends `long` (140
/// tokens 50 ms apart: 7 s) and `tools` (echo calling every declared tool).
fn config(server_extra: &str) -> Config {
    let mut config = Config {
        server_extra: server_extra.to_owned(),
        ..Config::default()
    };
    config.models.push((
        "long".to_owned(),
        "{ delay_ms = 50, tokens = 140 }".to_owned(),
    ));
    config.models.push((
        "tools".to_owned(),
        "{ call_tools = true, tool_rounds = 2 }".to_owned(),
    ));
    config
}

/// The next frame within `limit`, or None.
async fn within(client: &mut Client, limit: Duration) -> Option<Frame> {
    tokio::time::timeout(limit, client.next_json()).await.ok()
}

/// The turn's frames within `limit`; panics with `what` otherwise.
async fn turn_within(client: &mut Client, limit: Duration, what: &str) -> Turn {
    tokio::time::timeout(limit, client.read_turn())
        .await
        .unwrap_or_else(|_| panic!("{what}: no turn end within {limit:?}"))
}

/// Reads frames until `count` model frames have been read.
async fn models(client: &mut Client, count: usize) -> Vec<Frame> {
    let mut frames: Vec<Frame> = Vec::new();
    while frames
        .iter()
        .filter(|f| f.name() == "interaction.model")
        .count()
        < count
    {
        frames.push(client.next_json().await);
    }
    frames
}

// DEFECT: a `since` past the session's last number makes the hub record
// that number as what the socket was sent (hub.rs `replay`: `return
// conn.attachment.sequence().max(since)`), so every later frame numbered
// at or below it is skipped for that socket: its own next turn is never
// sent, not even its end frame; the client hangs.
#[tokio::test]
async fn a_since_past_the_last_number_does_not_swallow_later_turns() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=attack-1&model=short").await;
    client.next_json().await;
    client.send_text("a").await;
    let last = assert_contiguous(&client.read_turn().await, 1);
    client.close().await;

    let far = last + 1000;
    let mut client = host
        .connect(&format!("/v1/ws?session=attack-1&since={far}"))
        .await;
    let open = client.next_json().await;
    assert_eq!(open.name(), "interaction.session", "{}", open.text);
    client.send_text("next").await;
    let turn = turn_within(
        &mut client,
        Duration::from_secs(5),
        &format!("after ?since={far} (the session's last is {last}) the socket's own prompt"),
    )
    .await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
}

// DEFECT: a turn refused at its claim (here `history_full`) ends with a
// frame numbered the connection's current last number (turn.rs
// `end_turn(scope, attachment.sequence(), ..)`); the hub skips numbers a
// socket was already sent (hub.rs `TurnFrames::send_numbered`, `skip`), so
// that end frame never reaches the client: it waits for an end forever.
#[tokio::test]
async fn a_turn_refused_at_its_claim_still_sends_its_end() {
    let host = Host::start(&config("max_history_bytes = 1024\n"));
    let mut client = host.connect("/v1/ws?session=attack-2").await;
    client.next_json().await;
    client.send_text("x".repeat(2000)).await;
    let turn = turn_within(
        &mut client,
        Duration::from_secs(5),
        "a prompt refused for history_full",
    )
    .await;
    assert_eq!(turn.status(), "failed", "{}", turn.dump());
    assert!(
        turn.diagnostics()
            .iter()
            .any(|d| d.diagnostic_code() == "history_full"),
        "{}",
        turn.dump()
    );
}

// DEFECT (isolation): hubs are keyed by session id alone (hub.rs
// `Hubs::of`), whatever key opened the socket. Bob opens a socket on an id
// nobody saved yet; Alice then uses that id: every frame of her turns goes
// to Bob's socket as well (and Bob's `cancel` reaches her turn through
// `Hub::cancel_running`).
#[tokio::test]
async fn another_keys_socket_on_the_same_id_gets_none_of_its_frames() {
    let host = Host::start(&Config {
        extra: format!(
            "\n[auth]\nkeys = [\n  {{ id = \"alice\", key = \"{ALICE}\" }},\n  \
             {{ id = \"bob\", key = \"{BOB}\" }},\n]\n"
        ),
        ..config("")
    });
    let mut bob = host
        .connect(&format!("/v1/ws?session=attack-3&token={BOB}"))
        .await;
    bob.next_json().await;
    let mut alice = host
        .connect(&format!(
            "/v1/ws?session=attack-3&model=slow_echo&token={ALICE}"
        ))
        .await;
    alice.next_json().await;
    alice.send_text("my secret plan").await;
    let turn = alice.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    if let Some(frame) = within(&mut bob, Duration::from_millis(500)).await {
        panic!(
            "bob's socket was sent a frame of alice's turn: {}",
            frame.text
        );
    }
    // Nor, after her session is saved, by asking for a replay.
    let reply = host
        .http_upgrade(&format!("/v1/ws?session=attack-3&since=0&token={BOB}"))
        .await;
    assert_eq!(reply.status, 404, "{}", reply.body);
}

// DEFECT: a socket that connects while a turn of its session runs waits
// for the session lock (announce.rs, CONNECT_WAIT = 5 s) before it is
// announced and joins the hub: it does not "follow the running turn"; with
// a turn shorter than 5 s it is sent none of it.
#[tokio::test]
async fn a_socket_joining_mid_turn_follows_it_at_once() {
    let host = Host::start_default();
    let mut first = host.connect("/v1/ws?session=attack-4&model=slow").await;
    first.next_json().await;
    first.send_text("count").await;
    models(&mut first, 3).await;
    let began = Instant::now();
    let mut second = host.connect("/v1/ws?session=attack-4").await;
    let open = second.next_json().await;
    assert_eq!(open.name(), "interaction.session", "{}", open.text);
    let waited = began.elapsed();
    let next = within(&mut second, Duration::from_secs(1)).await;
    let next = next.map(|frame| frame.text).unwrap_or_default();
    assert!(
        waited < Duration::from_secs(2) && next.contains("interaction.model"),
        "a socket joining a running turn was announced after {waited:?}, and its next frame \
         is not one of the turn's model frames: {next:?}"
    );
}

// DEFECT: a turn that starts after every socket of its session left (here
// socket B's prompt, queued behind A's turn on the session lock) is never
// given the grace: `Hub::left` found no running turn when the sockets went,
// and `TurnFrames::send_numbered` starts the grace only when it had sockets
// before (`before > 0`). It runs to its end with nobody listening, instead
// of being cancelled after server.reconnect_grace_secs.
#[tokio::test]
async fn a_turn_that_starts_after_its_sockets_left_is_cancelled_after_the_grace() {
    let host = Host::start(&config("reconnect_grace_secs = 1\n"));
    let mut a = host.connect("/v1/ws?session=attack-5&model=slow").await;
    a.next_json().await;
    let mut b = host.connect("/v1/ws?session=attack-5&model=slow").await;
    b.next_json().await;
    a.send_text("first").await;
    models(&mut b, 2).await;
    b.send_text("second").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(a);
    drop(b);
    // A's turn is cancelled after 1 s; B's, left alone from its start,
    // should be too, about a second later: 5 s is a full 100 tokens.
    let mut saved = None;
    for _ in 0..160 {
        let reply = llm_host_tests::http(host.addr(), "GET", "/v1/sessions/attack-5").await;
        if reply.status == 200 && reply.json()["turns"].as_u64() == Some(2) {
            saved = Some(reply.json());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let saved = saved.unwrap_or_else(|| panic!("B's turn was not saved within 8 s"));
    let mut client = host.connect("/v1/ws?session=attack-5&since=0").await;
    client.next_json().await;
    let replayed = client.read_turn().await;
    assert_eq!(
        replayed.status(),
        "cancelled",
        "the turn that began with no socket ran to its end: {}\n{saved}",
        replayed.dump()
    );
}

// DEFECT: with frames of the stored turn and of the running turn, a hole
// between them (the running turn's log keeps only server.replay_frames)
// is sent without a `replay_gap`: Replay::after (replay.rs) checks only
// whether the first frame sent follows `since`.
#[tokio::test]
async fn a_hole_between_the_stored_and_the_running_turn_is_a_replay_gap() {
    let host = Host::start(&config("replay_frames = 3\n"));
    let mut client = host
        .connect_command("/v1/ws?session=attack-6&model=short")
        .await;
    client.next_json().await;
    client
        .send_json(&json!({"type": "prompt", "text": "a"}))
        .await;
    let ended = *client.read_turn().await.sequences().last().expect("frames");
    client
        .send_json(&json!({"type": "prompt", "text": "b", "model": "long"}))
        .await;
    models(&mut client, 10).await;
    drop(client);

    let since = ended - 1;
    let mut client = host
        .connect(&format!("/v1/ws?session=attack-6&since={since}"))
        .await;
    client.next_json().await;
    let mut frames = Vec::new();
    let mut gap = false;
    loop {
        let frame = client.next_json().await;
        if frame.diagnostic_code() == "replay_gap" {
            gap = true;
            continue;
        }
        let end = frame.is_turn_end() && frame.sequence() > ended;
        frames.push(frame);
        if end {
            break;
        }
    }
    let turn = Turn { frames };
    let sequences = turn.sequences();
    let contiguous = sequences.windows(2).all(|w| w[1] == w[0] + 1);
    assert!(
        gap || contiguous,
        "frames after {since} were sent with a hole and no replay_gap: {sequences:?}"
    );
}

// DEFECT: a `cancel` from a socket whose own prompt waits behind the
// session's running turn (another socket's) cancels only its waiting
// prompt (connection.rs: `cancel_current(current)` succeeds on the queued
// turn's control, set before it takes the session lock, so
// `hub.cancel_running()` is never tried): the running turn goes on.
#[tokio::test]
async fn a_cancel_from_a_socket_with_a_waiting_prompt_reaches_the_running_turn() {
    let host = Host::start_default();
    let mut a = host.connect("/v1/ws?session=attack-10&model=slow").await;
    a.next_json().await;
    let mut b = host
        .connect_command("/v1/ws?session=attack-10&model=slow")
        .await;
    b.next_json().await;
    a.send_text("count").await;
    models(&mut b, 2).await;
    b.send_json(&json!({"type": "prompt", "text": "mine"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.send_json(&json!({"type": "cancel"})).await;
    let what = "the running turn after a cancel from a socket with a prompt waiting";
    let turn = turn_within(&mut a, Duration::from_secs(2), what).await;
    assert_eq!(turn.status(), "cancelled", "{}", turn.dump());
}

// Works: the socket that started the turn drops; the other one keeps
// following it, contiguous, to its end (grace 0 cancels only when no
// socket is left), then cancels the next turn started by itself.
#[tokio::test]
async fn the_other_socket_follows_on_when_the_starter_drops() {
    let host = Host::start(&config("reconnect_grace_secs = 0\n"));
    let mut a = host
        .connect("/v1/ws?session=attack-7&model=slow_echo")
        .await;
    a.next_json().await;
    let mut b = host
        .connect_command("/v1/ws?session=attack-7&model=slow_echo")
        .await;
    b.next_json().await;
    a.send_text("one two three four five six").await;
    let head = models(&mut b, 2).await;
    drop(a);
    let rest = b.read_turn().await;
    let whole = Turn {
        frames: head.into_iter().chain(rest.frames).collect(),
    };
    assert_eq!(whole.status(), "completed", "{}", whole.dump());
    let last = assert_contiguous(&whole, whole.sequences()[0]);
    assert_eq!(whole.text(), "echo: one two three four five six");
    b.send_json(&json!({"type": "prompt", "text": "a b c d e f g h i j"}))
        .await;
    models(&mut b, 2).await;
    b.send_json(&json!({"type": "cancel"})).await;
    let cancelled = b.read_turn().await;
    assert_eq!(cancelled.status(), "cancelled", "{}", cancelled.dump());
    assert!(cancelled.sequences()[0] > last, "{}", cancelled.dump());
}

// Works: a second socket's prompt sent while the first socket's turn runs
// waits for it and runs after; each socket sees both turns once, numbers
// never repeating.
#[tokio::test]
async fn a_prompt_from_another_socket_waits_and_numbers_never_repeat() {
    let host = Host::start_default();
    let mut a = host
        .connect("/v1/ws?session=attack-8&model=slow_echo")
        .await;
    a.next_json().await;
    let mut b = host
        .connect("/v1/ws?session=attack-8&model=slow_echo")
        .await;
    b.next_json().await;
    a.send_text("one two three").await;
    models(&mut b, 1).await;
    b.send_text("four five").await;
    for (name, client) in [("a", &mut a), ("b", &mut b)] {
        let mut texts = Vec::new();
        let mut seen: Vec<u64> = Vec::new();
        while texts.len() < 2 {
            let turn = turn_within(client, Duration::from_secs(10), name).await;
            assert_eq!(turn.status(), "completed", "{name}: {}", turn.dump());
            seen.extend(turn.sequences());
            texts.push(turn.text());
        }
        assert!(seen.windows(2).all(|w| w[1] > w[0]), "{name}: {seen:?}");
        assert_eq!(
            texts.last().map(String::as_str),
            Some("echo: four five"),
            "{name}"
        );
    }
}

// Works: a tool call left waiting by a socket that dropped is answered
// from a socket that reconnected with `since`, and the turn ends.
#[tokio::test]
async fn a_tool_call_is_answered_from_a_reconnected_socket() {
    let host = Host::start(&config(""));
    let tools = json!([{"name": "lookup", "description": "Looks a word up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]);
    let mut a = host
        .connect_command("/v1/ws?session=attack-9&model=tools")
        .await;
    a.next_json().await;
    a.send_json(&json!({"type": "prompt", "text": "q", "params": {"tools": tools}}))
        .await;
    let first = a.next_json().await;
    let since = first.sequence();
    drop(a);
    let mut b = host
        .connect_command(&format!("/v1/ws?session=attack-9&since={since}"))
        .await;
    b.next_json().await;
    let mut seen = vec![since];
    for _ in 0..4 {
        let mut calls = Vec::new();
        let mut ended = None;
        while calls.is_empty() && ended.is_none() {
            let frame = b.next_json().await;
            if !frame.is_diagnostic() {
                seen.push(frame.sequence());
            }
            if let Some(call) = frame.event().get("toolCall") {
                calls.push(call["id"].as_str().unwrap_or_default().to_owned());
            }
            if frame.is_turn_end() {
                ended = Some(frame);
            }
        }
        if let Some(end) = ended {
            assert_eq!(end.event()["status"], "completed", "{}", end.text);
            assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
            return;
        }
        for id in calls {
            b.send_json(&json!({"type": "tool_result", "callId": id, "content": "ok"}))
                .await;
        }
    }
    panic!("the turn did not end after its tool calls were answered");
}
