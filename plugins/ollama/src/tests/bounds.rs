//! A line that never ends fails the turn; a large one passes.

use llm_plugin_http::limits::MAX_EVENT_BYTES;

use super::*;

#[test]
fn a_line_that_never_ends_fails_the_turn() {
    let first = "{\"model\":\"llama3.2\",\"message\":{\"role\":\"assistant\",\"content\":\"";
    let block = "x".repeat(64 * 1024);
    let mut pieces = vec![first.to_owned()];
    pieces.extend(std::iter::repeat_n(
        block,
        (MAX_EVENT_BYTES + MAX_EVENT_BYTES / 4) / (64 * 1024),
    ));
    let server = MockServer::start(vec![t::chunked(NDJSON, &pieces)]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE), "{rec:?}");
    assert!(
        rec.error_message()
            .starts_with("Ollama sent a stream line larger than 8 MiB (8388608 bytes)"),
        "{}",
        rec.error_message()
    );
    assert!(rec.text.is_empty());
}

#[test]
fn a_large_line_under_the_bound_passes() {
    let text = "y".repeat(MAX_EVENT_BYTES - 1024);
    let server = MockServer::start(vec![t::chunked(
        NDJSON,
        &[part(json!({ "content": text })), done("stop", 3, 1)],
    )]);
    let rec = ask(&settings(&server.url(), json!({})), &prompt("Hi"));
    assert_eq!(rec.error, None, "{:?}", rec.error);
    assert_eq!(rec.text.len(), text.len());
}
