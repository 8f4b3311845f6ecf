//! A property test of the turn core: two hosts on one shared store, a few
//! sessions and clients of two keys, and a generated run of prompts,
//! cancels, disconnects, host crashes and store faults, overlapping under
//! tokio's paused clock; after each run the core's guarantees are checked
//! on what the store kept and what every client was sent:
//!
//! 1. a completed turn's prompt is stored once with its whole answer right
//!    after it, in the order the turns completed; any answer, whole or
//!    partial, is stored right after its own prompt;
//! 2. no sequence number is sent twice on a session, across its clients;
//! 3. no two turns of a session stream at once;
//! 4. a stored session holds its owner key's prompts only, and a client is
//!    sent its own key's text only.
//!
//! Every turn must also end once the faults are lifted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio::task::JoinHandle;

use super::fakes::{Client, FakeFrames, FakeModel, FakeStore};
use super::locks::SessionLocks;
use super::sink::{Status, TurnControl};

/// The hosts sharing the store.
const HOSTS: usize = 2;
/// The keys clients use.
const KEYS: [&str; 2] = ["a", "b"];

/// A client slot: which host it connects to, its session and its key. A
/// slot whose connection closed or whose host crashed connects again at its
/// next prompt.
#[derive(Debug, Clone, Copy)]
struct ClientSpec {
    host: usize,
    session: usize,
    key: usize,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// The client sends a prompt of `words` words after its tag.
    Prompt { client: usize, words: usize },
    /// The client cancels its running turn.
    Cancel { client: usize },
    /// The client's socket closes: its turn is cancelled, queued prompts dropped.
    Disconnect { client: usize },
    /// The host dies: its tasks stop where they are, its leases stay; it
    /// comes back with a fresh instance id or with the same one.
    Crash { host: usize, fresh_id: bool },
    /// The host's next save fails without writing.
    FailSave { host: usize },
    /// The host's next save writes, then reports failure.
    LoseAnswer { host: usize },
    /// The host's next load fails.
    FailLoad { host: usize },
    /// The host cannot reach the store for `ms`.
    Hang { host: usize, ms: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Step {
    /// Virtual time before the operation.
    gap_ms: u64,
    op: Op,
}

#[derive(Clone)]
struct Scenario {
    /// The model's time between words.
    pace_ms: u64,
    sessions: usize,
    clients: Vec<ClientSpec>,
    steps: Vec<Step>,
}

/// Shortly, a step a line: proptest prints the failing case with it.
impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "pace {} ms, {} sessions, clients (host, session, key):",
            self.pace_ms, self.sessions
        )?;
        for (i, c) in self.clients.iter().enumerate() {
            writeln!(f, "  c{i}: h{} s{} {}", c.host, c.session, KEYS[c.key])?;
        }
        writeln!(f, "steps (client numbers modulo {}):", self.clients.len())?;
        for step in &self.steps {
            writeln!(f, "  +{} ms {:?}", step.gap_ms, step.op)?;
        }
        Ok(())
    }
}

