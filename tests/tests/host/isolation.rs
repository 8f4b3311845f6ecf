//! Crash isolation (`isolation = "process"`): a model backend whose plugin
//! runs in a child process. The broken fixture's crash modes take its child
//! down (a segfault, an abort, a stack overflow, a hang past the first-event
//! deadline); the host goes on, the crashing turn fails `plugin_crashed`
//! naming the signal, a turn on another backend running at the same time
//! completes, and the next turn on the crashed backend runs on a new child;
//! a library only isolated backends name is never mapped into the host.
//! An isolated echo streams what the in-process echo streams, and cancels.
//! A child with `memory_limit_mb` that allocates without bound dies as a
//! crash; the limit needs process isolation; each call in a child is timed
//! by backend in the metrics. A reload that changes an isolated backend
//! starts a new child for new turns while a turn on the old one finishes
//! there, then stops the old one; a reload that leaves the backend alone, or
//! fails, keeps its child.

use std::time::{Duration, Instant};

use llm_host_tests::{http, Client, Config, Host, Plugin, Turn, Workdir, STANDARD_PLUGINS};
use serde_json::{json, Value};

/// The default config plus `crashy` (broken, in a process of its own,
/// first-event deadline 1 s), `iso_echo` (echo, likewise) and `iso_slow`
/// (echo: 100 tokens 50 ms apart, likewise).
fn start() -> Host {
    let workdir = workdir_with(
        "[models.crashy]\nplugin = \"broken\"\n\
         isolation = { mode = \"process\", first_event_timeout_ms = 1000 }\n\
         [models.iso_echo]\nplugin = \"echo\"\nisolation = \"process\"\n\
         settings = { delay_ms = 0 }\n\
         [models.iso_slow]\nplugin = \"echo\"\nisolation = \"process\"\n\
         settings = { delay_ms = 50, tokens = 100 }\n\
         [models.many]\nplugin = \"echo\"\nsettings = { tokens = 20000 }\n\
         [models.iso_many]\nplugin = \"echo\"\nisolation = \"process\"\n\
         settings = { tokens = 20000 }\n",
    );
    Host::start_in(workdir, &[])
}

/// The default config plus `extra`, with the broken fixture.
pub(crate) fn workdir_with(extra: &str) -> Workdir {
    let config = Config {
        extra: extra.to_owned(),
        ..Config::default()
    };
    let mut plugins = STANDARD_PLUGINS.to_vec();
    plugins.push(Plugin::Broken);
    let workdir = Workdir::new(&plugins);
    workdir.write_config(&config.to_toml());
    workdir
}

/// Sends `text` to `model` over a new command-mode connection: the client,
/// past the session's announcement.
pub(crate) async fn prompt(host: &Host, model: &str, text: &str) -> Client {
    let mut client = host.connect_command(&format!("/v1/ws?model={model}")).await;
    client.next_json().await;
    client
        .send_json(&json!({"type": "prompt", "text": text}))
        .await;
    client
}

/// Runs `text` on `model` over a new command-mode connection.
pub(crate) async fn turn(host: &Host, model: &str, text: &str) -> Turn {
    prompt(host, model, text).await.read_turn().await
}

fn error_of(turn: &Turn) -> (String, String) {
    let error = turn
        .model_event("error")
        .unwrap_or_else(|| panic!("no error event: {}", turn.dump()));
    let text = |key: &str| error["error"][key].as_str().unwrap_or_default().to_owned();
    (text("code"), text("message"))
}

fn isolated(host_plugins: &Value, backend: &str) -> Value {
    host_plugins["isolated"][backend].clone()
}

