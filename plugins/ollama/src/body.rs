//! The `/api/chat` request body of a turn.

use llm_host_plugin_api::{Message, ModelRequest, Role};
use llm_plugin_http::conversation::{arguments_object, function_tool};
use llm_plugin_http::Backend;
use serde_json::{json, Map, Value};

/// The body of a streamed `/api/chat` request for `request`.
pub fn chat_request(backend: &Backend, request: &ModelRequest) -> Value {
    let params = backend.defaults.with_turn(&request.params);
    let mut options = Map::new();
    if let Some(t) = params.temperature {
        options.insert("temperature".into(), t.into());
    }
    if let Some(p) = params.top_p {
        options.insert("top_p".into(), p.into());
    }
    if let Some(k) = params.top_k {
        options.insert("top_k".into(), k.into());
    }
    if let Some(seed) = params.seed {
        options.insert("seed".into(), seed.into());
    }
    if let Some(n) = params.max_tokens {
        options.insert("num_predict".into(), n.into());
    }
    if !params.stop.is_empty() {
        options.insert("stop".into(), params.stop.into());
    }
    let mut body = Map::new();
    body.insert("model".into(), backend.model.clone().into());
    body.insert("messages".into(), messages(backend, &request.messages));
    body.insert("stream".into(), true.into());
    if !request.params.tools.is_empty() {
        let tools = request.params.tools.iter().map(function_tool).collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if !options.is_empty() {
        body.insert("options".into(), Value::Object(options));
    }
    Value::Object(body)
}

fn messages(backend: &Backend, conversation: &[Message]) -> Value {
    let system = backend
        .system
        .iter()
        .map(|text| json!({"role": "system", "content": text}));
    let rest = conversation
        .iter()
        .enumerate()
        .filter_map(|(at, m)| match m.role {
            Role::System => Some(json!({"role": "system", "content": m.content})),
            Role::User => Some(json!({"role": "user", "content": m.content})),
            Role::Assistant => assistant(m),
            Role::Tool => Some(tool_result(m, &conversation[..at])),
            Role::Other => None,
        });
    Value::Array(system.chain(rest).collect())
}

/// An assistant message: its text and its tool calls, whose arguments
/// Ollama takes as an object. Thinking is not sent back.
fn assistant(message: &Message) -> Option<Value> {
    if message.content.is_empty() && message.tool_calls.is_empty() {
        return None;
    }
    let mut out = json!({"role": "assistant", "content": message.content});
    if !message.tool_calls.is_empty() {
        out["tool_calls"] = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({"function": {"name": call.name, "arguments": arguments_object(&call.arguments)}})
            })
            .collect();
    }
    Some(out)
}

/// A tool's result. Ollama matches results to calls by the tool's name,
/// found through the call's id in the nearest assistant message `before`
/// it that made the call: Ollama sends no ids, so the plugin numbers each
/// answer's calls `call_0`, `call_1`, ... and the same id comes back in
/// every round of calls, for whatever tool that round called first.
fn tool_result(message: &Message, before: &[Message]) -> Value {
    let mut out = json!({"role": "tool", "content": message.content});
    let name = message.tool_call_id.as_deref().and_then(|id| {
        before
            .iter()
            .rev()
            .flat_map(|m| &m.tool_calls)
            .find(|call| call.id == id)
            .map(|call| call.name.as_str())
    });
    if let Some(name) = name {
        out["tool_name"] = name.into();
    }
    out
}
