//! The ways a backend runs. Adapters that are not stepped
//! (`ModelAdapter::stepped` is false: the provider plugins, llama, the
//! template) run each turn on the blocking pool; echo runs in steps on the
//! runtime's workers, on the host's timer, or (`threaded`) woken by a thread
//! of its own. These tests drive each path through the real host.

use llm_host_tests::{Config, Host, Plugin, Turn, Workdir, STANDARD_PLUGINS};
use serde_json::json;

use crate::common::assert_contiguous;

/// The default config plus `shout` (template, upper-case, `delay_ms` a word)
/// and `threaded` (echo, 40 synthetic tokens made by its own thread 20 ms
/// apart), with `server` lines added.
fn start(delay_ms: u64, server: &str) -> Host {
    let mut config = Config {
        server_extra: server.to_owned(),
        extra: format!(
            "[models.shout]\nplugin = \"template\"\nsettings = {{ delay_ms = {delay_ms} }}\n"
        ),
        ..Config::default()
    };
    config.models.push((
        "threaded".to_owned(),
        "{ tokens = 40, delay_ms = 20, threaded = true }".to_owned(),
    ));
    start_with(&config, Plugin::Template)
}

/// The host on `config`, with `plugin` beside the standard plugins.
fn start_with(config: &Config, plugin: Plugin) -> Host {
    let mut plugins = STANDARD_PLUGINS.to_vec();
    plugins.push(plugin);
    let workdir = Workdir::new(&plugins);
    workdir.write_config(&config.to_toml());
    Host::start_in(workdir, &[])
}

// A blocking adapter and a stepped one take turns on one connection: both
// stream, the history reaches both, and sequence numbers stay contiguous.
#[tokio::test]
async fn blocking_and_stepped_turns_share_a_session() {
    let host = start(0, "");
    let mut client = host.connect_command("/v1/ws?model=shout").await;
    client.next_json().await;

    client
        .send_json(&json!({"type": "prompt", "text": "hello there"}))
        .await;
    let first = client.read_turn().await;
    assert_eq!(first.status(), "completed", "{}", first.dump());
    assert_eq!(first.text(), "HELLO THERE", "{}", first.dump());
    let last = assert_contiguous(&first, 1);

    client
        .send_json(&json!({"type": "prompt", "text": "again", "model": "echo"}))
        .await;
    let second = client.read_turn().await;
    assert_eq!(second.text(), "echo: again", "{}", second.dump());
    // echo counts the words of the whole history as input tokens.
    assert_eq!(second.input_tokens(), Some(5), "{}", second.dump());
    let last = assert_contiguous(&second, last + 1);

    client
        .send_json(&json!({"type": "prompt", "text": "and back"}))
        .await;
    let third = client.read_turn().await;
    assert_eq!(third.text(), "AND BACK", "{}", third.dump());
    assert_eq!(third.interaction_id(), "turn-3", "{}", third.dump());
    assert_contiguous(&third, last + 1);
}

// A cancel stops a blocking adapter mid-turn; the partial answer is kept.
#[tokio::test]
async fn a_cancel_stops_a_blocking_adapter() {
    let host = start(100, "");
    let mut client = host.connect_command("/v1/ws?model=shout").await;
    client.next_json().await;
    let prompt = "one two three four five six seven eight nine ten eleven twelve";
    client
        .send_json(&json!({"type": "prompt", "text": prompt}))
        .await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    client.send_json(&json!({"type": "cancel"})).await;
    frames.extend(client.read_turn().await.frames);
    let turn = Turn { frames };
    assert_eq!(turn.status(), "cancelled", "{}", turn.dump());
    assert_eq!(turn.finish_reason(), Some("cancelled"), "{}", turn.dump());
    let words = turn.deltas().len();
    assert!((1..12).contains(&words), "{}", turn.dump());

    client
        .send_json(&json!({"type": "prompt", "text": "next", "model": "echo"}))
        .await;
    let next = client.read_turn().await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
    assert_eq!(
        next.input_tokens(),
        Some(12 + words as u64 + 1),
        "the partial answer is in the history: {}",
        next.dump()
    );
}

// The turn deadline stops a blocking adapter too.
#[tokio::test]
async fn the_turn_deadline_stops_a_blocking_adapter() {
    let host = start(400, "turn_timeout_secs = 1");
    let mut client = host.connect("/v1/ws?model=shout").await;
    client.next_json().await;
    client.send_text("a b c d e f g h").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "failed", "{}", turn.dump());
    let error = turn
        .model_event("error")
        .unwrap_or_else(|| panic!("no error: {}", turn.dump()));
    assert_eq!(error["error"]["code"], "turn_timeout", "{}", turn.dump());
    assert!(turn.deltas().len() < 8, "stopped early: {}", turn.dump());
}

// A stepped adapter whose tokens come from a thread of its own (its steps
// answer pending until the thread wakes the host) streams every token in
// order, and a cancel ends it while it waits.
#[tokio::test]
async fn a_pending_turn_streams_when_woken_and_can_be_cancelled() {
    let host = start(0, "");
    let mut client = host.connect_command("/v1/ws?model=threaded").await;
    client.next_json().await;

    client
        .send_json(&json!({"type": "prompt", "text": "go"}))
        .await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    let expected: Vec<String> = (0..40)
        .map(|i| {
            if i == 0 {
                "token0".to_owned()
            } else {
                format!(" token{i}")
            }
        })
        .collect();
    assert_eq!(turn.deltas(), expected, "{}", turn.dump());
    let last = assert_contiguous(&turn, 1);

    client
        .send_json(&json!({"type": "prompt", "text": "again"}))
        .await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    client.send_json(&json!({"type": "cancel"})).await;
    frames.extend(client.read_turn().await.frames);
    let turn = Turn { frames };
    assert_eq!(turn.status(), "cancelled", "{}", turn.dump());
    assert!(turn.deltas().len() < 40, "{}", turn.dump());
    assert_contiguous(&turn, last + 1);
}

// A step that emits far more than it should before returning is cut off at
// the host's limit: the turn fails with an error that says why, what was
// sent stays contiguous, and the session goes on.
#[tokio::test]
async fn a_step_that_floods_is_cut_off() {
    let mut config = Config {
        extra: "[models.flood]\nplugin = \"broken\"\nsettings = { stepped = true, flood = 5000 }\n"
            .to_owned(),
        ..Config::default()
    };
    config.models.retain(|(name, _)| name == "echo");
    let host = start_with(&config, Plugin::Broken);
    let mut client = host.connect_command("/v1/ws?model=flood").await;
    client.next_json().await;

    client
        .send_json(&json!({"type": "prompt", "text": "go"}))
        .await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "failed", "{}", turn.dump());
    let error = turn
        .model_event("error")
        .unwrap_or_else(|| panic!("no error: {}", turn.dump()));
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("more than 1024 events"), "{}", turn.dump());
    assert!(
        turn.deltas().len() <= 1024,
        "{} deltas",
        turn.deltas().len()
    );
    let last = assert_contiguous(&turn, 1);

    client
        .send_json(&json!({"type": "prompt", "text": "after", "model": "echo"}))
        .await;
    let next = client.read_turn().await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
    assert_contiguous(&next, last + 1);
}
