//! Plugins built against earlier plugin-api releases in this host, and
//! plugins built against today's in hosts that know only an earlier one.
//! Each test is a row of the compatibility table in PLUGIN-GUIDE.md,
//! section 9. The libraries and the old hosts are built from
//! tests/fixtures/contract-0.1.0 (vendored copies of those plugin-api
//! releases, in cargo workspaces of their own).

use std::path::Path;
use std::process::{Command, Output};

use llm_host_tests::{
    contract_fixtures, http, json, words, Config, Host, Plugin, Turn, Workdir, STANDARD_PLUGINS,
};

use crate::common::assert_contiguous;

/// A host with the standard plugins and `plugins`, the default config plus
/// `extra` (model and store tables), and `store` as the default store.
fn start_with(plugins: &[Plugin], store: &str, extra: &str) -> Host {
    let mut all = STANDARD_PLUGINS.to_vec();
    all.extend_from_slice(plugins);
    let workdir = Workdir::new(&all);
    let config = Config {
        store: store.to_owned(),
        extra: extra.to_owned(),
        ..Config::default()
    };
    workdir.write_config(&config.to_toml());
    let listing = workdir.list_plugins();
    assert!(
        listing.status.success() && !listing.all_output().contains("not loaded"),
        "every library loads:\n{listing}"
    );
    Host::start_in(workdir, &[])
}

/// What an echo answering with `prefix` streams for `prompt`.
fn echoed(prefix: &str, prompt: &str) -> String {
    std::iter::once(prefix.to_owned())
        .chain(prompt.split_whitespace().map(|word| format!(" {word}")))
        .collect()
}

fn assert_echoed(turn: &Turn, prefix: &str, prompt: &str, input_tokens: u64, id: &str) {
    let dump = turn.dump();
    assert_eq!(turn.text(), echoed(prefix, prompt), "{dump}");
    assert_eq!(turn.status(), "completed", "{dump}");
    assert_eq!(turn.interaction_id(), id, "{dump}");
    assert_eq!(turn.finish_reason(), Some("stop"), "{dump}");
    assert_eq!(
        turn.input_tokens(),
        Some(input_tokens),
        "the whole conversation reached the model:\n{dump}"
    );
}

