//! Live operations: plugins and config.toml replaced while the host serves.

use std::path::Path;
use std::time::{Duration, Instant};

use llm_host_tests::{http, json, Config, Frame, Host, Plugin, Turn};
use serde_json::Value;

/// How long a reload may take to show, as a failure guard (debounce is 200 ms).
const RELOAD_WAIT: Duration = Duration::from_secs(20);

/// The operator's safe drop-in: copy to a temporary name in the same
/// directory, then rename over the live file.
fn move_in(source: &Path, plugin_dir: &Path, name: &str) {
    let tmp = plugin_dir.join(format!(".{name}.tmp"));
    std::fs::copy(source, &tmp).expect("copy the new build next to the live one");
    std::fs::rename(&tmp, plugin_dir.join(name)).expect("move it over the live one");
}

async fn plugins(host: &Host) -> Value {
    let reply = http(host.addr(), "GET", "/v1/plugins").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Polls `GET /v1/plugins` until `ready` holds; fails after [`RELOAD_WAIT`].
async fn wait_for(host: &Host, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        let status = plugins(host).await;
        if ready(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "waited {RELOAD_WAIT:?} for {what}; /v1/plugins: {status:#}\nlog:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Moves in a third build of echo (after echo 2.0.0) and waits for it: the
/// first build's bytes and a few more (a loader ignores bytes past an ELF
/// file's sections), so another hash.
async fn third_echo_build(host: &Host, plugin_dir: &Path) {
    let mut bytes = std::fs::read(Plugin::Echo.path()).expect("read echo");
    bytes.extend_from_slice(b"\0a third build");
    let third = host.workdir().path().join("third.so");
    std::fs::write(&third, bytes).expect("write the third build");
    move_in(&third, plugin_dir, Plugin::Echo.file_name());
    wait_for(host, "the third build", |s| {
        plugin(s, "echo")["version"] != "2.0.0" && plugin(s, "echo")["reloads"] == 2
    })
    .await;
}

fn plugin<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["plugins"]
        .as_array()
        .and_then(|plugins| plugins.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no plugin {name} in {status:#}"))
}

fn reloaded_diagnostic(frames: &[Frame]) -> Option<&Frame> {
    frames
        .iter()
        .find(|f| f.is_diagnostic() && f.diagnostic_code() == "reloaded")
}

// A turn that is streaming when echo is replaced finishes on the old code; the next turn runs the new one.
#[tokio::test]
async fn a_running_turn_keeps_its_plugin_and_the_next_turn_gets_the_new_one() {
    let host = Host::start_default();
    let plugin_dir = host.workdir().path().join("plugins");
    let mut client = host.connect("/v1/ws?model=slow_echo").await;
    client.next_json().await;

    client
        .send_text("alpha beta gamma delta epsilon zeta")
        .await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    move_in(Plugin::EchoV2.path(), &plugin_dir, Plugin::Echo.file_name());
    frames.extend(client.read_turn().await.frames);
    let first = Turn { frames };
    assert_eq!(first.status(), "completed", "{}", first.dump());
    assert_eq!(
        first.text(),
        "echo: alpha beta gamma delta epsilon zeta",
        "the running turn stays on the old library: {}",
        first.dump()
    );

    let status = wait_for(&host, "echo 2.0.0 to be active", |s| {
        plugin(s, "echo")["version"] == "2.0.0"
    })
    .await;
    assert_eq!(plugin(&status, "echo")["reloads"], 1, "{status:#}");
    assert_eq!(status["reloads"], 1, "{status:#}");

    client.send_text("omega").await;
    let mut second = client.read_turn().await;
    if reloaded_diagnostic(&first.frames).is_none() && reloaded_diagnostic(&second.frames).is_none()
    {
        // The notice may come after the second turn's frames.
        second.frames.push(client.next_json().await);
    }
    let notice = reloaded_diagnostic(&first.frames)
        .or_else(|| reloaded_diagnostic(&second.frames))
        .unwrap_or_else(|| {
            panic!(
                "no `reloaded` diagnostic: {}{}",
                first.dump(),
                second.dump()
            )
        });
    assert_eq!(notice.entry()["level"], "warn");
    assert_eq!(notice.entry()["kind"], "host");
    assert!(
        notice.entry()["message"]
            .as_str()
            .is_some_and(|m| m.contains("echo") && m.contains("2.0.0")),
        "{}",
        notice.text
    );
    assert_eq!(second.status(), "completed", "{}", second.dump());
    assert_eq!(second.text(), "echo v2: omega", "{}", second.dump());
}

// A new build under another file name replaces the old one once the old file is removed: the new file is probed, found to be `echo`, and loaded.
#[tokio::test]
async fn a_new_build_under_another_file_name_replaces_the_old_one() {
    let host = Host::start_default();
    let plugin_dir = host.workdir().path().join("plugins");
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("before").await;
    assert_eq!(client.read_turn().await.text(), "echo: before");

    move_in(
        Plugin::EchoV2.path(),
        &plugin_dir,
        Plugin::EchoV2.file_name(),
    );
    std::fs::remove_file(plugin_dir.join(Plugin::Echo.file_name())).expect("remove the old build");
    let status = wait_for(&host, "echo 2.0.0 to be active", |s| {
        plugin(s, "echo")["version"] == "2.0.0"
    })
    .await;
    assert!(
        plugin(&status, "echo")["file"]
            .as_str()
            .is_some_and(|f| f.ends_with(Plugin::EchoV2.file_name())),
        "{status:#}"
    );
    client.send_text("after").await;
    let turn = loop {
        let turn = client.read_turn().await;
        if turn.status() == "completed" {
            break turn;
        }
    };
    assert_eq!(turn.text(), "echo v2: after", "{}", turn.dump());
}

// Copying a new build over the live file in place (cp) is safe: the host only maps staged copies.
#[tokio::test]
async fn copying_over_the_live_library_in_place_is_safe() {
    let host = Host::start_default();
    let live = host
        .workdir()
        .path()
        .join("plugins")
        .join(Plugin::Echo.file_name());
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("before").await;
    assert_eq!(client.read_turn().await.text(), "echo: before");

    std::fs::copy(Plugin::EchoV2.path(), &live).expect("cp the new build over the live file");
    wait_for(&host, "echo 2.0.0 to be active", |s| {
        plugin(s, "echo")["version"] == "2.0.0"
    })
    .await;
    client.send_text("after").await;
    let turn = loop {
        let turn = client.read_turn().await;
        if turn.status() == "completed" {
            break turn;
        }
    };
    assert_eq!(turn.text(), "echo v2: after", "{}", turn.dump());
}

// A garbage file and a truncated copy are refused; the running set keeps serving and the error is kept.
#[tokio::test]
async fn garbage_and_truncated_libraries_are_refused_while_serving_continues() {
    let host = Host::start_default();
    let plugin_dir = host.workdir().path().join("plugins");
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;

    std::fs::write(plugin_dir.join("libjunk.so"), b"this is not a library")
        .expect("drop a garbage file");
    let status = wait_for(&host, "the garbage file to be reported", |s| {
        s["loadErrors"].as_array().is_some_and(|errors| {
            errors.iter().any(|e| {
                e["file"]
                    .as_str()
                    .is_some_and(|f| f.ends_with("libjunk.so"))
            })
        })
    })
    .await;
    let error = status["loadErrors"]
        .as_array()
        .and_then(|errors| {
            errors.iter().find(|e| {
                e["file"]
                    .as_str()
                    .is_some_and(|f| f.ends_with("libjunk.so"))
            })
        })
        .expect("the garbage file's error");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("not an ELF")),
        "{status:#}"
    );
    client.send_text("still here").await;
    assert_eq!(client.read_turn().await.text(), "echo: still here");

    // A copy of echo v2 cut off part-way, moved over the live echo.
    let bytes = std::fs::read(Plugin::EchoV2.path()).expect("read the new build");
    let truncated = plugin_dir.join(".truncated.tmp");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write a truncated copy");
    std::fs::rename(&truncated, plugin_dir.join(Plugin::Echo.file_name()))
        .expect("move it over the live echo");
    let status = wait_for(&host, "the refused reload to be reported", |s| {
        s["lastError"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(Plugin::Echo.file_name()))
    })
    .await;
    let message = status["lastError"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("truncated") || message.contains("not a readable"),
        "{message}"
    );
    assert_eq!(plugin(&status, "echo")["version"], "0.1.0", "{status:#}");
    assert_eq!(status["reloads"], 0, "{status:#}");

    client.send_text("and still").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.text(), "echo: and still", "{}", turn.dump());
    let mut fresh = host.connect("/v1/ws").await;
    fresh.next_json().await;
    fresh.send_text("new client").await;
    assert_eq!(fresh.read_turn().await.text(), "echo: new client");
}

// Five saves of config.toml in a burst cause one reload, which applies the last one.
#[tokio::test]
async fn a_burst_of_saves_causes_one_reload() {
    let host = Host::start_default();
    let base = Config::default().to_toml();
    for tokens in 4..=8 {
        let text = base.replace("{ tokens = 3 }", &format!("{{ tokens = {tokens} }}"));
        host.workdir().write_config(&text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(&host, "a reload", |s| s["reloads"] == 1).await;
    // Three debounce windows more: no second reload follows.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = plugins(&host).await;
    assert_eq!(status["reloads"], 1, "{status:#}\n{}", host.log());

    let mut client = host.connect("/v1/ws?model=short").await;
    client.next_json().await;
    client.send_text("count").await;
    let turn = client.read_turn().await;
    assert_eq!(
        turn.deltas().len(),
        8,
        "the last save applies: {}",
        turn.dump()
    );
}

// A config edit switches the default backend for the next turn of a connected session that chose none.
#[tokio::test]
async fn a_config_edit_switches_the_default_backend_for_the_next_turn() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("one two").await;
    assert_eq!(client.read_turn().await.text(), "echo: one two");

    let text = Config::default()
        .to_toml()
        .replace("model = \"echo\"", "model = \"short\"");
    host.workdir().write_config(&text);
    let notice = client.next_json().await;
    assert_eq!(notice.diagnostic_code(), "reloaded", "{}", notice.text);
    assert!(
        notice.entry()["message"]
            .as_str()
            .is_some_and(|m| m.contains("this session now uses the default backend `short`")),
        "{}",
        notice.text
    );

    client.send_text("one two").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.text(), "token0 token1 token2", "{}", turn.dump());

    let config = http(host.addr(), "GET", "/v1/config").await.json();
    assert_eq!(config["default_model"], "short", "{config:#}");
}

// A bad config edit changes nothing: the error is kept, POST /v1/reload answers 422, serving goes on.
#[tokio::test]
async fn a_bad_config_edit_changes_nothing() {
    let host = Host::start_default();
    let text = Config::default().to_toml();
    host.workdir()
        .write_config(&text.replace("[defaults]", "[defaults]\nmodle = \"x\""));
    let status = wait_for(&host, "the refused reload", |s| !s["lastError"].is_null()).await;
    assert!(
        status["lastError"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("modle")),
        "{status:#}"
    );
    assert_eq!(status["reloads"], 0);

    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "reload_failed");

    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("fine").await;
    assert_eq!(client.read_turn().await.text(), "echo: fine");

    // Fixing the file applies it.
    host.workdir().write_config(&text);
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

// Removing the backend a session chose moves it to the default, with a diagnostic.
#[tokio::test]
async fn a_removed_backend_moves_its_sessions_to_the_default() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?model=short").await;
    client.next_json().await;

    let text = Config::default().to_toml().replace(
        "[models.short]\nplugin = \"echo\"\nsettings = { tokens = 3 }\n",
        "",
    );
    assert!(
        !text.contains("models.short"),
        "the edit removes the backend"
    );
    host.workdir().write_config(&text);
    let notice = client.next_json().await;
    assert_eq!(notice.diagnostic_code(), "reloaded", "{}", notice.text);
    let message = notice.entry()["message"].as_str().unwrap_or_default();
    assert!(message.contains("backend `short` was removed"), "{message}");
    assert!(
        message.contains("now uses the default, `echo`"),
        "{message}"
    );

    client.send_text("moved").await;
    assert_eq!(client.read_turn().await.text(), "echo: moved");
}