// Each way of crashing fails only the turn that crashed: the host survives,
// a turn on an in-process backend running meanwhile completes, the crash
// is logged once, counted and shown by GET /v1/plugins, and the next turn
// on the backend runs on a restarted child.
#[tokio::test]
async fn each_crash_fails_only_its_turn_and_the_backend_restarts() {
    let mut host = start();
    let test_started = Instant::now();
    let modes = [
        ("segfault", &["SIGSEGV"][..]),
        ("abort", &["SIGABRT"][..]),
        // Rust's guard page handler reports the overflow and aborts.
        ("stack_overflow", &["SIGABRT", "SIGSEGV"][..]),
    ];
    let first_pid = isolated(
        &http(host.addr(), "GET", "/v1/plugins").await.json(),
        "crashy",
    )["pid"]
        .as_u64()
        .expect("a running child has a pid");
    // Named only by an isolated backend, the broken library is mapped by
    // its child and never into the host.
    let maps = |pid: u64| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let library = "libllm_host_broken_plugin_fixture-";
    assert!(
        maps(first_pid).contains(library),
        "the child maps no broken fixture"
    );
    assert!(
        !maps(u64::from(host.pid())).contains(library),
        "the host maps it"
    );
    for (count, (mode, signals)) in modes.iter().enumerate() {
        let started = Instant::now();
        // 4 words, 100 ms apart: running while the other turn crashes.
        let other = turn(&host, "slow_echo", "still going on here");
        let prompt = format!("crash:{mode}");
        let crashing = turn(&host, "crashy", &prompt);
        let (other, crashed) = tokio::join!(other, crashing);

        assert_eq!(crashed.status(), "failed", "{mode}: {}", crashed.dump());
        let (code, message) = error_of(&crashed);
        assert_eq!(code, "plugin_crashed", "{mode}: {message}");
        assert!(
            signals.iter().any(|s| message.contains(s)),
            "{mode}: {message}"
        );
        assert_eq!(other.status(), "completed", "{mode}: {}", other.dump());
        assert_eq!(other.text(), "echo: still going on here");
        assert!(host.is_running(), "{mode}: the host died");

        let after = turn(&host, "crashy", "hello").await;
        assert_eq!(after.status(), "completed", "{mode}: {}", after.dump());
        assert_eq!(after.text(), "t0 t1 t2 t3 t4 ", "{mode}: {}", after.dump());
        eprintln!("{mode}: crash and restart in {:?}", started.elapsed());

        let plugins = http(host.addr(), "GET", "/v1/plugins").await.json();
        let state = isolated(&plugins, "crashy");
        let n = count as u64 + 1;
        assert_eq!(state["crashes"], n, "{state}");
        assert_eq!(state["restarts"], n, "{state}");
        assert_eq!(state["state"], "running", "{state}");
        let reason = state["lastCrash"]["reason"].as_str().unwrap_or_default();
        assert!(signals.iter().any(|s| reason.contains(s)), "{state}");
        assert_ne!(state["pid"].as_u64(), Some(first_pid), "{state}");
    }
    assert_eq!(
        host.log().matches("plugin process crashed").count(),
        modes.len(),
        "one log line per crash:\n{}",
        host.log()
    );
    let metrics = http(host.addr(), "GET", "/metrics").await.body;
    assert!(
        metrics.contains("llm_host_plugin_crashes_total{backend=\"crashy\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llm_host_plugin_restarts_total{backend=\"crashy\"} 3"),
        "{metrics}"
    );
    // The other isolated backends' children were never touched.
    let plugins = http(host.addr(), "GET", "/v1/plugins").await.json();
    assert_eq!(isolated(&plugins, "iso_echo")["crashes"], 0, "{plugins}");
    eprintln!("crashes: test body {:?}", test_started.elapsed());
}

// A child that does not answer a turn within first_event_timeout_ms is
// killed and restarted like one that crashed.
#[tokio::test]
async fn a_hung_child_is_killed_at_the_deadline() {
    let host = start();
    let started = Instant::now();
    let hung = turn(&host, "crashy", "crash:hang").await;
    let waited = started.elapsed();
    assert_eq!(hung.status(), "failed", "{}", hung.dump());
    let (code, message) = error_of(&hung);
    assert_eq!(code, "plugin_crashed", "{message}");
    assert!(
        message.contains("did not answer") && message.contains("SIGKILL"),
        "{message}"
    );
    assert!(waited.as_millis() >= 1000, "killed after {waited:?}");
    let after = turn(&host, "crashy", "hello").await;
    assert_eq!(after.status(), "completed", "{}", after.dump());
    eprintln!("hang: test body {:?}", started.elapsed());
}

