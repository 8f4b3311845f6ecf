//! Replay after a reconnect (`?since=N`), a session's turn followed by each
//! of its sockets, and the grace a turn left alone gets
//! (`server.reconnect_grace_secs`).

use std::time::Duration;

use llm_host_tests::{http, Client, Config, Frame, Host, Turn};
use serde_json::json;

use crate::common::{assert_contiguous, stored};

/// Reads frames until one numbered `sequence` or more has been read.
async fn read_through(client: &mut Client, count: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    while frames
        .iter()
        .filter(|frame: &&Frame| frame.name() == "interaction.model")
        .count()
        < count
    {
        frames.push(client.next_json().await);
    }
    frames
}

/// The answer `GET /v1/sessions/{id}` holds last.
async fn saved_answer(host: &Host, id: &str) -> String {
    let session = stored(host, id).await;
    let messages = session["messages"].as_array().cloned().unwrap_or_default();
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "assistant")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Waits until session `id`'s turns are all saved (no lease, an answer).
async fn wait_saved(host: &Host, id: &str, turns: u64) {
    for _ in 0..200 {
        let reply = http(host.addr(), "GET", &format!("/v1/sessions/{id}")).await;
        if reply.status == 200 && reply.json()["turns"].as_u64() == Some(turns) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "session {id} never had {turns} turns saved:\n{}",
        host.log()
    );
}

// A socket dropped mid-turn: the turn runs on, and a socket that comes
// back with `?since=N` is sent every frame after N once, in order, then
// follows the turn live to its end; the two parts are the saved answer.
#[tokio::test]
async fn a_reconnect_mid_turn_gets_what_it_missed_then_follows_live() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=replay-1&model=slow").await;
    client.next_json().await;
    client.send_text("count").await;
    let before = read_through(&mut client, 5).await;
    let seen = before.last().expect("frames").sequence();
    drop(client);
    // Frames go out while no socket is there.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let mut client = host
        .connect(&format!("/v1/ws?session=replay-1&since={seen}"))
        .await;
    let open = client.next_json().await;
    assert_eq!(open.name(), "interaction.session", "{}", open.text);
    let after = client.read_turn().await;
    assert_eq!(
        after.status(),
        "completed",
        "{}\n{}",
        after.dump(),
        host.log()
    );
    assert_contiguous(&after, seen + 1);
    let whole = Turn {
        frames: before.into_iter().chain(after.frames).collect(),
    };
    assert_contiguous(&whole, whole.sequences()[0]);
    assert_eq!(whole.text(), saved_answer(&host, "replay-1").await);
    // The session goes on after it.
    client.send_text("next").await;
    let next = client.read_turn().await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
}

// A turn that ended while no socket was there: its frames come from the
// store's log, its end frame included.
#[tokio::test]
async fn a_reconnect_after_the_turn_ended_gets_its_frames_from_the_store() {
    let host = Host::start_default();
    let mut client = host
        .connect("/v1/ws?session=replay-2&model=slow_echo")
        .await;
    client.next_json().await;
    client.send_text("one two three four five").await;
    let before = read_through(&mut client, 2).await;
    let seen = before.last().expect("frames").sequence();
    drop(client);
    wait_saved(&host, "replay-2", 1).await;

    let mut client = host
        .connect(&format!("/v1/ws?session=replay-2&since={seen}"))
        .await;
    client.next_json().await;
    let after = client.read_turn().await;
    assert_eq!(after.status(), "completed", "{}", after.dump());
    assert_contiguous(&after, seen + 1);
    let whole = Turn {
        frames: before.into_iter().chain(after.frames).collect(),
    };
    assert_eq!(whole.text(), "echo: one two three four five");

    // Asked again from where it is now: nothing to send, no gap.
    let last = whole.sequences().last().copied().expect("frames");
    let mut client = host
        .connect(&format!("/v1/ws?session=replay-2&since={last}"))
        .await;
    client.next_json().await;
    client.send_text("more").await;
    let next = client.read_turn().await;
    assert!(next.diagnostics().is_empty(), "{}", next.dump());
    assert_contiguous(&next, last + 1);
}

