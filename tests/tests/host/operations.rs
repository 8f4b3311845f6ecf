//! Operating the host: draining behind a load balancer on SIGTERM.

use std::time::Duration;

use llm_host_tests::{http, json, Config, Host};

use crate::common::reload_as;

// With server.drain_secs, SIGTERM turns /readyz to 503 at once while the
// host goes on serving, new connections included; then it stops.
#[tokio::test]
async fn sigterm_drains_before_it_stops() {
    let mut host = Host::start(&Config {
        server_extra: "drain_secs = 3\nshutdown_grace_secs = 1\n".to_owned(),
        ..Config::default()
    });
    assert_eq!(http(host.addr(), "GET", "/readyz").await.status, 200);
    host.signal("TERM");
    let mut draining = false;
    for _ in 0..20 {
        if http(host.addr(), "GET", "/readyz").await.status == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(draining, "/readyz did not turn 503 on SIGTERM");
    // Still serving: a new client connects and runs a turn.
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("during the drain").await;
    assert_eq!(client.read_turn().await.text(), "echo: during the drain");
    let exit = host.wait_exit(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|status| status.success()),
        "the host did not stop after draining:\n{}",
        host.log()
    );
    assert!(host.log().contains("draining"), "{}", host.log());
}

// Each turn leaves one access-log line (key, client, session, backend, turn,
// status, code, duration, time to first token, tokens); a refused prompt
// leaves an audit line; the time to first token is a metric of its own.
#[tokio::test]
async fn each_turn_leaves_an_access_log_line() {
    let host = Host::start(&Config {
        server_extra: "max_prompt_bytes = 40\n".to_owned(),
        ..Config::default()
    });
    let mut client = host.connect("/v1/ws?session=logged&model=short").await;
    client.next_json().await;
    client.send_text("hello there").await;
    assert_eq!(client.read_turn().await.status(), "completed");
    client.send_text("x".repeat(100)).await;
    client.next_json().await;
    client.next_json().await;
    let mut line = None;
    for _ in 0..50 {
        line = host
            .log()
            .lines()
            .find(|line| line.contains("llm_host::access"))
            .map(str::to_owned);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = line.unwrap_or_else(|| panic!("no access line:\n{}", host.log()));
    for field in [
        "key=\"anonymous\"",
        "client=127.0.0.1:",
        "session=logged",
        "backend=\"short\"",
        "turn=turn-1",
        "status=\"completed\"",
        "code=\"\"",
        "duration_ms=",
        "first_token_ms=",
        "output_tokens=3",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }
    assert!(host.logged("prompt refused").await, "{}", host.log());
    let audit = host.log();
    assert!(
        audit
            .lines()
            .any(|line| line.contains("llm_host::audit") && line.contains("prompt_too_long")),
        "{audit}"
    );
    let metrics = http(host.addr(), "GET", "/metrics").await.body;
    assert!(
        metrics.contains("llm_host_time_to_first_token_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "llm_host_backend_turns_total{backend=\"short\",status=\"completed\",code=\"\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("llm_host_backend_tokens_total{backend=\"short\",kind=\"output\"} 3"),
        "{metrics}"
    );
}

// `llm-host validate` does all a start does but listen: a good config
// passes; an unknown backend setting (which `plugins` does not see) and a
// store that does not answer each fail it, named.
#[test]
fn validate_finds_what_only_a_start_would() {
    use llm_host_tests::{Workdir, STANDARD_PLUGINS};
    let workdir = Workdir::with_config(&Config::default());
    let exit = workdir.run_with_config(&["validate"]);
    assert!(exit.status.success(), "{exit}");
    assert!(exit.stdout.contains("valid"), "{exit}");

    let workdir = Workdir::new(STANDARD_PLUGINS);
    workdir.write_config(&Config::default().to_toml().replacen(
        "{ delay_ms = 0 }",
        "{ delay_ms = 0, bogus = 1 }",
        1,
    ));
    assert!(workdir.list_plugins().status.success());
    let exit = workdir.run_with_config(&["validate"]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert!(exit.stderr.contains("bogus"), "{exit}");

    let redis =
        llm_host_tests::build_packages(&["llm-plugin-redis"]).join("libllm_plugin_redis.so");
    let workdir = Workdir::new(STANDARD_PLUGINS);
    std::fs::copy(
        &redis,
        workdir.path().join("plugins/libllm_plugin_redis.so"),
    )
    .expect("copy");
    workdir.write_config(&format!(
        "{}\n[stores.cache]\nplugin = \"redis\"\nsettings = {{ url = \"redis://127.0.0.1:1\" }}\n",
        Config::default().to_toml()
    ));
    let exit = workdir.run_with_config(&["validate"]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert!(
        exit.stderr.contains("stores.cache: does not answer"),
        "{exit}"
    );
}

// A reload says what changed, auth included (by key id, never a secret),
// and tells a session only about what it uses: a change to another backend
// is not its business.
#[tokio::test]
async fn reloads_report_what_changed_to_whom_it_concerns() {
    const OPS: &str = "ops-key-0123456789abcdef000";
    let keys = |extra: &str| Config {
        extra: format!(
            "\n[auth]\nkeys = [\n  {{ id = \"ops\", key = \"{OPS}\", admin = true }},\n{extra}]\n"
        ),
        ..Config::default()
    };
    let host = Host::start(&keys(""));
    let mut client = host.connect(&format!("/v1/ws?token={OPS}")).await;
    client.next_json().await;
    let mut short = host
        .connect(&format!("/v1/ws?token={OPS}&model=short"))
        .await;
    short.next_json().await;

    let edited = keys("  { id = \"bob\", key = \"bob-key-0123456789abcdef00\" },\n")
        .to_toml()
        .replacen("{ tokens = 3 }", "{ tokens = 4 }", 1);
    host.workdir().write_config(&edited);
    // The watcher may have applied it first; either way the log says it.
    reload_as(&host, OPS).await;
    let notice = short.next_json().await;
    assert_eq!(notice.diagnostic_code(), "reloaded", "{}", notice.text);
    let message = notice.entry()["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`short` was rebuilt with new settings"),
        "{message}"
    );
    assert!(
        !message.contains("sha256") && !message.contains("bob"),
        "{message}"
    );
    // The client on echo was told nothing: its next frame is its turn.
    client.send_text("still echo").await;
    let turn = client.read_turn().await;
    assert!(turn.diagnostics().is_empty(), "{}", turn.dump());
    assert!(host.logged("API key `bob` added").await, "{}", host.log());
}

// Rotating a key: its secrets come from key_file, read again on every
// reload; while it holds the old and the new secret both work; once the
// old one is gone, sockets opened with it close (1008) and the others go on.
#[tokio::test]
async fn a_key_is_rotated_without_a_gap() {
    const OPS: &str = "ops-key-0123456789abcdef000";
    const OLD: &str = "alice-old-0123456789abcdef";
    const NEW: &str = "alice-new-0123456789abcdef";
    let config = Config {
        extra: format!(
            "\n[auth]\nkeys = [\n  {{ id = \"ops\", key = \"{OPS}\", admin = true }},\n  \
             {{ id = \"alice\", key_file = \"alice.keys\" }},\n]\n"
        ),
        ..Config::default()
    };
    let workdir = llm_host_tests::Workdir::with_config(&config);
    let keys = workdir.path().join("alice.keys");
    std::fs::write(&keys, format!("{OLD}\n")).expect("write the key file");
    let host = Host::start_in(workdir, &[]);
    let mut old = host.connect(&format!("/v1/ws?token={OLD}")).await;
    old.next_json().await;

    std::fs::write(&keys, format!("# rotating\n{OLD}\n{NEW}\n")).expect("write");
    reload_as(&host, OPS).await;
    let mut new = host.connect(&format!("/v1/ws?token={NEW}")).await;
    new.next_json().await;
    old.send_text("old still works").await;
    assert_eq!(old.read_turn().await.text(), "echo: old still works");
    let listed = llm_host_tests::http_with(
        host.addr(),
        "GET",
        "/v1/keys",
        &[("Authorization", &format!("Bearer {OPS}"))],
    )
    .await;
    let listed = listed.json();
    assert_eq!(
        listed["keys"][1],
        json!({"id": "alice", "admin": false, "secrets": 2})
    );
    assert!(!listed.to_string().contains(OLD), "{listed}");

    std::fs::write(&keys, format!("{NEW}\n")).expect("write");
    reload_as(&host, OPS).await;
    let ending = loop {
        match old.next_text().await {
            Ok(_) => continue,
            Err(ending) => break ending,
        }
    };
    match ending {
        llm_host_tests::Ending::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a close with 1008, got {other:?}"),
    }
    new.send_text("new goes on").await;
    assert_eq!(new.read_turn().await.text(), "echo: new goes on");
    assert_eq!(
        host.http_upgrade(&format!("/v1/ws?token={OLD}"))
            .await
            .status,
        401
    );
}

// The audit log: a wrong key, a page of another origin and a key without
// the admin right are logged with the route and the client; a reload and a
// delete are logged with who asked and what came of it.
#[tokio::test]
async fn refusals_and_admin_actions_are_audited() {
    const OPS: &str = "ops-key-0123456789abcdef000";
    const BOB: &str = "bob-key-0123456789abcdef00";
    let host = Host::start(&Config {
        extra: format!(
            "\n[auth]\nkeys = [\n  {{ id = \"ops\", key = \"{OPS}\", admin = true }},\n  \
             {{ id = \"bob\", key = \"{BOB}\" }},\n]\n"
        ),
        ..Config::default()
    });
    let wrong = "Bearer wrong-key-0123456789abcdef";
    let reply = llm_host_tests::http_with(
        host.addr(),
        "GET",
        "/v1/sessions",
        &[("Authorization", wrong)],
    )
    .await;
    assert_eq!(reply.status, 401);
    let reply = host
        .http_upgrade("/v1/ws?token=wrong-key-0123456789abcdef")
        .await;
    assert_eq!(reply.status, 401);
    let bob = format!("Bearer {BOB}");
    let reply = llm_host_tests::http_with(
        host.addr(),
        "POST",
        "/v1/reload",
        &[("Authorization", &bob)],
    )
    .await;
    assert_eq!(reply.status, 403);
    let mut client = host
        .connect(&format!("/v1/ws?session=audited&token={BOB}"))
        .await;
    client.next_json().await;
    client.send_text("hello").await;
    client.read_turn().await;
    reload_as(&host, OPS).await;
    let ops = format!("Bearer {OPS}");
    let reply = llm_host_tests::http_with(
        host.addr(),
        "DELETE",
        "/v1/sessions/audited",
        &[("Authorization", &ops)],
    )
    .await;
    assert_eq!(reply.status, 204);
    assert!(
        host.logged("session audited deleted").await,
        "{}",
        host.log()
    );

    let log = host.log();
    let audit: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("llm_host::audit"))
        .collect();
    let has = |parts: &[&str]| {
        audit
            .iter()
            .any(|line| parts.iter().all(|part| line.contains(part)))
    };
    assert!(
        has(&[
            "request refused",
            "/v1/sessions",
            "client=127.0.0.1:",
            "unauthorized"
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&["request refused", "GET /v1/ws", "unauthorized"]),
        "{audit:#?}"
    );
    assert!(
        has(&["request refused", "POST /v1/reload", "forbidden"]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "admin action",
            "action=\"reload\"",
            "caller=\"ops\"",
            "outcome=\"unchanged\""
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "admin action",
            "delete session",
            "caller=\"ops\"",
            "session audited deleted"
        ]),
        "{audit:#?}"
    );
}

// Key ids label the metrics only where the operator opts in
// (`server.metrics_by_key`).
#[tokio::test]
async fn metrics_by_key_only_when_asked() {
    const OPS: &str = "ops-key-0123456789abcdef000";
    for by_key in [false, true] {
        let host = Host::start(&Config {
            server_extra: format!("metrics_by_key = {by_key}"),
            extra: format!(
                "\n[auth]\nkeys = [\n  {{ id = \"ops\", key = \"{OPS}\", admin = true }},\n]\n"
            ),
            ..Config::default()
        });
        let mut client = host
            .connect(&format!("/v1/ws?token={OPS}&model=short"))
            .await;
        client.next_json().await;
        client.send_text("x").await;
        client.read_turn().await;
        let bearer = format!("Bearer {OPS}");
        let metrics = llm_host_tests::http_with(
            host.addr(),
            "GET",
            "/metrics",
            &[("Authorization", &bearer)],
        )
        .await
        .body;
        let line = "llm_host_key_turns_total{key=\"ops\",backend=\"short\",status=\"completed\"} 1";
        assert_eq!(metrics.contains(line), by_key, "{metrics}");
        let tokens = "llm_host_key_tokens_total{key=\"ops\",kind=\"output\"} 3";
        assert_eq!(metrics.contains(tokens), by_key, "{metrics}");
        assert_eq!(metrics.contains("key=\"ops\""), by_key, "{metrics}");
    }
}

// Prompts waiting behind a running turn are counted by the backend they
// would run on, and uncounted once they run.
#[tokio::test]
async fn queue_depth_is_a_metric_by_backend() {
    let host = Host::start(&Config::default());
    let mut client = host.connect("/v1/ws?model=slow_echo").await;
    client.next_json().await;
    // 100 ms a word: the first runs for 400 ms while the others wait.
    for text in ["first of four words", "second", "third"] {
        client.send_text(text).await;
    }
    let wanted = "llm_host_queued_prompts{backend=\"slow_echo\"} 2";
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = http(host.addr(), "GET", "/metrics").await.body;
        if metrics.contains(wanted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.contains(wanted), "{metrics}");
    for _ in 0..3 {
        assert_eq!(client.read_turn().await.status(), "completed");
    }
    let metrics = http(host.addr(), "GET", "/metrics").await.body;
    assert!(
        metrics.contains("llm_host_queued_prompts{backend=\"slow_echo\"} 0"),
        "{metrics}"
    );
}
