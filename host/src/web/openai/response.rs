//! From the turn's frames to OpenAI's answers.
//!
//! The turn core's only output is the protocol's frames (JSON text, as the
//! WebSocket gets them); here each is parsed back into an [`Event`]. That
//! costs one small JSON parse per token, little beside writing the token
//! out as an HTTP chunk, and it keeps the core with one sink and one output:
//! what a WebSocket client and an HTTP client are told comes from the same
//! frames, and the core needs no HTTP-shaped port. The frames are written
//! in the flat envelope for this edge whatever `server.envelope` says.
//!
//! [`Answer`] gathers a turn's events into a `chat.completion` object, or
//! the error to answer with (the streamed chunks are
//! [`super::chunks::Chunks`]'s).

use llm_host_plugin_api::{ToolCall, Usage};
use serde_json::{json, Value};
use warp::http::StatusCode;

use super::ApiError;

/// One frame of a turn, as this edge needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The model started.
    Start,
    /// A piece of output: text, reasoning, a whole tool call.
    Delta {
        /// Answer text.
        text: Option<String>,
        /// Reasoning text.
        reasoning: Option<String>,
        /// A tool call.
        tool_call: Option<ToolCall>,
    },
    /// Token counts.
    Usage(Usage),
    /// The model ended, with the protocol's finish reason.
    End(Option<String>),
    /// The model failed.
    Error {
        /// Its stable code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The host's diagnostic (a store failure, another key's session).
    Diagnostic {
        /// `warn` or `error`.
        level: String,
        /// Its stable code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The turn's last frame: `completed`, `cancelled` or `failed`.
    TurnEnd(String),
}

impl Event {
    /// Reads a frame written in the flat envelope; none for a frame this
    /// edge has no use for (or one it cannot read).
    pub fn parse(frame: &[u8]) -> Option<Event> {
        let frame: Value = serde_json::from_slice(frame).ok()?;
        let data = &frame["data"];
        let text = |value: &Value| value.as_str().map(str::to_owned);
        match frame["name"].as_str()? {
            "interaction.model" => {
                let event = &data["event"];
                Some(match event["type"].as_str()? {
                    "start" => Event::Start,
                    "delta" => Event::Delta {
                        text: text(&event["text"]),
                        reasoning: text(&event["reasoning"]),
                        tool_call: serde_json::from_value(event["toolCall"].clone()).ok(),
                    },
                    "usage" => {
                        let usage = &event["usage"];
                        let count = |name: &str| usage[name].as_u64().unwrap_or(0);
                        Event::Usage(Usage {
                            input_tokens: count("inputTokens"),
                            output_tokens: count("outputTokens"),
                            total_tokens: count("totalTokens"),
                        })
                    }
                    "end" => Event::End(text(&event["finishReason"])),
                    "error" => Event::Error {
                        code: text(&event["error"]["code"]).unwrap_or_default(),
                        message: text(&event["error"]["message"]).unwrap_or_default(),
                    },
                    _ => return None,
                })
            }
            "interaction.diagnostic" => {
                let entry = &data["entry"];
                Some(Event::Diagnostic {
                    level: text(&entry["level"]).unwrap_or_default(),
                    code: text(&entry["data"]["code"]).unwrap_or_default(),
                    message: text(&entry["message"]).unwrap_or_default(),
                })
            }
            "interaction.turn" => Some(Event::TurnEnd(text(&data["event"]["status"])?)),
            _ => None,
        }
    }

    /// Whether it is output the client should see at once (what decides a
    /// streamed answer's status: until the first output, a failure can
    /// still be told with an HTTP status).
    pub fn is_output(&self) -> bool {
        matches!(self, Event::Delta { .. })
    }
}

/// OpenAI's `finish_reason` for the protocol's `reason`: `stop`, `length`,
/// `tool_calls`, `content_filter`. A turn that called tools and ended
/// normally finishes with `tool_calls`, as OpenAI's do.
pub fn finish_reason(reason: Option<&str>, called_tools: bool) -> &'static str {
    match reason {
        Some("length") => "length",
        Some("tool-calls" | "tool_calls") => "tool_calls",
        Some("content-filter" | "content_filter") => "content_filter",
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

/// A tool call as OpenAI writes it.
pub(super) fn tool_call_object(call: &ToolCall) -> Value {
    json!({
        "id": call.id,
        "type": "function",
        "function": { "name": call.name, "arguments": call.arguments },
    })
}

/// Token counts as OpenAI writes them.
pub(super) fn usage_object(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    })
}

