//! The wire protocol (PROTOCOL.md): client commands in, event frames out.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};

use llm_host_plugin_api::{ToolCall, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How event frames are wrapped (PROTOCOL.md section 3).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Envelope {
    /// `{"name", "data": {kind, event, meta}}`, as the guide documents.
    #[default]
    Flat,
    /// `{"name", "data": {"event": {kind, event, meta}}}`, as the library writes.
    Nested,
}

/// The subprotocol that selects command mode.
pub const COMMAND_SUBPROTOCOL: &str = "llm-host.v1";

/// The version of PROTOCOL.md the host speaks, named in the session
/// announcement (`protocol`).
pub const PROTOCOL_VERSION: &str = "1.1";

/// `sourceId` of model events.
pub const SOURCE_MODEL: &str = "model.primary";
/// `sourceId` of the host's own events.
pub const SOURCE_HOST: &str = "host";

/// `meta` of every frame.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Meta<'a> {
    /// Per-session event number.
    pub sequence: u64,
    /// Unix milliseconds.
    pub timestamp: u64,
    /// Who produced the event.
    #[serde(rename = "sourceId")]
    pub source_id: &'a str,
    /// The turn's id, inside turns.
    #[serde(rename = "interactionId", skip_serializing_if = "Option::is_none")]
    pub interaction_id: Option<&'a str>,
}

impl<'a> Meta<'a> {
    /// Meta stamped now.
    pub fn now(sequence: u64, source_id: &'a str, interaction_id: Option<&'a str>) -> Self {
        Self {
            sequence,
            timestamp: now_ms(),
            source_id,
            interaction_id,
        }
    }
}

/// Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Appends the JSON of `value` to `out`. Serializing the protocol's borrowed
/// types into memory cannot fail (no maps with non-string keys, no failing
/// `Serialize` impls).
fn write_json<T: Serialize + ?Sized>(out: &mut BytesMut, value: &T) {
    let _ = serde_json::to_writer(out.writer(), value);
}

/// `{code, message}` of error events.
#[derive(Serialize, Debug, Clone)]
pub struct ErrorBody<'a> {
    /// Stable, machine-readable.
    pub code: &'a str,
    /// For people.
    pub message: &'a str,
}

/// One entry of `diagnostics`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// `warn`, `error`, ...
    pub level: String,
    /// What happened.
    pub message: String,
    /// Details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// `usage` of usage events.
#[derive(Serialize, Debug, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub struct UsageBody {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Total.
    pub total_tokens: u64,
}

impl From<Usage> for UsageBody {
    fn from(u: Usage) -> Self {
        Self {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

/// `event` of `interaction.model` frames.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ModelEvent<'a> {
    /// Generation started.
    Start {
        /// Provider's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        /// The answering model.
        #[serde(rename = "modelId", skip_serializing_if = "Option::is_none")]
        model_id: Option<&'a str>,
    },
    /// A piece of output.
    Delta {
        /// Answer text.
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<&'a str>,
        /// Reasoning text.
        #[serde(skip_serializing_if = "Option::is_none")]
        reasoning: Option<&'a str>,
        /// A whole tool call.
        #[serde(rename = "toolCall", skip_serializing_if = "Option::is_none")]
        tool_call: Option<&'a ToolCall>,
    },
    /// Token counts.
    Usage {
        /// The counts.
        usage: UsageBody,
    },
    /// Generation ended.
    End {
        /// Why.
        #[serde(rename = "finishReason", skip_serializing_if = "Option::is_none")]
        finish_reason: Option<&'a str>,
        /// Adapter diagnostics gathered during the turn.
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        diagnostics: &'a [Diagnostic],
    },
    /// Generation failed.
    Error {
        /// What went wrong.
        error: ErrorBody<'a>,
        /// Adapter diagnostics gathered during the turn.
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        diagnostics: &'a [Diagnostic],
    },
}

/// `event` of `interaction.session` frames.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum SessionEvent<'a> {
    /// Sent first on every connection.
    #[serde(rename_all = "camelCase")]
    Open {
        /// The session's id.
        session_id: &'a str,
        /// Whether the store had it.
        resumed: bool,
        /// The backend this connection uses.
        model: &'a str,
        /// The session's last sequence number.
        last_sequence: u64,
        /// The session's settings (`session.update`), when any is set.
        #[serde(skip_serializing_if = "Option::is_none")]
        settings: Option<&'a crate::core::settings::SessionSettings>,
    },
    /// A `session.update` was applied: the settings now in effect.
    Updated {
        /// Every setting that is set.
        settings: &'a crate::core::settings::SessionSettings,
    },
}

/// `event` of `interaction.turn` frames.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum TurnEvent<'a> {
    /// The last frame of every turn.
    #[serde(rename_all = "camelCase")]
    End {
        /// `completed`, `cancelled`, `failed`, or `refused` (the prompt was
        /// not run: no turn, no interaction id).
        status: &'a str,
        /// The turn's id.
        #[serde(skip_serializing_if = "str::is_empty")]
        interaction_id: &'a str,
        /// The id the client gave the prompt, if it gave one.
        #[serde(skip_serializing_if = "Option::is_none")]
        prompt_id: Option<&'a str>,
    },
}

