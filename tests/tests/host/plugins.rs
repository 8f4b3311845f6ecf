//! Plugins that fail: errors, panics, and libraries built against another plugin API.

use llm_host_tests::{json, words, Config, Host, Plugin, Workdir, STANDARD_PLUGINS};

use crate::common::{assert_contiguous, assert_echo_turn, assert_shape, Envelope};

// fail_after: a model error event "injected_failure", turn "failed", the user message kept, connection open.
#[tokio::test]
async fn a_backend_error_fails_the_turn_and_keeps_the_prompt() {
    let host = Host::start_default();
    let mut client = host.connect_command("/v1/ws?model=failing").await;
    client.next_json().await;

    client
        .send_json(&json!({"type": "prompt", "text": "one two three"}))
        .await;
    let turn = client.read_turn().await;
    let dump = turn.dump();
    assert_eq!(turn.model_types(), ["start", "delta", "error"], "{dump}");
    assert_eq!(turn.deltas(), ["echo:"], "{dump}");
    let error_frame = turn
        .model_frames()
        .into_iter()
        .find(|frame| frame.event_type() == "error")
        .expect("an error event");
    assert_shape(error_frame, Envelope::Flat, "interaction.model");
    let error = &error_frame.event()["error"];
    assert_eq!(error["code"], "injected_failure", "{dump}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{dump}"
    );
    assert_eq!(turn.status(), "failed", "{dump}");
    assert_eq!(turn.interaction_id(), "turn-1", "{dump}");
    let last = assert_contiguous(&turn, 1);

    client
        .send_json(&json!({"type": "prompt", "text": "four", "model": "echo"}))
        .await;
    let turn = client.read_turn().await;
    let dump = turn.dump();
    assert_eq!(turn.interaction_id(), "turn-2", "{dump}");
    assert_eq!(turn.status(), "completed", "{dump}");
    let input = turn.input_tokens().unwrap_or_default();
    assert!(
        input >= words("one two three four"),
        "the failed turn's prompt stays in the history (inputTokens {input}):\n{dump}"
    );
    assert_contiguous(&turn, last + 1);
}

// panic_after: the panic becomes a "plugin_panic" error, the turn fails, and the host keeps serving.
#[tokio::test]
async fn a_panicking_plugin_fails_the_turn_and_the_host_survives() {
    let mut host = Host::start_default();
    let mut client = host.connect_command("/v1/ws?model=panicky").await;
    client.next_json().await;

    client
        .send_json(&json!({"type": "prompt", "text": "boom now"}))
        .await;
    let turn = client.read_turn().await;
    let dump = turn.dump();
    assert_eq!(turn.deltas(), ["echo:"], "{dump}");
    assert_eq!(
        turn.model_event("error")
            .map(|event| event["error"]["code"].clone()),
        Some(json!("plugin_panic")),
        "{dump}"
    );
    assert_eq!(turn.status(), "failed", "{dump}");

    // The same connection goes on, on a healthy backend.
    client
        .send_json(&json!({"type": "prompt", "text": "calm", "model": "echo"}))
        .await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.interaction_id(), "turn-2", "{}", turn.dump());

    // And so does the host.
    assert!(host.is_running(), "the host died:\n{}", host.log());
    let mut other = host.connect("/v1/ws").await;
    other.next_json().await;
    other.send_text("Hello, world").await;
    assert_echo_turn(&other.read_turn().await, "Hello, world", 2, "turn-1");
}

/// A plugin directory with echo, memory and `foreign`, and the default config.
fn workdir_with(foreign: Plugin) -> Workdir {
    let mut plugins = STANDARD_PLUGINS.to_vec();
    plugins.push(foreign);
    let workdir = Workdir::new(&plugins);
    workdir.write_config(&Config::default().to_toml());
    workdir
}

// A library built against another plugin API (version 0.0.7) is reported, readably, and the rest still load.
#[tokio::test]
async fn a_plugin_built_against_another_api_version_is_refused_readably() {
    let workdir = workdir_with(Plugin::Foreign);
    let listing = workdir.list_plugins();
    let output = listing.all_output();
    assert!(listing.status.success(), "{listing}");
    let fixture = Plugin::Foreign.file_name();
    assert!(output.contains(fixture), "names the file:\n{listing}");
    assert!(
        output.contains("0.0.7"),
        "names the library's version:\n{listing}"
    );
    assert!(
        output.contains("0.1"),
        "names the host's version:\n{listing}"
    );
    for plugin in STANDARD_PLUGINS {
        assert!(
            output.contains(plugin.file_name()),
            "still lists {}:\n{listing}",
            plugin.file_name()
        );
    }
    assert!(
        output.lines().count() < 40,
        "the report is short ({} lines):\n{listing}",
        output.lines().count()
    );

    // Serving starts anyway, says why the file was skipped, and works.
    let host = Host::start_in(workdir, &[]);
    let log = host.log();
    assert!(
        log.contains(fixture),
        "the log names the skipped file:\n{log}"
    );
    assert!(log.contains("0.0.7"), "the log gives its version:\n{log}");
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("Hello, world").await;
    assert_echo_turn(&client.read_turn().await, "Hello, world", 2, "turn-1");
}

// A library claiming plugin-api's version but with another root module layout is refused with a short message.
#[tokio::test]
async fn a_plugin_with_another_layout_is_refused_readably() {
    let workdir = workdir_with(Plugin::ForeignSameVersion);
    let listing = workdir.list_plugins();
    let output = listing.all_output();
    assert!(listing.status.success(), "{listing}");
    assert!(
        output.contains(Plugin::ForeignSameVersion.file_name()),
        "names the file:\n{listing}"
    );
    let lower = output.to_lowercase();
    assert!(
        lower.contains("incompatible") || lower.contains("layout"),
        "says the layout is incompatible:\n{listing}"
    );
    assert!(
        output.lines().count() < 40,
        "the report is short, not abi_stable's whole layout dump ({} lines):\n{listing}",
        output.lines().count()
    );
    assert!(output.contains(Plugin::Echo.file_name()), "{listing}");
    assert!(output.contains(Plugin::Memory.file_name()), "{listing}");

    let host = Host::start_in(workdir, &[]);
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("fine").await;
    assert_echo_turn(&client.read_turn().await, "fine", 1, "turn-1");
}
