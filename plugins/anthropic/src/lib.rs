//! `anthropic`: the Anthropic Messages API, streamed (server-sent events from
//! `message_start` to `message_stop`).
//!
//! Text, thinking (as reasoning) and tool calls (their `input_json_delta`
//! fragments assembled per content block, emitted whole at the block's
//! `content_block_stop`) go to the host as they come; usage and the stop
//! reason close the generation. The system prompt goes in the top-level
//! `system` field; `max_tokens`, which the API requires, defaults to
//! [`DEFAULT_MAX_TOKENS`]. Settings, retries, cancel and error codes are
//! those of [`llm_plugin_http`], documented in `docs/providers.md`.

#![warn(missing_docs)]

mod body;
mod events;

use llm_host_plugin_api::{
    self as api, Kinds, Model, ModelAdapterBox, ModelRequest, Plugin, PluginError, Sink,
};
use llm_plugin_http::{Backend, Framing, ProviderInfo, ProviderSettings};

/// The Messages API.
pub const ANTHROPIC: ProviderInfo = ProviderInfo {
    name: "Anthropic",
    default_base_url: "https://api.anthropic.com",
    default_api_key_env: Some("ANTHROPIC_API_KEY"),
    top_k: true,
    seed: false,
};

/// The API version this plugin speaks (`anthropic-version`).
pub const API_VERSION: &str = "2023-06-01";

/// Tokens asked for when neither the settings nor the turn set `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 1024;

/// A Messages API backend.
#[derive(Debug)]
pub struct Anthropic {
    backend: Backend,
}

impl Anthropic {
    /// A backend from settings.
    pub fn new(settings: ProviderSettings) -> Result<Self, PluginError> {
        Ok(Self {
            backend: Backend::resolve(ANTHROPIC, settings)?,
        })
    }
}

impl Model for Anthropic {
    fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
        let body = body::messages_request(&self.backend, &request);
        let mut headers = vec![("anthropic-version".to_owned(), API_VERSION.to_owned())];
        if let Some(key) = &self.backend.api_key {
            headers.push(("x-api-key".to_owned(), key.expose().to_owned()));
        }
        let http = self
            .backend
            .request("/v1/messages", headers, &body, Framing::Sse);
        let warnings = llm_plugin_http::conversation::turn_warnings(&self.backend, &request);
        let provider = self.backend.provider.name;
        self.backend.stream(http, sink, &warnings, || {
            events::EventHandler::new(provider)
        })
    }
}

/// The plugin.
pub struct AnthropicPlugin;

impl Plugin for AnthropicPlugin {
    const NAME: &'static str = "anthropic";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Anthropic Messages API (Claude models)";
    const KINDS: Kinds = Kinds::MODEL;

    fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
        let settings: ProviderSettings = api::parse_settings(settings)?;
        Ok(api::model_adapter(Anthropic::new(settings)?))
    }
}

api::export_plugin!(AnthropicPlugin);

#[cfg(test)]
mod tests;
