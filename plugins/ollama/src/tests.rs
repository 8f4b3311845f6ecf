//! Drives the plugin through the host's trait object against a local server
//! that answers in Ollama's wire format.

use std::sync::Once;
use std::time::Duration;

use llm_host_plugin_api::{
    codes, FinishReason, Message, ModelRequest, Role, ToolCall, ToolSpec, TurnParams,
};
use llm_plugin_http::testing::{self as t, Action, MockServer, Recorder};
use serde_json::{json, Value};

use super::*;

const KEY_ENV: &str = "LLM_PLUGIN_OLLAMA_TEST_KEY";
const KEY: &str = "ollama-test-0123456789abcdef";
/// Failure guard for waits on the server; never a timing assertion.
const GUARD: Duration = Duration::from_secs(15);
const NDJSON: &str = "application/x-ndjson";

/// Sets the key's variable once, before any test reads the environment.
fn setup() {
    static ENV: Once = Once::new();
    ENV.call_once(|| std::env::set_var(KEY_ENV, KEY));
}

fn settings(server: &str, extra: Value) -> String {
    let mut settings = json!({
        "base_url": server,
        "model": "llama3.2",
        "max_retries": 0,
        "timeout_ms": 10_000,
    });
    if let Value::Object(extra) = extra {
        for (key, value) in extra {
            settings[key] = value;
        }
    }
    settings.to_string()
}

fn prompt(text: &str) -> ModelRequest {
    ModelRequest {
        messages: vec![Message::new(Role::User, text)],
        ..ModelRequest::default()
    }
}

fn ask_with(settings: &str, request: &ModelRequest, rec: &mut Recorder) {
    setup();
    let adapter = OllamaPlugin::new_model(settings).expect("settings accepted");
    t::run(&adapter, request, rec).expect("generate returns Ok");
}

fn ask(settings: &str, request: &ModelRequest) -> Recorder {
    let mut rec = Recorder::default();
    ask_with(settings, request, &mut rec);
    rec
}

/// One line of the stream, as Ollama writes it.
fn part(message: Value) -> String {
    let mut message = message;
    message["role"] = "assistant".into();
    format!(
        "{}\n",
        json!({"model": "llama3.2", "created_at": "2025-05-01T08:52:19.385406455-07:00",
               "message": message, "done": false})
    )
}

fn done(reason: &str, prompt_eval: u64, eval: u64) -> String {
    format!(
        "{}\n",
        json!({"model": "llama3.2", "created_at": "2025-05-01T08:52:20.385406455-07:00",
               "message": {"role": "assistant", "content": ""}, "done": true,
               "done_reason": reason, "total_duration": 4_883_583_458_u64,
               "load_duration": 1_334_875, "prompt_eval_count": prompt_eval,
               "prompt_eval_duration": 342_546_000, "eval_count": eval,
               "eval_duration": 4_535_599_000_u64})
    )
}

fn hello() -> Vec<Action> {
    t::chunked(
        NDJSON,
        &[part(json!({"content": "Hello"})), done("stop", 3, 1)],
    )
}