// SIGHUP reloads; POST /v1/reload with nothing changed answers `unchanged`.
#[tokio::test]
async fn sighup_and_post_reload() {
    let host = Host::start(&Config {
        debounce_ms: 60_000,
        ..Config::default()
    });
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.json(), json!({"status": "unchanged"}));

    let text = Config::default()
        .to_toml()
        .replace("{ tokens = 3 }", "{ tokens = 5 }");
    host.workdir().write_config(&text);
    let signalled = std::process::Command::new("kill")
        .args(["-HUP", &host.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(signalled.success());
    let status = wait_for(&host, "the SIGHUP reload", |s| s["reloads"] == 1).await;
    assert!(status["lastError"].is_null(), "{status:#}");
}

/// The `.so` files in `dir`.
fn libraries_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read the staging directory")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".so"))
        .collect();
    names.sort();
    names
}

// The staging directory keeps the libraries in use and the generation
// before, and removes the rest (here at once: staging_grace_secs = 0), so
// swaps do not fill the disk.
#[tokio::test]
async fn staging_keeps_the_libraries_in_use_and_the_generation_before() {
    let workdir = llm_host_tests::Workdir::new(llm_host_tests::STANDARD_PLUGINS);
    let text = Config::default().to_toml().replacen(
        "[plugins]\n",
        "[plugins]\nstaging_dir = \"staging\"\nstaging_grace_secs = 0\n",
        1,
    );
    workdir.write_config(&text);
    let staging = workdir.path().join("staging");
    let plugin_dir = workdir.path().join("plugins");
    let host = Host::start_in(workdir, &[]);
    let first = libraries_in(&staging);
    assert_eq!(first.len(), 2, "echo and memory: {first:?}");

    move_in(Plugin::EchoV2.path(), &plugin_dir, Plugin::Echo.file_name());
    wait_for(&host, "echo 2.0.0", |s| {
        plugin(s, "echo")["version"] == "2.0.0"
    })
    .await;
    let second = libraries_in(&staging);
    assert_eq!(
        second.len(),
        3,
        "the old echo is the generation before: {second:?}"
    );

    third_echo_build(&host, &plugin_dir).await;
    let now = libraries_in(&staging);
    assert_eq!(now.len(), 3, "memory, echo 2.0.0 and the third: {now:?}");
    let gone: Vec<_> = first.iter().filter(|name| !now.contains(name)).collect();
    assert_eq!(
        gone.len(),
        1,
        "the first echo is removed: {first:?} -> {now:?}"
    );
    assert!(gone[0].contains("echo"), "{gone:?}");
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("still serving").await;
    assert_eq!(client.read_turn().await.text(), "echo: still serving");
}

