//! Drives the plugin through the host's trait object against a local server
//! that answers in OpenAI's wire format.

use std::sync::Once;
use std::time::Duration;

use llm_host_plugin_api::{codes, LogLevel, Message, ModelRequest, Role, ToolCall, ToolSpec};
use llm_plugin_http::testing::{self as t, Action, MockServer, Recorder};
use serde_json::{json, Value};

use super::*;

const KEY_ENV: &str = "LLM_PLUGIN_OPENAI_TEST_KEY";
const KEY: &str = "sk-test-0123456789abcdef";
/// Failure guard for waits on the server; never a timing assertion.
const GUARD: Duration = Duration::from_secs(15);

/// Sets the key's variable once, before any test reads the environment.
fn setup() {
    static ENV: Once = Once::new();
    ENV.call_once(|| std::env::set_var(KEY_ENV, KEY));
}

fn settings(server: &str, extra: Value) -> String {
    let mut settings = json!({
        "base_url": format!("{server}/v1"),
        "model": "gpt-test",
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
    let adapter = OpenAiPlugin::new_model(settings).expect("settings accepted");
    t::run(&adapter, request, rec).expect("generate returns Ok");
}

fn ask(settings: &str, request: &ModelRequest) -> Recorder {
    let mut rec = Recorder::default();
    ask_with(settings, request, &mut rec);
    rec
}

fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "gpt-test-2024-08-06", "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        "usage": null,
    })
}

fn usage_chunk(prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "gpt-test-2024-08-06", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    })
}

/// `data:` lines for `chunks`, then `data: [DONE]`.
fn sse(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .map(|c| format!("data: {c}\n\n"))
        .chain(std::iter::once("data: [DONE]\n\n".to_owned()))
        .collect()
}

fn stream(pieces: &[String]) -> Vec<Action> {
    t::chunked("text/event-stream; charset=utf-8", pieces)
}

fn hello() -> Vec<Action> {
    stream(&sse(&[
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"content": "Hello"}), None),
        chunk(json!({}), Some("stop")),
        usage_chunk(3, 1),
    ]))
}

#[test]
fn streams_reasoning_and_text_then_usage_and_the_finish_reason() {
    let server = MockServer::start(vec![stream(&sse(&[
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"reasoning_content": "Let me think"}), None),
        chunk(json!({"reasoning": " briefly."}), None),
        chunk(json!({"content": "Hello"}), None),
        chunk(json!({"content": " world"}), None),
        chunk(json!({}), Some("stop")),
        usage_chunk(9, 4),
    ]))]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(
        rec.events,
        [
            "start gpt-test-2024-08-06",
            "reasoning \"Let me think\"",
            "reasoning \" briefly.\"",
            "text \"Hello\"",
            "text \" world\"",
            "usage 9 4 13",
            "end stop",
        ]
    );
    assert_eq!(
        rec.start.as_ref().map(|s| s.0.as_str()),
        Some("chatcmpl-123")
    );
}

