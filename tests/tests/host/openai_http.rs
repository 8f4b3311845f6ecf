//! The OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/models`):
//! driven by the official `openai` Python package, the client most code
//! written for OpenAI uses, and by a raw HTTP client for the exact shapes
//! (statuses, error bodies, the event stream's framing, `[DONE]`).
//!
//! The Python tests need `python3` with `openai` (`pip install openai`,
//! which `.ci/run` does); without it they say they skipped, and fail under
//! `CI=true`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use llm_host_conformance::support::skip_or_fail;
use llm_host_tests::{http, http_with, Config, Host};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

// ---------------------------------------------------------------------------
// A raw HTTP client
// ---------------------------------------------------------------------------

/// An HTTP answer, its body de-chunked.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", self.body))
    }

    /// The event stream's events, each checked to be one `data: ` line.
    fn events(&self) -> Vec<String> {
        assert!(
            self.body.ends_with("\n\n"),
            "the stream ends with a blank line: {:?}",
            self.body
        );
        self.body
            .split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                assert!(!event.contains('\n'), "one line per event: {event:?}");
                event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("an event is `data: ...`: {event:?}"))
                    .to_owned()
            })
            .collect()
    }

    /// The events but `[DONE]`, parsed.
    fn chunks(&self) -> Vec<Value> {
        self.events()
            .iter()
            .filter(|event| *event != "[DONE]")
            .map(|event| serde_json::from_str(event).expect("each event is JSON"))
            .collect()
    }

    /// The OpenAI error: status, `type`, `code`, `param`.
    fn error(&self) -> (u16, String, String, Value) {
        let body = self.json();
        let error = &body["error"];
        for field in ["message", "type", "param", "code"] {
            assert!(error.get(field).is_some(), "no error.{field}: {body}");
        }
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        (
            self.status,
            error["type"].as_str().unwrap_or_default().to_owned(),
            error["code"].as_str().unwrap_or_default().to_owned(),
            error["param"].clone(),
        )
    }
}

/// Sends `request` (whole) and reads the answer to the end of the
/// connection. A write the host cut short (it answered early) is not an
/// error.
async fn exchange(addr: SocketAddr, request: Vec<u8>) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let _ = stream.write_all(&request).await;
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        parse(&raw)
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("an answer within 20 s")
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Reply {
        status,
        head: head.to_owned(),
        body,
    }
}

fn dechunk(mut data: &str) -> String {
    let mut body = String::new();
    while let Some((size, rest)) = data.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        body.push_str(&rest[..size]);
        data = rest[size..].strip_prefix("\r\n").unwrap_or_default();
    }
    body
}

fn request(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn post(addr: SocketAddr, headers: &[(&str, &str)], body: &Value) -> Reply {
    let request = request(addr, "/v1/chat/completions", headers, &body.to_string());
    exchange(addr, request).await
}

fn chat(model: &str, prompt: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": prompt }] })
}

fn streamed(model: &str, prompt: &str) -> Value {
    let mut body = chat(model, prompt);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    body
}

/// The text of a stream's content deltas.
fn content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect()
}

// ---------------------------------------------------------------------------
// Exact shapes
// ---------------------------------------------------------------------------

// A completion, non-streamed: OpenAI's `chat.completion` object.
#[tokio::test]
async fn a_completion_is_a_chat_completion_object() {
    let host = Host::start_default();
    let reply = post(host.addr(), &[], &chat("echo", "Hello there")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{}",
        reply.head
    );
    let body = reply.json();
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().is_some_and(|t| t > 1_600_000_000));
    assert_eq!(body["model"], "echo");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "echo: Hello there");
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &body["usage"];
    let (prompt, completion, total) = (
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
        usage["total_tokens"].as_u64().expect("total_tokens"),
    );
    assert_eq!((prompt, completion, total), (2, 3, 5), "{body}");

    // The request's whole conversation reaches the backend (stateless).
    let body = json!({
        "model": "echo",
        "messages": [
            { "role": "system", "content": "Be brief." },
            { "role": "user", "content": "one two" },
            { "role": "assistant", "content": "echo: one two" },
            { "role": "user", "content": [{ "type": "text", "text": "three" }] },
        ],
        "tools": [{ "type": "function", "function": {
            "name": "lookup", "parameters": { "type": "object" } } }],
        "temperature": 0.1,
    });
    let reply = post(host.addr(), &[], &body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: three");
    assert_eq!(body["usage"]["prompt_tokens"], 8, "{body}");

    // A token limit: finish_reason `length`.
    let mut body = chat("short", "hi");
    body["max_tokens"] = json!(1);
    let reply = post(host.addr(), &[], &body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "length");
}

