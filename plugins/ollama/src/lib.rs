//! `ollama`: Ollama's native `/api/chat`, streamed as newline-delimited JSON
//! (one object per line, the last with `done: true`).
//!
//! Text (`message.content`), thinking (`message.thinking`, as reasoning) and
//! tool calls (`message.tool_calls`, whole in Ollama's stream) go to the
//! host as they come; the last object's `done_reason`, `prompt_eval_count`
//! and `eval_count` close the generation. Generation parameters go in
//! `options` (`max_tokens` as `num_predict`). Settings, retries, cancel and
//! error codes are those of [`llm_plugin_http`], documented in
//! `docs/providers.md`.

#![warn(missing_docs)]

mod body;
mod lines;

use llm_host_plugin_api::{
    self as api, Kinds, Model, ModelAdapterBox, ModelRequest, Plugin, PluginError, Sink,
};
use llm_plugin_http::{Backend, Framing, ProviderInfo, ProviderSettings};

/// Ollama's API, on this machine by default. It needs no key; one is sent
/// as a bearer token when `api_key_env` names it (Ollama behind a proxy).
pub const OLLAMA: ProviderInfo = ProviderInfo {
    name: "Ollama",
    default_base_url: "http://127.0.0.1:11434",
    default_api_key_env: None,
    top_k: true,
    seed: true,
};

/// An `/api/chat` backend.
#[derive(Debug)]
pub struct Ollama {
    backend: Backend,
}

impl Ollama {
    /// A backend from settings.
    pub fn new(settings: ProviderSettings) -> Result<Self, PluginError> {
        Ok(Self {
            backend: Backend::resolve(OLLAMA, settings)?,
        })
    }
}

impl Model for Ollama {
    fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
        let body = body::chat_request(&self.backend, &request);
        let auth = self.backend.bearer_auth();
        let http = self
            .backend
            .request("/api/chat", auth, &body, Framing::Ndjson);
        let warnings = llm_plugin_http::conversation::turn_warnings(&self.backend, &request);
        let provider = self.backend.provider.name;
        self.backend
            .stream(http, sink, &warnings, || lines::LineHandler::new(provider))
    }
}

/// The plugin.
pub struct OllamaPlugin;

impl Plugin for OllamaPlugin {
    const NAME: &'static str = "ollama";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Ollama's native /api/chat";
    const KINDS: Kinds = Kinds::MODEL;

    fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
        let settings: ProviderSettings = api::parse_settings(settings)?;
        Ok(api::model_adapter(Ollama::new(settings)?))
    }
}

api::export_plugin!(OllamaPlugin);

#[cfg(test)]
mod tests;
