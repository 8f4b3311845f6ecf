//! Each provider plugin through the real host, against a local server
//! speaking that provider's streaming wire format (the provider plugins'
//! own scripted `MockServer`): one turn of two rounds of two tool calls and
//! a text answer, where each request must carry the rounds before it in the
//! provider's own shape.

use std::path::PathBuf;

use llm_host_tests::{build_packages, json, Config, Host, Workdir, STANDARD_PLUGINS};
use llm_plugin_http::testing::{self as mock, Action, MockServer};
use serde_json::Value;

use super::{connect, failure, model_events, prompt, read_end, read_group, result};
use crate::common::assert_contiguous;

/// The provider plugins, each against a server speaking its wire format.
#[derive(Clone, Copy, Debug)]
enum Provider {
    OpenAi,
    Anthropic,
    Ollama,
}

/// The calls of each round: tool and the `q` argument. The second round
/// calls the tools in the other order.
const ROUNDS: [[(&str, &str); 2]; 2] = [
    [("lookup", "apple"), ("search", "pear")],
    [("search", "plum"), ("lookup", "fig")],
];

/// What the client answers each call: content, or an error.
const RESULTS: [[Result<&str, &str>; 2]; 2] = [
    [Ok("red apple"), Err("search is down")],
    [Ok("purple plum"), Ok("green fig")],
];

/// A result as the host stores it and sends it on.
fn stored_result(result: Result<&str, &str>) -> String {
    match result {
        Ok(content) => content.to_owned(),
        Err(error) => format!("error: {error}"),
    }
}

fn arguments(q: &str) -> String {
    json!({ "q": q }).to_string()
}