// A streamed completion: `data: {chunk}` events, the role first, the deltas,
// the finish reason, the usage, then `data: [DONE]`.
#[tokio::test]
async fn a_stream_is_openais_event_stream() {
    let host = Host::start_default();
    let reply = post(host.addr(), &[], &streamed("echo", "Hello there")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("text/event-stream"),
        "{}",
        reply.head
    );
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks = reply.chunks();
    assert_eq!(chunks.len() + 1, events.len(), "[DONE] comes once, last");
    let id = chunks[0]["id"].as_str().expect("an id");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["id"], id, "one id in every chunk");
        assert_eq!(chunk["model"], "echo");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(content(&chunks), "echo: Hello there");
    let (usage, rest) = chunks.split_last().expect("chunks");
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert_eq!(usage["usage"]["total_tokens"], 5, "{usage}");
    let (finish, deltas) = rest.split_last().expect("a finish chunk");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop", "{finish}");
    for chunk in deltas {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null, "{chunk}");
        assert_eq!(chunk["usage"], Value::Null, "usage is null until the last");
    }

    // Without include_usage: no usage chunk, no usage fields.
    let mut body = chat("short", "hi");
    body["stream"] = json!(true);
    let reply = post(host.addr(), &[], &body).await;
    let chunks = reply.chunks();
    assert_eq!(content(&chunks), "token0 token1 token2");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
    assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
}

// Errors in OpenAI's shape, with OpenAI's statuses.
#[tokio::test]
async fn errors_are_openais() {
    let config = Config {
        server_extra: "max_prompt_bytes = 1000".to_owned(),
        models: [
            ("echo", "{ delay_ms = 0 }"),
            ("failing", "{ fail_after = 1 }"),
            // The config writes `settings = ...` and then this line.
            ("capped", "{ delay_ms = 0 }\nmax_tokens_limit = 10"),
        ]
        .iter()
        .map(|(name, settings)| ((*name).to_owned(), (*settings).to_owned()))
        .collect(),
        ..Config::default()
    };
    let host = Host::start(&config);
    let addr = host.addr();
    let raw = |body: &str| request(addr, "/v1/chat/completions", &[], body);

    let reply = exchange(addr, raw("{not json")).await;
    let (status, kind, _, _) = reply.error();
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));

    let reply = post(addr, &[], &json!({ "model": "echo", "messages": [] })).await;
    assert_eq!(reply.error().3, "messages");
    assert_eq!(reply.status, 400);

    let reply = post(
        addr,
        &[],
        &json!({ "model": "echo", "messages": [
            { "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "x" } }] }
        ]}),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.error().3, "messages[0].content[0].type");

    let reply = post(addr, &[], &chat("nope", "hi")).await;
    let (status, _, code, param) = reply.error();
    assert_eq!((status, code.as_str()), (404, "model_not_found"));
    assert_eq!(param, "model");

    let mut body = chat("capped", "hi");
    body["max_tokens"] = json!(11);
    let reply = post(addr, &[], &body).await;
    let (status, _, code, _) = reply.error();
    assert_eq!((status, code.as_str()), (400, "max_tokens_too_large"));

    let reply = post(addr, &[], &chat("echo", &"x".repeat(1001))).await;
    let (status, _, code, _) = reply.error();
    assert_eq!((status, code.as_str()), (413, "prompt_too_long"));

    // The body over server.max_frame_bytes (65536): refused by its length.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 70000\r\nConnection: close\r\n\r\n"
    );
    let reply = exchange(addr, head.into_bytes()).await;
    let (status, _, code, _) = reply.error();
    assert_eq!((status, code.as_str()), (413, "request_too_large"));

    // The backend fails after one token: 500 with its code; streamed, the
    // error ends the stream (no [DONE]).
    let reply = post(addr, &[], &chat("failing", "one two three")).await;
    let (status, kind, code, _) = reply.error();
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (500, "server_error", "injected_failure")
    );
    let reply = post(addr, &[], &streamed("failing", "one two three")).await;
    assert_eq!(reply.status, 200);
    let events = reply.events();
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON");
    assert_eq!(last["error"]["code"], "injected_failure", "{events:?}");
    assert!(!events.iter().any(|event| event == "[DONE]"));
    assert_eq!(content(&reply.chunks()[..events.len() - 1]), "echo:");

    // Models: the list, one, and an unknown one.
    let reply = http(addr, "GET", "/v1/models").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let list = reply.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|model| {
            assert_eq!(model["object"], "model");
            assert_eq!(model["owned_by"], "llm-host");
            assert!(model["created"].as_u64().is_some());
            model["id"].as_str().expect("id")
        })
        .collect();
    assert_eq!(ids, ["capped", "echo", "failing"]);
    let reply = http(addr, "GET", "/v1/models/echo").await;
    assert_eq!(reply.json()["id"], "echo");
    let reply = http(addr, "GET", "/v1/models/nope").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "model_not_found");

    // A page of another origin: 403 in OpenAI's shape on this API, in the
    // host's own on the rest.
    let evil = [("Origin", "http://evil.example")];
    let reply = post(addr, &evil, &chat("echo", "hi")).await;
    let (status, kind, code, _) = reply.error();
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (403, "permission_error", "origin_not_allowed")
    );
    let reply = http_with(addr, "GET", "/v1/models", &evil).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["error"]["type"], "permission_error");
    let reply = http_with(addr, "GET", "/v1/sessions", &evil).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["error"]["code"], "origin_not_allowed");
    assert_eq!(reply.json()["error"].get("type"), None, "{}", reply.body);
}