// echo in a process of its own streams the frames echo streams in the
// host's process: the same events, texts, usage and finish reason, over two
// turns of one session (the history reaches the child); and a cancel stops
// a turn in the child.
#[tokio::test]
async fn isolated_echo_streams_as_in_process_and_cancels() {
    let host = start();
    let started = Instant::now();
    let mut runs = Vec::new();
    for model in ["echo", "iso_echo"] {
        let mut client = host.connect_command(&format!("/v1/ws?model={model}")).await;
        client.next_json().await;
        let mut turns = Vec::new();
        for text in ["hello isolated world", "and once more"] {
            client
                .send_json(&json!({"type": "prompt", "text": text}))
                .await;
            let turn = client.read_turn().await;
            assert_eq!(turn.status(), "completed", "{model}: {}", turn.dump());
            turns.push((
                turn.model_types()
                    .iter()
                    .map(|t| (*t).to_owned())
                    .collect::<Vec<_>>(),
                turn.deltas()
                    .iter()
                    .map(|t| (*t).to_owned())
                    .collect::<Vec<_>>(),
                turn.model_event("usage").cloned(),
                turn.finish_reason().map(str::to_owned),
            ));
        }
        runs.push(turns);
    }
    assert_eq!(runs[0], runs[1], "in-process vs isolated echo");
    assert!(runs[1][1].2.is_some(), "usage: {:?}", runs[1]);

    let mut client = prompt(&host, "iso_slow", "go").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    client.send_json(&json!({"type": "cancel"})).await;
    frames.extend(client.read_turn().await.frames);
    let cancelled = Turn { frames };
    assert_eq!(cancelled.status(), "cancelled", "{}", cancelled.dump());
    assert!(cancelled.deltas().len() < 50, "{}", cancelled.dump());
    client
        .send_json(&json!({"type": "prompt", "text": "again", "model": "iso_echo"}))
        .await;
    let next = client.read_turn().await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
    assert_eq!(next.text(), "echo: again", "{}", next.dump());
    eprintln!("echo: test body {:?}", started.elapsed());
}

// What a turn of 20000 events costs in a child process against the host's
// own (printed; the bound only catches a gross regression: this runs in
// debug builds beside the other tests).
#[tokio::test]
async fn isolated_events_cost_little_more() {
    let host = start();
    let mut per_event = Vec::new();
    for model in ["many", "iso_many", "many", "iso_many"] {
        let started = Instant::now();
        let done = turn(&host, model, "go").await;
        let took = started.elapsed();
        assert_eq!(done.status(), "completed", "{model}");
        assert_eq!(done.deltas().len(), 20000, "{model}");
        per_event.push(took.as_secs_f64() * 1e6 / 20000.0);
        eprintln!(
            "{model}: {took:?}, {:.2} us per event",
            per_event.last().copied().unwrap_or(0.0)
        );
    }
    let (inside, isolated) = (per_event[2], per_event[3]);
    assert!(isolated < inside * 5.0 + 20.0, "{per_event:?}");
}

// A child under isolation.memory_limit_mb that allocates without bound
// (the fixture's `alloc`, always run under a limit here) fails its
// allocation and dies: the turn fails `plugin_crashed` naming the limit,
// another backend's turn meanwhile completes, the backend restarts and
// answers the next prompt, and each call's time in the child shows in
// `llm_host_plugin_call_seconds{backend}`.
#[tokio::test]
async fn a_child_past_its_memory_limit_crashes_and_restarts() {
    let mut host = Host::start_in(
        workdir_with(
            "[models.hungry]\nplugin = \"broken\"\n\
             isolation = { mode = \"process\", memory_limit_mb = 256 }\n",
        ),
        &[],
    );
    let started = Instant::now();
    let first_pid = isolated(
        &http(host.addr(), "GET", "/v1/plugins").await.json(),
        "hungry",
    )["pid"]
        .as_u64()
        .expect("a running child has a pid");
    let other = turn(&host, "slow_echo", "still going on here");
    let crashing = turn(&host, "hungry", "crash:alloc");
    let (other, crashed) = tokio::join!(other, crashing);
    assert_eq!(crashed.status(), "failed", "{}", crashed.dump());
    let (code, message) = error_of(&crashed);
    assert_eq!(code, "plugin_crashed", "{message}");
    assert!(
        message.contains("SIGABRT") && message.contains("memory limit is 256 MiB"),
        "{message}"
    );
    assert_eq!(other.status(), "completed", "{}", other.dump());
    assert_eq!(other.text(), "echo: still going on here");
    assert!(host.is_running(), "the host died");
    // The limit ended it (Rust's allocation error), not the fixture's cap.
    assert!(host.logged("memory allocation of").await, "{}", host.log());
    assert!(
        !host.log().contains("no address-space limit"),
        "{}",
        host.log()
    );

    let echo = turn(&host, "echo", "hello").await;
    assert_eq!(echo.status(), "completed", "{}", echo.dump());
    let after = turn(&host, "hungry", "hello").await;
    assert_eq!(after.status(), "completed", "{}", after.dump());
    assert_eq!(after.text(), "t0 t1 t2 t3 t4 ", "{}", after.dump());
    let state = isolated(
        &http(host.addr(), "GET", "/v1/plugins").await.json(),
        "hungry",
    );
    assert_eq!(state["crashes"], 1, "{state}");
    assert_eq!(state["restarts"], 1, "{state}");
    assert_ne!(state["pid"].as_u64(), Some(first_pid), "{state}");

    let metrics = http(host.addr(), "GET", "/metrics").await.body;
    assert!(
        metrics.contains("llm_host_plugin_call_seconds_count{backend=\"hungry\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llm_host_plugin_call_seconds_sum{backend=\"hungry\"}"),
        "{metrics}"
    );
    // In-process backends are not plugin calls in a child.
    assert!(
        !metrics.contains("llm_host_plugin_call_seconds_count{backend=\"echo\"}"),
        "{metrics}"
    );
    eprintln!("memory limit: test body {:?}", started.elapsed());
}