impl Provider {
    fn package(self) -> &'static str {
        match self {
            Provider::OpenAi => "llm-plugin-openai",
            Provider::Anthropic => "llm-plugin-anthropic",
            Provider::Ollama => "llm-plugin-ollama",
        }
    }

    fn plugin(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Ollama => "ollama",
        }
    }

    /// The id of call `index` of `round`, as the provider names it (Ollama
    /// sends none: the plugin numbers the calls of each answer).
    fn call_id(self, round: usize, index: usize) -> String {
        match self {
            Provider::OpenAi => format!("call_{round}{index}"),
            Provider::Anthropic => format!("toolu_{round}{index}"),
            Provider::Ollama => format!("call_{index}"),
        }
    }

    /// The three answers: two rounds of two calls, then text.
    fn scripts(self) -> Vec<Vec<Action>> {
        let mut scripts: Vec<Vec<Action>> = (0..2).map(|round| self.calls(round)).collect();
        scripts.push(self.text(&["All ", "done."]));
        scripts
    }

    fn calls(self, round: usize) -> Vec<Action> {
        let [(first, q1), (second, q2)] = ROUNDS[round];
        let (id1, id2) = (self.call_id(round, 0), self.call_id(round, 1));
        match self {
            Provider::OpenAi => {
                // The first call's arguments in two fragments.
                let args = arguments(q1);
                let (a, b) = args.split_at(5);
                openai(&[
                    openai_chunk(
                        json!({"role": "assistant", "content": null, "tool_calls": [
                            {"index": 0, "id": id1, "type": "function",
                             "function": {"name": first, "arguments": a}}]}),
                        None,
                    ),
                    openai_chunk(
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": b}}]}),
                        None,
                    ),
                    openai_chunk(
                        json!({"tool_calls": [{"index": 1, "id": id2, "type": "function",
                            "function": {"name": second, "arguments": arguments(q2)}}]}),
                        None,
                    ),
                    openai_chunk(json!({}), Some("tool_calls")),
                ])
            }
            Provider::Anthropic => {
                let tool = |index: u64, id: &str, name: &str, q: &str| {
                    let args = arguments(q);
                    let (a, b) = args.split_at(4);
                    vec![
                        json!({"type": "content_block_start", "index": index, "content_block":
                               {"type": "tool_use", "id": id, "name": name, "input": {}}}),
                        json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": a}}),
                        json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": b}}),
                        json!({"type": "content_block_stop", "index": index}),
                    ]
                };
                let mut events = vec![anthropic_start()];
                events.extend(tool(0, &id1, first, q1));
                events.extend(tool(1, &id2, second, q2));
                events.extend(anthropic_stop("tool_use"));
                anthropic(&events)
            }
            Provider::Ollama => ollama(&[
                ollama_part(json!({"content": "", "tool_calls": [
                    {"function": {"name": first, "arguments": {"q": q1}}},
                    {"function": {"name": second, "arguments": {"q": q2}}}]})),
                ollama_done(),
            ]),
        }
    }

    fn text(self, pieces: &[&str]) -> Vec<Action> {
        match self {
            Provider::OpenAi => {
                let mut chunks = vec![openai_chunk(
                    json!({"role": "assistant", "content": ""}),
                    None,
                )];
                chunks.extend(
                    pieces
                        .iter()
                        .map(|text| openai_chunk(json!({ "content": text }), None)),
                );
                chunks.push(openai_chunk(json!({}), Some("stop")));
                openai(&chunks)
            }
            Provider::Anthropic => {
                let mut events = vec![
                    anthropic_start(),
                    json!({"type": "content_block_start", "index": 0,
                           "content_block": {"type": "text", "text": ""}}),
                ];
                events.extend(pieces.iter().map(|text| {
                    json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": text}})
                }));
                events.push(json!({"type": "content_block_stop", "index": 0}));
                events.extend(anthropic_stop("end_turn"));
                anthropic(&events)
            }
            Provider::Ollama => {
                let mut lines: Vec<String> = pieces
                    .iter()
                    .map(|text| ollama_part(json!({ "content": text })))
                    .collect();
                lines.push(ollama_done());
                ollama(&lines)
            }
        }
    }

    /// The conversation the provider should be sent after `rounds` rounds
    /// of calls and results.
    fn messages(self, rounds: usize) -> Vec<Value> {
        let mut out = vec![match self {
            Provider::Anthropic => {
                json!({"role": "user", "content": [{"type": "text", "text": "find it"}]})
            }
            Provider::OpenAi | Provider::Ollama => json!({"role": "user", "content": "find it"}),
        }];
        for round in 0..rounds {
            let calls: Vec<(String, &str, &str)> = ROUNDS[round]
                .iter()
                .enumerate()
                .map(|(index, (name, q))| (self.call_id(round, index), *name, *q))
                .collect();
            let results: Vec<String> = RESULTS[round].iter().map(|r| stored_result(*r)).collect();
            match self {
                Provider::OpenAi => {
                    let tool_calls: Vec<Value> = calls
                        .iter()
                        .map(|(id, name, q)| {
                            json!({"id": id, "type": "function",
                                   "function": {"name": name, "arguments": arguments(q)}})
                        })
                        .collect();
                    out.push(
                        json!({"role": "assistant", "content": null, "tool_calls": tool_calls}),
                    );
                    for ((id, _, _), content) in calls.iter().zip(&results) {
                        out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                    }
                }
                Provider::Anthropic => {
                    let uses: Vec<Value> = calls
                        .iter()
                        .map(|(id, name, q)| {
                            json!({"type": "tool_use", "id": id, "name": name, "input": {"q": q}})
                        })
                        .collect();
                    out.push(json!({"role": "assistant", "content": uses}));
                    // Every result of a round in one user message.
                    let blocks: Vec<Value> = calls
                        .iter()
                        .zip(&results)
                        .map(|((id, _, _), content)| {
                            json!({"type": "tool_result", "tool_use_id": id, "content": content})
                        })
                        .collect();
                    out.push(json!({"role": "user", "content": blocks}));
                }
                Provider::Ollama => {
                    let tool_calls: Vec<Value> = calls
                        .iter()
                        .map(|(_, name, q)| json!({"function": {"name": name, "arguments": {"q": q}}}))
                        .collect();
                    out.push(json!({"role": "assistant", "content": "", "tool_calls": tool_calls}));
                    // Matched by the tool's name, in the calls' order.
                    for ((_, name, _), content) in calls.iter().zip(&results) {
                        out.push(json!({"role": "tool", "content": content, "tool_name": name}));
                    }
                }
            }
        }
        out
    }

    /// The names of the tools in a request body.
    fn tool_names(self, body: &Value) -> Vec<String> {
        let tools = body["tools"].as_array().cloned().unwrap_or_default();
        tools
            .iter()
            .filter_map(|tool| match self {
                Provider::Anthropic => tool["name"].as_str().map(str::to_owned),
                Provider::OpenAi | Provider::Ollama => {
                    tool["function"]["name"].as_str().map(str::to_owned)
                }
            })
            .collect()
    }
}

fn openai_chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
           "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

/// An OpenAI event stream: the chunks, a usage chunk, `[DONE]`.
fn openai(chunks: &[Value]) -> Vec<Action> {
    let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                       "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                "total_tokens": 7}});
    let events: Vec<String> = chunks
        .iter()
        .chain([&usage])
        .map(|chunk| format!("data: {chunk}\n\n"))
        .chain(["data: [DONE]\n\n".to_owned()])
        .collect();
    mock::chunked("text/event-stream", &events)
}

fn anthropic_start() -> Value {
    json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
           "role": "assistant", "content": [], "model": "m", "stop_reason": null,
           "usage": {"input_tokens": 5, "output_tokens": 1}}})
}

fn anthropic_stop(reason: &str) -> [Value; 2] {
    [
        json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": null},
               "usage": {"output_tokens": 2}}),
        json!({"type": "message_stop"}),
    ]
}

/// An Anthropic event stream: `event: TYPE` and `data: JSON` per event.
fn anthropic(events: &[Value]) -> Vec<Action> {
    let events: Vec<String> = events
        .iter()
        .map(|event| {
            let name = event["type"].as_str().unwrap_or("message");
            format!("event: {name}\ndata: {event}\n\n")
        })
        .collect();
    mock::chunked("text/event-stream", &events)
}