/// Two turns on `model` in session `session`, the second after
/// reconnecting: the history must come back from the default store.
async fn serves_a_session(host: &Host, model: &str, prefix: &str, session: &str) {
    let path = format!("/v1/ws?session={session}&model={model}");
    let mut client = host.connect(&path).await;
    client.next_json().await;
    client.send_text("Hello, world").await;
    let first = client.read_turn().await;
    assert_echoed(&first, prefix, "Hello, world", 2, "turn-1");
    let last = assert_contiguous(&first, 1);
    client.close().await;

    let mut client = host.connect(&path).await;
    let open = client.next_json().await;
    assert_eq!(open.event()["resumed"], true, "{}", open.text);
    assert_eq!(open.event()["lastSequence"], last, "{}", open.text);
    client.send_text("again").await;
    let second = client.read_turn().await;
    let history = words("Hello, world") + words(&first.text()) + words("again");
    assert_echoed(&second, prefix, "again", history, "turn-2");
    assert_contiguous(&second, last + 1);
    client.close().await;

    let reply = http(host.addr(), "GET", &format!("/v1/sessions/{session}")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = http(host.addr(), "GET", "/v1/sessions").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains(session), "listed: {}", reply.body);
    let ready = http(host.addr(), "GET", "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
}

/// A paced turn on `model`, cancelled after its first token.
async fn cancels(host: &Host, model: &str) {
    let mut client = host.connect_command(&format!("/v1/ws?model={model}")).await;
    client.next_json().await;
    client
        .send_json(&json!({"type": "prompt", "text": "count"}))
        .await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    client.send_json(&json!({"type": "cancel"})).await;
    frames.extend(client.read_turn().await.frames);
    let cancelled = Turn { frames };
    let dump = cancelled.dump();
    assert_eq!(cancelled.status(), "cancelled", "{dump}");
    assert_eq!(cancelled.finish_reason(), Some("cancelled"), "{dump}");
    assert!(
        words(&cancelled.text()) < 100,
        "the model stopped early:\n{dump}"
    );
}

/// The host's log says plugin `name` was loaded through `contract`.
fn assert_loaded_through(host: &Host, name: &str, contract: &str) {
    let log = host.log();
    let (plugin, contract) = (
        format!(" plugin={name} "),
        format!(" contract=\"{contract}\""),
    );
    assert!(
        log.lines().any(|line| line.contains("plugin loaded")
            && line.contains(&plugin)
            && line.contains(&contract)),
        "plugin `{name}` loaded through{contract}:\n{log}"
    );
}

// Host 0.1.2 x plugins built against plugin-api 0.1.0 as last published
// (commit efb72fe): the issue. They load (through the 0.1.0 layout) and serve
// turns with their model not stepped, so on a thread each through `generate`,
// paced and cancelled alike, and sessions with their in-process store.
#[tokio::test]
async fn plugins_built_against_0_1_0_serve_turns_and_sessions() {
    let host = start_with(
        &[Plugin::EchoV010, Plugin::MemoryV010],
        "old",
        "\n[models.old]\nplugin = \"echo-v010\"\n\
         \n[models.old_slow]\nplugin = \"echo-v010\"\nsettings = { delay_ms = 50, tokens = 100 }\n\
         \n[stores.old]\nplugin = \"memory-v010\"\n",
    );
    assert_loaded_through(&host, "echo-v010", "0.1.0 (last layout)");
    assert_loaded_through(&host, "memory-v010", "0.1.0 (last layout)");
    serves_a_session(&host, "old", "echo-v010:", "compat-last").await;
    cancels(&host, "old_slow").await;
    // Today's echo, beside it, on the same store.
    serves_a_session(&host, "echo", "echo:", "compat-today").await;
}

// Host 0.1.2 x a store built against plugin-api 0.1.0 with `ping` (commit
// 7927f3a, before `in_process`): loads, serves sessions, answers readiness.
#[tokio::test]
async fn a_store_built_against_0_1_0_with_ping_serves_sessions() {
    let host = start_with(
        &[Plugin::MemoryV010Ping],
        "ping",
        "\n[stores.ping]\nplugin = \"memory-v010-ping\"\n",
    );
    assert_loaded_through(&host, "memory-v010-ping", "0.1.0 (layout with ping)");
    serves_a_session(&host, "echo", "echo:", "compat-ping").await;
}

// Host 0.1.2 x a store built against plugin-api 0.1.0 of commit 43e095b,
// whose StoreAdapter has `blocks` where the last 0.1.0 layout has
// `in_process`: it matches the layout with ping (a library may have more
// fields than the layout it is checked against; `blocks` is never called),
// loads beside a store of that layout itself, and serves sessions.
#[tokio::test]
async fn a_store_built_against_0_1_0_with_blocks_serves_sessions() {
    let host = start_with(
        &[Plugin::MemoryV010Blocks, Plugin::MemoryV010Ping],
        "blocks",
        "\n[stores.blocks]\nplugin = \"memory-v010-blocks\"\n\
         \n[stores.ping]\nplugin = \"memory-v010-ping\"\n",
    );
    assert_loaded_through(&host, "memory-v010-blocks", "0.1.0 (layout with ping)");
    assert_loaded_through(&host, "memory-v010-ping", "0.1.0 (layout with ping)");
    serves_a_session(&host, "echo", "echo:", "compat-blocks").await;
}

// Host 0.1.2 x plugins built against plugin-api 0.1.0 as first released
// (commit 9a21da3, whose HostApi and StoreAdapter end earlier): they load
// and serve turns and sessions; the store, which cannot be asked, is ready.
#[tokio::test]
async fn plugins_built_against_the_first_0_1_0_serve_turns_and_sessions() {
    let host = start_with(
        &[Plugin::EchoV010First, Plugin::MemoryV010First],
        "first",
        "\n[models.first]\nplugin = \"echo-v010-first\"\n\
         \n[models.first_slow]\nplugin = \"echo-v010-first\"\n\
         settings = { delay_ms = 50, tokens = 100 }\n\
         \n[stores.first]\nplugin = \"memory-v010-first\"\n",
    );
    assert_loaded_through(&host, "echo-v010-first", "0.1.0 (initial layout)");
    assert_loaded_through(&host, "memory-v010-first", "0.1.0 (initial layout)");
    serves_a_session(&host, "first", "echo-v010-first:", "compat-first").await;
    cancels(&host, "first_slow").await;
}

// Host 0.1.2 x a plugin built against plugin-api 0.1.1: its turns run in
// steps, as on a host of 0.1.1.
#[tokio::test]
async fn a_plugin_built_against_0_1_1_runs_its_turns_in_steps() {
    let host = start_with(
        &[Plugin::EchoV011],
        "memory",
        "\n[models.v011]\nplugin = \"echo-v011\"\n\
         \n[models.v011_slow]\nplugin = \"echo-v011\"\nsettings = { delay_ms = 50, tokens = 100 }\n",
    );
    assert_loaded_through(&host, "echo-v011", "current");
    serves_a_session(&host, "v011", "echo-v011:", "compat-v011").await;
    cancels(&host, "v011_slow").await;
}

/// `HOST LIBRARY PROMPT`, one of the old hosts of the fixtures.
fn old_host(host: &Path, library: &Path) -> Output {
    Command::new(host)
        .arg(library)
        .arg("Hello, world")
        .output()
        .expect("run an old host")
}

fn described(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_runs(output: &Output, expected: &[&str]) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", described(output));
    for line in expected {
        assert!(
            stdout.lines().any(|l| l == *line),
            "no line {line:?}:\n{}",
            described(output)
        );
    }
}

fn assert_refused(output: &Output, why: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(3), "{}", described(output));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("refused:") && l.contains(why)),
        "refused with {why:?}:\n{}",
        described(output)
    );
}

