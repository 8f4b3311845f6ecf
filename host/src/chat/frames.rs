//! The host's frames (PROTOCOL.md section 3), read into the [`Event`]s
//! the chat shows: text, reasoning and tool calls, usage, errors,
//! diagnostics, turn ends and the session announcement; and the sequence
//! number of the numbered ones, which a reconnection asks to be sent on
//! from (`?since=N`, PROTOCOL.md section 4).

use serde_json::Value;

/// Token counts of a model call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub input: u64,
    /// Generated tokens.
    pub output: u64,
    /// Both.
    pub total: u64,
}

/// What a host frame says, as far as the chat shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `interaction.session` open: the connection's session and backend.
    Open {
        /// The session's id.
        session: String,
        /// The backend's name.
        model: String,
        /// Whether the store had the session.
        resumed: bool,
        /// The session's last sequence number when the host announced it.
        last_sequence: u64,
    },
    /// Answer text.
    Text(String),
    /// Reasoning text.
    Reasoning(String),
    /// A tool call the model made.
    ToolCall {
        /// The tool.
        name: String,
        /// Its arguments, as JSON text.
        arguments: String,
    },
    /// Token counts.
    Usage(Usage),
    /// The model failed.
    ModelError {
        /// Stable code.
        code: String,
        /// For people.
        message: String,
    },
    /// A diagnostic (`interaction.diagnostic`, or one of a model `end`).
    Diagnostic {
        /// `warn` or `error`.
        level: String,
        /// `data.code`, empty if none.
        code: String,
        /// For people.
        message: String,
    },
    /// `interaction.turn` end: a prompt is done with.
    TurnEnd {
        /// `completed`, `cancelled`, `failed` or `refused`.
        status: String,
        /// The prompt's `id`, if it had one.
        prompt_id: Option<String>,
    },
}

/// One host frame as the chat reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// What it says.
    pub events: Vec<Event>,
    /// `meta.sequence` of a numbered frame (a turn's model events and its
    /// end); none for the others, whose number only repeats the session's
    /// last (the announcement, diagnostics, a refused prompt's end).
    pub sequence: Option<u64>,
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn diagnostic(entry: &Value) -> Event {
    Event::Diagnostic {
        level: text_of(&entry["level"]),
        code: text_of(&entry["data"]["code"]),
        message: text_of(&entry["message"]),
    }
}

/// One host frame, in either envelope (PROTOCOL.md section 3). Frames the
/// chat has nothing to show for (model `start`, unknown names) give no
/// events, but their number if they have one.
pub fn parse_frame(text: &str) -> Frame {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        return Frame {
            events: vec![Event::Diagnostic {
                level: "error".to_owned(),
                code: String::new(),
                message: format!("the host sent a frame that is not JSON: {text}"),
            }],
            sequence: None,
        };
    };
    let data = &frame["data"];
    let body = if data.get("kind").is_some() {
        data
    } else {
        &data["event"]
    };
    let name = frame["name"].as_str().unwrap_or_default();
    let meta = &body["meta"];
    // A turn's frames name it; a refused prompt's end (no turn) does not.
    let numbered = matches!(name, "interaction.model" | "interaction.turn")
        && meta["interactionId"]
            .as_str()
            .is_some_and(|id| !id.is_empty());
    Frame {
        events: events_of(name, body),
        sequence: meta["sequence"].as_u64().filter(|_| numbered),
    }
}