// A memory limit applies to a child process only: with mode "in_process",
// or as a key of the backend itself, it fails the start naming the key.
#[test]
fn a_memory_limit_without_process_isolation_is_refused() {
    for (extra, names) in [
        (
            "[models.capped]\nplugin = \"echo\"\n\
             isolation = { mode = \"in_process\", memory_limit_mb = 256 }\n",
            "models.capped.isolation: memory_limit_mb applies to mode \"process\" only",
        ),
        (
            "[models.capped]\nplugin = \"echo\"\nmemory_limit_mb = 256\n",
            "memory_limit_mb",
        ),
    ] {
        let exit = workdir_with(extra).run_with_config(&[]);
        assert!(!exit.status.success(), "{exit}");
        assert!(exit.stderr.contains(names), "names the key:\n{exit}");
        assert!(!exit.stderr.contains("listening on"), "{exit}");
    }
}

/// `[models.iso_long]`: echo in a process of its own, with `settings`.
fn iso_long(settings: &str) -> String {
    format!(
        "[models.iso_long]\nplugin = \"echo\"\nisolation = \"process\"\nsettings = {settings}\n"
    )
}

/// The default config (reloads by `POST /v1/reload` only: the watcher waits
/// a minute) plus `iso_long` with `settings`.
fn reload_config(settings: &str) -> Config {
    Config {
        debounce_ms: 60_000,
        extra: iso_long(settings),
        ..Config::default()
    }
}

/// The pid of `backend`'s child, as `GET /v1/plugins` shows it.
async fn child_pid(host: &Host, backend: &str) -> u64 {
    let plugins = http(host.addr(), "GET", "/v1/plugins").await.json();
    isolated(&plugins, backend)["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no running child for {backend}: {plugins:#}"))
}

