//! A `POST /v1/chat/completions` body as OpenAI's Chat Completions API
//! defines it, read into what the turn core takes: the backend's name, the
//! conversation as plugin-api [`Message`]s and the per-turn [`TurnParams`].
//!
//! Each field is read on its own, so that a field of the wrong type is
//! answered with its name in the error's `param` (`messages[2].content`).
//! Fields this host has no use for (`user`, `metadata`, `store`,
//! `logprobs`, ...) are accepted and ignored, as OpenAI-compatible servers
//! commonly do; a few sampling fields without a place in [`TurnParams`]
//! (`frequency_penalty`, `presence_penalty`, `response_format`,
//! `tool_choice`, `parallel_tool_calls`) go to the backend in
//! `params.extra`, in the protocol's camelCase, for adapters that know them.

use llm_host_plugin_api::{Message, Role, ToolCall, ToolSpec, TurnParams};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::ApiError;

/// A chat completion request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The backend (`[models.NAME]`) that answers.
    pub model: String,
    /// The conversation, in order; never empty.
    pub messages: Vec<Message>,
    /// Sampling parameters, tools, `max_tokens`.
    pub params: TurnParams,
    /// Whether the answer streams as server-sent events.
    pub stream: bool,
    /// Whether a streamed answer ends with a usage chunk
    /// (`stream_options.include_usage`).
    pub include_usage: bool,
}

impl ChatRequest {
    /// Reads `body`, a JSON object as OpenAI's API takes it.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|err| ApiError::invalid(format!("the body is not valid JSON: {err}"), None))?;
        let Value::Object(object) = value else {
            return Err(ApiError::invalid("the body must be a JSON object", None));
        };
        let model: String = required(&object, "model")?;
        let Some(Value::Array(wire_messages)) = object.get("messages") else {
            return Err(match object.get("messages") {
                None | Some(Value::Null) => missing("messages"),
                Some(_) => wrong_type("messages", "an array of messages"),
            });
        };
        if wire_messages.is_empty() {
            return Err(ApiError::invalid(
                "`messages` must hold at least one message",
                Some("messages".to_owned()),
            ));
        }
        let messages = wire_messages
            .iter()
            .enumerate()
            .map(|(index, message)| read_message(index, message))
            .collect::<Result<Vec<_>, _>>()?;

        if let Some(n) = field::<u64>(&object, "n")? {
            if n != 1 {
                return Err(ApiError::invalid(
                    "this host answers one choice per request (`n` must be 1)",
                    Some("n".to_owned()),
                ));
            }
        }
        let max_tokens = match field::<u64>(&object, "max_completion_tokens")? {
            Some(max) => Some(max),
            None => field::<u64>(&object, "max_tokens")?,
        };
        let seed = match field::<i64>(&object, "seed")? {
            Some(seed) => Some(u64::try_from(seed).map_err(|_| {
                ApiError::invalid("`seed` must not be negative", Some("seed".to_owned()))
            })?),
            None => None,
        };
        let stop = match object.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(stop)) => vec![stop.clone()],
            Some(Value::Array(_)) => field::<Vec<String>>(&object, "stop")?.unwrap_or_default(),
            Some(_) => return Err(wrong_type("stop", "a string or an array of strings")),
        };
        let tools = match object.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tools)) => tools
                .iter()
                .enumerate()
                .map(|(index, tool)| read_tool(index, tool))
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(wrong_type("tools", "an array of tools")),
        };
        let mut extra = Map::new();
        for (wire, name) in [
            ("frequency_penalty", "frequencyPenalty"),
            ("presence_penalty", "presencePenalty"),
            ("response_format", "responseFormat"),
            ("tool_choice", "toolChoice"),
            ("parallel_tool_calls", "parallelToolCalls"),
        ] {
            match object.get(wire) {
                None | Some(Value::Null) => {}
                Some(value) => {
                    extra.insert(name.to_owned(), value.clone());
                }
            }
        }
        let params = TurnParams {
            temperature: field(&object, "temperature")?,
            max_tokens,
            top_p: field(&object, "top_p")?,
            top_k: field(&object, "top_k")?,
            seed,
            stop,
            tools,
            extra,
        };
        let stream = field::<bool>(&object, "stream")?.unwrap_or(false);
        let include_usage = match object.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => match options.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(include)) => *include,
                Some(_) => return Err(wrong_type("stream_options.include_usage", "a boolean")),
            },
            Some(_) => return Err(wrong_type("stream_options", "an object")),
        };
        Ok(ChatRequest {
            model,
            messages,
            params,
            stream,
            include_usage,
        })
    }

    /// The new prompt: the content of the last message if it is the user's.
    pub fn last_user_message(&self) -> Option<&str> {
        self.messages
            .last()
            .filter(|message| message.role == Role::User)
            .map(|message| message.content.as_str())
    }
}