fn ollama_part(mut message: Value) -> String {
    message["role"] = "assistant".into();
    format!(
        "{}\n",
        json!({"model": "m", "created_at": "2025-05-01T08:52:19Z", "message": message,
               "done": false})
    )
}

fn ollama_done() -> String {
    format!(
        "{}\n",
        json!({"model": "m", "created_at": "2025-05-01T08:52:20Z",
               "message": {"role": "assistant", "content": ""}, "done": true,
               "done_reason": "stop", "prompt_eval_count": 5, "eval_count": 2})
    )
}

/// An Ollama stream: one JSON object per line.
fn ollama<S: AsRef<[u8]>>(lines: &[S]) -> Vec<Action> {
    mock::chunked("application/x-ndjson", lines)
}

/// The provider plugins' directory (built once per test process).
fn provider_libraries() -> PathBuf {
    build_packages(&[
        Provider::OpenAi.package(),
        Provider::Anthropic.package(),
        Provider::Ollama.package(),
    ])
}

/// A host with `provider`'s plugin as backend `up`, pointed at `server`.
fn start_provider_host(provider: Provider, server: &MockServer) -> Host {
    let workdir = Workdir::new(STANDARD_PLUGINS);
    let library = format!("lib{}.so", provider.package().replace('-', "_"));
    let built = provider_libraries().join(&library);
    std::fs::copy(&built, workdir.path().join("plugins").join(&library))
        .unwrap_or_else(|err| panic!("copy {}: {err}", built.display()));
    let base_url = match provider {
        Provider::OpenAi => format!("{}/v1", server.url()),
        Provider::Anthropic | Provider::Ollama => server.url(),
    };
    let config = Config {
        extra: format!(
            "\n[models.up]\nplugin = \"{}\"\nsettings = {{ model = \"m\", base_url = \"{base_url}\", \
             max_retries = 0, timeout_ms = 20000 }}\n",
            provider.plugin()
        ),
        ..Config::default()
    };
    workdir.write_config(&config.to_toml());
    Host::start_in(workdir, &[])
}

/// One turn of two rounds of two calls and a text answer, through the host
/// against `provider`'s wire format; each request carries the rounds
/// before it in the provider's own shape.
async fn round_trips_reach_the_provider(provider: Provider) {
    let server = MockServer::start(provider.scripts());
    let host = start_provider_host(provider, &server);
    let mut client = connect(&host, "up-1", "up").await;
    client.send_json(&prompt("find it")).await;

    let mut frames = Vec::new();
    for round in 0..2 {
        let calls = read_group(&mut client, &mut frames).await;
        let expected: Vec<Value> = ROUNDS[round]
            .iter()
            .enumerate()
            .map(|(index, (name, q))| {
                json!({"id": provider.call_id(round, index), "name": name,
                       "arguments": arguments(q)})
            })
            .collect();
        assert_eq!(calls, expected, "{provider:?} round {round}");
        for (call, answer) in calls.iter().zip(RESULTS[round]) {
            let id = call["id"].as_str().unwrap_or_default();
            let command = match answer {
                Ok(content) => result(id, content),
                Err(error) => failure(id, error),
            };
            client.send_json(&command).await;
        }
    }
    let calls = read_group(&mut client, &mut frames).await;
    assert!(calls.is_empty(), "{provider:?}: {calls:?}");
    let turn = read_end(&mut client, frames).await;
    let dump = turn.dump();
    assert_eq!(turn.status(), "completed", "{provider:?}: {dump}");
    assert_eq!(turn.text(), "All done.", "{provider:?}: {dump}");
    assert_eq!(
        model_events(&turn, "start").len(),
        3,
        "{provider:?}: {dump}"
    );
    assert_contiguous(&turn, 1);

    let requests = server.requests();
    assert_eq!(requests.len(), 3, "{provider:?}: {requests:?}");
    for (n, request) in requests.iter().enumerate() {
        let body = request.json();
        assert_eq!(
            body["messages"],
            Value::Array(provider.messages(n)),
            "{provider:?}: request {n}: {body:#}"
        );
        assert_eq!(
            provider.tool_names(&body),
            ["lookup", "search"],
            "{provider:?}: request {n}: {body}"
        );
    }
}

#[tokio::test]
async fn openai_gets_assistant_tool_calls_and_tool_messages() {
    round_trips_reach_the_provider(Provider::OpenAi).await;
}

#[tokio::test]
async fn anthropic_gets_tool_use_blocks_and_one_user_message_of_tool_results() {
    round_trips_reach_the_provider(Provider::Anthropic).await;
}

#[tokio::test]
async fn ollama_gets_tool_calls_and_tool_messages_by_tool_name() {
    round_trips_reach_the_provider(Provider::Ollama).await;
}
