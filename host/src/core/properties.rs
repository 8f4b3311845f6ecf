//! A property test of the turn core: two hosts on one shared store, a few
//! sessions and clients of two keys, and a generated run of prompts,
//! cancels, disconnects, host crashes and store faults, overlapping under
//! tokio's paused clock; after each run the core's guarantees are checked
//! on what the store kept and what every client was sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio::task::JoinHandle;

use super::fakes::{FakeFrames, FakeModel, FakeStore};
use super::locks::SessionLocks;
use super::sink::{Status, TurnControl};
use super::{turn, Attachment, Party, Prompt, Scope, TurnSettings};
use crate::protocol::{Envelope, Framer};

/// The hosts sharing the store.
const HOSTS: usize = 2;
/// The keys clients use.
const KEYS: [&str; 2] = ["a", "b"];

/// One client of one host: its session and what it was sent (as in
/// `core::tests`).
struct Client {
    host: String,
    attachment: Attachment,
    frames: FakeFrames,
    store: FakeStore,
}

impl Client {
    fn new(host: &str, store: &FakeStore, session: &str, owner: &str) -> Self {
        let frames = FakeFrames::default();
        let party = Party {
            owner: owner.to_owned(),
            sees_all: false,
        };
        Self {
            host: host.to_owned(),
            attachment: Attachment::new(session.to_owned(), party, frames.last.clone()),
            frames,
            store: store.clone(),
        }
    }

    fn scope(&self) -> Scope<'_, FakeStore, FakeFrames> {
        Scope {
            host: &self.host,
            attachment: &self.attachment,
            store: &self.store,
            frames: &self.frames,
            framer: Framer {
                envelope: Envelope::Flat,
            },
            settings: TurnSettings::default(),
        }
    }

    async fn prompt_with(
        &self,
        locks: &SessionLocks,
        model: &FakeModel,
        text: &str,
        control: Arc<TurnControl>,
    ) -> Status {
        let prompt = Prompt {
            text: text.to_owned(),
            model: None,
            params: Box::default(),
        };
        turn::run(
            &self.scope(),
            locks,
            Arc::new(model.clone()),
            prompt,
            control,
        )
        .await
    }
}

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

#[derive(Debug, Clone)]
struct Scenario {
    /// The model's time between words.
    pace_ms: u64,
    sessions: usize,
    clients: Vec<ClientSpec>,
    steps: Vec<Step>,
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..16usize;
    let host = 0..HOSTS;
    prop_oneof![
        8 => (client.clone(), 0..12usize).prop_map(|(client, words)| Op::Prompt { client, words }),
        2 => client.clone().prop_map(|client| Op::Cancel { client }),
        1 => client.prop_map(|client| Op::Disconnect { client }),
        1 => (host.clone(), any::<bool>()).prop_map(|(host, fresh_id)| Op::Crash { host, fresh_id }),
        1 => host.clone().prop_map(|host| Op::FailSave { host }),
        1 => host.clone().prop_map(|host| Op::LoseAnswer { host }),
        1 => host.clone().prop_map(|host| Op::FailLoad { host }),
        1 => (host, 100..12_000u64).prop_map(|(host, ms)| Op::Hang { host, ms }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (2..=3usize, 50..=200u64).prop_flat_map(|(sessions, pace_ms)| {
        let spec = (0..HOSTS, 0..sessions, 0..KEYS.len())
            .prop_map(|(host, session, key)| ClientSpec { host, session, key });
        let gap = prop_oneof![0..50u64, 0..3_000u64];
        let step = (gap, op()).prop_map(|(gap_ms, op)| Step { gap_ms, op });
        (
            prop::collection::vec(spec, 2..=5),
            prop::collection::vec(step, 1..=24),
        )
            .prop_map(move |(clients, steps)| Scenario {
                pace_ms,
                sessions,
                clients,
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
                for task in host.tasks.drain(..) {
                    task.abort();
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
    // Lift every fault and let every turn end.
    for unhang in unhangs {
        unhang.abort();
    }
    for host in &hosts {
        host.store.hang.store(false, Ordering::SeqCst);
        host.store.fail_saves.store(0, Ordering::SeqCst);
        host.store.lose_answers.store(0, Ordering::SeqCst);
        host.store.fail_loads.store(0, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
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

/// A client's frames, one short line each: sequence, name, what it says.
fn brief(frames: &FakeFrames) -> String {
    frames
        .all()
        .iter()
        .map(|frame| {
            let data = &frame["data"];
            let event = &data["event"];
            let what = [
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
            format!(
                "  {:>3} {} {what}\n",
                data["meta"]["sequence"],
                frame["name"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

fn check(world: &World) -> Result<(), TestCaseError> {
    prop_assert_eq!(world.stuck, 0, "turns still running long after the faults");
    for session in &world.sessions {
        let messages = world.store.messages(session);
        // 1. Completed turns: the prompt, then its answer, once, in the
        // order the turns completed.
        let mut last_at = None;
        for outcome in world
            .outcomes
            .iter()
            .filter(|o| &o.session == session && o.status == Status::Completed)
        {
            let at: Vec<usize> = messages
                .iter()
                .enumerate()
                .filter(|(_, m)| m.0 == "user" && m.1 == outcome.text)
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(
                at.len(),
                1,
                "completed prompt {:?} stored {} times in {}: {:?}",
                outcome.text,
                at.len(),
                session,
                messages
            );
            let answer = messages.get(at[0] + 1);
            prop_assert_eq!(
                answer,
                Some(&("assistant".to_owned(), format!("echo: {}", outcome.text))),
                "completed prompt {:?} not followed by its answer in {}: {:?}",
                outcome.text,
                session,
                messages
            );
            prop_assert!(
                last_at < Some(at[0]),
                "completed turn {:?} stored before a turn that completed earlier in {}: {:?}",
                outcome.text,
                session,
                messages
            );
            last_at = Some(at[0]);
        }
        // 4. A stored session holds the prompts of one key only, its owner's.
        let owner = world.store.owner(session);
        for (_, content) in &messages {
            for key in content.split_whitespace().filter_map(tag_key) {
                prop_assert_eq!(
                    Some(KEYS[key]),
                    owner.as_deref(),
                    "a prompt of key {} in {} owned by {:?}: {:?}",
                    KEYS[key],
                    session,
                    owner,
                    messages
                );
            }
        }
        // 2. No number sent twice on the session, across its clients.
        let mut sent: HashMap<u64, usize> = HashMap::new();
        for (client, live) in world.lives.iter().enumerate() {
            if &live.session != session {
                continue;
            }
            for sequence in live.client.frames.turn_sequences() {
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
        // 3. One turn of a session streams at a time.
        prop_assert!(
            world.model.most_at_once(session) <= 1,
            "{} turns of {} streamed at once",
            world.model.most_at_once(session),
            session
        );
    }
    // 4. A client is sent the text of its own key's prompts only.
    for live in &world.lives {
        let text = live.client.frames.text();
        for key in text.split_whitespace().filter_map(tag_key) {
            prop_assert_eq!(
                key,
                live.key,
                "a client of key {} of {} was sent {:?}",
                KEYS[live.key],
                live.session,
                text
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
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