// Keys: 401 without one or with a wrong one; a session header persists the
// exchange in the caller's session, which another key cannot use (404).
#[tokio::test]
async fn keys_and_sessions_work_as_for_sockets() {
    let host = Host::start(&with_keys());
    let addr = host.addr();
    let alice = format!("Bearer {ALICE}");
    let bob = format!("Bearer {BOB}");
    for headers in [
        vec![],
        vec![("Authorization", "Bearer not-a-key-0000000000")],
    ] {
        let reply = post(addr, &headers, &chat("echo", "hi")).await;
        assert_eq!(reply.error().0, 401, "{}", reply.body);
        let reply = http_with(addr, "GET", "/v1/models", &headers).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }

    let session = [
        ("Authorization", alice.as_str()),
        ("X-Session-Id", "chat-7"),
    ];
    let reply = post(addr, &session, &chat("echo", "one two")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-session-id").as_deref(), Some("chat-7"));
    // The stored history is used, not the request's earlier messages.
    let body = json!({ "model": "echo", "messages": [
        { "role": "user", "content": "ignored earlier message" },
        { "role": "user", "content": "three" },
    ]});
    let reply = post(addr, &session, &body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    assert_eq!(answer["choices"][0]["message"]["content"], "echo: three");
    // one two + echo: one two + three
    assert_eq!(answer["usage"]["prompt_tokens"], 6, "{answer}");
    // Streamed, too.
    let reply = post(addr, &session, &streamed("echo", "four")).await;
    assert_eq!(content(&reply.chunks()), "echo: four");

    let stored = http_with(
        addr,
        "GET",
        "/v1/sessions/chat-7",
        &[("Authorization", &alice)],
    )
    .await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    let messages: Vec<(String, String)> = stored.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("user", "one two"),
        ("assistant", "echo: one two"),
        ("user", "three"),
        ("assistant", "echo: three"),
        ("user", "four"),
        ("assistant", "echo: four"),
    ]
    .iter()
    .map(|(r, c)| ((*r).to_owned(), (*c).to_owned()))
    .collect();
    assert_eq!(messages, expected);

    // Bob cannot use Alice's session: 404, as if it did not exist.
    let reply = post(
        addr,
        &[("Authorization", bob.as_str()), ("X-Session-Id", "chat-7")],
        &chat("echo", "mine?"),
    )
    .await;
    let (status, _, code, _) = reply.error();
    assert_eq!((status, code.as_str()), (404, "session_not_found"));
    // A bad id, and a session turn whose last message is not the user's.
    let reply = post(
        addr,
        &[
            ("Authorization", alice.as_str()),
            ("X-Session-Id", "no spaces"),
        ],
        &chat("echo", "hi"),
    )
    .await;
    assert_eq!(reply.error().2, "bad_session_id");
    let body = json!({ "model": "echo", "messages": [
        { "role": "user", "content": "hi" }, { "role": "assistant", "content": "hello" }
    ]});
    let reply = post(addr, &session, &body).await;
    assert_eq!(reply.error().0, 400);
    // Without the header nothing is stored.
    let listed = http_with(addr, "GET", "/v1/sessions", &[("Authorization", &alice)]).await;
    assert_eq!(listed.json()["sessions"], json!(["chat-7"]));
}

// `server.turns_per_minute` counts HTTP turns with the key's socket turns: 429.
#[tokio::test]
async fn the_turn_rate_is_the_keys() {
    let config = Config {
        server_extra: "turns_per_minute = 2".to_owned(),
        ..Config::default()
    };
    let host = Host::start(&config);
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("on the socket").await;
    assert_eq!(client.read_turn().await.status(), "completed");
    let reply = post(host.addr(), &[], &chat("echo", "one")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = post(host.addr(), &[], &chat("echo", "two")).await;
    let (status, kind, code, _) = reply.error();
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (429, "rate_limit_error", "rate_limited")
    );
}

/// Waits up to `limit` for the host's metrics to count `count` turns of
/// `backend` with `status`.
async fn wait_for_turns(
    host: &Host,
    headers: &[(&str, &str)],
    (backend, status, count): (&str, &str, u64),
    limit: Duration,
) -> bool {
    let wanted = format!("llm_host_backend_turns_total{{backend=\"{backend}\",status=\"{status}\"");
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let metrics = http_with(host.addr(), "GET", "/metrics", headers).await;
        let counted: u64 = metrics
            .body
            .lines()
            .filter(|line| line.starts_with(&wanted))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if counted >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

// A client that goes away cancels its turn, streamed (after two tokens) or
// not (while it waits for the answer): the backend stops long before it
// would have finished.
#[tokio::test]
async fn a_client_gone_cancels_its_turn() {
    let host = Host::start_default();
    let addr = host.addr();
    for (count, stream) in [(1, true), (2, false)] {
        let started = Instant::now();
        let mut connection = TcpStream::connect(addr).await.expect("connect");
        let mut body = streamed("slow", "go");
        body["stream"] = json!(stream);
        let body = body.to_string();
        connection
            .write_all(&request(addr, "/v1/chat/completions", &[], &body))
            .await
            .expect("send");
        if stream {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while String::from_utf8_lossy(&seen).matches("token").count() < 2 {
                assert!(
                    Instant::now() < deadline,
                    "no tokens: {:?}",
                    String::from_utf8_lossy(&seen)
                );
                let mut buffer = [0u8; 1024];
                let n = connection.read(&mut buffer).await.expect("read");
                assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buffer[..n]);
            }
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(connection);
        assert!(
            wait_for_turns(
                &host,
                &[],
                ("slow", "cancelled", count),
                Duration::from_secs(3)
            )
            .await,
            "no cancelled turn of `slow` (stream: {stream}) in the metrics; log:\n{}",
            host.log()
        );
        // `slow` streams 100 tokens 50 ms apart: 5 s unless stopped.
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    assert!(!http(addr, "GET", "/metrics")
        .await
        .body
        .contains("llm_host_backend_turns_total{backend=\"slow\",status=\"completed\""));
}

// ---------------------------------------------------------------------------
// The official client
// ---------------------------------------------------------------------------

#[path = "openai_http/python.rs"]
mod python;
