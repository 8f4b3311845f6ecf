//! What an upstream can make the plugin hold is bounded: an event that never
//! ends, and tool input whose fragments never finish, fail the turn.

use llm_plugin_http::limits::{MAX_EVENT_BYTES, MAX_HELD_BYTES};

use super::*;

#[test]
fn an_event_that_never_ends_fails_the_turn() {
    // `data:` lines and never the blank line that ends the event.
    let line = format!("data: {}\n", text_delta(0, "x"));
    let block = line.repeat(64 * 1024 / line.len());
    let mut pieces = vec![
        ev(&message_start(5)),
        "event: content_block_delta\n".to_owned(),
    ];
    pieces.extend(std::iter::repeat_n(
        block.clone(),
        (MAX_EVENT_BYTES + MAX_EVENT_BYTES / 4) / block.len(),
    ));
    let server = MockServer::start(vec![t::chunked("text/event-stream", &pieces)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE), "{rec:?}");
    assert!(
        rec.error_message()
            .starts_with("Anthropic sent a stream event larger than 8 MiB (8388608 bytes)"),
        "{}",
        rec.error_message()
    );
    assert!(rec.text.is_empty());
}

/// A tool call whose input comes in fragments of 256 KiB until past `total`
/// bytes, then stops.
fn tool_call_stream(total: usize) -> Vec<Action> {
    let fragment = delta(
        0,
        json!({"type": "input_json_delta", "partial_json": "a".repeat(256 * 1024)}),
    );
    let mut events = vec![
        message_start(5),
        block_start(
            0,
            json!({"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
        ),
    ];
    events.extend(std::iter::repeat_n(fragment, total / (256 * 1024) + 1));
    events.extend([block_stop(0), message_delta("tool_use", 9), message_stop()]);
    stream(&events)
}

#[test]
fn tool_input_fragments_past_the_bound_fail_the_turn() {
    let server = MockServer::start(vec![tool_call_stream(MAX_HELD_BYTES)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE), "{rec:?}");
    assert!(
        rec.error_message()
            .starts_with("Anthropic sent more than 8 MiB (8388608 bytes) of tool calls"),
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

#[test]
fn blocks_that_stop_give_back_what_they_held() {
    // Many tool calls one after another, together far past the bound, each
    // well under it.
    let mut events = vec![message_start(5)];
    for n in 0..12 {
        events.push(block_start(
            n,
            json!({"type": "tool_use", "id": format!("toolu_{n}"), "name": "f", "input": {}}),
        ));
        let partial = format!("\"{}\"", "b".repeat(1024 * 1024));
        events.push(delta(
            n,
            json!({"type": "input_json_delta", "partial_json": partial}),
        ));
        events.push(block_stop(n));
    }
    events.extend([message_delta("tool_use", 9), message_stop()]);
    let server = MockServer::start(vec![stream(&events)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error, None, "{:?}", rec.error);
    assert_eq!(rec.tool_calls.len(), 12);
}