/// `entry` of `interaction.diagnostic` frames.
#[derive(Serialize, Debug)]
pub struct DiagnosticEntry<'a> {
    /// `warn` or `error`.
    pub level: &'a str,
    /// `adapter`, `host`, `store` or `protocol`.
    pub kind: &'a str,
    /// What happened.
    pub message: &'a str,
    /// Details; always carries a stable `code`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// A diagnostic about the client's input, with a stable code in `data.code`.
pub fn protocol_diagnostic<'a>(
    level: &'a str,
    code: &str,
    message: &'a str,
) -> DiagnosticEntry<'a> {
    DiagnosticEntry {
        level,
        kind: "protocol",
        message,
        data: Some(serde_json::json!({ "code": code })),
    }
}

/// An event with the protocol version after its own fields.
#[derive(Serialize)]
struct Versioned<'a, B> {
    #[serde(flatten)]
    event: &'a B,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
}

#[derive(Serialize)]
struct Data<'a, B> {
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a B>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry: Option<&'a B>,
    meta: &'a Meta<'a>,
}

#[derive(Serialize)]
struct Flat<'a, B> {
    name: &'a str,
    data: Data<'a, B>,
}

#[derive(Serialize)]
struct NestedData<'a, B> {
    event: Data<'a, B>,
}

#[derive(Serialize)]
struct Nested<'a, B> {
    name: &'a str,
    data: NestedData<'a, B>,
}

/// Writes event frames in the configured envelope.
#[derive(Clone, Copy, Debug)]
pub struct Framer {
    /// Flat or nested.
    pub envelope: Envelope,
}

impl Framer {
    /// An `interaction.model` frame through serde: the reference
    /// [`Framer::write_model`] is tested against.
    #[cfg(test)]
    pub fn model(&self, event: &ModelEvent<'_>, meta: &Meta<'_>) -> String {
        self.frame("model", false, event, meta)
    }