/// The events of frame `name` whose kind, event and meta are in `body`.
fn events_of(name: &str, body: &Value) -> Vec<Event> {
    let event = &body["event"];
    let kind = event["type"].as_str().unwrap_or_default();
    match (name, kind) {
        ("interaction.session", "open") => vec![Event::Open {
            session: text_of(&event["sessionId"]),
            model: text_of(&event["model"]),
            resumed: event["resumed"].as_bool().unwrap_or(false),
            last_sequence: event["lastSequence"].as_u64().unwrap_or(0),
        }],
        ("interaction.model", "delta") => {
            let mut events = Vec::new();
            if let Some(reasoning) = event["reasoning"].as_str() {
                events.push(Event::Reasoning(reasoning.to_owned()));
            }
            if let Some(text) = event["text"].as_str() {
                events.push(Event::Text(text.to_owned()));
            }
            let call = &event["toolCall"];
            if call.is_object() {
                let arguments = match &call["arguments"] {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                events.push(Event::ToolCall {
                    name: text_of(&call["name"]),
                    arguments,
                });
            }
            events
        }
        ("interaction.model", "usage") => {
            let usage = &event["usage"];
            let count = |key: &str| usage[key].as_u64().unwrap_or(0);
            vec![Event::Usage(Usage {
                input: count("inputTokens"),
                output: count("outputTokens"),
                total: count("totalTokens"),
            })]
        }
        ("interaction.model", "error") => {
            let mut events = vec![Event::ModelError {
                code: text_of(&event["error"]["code"]),
                message: text_of(&event["error"]["message"]),
            }];
            events.extend(end_diagnostics(event));
            events
        }
        ("interaction.model", "end") => end_diagnostics(event),
        ("interaction.diagnostic", _) => vec![diagnostic(&body["entry"])],
        ("interaction.turn", "end") => vec![Event::TurnEnd {
            status: text_of(&event["status"]),
            prompt_id: event["promptId"].as_str().map(str::to_owned),
        }],
        _ => Vec::new(),
    }
}

fn end_diagnostics(event: &Value) -> Vec<Event> {
    event["diagnostics"]
        .as_array()
        .map(|entries| entries.iter().map(diagnostic).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        protocol_diagnostic, Envelope, Framer, Meta, ModelEvent, SessionEvent, TurnEvent, UsageBody,
    };

    fn meta() -> Meta<'static> {
        Meta::now(3, "model.primary", Some("turn-1"))
    }

    #[test]
    fn reads_the_hosts_frames_in_both_envelopes() {
        for envelope in [Envelope::Flat, Envelope::Nested] {
            let framer = Framer { envelope };
            let open = framer.session(
                &SessionEvent::Open {
                    session_id: "s-1",
                    resumed: true,
                    model: "echo",
                    last_sequence: 9,
                    settings: None,
                },
                &meta(),
            );
            assert_eq!(
                parse_frame(&open).events,
                [Event::Open {
                    session: "s-1".to_owned(),
                    model: "echo".to_owned(),
                    resumed: true,
                    last_sequence: 9
                }]
            );
            let delta = framer.model(
                &ModelEvent::Delta {
                    text: Some(" world"),
                    reasoning: Some("hmm"),
                    tool_call: None,
                },
                &meta(),
            );
            assert_eq!(
                parse_frame(&delta).events,
                [
                    Event::Reasoning("hmm".to_owned()),
                    Event::Text(" world".to_owned())
                ]
            );
            let usage = framer.model(
                &ModelEvent::Usage {
                    usage: UsageBody {
                        input_tokens: 4,
                        output_tokens: 5,
                        total_tokens: 9,
                    },
                },
                &meta(),
            );
            assert_eq!(
                parse_frame(&usage).events,
                [Event::Usage(Usage {
                    input: 4,
                    output: 5,
                    total: 9
                })]
            );
            let end = framer.turn(
                &TurnEvent::End {
                    status: "cancelled",
                    interaction_id: "turn-1",
                    prompt_id: Some("p-2"),
                },
                &meta(),
            );
            assert_eq!(
                parse_frame(&end).events,
                [Event::TurnEnd {
                    status: "cancelled".to_owned(),
                    prompt_id: Some("p-2".to_owned())
                }]
            );
            let warning = framer.diagnostic(
                &protocol_diagnostic("warn", "nothing_to_cancel", "no turn is running"),
                &meta(),
            );
            assert_eq!(
                parse_frame(&warning).events,
                [Event::Diagnostic {
                    level: "warn".to_owned(),
                    code: "nothing_to_cancel".to_owned(),
                    message: "no turn is running".to_owned()
                }]
            );
            let start = framer.model(
                &ModelEvent::Start {
                    id: None,
                    model_id: Some("echo"),
                },
                &meta(),
            );
            assert_eq!(parse_frame(&start).events, []);
            // Numbered: the turn's model events and end; not the
            // announcement, a diagnostic, or a refused prompt's end.
            for numbered in [&delta, &usage, &end, &start] {
                assert_eq!(parse_frame(numbered).sequence, Some(3), "{numbered}");
            }
            assert_eq!(parse_frame(&open).sequence, None);
            assert_eq!(parse_frame(&warning).sequence, None);
            let refused = framer.turn(
                &TurnEvent::End {
                    status: "refused",
                    interaction_id: "",
                    prompt_id: Some("p-3"),
                },
                &Meta::now(3, "host", None),
            );
            assert_eq!(parse_frame(&refused).sequence, None);
        }
    }

    #[test]
    fn reads_tool_calls_and_errors() {
        let call = r#"{"name":"interaction.model","data":{"kind":"model","event":{"type":"delta","toolCall":{"id":"c1","name":"lookup","arguments":"{\"q\":1}"}},"meta":{"sequence":1}}}"#;
        assert_eq!(
            parse_frame(call).events,
            [Event::ToolCall {
                name: "lookup".to_owned(),
                arguments: r#"{"q":1}"#.to_owned()
            }]
        );
        let error = r#"{"name":"interaction.model","data":{"kind":"model","event":{"type":"error","error":{"code":"timeout","message":"too slow"},"diagnostics":[{"level":"warn","message":"retried"}]},"meta":{"sequence":1}}}"#;
        assert_eq!(
            parse_frame(error).events,
            [
                Event::ModelError {
                    code: "timeout".to_owned(),
                    message: "too slow".to_owned()
                },
                Event::Diagnostic {
                    level: "warn".to_owned(),
                    code: String::new(),
                    message: "retried".to_owned()
                }
            ]
        );
        assert!(matches!(
            parse_frame("not json").events.as_slice(),
            [Event::Diagnostic { level, .. }] if level == "error"
        ));
    }
}