#[test]
fn a_server_that_sends_no_usage_chunk_ends_without_usage() {
    // llama-cpp-python's server: role-only first chunk, empty-delta finish
    // chunk, `stream_options.include_usage` ignored.
    let server = MockServer::start(vec![stream(&sse(&[
        chunk(json!({"role": "assistant"}), None),
        chunk(json!({"content": "Hi"}), None),
        chunk(json!({}), Some("stop")),
    ]))]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(
        rec.events,
        ["start gpt-test-2024-08-06", "text \"Hi\"", "end stop"]
    );
}

#[test]
fn a_tool_call_split_over_many_chunks_arrives_whole() {
    let body: String = sse(&[
        chunk(
            json!({"role": "assistant", "content": null, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "ty\": \"Pa"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "ris\"}"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
             "function": {"name": "get_time", "arguments": "{\"tz\":"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 1, "function": {"arguments": " \"UTC\"}"}}]}),
            None,
        ),
        chunk(json!({}), Some("tool_calls")),
        usage_chunk(20, 12),
    ])
    .concat();
    // Cut the bytes anywhere, across lines and JSON, as TCP may.
    let pieces: Vec<Vec<u8>> = body.as_bytes().chunks(7).map(<[u8]>::to_vec).collect();
    let server = MockServer::start(vec![t::chunked("text/event-stream", &pieces)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Weather?"));
    assert_eq!(
        rec.tool_calls,
        [
            ToolCall {
                id: "call_a".into(),
                name: "get_weather".into(),
                arguments: "{\"city\": \"Paris\"}".into()
            },
            ToolCall {
                id: "call_b".into(),
                name: "get_time".into(),
                arguments: "{\"tz\": \"UTC\"}".into()
            },
        ]
    );
    assert_eq!(
        &rec.events[1..],
        [
            "tool call_a get_weather {\"city\": \"Paris\"}",
            "tool call_b get_time {\"tz\": \"UTC\"}",
            "usage 20 12 32",
            "end tool-calls",
        ]
    );
}

#[test]
fn the_request_carries_model_messages_params_tools_and_the_key() {
    let server = MockServer::start(vec![hello()]);
    let settings = settings(
        &server.url(),
        json!({"system": "Be brief.", "temperature": 0.1, "max_tokens": 100, "top_p": 0.9,
               "stop": ["END"], "headers": {"x-team": "blue"}}),
    );
    let weather = ToolSpec {
        name: "get_weather".into(),
        description: "Weather by city".into(),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}),
    };
    let request = ModelRequest {
        messages: vec![
            Message::new(Role::System, "From the session."),
            Message::new(Role::User, "What's the weather?"),
            Message {
                role: Role::Assistant,
                reasoning: Some("The user wants weather.".into()),
                tool_calls: vec![ToolCall {
                    id: "call_a".into(),
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Paris\"}".into(),
                }],
                ..Message::default()
            },
            Message {
                role: Role::Tool,
                content: "sunny".into(),
                tool_call_id: Some("call_a".into()),
                ..Message::default()
            },
            Message::new(Role::User, "Thanks"),
        ],
        params: llm_host_plugin_api::TurnParams {
            temperature: Some(0.7),
            stop: vec!["STOP".into()],
            tools: vec![weather],
            ..Default::default()
        },
        ..ModelRequest::default()
    };
    let rec = ask(&settings, &request);
    assert_eq!(rec.text, "Hello");
    let sent = server.single_request();
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(sent.header("x-team"), Some("blue"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(sent.header("accept"), Some("text/event-stream"));
    assert_eq!(
        sent.json(),
        json!({
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "system", "content": "From the session."},
                {"role": "user", "content": "What's the weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_a",
                  "type": "function",
                  "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
                {"role": "user", "content": "Thanks"},
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0.7,
            "top_p": 0.9,
            "max_tokens": 100,
            "stop": ["STOP"],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "description": "Weather by city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}}],
        })
    );
}

#[test]
fn seed_is_sent_and_top_k_is_reported_as_ignored() {
    let server = MockServer::start(vec![hello()]);
    let mut request = prompt("Hi");
    request.params.seed = Some(7);
    request.params.top_k = Some(5);
    request.params.max_tokens = Some(3);
    let rec = ask(
        &settings(&server.url(), json!({"max_tokens": 100})),
        &request,
    );
    let body = server.single_request().json();
    assert_eq!(body["seed"], 7);
    assert_eq!(body["max_tokens"], 3, "the turn's limit wins");
    assert!(body.get("top_k").is_none(), "{body}");
    assert_eq!(rec.diagnostics.len(), 1, "{:?}", rec.diagnostics);
    assert_eq!(rec.diagnostics[0].0, LogLevel::WARN);
    assert!(
        rec.diagnostics[0].1.contains("topK"),
        "{:?}",
        rec.diagnostics
    );
}

#[test]
fn openai_itself_gets_max_completion_tokens_and_other_servers_max_tokens() {
    setup();
    let own: ProviderSettings =
        api::parse_settings(r#"{"model": "gpt-4o", "api_key_env": "LLM_PLUGIN_OPENAI_TEST_KEY"}"#)
            .expect("settings");
    let own = OpenAi::new(own).expect("backend");
    assert_eq!(own.completion_tokens_field, "max_completion_tokens");
    assert_eq!(own.backend.base_url, "https://api.openai.com/v1");
    let local: ProviderSettings =
        api::parse_settings(r#"{"model": "llama", "base_url": "http://127.0.0.1:8080/v1/"}"#)
            .expect("settings");
    let local = OpenAi::new(local).expect("backend");
    assert_eq!(local.completion_tokens_field, "max_tokens");
    assert_eq!(local.backend.base_url, "http://127.0.0.1:8080/v1");
    assert!(
        local.backend.api_key.is_none(),
        "no key goes to another server unasked"
    );
}

#[test]
fn a_refused_key_is_auth_in_the_providers_words_without_the_key() {
    let server = MockServer::start(vec![t::json_error(
        401,
        &[],
        &json!({"error": {"message": format!("Incorrect API key provided: {KEY}."),
                          "type": "invalid_request_error", "param": null,
                          "code": "invalid_api_key"}}),
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::AUTH));
    assert!(
        rec.error_message().contains("Incorrect API key provided"),
        "{rec:?}"
    );
    assert!(
        !rec.error_message().contains(KEY),
        "the key leaked: {rec:?}"
    );
    assert_eq!(rec.events, ["error auth"]);
}

#[test]
fn an_unknown_model_is_not_found() {
    let server = MockServer::start(vec![t::json_error(
        404,
        &[],
        &json!({"error": {"message": "The model `gpt-nope` does not exist or you do not have access to it.",
                          "type": "invalid_request_error", "param": null, "code": "model_not_found"}}),
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::NOT_FOUND));
    assert!(rec.error_message().contains("gpt-nope"), "{rec:?}");
}

#[test]
fn a_refused_request_is_invalid_request() {
    let server = MockServer::start(vec![t::json_error(
        400,
        &[],
        &json!({"error": {"message": "'messages' must contain at least one message",
                          "type": "invalid_request_error", "param": "messages", "code": null}}),
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::INVALID_REQUEST));
    assert!(
        rec.error_message().contains("at least one message"),
        "{rec:?}"
    );
}

#[test]
fn a_rate_limit_waits_as_retry_after_says_then_succeeds() {
    let limited = json!({"error": {"message": "Rate limit reached for requests",
                                   "type": "requests", "code": "rate_limit_exceeded"}});
    let server = MockServer::start(vec![
        t::json_error(429, &[("retry-after", "1")], &limited),
        hello(),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 2})),
        &prompt("Hi"),
    );
    assert_eq!(rec.text, "Hello");
    assert_eq!(rec.end, Some(llm_host_plugin_api::FinishReason::STOP));
    assert_eq!(server.requests().len(), 2);
    assert_eq!(rec.diagnostics.len(), 1, "{:?}", rec.diagnostics);
    let (level, message, data) = &rec.diagnostics[0];
    assert_eq!(*level, LogLevel::WARN);
    assert!(message.contains("Rate limit reached"), "{message}");
    let data: Value = serde_json::from_str(data).expect("diagnostic data is JSON");
    assert_eq!(data["code"], codes::RATE_LIMITED);
    assert_eq!(data["delayMs"], 1000, "retry-after is honoured");
}

#[test]
fn a_rate_limit_that_persists_is_rate_limited() {
    let limited = json!({"error": {"message": "Rate limit reached", "type": "requests"}});
    let server = MockServer::start(vec![
        t::json_error(429, &[("retry-after", "0")], &limited),
        t::json_error(429, &[("retry-after", "0")], &limited),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::RATE_LIMITED));
    assert_eq!(server.requests().len(), 2);
    assert_eq!(rec.diagnostics.len(), 1);
}

#[test]
fn a_server_error_is_upstream_after_the_retries() {
    let failed = json!({"error": {"message": "The server had an error while processing your request.",
                                  "type": "server_error"}});
    let server = MockServer::start(vec![
        t::json_error(500, &[], &failed),
        t::json_error(503, &[], &failed),
    ]);
    let rec = ask(
        &settings(&server.url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::UPSTREAM));
    assert!(rec.error_message().contains("HTTP 503"), "{rec:?}");
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn a_malformed_stream_is_a_bad_response() {
    let server = MockServer::start(vec![stream(&[
        format!("data: {}\n\n", chunk(json!({"content": "Hel"}), None)),
        "data: {\"id\": \"chatcmpl-123\", \"choices\": [\n\n".to_owned(),
    ])]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.text, "Hel");
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE));
}

#[test]
fn a_port_nobody_listens_on_is_a_connection_error_after_retries() {
    let rec = ask(
        &settings(&t::refused_url(), json!({"max_retries": 1})),
        &prompt("Hi"),
    );
    assert_eq!(rec.error_code(), Some(codes::CONNECTION));
    assert!(rec.error_message().contains("refused"), "{rec:?}");
    assert_eq!(rec.diagnostics.len(), 1, "one retry announced");
}

#[test]
fn a_stream_that_stops_midway_is_interrupted() {
    // Chunked: the connection closes before the last chunk.
    let mut cut = vec![t::chunked_head(200, "text/event-stream")];
    cut.push(t::chunk(format!(
        "data: {}\n\n",
        chunk(json!({"content": "Hel"}), None)
    )));
    // Close-delimited: the body ends, but before `[DONE]`.
    let close = vec![
        t::close_delimited_head(200, "text/event-stream"),
        Action::Send(format!("data: {}\n\n", chunk(json!({"content": "Hel"}), None)).into_bytes()),
    ];
    for script in [cut, close] {
        let server = MockServer::start(vec![script]);
        let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
        assert_eq!(rec.text, "Hel");
        assert_eq!(rec.error_code(), Some(codes::INTERRUPTED), "{rec:?}");
    }
}

#[test]
fn a_stream_whose_choice_finished_is_whole_without_done() {
    let server = MockServer::start(vec![vec![
        t::close_delimited_head(200, "text/event-stream"),
        Action::Send(
            format!(
                "data: {}\n\ndata: {}\n\n",
                chunk(json!({"content": "Hi"}), None),
                chunk(json!({}), Some("length"))
            )
            .into_bytes(),
        ),
    ]]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(&rec.events[1..], ["text \"Hi\"", "end length"]);
}

#[test]
fn silence_past_timeout_ms_is_a_timeout_and_closes_the_connection() {
    // Silent after the head, and silent from the start.
    let after_head = vec![
        t::chunked_head(200, "text/event-stream"),
        t::chunk(format!(
            "data: {}\n\n",
            chunk(json!({"content": "Hel"}), None)
        )),
        Action::AwaitClose,
    ];
    for script in [after_head, vec![Action::AwaitClose]] {
        let server = MockServer::start(vec![script]);
        let rec = ask(
            &settings(&server.url(), json!({"timeout_ms": 300})),
            &prompt("Hi"),
        );
        assert_eq!(rec.error_code(), Some(codes::TIMEOUT), "{rec:?}");
        assert!(rec.error_message().contains("300 ms"), "{rec:?}");
        assert!(
            server.wait_closed(GUARD),
            "the plugin left the connection open"
        );
    }
}

#[test]
fn an_error_inside_the_stream_is_mapped() {
    let server = MockServer::start(vec![stream(&[
        "data: {\"error\": {\"message\": \"The model is overloaded\", \"type\": \"server_error\"}}\n\n"
            .to_owned(),
    ])]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::UPSTREAM));
    assert!(rec.error_message().contains("overloaded"), "{rec:?}");
}

#[test]
fn a_content_filter_stop_comes_with_a_diagnostic() {
    let server = MockServer::start(vec![stream(&sse(&[
        chunk(json!({"content": "Well"}), None),
        chunk(json!({}), Some("content_filter")),
    ]))]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.end, Some(llm_host_plugin_api::FinishReason::STOP));
    assert!(rec.diagnostics[0].1.contains("content filter"), "{rec:?}");
}

#[test]
fn cancel_closes_the_upstream_connection() {
    let server = MockServer::start(vec![vec![
        t::chunked_head(200, "text/event-stream"),
        t::chunk(format!(
            "data: {}\n\n",
            chunk(json!({"content": "Hel"}), None)
        )),
        t::chunk(format!(
            "data: {}\n\n",
            chunk(json!({"content": "lo"}), None)
        )),
        Action::AwaitClose,
    ]]);
    let mut rec = Recorder::cancelling_at(1);
    ask_with(&settings(&server.url(), json!({})), &prompt("Hi"), &mut rec);
    assert_eq!(rec.events, ["start gpt-test-2024-08-06", "text \"Hel\""]);
    assert!(
        server.wait_closed(GUARD),
        "the upstream connection stayed open"
    );
}

#[test]
fn cancel_while_the_upstream_is_silent_closes_the_connection() {
    // Before the response head, and after it.
    for head in [vec![], vec![t::chunked_head(200, "text/event-stream")]] {
        let mut rec = Recorder::default();
        let mut script = head;
        script.push(Action::Raise(rec.cancel.clone()));
        script.push(Action::AwaitClose);
        let server = MockServer::start(vec![script]);
        ask_with(&settings(&server.url(), json!({})), &prompt("Hi"), &mut rec);
        assert!(rec.error.is_none() && rec.end.is_none(), "{rec:?}");
        assert!(
            server.wait_closed(GUARD),
            "the upstream connection stayed open"
        );
    }
}

#[test]
fn settings_are_checked_by_name() {
    setup();
    let err = |text: &str| {
        OpenAiPlugin::new_model(text)
            .err()
            .expect("refused")
            .message
            .to_string()
    };
    assert!(err(r#"{"model": "m", "temprature": 1}"#).contains("temprature"));
    assert!(err(r#"{"base_url": "http://x"}"#).contains("model"));
    assert!(err(r#"{"model": "m", "top_k": 3}"#).contains("top_k"));
    assert!(err(r#"{"model": "m", "base_url": "ftp://x"}"#).contains("base_url"));
    let missing = err(r#"{"model": "m", "api_key_env": "LLM_PLUGIN_OPENAI_NO_SUCH_VAR"}"#);
    assert!(
        missing.contains("LLM_PLUGIN_OPENAI_NO_SUCH_VAR"),
        "{missing}"
    );
}

#[test]
fn debug_output_never_shows_the_key_or_header_values() {
    setup();
    let settings: ProviderSettings = api::parse_settings(&settings(
        "http://127.0.0.1:1",
        json!({"headers": {"x-secret": "hunter2"}}),
    ))
    .expect("settings");
    let shown = format!(
        "{settings:?} {:?}",
        OpenAi::new(settings.clone()).expect("backend")
    );
    assert!(!shown.contains(KEY), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("x-secret"), "{shown}");
}

mod bounds;