/// What a turn said, gathered from its events.
#[derive(Debug, Default, Clone)]
pub struct Answer {
    /// The answer text.
    pub text: String,
    /// The reasoning text.
    pub reasoning: String,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
    /// The last token counts.
    pub usage: Option<Usage>,
    /// The protocol's finish reason.
    pub finish: Option<String>,
    /// The model's error, if it failed.
    pub error: Option<(String, String)>,
    /// The first error diagnostic of the host (its code and message).
    pub diagnostic: Option<(String, String)>,
    /// The turn's status, once it ended.
    pub status: Option<String>,
}

impl Answer {
    /// Takes in one event.
    pub fn add(&mut self, event: &Event) {
        match event {
            Event::Start => {}
            Event::Delta {
                text,
                reasoning,
                tool_call,
            } => {
                if let Some(text) = text {
                    self.text.push_str(text);
                }
                if let Some(reasoning) = reasoning {
                    self.reasoning.push_str(reasoning);
                }
                if let Some(call) = tool_call {
                    self.tool_calls.push(call.clone());
                }
            }
            Event::Usage(usage) => self.usage = Some(*usage),
            Event::End(reason) => self.finish.clone_from(reason),
            Event::Error { code, message } => {
                self.error = Some((code.clone(), message.clone()));
            }
            Event::Diagnostic {
                level,
                code,
                message,
            } => {
                if level == "error" && self.diagnostic.is_none() {
                    self.diagnostic = Some((code.clone(), message.clone()));
                }
            }
            Event::TurnEnd(status) => self.status = Some(status.clone()),
        }
    }

    /// Whether the turn's last frame came.
    pub fn ended(&self) -> bool {
        self.status.is_some()
    }

    /// OpenAI's finish reason for it.
    pub fn finish_reason(&self) -> &'static str {
        finish_reason(self.finish.as_deref(), !self.tool_calls.is_empty())
    }

    /// The error to answer with, if the turn did not complete: the model's
    /// error (500 with its code), or the host's (a session of another key
    /// 404, a store failure 503, a full history 400); a turn that ended
    /// without its last frame is a 500.
    pub fn failure(&self) -> Option<ApiError> {
        if let Some((code, message)) = &self.error {
            return Some(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                code.clone(),
                format!("the model backend failed: {message}"),
            ));
        }
        match self.status.as_deref() {
            Some("completed") => None,
            Some(status) => Some(match &self.diagnostic {
                Some((code, message)) => host_failure(code, message),
                None if status == "cancelled" => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "cancelled",
                    "the turn was cancelled (the host is shutting down)",
                ),
                None => ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "turn_failed",
                    "the turn failed",
                ),
            }),
            None => Some(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
                "the turn ended before its last frame",
            )),
        }
    }

    /// The `chat.completion` object.
    pub fn completion(&self, id: &str, created: u64, model: &str) -> Value {
        let mut message = json!({
            "role": "assistant",
            // OpenAI's: null when the answer is tool calls only.
            "content": if self.text.is_empty() && !self.tool_calls.is_empty() {
                Value::Null
            } else {
                Value::String(self.text.clone())
            },
            "refusal": null,
        });
        if !self.tool_calls.is_empty() {
            message["tool_calls"] = self.tool_calls.iter().map(tool_call_object).collect();
        }
        if !self.reasoning.is_empty() {
            message["reasoning_content"] = Value::String(self.reasoning.clone());
        }
        json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": null,
                "finish_reason": self.finish_reason(),
            }],
            "usage": usage_object(self.usage.unwrap_or_default()),
        })
    }
}

