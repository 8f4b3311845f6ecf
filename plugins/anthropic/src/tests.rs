//! Drives the plugin through the host's trait object against a local server
//! that answers in the Messages API's wire format.

use std::sync::Once;
use std::time::Duration;

use llm_host_plugin_api::{
    codes, FinishReason, LogLevel, Message, ModelRequest, Role, ToolCall, ToolSpec, TurnParams,
};
use llm_plugin_http::testing::{self as t, Action, MockServer, Recorder};
use serde_json::{json, Value};

use super::*;

const KEY_ENV: &str = "LLM_PLUGIN_ANTHROPIC_TEST_KEY";
const KEY: &str = "sk-ant-test-0123456789abcdef";
/// Failure guard for waits on the server; never a timing assertion.
const GUARD: Duration = Duration::from_secs(15);

/// Sets the key's variable once, before any test reads the environment.
fn setup() {
    static ENV: Once = Once::new();
    ENV.call_once(|| std::env::set_var(KEY_ENV, KEY));
}

fn settings(server: &str, extra: Value) -> String {
    let mut settings = json!({
        "base_url": server,
        "model": "claude-test",
        "api_key_env": KEY_ENV,
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
    let adapter = AnthropicPlugin::new_model(settings).expect("settings accepted");
    t::run(&adapter, request, rec).expect("generate returns Ok");
}

fn ask(settings: &str, request: &ModelRequest) -> Recorder {
    let mut rec = Recorder::default();
    ask_with(settings, request, &mut rec);
    rec
}

/// One server-sent event as the API writes it.
fn ev(data: &Value) -> String {
    let name = data["type"].as_str().unwrap_or("message");
    format!("event: {name}\ndata: {data}\n\n")
}

fn message_start(input_tokens: u64) -> Value {
    json!({"type": "message_start", "message": {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
        "content": [], "model": "claude-test-20250514", "stop_reason": null,
        "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}})
}

fn block_start(index: u64, block: Value) -> Value {
    json!({"type": "content_block_start", "index": index, "content_block": block})
}

fn delta(index: u64, delta: Value) -> Value {
    json!({"type": "content_block_delta", "index": index, "delta": delta})
}

fn text_delta(index: u64, text: &str) -> Value {
    delta(index, json!({"type": "text_delta", "text": text}))
}

fn block_stop(index: u64) -> Value {
    json!({"type": "content_block_stop", "index": index})
}

fn message_delta(stop_reason: &str, output_tokens: u64) -> Value {
    json!({"type": "message_delta",
           "delta": {"stop_reason": stop_reason, "stop_sequence": null},
           "usage": {"output_tokens": output_tokens}})
}

fn message_stop() -> Value {
    json!({"type": "message_stop"})
}

fn stream(events: &[Value]) -> Vec<Action> {
    let frames: Vec<String> = events.iter().map(ev).collect();
    t::chunked("text/event-stream; charset=utf-8", &frames)
}

fn hello() -> Vec<Action> {
    stream(&[
        message_start(5),
        block_start(0, json!({"type": "text", "text": ""})),
        text_delta(0, "Hello"),
        block_stop(0),
        message_delta("end_turn", 2),
        message_stop(),
    ])
}

#[test]
fn streams_thinking_and_text_then_usage_and_the_stop_reason() {
    let server = MockServer::start(vec![stream(&[
        message_start(25),
        block_start(0, json!({"type": "thinking", "thinking": ""})),
        delta(
            0,
            json!({"type": "thinking_delta", "thinking": "Let me think"}),
        ),
        json!({"type": "ping"}),
        delta(
            0,
            json!({"type": "thinking_delta", "thinking": " briefly."}),
        ),
        delta(
            0,
            json!({"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}),
        ),
        block_stop(0),
        block_start(1, json!({"type": "text", "text": ""})),
        text_delta(1, "Hello"),
        text_delta(1, " world"),
        block_stop(1),
        message_delta("end_turn", 15),
        message_stop(),
    ])]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(
        rec.events,
        [
            "start claude-test-20250514",
            "reasoning \"Let me think\"",
            "reasoning \" briefly.\"",
            "text \"Hello\"",
            "text \" world\"",
            "usage 25 15 40",
            "end stop",
        ]
    );
    assert_eq!(
        rec.start.as_ref().map(|s| s.0.as_str()),
        Some("msg_01XFDUDYJgAACzvnptvVoYEL")
    );
}

#[test]
fn a_tool_call_split_over_many_deltas_arrives_whole_at_its_block_stop() {
    let json_delta = |index, part: &str| {
        delta(
            index,
            json!({"type": "input_json_delta", "partial_json": part}),
        )
    };
    let body: String = [
        message_start(472),
        block_start(0, json!({"type": "text", "text": ""})),
        text_delta(0, "Checking."),
        block_stop(0),
        block_start(
            1,
            json!({"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                   "name": "get_weather", "input": {}}),
        ),
        json_delta(1, ""),
        json_delta(1, "{\"loca"),
        json_delta(1, "tion\": \"San Fra"),
        json_delta(1, "ncisco, CA\"}"),
        block_stop(1),
        block_start(
            2,
            json!({"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}),
        ),
        block_stop(2),
        message_delta("tool_use", 89),
        message_stop(),
    ]
    .iter()
    .map(ev)
    .collect();
    // Cut the bytes anywhere, across lines and JSON, as TCP may.
    let pieces: Vec<Vec<u8>> = body.as_bytes().chunks(11).map(<[u8]>::to_vec).collect();
    let server = MockServer::start(vec![t::chunked("text/event-stream", &pieces)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Weather?"));
    assert_eq!(
        rec.tool_calls,
        [
            ToolCall {
                id: "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
                name: "get_weather".into(),
                arguments: "{\"location\": \"San Francisco, CA\"}".into()
            },
            ToolCall {
                id: "toolu_02".into(),
                name: "get_time".into(),
                arguments: "{}".into()
            },
        ]
    );
    assert_eq!(
        rec.events.last().map(String::as_str),
        Some("end tool-calls")
    );
    assert_eq!(rec.usage.map(|u| u.output_tokens), Some(89));
}

#[test]
fn the_request_carries_model_system_messages_params_tools_and_the_key() {
    let server = MockServer::start(vec![hello()]);
    let settings = settings(
        &server.url(),
        json!({"system": "Be brief.", "temperature": 0.1, "top_k": 40, "max_tokens": 512,
               "stop": ["END"], "headers": {"anthropic-beta": "tools-2024-04-04"}}),
    );
    let request = ModelRequest {
        messages: vec![
            Message::new(Role::System, "From the session."),
            Message::new(Role::User, "What's the weather?"),
            Message {
                role: Role::Assistant,
                content: "Let me check.".into(),
                reasoning: Some("Weather wanted.".into()),
                tool_calls: vec![ToolCall {
                    id: "toolu_a".into(),
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Paris\"}".into(),
                }],
                ..Message::default()
            },
            Message {
                role: Role::Tool,
                content: "sunny".into(),
                tool_call_id: Some("toolu_a".into()),
                ..Message::default()
            },
            Message::new(Role::User, "Thanks"),
        ],
        params: TurnParams {
            temperature: Some(0.7),
            top_p: Some(0.5),
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
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("anthropic-beta"), Some("tools-2024-04-04"));
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(
        sent.json(),
        json!({
            "model": "claude-test",
            "max_tokens": 512,
            "system": "Be brief.\n\nFrom the session.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What's the weather?"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_a", "name": "get_weather",
                     "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
                    {"type": "text", "text": "Thanks"}]},
            ],
            "stream": true,
            "temperature": 0.7,
            "top_p": 0.5,
            "top_k": 40,
            "stop_sequences": ["END"],
            "tools": [{"name": "get_weather", "description": "Weather by city",
                       "input_schema": {"type": "object",
                                        "properties": {"city": {"type": "string"}}}}],
        })
    );
}

#[test]
fn max_tokens_defaults_and_seed_is_reported_as_ignored() {
    let server = MockServer::start(vec![hello()]);
    let mut request = prompt("Hi");
    request.params.seed = Some(3);
    let rec = ask(&settings(&server.url(), json!({})), &request);
    let body = server.single_request().json();
    assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
    assert!(
        body.get("seed").is_none() && body.get("system").is_none(),
        "{body}"
    );
    assert_eq!(rec.diagnostics.len(), 1, "{:?}", rec.diagnostics);
    assert_eq!(rec.diagnostics[0].0, LogLevel::WARN);
    assert!(
        rec.diagnostics[0].1.contains("seed"),
        "{:?}",
        rec.diagnostics
    );
}

fn api_error(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message},
           "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
}

#[test]
fn http_errors_map_to_codes_in_the_apis_words() {
    let cases = [
        (
            401,
            "authentication_error",
            "invalid x-api-key",
            codes::AUTH,
        ),
        (
            403,
            "permission_error",
            "no access to this model",
            codes::AUTH,
        ),
        (
            404,
            "not_found_error",
            "model: claude-nope",
            codes::NOT_FOUND,
        ),
        (
            400,
            "invalid_request_error",
            "messages: at least one message is required",
            codes::INVALID_REQUEST,
        ),
        (
            413,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
            codes::INVALID_REQUEST,
        ),
        (500, "api_error", "Internal server error", codes::UPSTREAM),
        (529, "overloaded_error", "Overloaded", codes::UPSTREAM),
    ];
    for (status, kind, message, code) in cases {
        let server = MockServer::start(vec![t::json_error(status, &[], &api_error(kind, message))]);
        let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
        assert_eq!(rec.error_code(), Some(code), "{status}: {rec:?}");
        assert!(rec.error_message().contains(message), "{status}: {rec:?}");
        assert!(!rec.error_message().contains(KEY));
    }
}

#[test]
fn a_rate_limit_waits_as_retry_after_says_then_succeeds() {
    let server = MockServer::start(vec![
        t::json_error(
            429,
            &[("retry-after", "1")],
            &api_error(
                "rate_limit_error",
                "Number of requests has exceeded your rate limit",
            ),
        ),
        hello(),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 2})),
        &prompt("Hi"),
    );
    assert_eq!(rec.text, "Hello");
    assert_eq!(server.requests().len(), 2);
    assert_eq!(rec.diagnostics.len(), 1, "{:?}", rec.diagnostics);
    let data: Value = serde_json::from_str(&rec.diagnostics[0].2).expect("JSON data");
    assert_eq!(data["code"], codes::RATE_LIMITED);
    assert_eq!(data["delayMs"], 1000, "retry-after is honoured");
}

#[test]
fn a_rate_limit_that_persists_is_rate_limited() {
    let limited = api_error("rate_limit_error", "rate limited");
    let server = MockServer::start(vec![
        t::json_error(429, &[("retry-after", "0")], &limited),
        t::json_error(429, &[("retry-after", "0")], &limited),
        t::json_error(429, &[("retry-after", "0")], &limited),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 2})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::RATE_LIMITED));
    assert_eq!(server.requests().len(), 3);
    assert_eq!(rec.diagnostics.len(), 2);
}

#[test]
fn an_overloaded_error_event_before_any_output_is_retried() {
    let server = MockServer::start(vec![
        stream(&[
            message_start(5),
            api_error("overloaded_error", "Overloaded"),
        ]),
        hello(),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.text, "Hello");
    assert_eq!(server.requests().len(), 2);
    assert_eq!(
        rec.events.iter().filter(|e| e.starts_with("start")).count(),
        1,
        "one start: {:?}",
        rec.events
    );
}

#[test]
fn an_error_event_after_output_is_reported_not_retried() {
    let server = MockServer::start(vec![stream(&[
        message_start(5),
        block_start(0, json!({"type": "text", "text": ""})),
        text_delta(0, "Hel"),
        api_error("overloaded_error", "Overloaded"),
    ])]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 2})),
        &prompt("Hi"),
    );
    assert_eq!(rec.text, "Hel");
    assert_eq!(rec.error_code(), Some(codes::UPSTREAM));
    assert_eq!(
        rec.error_message(),
        "Anthropic reported an error: Overloaded"
    );
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn a_malformed_stream_is_a_bad_response() {
    let mut script = vec![t::chunked_head(200, "text/event-stream")];
    script.push(t::chunk(ev(&message_start(5))));
    script.push(t::chunk(
        "event: content_block_start\ndata: {\"type\": \"content_block_start\", \"index\": }\n\n",
    ));
    script.push(t::last_chunk());
    let server = MockServer::start(vec![script]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE), "{rec:?}");
}

#[test]
fn a_port_nobody_listens_on_is_a_connection_error() {
    let rec = ask(
        &settings(&t::refused_url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::CONNECTION));
    assert_eq!(rec.diagnostics.len(), 1, "one retry announced");
}

#[test]
fn a_stream_that_stops_midway_is_interrupted() {
    let frames = [
        message_start(5),
        block_start(0, json!({"type": "text", "text": ""})),
        text_delta(0, "Hel"),
    ];
    let body: String = frames.iter().map(ev).collect();
    let cut = vec![t::chunked_head(200, "text/event-stream"), t::chunk(&body)];
    let close = vec![
        t::close_delimited_head(200, "text/event-stream"),
        Action::Send(body.clone().into_bytes()),
    ];
    for script in [cut, close] {
        let server = MockServer::start(vec![script]);
        let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
        assert_eq!(rec.text, "Hel");
        assert_eq!(rec.error_code(), Some(codes::INTERRUPTED), "{rec:?}");
    }
}

#[test]
fn silence_past_timeout_ms_is_a_timeout_and_closes_the_connection() {
    let server = MockServer::start(vec![vec![
        t::chunked_head(200, "text/event-stream"),
        t::chunk(ev(&message_start(5))),
        Action::AwaitClose,
    ]]);
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
        t::chunked_head(200, "text/event-stream"),
        t::chunk(ev(&message_start(5))),
        t::chunk(ev(&block_start(0, json!({"type": "text", "text": ""})))),
        t::chunk(ev(&text_delta(0, "Hel"))),
        t::chunk(ev(&text_delta(0, "lo"))),
        Action::AwaitClose,
    ]]);
    let mut rec = Recorder::cancelling_at(1);
    ask_with(&settings(&server.url(), json!({})), &prompt("Hi"), &mut rec);
    assert_eq!(rec.events, ["start claude-test-20250514", "text \"Hel\""]);
    assert!(
        server.wait_closed(GUARD),
        "the upstream connection stayed open"
    );
}

#[test]
fn cancel_while_the_upstream_is_silent_closes_the_connection() {
    let mut rec = Recorder::default();
    let server = MockServer::start(vec![vec![
        t::chunked_head(200, "text/event-stream"),
        t::chunk(ev(&message_start(5))),
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
fn stop_reasons_map_to_finish_reasons() {
    for (stop, want) in [
        ("end_turn", FinishReason::STOP),
        ("stop_sequence", FinishReason::STOP),
        ("max_tokens", FinishReason::LENGTH),
        ("tool_use", FinishReason::TOOL_CALLS),
    ] {
        let server = MockServer::start(vec![stream(&[
            message_start(5),
            message_delta(stop, 1),
            message_stop(),
        ])]);
        let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
        assert_eq!(rec.end, Some(want), "{stop}");
    }
}

#[test]
fn settings_are_checked_by_name() {
    setup();
    let err = |text: &str| {
        AnthropicPlugin::new_model(text)
            .err()
            .expect("refused")
            .message
            .to_string()
    };
    assert!(err(r#"{"model": "m", "seed": 1}"#).contains("seed"));
    assert!(err(r#"{"model": "m", "max_token": 1}"#).contains("max_token"));
    assert!(err(r#"{"model": "m", "headers": {"bad name": "x"}}"#).contains("bad name"));
    assert!(AnthropicPlugin::new_model(r#"{"model": "m", "top_k": 5}"#).is_ok());
}

mod bounds;