// Echo runs only in a child process, so the host never maps it and its
// children load its staged copy. Two swaps later the first build's copy is
// cleaned away (staging_grace_secs = 0); moving that build back in stages
// it again, and the reload and the next turn on a new child succeed. (The
// loader remembered the build and handed its removed copy to the child,
// whose start failed every reload after.)
#[tokio::test]
async fn a_rollback_to_a_cleaned_build_of_an_isolated_plugin_reloads() {
    let workdir = llm_host_tests::Workdir::new(llm_host_tests::STANDARD_PLUGINS);
    let config = Config {
        models: vec![("echo".to_owned(), "{}".to_owned())],
        ..Config::default()
    };
    let text = config
        .to_toml()
        .replacen(
            "[plugins]\n",
            "[plugins]\nstaging_dir = \"staging\"\nstaging_grace_secs = 0\n",
            1,
        )
        .replace(
            "plugin = \"echo\"\n",
            "plugin = \"echo\"\nisolation = \"process\"\n",
        );
    workdir.write_config(&text);
    let plugin_dir = workdir.path().join("plugins");
    let host = Host::start_in(workdir, &[]);
    let answer = |text: &'static str| {
        let host = &host;
        async move {
            let mut client = host.connect("/v1/ws").await;
            client.next_json().await;
            client.send_text(text).await;
            client.read_turn().await.text()
        }
    };
    assert_eq!(answer("first").await, "echo: first");

    move_in(Plugin::EchoV2.path(), &plugin_dir, Plugin::Echo.file_name());
    wait_for(&host, "echo 2.0.0", |s| {
        plugin(s, "echo")["version"] == "2.0.0"
    })
    .await;
    third_echo_build(&host, &plugin_dir).await;

    move_in(Plugin::Echo.path(), &plugin_dir, Plugin::Echo.file_name());
    let status = wait_for(&host, "the first build again", |s| {
        s["reloads"] == 3 || !s["lastError"].is_null()
    })
    .await;
    assert!(status["lastError"].is_null(), "{status:#}");
    assert_eq!(answer("rolled back").await, "echo: rolled back");
}
