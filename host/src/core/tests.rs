//! The turn core alone, with fakes and tokio's paused clock: every race and
//! fault the host must survive, deterministically.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::fakes::{Client, FakeModel, FakeStore};
use super::locks::SessionLocks;
use super::sink::{Status, TurnControl};
use super::{turn, Prompt, TurnSettings};

fn pairs(messages: &[(&str, &str)]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|(role, content)| ((*role).to_owned(), (*content).to_owned()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_turn_is_claimed_streamed_and_saved() {
    for shared in [false, true] {
        let store = FakeStore::new(shared);
        let locks = SessionLocks::default();
        let model = FakeModel::new(Duration::ZERO);
        let client = Client::new("host-1", &store, "s", "alice");
        assert_eq!(
            client.prompt(&locks, &model, "hi there").await,
            Status::Completed
        );
        assert_eq!(
            client.prompt(&locks, &model, "again").await,
            Status::Completed
        );
        assert_eq!(
            store.messages("s"),
            pairs(&[
                ("user", "hi there"),
                ("assistant", "echo: hi there"),
                ("user", "again"),
                ("assistant", "echo: again"),
            ])
        );
        let sequences = client.frames.turn_sequences();
        let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
        assert_eq!(sequences, expected, "numbered 1, 2, 3 ... across turns");
        let doc = store.doc("s").expect("stored");
        assert_eq!(doc["lastSequence"], *sequences.last().expect("frames"));
        assert!(doc.get("lease").is_none(), "the lease is released");
        assert_eq!(store.owner("s").as_deref(), Some("alice"));
    }
}

// A turn is marked ended before its end frame goes out, so that a cancel
// the client sends right after that frame is told there is nothing to
// cancel instead of being swallowed by a turn that is already over.
#[tokio::test(start_paused = true)]
async fn a_turn_is_marked_ended_before_its_end_frame() {
    let store = FakeStore::new(false);
    let locks = SessionLocks::default();
    let model = FakeModel::new(Duration::ZERO);
    let client = Client::new("host-1", &store, "s", "alice");
    let control = Arc::new(TurnControl::default());
    assert!(!control.has_ended());
    let status = client
        .prompt_with(&locks, &model, "hi", control.clone())
        .await;
    assert_eq!(status, Status::Completed);
    assert!(control.has_ended());
}

#[tokio::test(start_paused = true)]
async fn another_key_never_joins_a_session_it_did_not_create() {
    // Bob attached to `user-42` before it existed; Alice then created it.
    let store = FakeStore::new(true);
    let locks = SessionLocks::default();
    let model = FakeModel::new(Duration::ZERO);
    let bob = Client::new("host-1", &store, "user-42", "bob");
    let alice = Client::new("host-1", &store, "user-42", "alice");
    assert_eq!(
        alice.prompt(&locks, &model, "alice secret").await,
        Status::Completed
    );

    assert_eq!(bob.prompt(&locks, &model, "bob here").await, Status::Failed);
    assert_eq!(bob.frames.codes(), ["session_not_found"]);
    assert!(
        !bob.frames.text().contains("alice"),
        "nothing of Alice's reaches Bob"
    );
    assert_eq!(
        store.messages("user-42"),
        pairs(&[
            ("user", "alice secret"),
            ("assistant", "echo: alice secret")
        ]),
        "nothing of Bob's reaches Alice's session"
    );
    assert_eq!(store.owner("user-42").as_deref(), Some("alice"));
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_host_died_is_served_again_without_repeating_a_number() {
    let store = FakeStore::new(true);
    let model = FakeModel::new(Duration::from_millis(100));
    let host1 = Arc::new(Client::new("host-1", &store, "s", ""));
    let locks1 = Arc::new(SessionLocks::default());
    assert_eq!(
        host1.prompt(&locks1, &model, "one").await,
        Status::Completed
    );
    // Host 1 dies four frames into a long turn.
    let dying = {
        let (host1, locks1, model) = (host1.clone(), locks1.clone(), model.clone());
        tokio::spawn(async move {
            host1
                .prompt(&locks1, &model, "a b c d e f g h i j k l")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(350)).await;
    dying.abort();
    let _ = dying.await;
    let seen_by_first = host1.frames.turn_sequences();
    assert!(
        store.doc("s").expect("stored")["lease"].is_object(),
        "its lease is left behind"
    );

    // The client resumes on host 2 and is told at once why it waits.
    let host2 = Client::new("host-2", &store, "s", "");
    host2
        .attachment
        .last_sequence
        .store(*seen_by_first.last().expect("frames"), Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let locks2 = SessionLocks::default();
    assert_eq!(
        host2.prompt(&locks2, &model, "two").await,
        Status::Completed
    );
    let waited = started.elapsed();
    assert!(
        waited <= Duration::from_secs(10),
        "served again within 10 s, took {waited:?}"
    );
    assert!(
        waited >= TurnSettings::default().lease,
        "not before the lease ran out"
    );
    assert_eq!(
        host2.frames.codes().first().map(String::as_str),
        Some("session_busy")
    );
    let after = host2.frames.turn_sequences();
    let highest_before = seen_by_first.iter().max().copied().unwrap_or(0);
    assert!(
        after.iter().all(|s| *s > highest_before),
        "{after:?} repeats a number of {seen_by_first:?}"
    );
    // Even a client that never saw host 1's frames gets fresh numbers.
    let fresh = Client::new("host-2", &store, "s", "");
    assert_eq!(
        fresh.prompt(&locks2, &model, "three").await,
        Status::Completed
    );
    assert!(fresh
        .frames
        .turn_sequences()
        .iter()
        .all(|s| *s > highest_before));
    assert_eq!(model.most_at_once("s"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_turn_whose_lease_cannot_be_renewed_stops_and_is_fenced() {
    let store = FakeStore::new(true);
    let model = FakeModel::new(Duration::from_millis(200));
    let host1 = Arc::new(Client::new("host-1", &store, "s", ""));
    let locks1 = Arc::new(SessionLocks::default());
    let long: String = (0..200).map(|i| format!("w{i} ")).collect();
    let running = {
        let (host1, locks1, model, long) = (host1.clone(), locks1.clone(), model.clone(), long);
        tokio::spawn(async move { host1.prompt(&locks1, &model, &long).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Host 1 cannot reach the store any more; host 2 can.
    host1.store.hang.store(true, Ordering::SeqCst);
    let host2 = Client::new("host-2", &store.handle(), "s", "");
    let locks2 = SessionLocks::default();
    let started = tokio::time::Instant::now();
    assert_eq!(
        host2.prompt(&locks2, &model, "mine now").await,
        Status::Completed
    );
    assert!(started.elapsed() <= Duration::from_secs(10));
    // Host 1 stopped streaming before host 2 started.
    assert_eq!(model.most_at_once("s"), 1, "two turns streamed at once");
    host1.store.hang.store(false, Ordering::SeqCst);
    assert_eq!(running.await.expect("turn"), Status::Failed);
    assert!(
        host1.frames.codes().contains(&"lease_lost".to_owned()),
        "{:?}",
        host1.frames.codes()
    );
    // Its save was refused: the history did not fork.
    let messages = store.messages("s");
    assert_eq!(
        messages
            .iter()
            .filter(|(role, _)| role == "assistant")
            .count(),
        1,
        "{messages:?}"
    );
    assert_eq!(
        messages.last().map(|m| m.1.as_str()),
        Some("echo: mine now")
    );
    let first = host1.frames.turn_sequences();
    let second = host2.frames.turn_sequences();
    assert!(
        second.iter().all(|s| !first.contains(s)),
        "{first:?} / {second:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_store_fails_the_turn_in_time_and_frees_the_session() {
    for shared in [false, true] {
        let store = FakeStore::new(shared);
        let locks = SessionLocks::default();
        let model = FakeModel::new(Duration::ZERO);
        let client = Client::new("host-1", &store, "s", "");
        store.hang.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        assert_eq!(client.prompt(&locks, &model, "hello").await, Status::Failed);
        assert_eq!(started.elapsed(), TurnSettings::default().store_timeout);
        assert_eq!(client.frames.codes(), ["store_unavailable"]);
        store.hang.store(false, Ordering::SeqCst);
        assert_eq!(
            client.prompt(&locks, &model, "again").await,
            Status::Completed
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_claim_applied_but_reported_failed_runs_the_prompt_once() {
    let store = FakeStore::new(true);
    let locks = SessionLocks::default();
    let model = FakeModel::new(Duration::ZERO);
    let client = Client::new("host-1", &store, "s", "");
    store.lose_answers.store(1, Ordering::SeqCst);
    assert_eq!(
        client.prompt(&locks, &model, "once").await,
        Status::Completed
    );
    assert_eq!(
        store.messages("s"),
        pairs(&[("user", "once"), ("assistant", "echo: once")])
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_commit_leaves_its_numbers_reserved() {
    let store = FakeStore::new(true);
    let locks = SessionLocks::default();
    let model = FakeModel::new(Duration::ZERO);
    let client = Client::new("host-1", &store, "s", "");
    // The claim is saved; the commit and its check fail.
    let paced = FakeModel::new(Duration::from_millis(100));
    let prompt = client.prompt_with(&locks, &paced, "lost answer", Arc::default());
    tokio::pin!(prompt);
    tokio::select! {
        status = &mut prompt => panic!("finished early: {status:?}"),
        () = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
    store.fail_saves.store(1, Ordering::SeqCst);
    store.fail_loads.store(1, Ordering::SeqCst);
    assert_eq!(prompt.await, Status::Failed);
    assert!(client
        .frames
        .codes()
        .contains(&"store_unavailable".to_owned()));
    let used = client.frames.turn_sequences();
    // A client that never saw them (another socket, another host) gets fresh numbers.
    let other = Client::new("host-2", &store.handle(), "s", "");
    assert_eq!(
        other.prompt(&locks, &model, "next").await,
        Status::Completed
    );
    assert!(other
        .frames
        .turn_sequences()
        .iter()
        .all(|s| !used.contains(s)));
}

#[tokio::test(start_paused = true)]
async fn a_session_deleted_during_its_turn_is_not_recreated() {
    for shared in [false, true] {
        let store = FakeStore::new(shared);
        let model = FakeModel::new(Duration::from_millis(500));
        let locks = Arc::new(SessionLocks::default());
        let client = Arc::new(Client::new("host-1", &store, "s", ""));
        assert_eq!(
            client
                .prompt(&locks, &FakeModel::new(Duration::ZERO), "first")
                .await,
            Status::Completed
        );
        let running = {
            let (client, locks, model) = (client.clone(), locks.clone(), model.clone());
            tokio::spawn(
                async move { client.prompt(&locks, &model, "a b c d e f g h i j k").await },
            )
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        store.remove("s");
        assert_eq!(running.await.expect("turn"), Status::Failed);
        assert!(
            client
                .frames
                .codes()
                .contains(&"session_deleted".to_owned()),
            "{:?}",
            client.frames.codes()
        );
        assert!(
            store.doc("s").is_none(),
            "shared = {shared}: the answer recreated the session"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_turn_deadline_fails_the_turn_and_saves_it() {
    let store = FakeStore::new(false);
    let locks = SessionLocks::default();
    let model = FakeModel::new(Duration::from_secs(1));
    let client = Client::new("host-1", &store, "s", "");
    let mut scope = client.scope();
    scope.settings.turn_timeout = Some(Duration::from_secs(3));
    let prompt = Prompt {
        id: None,
        text: "a b c d e f g".to_owned(),
        model: None,
        params: Box::default(),
        round_trips: false,
    };
    let report = turn::run(&scope, &locks, Arc::new(model), prompt, Arc::default()).await;
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.code.as_deref(), Some("turn_timeout"));
    assert!(client.frames.codes().contains(&"turn_timeout".to_owned()));
    let messages = store.messages("s");
    assert_eq!(
        messages.len(),
        2,
        "the partial answer is saved: {messages:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_turn_cannot_spend_more_numbers_than_it_reserved() {
    let store = FakeStore::new(true);
    let locks = SessionLocks::default();
    let model = FakeModel::new(Duration::ZERO);
    let client = Client::new("host-1", &store, "s", "");
    let mut scope = client.scope();
    scope.settings.max_turn_events = 16;
    let prompt = Prompt {
        id: None,
        text: (0..40).map(|i| format!("w{i} ")).collect(),
        model: None,
        params: Box::default(),
        round_trips: false,
    };
    let report = turn::run(&scope, &locks, Arc::new(model), prompt, Arc::default()).await;
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.code.as_deref(), Some("turn_too_long"));
    assert!(client.frames.codes().contains(&"turn_too_long".to_owned()));
    let sequences = client.frames.turn_sequences();
    assert_eq!(sequences.last().copied(), Some(16), "{sequences:?}");
}

// Each saved turn keeps its numbered frames, the end frame included, byte
// for byte as the client was sent them, and within server.replay_frames;
// a lease renewal on a shared store keeps the frames sent so far.
#[tokio::test(start_paused = true)]
async fn a_saved_turn_keeps_its_frames_for_replay() {
    use super::replay::{Replay, StoredFrames};
    for shared in [false, true] {
        let store = FakeStore::new(shared);
        let locks = SessionLocks::default();
        let model = FakeModel::new(Duration::ZERO);
        let client = Client::new("host-1", &store, "s", "alice");
        assert_eq!(
            client.prompt(&locks, &model, "one two").await,
            Status::Completed
        );
        assert_eq!(
            client.prompt(&locks, &model, "three four five").await,
            Status::Completed
        );
        let sent = client.frames.all();
        let doc = store.doc("s").expect("stored");
        let stored: StoredFrames =
            serde_json::from_value(doc["replay"].clone()).expect("a replay log");
        let last = doc["lastSequence"].as_u64().expect("last");
        assert_eq!(stored.last(), last, "through the end frame");
        // The log is the latest turn's: its frames, in order, as sent.
        let replay = Replay::after(0, last, Some(&stored), None);
        let first = replay.frames[0].0;
        assert_eq!(
            replay.gap,
            Some(first),
            "the first turn's frames are not kept"
        );
        let kept: Vec<serde_json::Value> = replay
            .frames
            .iter()
            .map(|(_, frame)| serde_json::from_slice(frame).expect("JSON"))
            .collect();
        let tail = &sent[sent.len() - kept.len()..];
        assert_eq!(kept, tail);
        assert_eq!(kept.last().expect("end")["name"], "interaction.turn");
        assert_eq!(
            kept[0]["data"]["meta"]["interactionId"], "turn-2",
            "{shared}: the second turn only"
        );
    }
    // Within server.replay_frames: the last frames, the end frame last.
    let store = FakeStore::new(false);
    let locks = SessionLocks::default();
    let model = FakeModel::new(Duration::ZERO);
    let mut client = Client::new("host-1", &store, "s", "alice");
    client.settings.replay_frames = 3;
    client.prompt(&locks, &model, "a b c d e f").await;
    let doc = store.doc("s").expect("stored");
    let stored: StoredFrames = serde_json::from_value(doc["replay"].clone()).expect("log");
    let replay = Replay::after(0, 0, Some(&stored), None);
    assert_eq!(replay.frames.len(), 3);
    assert_eq!(stored.last(), doc["lastSequence"].as_u64().expect("last"));
    // With 0 nothing is kept.
    let store = FakeStore::new(false);
    let mut client = Client::new("host-1", &store, "t", "alice");
    client.settings.replay_frames = 0;
    client.prompt(&locks, &model, "a b").await;
    assert!(store.doc("t").expect("stored").get("replay").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_lease_renewal_keeps_the_frames_sent_so_far() {
    use super::replay::StoredFrames;
    let store = FakeStore::new(true);
    let locks = SessionLocks::default();
    // Slow enough for renewals while it streams.
    let model = FakeModel::new(Duration::from_millis(500));
    let client = Client::new("host-1", &store, "s", "alice");
    let watcher = store.handle();
    let running = client.prompt(&locks, &model, "a b c d e f g h i j k l");
    tokio::pin!(running);
    let mut seen = None;
    for _ in 0..40 {
        tokio::select! {
            _ = &mut running => break,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let doc = watcher.doc("s").expect("claimed");
        if doc.get("lease").is_some() && doc.get("replay").is_some() {
            seen = Some(doc);
            break;
        }
    }
    let doc = seen.expect("a renewal saved the frames sent so far");
    let stored: StoredFrames = serde_json::from_value(doc["replay"].clone()).expect("log");
    assert_eq!(stored.first, 1);
    assert!(stored.last() >= 2, "{}", stored.last());
    running.await;
}