/// Field `name` of `object` read as a `T`; none when absent or null.
fn field<T: DeserializeOwned>(
    object: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => T::deserialize(value)
            .map(Some)
            .map_err(|err| ApiError::invalid(format!("`{name}`: {err}"), Some(name.to_owned()))),
    }
}

/// Field `name` of `object`, which must be there.
fn required<T: DeserializeOwned>(object: &Map<String, Value>, name: &str) -> Result<T, ApiError> {
    field(object, name)?.ok_or_else(|| missing(name))
}

fn missing(param: &str) -> ApiError {
    ApiError::invalid(format!("`{param}` is required"), Some(param.to_owned()))
}

fn wrong_type(param: &str, expected: &str) -> ApiError {
    ApiError::invalid(
        format!("`{param}` must be {expected}"),
        Some(param.to_owned()),
    )
}

/// Message `index` of `messages`.
fn read_message(index: usize, value: &Value) -> Result<Message, ApiError> {
    let at = format!("messages[{index}]");
    let Value::Object(object) = value else {
        return Err(wrong_type(&at, "an object"));
    };
    let role = match object.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool") => Role::Tool,
        Some(other) => {
            return Err(ApiError::invalid(
                format!(
                    "`{at}.role` `{other}` is not one of system, developer, user, assistant, tool"
                ),
                Some(format!("{at}.role")),
            ))
        }
        None => return Err(missing(&format!("{at}.role"))),
    };
    let content = read_content(&at, object.get("content"), role)?;
    let has_content = content.is_some();
    let mut message = Message::new(role, content.unwrap_or_default());
    match role {
        Role::Assistant => {
            message.tool_calls = match object.get("tool_calls") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(calls)) => calls
                    .iter()
                    .enumerate()
                    .map(|(call, value)| read_tool_call(&format!("{at}.tool_calls[{call}]"), value))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(_) => {
                    return Err(wrong_type(&format!("{at}.tool_calls"), "an array"));
                }
            };
            if !has_content && message.tool_calls.is_empty() {
                return Err(ApiError::invalid(
                    format!(
                        "`{at}.content` is required for an assistant message without `tool_calls`"
                    ),
                    Some(format!("{at}.content")),
                ));
            }
            // As some servers (vLLM, DeepSeek) write an answer's reasoning.
            if let Some(Value::String(reasoning)) = object.get("reasoning_content") {
                message.reasoning = Some(reasoning.clone()).filter(|r| !r.is_empty());
            }
        }
        Role::Tool => {
            let Some(Value::String(id)) = object.get("tool_call_id") else {
                return Err(ApiError::invalid(
                    format!("`{at}.tool_call_id` is required for a tool message (a string)"),
                    Some(format!("{at}.tool_call_id")),
                ));
            };
            message.tool_call_id = Some(id.clone());
        }
        _ => {}
    }
    if !has_content && role != Role::Assistant {
        return Err(missing(&format!("{at}.content")));
    }
    Ok(message)
}

