//! What an upstream can make the plugin hold is bounded: an event that never
//! ends, and tool calls whose fragments never finish, fail the turn.

use llm_host_plugin_api::FinishReason;
use llm_plugin_http::limits::{MAX_EVENT_BYTES, MAX_HELD_BYTES};

use super::*;

/// A chunked stream: `first`, then `repeat` until past `total` bytes, in
/// pieces of about 64 KiB, then `last`.
fn long_stream(first: &str, repeat: &str, total: usize, last: &str) -> Vec<Action> {
    let block = repeat.repeat((64 * 1024 / repeat.len()).max(1));
    // An empty chunk would end the body.
    let mut pieces: Vec<String> = [first]
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let mut sent = 0;
    while sent <= total {
        sent += block.len();
        pieces.push(block.clone());
    }
    pieces.push(last.to_owned());
    t::chunked("text/event-stream", &pieces)
}

#[test]
fn an_event_that_never_ends_fails_the_turn() {
    // `data:` lines and never the blank line that ends the event.
    let line = format!("data: {}\n", chunk(json!({"content": "x"}), None));
    let server = MockServer::start(vec![long_stream(
        "",
        &line,
        MAX_EVENT_BYTES + MAX_EVENT_BYTES / 4,
        "\n",
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE), "{rec:?}");
    assert!(
        rec.error_message().starts_with(
            "OpenAI-compatible server sent a stream event larger than 8 MiB (8388608 bytes)"
        ),
        "{}",
        rec.error_message()
    );
    assert!(rec.text.is_empty());
}

/// A tool call whose arguments come in fragments of 256 KiB until past
/// `total` bytes, then finishes.
fn tool_call_stream(total: usize) -> Vec<Action> {
    let start = chunk(
        json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
               "function": {"name": "f", "arguments": ""}}]}),
        None,
    );
    let fragment = chunk(
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "a".repeat(256 * 1024)}}]}),
        None,
    );
    let fragments = total / (256 * 1024) + 1;
    let mut chunks = vec![start];
    chunks.extend(std::iter::repeat_n(fragment, fragments));
    chunks.push(chunk(json!({}), Some("tool_calls")));
    stream(&sse(&chunks))
}

#[test]
fn tool_call_fragments_past_the_bound_fail_the_turn() {
    let server = MockServer::start(vec![tool_call_stream(MAX_HELD_BYTES)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE), "{rec:?}");
    assert!(
        rec.error_message().starts_with(
            "OpenAI-compatible server sent more than 8 MiB (8388608 bytes) of tool calls"
        ),
        "{}",
        rec.error_message()
    );
    assert!(rec.tool_calls.is_empty());
}

#[test]
fn a_large_tool_call_under_the_bound_arrives_whole() {
    let server = MockServer::start(vec![tool_call_stream(MAX_HELD_BYTES - 512 * 1024)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error, None, "{:?}", rec.events);
    assert_eq!(rec.tool_calls.len(), 1);
    assert_eq!(rec.tool_calls[0].arguments.len(), 31 * 256 * 1024);
    assert_eq!(rec.end, Some(FinishReason::TOOL_CALLS));
}
