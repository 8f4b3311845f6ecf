//! The Messages API request body of a turn.

use llm_host_plugin_api::{Message, ModelRequest, Role, ToolSpec};
use llm_plugin_http::conversation::{arguments_object, system_prompt};
use llm_plugin_http::Backend;
use serde_json::{json, Map, Value};

use crate::DEFAULT_MAX_TOKENS;

/// The body of a streamed Messages request for `request`.
pub fn messages_request(backend: &Backend, request: &ModelRequest) -> Value {
    let params = backend.defaults.with_turn(&request.params);
    let mut body = Map::new();
    body.insert("model".into(), backend.model.clone().into());
    body.insert(
        "max_tokens".into(),
        params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).into(),
    );
    if let Some(system) = system_prompt(backend, &request.messages) {
        body.insert("system".into(), system.into());
    }
    body.insert("messages".into(), messages(&request.messages));
    body.insert("stream".into(), true.into());
    if let Some(t) = params.temperature {
        body.insert("temperature".into(), t.into());
    }
    if let Some(p) = params.top_p {
        body.insert("top_p".into(), p.into());
    }
    if let Some(k) = params.top_k {
        body.insert("top_k".into(), k.into());
    }
    if !params.stop.is_empty() {
        body.insert("stop_sequences".into(), params.stop.into());
    }
    if !request.params.tools.is_empty() {
        let tools = request.params.tools.iter().map(tool).collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    Value::Object(body)
}

/// The conversation as alternating `user`/`assistant` messages of content
/// blocks: tool results travel as `tool_result` blocks of a user message,
/// and neighbours of one role are merged into one message.
fn messages(conversation: &[Message]) -> Value {
    let mut out: Vec<(&str, Vec<Value>)> = Vec::new();
    for message in conversation {
        let (role, blocks) = match message.role {
            Role::User => ("user", text_block(&message.content).into_iter().collect()),
            Role::Assistant => ("assistant", assistant_blocks(message)),
            Role::Tool => (
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id.as_deref().unwrap_or_default(),
                    "content": message.content,
                })],
            ),
            // System text goes in `system`; unknown roles are left out.
            Role::System | Role::Other => continue,
        };
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => out.push((role, blocks)),
        }
    }
    out.into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect()
}

fn text_block(text: &str) -> Option<Value> {
    // The API refuses empty text blocks.
    (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
}

/// An assistant message's text and tool calls. Thinking is not sent back:
/// the API wants it signed, and the conversation keeps no signature.
fn assistant_blocks(message: &Message) -> Vec<Value> {
    let calls = message.tool_calls.iter().map(|call| {
        json!({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments_object(&call.arguments)})
    });
    text_block(&message.content)
        .into_iter()
        .chain(calls)
        .collect()
}

fn tool(spec: &ToolSpec) -> Value {
    let schema = if spec.parameters.is_null() {
        json!({"type": "object", "properties": {}})
    } else {
        spec.parameters.clone()
    };
    let mut tool = json!({"name": spec.name, "input_schema": schema});
    if !spec.description.is_empty() {
        tool["description"] = spec.description.clone().into();
    }
    tool
}