/// A message's `content`: a string, or an array of text parts (joined with
/// newlines). Assistant messages may also have `refusal` parts, taken as
/// text. Image, audio and file parts are refused: the backends take text.
fn read_content(at: &str, value: Option<&Value>, role: Role) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (index, part) in parts.iter().enumerate() {
                let part_at = format!("{at}.content[{index}]");
                let kind = part.get("type").and_then(Value::as_str);
                let field = match kind {
                    Some("text") => "text",
                    Some("refusal") if role == Role::Assistant => "refusal",
                    Some(other) => {
                        return Err(ApiError::invalid(
                            format!(
                                "`{part_at}.type` `{other}` is not supported: this host takes \
                                 text parts only"
                            ),
                            Some(format!("{part_at}.type")),
                        ))
                    }
                    None => return Err(missing(&format!("{part_at}.type"))),
                };
                match part.get(field) {
                    Some(Value::String(text)) => texts.push(text.as_str()),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("`{part_at}.{field}` must be a string"),
                            Some(format!("{part_at}.{field}")),
                        ))
                    }
                }
            }
            Ok(Some(texts.join("\n")))
        }
        Some(_) => Err(wrong_type(
            &format!("{at}.content"),
            "a string or an array of content parts",
        )),
    }
}

/// An assistant message's tool call: `{id, type: "function", function:
/// {name, arguments}}`. Arguments given as a JSON object rather than its
/// text are taken as their text.
fn read_tool_call(at: &str, value: &Value) -> Result<ToolCall, ApiError> {
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    if kind != "function" {
        return Err(ApiError::invalid(
            format!("`{at}.type` `{kind}` is not supported: only function tool calls"),
            Some(format!("{at}.type")),
        ));
    }
    let Some(Value::String(id)) = value.get("id") else {
        return Err(missing(&format!("{at}.id")));
    };
    let Some(function) = value.get("function").filter(|f| f.is_object()) else {
        return Err(missing(&format!("{at}.function")));
    };
    let Some(Value::String(name)) = function.get("name") else {
        return Err(missing(&format!("{at}.function.name")));
    };
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(arguments)) => arguments.clone(),
        Some(other @ Value::Object(_)) => other.to_string(),
        Some(_) => return Err(wrong_type(&format!("{at}.function.arguments"), "a string")),
    };
    Ok(ToolCall {
        id: id.clone(),
        name: name.clone(),
        arguments,
    })
}

