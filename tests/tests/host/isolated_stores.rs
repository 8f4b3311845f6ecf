//! Crash isolation for stores (`[stores.NAME] isolation = "process"`): the
//! store plugin runs in a child process of the host (`llm-host
//! __run-plugin`) and every store call goes over its pipe. Sessions on an
//! isolated sqlite store are saved, listed, resumed and deleted as on an
//! in-process one, and `GET /v1/plugins` shows the child under
//! `isolatedStores`. A child killed between calls is restarted by the next
//! call and the turn completes; a child killed with a call in flight fails
//! that call (the turn fails `store_unavailable`, the prompt not run) and
//! the next turn runs on a new child; the host lives through both, with the
//! sessions in the file intact. A store whose sessions live in its own
//! memory, or turn limits on a store, are refused at start.

use std::process::Command;
use std::time::{Duration, Instant};

use llm_host_tests::{http, Config, Host, Workdir};
use serde_json::Value;

use crate::common::{contents, free_port, stored, PrivateRedis};
use crate::stores::{config_with_store, start_host, store_settings, Kind};

/// A host whose default store `shared` is `kind` with `settings`, in a
/// process of its own (`isolation` as written in config.toml).
fn start_isolated(kind: Kind, settings: &str, isolation: &str) -> Host {
    let mut config = config_with_store(settings);
    config.extra.push_str(&format!("isolation = {isolation}\n"));
    start_host(kind, &config)
}

/// The isolation key's short form.
const PROCESS: &str = "\"process\"";

/// `isolatedStores.shared` of `GET /v1/plugins`.
async fn store_state(host: &Host) -> Value {
    let reply = http(host.addr(), "GET", "/v1/plugins").await;
    assert_eq!(reply.status, 200, "GET /v1/plugins: {}", reply.body);
    reply.json()["isolatedStores"]["shared"].clone()
}

