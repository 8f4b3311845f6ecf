//! Bounds per session and per key: history size, resumes of one large
//! session on many sockets, prompts queued over a key's connections,
//! `maxTokens`, and the rate of turns per client in open mode.

use std::net::SocketAddr;
use std::time::Duration;

use llm_host_tests::{json, Config, Frame, Host, COMMAND_PROTOCOL};
use tokio::net::TcpSocket;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS")
}

/// Reads frames until the turn's end; answers the diagnostics' codes and
/// the end's status.
async fn codes_and_status(client: &mut llm_host_tests::Client) -> (Vec<String>, String) {
    let mut codes = Vec::new();
    loop {
        let frame = client.next_json().await;
        if frame.is_diagnostic() {
            codes.push(frame.diagnostic_code().to_owned());
        }
        if frame.is_turn_end() {
            return (
                codes,
                frame.event()["status"].as_str().unwrap_or("").to_owned(),
            );
        }
    }
}

// A session's history stops at server.max_history_bytes: the prompt that
// would pass it is refused (`history_full`, the turn failed) and the
// session keeps what it had.
#[tokio::test]
async fn history_stops_at_its_limit_and_keeps_what_it_had() {
    let host = Host::start(&Config {
        server_extra: "max_history_bytes = 4096\n".to_owned(),
        ..Config::default()
    });
    let mut client = host.connect("/v1/ws?session=full").await;
    client.next_json().await;
    let prompt = "x".repeat(900);
    let mut refused_at = None;
    for turn in 1..=6 {
        client.send_text(prompt.clone()).await;
        let (codes, status) = codes_and_status(&mut client).await;
        if codes.contains(&"history_full".to_owned()) {
            assert_eq!(status, "failed");
            refused_at = Some(turn);
            break;
        }
        assert_eq!(status, "completed", "{codes:?}");
    }
    // Two messages of ~900 bytes a turn: the third turn would pass 4 KiB.
    assert_eq!(refused_at, Some(3));
    let stored = llm_host_tests::http(host.addr(), "GET", "/v1/sessions/full").await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    let messages = stored.json()["messages"].as_array().map(Vec::len);
    assert_eq!(messages, Some(4), "{}", stored.body);
}

// Thirty sockets resuming one large session do not hold a copy each.
#[tokio::test]
async fn resuming_a_large_session_on_many_sockets_holds_no_copy_each() {
    let host = Host::start(&Config {
        max_frame_bytes: 2 << 20,
        server_extra: "max_prompt_bytes = 2097152\n".to_owned(),
        ..Config::default()
    });
    let mut writer = host.connect("/v1/ws?session=big").await;
    writer.next_json().await;
    for _ in 0..4 {
        writer.send_text("y".repeat(1 << 20)).await;
        writer.read_turn().await;
    }
    writer.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(host.pid());
    let mut readers = Vec::new();
    for _ in 0..30 {
        let mut reader = host.connect("/v1/ws?session=big").await;
        reader.next_json().await;
        readers.push(reader);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mib = rss_kib(host.pid()).saturating_sub(before) / 1024;
    // The session is ~8 MiB of messages; a copy per socket would be
    // 240 MiB and more.
    assert!(
        grown_mib < 80,
        "30 resumes grew the host by {grown_mib} MiB"
    );
    // And each of them still runs turns on it.
    readers[0].send_text("more").await;
    assert_eq!(readers[0].read_turn().await.text(), "echo: more");
}

// A key's prompts waiting over all its connections are capped.
#[tokio::test]
async fn one_key_cannot_queue_without_bound() {
    let host = Host::start(&Config {
        server_extra: "max_queued_prompts_per_key = 3\n".to_owned(),
        ..Config::default()
    });
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = host.connect("/v1/ws?model=slow").await;
        client.next_json().await;
        clients.push(client);
    }
    // Each connection: one turn running, two waiting; six waiting in all
    // would pass the key's three.
    for client in &mut clients {
        for text in ["a", "b", "c"] {
            client.send_text(text).await;
        }
    }
    let mut refused = 0;
    for client in &mut clients {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline {
            let Ok(Ok(text)) =
                tokio::time::timeout(Duration::from_millis(200), client.next_text()).await
            else {
                continue;
            };
            let frame = Frame::parse(&text);
            if frame.is_diagnostic() && frame.diagnostic_code() == "key_queue_full" {
                refused += 1;
            }
        }
    }
    assert!(refused >= 3, "only {refused} prompts were refused");
}