/// The host's children that run a plugin (`llm-host __run-plugin`, not
/// exited), by pid, from /proc.
pub(crate) fn plugin_children(host: &Host) -> Vec<u64> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if state == Some("Z") || ppid != Some(host.pid().to_string().as_str()) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| arg == b"__run-plugin") {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// Waits (up to 20 s) until the host's plugin children are `expected` and
/// every pid of `gone` has left /proc (ended and reaped).
async fn wait_children(host: &Host, expected: &[u64], gone: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let children = plugin_children(host);
        let left: Vec<&u64> = gone
            .iter()
            .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        if children == expected && left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "plugin children {children:?}, expected {expected:?}; still there: {left:?}\nlog:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `token0 token1 ... token{count-1}`.
fn tokens(count: usize) -> String {
    (0..count)
        .map(|i| format!("token{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// A reload that changes an isolated backend's settings while a turn streams
// on it: the reload starts a new child, a new turn runs there with the new
// settings, the running turn finishes on the old child with all its tokens,
// and the old child is stopped once that turn ended (not as a crash).
#[tokio::test]
async fn a_reload_moves_new_turns_to_a_new_child_while_the_old_one_finishes() {
    // 100 tokens 50 ms apart: the turn runs for 5 s, across the reload.
    let config = reload_config("{ delay_ms = 50, tokens = 100 }");
    let host = Host::start(&config);
    let started = Instant::now();
    let old = child_pid(&host, "iso_long").await;
    assert_eq!(plugin_children(&host), vec![old]);

    let mut running = prompt(&host, "iso_long", "go").await;
    let mut frames = running.read_until("interaction.model", "delta").await;

    host.workdir()
        .write_config(&reload_config("{ delay_ms = 0, tokens = 3 }").to_toml());
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["status"], "reloaded", "{}", reply.body);
    let new = child_pid(&host, "iso_long").await;
    assert_ne!(new, old, "a new child for the new settings");
    // The old child still runs the turn that started on it.
    let mut both = vec![old, new];
    both.sort_unstable();
    assert_eq!(
        plugin_children(&host),
        both,
        "after {:?}",
        started.elapsed()
    );

    let next = turn(&host, "iso_long", "go").await;
    assert_eq!(next.status(), "completed", "{}", next.dump());
    assert_eq!(next.text(), tokens(3), "the new settings: {}", next.dump());

    frames.extend(running.read_turn().await.frames);
    let first = Turn { frames };
    assert_eq!(first.status(), "completed", "{}", first.dump());
    assert_eq!(first.text(), tokens(100), "{}", first.dump());
    assert_eq!(first.deltas().len(), 100, "{}", first.dump());

    // Its socket stays open: a socket must not hold the old set (and so the
    // old child) beyond its turns.
    wait_children(&host, &[new], &[old]).await;
    assert!(
        host.logged("plugin process stopped").await,
        "{}",
        host.log()
    );
    assert!(
        !host.log().contains("plugin process crashed"),
        "{}",
        host.log()
    );
    let plugins = http(host.addr(), "GET", "/v1/plugins").await.json();
    let state = isolated(&plugins, "iso_long");
    assert_eq!(state["pid"].as_u64(), Some(new), "{state}");
    assert_eq!(state["crashes"], 0, "{state}");
    assert_eq!(state["restarts"], 0, "{state}");
    // The new child serves on.
    let again = turn(&host, "iso_long", "go").await;
    assert_eq!(again.text(), tokens(3), "{}", again.dump());
    eprintln!("reload onto a new child: test body {:?}", started.elapsed());
}

// A reload whose new child fails to start (echo refuses an unknown setting
// in the child) fails and keeps the running set and child; a reload that
// changes another backend keeps this one's child: the same pid, no restart.
// A new build of its library then replaces the idle child at once.
#[tokio::test]
async fn a_reload_keeps_the_child_unless_the_backend_changes() {
    let host = Host::start(&reload_config("{ tokens = 2 }"));
    let started = Instant::now();
    let pid = child_pid(&host, "iso_long").await;
    assert_eq!(plugin_children(&host), vec![pid]);

    host.workdir()
        .write_config(&reload_config("{ tokens = 2, colour = \"blue\" }").to_toml());
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("models.iso_long") && message.contains("colour"),
        "{message}"
    );
    wait_children(&host, &[pid], &[]).await;
    assert_eq!(child_pid(&host, "iso_long").await, pid);
    let kept = turn(&host, "iso_long", "go").await;
    assert_eq!(kept.text(), tokens(2), "{}", kept.dump());

    let mut other = reload_config("{ tokens = 2 }");
    for (name, settings) in &mut other.models {
        if name == "short" {
            *settings = "{ tokens = 4 }".to_owned();
        }
    }
    host.workdir().write_config(&other.to_toml());
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["status"], "reloaded", "{}", reply.body);
    assert!(reply.body.contains("short"), "{}", reply.body);
    assert!(!reply.body.contains("iso_long"), "{}", reply.body);
    assert_eq!(child_pid(&host, "iso_long").await, pid, "no restart");
    assert_eq!(plugin_children(&host), vec![pid]);
    let after = turn(&host, "iso_long", "go").await;
    assert_eq!(after.text(), tokens(2), "{}", after.dump());
    let short = turn(&host, "short", "go").await;
    assert_eq!(short.text(), tokens(4), "{}", short.dump());
    let state = isolated(
        &http(host.addr(), "GET", "/v1/plugins").await.json(),
        "iso_long",
    );
    assert_eq!(state["restarts"], 0, "{state}");
    assert!(
        !host.log().contains("plugin process stopped"),
        "{}",
        host.log()
    );

    let plugin_dir = host.workdir().path().join("plugins");
    let tmp = plugin_dir.join(".echo.tmp");
    std::fs::copy(Plugin::EchoV2.path(), &tmp).expect("copy the new build in");
    std::fs::rename(&tmp, plugin_dir.join(Plugin::Echo.file_name())).expect("move it over");
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.body.contains("iso_long") && reply.body.contains("2.0.0"),
        "{}",
        reply.body
    );
    let new = child_pid(&host, "iso_long").await;
    assert_ne!(new, pid, "a new child for the new build");
    wait_children(&host, &[new], &[pid]).await;
    assert!(
        host.logged("plugin process stopped").await,
        "{}",
        host.log()
    );
    let rebuilt = turn(&host, "iso_long", "go").await;
    assert_eq!(rebuilt.text(), tokens(2), "{}", rebuilt.dump());
    eprintln!("reload keeps the child: test body {:?}", started.elapsed());
}