#[test]
fn streams_thinking_and_text_then_usage_and_the_done_reason() {
    let server = MockServer::start(vec![t::chunked(
        NDJSON,
        &[
            part(json!({"content": "", "thinking": "Let me think"})),
            part(json!({"content": "", "thinking": " briefly."})),
            part(json!({"content": "Hello"})),
            part(json!({"content": " world"})),
            done("stop", 26, 4),
        ],
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(
        rec.events,
        [
            "start llama3.2",
            "reasoning \"Let me think\"",
            "reasoning \" briefly.\"",
            "text \"Hello\"",
            "text \" world\"",
            "usage 26 4 30",
            "end stop",
        ]
    );
}

#[test]
fn tool_calls_arrive_whole_however_the_bytes_are_cut() {
    let body = [
        part(json!({"content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
            {"id": "call_x1", "function": {"index": 1, "name": "get_time",
                                           "arguments": {"tz": "Asia/Tokyo"}}}]})),
        done("stop", 120, 30),
    ]
    .concat();
    let pieces: Vec<Vec<u8>> = body.as_bytes().chunks(5).map(<[u8]>::to_vec).collect();
    let server = MockServer::start(vec![t::chunked(NDJSON, &pieces)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Weather?"));
    assert_eq!(
        rec.tool_calls,
        [
            ToolCall {
                id: "call_0".into(),
                name: "get_weather".into(),
                arguments: "{\"city\":\"Tokyo\"}".into()
            },
            ToolCall {
                id: "call_x1".into(),
                name: "get_time".into(),
                arguments: "{\"tz\":\"Asia/Tokyo\"}".into()
            },
        ]
    );
    assert_eq!(rec.end, Some(FinishReason::TOOL_CALLS));
    assert_eq!(rec.usage.map(|u| u.input_tokens), Some(120));
}

#[test]
fn the_length_limit_is_reported() {
    let server = MockServer::start(vec![t::chunked(
        NDJSON,
        &[part(json!({"content": "Once"})), done("length", 3, 1)],
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.end, Some(FinishReason::LENGTH));
}

#[test]
fn the_request_carries_model_messages_options_tools_and_the_key() {
    let server = MockServer::start(vec![hello()]);
    let settings = settings(
        &server.url(),
        json!({"system": "Be brief.", "temperature": 0.1, "top_k": 40, "seed": 42,
               "max_tokens": 256, "stop": ["END"], "api_key_env": KEY_ENV}),
    );
    let request = ModelRequest {
        messages: vec![
            Message::new(Role::System, "From the session."),
            Message::new(Role::User, "What's the weather?"),
            Message {
                role: Role::Assistant,
                tool_calls: vec![ToolCall {
                    id: "call_0".into(),
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Tokyo\"}".into(),
                }],
                ..Message::default()
            },
            Message {
                role: Role::Tool,
                content: "11 degrees".into(),
                tool_call_id: Some("call_0".into()),
                ..Message::default()
            },
            Message::new(Role::User, "Thanks"),
        ],
        params: TurnParams {
            temperature: Some(0.7),
            max_tokens: Some(64),
            tools: vec![ToolSpec {
                name: "get_weather".into(),
                description: "Weather by city".into(),
                parameters: json!({"type": "object",
                                   "properties": {"city": {"type": "string"}}}),
            }],
            ..TurnParams::default()
        },
        ..ModelRequest::default()
    };
    let rec = ask(&settings, &request);
    assert_eq!(rec.text, "Hello");
    let sent = server.single_request();
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/api/chat");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(sent.header("accept"), Some(NDJSON));
    assert_eq!(
        sent.json(),
        json!({
            "model": "llama3.2",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "system", "content": "From the session."},
                {"role": "user", "content": "What's the weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
                {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"},
                {"role": "user", "content": "Thanks"},
            ],
            "stream": true,
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "description": "Weather by city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "options": {"temperature": 0.7, "top_k": 40, "seed": 42, "num_predict": 64,
                        "stop": ["END"]},
        })
    );
}

#[test]
fn each_result_is_named_after_its_call_in_the_round_it_answers() {
    // Ollama sends no ids: every answer's calls are `call_0`, `call_1`, ...,
    // so an id comes back in each round of calls, for another tool.
    let server = MockServer::start(vec![hello()]);
    let call = |id: &str, name: &str| ToolCall {
        id: id.into(),
        name: name.into(),
        arguments: "{}".into(),
    };
    let calls = |tool_calls: Vec<ToolCall>| Message {
        role: Role::Assistant,
        tool_calls,
        ..Message::default()
    };
    let result = |id: &str, content: &str| Message {
        role: Role::Tool,
        content: content.into(),
        tool_call_id: Some(id.into()),
        ..Message::default()
    };
    let request = ModelRequest {
        messages: vec![
            Message::new(Role::User, "Weather and time?"),
            calls(vec![
                call("call_0", "get_weather"),
                call("call_1", "get_time"),
            ]),
            result("call_0", "sunny"),
            result("call_1", "noon"),
            calls(vec![
                call("call_0", "get_time"),
                call("call_1", "get_weather"),
            ]),
            result("call_0", "one pm"),
            result("call_1", "cloudy"),
        ],
        ..ModelRequest::default()
    };
    ask(&settings(&server.url(), json!({})), &request);
    let body = server.single_request().json();
    let named: Vec<(&str, &str)> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            (
                m["content"].as_str().unwrap_or_default(),
                m["tool_name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        named,
        [
            ("sunny", "get_weather"),
            ("noon", "get_time"),
            ("one pm", "get_time"),
            ("cloudy", "get_weather"),
        ]
    );
}

#[test]
fn without_api_key_env_no_authorization_is_sent() {
    let server = MockServer::start(vec![hello()]);
    ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    let sent = server.single_request();
    assert_eq!(sent.header("authorization"), None);
    assert!(sent.json().get("options").is_none());
}

#[test]
fn http_errors_map_to_codes_in_ollamas_words() {
    let cases = [
        (
            404,
            "model \"nope\" not found, try pulling it first",
            codes::NOT_FOUND,
        ),
        (400, "invalid options: top_q", codes::INVALID_REQUEST),
        (401, "unauthorized", codes::AUTH),
        (
            500,
            "llama runner process has terminated: signal: killed",
            codes::UPSTREAM,
        ),
    ];
    for (status, message, code) in cases {
        let server =
            MockServer::start(vec![t::json_error(status, &[], &json!({"error": message}))]);
        let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
        assert_eq!(rec.error_code(), Some(code), "{status}: {rec:?}");
        assert!(rec.error_message().contains(message), "{status}: {rec:?}");
    }
}

#[test]
fn a_rate_limit_waits_as_retry_after_says_then_succeeds() {
    let server = MockServer::start(vec![
        t::json_error(
            429,
            &[("retry-after", "1")],
            &json!({"error": "too many requests"}),
        ),
        hello(),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 2})),
        &prompt("Hi"),
    );
    assert_eq!(rec.text, "Hello");
    assert_eq!(server.requests().len(), 2);
    let data: Value = serde_json::from_str(&rec.diagnostics[0].2).expect("JSON data");
    assert_eq!(data["code"], codes::RATE_LIMITED);
    assert_eq!(data["delayMs"], 1000, "retry-after is honoured");
}

#[test]
fn a_rate_limit_that_persists_is_rate_limited() {
    let server = MockServer::start(vec![
        t::json_error(429, &[("retry-after", "0")], &json!({"error": "busy"})),
        t::json_error(429, &[("retry-after", "0")], &json!({"error": "busy"})),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::RATE_LIMITED));
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn a_server_error_then_success_is_retried() {
    let server = MockServer::start(vec![
        t::json_error(503, &[], &json!({"error": "server busy, please try again"})),
        hello(),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.text, "Hello");
    assert_eq!(rec.diagnostics.len(), 1);
    assert!(rec.diagnostics[0].1.contains("server busy"), "{rec:?}");
}

#[test]
fn a_malformed_stream_is_a_bad_response() {
    let server = MockServer::start(vec![t::chunked(
        NDJSON,
        &[
            part(json!({"content": "Hel"})),
            "{\"model\": \"llama3.2\", \"message\": oops}\n".to_owned(),
        ],
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.text, "Hel");
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE));
}

#[test]
fn an_error_line_is_mapped() {
    let server = MockServer::start(vec![t::chunked(
        NDJSON,
        &[
            part(json!({"content": "Hel"})),
            "{\"error\":\"an error was encountered while running the model\"}\n".to_owned(),
        ],
    )]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 2})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::UPSTREAM));
    assert!(
        rec.error_message().contains("while running the model"),
        "{rec:?}"
    );
    assert_eq!(server.requests().len(), 1, "no retry after output");
}

#[test]
fn a_port_nobody_listens_on_is_a_connection_error() {
    let rec = ask(
        &settings(&t::refused_url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::CONNECTION));
    assert!(rec.error_message().contains("Ollama"), "{rec:?}");
    assert_eq!(rec.diagnostics.len(), 1, "one retry announced");
}

#[test]
fn a_stream_that_stops_midway_is_interrupted() {
    let cut = vec![
        t::chunked_head(200, NDJSON),
        t::chunk(part(json!({"content": "Hel"}))),
    ];
    let close = vec![
        t::close_delimited_head(200, NDJSON),
        Action::Send(part(json!({"content": "Hel"})).into_bytes()),
        // Half a line, then the end.
        Action::Send(b"{\"model\":\"llama3.2\",\"message\":{\"content\":\"lo".to_vec()),
    ];
    for script in [cut, close] {
        let server = MockServer::start(vec![script]);
        let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
        assert_eq!(rec.text, "Hel");
        assert_eq!(rec.error_code(), Some(codes::INTERRUPTED), "{rec:?}");
    }
}

#[test]
fn a_last_line_without_its_newline_still_counts() {
    let server = MockServer::start(vec![vec![
        t::close_delimited_head(200, NDJSON),
        Action::Send(part(json!({"content": "Hi"})).into_bytes()),
        Action::Send(done("stop", 1, 1).trim_end().as_bytes().to_vec()),
    ]]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.end, Some(FinishReason::STOP), "{rec:?}");
}

#[test]
fn silence_past_timeout_ms_is_a_timeout_and_closes_the_connection() {
    // A model loading for longer than timeout_ms: no response head at all.
    let server = MockServer::start(vec![vec![Action::AwaitClose]]);
    let rec = ask(
        &settings(&server.url(), json!({"timeout_ms": 300})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::TIMEOUT), "{rec:?}");
    assert!(
        server.wait_closed(GUARD),
        "the plugin left the connection open"
    );
}

#[test]
fn cancel_closes_the_upstream_connection() {
    let server = MockServer::start(vec![vec![
        t::chunked_head(200, NDJSON),
        t::chunk(part(json!({"content": "Hel"}))),
        t::chunk(part(json!({"content": "lo"}))),
        Action::AwaitClose,
    ]]);
    let mut rec = Recorder::cancelling_at(1);
    ask_with(&settings(&server.url(), json!({})), &prompt("Hi"), &mut rec);
    assert_eq!(rec.events, ["start llama3.2", "text \"Hel\""]);
    assert!(
        server.wait_closed(GUARD),
        "the upstream connection stayed open"
    );
}

#[test]
fn cancel_while_the_upstream_is_silent_closes_the_connection() {
    let mut rec = Recorder::default();
    let server = MockServer::start(vec![vec![
        t::chunked_head(200, NDJSON),
        Action::Raise(rec.cancel.clone()),
        Action::AwaitClose,
    ]]);
    ask_with(&settings(&server.url(), json!({})), &prompt("Hi"), &mut rec);
    assert!(rec.error.is_none() && rec.end.is_none(), "{rec:?}");
    assert!(
        server.wait_closed(GUARD),
        "the upstream connection stayed open"
    );
}

#[test]
fn settings_default_to_the_local_server() {
    setup();
    let ollama = Ollama::new(api::parse_settings(r#"{"model": "llama3.2"}"#).expect("settings"))
        .expect("backend");
    assert_eq!(ollama.backend.base_url, "http://127.0.0.1:11434");
    assert!(ollama.backend.api_key.is_none());
    assert_eq!(ollama.backend.max_retries, 2);
    let err = OllamaPlugin::new_model(r#"{"model": "m", "num_ctx": 4096}"#)
        .err()
        .expect("refused");
    assert!(err.message.contains("num_ctx"), "{err}");
}

mod bounds;