// Host 0.1.0 (as last published) x plugins built against 0.1.2 (today's
// echo, stepped, and memory) and against 0.1.1: they load (a library may
// have more than the host knows) and serve through what 0.1.0 knows.
#[test]
fn a_host_of_0_1_0_runs_plugins_built_against_today() {
    let fixtures = contract_fixtures();
    let echo = old_host(&fixtures.old_host, Plugin::Echo.path());
    assert_runs(
        &echo,
        &[
            "host: plugin-api 0.1.0",
            "library: plugin-api 0.1.2",
            "text: echo: Hello, world",
        ],
    );
    let memory = old_host(&fixtures.old_host, Plugin::Memory.path());
    assert_runs(
        &memory,
        &[
            "library: plugin-api 0.1.2",
            "store: saved 1; conflict 1; loaded version 1 {\"turns\":1}; \
             listed [old-host-session]; deleted true",
        ],
    );
    let v011 = old_host(&fixtures.old_host, Plugin::EchoV011.path());
    assert_runs(
        &v011,
        &["library: plugin-api 0.1.1", "text: echo-v011: Hello, world"],
    );
}

// Host 0.1.0 as first released x plugins built against anything later: refused,
// because 0.1.0 itself later moved `last_prefix_field` in HostApi and
// StoreAdapter (abi_stable wants the same prefix on both sides). Plugins of
// its own layout run.
#[test]
fn a_host_of_the_first_0_1_0_refuses_plugins_built_since() {
    let fixtures = contract_fixtures();
    let today = old_host(&fixtures.old_host_first, Plugin::Echo.path());
    assert_refused(&today, "prefix-types have a different prefix");
    let last = old_host(&fixtures.old_host_first, Plugin::EchoV010.path());
    assert_refused(&last, "prefix-types have a different prefix");
    let own = old_host(&fixtures.old_host_first, Plugin::EchoV010First.path());
    assert_runs(&own, &["text: echo-v010-first: Hello, world"]);
}

// Host 0.1.1 x plugins built against 0.1.0: refused with "too many fields",
// the issue this host (0.1.2) fixes by loading them through the 0.1.0 layout;
// x plugins built against 0.1.2: run.
#[test]
fn a_host_of_0_1_1_refused_plugins_built_against_0_1_0() {
    let fixtures = contract_fixtures();
    let old = old_host(&fixtures.old_host_v011, Plugin::EchoV010.path());
    assert_refused(&old, "too many fields");
    let today = old_host(&fixtures.old_host_v011, Plugin::Echo.path());
    assert_runs(
        &today,
        &["library: plugin-api 0.1.2", "text: echo: Hello, world"],
    );
}
