//! Crash isolation when a child is slow rather than dead: a child that stops
//! reading (frozen with SIGSTOP) holds none of the host's workers, however
//! much is sent to it, and gets all of it in order once it reads again; a
//! turn waiting for a crashed backend's new child (its restart backoff)
//! stops waiting at its cancel; a turn cancelled while the new child starts
//! leaves that start to finish, and the next turn runs on that child, not on
//! a second one; a start that fails is told to every turn that waited for
//! it, not tried again by each.

use std::time::Duration;

use crate::isolation::{plugin_children, prompt, turn, workdir_with};
use llm_host_tests::{http, Host};
use serde_json::{json, Value};

/// The default config with the broken fixture, plus `extra`.
fn start(extra: &str) -> Host {
    Host::start_in(workdir_with(extra), &[])
}

/// What `GET /v1/plugins` shows of `backend`'s child.
async fn child(host: &Host, backend: &str) -> Value {
    let plugins = http(host.addr(), "GET", "/v1/plugins").await.json();
    plugins["isolated"][backend].clone()
}

fn signal(pid: u64, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

// Six prompts of 60 KB go to a child that reads nothing (far more than its
// pipe holds, and more turns than the host has workers): the host goes on
// serving other backends and its HTTP endpoints meanwhile, and once the
// child reads again every turn completes with its own answer.
#[tokio::test]
async fn a_child_that_stops_reading_holds_no_worker_of_the_host() {
    let host = start(
        "[models.iso_echo]\nplugin = \"echo\"\n\
         isolation = { mode = \"process\", first_event_timeout_ms = 120000 }\n\
         settings = { delay_ms = 0 }\n",
    );
    let warm = turn(&host, "iso_echo", "warm").await;
    assert_eq!(warm.status(), "completed", "{}", warm.dump());
    let pid = child(&host, "iso_echo").await["pid"]
        .as_u64()
        .expect("a running child");
    signal(pid, "-STOP");

    let mut clients = Vec::new();
    let mut texts = Vec::new();
    for n in 0..6 {
        let text: Vec<String> = (0..60)
            .map(|w| format!("p{n}w{w}{}", "x".repeat(1000)))
            .collect();
        let text = text.join(" ");
        clients.push(prompt(&host, "iso_echo", &text).await);
        texts.push(text);
    }
    // Give the turns time to reach the child's pipe and fill it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = turn(&host, "echo", "still here").await;
    assert_eq!(other.status(), "completed", "{}", other.dump());
    assert_eq!(other.text(), "echo: still here", "{}", other.dump());
    let health = http(host.addr(), "GET", "/healthz").await;
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(child(&host, "iso_echo").await["pid"].as_u64(), Some(pid));

    signal(pid, "-CONT");
    for (client, text) in clients.iter_mut().zip(&texts) {
        let done = client.read_turn().await;
        assert_eq!(done.status(), "completed", "{}", done.dump());
        assert_eq!(done.text(), format!("echo: {text}"), "a turn's answer");
    }
    let after = child(&host, "iso_echo").await;
    assert_eq!(after["crashes"], 0, "{after:#}");
}

// Crashes in a row double the backoff before the next child; a turn that
// comes while it runs waits for the new child, and a cancel stops that
// wait at once: the turn ends `cancelled` while no child runs yet. The
// next turn then runs on the new child.
#[tokio::test]
async fn a_turn_waiting_for_a_new_child_stops_at_its_cancel() {
    let host = start(
        "[models.crashy]\nplugin = \"broken\"\n\
         isolation = { mode = \"process\", first_event_timeout_ms = 5000 }\n",
    );
    // Backoffs 100, 200, ... 3200 ms: the seventh crash leaves 6.4 s.
    for n in 0..7 {
        let crashed = turn(&host, "crashy", "crash:abort").await;
        assert_eq!(crashed.status(), "failed", "crash {n}: {}", crashed.dump());
    }
    // The last crash is recorded a moment after its turn failed.
    let mut state = child(&host, "crashy").await;
    for _ in 0..100 {
        if state["crashes"] == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        state = child(&host, "crashy").await;
    }
    assert_eq!(state["state"], "crashed", "{state:#}");
    let restarts = state["restarts"].as_u64().expect("restarts");

    let mut client = prompt(&host, "crashy", "hello").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.send_json(&json!({"type": "cancel"})).await;
    let cancelled = client.read_turn().await;
    assert_eq!(cancelled.status(), "cancelled", "{}", cancelled.dump());
    let state = child(&host, "crashy").await;
    assert_eq!(
        state["state"], "crashed",
        "ended before the new child: {state:#}"
    );
    assert_eq!(state["restarts"].as_u64(), Some(restarts), "{state:#}");

    let next = turn(&host, "crashy", "hello").await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
    let state = child(&host, "crashy").await;
    assert_eq!(state["state"], "running", "{state:#}");
    assert_eq!(state["restarts"].as_u64(), Some(restarts + 1), "{state:#}");
}

// A backend whose child takes 1.5 s to start crashes; the next turn waits
// for the new child and is cancelled while it starts. The turn after it
// runs on that child: one child runs, one restart is counted.
#[tokio::test]
async fn a_turn_cancelled_while_the_new_child_starts_leaves_one_child() {
    let host = start(
        "[models.slow_start]\nplugin = \"broken\"\nisolation = \"process\"\n\
         settings = { start_ms = 1500 }\n",
    );
    let crashed = turn(&host, "slow_start", "crash:abort").await;
    assert_eq!(crashed.status(), "failed", "{}", crashed.dump());

    let mut client = prompt(&host, "slow_start", "first").await;
    // Past the 100 ms backoff: the new child is starting.
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.send_json(&json!({"type": "cancel"})).await;
    let cancelled = client.read_turn().await;
    assert_eq!(cancelled.status(), "cancelled", "{}", cancelled.dump());

    let next = turn(&host, "slow_start", "second").await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
    let state = child(&host, "slow_start").await;
    assert_eq!(state["restarts"], 1, "{state:#}");
    assert_eq!(state["state"], "running", "{state:#}");
    let children = plugin_children(&host);
    assert_eq!(
        children.len(),
        1,
        "plugin processes of the host: {children:?}"
    );
    assert_eq!(Some(children[0]), state["pid"].as_u64(), "{state:#}");
}

// A backend's child crashes and its new child refuses to start (the
// plugin's settings refuse while a file exists; each start takes 1 s). Two
// turns wait for that start: both fail `plugin_crashed` saying the restart
// failed, and it was tried once. Once the file is gone, a turn runs.
#[tokio::test]
async fn a_failed_restart_fails_every_turn_that_waited_for_it() {
    let dir = tempfile::tempdir().expect("a directory");
    let refuse = dir.path().join("refuse");
    let host = start(&format!(
        "[models.refusing]\nplugin = \"broken\"\nisolation = \"process\"\n\
         settings = {{ start_ms = 1000, refuse_if_exists = {:?} }}\n",
        refuse.display().to_string()
    ));
    let crashed = turn(&host, "refusing", "crash:abort").await;
    assert_eq!(crashed.status(), "failed", "{}", crashed.dump());
    std::fs::write(&refuse, "").expect("write the file");

    let mut clients = Vec::new();
    for text in ["one", "two"] {
        clients.push(prompt(&host, "refusing", text).await);
    }
    for client in &mut clients {
        let failed = client.read_turn().await;
        assert_eq!(failed.status(), "failed", "{}", failed.dump());
        let error = failed.model_event("error").cloned().unwrap_or_default();
        assert_eq!(
            error["error"]["code"],
            "plugin_crashed",
            "{}",
            failed.dump()
        );
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("could not be restarted"), "{message}");
        assert!(message.contains("exists"), "{message}");
    }
    // The log is read from the host's stderr a moment behind: once the
    // three failed turns' access lines are in, the lines before them are.
    for _ in 0..250 {
        if host.log().matches("status=\"failed\"").count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tries = host
        .log()
        .matches("plugin process could not be restarted")
        .count();
    assert_eq!(tries, 1, "log:\n{}", host.log());

    std::fs::remove_file(&refuse).expect("remove the file");
    let after = turn(&host, "refusing", "back").await;
    assert_eq!(after.status(), "completed", "{}", after.dump());
}
