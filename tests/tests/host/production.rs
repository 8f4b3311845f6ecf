//! Production concerns: API keys and session ownership, limits, metrics,
//! health, graceful shutdown.

use std::time::{Duration, Instant};

use llm_host_tests::{http, http_with, Config, Ending, Host, Turn, Workdir};

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdef00";
const OPS: &str = "ops-key-0123456789abcdef000";

fn with_keys() -> Config {
    Config {
        extra: format!(
            "\n[auth]\nkeys = [\n  {{ id = \"alice\", key = \"{ALICE}\" }},\n  \
             {{ id = \"bob\", key = \"{BOB}\" }},\n  {{ id = \"ops\", key = \"{OPS}\", admin = true }},\n]\n"
        ),
        ..Config::default()
    }
}

fn with_server(lines: &str) -> Config {
    Config {
        server_extra: lines.to_owned(),
        ..Config::default()
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

// Without a key, or with a wrong one, the upgrade is refused with 401; a key in the query or the header works.
#[tokio::test]
async fn wrong_or_missing_keys_are_refused() {
    let host = Host::start(&with_keys());
    let reply = host.http_upgrade("/v1/ws").await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "unauthorized");
    let reply = host
        .http_upgrade("/v1/ws?token=not-a-key-at-all-0000")
        .await;
    assert_eq!(reply.status, 401, "{}", reply.body);

    let mut client = host.connect(&format!("/v1/ws?token={ALICE}")).await;
    client.next_json().await;
    client.send_text("hi").await;
    assert_eq!(client.read_turn().await.text(), "echo: hi");

    let reply = http_with(
        host.addr(),
        "GET",
        "/v1/sessions",
        &[("Authorization", &bearer(BOB))],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = http_with(
        host.addr(),
        "GET",
        "/v1/sessions",
        &[("Authorization", "Bearer nope-nope-nope-nope")],
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
}

// A session belongs to the key that created it: another key can neither resume, read, list nor delete it (404).
#[tokio::test]
async fn another_keys_session_is_not_found() {
    let host = Host::start(&with_keys());
    let mut alice = host
        .connect(&format!("/v1/ws?session=alice-1&token={ALICE}"))
        .await;
    alice.next_json().await;
    alice.send_text("secret plans").await;
    assert_eq!(alice.read_turn().await.status(), "completed");

    let reply = host
        .http_upgrade(&format!("/v1/ws?session=alice-1&token={BOB}"))
        .await;
    assert_eq!(reply.status, 404, "bob cannot resume it: {}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "session_not_found");

    let as_bob = [("Authorization", bearer(BOB))];
    let as_bob: Vec<(&str, &str)> = as_bob.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let reply = http_with(host.addr(), "GET", "/v1/sessions/alice-1", &as_bob).await;
    assert_eq!(reply.status, 404, "bob cannot read it: {}", reply.body);
    let reply = http_with(host.addr(), "DELETE", "/v1/sessions/alice-1", &as_bob).await;
    assert_eq!(reply.status, 404, "bob cannot delete it: {}", reply.body);
    let reply = http_with(host.addr(), "GET", "/v1/sessions", &as_bob).await;
    assert_eq!(
        reply.json()["sessions"],
        serde_json::json!([]),
        "bob lists none of it"
    );

    let reply = http(
        host.addr(),
        "GET",
        &format!("/v1/sessions/alice-1?token={ALICE}"),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let session = reply.json();
    assert_eq!(session["messages"][0]["content"], "secret plans");
    assert_eq!(session["messages"][1]["content"], "echo: secret plans");
    let reply = http(host.addr(), "GET", &format!("/v1/sessions?token={ALICE}")).await;
    assert_eq!(reply.json()["sessions"], serde_json::json!(["alice-1"]));
    let reply = http(
        host.addr(),
        "GET",
        &format!("/v1/sessions/alice-1?token={OPS}"),
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "an admin key reads every session: {}",
        reply.body
    );
    let reply = http(
        host.addr(),
        "DELETE",
        &format!("/v1/sessions/alice-1?token={ALICE}"),
    )
    .await;
    assert_eq!(reply.status, 204, "{}", reply.body);
    let reply = http(
        host.addr(),
        "GET",
        &format!("/v1/sessions/alice-1?token={ALICE}"),
    )
    .await;
    assert_eq!(reply.status, 404, "{}", reply.body);
}

// Admin endpoints need an admin key; health needs none.
#[tokio::test]
async fn admin_endpoints_need_an_admin_key() {
    let host = Host::start(&with_keys());
    for path in ["/v1/plugins", "/v1/config", "/metrics"] {
        let reply = http(host.addr(), "GET", path).await;
        assert_eq!(reply.status, 401, "{path} without a key: {}", reply.body);
        let reply = http(host.addr(), "GET", &format!("{path}?token={ALICE}")).await;
        assert_eq!(reply.status, 403, "{path} with a user key: {}", reply.body);
        let reply = http(host.addr(), "GET", &format!("{path}?token={OPS}")).await;
        assert_eq!(
            reply.status, 200,
            "{path} with an admin key: {}",
            reply.body
        );
    }
    let config = http(host.addr(), "GET", &format!("/v1/config?token={OPS}")).await;
    assert!(
        !config.body.contains(ALICE),
        "keys never appear: {}",
        config.body
    );
    let reply = http(host.addr(), "POST", &format!("/v1/reload?token={ALICE}")).await;
    assert_eq!(reply.status, 403);
    assert_eq!(http(host.addr(), "GET", "/healthz").await.status, 200);
    let ready = http(host.addr(), "GET", "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["store"], "memory");
}

// Open mode on an address other machines reach needs auth.open = true.
#[test]
fn open_mode_on_a_public_address_needs_an_explicit_setting() {
    let workdir = Workdir::with_config(&Config {
        listen: "0.0.0.0:0".to_owned(),
        ..Config::default()
    });
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(exit.stderr.contains("auth.open = true"), "{exit}");

    let mut host = Host::start(&Config {
        listen: "0.0.0.0:0".to_owned(),
        extra: "\n[auth]\nopen = true\n".to_owned(),
        ..Config::default()
    });
    assert!(host.is_running());
}

// Past turns_per_minute a prompt gets a rate_limited diagnostic and is not run.
#[tokio::test]
async fn turns_per_minute_are_limited_per_key() {
    let host = Host::start(&with_server("turns_per_minute = 2"));
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    for word in ["one", "two"] {
        client.send_text(word).await;
        assert_eq!(client.read_turn().await.status(), "completed");
    }
    client.send_text("three").await;
    let frame = client.next_json().await;
    assert_eq!(frame.diagnostic_code(), "rate_limited", "{}", frame.text);
    assert_eq!(frame.entry()["level"], "error");
    // A refused prompt still ends, so a client waiting for the end is not stuck.
    let end = client.next_json().await;
    assert!(end.is_turn_end(), "{}", end.text);
    assert_eq!(end.event()["status"], "refused", "{}", end.text);
}

// A prompt over max_prompt_bytes gets prompt_too_long and is not run; the connection goes on.
#[tokio::test]
async fn long_prompts_are_refused() {
    let host = Host::start(&with_server("max_prompt_bytes = 10"));
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("this prompt is far too long").await;
    let frame = client.next_json().await;
    assert_eq!(frame.diagnostic_code(), "prompt_too_long", "{}", frame.text);
    let end = client.next_json().await;
    assert_eq!(end.event()["status"], "refused", "{}", end.text);
    client.send_text("short").await;
    assert_eq!(client.read_turn().await.text(), "echo: short");
}

// Past max_connections an upgrade gets 503; a freed place can be taken again.
#[tokio::test]
async fn connections_are_capped() {
    let host = Host::start(&with_server("max_connections = 1"));
    let mut first = host.connect("/v1/ws").await;
    first.next_json().await;
    let reply = host.http_upgrade("/v1/ws").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "too_many_connections");
    first.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = host.http_upgrade("/v1/ws").await;
        if reply.status == 101 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place never came back: {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// A connection with no prompt for idle_timeout_secs gets a diagnostic and a normal close.
#[tokio::test]
async fn idle_connections_are_closed() {
    let host = Host::start(&with_server(
        "idle_timeout_secs = 1\nping_interval_secs = 1",
    ));
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("one").await;
    client.read_turn().await;
    let frame = client.next_json().await;
    assert_eq!(frame.diagnostic_code(), "idle_timeout", "{}", frame.text);
    match client.expect_end().await {
        Ending::Close(Some(close)) => assert_eq!(u16::from(close.code), 1000, "{close:?}"),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

// A turn past turn_timeout_secs is stopped with a turn_timeout error and ends failed.
#[tokio::test]
async fn turns_past_their_deadline_fail() {
    let host = Host::start(&with_server("turn_timeout_secs = 1"));
    let mut client = host.connect("/v1/ws?model=slow").await;
    client.next_json().await;
    client.send_text("go").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "failed", "{}", turn.dump());
    let error = turn
        .model_event("error")
        .unwrap_or_else(|| panic!("no error: {}", turn.dump()));
    assert_eq!(error["error"]["code"], "turn_timeout");
    assert!(turn.deltas().len() < 100, "stopped early: {}", turn.dump());
}

/// The sum of the samples of `name` (a metric name, or a name with labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name).is_some_and(|rest| {
                rest.starts_with(' ') || (!name.contains('{') && rest.starts_with('{'))
            })
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// /metrics counters move with traffic.
#[tokio::test]
async fn metrics_move_with_traffic() {
    let host = Host::start_default();
    let before = http(host.addr(), "GET", "/metrics").await.body;
    let mut client = host.connect("/v1/ws?model=short").await;
    client.next_json().await;
    client.send_text("count").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed");
    let after = http(host.addr(), "GET", "/metrics").await.body;

    let completed = "llm_host_turns_total{status=\"completed\"}";
    assert_eq!(
        metric(&after, completed) - metric(&before, completed),
        1.0,
        "{after}"
    );
    let events = turn.model_frames().len() as f64;
    assert_eq!(
        metric(&after, "llm_host_events_total") - metric(&before, "llm_host_events_total"),
        events,
        "{after}"
    );
    assert_eq!(
        metric(&after, "llm_host_connections_accepted_total")
            - metric(&before, "llm_host_connections_accepted_total"),
        1.0
    );
    assert_eq!(
        metric(&after, "llm_host_turn_duration_seconds_count")
            - metric(&before, "llm_host_turn_duration_seconds_count"),
        1.0
    );
    assert!(
        metric(&after, "llm_host_tokens_total{kind=\"output\"}") >= 3.0,
        "{after}"
    );
    assert!(
        metric(
            &after,
            "llm_host_store_operation_seconds_count{op=\"save\"}"
        ) >= 1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "llm_host_plugin_loads_total"),
        2.0,
        "{after}"
    );
    assert_eq!(metric(&after, "llm_host_connections"), 1.0, "{after}");
}

// SIGTERM mid-turn: the running turn finishes and is saved, the socket closes with 1001, the host exits 0.
#[tokio::test]
async fn sigterm_lets_the_running_turn_finish_then_closes_with_1001() {
    let mut host = Host::start_default();
    let mut client = host.connect("/v1/ws?model=slow_echo").await;
    client.next_json().await;
    client.send_text("one two three four five").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    host.signal("TERM");
    let rest = client.read_turn().await;
    frames.extend(rest.frames);
    let turn = Turn { frames };
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "echo: one two three four five");
    match client.expect_end().await {
        Ending::Close(Some(close)) => assert_eq!(u16::from(close.code), 1001, "{close:?}"),
        other => panic!("expected a close frame with 1001, got {other:?}"),
    }
    let status = host
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the host did not exit; log:\n{}", host.log()));
    assert!(status.success(), "{status}; log:\n{}", host.log());
    assert!(host.log().contains("stopped"), "{}", host.log());
}

// A socket that finishes connecting after SIGTERM (it waited for another socket's turn on
// its session) still hears the shutdown: it is closed with 1001 and runs no turn, and
// the host exits without waiting out the grace period.
#[tokio::test]
async fn a_socket_that_connects_during_shutdown_is_closed_with_1001() {
    let mut host = Host::start_default();
    let mut first = host.connect("/v1/ws?session=late-1&model=slow_echo").await;
    first.next_json().await;
    first.send_text("one two three four five six").await;
    first.read_until("interaction.model", "delta").await;
    // Announced at once, it follows the running turn of its session.
    let mut late = host.connect("/v1/ws?session=late-1").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    host.signal("TERM");
    let started = Instant::now();
    assert_eq!(first.read_turn().await.status(), "completed");
    let open = late.next_json().await;
    assert_eq!(open.name(), "interaction.session", "{}", open.text);
    late.send_text("too late").await;
    match late.expect_end().await {
        Ending::Close(Some(close)) => assert_eq!(u16::from(close.code), 1001, "{close:?}"),
        other => panic!("expected a close frame with 1001, got {other:?}"),
    }
    let status = host
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the host did not exit; log:\n{}", host.log()));
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

// A client that stops reading while its turn streams is dropped after
// server.write_timeout_secs: its turn is cancelled (at once with no
// reconnect grace, as here) and saved with what it had, and the host goes
// on serving everyone else.
#[tokio::test]
async fn a_client_that_takes_nothing_is_dropped_and_its_turn_saved() {
    let mut config = with_server("write_timeout_secs = 1\nreconnect_grace_secs = 0");
    config
        .models
        .push(("huge".to_owned(), "{ tokens = 300000 }".to_owned()));
    let host = Host::start(&config);
    let mut stuck = host.connect("/v1/ws?session=stuck&model=huge").await;
    stuck.next_json().await;
    // The prompt goes out; nothing is read from here on.
    stuck.send_text("go").await;

    // The turn ends when the host gives up on the client, and is saved.
    let bound = Instant::now() + Duration::from_secs(60);
    let saved = loop {
        let reply = http(host.addr(), "GET", "/v1/sessions/stuck").await;
        if reply.status == 200 {
            let session: serde_json::Value =
                serde_json::from_str(&reply.body).expect("session JSON");
            if session["messages"].as_array().map(Vec::len) == Some(2) {
                break session;
            }
        }
        assert!(
            Instant::now() < bound,
            "the stuck client's turn was never saved: {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let answer = saved["messages"][1]["content"].as_str().unwrap_or_default();
    let words = answer.split_whitespace().count();
    assert!(
        (1..300_000).contains(&words),
        "a partial answer is saved: {words} words"
    );

    // Everyone else is served.
    let mut other = host.connect("/v1/ws?model=short").await;
    other.next_json().await;
    other.send_text("hello").await;
    let turn = other.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    drop(stuck);
}

// Bob connects to `user-42` before it exists; Alice then creates it and talks. Bob's
// next prompt is refused as if the session did not exist: nothing of either reaches
// the other.
#[tokio::test]
async fn a_key_that_connected_first_does_not_join_a_session_another_key_created() {
    let host = Host::start(&with_keys());
    let mut bob = host
        .connect(&format!("/v1/ws?session=user-42&token={BOB}"))
        .await;
    bob.next_json().await;
    let mut alice = host
        .connect(&format!("/v1/ws?session=user-42&token={ALICE}"))
        .await;
    alice.next_json().await;
    alice.send_text("alice secret").await;
    assert_eq!(alice.read_turn().await.status(), "completed");

    bob.send_text("bob here").await;
    let refused = bob.read_turn().await;
    assert_eq!(refused.status(), "failed", "{}", refused.dump());
    let codes: Vec<&str> = refused
        .diagnostics()
        .iter()
        .map(|d| d.diagnostic_code())
        .collect();
    assert_eq!(codes, ["session_not_found"], "{}", refused.dump());
    assert!(!refused.dump().contains("alice secret"));

    let reply = http(
        host.addr(),
        "GET",
        &format!("/v1/sessions/user-42?token={ALICE}"),
    )
    .await;
    assert_eq!(reply.status, 200);
    let messages = reply.json()["messages"].to_string();
    assert!(
        messages.contains("alice secret") && !messages.contains("bob here"),
        "{messages}"
    );
    let reply = http(
        host.addr(),
        "GET",
        &format!("/v1/sessions/user-42?token={BOB}"),
    )
    .await;
    assert_eq!(reply.status, 404);
}

// An upgrade whose headers finish after SIGTERM is refused with 503 `shutting_down`,
// not switched to a socket the host is about to close.
#[tokio::test]
async fn an_upgrade_finished_after_sigterm_gets_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut host = Host::start_default();
    let mut stream = tokio::net::TcpStream::connect(host.addr())
        .await
        .expect("connect");
    stream
        .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: llm-host\r\nUpgrade: websocket\r\n")
        .await
        .expect("send half the headers");
    tokio::time::sleep(Duration::from_millis(200)).await;
    host.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream
        .write_all(
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("send the rest");
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("shutting_down"), "{answer}");
    drop(stream);
    let status = host
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the host did not exit; log:\n{}", host.log()));
    assert!(status.success(), "{status}");
}

/// The status line the host answers a WebSocket upgrade sent with `Origin: origin`.
async fn upgrade_status(host: &Host, origin: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(host.addr())
        .await
        .expect("connect");
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Origin: {origin}\r\n\r\n",
        host.addr()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

// On the shipped (open, loopback) config, a page of another origin can neither open a
// session nor read the HTTP API; pages of this machine's loopback names and clients
// that send no Origin (not browsers) are served as before.
#[tokio::test]
async fn pages_of_other_origins_cannot_drive_a_local_host() {
    let host = Host::start_default();
    let refused = upgrade_status(&host, "http://evil.example").await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("origin_not_allowed"), "{refused}");
    // DNS rebinding: a hostile name that resolves to 127.0.0.1.
    let rebound = upgrade_status(
        &host,
        &format!("http://rebind.example:{}", host.addr().port()),
    )
    .await;
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    let local = upgrade_status(&host, "http://localhost:8080").await;
    assert!(local.starts_with("HTTP/1.1 101"), "{local}");

    for path in ["/v1/config", "/v1/sessions", "/v1/plugins"] {
        let reply = http_with(
            host.addr(),
            "GET",
            path,
            &[("Origin", "http://evil.example")],
        )
        .await;
        assert_eq!(reply.status, 403, "{path}: {}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "origin_not_allowed");
        assert_eq!(http(host.addr(), "GET", path).await.status, 200, "{path}");
    }
}

// An origin the operator allows may open sessions; in open mode it still gets no
// admin API, which answers this machine only.
#[tokio::test]
async fn an_allowed_origin_opens_sessions_but_gets_no_admin_in_open_mode() {
    let host = Host::start(&with_server(
        "allowed_origins = [\"https://chat.example.com\"]",
    ));
    let allowed = upgrade_status(&host, "https://chat.example.com").await;
    assert!(allowed.starts_with("HTTP/1.1 101"), "{allowed}");
    let other = upgrade_status(&host, "https://other.example.com").await;
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
    let reply = http_with(
        host.addr(),
        "GET",
        "/v1/config",
        &[("Origin", "https://chat.example.com")],
    )
    .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "admin_only");
}

// The handshake is checked: a key that is not 16 bytes of base64 gets 400, and a 426
// names the protocol version the host speaks.
#[tokio::test]
async fn malformed_handshakes_are_refused() {
    let host = Host::start_default();
    let upgrade = |key: &str, version: &str| {
        vec![
            ("Upgrade", "websocket".to_owned()),
            ("Connection", "Upgrade".to_owned()),
            ("Sec-WebSocket-Key", key.to_owned()),
            ("Sec-WebSocket-Version", version.to_owned()),
        ]
    };
    let send = |headers: Vec<(&'static str, String)>| {
        let addr = host.addr();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            http_with(addr, "GET", "/v1/ws", &headers).await
        }
    };
    let reply = send(upgrade("!", "13")).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "bad_handshake");
    let reply = send(upgrade("dGhlIHNhbXBsZSBub25jZQ==", "8")).await;
    assert_eq!(reply.status, 426, "{}", reply.body);
    assert!(
        reply
            .headers
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{}",
        reply.headers
    );
}

// A prompt refused for a full queue does not spend one of the key's turns a minute;
// `frame_too_large` is counted among the refusals.
#[tokio::test]
async fn a_full_queue_spends_no_turn_and_refusals_are_counted() {
    let mut config = with_server("turns_per_minute = 3");
    config.max_queued_prompts = 1;
    config.max_frame_bytes = 64;
    let host = Host::start(&config);
    let mut client = host.connect("/v1/ws?model=slow_echo").await;
    client.next_json().await;
    // One turn runs, one waits; the third is refused for the queue.
    for prompt in ["one two", "three", "four"] {
        client.send_text(prompt).await;
    }
    let mut codes = Vec::new();
    let mut ended = 0;
    while ended < 2 {
        let frame = client.next_json().await;
        if frame.is_turn_end() && frame.event()["status"] != "refused" {
            ended += 1;
        } else if frame.name() == "interaction.diagnostic" {
            codes.push(frame.diagnostic_code().to_owned());
        }
    }
    assert_eq!(codes, ["queue_full"]);
    // Two turns spent; the third of the minute is still there.
    client.send_text("five").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());

    client.send_text("x".repeat(100)).await;
    let refused = client.next_json().await;
    assert_eq!(refused.diagnostic_code(), "frame_too_large");
    let metrics = http(host.addr(), "GET", "/metrics").await.body;
    assert_eq!(
        metric(
            &metrics,
            "llm_host_refused_total{reason=\"frame_too_large\"}"
        ),
        1.0,
        "{metrics}"
    );
}

// A session id percent-encoded in the path is the id it encodes.
#[tokio::test]
async fn session_paths_are_percent_decoded() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws?session=del-race").await;
    client.next_json().await;
    client.send_text("hello").await;
    client.read_turn().await;
    let reply = http(host.addr(), "GET", "/v1/sessions/del%2Drace").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["id"], "del-race");
    let reply = http(host.addr(), "DELETE", "/v1/sessions/del%2Drace").await;
    assert_eq!(reply.status, 204, "{}", reply.body);
}