/// The HTTP error for a turn the host failed with diagnostic `code`.
fn host_failure(code: &str, message: &str) -> ApiError {
    let (status, kind) = match code {
        "session_not_found" => (StatusCode::NOT_FOUND, "invalid_request_error"),
        "history_full" => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        "store_unavailable" => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        "session_deleted" | "lease_lost" => (StatusCode::CONFLICT, "server_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    };
    ApiError::new(status, kind, code, message)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::protocol::{Envelope, Framer, Meta, ModelEvent, TurnEvent, SOURCE_MODEL};
    use bytes::BytesMut;

    fn model_frame(event: &ModelEvent<'_>) -> Vec<u8> {
        let framer = Framer {
            envelope: Envelope::Flat,
        };
        let mut out = BytesMut::new();
        framer.write_model(&mut out, event, &Meta::now(3, SOURCE_MODEL, Some("turn-1")));
        out.to_vec()
    }

    #[test]
    fn frames_read_back_as_events() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "weather".into(),
            arguments: "{\"city\":\"Oslo\"}".into(),
        };
        let cases = [
            (
                model_frame(&ModelEvent::Start {
                    id: None,
                    model_id: Some("m"),
                }),
                Event::Start,
            ),
            (
                model_frame(&ModelEvent::Delta {
                    text: Some("hi \"there\""),
                    reasoning: None,
                    tool_call: None,
                }),
                Event::Delta {
                    text: Some("hi \"there\"".into()),
                    reasoning: None,
                    tool_call: None,
                },
            ),
            (
                model_frame(&ModelEvent::Delta {
                    text: None,
                    reasoning: Some("hmm"),
                    tool_call: Some(&call),
                }),
                Event::Delta {
                    text: None,
                    reasoning: Some("hmm".into()),
                    tool_call: Some(call.clone()),
                },
            ),
            (
                model_frame(&ModelEvent::Usage {
                    usage: Usage {
                        input_tokens: 2,
                        output_tokens: 3,
                        total_tokens: 5,
                    }
                    .into(),
                }),
                Event::Usage(Usage {
                    input_tokens: 2,
                    output_tokens: 3,
                    total_tokens: 5,
                }),
            ),
            (
                model_frame(&ModelEvent::End {
                    finish_reason: Some("tool-calls"),
                    diagnostics: &[],
                }),
                Event::End(Some("tool-calls".into())),
            ),
            (
                model_frame(&ModelEvent::Error {
                    error: crate::protocol::ErrorBody {
                        code: "injected_failure",
                        message: "boom",
                    },
                    diagnostics: &[],
                }),
                Event::Error {
                    code: "injected_failure".into(),
                    message: "boom".into(),
                },
            ),
        ];
        for (frame, event) in cases {
            assert_eq!(Event::parse(&frame), Some(event));
        }
        let framer = Framer {
            envelope: Envelope::Flat,
        };
        let end = framer.turn(
            &TurnEvent::End {
                status: "completed",
                interaction_id: "turn-1",
                prompt_id: None,
            },
            &Meta::now(4, "host", Some("turn-1")),
        );
        assert_eq!(
            Event::parse(end.as_bytes()),
            Some(Event::TurnEnd("completed".into()))
        );
        let diagnostic = framer.diagnostic(
            &crate::protocol::DiagnosticEntry {
                level: "error",
                kind: "store",
                message: "the session store failed",
                data: Some(json!({ "code": "store_unavailable" })),
            },
            &Meta::now(4, "host", None),
        );
        assert_eq!(
            Event::parse(diagnostic.as_bytes()),
            Some(Event::Diagnostic {
                level: "error".into(),
                code: "store_unavailable".into(),
                message: "the session store failed".into(),
            })
        );
        assert_eq!(Event::parse(b"not json"), None);
    }

    #[test]
    fn finish_reasons_map_to_openais() {
        assert_eq!(finish_reason(Some("stop"), false), "stop");
        assert_eq!(finish_reason(None, false), "stop");
        assert_eq!(finish_reason(Some("length"), true), "length");
        assert_eq!(finish_reason(Some("tool-calls"), false), "tool_calls");
        assert_eq!(finish_reason(Some("stop"), true), "tool_calls");
        assert_eq!(
            finish_reason(Some("content_filter"), false),
            "content_filter"
        );
        assert_eq!(
            finish_reason(Some("content-filter"), false),
            "content_filter"
        );
        assert_eq!(finish_reason(Some("cancelled"), false), "stop");
    }

    /// The answer `events` make (also for the chunks' tests).
    pub(in crate::web::openai) fn answer_of(events: &[Event]) -> Answer {
        let mut answer = Answer::default();
        for event in events {
            answer.add(event);
        }
        answer
    }

    /// A text delta.
    pub(in crate::web::openai) fn text(t: &str) -> Event {
        Event::Delta {
            text: Some(t.into()),
            reasoning: None,
            tool_call: None,
        }
    }

    #[test]
    fn a_completed_turn_is_a_chat_completion() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "weather".into(),
            arguments: "{}".into(),
        };
        let answer = answer_of(&[
            Event::Start,
            text("echo:"),
            text(" hi"),
            Event::Usage(Usage {
                input_tokens: 1,
                output_tokens: 2,
                total_tokens: 3,
            }),
            Event::End(Some("length".into())),
            Event::TurnEnd("completed".into()),
        ]);
        assert_eq!(answer.failure(), None);
        let completion = answer.completion("chatcmpl-1", 7, "echo");
        assert_eq!(
            completion,
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 7,
                "model": "echo",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "echo: hi", "refusal": null},
                    "logprobs": null,
                    "finish_reason": "length",
                }],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            })
        );

        let tools = answer_of(&[
            Event::Delta {
                text: None,
                reasoning: Some("Look it up.".into()),
                tool_call: Some(call),
            },
            Event::End(Some("tool-calls".into())),
            Event::TurnEnd("completed".into()),
        ]);
        let completion = tools.completion("chatcmpl-2", 7, "echo");
        let choice = &completion["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(choice["message"]["reasoning_content"], "Look it up.");
        assert_eq!(
            choice["message"]["tool_calls"],
            json!([{"id": "call_1", "type": "function",
                    "function": {"name": "weather", "arguments": "{}"}}])
        );
        assert_eq!(completion["usage"]["total_tokens"], 0);
    }

    #[test]
    fn failed_turns_are_errors_with_the_right_status() {
        let failed = |events: &[Event]| answer_of(events).failure().expect("an error");
        let err = failed(&[
            text("echo:"),
            Event::Error {
                code: "injected_failure".into(),
                message: "boom".into(),
            },
            Event::TurnEnd("failed".into()),
        ]);
        assert_eq!(err.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.code, "injected_failure");
        assert!(err.message.contains("boom"));
        for (code, status) in [
            ("session_not_found", StatusCode::NOT_FOUND),
            ("store_unavailable", StatusCode::SERVICE_UNAVAILABLE),
            ("history_full", StatusCode::BAD_REQUEST),
            ("session_deleted", StatusCode::CONFLICT),
        ] {
            let err = failed(&[
                Event::Diagnostic {
                    level: "error".into(),
                    code: code.into(),
                    message: "no".into(),
                },
                Event::TurnEnd("failed".into()),
            ]);
            assert_eq!((err.status, err.code.as_str()), (status, code));
        }
        assert_eq!(
            failed(&[Event::TurnEnd("cancelled".into())]).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            failed(&[text("half")]).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        // A warning is not a failure.
        let warned = answer_of(&[
            Event::Diagnostic {
                level: "warn".into(),
                code: "session_busy".into(),
                message: "wait".into(),
            },
            Event::TurnEnd("completed".into()),
        ]);
        assert_eq!(warned.failure(), None);
    }
}