/// Polls [`store_state`] until `done` holds (10 s at most).
async fn store_state_until(host: &Host, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = store_state(host).await;
        if done(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "{what}: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The running child's pid, checked to be a `__run-plugin` child of the host.
fn child_pid(host: &Host, state: &Value) -> u32 {
    let pid = state["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {state}")) as u32;
    assert_ne!(
        pid,
        host.pid(),
        "the store runs in the host's process: {state}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|err| panic!("/proc/{pid}/stat: {err}"));
    // `pid (comm) state ppid ...`: comm may hold spaces, so after its `)`.
    let after_comm = &stat[stat.rfind(')').expect("a comm") + 1..];
    let ppid = after_comm.split_whitespace().nth(1);
    assert_eq!(
        ppid,
        Some(&*host.pid().to_string()),
        "not the host's child: {stat}"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("__run-plugin"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    pid
}

/// Sends `pid` signal `name` (`KILL`, `STOP`).
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

// An isolated sqlite store serves sessions as an in-process one does: a turn
// is saved (GET), listed (LIST), resumed on reconnect with its last sequence
// (LOAD), continued (SAVE), the store answers readiness (PING) and the
// session can be deleted (DELETE); turns of 8 sessions at once each get
// their own answers. GET /v1/plugins shows its child running, a
// `__run-plugin` child of the host with a pid of its own and the table
// form's memory limit, and the library is mapped into the child only; it
// ends with the host, whose last usage flush it stores.
#[tokio::test]
async fn an_isolated_sqlite_store_saves_lists_resumes_and_deletes() {
    let dir = tempfile::tempdir().expect("a directory for the sqlite file");
    let settings = store_settings(Kind::Sqlite, dir.path()).expect("sqlite needs no server");
    let isolation = "{ mode = \"process\", memory_limit_mb = 256 }";
    let mut host = start_isolated(Kind::Sqlite, &settings, isolation);

    let state = store_state(&host).await;
    assert_eq!(state["state"], "running", "{state}");
    let counts = [
        &state["restarts"],
        &state["crashes"],
        &state["runningCalls"],
    ];
    assert_eq!(counts, [0, 0, 0], "{state}");
    let pid = child_pid(&host, &state);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max address space") && l.contains(" 268435456 ")),
        "{limits}"
    );
    // The library is mapped by the child alone: none of its code runs in
    // the host.
    let maps = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let library = "libllm_plugin_sqlite-";
    assert!(
        maps(pid).contains(library),
        "the child maps no sqlite plugin"
    );
    assert!(
        !maps(host.pid()).contains(library),
        "the host maps the isolated store's library"
    );
    assert_eq!(http(host.addr(), "GET", "/readyz").await.status, 200);

    let last = {
        let mut client = host.connect("/v1/ws?session=iso-1").await;
        client.next_json().await;
        client.send_text("remember this").await;
        let turn = client.read_turn().await;
        assert_eq!(turn.status(), "completed", "{}", turn.dump());
        turn.end().sequence()
    };
    assert_eq!(
        contents(&stored(&host, "iso-1").await),
        ["user: remember this", "assistant: echo: remember this"]
    );
    let listed = http(host.addr(), "GET", "/v1/sessions").await.json();
    assert!(
        listed["sessions"]
            .as_array()
            .is_some_and(|s| s.contains(&"iso-1".into())),
        "{listed}"
    );

    let mut client = host.connect("/v1/ws?session=iso-1").await;
    let open = client.next_json().await;
    assert_eq!(open.event()["resumed"], true, "{}", open.text);
    assert_eq!(open.event()["lastSequence"], last, "{}", open.text);
    client.send_text("and this").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.interaction_id(), "turn-2", "{}", turn.dump());
    assert!(
        turn.sequences().iter().all(|s| *s > last),
        "{}",
        turn.dump()
    );
    assert_eq!(
        contents(&stored(&host, "iso-1").await),
        [
            "user: remember this",
            "assistant: echo: remember this",
            "user: and this",
            "assistant: echo: and this"
        ]
    );

    let addr = host.addr();
    let status = |method| async move { http(addr, method, "/v1/sessions/iso-1").await.status };
    assert_eq!((status("DELETE").await, status("GET").await), (204, 404));
    // Turns of many sessions at once: their calls are in flight together,
    // each answer reaches its own call.
    let turns = (0..8).map(|n| {
        let host = &host;
        async move {
            let mut client = host
                .connect(&format!("/v1/ws?session=many-{n}&model=slow_echo"))
                .await;
            client.next_json().await;
            client.send_text(format!("from {n}")).await;
            let turn = client.read_turn().await;
            assert_eq!(turn.status(), "completed", "{n}: {}", turn.dump());
            let saved = contents(&stored(host, &format!("many-{n}")).await);
            assert_eq!(
                saved,
                [
                    format!("user: from {n}"),
                    format!("assistant: echo: from {n}")
                ]
            );
        }
    });
    futures_util::future::join_all(turns).await;
    // All on the first child.
    let state = store_state(&host).await;
    assert_eq!(state["pid"], pid, "{state}");
    assert_eq!(state["crashes"], 0, "{state}");

    // A graceful stop stores the usage through the child, and the child
    // ends with the host (gone, or a zombie left to init).
    host.signal("TERM");
    let status = host
        .wait_exit(Duration::from_secs(20))
        .expect("the host exits");
    assert!(status.success(), "{status}\n{}", host.log());
    assert!(
        !host.log().contains("usage not stored yet"),
        "{}",
        host.log()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat[stat.rfind(')').unwrap_or(0)..].starts_with(") Z"))
    {
        assert!(
            Instant::now() < deadline,
            "the store's process {pid} outlived the host"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// A store child killed between calls: the host lives, the crash is counted
// and shown (SIGKILL), and the next turn (on the session it served and on a
// new one) starts a new child and completes; what was saved before is
// there. A child killed while a call waits on it (it was stopped first)
// fails that call: the turn fails `store_unavailable` without running the
// prompt, the log names the signal, and the next turn runs on a new child.
#[tokio::test]
async fn a_killed_store_process_is_restarted_and_the_host_goes_on() {
    let dir = tempfile::tempdir().expect("a directory for the sqlite file");
    let settings = store_settings(Kind::Sqlite, dir.path()).expect("sqlite needs no server");
    let mut host = start_isolated(Kind::Sqlite, &settings, PROCESS);
    let mut client = host.connect("/v1/ws?session=kill-1").await;
    client.next_json().await;
    client.send_text("before the kill").await;
    assert_eq!(client.read_turn().await.status(), "completed");
    let first = child_pid(&host, &store_state(&host).await);

    // Between calls.
    signal(first, "KILL");
    let state = store_state_until(&host, "the crash is counted", |s| s["crashes"] == 1).await;
    let reason = state["lastCrash"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("SIGKILL") && reason.contains(&first.to_string()),
        "{state}"
    );
    assert!(host.is_running(), "the host died with its store's process");
    client.send_text("after the kill").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "echo: after the kill");
    let mut other = host.connect("/v1/ws?session=kill-2&model=short").await;
    other.next_json().await;
    other.send_text("another session").await;
    assert_eq!(other.read_turn().await.status(), "completed");
    let state = store_state(&host).await;
    assert_eq!(
        (&state["state"], &state["restarts"]),
        (&"running".into(), &1.into()),
        "{state}"
    );
    let second = child_pid(&host, &state);
    assert_ne!(second, first, "{state}");
    assert_eq!(
        contents(&stored(&host, "kill-1").await),
        [
            "user: before the kill",
            "assistant: echo: before the kill",
            "user: after the kill",
            "assistant: echo: after the kill"
        ]
    );

    // With a call in flight: the child is stopped, the turn's first store
    // call waits on it, then the child is killed.
    signal(second, "STOP");
    client.send_text("while frozen").await;
    store_state_until(&host, "a call waits", |s| {
        s["runningCalls"].as_u64() >= Some(1)
    })
    .await;
    signal(second, "KILL");
    let failed = client.read_turn().await;
    assert_eq!(failed.status(), "failed", "{}", failed.dump());
    let diagnostic = failed
        .diagnostics()
        .into_iter()
        .find(|d| d.diagnostic_code() == "store_unavailable")
        .unwrap_or_else(|| panic!("no store diagnostic: {}", failed.dump()))
        .entry()
        .clone();
    assert_eq!(diagnostic["kind"], "store", "{diagnostic}");
    assert!(
        failed.model_frames().is_empty(),
        "the prompt ran: {}",
        failed.dump()
    );
    assert!(
        host.logged(&format!(
            "(pid {second}) was killed by SIGKILL; a new one starts"
        ))
        .await,
        "{}",
        host.log()
    );
    client.send_text("and after that").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    let state = store_state(&host).await;
    assert_eq!([&state["crashes"], &state["restarts"]], [2, 2], "{state}");
    let third = child_pid(&host, &state);
    assert!(third != first && third != second, "{state}");
    let messages = contents(&stored(&host, "kill-1").await);
    assert_eq!(messages.len(), 6, "{messages:#?}");
    assert!(
        !messages.iter().any(|m| m.contains("while frozen")),
        "{messages:#?}"
    );
    assert_eq!(
        messages[5], "assistant: echo: and after that",
        "{messages:#?}"
    );
    assert_eq!(
        host.log().matches("store plugin process crashed").count(),
        2,
        "{}",
        host.log()
    );
    assert!(host.is_running());
}

// On Redis, a store child killed while the model streams (no call in
// flight) costs the turn nothing: its final save starts a new child and
// the whole turn is stored.
#[tokio::test]
async fn an_isolated_redis_store_killed_mid_turn_keeps_the_turn() {
    let dir = tempfile::tempdir().expect("a directory for redis");
    let port = free_port();
    let Some(_redis) = PrivateRedis::start(dir.path(), port) else {
        return;
    };
    let url = format!("{{ url = \"redis://127.0.0.1:{port}\" }}");
    let host = start_isolated(Kind::Redis, &url, PROCESS);
    let pid = child_pid(&host, &store_state(&host).await);
    let mut client = host.connect("/v1/ws?session=redis-1&model=slow_echo").await;
    client.next_json().await;
    client.send_text("one two three four five six").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    signal(pid, "KILL");
    frames.extend(client.read_turn().await.frames);
    let turn = llm_host_tests::Turn { frames };
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(
        contents(&stored(&host, "redis-1").await),
        [
            "user: one two three four five six",
            "assistant: echo: one two three four five six"
        ]
    );
    let state = store_state(&host).await;
    assert_eq!([&state["crashes"], &state["restarts"]], [1, 1], "{state}");
    assert_ne!(child_pid(&host, &state), pid, "{state}");
}

// The memory store keeps its sessions in its own memory: in a child they
// would be lost with each restart, so the start (and `validate`) fails
// naming the store. A store's isolation takes no turn limits.
#[test]
fn a_store_that_would_lose_sessions_or_takes_turn_limits_is_refused() {
    let workdir = |extra: &str| {
        Workdir::with_config(&Config {
            extra: extra.to_owned(),
            ..Config::default()
        })
    };
    let memory = workdir("\n[stores.mem]\nplugin = \"memory\"\nisolation = \"process\"\n");
    for args in [&[][..], &["validate"][..]] {
        let exit = memory.run_with_config(args);
        assert_eq!(exit.status.code(), Some(1), "{args:?}: {exit}");
        assert!(
            exit.stderr
                .contains("stores.mem: plugin `memory` could not be started")
                && exit.stderr.contains("they would be lost with each restart"),
            "{args:?}: {exit}"
        );
        assert!(!exit.all_output().contains("listening on"), "{exit}");
    }
    let capped = workdir(
        "\n[stores.capped]\nplugin = \"memory\"\n\
         isolation = { mode = \"process\", max_concurrent_turns = 4 }\n",
    );
    let exit = capped.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(
        exit.stderr.contains(
            "stores.capped.isolation.max_concurrent_turns: applies to model backends only"
        ),
        "{exit}"
    );
    assert!(!exit.all_output().contains("listening on"), "{exit}");
}