// A backend's max_tokens_limit caps what a client may ask.
#[tokio::test]
async fn max_tokens_is_capped_per_backend() {
    let text = Config::default().to_toml().replacen(
        "[models.echo]\nplugin = \"echo\"\n",
        "[models.echo]\nplugin = \"echo\"\nmax_tokens_limit = 100\n",
        1,
    );
    let workdir = llm_host_tests::Workdir::new(llm_host_tests::STANDARD_PLUGINS);
    workdir.write_config(&text);
    let host = Host::start_in(workdir, &[]);
    let mut client = host.connect_command("/v1/ws").await;
    client.next_json().await;
    client
        .send_json(&json!({"type": "prompt", "text": "hi", "params": {"maxTokens": 1000}}))
        .await;
    let frame = client.next_json().await;
    assert_eq!(frame.diagnostic_code(), "max_tokens_too_large", "{frame:?}");
    assert_eq!(client.next_json().await.event()["status"], "refused");
    client
        .send_json(&json!({"type": "prompt", "text": "hi", "params": {"maxTokens": 50}}))
        .await;
    assert_eq!(client.read_turn().await.status(), "completed");
    // Another backend has no limit.
    client
        .send_json(
            &json!({"type": "prompt", "text": "hi", "model": "short", "params": {"maxTokens": 1000}}),
        )
        .await;
    assert_eq!(client.read_turn().await.status(), "completed");
}

/// A WebSocket client connected from the loopback address `from`.
async fn client_from(from: [u8; 4], addr: SocketAddr) -> llm_host_tests::Client {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from((from, 0))).expect("bind");
    let stream = socket.connect(addr).await.expect("connect");
    llm_host_tests::Client::over(
        stream,
        &format!("ws://{addr}/v1/ws"),
        Some(COMMAND_PROTOCOL),
    )
    .await
}

// In open mode each client address has its own turns_per_minute.
#[tokio::test]
async fn open_mode_rates_each_client_address_on_its_own() {
    let host = Host::start(&Config {
        server_extra: "turns_per_minute = 2\n".to_owned(),
        ..Config::default()
    });
    let mut greedy = client_from([127, 0, 0, 3], host.addr()).await;
    greedy.next_json().await;
    for _ in 0..2 {
        greedy
            .send_json(&json!({"type": "prompt", "text": "hi"}))
            .await;
        assert_eq!(greedy.read_turn().await.status(), "completed");
    }
    greedy
        .send_json(&json!({"type": "prompt", "text": "hi"}))
        .await;
    let refusal = greedy.next_json().await;
    assert_eq!(refusal.diagnostic_code(), "rate_limited", "{refusal:?}");
    assert_eq!(greedy.next_json().await.event()["status"], "refused");
    let mut other = client_from([127, 0, 0, 4], host.addr()).await;
    other.next_json().await;
    other
        .send_json(&json!({"type": "prompt", "text": "hi"}))
        .await;
    assert_eq!(other.read_turn().await.status(), "completed");
}

// A prompt tagged with an id in command mode is named by its refusal and
// by its turn's end; a refused prompt ends with status `refused`.
#[tokio::test]
async fn refusals_and_turn_ends_name_the_prompt() {
    let host = Host::start(&Config {
        server_extra: "max_prompt_bytes = 10\n".to_owned(),
        ..Config::default()
    });
    let mut client = host.connect_command("/v1/ws").await;
    client.next_json().await;
    client
        .send_json(&json!({"type": "prompt", "id": "p-1", "text": "far too long to run"}))
        .await;
    let refusal = client.next_json().await;
    assert_eq!(refusal.diagnostic_code(), "prompt_too_long", "{refusal:?}");
    assert_eq!(refusal.entry()["data"]["promptId"], "p-1");
    let end = client.next_json().await;
    assert_eq!(end.event()["status"], "refused");
    assert_eq!(end.event()["promptId"], "p-1");
    client
        .send_json(&json!({"type": "prompt", "id": "p-2", "text": "short"}))
        .await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed");
    assert_eq!(turn.end().event()["promptId"], "p-2");
    assert_eq!(turn.interaction_id(), "turn-1");
    client
        .send_json(&json!({"type": "prompt", "id": "x".repeat(200), "text": "hi"}))
        .await;
    assert_eq!(client.next_json().await.diagnostic_code(), "bad_frame");
}
