//! What the host does with bad input: bad frames, oversized frames, bad queries.

use llm_host_tests::{json, Ending, Frame, Host, HttpReply};

use crate::common::{assert_echo_turn, assert_shape, Envelope};

/// Checks a protocol error diagnostic with `code` sent between turns at `sequence`.
fn assert_protocol_error(frame: &Frame, code: &str, sequence: u64) {
    assert_shape(frame, Envelope::Flat, "interaction.diagnostic");
    let text = &frame.text;
    assert_eq!(frame.entry()["level"], "error", "{text}");
    assert_eq!(frame.entry()["kind"], "protocol", "{text}");
    assert_eq!(frame.diagnostic_code(), code, "{text}");
    let message = frame.entry()["message"].as_str().unwrap_or_default();
    assert!(
        !message.trim().is_empty(),
        "the diagnostic says what is wrong: {text}"
    );
    assert_eq!(frame.sequence(), sequence, "{text}");
}

/// Checks an HTTP 400 with a JSON error body of `code`; returns the message.
fn assert_http_error(reply: &HttpReply, code: &str) -> String {
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply
            .headers
            .to_ascii_lowercase()
            .contains("application/json"),
        "the error body is JSON: {reply:?}"
    );
    let body = reply.json();
    assert_eq!(body["error"]["code"], code, "{reply:?}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.trim().is_empty(),
        "the error has a message: {reply:?}"
    );
    message.to_owned()
}

// A binary frame gets a "binary_frame" protocol error; the connection keeps working.
#[tokio::test]
async fn a_binary_frame_gets_an_error_and_the_connection_stays() {
    let host = Host::start_default();
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;

    client.send_binary(vec![0xff, 0x00, 0x7f]).await;
    assert_protocol_error(&client.next_json().await, "binary_frame", 0);

    client.send_text("still works").await;
    assert_echo_turn(&client.read_turn().await, "still works", 2, "turn-1");
}

// In command mode, unparsable JSON and an unknown type get errors; nothing is stored and the connection stays.
#[tokio::test]
async fn bad_commands_get_errors_and_the_connection_stays() {
    let host = Host::start_default();
    let mut client = host.connect_command("/v1/ws?session=bad-commands").await;
    client.next_json().await;

    client.send_text("{not json").await;
    assert_protocol_error(&client.next_json().await, "bad_frame", 0);
    client.send_text("Hello, world").await;
    assert_protocol_error(&client.next_json().await, "bad_frame", 0);
    client.send_json(&json!({"type": "dance"})).await;
    assert_protocol_error(&client.next_json().await, "unknown_command", 0);
    client.send_binary(vec![1]).await;
    assert_protocol_error(&client.next_json().await, "binary_frame", 0);

    // Nothing was stored: the first real prompt is turn-1 with only itself as history.
    client
        .send_json(&json!({"type": "prompt", "text": "now properly"}))
        .await;
    assert_echo_turn(&client.read_turn().await, "now properly", 2, "turn-1");
}

// A frame over max_frame_bytes closes the socket with code 1009; one under it is a normal prompt.
#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009() {
    let host = Host::start_default(); // max_frame_bytes = 65536

    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    let big_word = "x".repeat(60_000);
    client.send_text(big_word.clone()).await;
    let turn = client.read_turn().await;
    assert_eq!(
        turn.text(),
        format!("echo: {big_word}"),
        "a 60000-byte prompt is fine"
    );

    client.send_text("y".repeat(70_000)).await;
    match client.expect_end().await {
        Ending::Close(Some(frame)) => assert_eq!(
            u16::from(frame.code),
            1009,
            "close code for an oversized frame: {frame:?}"
        ),
        other => panic!("expected a close frame with code 1009, got {other:?}"),
    }

    // The host goes on serving.
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("after").await;
    assert_echo_turn(&client.read_turn().await, "after", 1, "turn-1");
}

// Session ids outside 1-128 chars of [A-Za-z0-9._:-] are refused with HTTP 400 before the upgrade.
#[tokio::test]
async fn bad_session_ids_are_refused_before_the_upgrade() {
    let host = Host::start_default();
    let too_long = "a".repeat(129);
    for query in [
        "session=",
        "session=has%20space",
        "session=slash/inside",
        "session=caf%C3%A9",
        "session=semi%3Bcolon",
        &format!("session={too_long}"),
    ] {
        let reply = host.http_upgrade(&format!("/v1/ws?{query}")).await;
        assert_http_error(&reply, "bad_session_id");
    }
    // The same check at `/`.
    let reply = host.http_upgrade("/?session=has%20space").await;
    assert_http_error(&reply, "bad_session_id");
    // And a good id upgrades.
    let reply = host.http_upgrade("/v1/ws?session=good.id:1-2_3").await;
    assert_eq!(reply.status, 101, "{reply:?}");
}

// An unknown ?model= is refused with HTTP 400 naming it.
#[tokio::test]
async fn an_unknown_model_is_refused_before_the_upgrade() {
    let host = Host::start_default();
    let reply = host.http_upgrade("/v1/ws?model=nope").await;
    let message = assert_http_error(&reply, "unknown_model");
    assert!(
        message.contains("nope"),
        "the message names the model: {message}"
    );
}
