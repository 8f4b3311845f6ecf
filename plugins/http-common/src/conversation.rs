//! Pieces of request bodies that more than one provider's API shares.

use llm_host_plugin_api::{Message, ModelRequest, Role, ToolSpec};
use serde_json::{json, Value};

use crate::Backend;

/// The text of every `system` message of a conversation, after the
/// backend's own system prompt, joined by blank lines; `None` when there is
/// none. For APIs that take the system prompt apart from the messages.
pub fn system_prompt(backend: &Backend, messages: &[Message]) -> Option<String> {
    let parts: Vec<&str> = backend
        .system
        .as_deref()
        .into_iter()
        .chain(
            messages
                .iter()
                .filter(|m| m.role == Role::System)
                .map(|m| m.content.as_str()),
        )
        .filter(|text| !text.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// A tool in the `{"type": "function", "function": {...}}` form that
/// OpenAI's API and Ollama's take.
pub fn function_tool(spec: &ToolSpec) -> Value {
    let mut function = json!({"name": spec.name});
    if !spec.description.is_empty() {
        function["description"] = spec.description.clone().into();
    }
    if !spec.parameters.is_null() {
        function["parameters"] = spec.parameters.clone();
    }
    json!({"type": "function", "function": function})
}

/// A tool call's arguments (JSON text) as the object that APIs taking them
/// as JSON want; `{}` when the text is not a JSON object.
pub fn arguments_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(object)) => Value::Object(object),
        _ => json!({}),
    }
}

/// The warnings a turn gets for what its provider cannot do: parameters it
/// has no place for, and messages of a role this plugin does not know.
pub fn turn_warnings(backend: &Backend, request: &ModelRequest) -> Vec<String> {
    let mut warnings = Vec::new();
    let unsupported = backend.unsupported_params(&request.params);
    if !unsupported.is_empty() {
        warnings.push(format!(
            "{} ignored: the {} API has no such parameter",
            unsupported.join(", "),
            backend.provider.name
        ));
    }
    let unknown = request
        .messages
        .iter()
        .filter(|m| m.role == Role::Other)
        .count();
    if unknown > 0 {
        warnings.push(format!(
            "{unknown} message(s) of an unknown role left out of the conversation"
        ));
    }
    warnings
}