    /// Writes an `interaction.model` frame at the end of `out`, byte for byte
    /// what [`Framer::model`] makes. This is the turn's hot path: the envelope
    /// and `meta` are written as they are, only strings are escaped, and text
    /// deltas (nearly every frame) skip serde altogether.
    pub fn write_model(&self, out: &mut BytesMut, event: &ModelEvent<'_>, meta: &Meta<'_>) {
        out.extend_from_slice(match self.envelope {
            Envelope::Flat => br#"{"name":"interaction.model","data":{"kind":"model","event":"#,
            Envelope::Nested => {
                br#"{"name":"interaction.model","data":{"event":{"kind":"model","event":"#
            }
        });
        match event {
            ModelEvent::Delta {
                text: Some(text),
                reasoning: None,
                tool_call: None,
            } => {
                out.extend_from_slice(br#"{"type":"delta","text":"#);
                write_json(out, text);
                out.extend_from_slice(b"}");
            }
            other => write_json(out, other),
        }
        let mut number = itoa::Buffer::new();
        out.extend_from_slice(br#","meta":{"sequence":"#);
        out.extend_from_slice(number.format(meta.sequence).as_bytes());
        out.extend_from_slice(br#","timestamp":"#);
        out.extend_from_slice(number.format(meta.timestamp).as_bytes());
        out.extend_from_slice(br#","sourceId":"#);
        write_json(out, meta.source_id);
        if let Some(id) = meta.interaction_id {
            out.extend_from_slice(br#","interactionId":"#);
            write_json(out, id);
        }
        out.extend_from_slice(match self.envelope {
            Envelope::Flat => b"}}}",
            Envelope::Nested => b"}}}}",
        });
    }

    /// An `interaction.session` frame. The announcement (`open`) ends with
    /// the protocol version the host speaks.
    pub fn session(&self, event: &SessionEvent<'_>, meta: &Meta<'_>) -> String {
        let protocol = match event {
            SessionEvent::Open { .. } => Some(PROTOCOL_VERSION),
            SessionEvent::Updated { .. } => None,
        };
        self.frame("session", false, &Versioned { event, protocol }, meta)
    }

    /// An `interaction.turn` frame.
    pub fn turn(&self, event: &TurnEvent<'_>, meta: &Meta<'_>) -> String {
        self.frame("turn", false, event, meta)
    }

    /// An `interaction.diagnostic` frame.
    pub fn diagnostic(&self, entry: &DiagnosticEntry<'_>, meta: &Meta<'_>) -> String {
        self.frame("diagnostic", true, entry, meta)
    }

    fn frame<B: Serialize>(&self, kind: &str, is_entry: bool, body: &B, meta: &Meta<'_>) -> String {
        let name = match kind {
            "model" => "interaction.model",
            "session" => "interaction.session",
            "turn" => "interaction.turn",
            _ => "interaction.diagnostic",
        };
        let data = Data {
            kind,
            event: (!is_entry).then_some(body),
            entry: is_entry.then_some(body),
            meta,
        };
        // Most frames fit: one allocation instead of a chain of regrowths.
        let mut bytes = Vec::with_capacity(256);
        let result = match self.envelope {
            Envelope::Flat => serde_json::to_writer(&mut bytes, &Flat { name, data }),
            Envelope::Nested => serde_json::to_writer(
                &mut bytes,
                &Nested {
                    name,
                    data: NestedData { event: data },
                },
            ),
        };
        // Serializing these borrowed structs cannot fail (no maps with
        // non-string keys, no failing Serialize impls), and serde_json writes
        // UTF-8; keep a valid frame anyway.
        match result.map(|()| String::from_utf8(bytes)) {
            Ok(Ok(frame)) => frame,
            Ok(Err(err)) => {
                format!(r#"{{"name":"{name}","data":{{"kind":"{kind}","error":"{err}"}}}}"#)
            }
            Err(err) => {
                format!(r#"{{"name":"{name}","data":{{"kind":"{kind}","error":"{err}"}}}}"#)
            }
        }
    }
}

mod command;
#[cfg(test)]
mod fuzz;
mod strict;

pub use command::{Command, MAX_CALL_ID_BYTES, MAX_PROMPT_ID_BYTES};

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta<'static> {
        Meta {
            sequence: 1,
            timestamp: 1_764_028_800_000,
            source_id: SOURCE_MODEL,
            interaction_id: None,
        }
    }

    #[test]
    fn flat_and_nested_match_the_protocol_byte_for_byte() {
        let start = ModelEvent::Start {
            id: None,
            model_id: None,
        };
        let flat = Framer {
            envelope: Envelope::Flat,
        };
        assert_eq!(
            flat.model(&start, &meta()),
            r#"{"name":"interaction.model","data":{"kind":"model","event":{"type":"start"},"meta":{"sequence":1,"timestamp":1764028800000,"sourceId":"model.primary"}}}"#
        );
        let nested = Framer {
            envelope: Envelope::Nested,
        };
        assert_eq!(
            nested.model(&start, &meta()),
            r#"{"name":"interaction.model","data":{"event":{"kind":"model","event":{"type":"start"},"meta":{"sequence":1,"timestamp":1764028800000,"sourceId":"model.primary"}}}}"#
        );
    }

    #[test]
    fn the_hot_path_writes_what_serde_writes() {
        let call = ToolCall {
            id: "c1".into(),
            name: "lookup".into(),
            arguments: r#"{"q":"x"}"#.into(),
        };
        let diagnostics = [Diagnostic {
            level: "warn".into(),
            message: "retried".into(),
            data: Some(serde_json::json!({"code": "retry"})),
        }];
        let text = "quote \" backslash \\ newline \n tab \t control \u{1} é 🦀 </script>";
        let events = [
            ModelEvent::Start {
                id: Some("id-1"),
                model_id: Some("m"),
            },
            ModelEvent::Delta {
                text: Some(" token1"),
                reasoning: None,
                tool_call: None,
            },
            ModelEvent::Delta {
                text: Some(text),
                reasoning: None,
                tool_call: None,
            },
            ModelEvent::Delta {
                text: Some(""),
                reasoning: None,
                tool_call: None,
            },
            ModelEvent::Delta {
                text: None,
                reasoning: Some(text),
                tool_call: None,
            },
            ModelEvent::Delta {
                text: None,
                reasoning: None,
                tool_call: Some(&call),
            },
            ModelEvent::Usage {
                usage: UsageBody {
                    input_tokens: 1,
                    output_tokens: 2,
                    total_tokens: 3,
                },
            },
            ModelEvent::End {
                finish_reason: Some("stop"),
                diagnostics: &diagnostics,
            },
            ModelEvent::Error {
                error: ErrorBody {
                    code: "x",
                    message: text,
                },
                diagnostics: &[],
            },
        ];
        let metas = [
            meta(),
            Meta {
                sequence: u64::MAX,
                timestamp: 0,
                source_id: "model.primary",
                interaction_id: Some("turn-\"7\""),
            },
        ];
        for envelope in [Envelope::Flat, Envelope::Nested] {
            let framer = Framer { envelope };
            let mut out = BytesMut::new();
            for event in &events {
                for meta in &metas {
                    framer.write_model(&mut out, event, meta);
                    let written = out.split().freeze();
                    assert_eq!(
                        std::str::from_utf8(&written).expect("UTF-8"),
                        framer.model(event, meta),
                        "{envelope:?} {event:?} {meta:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_announcement_names_the_protocol_version() {
        let open = SessionEvent::Open {
            session_id: "s-1",
            resumed: false,
            model: "echo",
            last_sequence: 0,
            settings: None,
        };
        let mut meta = meta();
        meta.source_id = SOURCE_HOST;
        let flat = Framer {
            envelope: Envelope::Flat,
        };
        assert_eq!(
            flat.session(&open, &meta),
            r#"{"name":"interaction.session","data":{"kind":"session","event":{"type":"open","sessionId":"s-1","resumed":false,"model":"echo","lastSequence":0,"protocol":"1.1"},"meta":{"sequence":1,"timestamp":1764028800000,"sourceId":"host"}}}"#
        );
    }

    #[test]
    fn diagnostics_use_entry() {
        let framer = Framer {
            envelope: Envelope::Flat,
        };
        let frame = framer.diagnostic(&protocol_diagnostic("error", "bad_frame", "nope"), &meta());
        assert_eq!(
            frame,
            r#"{"name":"interaction.diagnostic","data":{"kind":"diagnostic","entry":{"level":"error","kind":"protocol","message":"nope","data":{"code":"bad_frame"}},"meta":{"sequence":1,"timestamp":1764028800000,"sourceId":"model.primary"}}}"#
        );
    }

    #[test]
    fn commands_parse_with_named_problems() {
        assert_eq!(Command::parse(r#"{"type":"cancel"}"#), Ok(Command::Cancel));
        let Ok(Command::Prompt {
            id: _,
            text,
            model,
            params,
        }) = Command::parse(
            r#"{"type":"prompt","text":"Hello","model":"fast","params":{"temperature":0.2,"maxTokens":256}}"#,
        )
        else {
            panic!("a prompt command parses");
        };
        assert_eq!((text.as_str(), model.as_deref()), ("Hello", Some("fast")));
        assert_eq!(params.max_tokens, Some(256));
        assert_eq!(Command::parse("{oops").map_err(|e| e.0), Err("bad_frame"));
        assert_eq!(
            Command::parse(r#"{"type":"dance"}"#).map_err(|e| e.0),
            Err("unknown_command")
        );
        assert_eq!(
            Command::parse(r#"{"type":"prompt"}"#).map_err(|e| e.0),
            Err("bad_frame")
        );
    }

    #[test]
    fn commands_are_parsed_strictly() {
        for frame in [
            r#"{"type":"cancel","x":1}"#,
            r#"{"type":"prompt","type":"cancel"}"#,
            r#"{"type":"cancel","type":"prompt","text":"hi"}"#,
            r#"{"type":"prompt","text":"a","text":"b"}"#,
            r#"{"type":"prompt","text":"hi","extra":true}"#,
        ] {
            let err = Command::parse(frame).expect_err(frame);
            assert_eq!(err.0, "bad_frame", "{frame}: {}", err.1);
        }
    }
}