fn op() -> impl Strategy<Value = Op> {
    // Half the time one of session 0's pair of clients (see `scenario`).
    let client = prop_oneof![0..2usize, 0..16usize];
    let host = 0..HOSTS;
    prop_oneof![
        8 => (client.clone(), prop_oneof![1 => 0..8usize, 2 => 40..240usize])
            .prop_map(|(client, words)| Op::Prompt { client, words }),
        1 => client.clone().prop_map(|client| Op::Cancel { client }),
        1 => client.prop_map(|client| Op::Disconnect { client }),
        1 => (host.clone(), any::<bool>()).prop_map(|(host, fresh_id)| Op::Crash { host, fresh_id }),
        1 => host.clone().prop_map(|host| Op::FailSave { host }),
        1 => host.clone().prop_map(|host| Op::LoseAnswer { host }),
        1 => host.clone().prop_map(|host| Op::FailLoad { host }),
        2 => (host, prop_oneof![1 => 100..4_000u64, 3 => 6_000..16_000u64])
            .prop_map(|(host, ms)| Op::Hang { host, ms }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (2..=3usize, 50..=200u64).prop_flat_map(|(sessions, pace_ms)| {
        // Session 0 has a client of key a on each host; the others are
        // anywhere, mostly of the key of their session's other clients (a
        // stranger: the other key).
        let pair = (0..HOSTS).map(|host| ClientSpec {
            host,
            session: 0,
            key: 0,
        });
        let pair: Vec<ClientSpec> = pair.collect();
        let spec = (0..HOSTS, 0..sessions, prop::bool::weighted(0.25)).prop_map(
            |(host, session, stranger)| ClientSpec {
                host,
                session,
                key: (session + usize::from(stranger)) % KEYS.len(),
            },
        );
        let gap = prop_oneof![0..50u64, 0..3_000u64];
        let step = (gap, op()).prop_map(|(gap_ms, op)| Step { gap_ms, op });
        (
            prop::collection::vec(spec, 1..=3),
            prop::collection::vec(step, 1..=32),
        )
            .prop_map(move |(others, steps)| Scenario {
                pace_ms,
                sessions,
                clients: pair.iter().copied().chain(others).collect(),
                steps,
            })
    })
}

/// One connection of a client slot.
struct Live {
    session: String,
    key: usize,
    /// The host's incarnation it connected to.
    generation: u64,
    client: Client,
    /// The connection's prompt queue: one turn at a time, in order.
    queue: tokio::sync::Mutex<()>,
    /// The running turn's control.
    running: Mutex<Option<Arc<TurnControl>>>,
    closed: AtomicBool,
}

struct Host {
    id: String,
    generation: u64,
    locks: Arc<SessionLocks>,
    store: FakeStore,
    tasks: Vec<JoinHandle<()>>,
}

/// How a prompt's turn ended, in the order turns ended.
#[derive(Debug)]
struct Outcome {
    session: String,
    text: String,
    status: Status,
}

/// What a run left: the store, every connection, every ended turn.
struct World {
    store: FakeStore,
    model: FakeModel,
    sessions: Vec<String>,
    lives: Vec<Arc<Live>>,
    outcomes: Vec<Outcome>,
    /// Prompt tasks that had not ended long after the faults were lifted.
    stuck: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

async fn play(scenario: &Scenario) -> World {
    let store = FakeStore::new(true);
    let model = FakeModel::new(Duration::from_millis(scenario.pace_ms));
    let sessions: Vec<String> = (0..scenario.sessions).map(|i| format!("s{i}")).collect();
    let mut hosts: Vec<Host> = (0..HOSTS)
        .map(|i| Host {
            id: format!("h{i}.0"),
            generation: 0,
            locks: Arc::default(),
            store: store.handle(),
            tasks: Vec::new(),
        })
        .collect();
    let mut slots: Vec<Option<Arc<Live>>> = vec![None; scenario.clients.len()];
    let mut lives = Vec::new();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut unhangs = Vec::new();
    let mut prompts = 0;
    for step in &scenario.steps {
        tokio::time::sleep(Duration::from_millis(step.gap_ms)).await;
        match step.op {
            Op::Prompt { client, words } => {
                let slot = client % scenario.clients.len();
                let spec = scenario.clients[slot];
                let host = &mut hosts[spec.host];
                let current = slots[slot].clone().filter(|live| {
                    live.generation == host.generation && !live.closed.load(Ordering::SeqCst)
                });
                let live = current.unwrap_or_else(|| {
                    let session = sessions[spec.session].clone();
                    let live = Arc::new(Live {
                        client: Client::new(&host.id, &host.store, &session, KEYS[spec.key]),
                        session,
                        key: spec.key,
                        generation: host.generation,
                        queue: tokio::sync::Mutex::new(()),
                        running: Mutex::new(None),
                        closed: AtomicBool::new(false),
                    });
                    slots[slot] = Some(live.clone());
                    lives.push(live.clone());
                    live
                });
                prompts += 1;
                let mut text = format!("p{prompts}{}", KEYS[spec.key]);
                for _ in 0..words {
                    text.push_str(" w");
                }
                let (locks, model, outcomes) =
                    (host.locks.clone(), model.clone(), outcomes.clone());
                host.tasks.push(tokio::spawn(async move {
                    let _turn = live.queue.lock().await;
                    if live.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let control = Arc::new(TurnControl::default());
                    *lock(&live.running) = Some(control.clone());
                    let status = live
                        .client
                        .prompt_with(&locks, &model, &text, control)
                        .await;
                    *lock(&live.running) = None;
                    lock(&outcomes).push(Outcome {
                        session: live.session.clone(),
                        text,
                        status,
                    });
                }));
            }
            Op::Cancel { client } | Op::Disconnect { client } => {
                let slot = client % scenario.clients.len();
                let Some(live) = slots[slot].clone() else {
                    continue;
                };
                if matches!(step.op, Op::Disconnect { .. }) {
                    live.closed.store(true, Ordering::SeqCst);
                    live.client.frames.gone.store(true, Ordering::SeqCst);
                }
                let running = lock(&live.running).clone();
                if let Some(control) = running {
                    control.cancel();
                }
            }
            Op::Crash {
                host: index,
                fresh_id,
            } => {
                let host = &mut hosts[index];
                // All at once: a task let run again would start the next
                // queued prompt of its connection.
                for task in &host.tasks {
                    task.abort();
                }
                for task in host.tasks.drain(..) {
                    let _ = task.await;
                }
                host.generation += 1;
                host.locks = Arc::default();
                if fresh_id {
                    host.id = format!("h{index}.{}", host.generation);
                }
            }
            Op::FailSave { host } => hosts[host].store.fail_saves.store(1, Ordering::SeqCst),
            Op::LoseAnswer { host } => hosts[host].store.lose_answers.store(1, Ordering::SeqCst),
            Op::FailLoad { host } => hosts[host].store.fail_loads.store(1, Ordering::SeqCst),
            Op::Hang { host, ms } => {
                let hang = hosts[host].store.hang.clone();
                hang.store(true, Ordering::SeqCst);
                unhangs.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    hang.store(false, Ordering::SeqCst);
                }));
            }
        }
    }
    // Let the hangs run their course and the turns go on for a minute (a
    // fault still armed hits a call of theirs), then lift what is still
    // armed and let every turn end.
    for unhang in unhangs {
        unhang.await.expect("unhang");
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    for host in &hosts {
        host.store.fail_saves.store(0, Ordering::SeqCst);
        host.store.lose_answers.store(0, Ordering::SeqCst);
        host.store.fail_loads.store(0, Ordering::SeqCst);
    }
    let mut stuck = 0;
    for host in &mut hosts {
        for task in host.tasks.drain(..) {
            match tokio::time::timeout(Duration::from_secs(3_600), task).await {
                Ok(ended) => ended.expect("a prompt task panicked"),
                Err(_) => stuck += 1,
            }
        }
    }
    let outcomes = std::mem::take(&mut *lock(&outcomes));
    World {
        store,
        model,
        sessions,
        lives,
        outcomes,
        stuck,
    }
}

/// The key of a prompt's tag word (`p17a`), if `word` is one.
fn tag_key(word: &str) -> Option<usize> {
    let rest = word.strip_prefix('p')?;
    let key = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    (key.len() < rest.len())
        .then(|| KEYS.iter().position(|k| *k == key))
        .flatten()
}

/// A client's frames, a short line each (runs of the same delta as one):
/// sequence, name, what it says.
fn brief(frames: &FakeFrames) -> String {
    let mut lines: Vec<(String, u64, u64)> = Vec::new();
    for frame in frames.all() {
        let data = &frame["data"];
        let event = &data["event"];
        let what = [
            &frame["name"],
            &event["type"],
            &event["status"],
            &event["text"],
            &event["error"]["code"],
            &data["entry"]["data"]["code"],
            &data["meta"]["interactionId"],
        ]
        .iter()
        .filter_map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(" ");
        let sequence = data["meta"]["sequence"].as_u64().unwrap_or_default();
        match lines.last_mut() {
            Some((last, _, to)) if *last == what && what.contains("delta") => *to = sequence,
            _ => lines.push((what, sequence, sequence)),
        }
    }
    lines
        .iter()
        .map(|(what, from, to)| match from == to {
            true => format!("  {from} {what}\n"),
            false => format!("  {from}..={to} {what}\n"),
        })
        .collect()
}

/// Stored messages, shortly: `user p3a+40w`, `assistant echo: p3a+12w`.
fn show(messages: &[(String, String)]) -> String {
    let short = |text: &str| {
        let words: Vec<&str> = text.split_whitespace().collect();
        let tag = words.iter().position(|w| tag_key(w).is_some());
        match tag {
            Some(at) => format!(
                "{}+{}w",
                words[..=at].join(" "),
                words.len().saturating_sub(at + 1)
            ),
            None => text.to_owned(),
        }
    };
    messages
        .iter()
        .map(|(role, content)| format!("{role} {}", short(content)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sequence numbers of a client's turn frames (`interaction.model` and
/// `interaction.turn`) of the turns that ran. The end frame of a prompt that
/// was never run (its claim failed or was cancelled: no model event) is left
/// out: the core numbers it with the last number the client was sent, which
/// is checked here, so it repeats that number without advancing it.
fn ran(frames: &FakeFrames) -> Result<Vec<u64>, TestCaseError> {
    let mut ran = Vec::new();
    let mut in_turn = false;
    for frame in frames.all() {
        let sequence = frame["data"]["meta"]["sequence"].as_u64();
        match frame["name"].as_str() {
            Some("interaction.model") => in_turn = true,
            Some("interaction.turn") if !in_turn => {
                prop_assert_eq!(
                    sequence,
                    Some(ran.last().copied().unwrap_or(0)),
                    "the end frame of a prompt not run is not numbered with the last number \
                     sent:\n{}",
                    brief(frames)
                );
                continue;
            }
            Some("interaction.turn") => in_turn = false,
            _ => continue,
        }
        ran.push(sequence.expect("numbered"));
    }
    Ok(ran)
}

/// Invariant 1: each completed turn's prompt is stored once, its whole
/// answer right after it, in the order the turns completed; and any answer,
/// whole or partial, is stored only right after its own prompt.
fn check_history(world: &World, session: &str) -> Result<(), TestCaseError> {
    let messages = world.store.messages(session);
    let mut last_at = None;
    let completed = world
        .outcomes
        .iter()
        .filter(|o| o.session == session && o.status == Status::Completed);
    for outcome in completed {
        let at: Vec<usize> = messages
            .iter()
            .enumerate()
            .filter(|(_, (role, content))| role == "user" && *content == outcome.text)
            .map(|(i, _)| i)
            .collect();
        prop_assert_eq!(
            at.len(),
            1,
            "completed prompt {} stored {} times in {}: {}",
            show(&[("user".to_owned(), outcome.text.clone())]),
            at.len(),
            session,
            show(&messages)
        );
        let whole = ("assistant".to_owned(), format!("echo: {}", outcome.text));
        prop_assert!(
            messages.get(at[0] + 1) == Some(&whole),
            "completed prompt {} not followed by its whole answer in {}: {}",
            show(&messages[at[0]..=at[0]]),
            session,
            show(&messages)
        );
        prop_assert!(
            last_at < Some(at[0]),
            "completed turn {} stored before one that completed earlier in {}: {}",
            show(&messages[at[0]..=at[0]]),
            session,
            show(&messages)
        );
        last_at = Some(at[0]);
    }
    for (i, (role, content)) in messages.iter().enumerate() {
        if role == "user" {
            prop_assert!(
                !messages[..i].contains(&messages[i]),
                "prompt {} stored twice in {}: {}",
                show(&messages[i..=i]),
                session,
                show(&messages)
            );
            continue;
        }
        let prompt = i
            .checked_sub(1)
            .map(|before| &messages[before])
            .filter(|(role, _)| role == "user");
        prop_assert!(
            prompt.is_some_and(|(_, prompt)| format!("echo: {prompt}").starts_with(content)),
            "answer {} not right after its own prompt in {}: {}",
            show(&messages[i..=i]),
            session,
            show(&messages)
        );
    }
    Ok(())
}

/// Invariant 2: no sequence number sent twice on the session, across all
/// its clients (the end frames of prompts never run aside: see [`ran`]).
fn check_numbers(world: &World, session: &str) -> Result<(), TestCaseError> {
    let mut sent: HashMap<u64, usize> = HashMap::new();
    for (client, live) in world.lives.iter().enumerate() {
        if live.session != session {
            continue;
        }
        for sequence in ran(&live.client.frames)? {
            if let Some(other) = sent.insert(sequence, client) {
                let frames = |i: usize| brief(&world.lives[i].client.frames);
                prop_assert!(
                    false,
                    "sequence {} sent twice on {} (connections {} and {}):\n{}\n{}",
                    sequence,
                    session,
                    other,
                    client,
                    frames(other),
                    frames(client)
                );
            }
        }
    }
    Ok(())
}

/// Invariant 4: a stored session holds the prompts of its owner's key only,
/// and a client is sent the text of its own key's prompts only.
fn check_keys(world: &World) -> Result<(), TestCaseError> {
    for session in &world.sessions {
        let messages = world.store.messages(session);
        let owner = world.store.owner(session);
        for (_, content) in &messages {
            for key in content.split_whitespace().filter_map(tag_key) {
                prop_assert_eq!(
                    Some(KEYS[key]),
                    owner.as_deref(),
                    "a prompt of key {} in {} owned by {:?}: {}",
                    KEYS[key],
                    session,
                    owner,
                    show(&messages)
                );
            }
        }
    }
    for live in &world.lives {
        let text = live.client.frames.text();
        for key in text.split_whitespace().filter_map(tag_key) {
            prop_assert_eq!(
                key,
                live.key,
                "a client of key {} on {} was sent:\n{}",
                KEYS[live.key],
                live.session,
                brief(&live.client.frames)
            );
        }
    }
    Ok(())
}

fn check(world: &World) -> Result<(), TestCaseError> {
    prop_assert_eq!(world.stuck, 0, "turns still running long after the faults");
    for session in &world.sessions {
        check_history(world, session)?;
        check_numbers(world, session)?;
        // Invariant 3: one turn of a session streams at a time.
        prop_assert!(
            world.model.most_at_once(session) <= 1,
            "{} turns of {} streamed at once",
            world.model.most_at_once(session),
            session
        );
    }
    check_keys(world)
}

proptest! {
    // PROPTEST_CASES=2000 searches longer; PROPTEST_RNG_SEED replays a run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(64),
        max_shrink_iters: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Overlapping turns on two hosts, with crashes, cancels and store faults, keep the core's guarantees.
    #[test]
    fn turns_on_two_hosts_keep_the_guarantees(scenario in scenario()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let world = runtime.block_on(play(&scenario));
        check(&world)?;
    }
}
