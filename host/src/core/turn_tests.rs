//! Tests of [`super`]: the unsaved run, and the requests it writes.

use super::*;
use crate::core::document::MessagesJson;
use llm_host_plugin_api::{ModelRequest, ToolCall};

#[tokio::test(start_paused = true)]
async fn an_unsaved_run_streams_the_given_messages_and_ends() {
    use crate::core::fakes::{FakeFrames, FakeModel};
    use crate::protocol::Envelope;
    let framer = Framer {
        envelope: Envelope::Flat,
    };
    let messages = [
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "hi there"),
    ];
    let params = TurnParams::default();
    let unsaved = Unsaved {
        interaction_id: "chatcmpl-1",
        messages: &messages,
        params: &params,
    };
    let model = Arc::new(FakeModel::new(std::time::Duration::from_millis(10)));

    let frames = FakeFrames::default();
    let control = Arc::new(TurnControl::default());
    let settings = crate::core::TurnSettings::default();
    let report = run_unsaved(&frames, framer, settings, model.clone(), unsaved, control).await;
    assert_eq!(report.status, Status::Completed);
    assert_eq!(report.interaction_id, "chatcmpl-1");
    assert_eq!(frames.text(), "echo: hi there");
    let all = frames.all();
    let last = all.last().expect("frames");
    assert_eq!(last["name"], "interaction.turn");
    assert_eq!(last["data"]["event"]["status"], "completed");
    let sequences = frames.turn_sequences();
    let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
    assert_eq!(sequences, expected);

    // Cancelled: the model stops at its next event.
    let frames = FakeFrames::default();
    let control = Arc::new(TurnControl::default());
    control.cancel();
    let report = run_unsaved(&frames, framer, settings, model.clone(), unsaved, control).await;
    assert_eq!(report.status, Status::Cancelled);

    // Past the deadline: `turn_timeout`.
    let frames = FakeFrames::default();
    let settings = crate::core::TurnSettings {
        turn_timeout: Some(std::time::Duration::from_millis(15)),
        ..settings
    };
    let control = Arc::new(TurnControl::default());
    let report = run_unsaved(&frames, framer, settings, model, unsaved, control).await;
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.code.as_deref(), Some("turn_timeout"));
    assert_eq!(frames.codes(), ["turn_timeout"]);
}

#[test]
fn the_borrowed_request_is_a_model_request() {
    let messages = vec![
        Message::new(Role::User, "hi"),
        Message::new(Role::Assistant, "echo: hi"),
    ];
    let params = TurnParams {
        max_tokens: Some(7),
        ..TurnParams::default()
    };
    let json = serde_json::to_string(&RequestRef {
        session_id: "s",
        interaction_id: "turn-2",
        backend: "echo",
        messages: &messages,
        params: &params,
    })
    .expect("serializes");
    let parsed: ModelRequest = serde_json::from_str(&json).expect("parses");
    assert_eq!(
        parsed,
        ModelRequest {
            session_id: "s".into(),
            interaction_id: "turn-2".into(),
            backend: "echo".into(),
            messages,
            params,
        }
    );
}

#[test]
fn the_spliced_request_is_what_serde_json_writes() {
    let history = [
        Message::new(Role::System, "Say \"hi\".\n\u{1}\\"),
        Message::new(Role::User, "\"messages\":[] caf\u{e9} \u{1f600}"),
        Message {
            reasoning: Some("Look it up.".to_owned()),
            tool_calls: vec![ToolCall {
                id: "call-1".to_owned(),
                name: "search".to_owned(),
                arguments: r#"{"q":"a \"b\""}"#.to_owned(),
            }],
            ..Message::new(Role::Assistant, "")
        },
        Message {
            tool_call_id: Some("call-1".to_owned()),
            ..Message::new(Role::Tool, "found")
        },
        Message::new(Role::Assistant, "hi"),
    ];
    let mut extra = serde_json::Map::new();
    extra.insert("messages".to_owned(), serde_json::json!([]));
    extra.insert("mirostat".to_owned(), serde_json::json!({"tau": 5.0}));
    let params = [
        TurnParams::default(),
        TurnParams {
            temperature: Some(0.7),
            max_tokens: Some(7),
            stop: vec!["\n\n".to_owned()],
            tools: vec![llm_host_plugin_api::ToolSpec {
                name: "search".to_owned(),
                description: "Searches.".to_owned(),
                parameters: serde_json::json!({"type": "object"}),
            }],
            extra,
            ..TurnParams::default()
        },
    ];
    for params in &params {
        // The history as turns build it, from empty to the whole of it.
        let mut json = MessagesJson::new(&[]).expect("serializes");
        for len in 0..=history.len() {
            if len > 0 {
                json.push(&history[len - 1]);
            }
            let request = RequestRef {
                session_id: "session-\"x\"",
                interaction_id: "turn-3",
                backend: "echo",
                messages: &history[..len],
                params,
            };
            assert_eq!(
                request.to_json(&mut json).expect("writes"),
                serde_json::to_string(&request).expect("serializes")
            );
            // With a system prompt written in front.
            let system = Message::new(Role::System, "Be \"brief\".");
            let headed: Vec<Message> = std::iter::once(system.clone())
                .chain(history[..len].iter().cloned())
                .collect();
            assert_eq!(
                request
                    .to_json_headed(&mut json, Some(&system))
                    .expect("writes"),
                serde_json::to_string(&RequestRef {
                    messages: &headed,
                    ..request
                })
                .expect("serializes")
            );
            // A text not known yet is written from the messages.
            assert_eq!(
                request
                    .to_json(&mut MessagesJson::default())
                    .expect("writes"),
                serde_json::to_string(&request).expect("serializes")
            );
        }
    }
}