// Frames no longer kept (server.replay_frames): a `replay_gap` diagnostic
// names the first the client can have, and those follow.
#[tokio::test]
async fn frames_no_longer_kept_are_a_replay_gap() {
    let host = Host::start(&Config {
        server_extra: "replay_frames = 3\n".to_owned(),
        ..Config::default()
    });
    let mut client = host.connect("/v1/ws?session=replay-3&model=short").await;
    client.next_json().await;
    client.send_text("a").await;
    client.read_turn().await;
    client.send_text("b").await;
    let turn = client.read_turn().await;
    let last = *turn.sequences().last().expect("frames");
    client.close().await;

    let mut client = host.connect("/v1/ws?session=replay-3&since=0").await;
    client.next_json().await;
    let gap = client.next_json().await;
    assert_eq!(gap.diagnostic_code(), "replay_gap", "{}", gap.text);
    assert_eq!(
        gap.entry()["data"]["firstAvailable"],
        last - 2,
        "{}",
        gap.text
    );
    let mut kept = Vec::new();
    for _ in 0..3 {
        kept.push(client.next_json().await.sequence());
    }
    assert_eq!(kept, vec![last - 2, last - 1, last]);
    // A `since` that is not a number is refused before the upgrade.
    let reply = http(host.addr(), "GET", "/v1/ws?session=replay-3&since=x").await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("bad_since"), "{}", reply.body);
}

// Two sockets on one session both receive its running turn's frames; the
// one that did not start it can cancel it.
#[tokio::test]
async fn two_sockets_follow_one_turn_and_either_can_cancel_it() {
    let host = Host::start_default();
    let mut first = host
        .connect("/v1/ws?session=replay-4&model=slow_echo")
        .await;
    first.next_json().await;
    let mut second = host
        .connect_command("/v1/ws?session=replay-4&model=slow_echo")
        .await;
    second.next_json().await;
    first.send_text("a b c").await;
    let one = first.read_turn().await;
    let two = second.read_turn().await;
    assert_eq!(one.status(), "completed", "{}", one.dump());
    assert_eq!(one.sequences(), two.sequences());
    assert_eq!(two.text(), "echo: a b c");

    first
        .send_text("d e f g h i j k l m n o p q r s t u v w x y z")
        .await;
    read_through(&mut second, 2).await;
    second.send_json(&json!({"type": "cancel"})).await;
    let cancelled = first.read_turn().await;
    assert_eq!(cancelled.status(), "cancelled", "{}", cancelled.dump());
}

// A turn no socket rejoins within server.reconnect_grace_secs is cancelled
// and saved as it was; a socket that comes later replays it from the
// store, its cancelled end included.
#[tokio::test]
async fn a_turn_left_alone_is_cancelled_after_the_grace() {
    let host = Host::start(&Config {
        server_extra: "reconnect_grace_secs = 1\n".to_owned(),
        ..Config::default()
    });
    let mut client = host.connect("/v1/ws?session=replay-5&model=slow").await;
    client.next_json().await;
    client.send_text("count").await;
    let before = read_through(&mut client, 2).await;
    let seen = before.last().expect("frames").sequence();
    drop(client);
    wait_saved(&host, "replay-5", 1).await;
    let mut client = host
        .connect(&format!("/v1/ws?session=replay-5&since={seen}"))
        .await;
    client.next_json().await;
    let after = client.read_turn().await;
    assert_eq!(after.status(), "cancelled", "{}", after.dump());
    assert_contiguous(&after, seen + 1);
    // Cancelled after about a second: far fewer than the 100 tokens.
    assert!(after.deltas().len() < 90, "{}", after.dump());
}

// Two hosts sharing a sqlite file: a client whose socket to one dropped
// mid-turn reconnects to the other with `?since=N`; it is sent what the
// store holds, then follows the turn as its host renews its lease, to the
// end, each number once.
#[tokio::test]
async fn a_turn_running_on_another_host_is_followed_from_the_store() {
    use crate::stores::{config_with_store, start_host, store_settings, Kind};
    let shared = tempfile::tempdir().expect("a directory for the sqlite file");
    let settings = store_settings(Kind::Sqlite, shared.path()).expect("sqlite needs no server");
    let mut config = config_with_store(&settings);
    config.server_extra = "lease_ms = 1000\nlease_renew_ms = 200\n".to_owned();
    let (one, two) = (
        start_host(Kind::Sqlite, &config),
        start_host(Kind::Sqlite, &config),
    );
    let mut client = one.connect("/v1/ws?session=replay-6&model=slow").await;
    client.next_json().await;
    client.send_text("count").await;
    let before = read_through(&mut client, 3).await;
    let seen = before.last().expect("frames").sequence();
    drop(client);

    let mut client = two
        .connect(&format!("/v1/ws?session=replay-6&since={seen}"))
        .await;
    client.next_json().await;
    let after = client.read_turn().await;
    assert_eq!(after.status(), "completed", "{}", after.dump());
    assert_contiguous(&after, seen + 1);
    let whole = Turn {
        frames: before.into_iter().chain(after.frames).collect(),
    };
    assert_eq!(whole.text(), saved_answer(&two, "replay-6").await);
}
