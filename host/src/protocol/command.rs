//! Client commands (command mode): parsed strictly, so that a command
//! means one thing: unknown fields, a key given twice at any depth, wrong
//! types and over-long ids are refused with a code.

use llm_host_plugin_api::TurnParams;
use serde::Deserialize;
use serde_json::Value;

use super::strict;

/// A command-mode client frame.
#[derive(Deserialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
// A command lives for one frame; boxing the prompt would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run a turn.
    Prompt {
        /// The client's name for this prompt (at most 128 bytes), repeated
        /// on its refusal or its turn's end.
        #[serde(default)]
        id: Option<String>,
        /// The user's message.
        text: String,
        /// A backend name for this turn only.
        #[serde(default)]
        model: Option<String>,
        /// Per-turn parameters.
        #[serde(default)]
        params: TurnParams,
    },
    /// Stop the running turn.
    Cancel,
    /// The result of a tool call the model made in the running turn: its
    /// text (`content`), or why the tool failed (`error`), never both.
    #[serde(rename = "tool_result", rename_all = "camelCase")]
    ToolResult {
        /// The call's id, from its `toolCall` event.
        call_id: String,
        /// What the tool answered.
        #[serde(default)]
        content: Option<String>,
        /// Why the tool could not answer.
        #[serde(default)]
        error: Option<String>,
    },
    /// Change the session's settings: each field given sets it, `null`
    /// clears it, one left out stays as it is.
    #[serde(rename = "session.update")]
    SessionUpdate {
        /// The system prompt sent at the head of every model request.
        #[serde(default, deserialize_with = "given")]
        system: Option<Option<String>>,
        /// The backend later turns use when their prompt names none.
        #[serde(default, deserialize_with = "given")]
        model: Option<Option<String>>,
        /// Default turn parameters, which a prompt's override.
        #[serde(default, deserialize_with = "given")]
        params: Option<Option<TurnParams>>,
    },
}

/// A field that is given (`Some`), as a value or `null` (`Some(None)`).
fn given<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl Command {
    /// Parses a command frame; the error names the problem and a stable code
    /// (`bad_frame` or `unknown_command`).
    pub fn parse(text: &str) -> Result<Command, (&'static str, String)> {
        let value: Value = serde_json::from_str(text)
            .map_err(|err| ("bad_frame", format!("the frame is not JSON: {err}")))?;
        match value.get("type").and_then(Value::as_str) {
            Some("cancel") => {
                if let Some(extra) = value
                    .as_object()
                    .and_then(|fields| fields.keys().find(|key| *key != "type"))
                {
                    return Err((
                        "bad_frame",
                        format!("bad command: unknown field `{extra}` (a cancel has none)"),
                    ));
                }
            }
            Some("prompt" | "tool_result" | "session.update") => {}
            Some(other) => {
                return Err((
                    "unknown_command",
                    format!(
                        "unknown command type `{other}` (expected `prompt`, `cancel`, \
                         `tool_result` or `session.update`)"
                    ),
                ))
            }
            None => {
                return Err((
                    "bad_frame",
                    "a command is a JSON object with a string `type`".to_owned(),
                ))
            }
        }
        // From the text again, so that a key given twice, at any depth, is
        // an error rather than a silent pick of the last.
        serde_json::from_str::<strict::UniqueKeys>(text)
            .map_err(|err| ("bad_frame", format!("bad command: {err}")))?;
        // serde also reads a struct from an array of its fields.
        if let Some(tools) = value.pointer("/params/tools").and_then(Value::as_array) {
            if tools.iter().any(|tool| !tool.is_object()) {
                return Err((
                    "bad_frame",
                    "bad command: each of params.tools is an object".to_owned(),
                ));
            }
        }
        let command: Command = serde_json::from_str(text)
            .map_err(|err| ("bad_frame", format!("bad command: {err}")))?;
        match &command {
            Command::Prompt { id: Some(id), .. } if id.len() > MAX_PROMPT_ID_BYTES => {
                return Err((
                    "bad_frame",
                    format!("bad command: a prompt id is at most {MAX_PROMPT_ID_BYTES} bytes"),
                ));
            }
            Command::ToolResult {
                call_id,
                content,
                error,
            } => {
                if call_id.is_empty() || call_id.len() > MAX_CALL_ID_BYTES {
                    return Err((
                        "bad_frame",
                        format!("bad command: a callId is 1 to {MAX_CALL_ID_BYTES} bytes"),
                    ));
                }
                if content.is_some() == error.is_some() {
                    return Err((
                        "bad_frame",
                        "bad command: a tool_result has `content` or `error`, one of them"
                            .to_owned(),
                    ));
                }
            }
            _ => {}
        }
        Ok(command)
    }
}

/// The longest prompt id a client may give.
pub const MAX_PROMPT_ID_BYTES: usize = 128;

/// The longest tool call id a tool result may name.
pub const MAX_CALL_ID_BYTES: usize = 256;
