//! The Chat Completions request body of a turn.

use llm_host_plugin_api::{Message, ModelRequest, Role};
use llm_plugin_http::conversation::function_tool;
use llm_plugin_http::Backend;
use serde_json::{json, Map, Value};

/// The body of a streamed Chat Completions request for `request`; the token
/// limit goes in `max_tokens_field`.
pub fn chat_request(backend: &Backend, request: &ModelRequest, max_tokens_field: &str) -> Value {
    let params = backend.defaults.with_turn(&request.params);
    let mut body = Map::new();
    body.insert("model".into(), backend.model.clone().into());
    body.insert("messages".into(), messages(backend, &request.messages));
    body.insert("stream".into(), true.into());
    body.insert("stream_options".into(), json!({"include_usage": true}));
    if let Some(t) = params.temperature {
        body.insert("temperature".into(), t.into());
    }
    if let Some(p) = params.top_p {
        body.insert("top_p".into(), p.into());
    }
    if let Some(n) = params.max_tokens {
        body.insert(max_tokens_field.into(), n.into());
    }
    if let Some(seed) = params.seed {
        body.insert("seed".into(), seed.into());
    }
    if !params.stop.is_empty() {
        body.insert("stop".into(), params.stop.into());
    }
    if !request.params.tools.is_empty() {
        let tools = request.params.tools.iter().map(function_tool).collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    Value::Object(body)
}

fn messages(backend: &Backend, conversation: &[Message]) -> Value {
    let system = backend
        .system
        .iter()
        .map(|text| json!({"role": "system", "content": text}));
    let rest = conversation.iter().filter_map(|m| match m.role {
        Role::System => Some(json!({"role": "system", "content": m.content})),
        Role::User => Some(json!({"role": "user", "content": m.content})),
        Role::Assistant => assistant(m),
        Role::Tool => Some(json!({
            "role": "tool",
            "tool_call_id": m.tool_call_id.as_deref().unwrap_or_default(),
            "content": m.content,
        })),
        Role::Other => None,
    });
    Value::Array(system.chain(rest).collect())
}

/// An assistant message: its text (null when it only called tools) and its
/// tool calls. Reasoning is not sent back; the API takes none.
fn assistant(message: &Message) -> Option<Value> {
    if message.content.is_empty() && message.tool_calls.is_empty() {
        return None;
    }
    let mut out = json!({"role": "assistant", "content": message.content});
    if !message.tool_calls.is_empty() {
        if message.content.is_empty() {
            out["content"] = Value::Null;
        }
        out["tool_calls"] = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.name,
                        "arguments": if call.arguments.is_empty() { "{}" } else { &call.arguments },
                    },
                })
            })
            .collect();
    }
    Some(out)
}