/// Tool `index` of `tools`: `{type: "function", function: {name,
/// description?, parameters?}}`.
fn read_tool(index: usize, value: &Value) -> Result<ToolSpec, ApiError> {
    let at = format!("tools[{index}]");
    let kind = value.get("type").and_then(Value::as_str);
    if kind != Some("function") {
        return Err(ApiError::invalid(
            format!(
                "`{at}.type` must be `function` (got {})",
                kind.map_or_else(|| "none".to_owned(), |k| format!("`{k}`"))
            ),
            Some(format!("{at}.type")),
        ));
    }
    let Some(function) = value.get("function").filter(|f| f.is_object()) else {
        return Err(missing(&format!("{at}.function")));
    };
    let Some(Value::String(name)) = function.get("name") else {
        return Err(missing(&format!("{at}.function.name")));
    };
    let description = match function.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(_) => {
            return Err(wrong_type(
                &format!("{at}.function.description"),
                "a string",
            ))
        }
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => Value::Null,
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(_) => {
            return Err(wrong_type(
                &format!("{at}.function.parameters"),
                "an object",
            ))
        }
    };
    Ok(ToolSpec {
        name: name.clone(),
        description,
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use warp::http::StatusCode;

    fn parse(body: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(body.to_string().as_bytes())
    }

    fn refused(body: Value) -> (String, Option<String>) {
        let err = parse(body).expect_err("refused");
        assert_eq!(err.status, StatusCode::BAD_REQUEST, "{err:?}");
        (err.message, err.param)
    }

    #[test]
    fn a_full_request_maps_to_messages_and_params() {
        let request = parse(json!({
            "model": "echo",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "text", "text": "the weather?"}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                {"role": "user", "content": "Thanks", "name": "ann"}
            ],
            "max_tokens": 50,
            "max_completion_tokens": 40,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": "\n\n",
            "seed": 7,
            "tools": [{"type": "function", "function": {
                "name": "weather", "description": "Looks it up.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
            }}],
            "tool_choice": "auto",
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "ignored",
            "n": 1
        }))
        .expect("parses");
        assert_eq!(request.model, "echo");
        assert!(request.stream && request.include_usage);
        assert_eq!(
            request.messages,
            vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "What is\nthe weather?"),
                Message {
                    tool_calls: vec![ToolCall {
                        id: "call_1".into(),
                        name: "weather".into(),
                        arguments: "{\"city\":\"Oslo\"}".into(),
                    }],
                    ..Message::new(Role::Assistant, "")
                },
                Message {
                    tool_call_id: Some("call_1".into()),
                    ..Message::new(Role::Tool, "rain")
                },
                Message::new(Role::User, "Thanks"),
            ]
        );
        assert_eq!(request.last_user_message(), Some("Thanks"));
        let params = &request.params;
        assert_eq!(params.max_tokens, Some(40), "max_completion_tokens wins");
        assert_eq!(params.temperature, Some(0.5));
        assert_eq!(params.top_p, Some(0.9));
        assert_eq!(params.seed, Some(7));
        assert_eq!(params.stop, vec!["\n\n".to_owned()]);
        assert_eq!(params.tools.len(), 1);
        assert_eq!(params.tools[0].name, "weather");
        assert_eq!(params.tools[0].description, "Looks it up.");
        assert_eq!(params.tools[0].parameters["type"], "object");
        assert_eq!(params.extra.get("toolChoice"), Some(&json!("auto")));
        assert!(!params.extra.contains_key("user"));
    }

    #[test]
    fn defaults_are_a_plain_non_streamed_request() {
        let request = parse(json!({
            "model": "echo",
            "messages": [{"role": "user", "content": "hi"}],
            "stop": ["a", "b"],
            "max_tokens": 3,
            "temperature": null
        }))
        .expect("parses");
        assert!(!request.stream && !request.include_usage);
        assert_eq!(request.params.max_tokens, Some(3));
        assert_eq!(request.params.temperature, None);
        assert_eq!(request.params.stop, vec!["a".to_owned(), "b".to_owned()]);
        assert!(request.params.extra.is_empty());
    }

    #[test]
    fn the_last_message_is_a_prompt_only_when_it_is_the_users() {
        let request = parse(json!({
            "model": "echo",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}
            ]
        }))
        .expect("parses");
        assert_eq!(request.last_user_message(), None);
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": user}), "model"),
            (json!({"model": "echo"}), "messages"),
            (json!({"model": "echo", "messages": []}), "messages"),
            (json!({"model": "echo", "messages": "hi"}), "messages"),
            (json!({"model": 3, "messages": user}), "model"),
            (
                json!({"model": "echo", "messages": user, "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "echo", "messages": user, "max_tokens": -1}),
                "max_tokens",
            ),
            (
                json!({"model": "echo", "messages": user, "seed": -1}),
                "seed",
            ),
            (
                json!({"model": "echo", "messages": user, "stop": 3}),
                "stop",
            ),
            (json!({"model": "echo", "messages": user, "n": 2}), "n"),
            (
                json!({"model": "echo", "messages": user, "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "echo", "messages": user, "stream_options": {"include_usage": 1}}),
                "stream_options.include_usage",
            ),
            (
                json!({"model": "echo", "messages": [{"role": "function", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "echo", "messages": [{"content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "echo", "messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "echo", "messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "echo", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
                ]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "echo", "messages": [{"role": "tool", "content": "rain"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"model": "echo", "messages": [{"role": "assistant"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "echo", "messages": [{"role": "assistant", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"arguments": "{}"}}
                ]}]}),
                "messages[0].tool_calls[0].function.name",
            ),
            (
                json!({"model": "echo", "messages": user, "tools": [
                    {"type": "code_interpreter"}
                ]}),
                "tools[0].type",
            ),
            (
                json!({"model": "echo", "messages": user, "tools": [
                    {"type": "function", "function": {"description": "x"}}
                ]}),
                "tools[0].function.name",
            ),
        ];
        for (body, param) in cases {
            let (message, got) = refused(body.clone());
            assert_eq!(got.as_deref(), Some(param), "{body}: {message}");
            assert!(message.contains(param), "{body}: {message}");
        }
        for body in [&b"{"[..], b"[1]", b"", b"null"] {
            let err = ChatRequest::parse(body).expect_err("refused");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.param, None);
        }
    }
}
