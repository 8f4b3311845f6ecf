//! `openai`: OpenAI Chat Completions, streamed (`stream: true`, server-sent
//! events ending in `data: [DONE]`), and every server that speaks it: vLLM,
//! llama.cpp's server, Ollama's `/v1`, LM Studio, OpenRouter. `base_url`
//! picks the server.
//!
//! Text, reasoning (`reasoning_content` or `reasoning`) and tool calls
//! (assembled from their fragments, emitted whole when the choice finishes)
//! go to the host as they come; usage (`stream_options.include_usage`) and
//! the finish reason close the generation. Settings, retries, cancel and
//! error codes are those of [`llm_plugin_http`], documented in
//! `docs/providers.md`.

#![warn(missing_docs)]

mod body;
mod chunks;

use llm_host_plugin_api::{
    self as api, Kinds, Model, ModelAdapterBox, ModelRequest, Plugin, PluginError, Sink,
};
use llm_plugin_http::{Backend, Framing, ProviderInfo, ProviderSettings};

/// OpenAI's own API, as the default `base_url` points to.
pub const OPENAI: ProviderInfo = ProviderInfo {
    name: "OpenAI",
    default_base_url: "https://api.openai.com/v1",
    default_api_key_env: Some("OPENAI_API_KEY"),
    top_k: false,
    seed: true,
};

/// Another server speaking the same API (named so in messages). It may
/// well take `top_k`, but the API has none, so neither does this plugin.
const COMPATIBLE: ProviderInfo = ProviderInfo {
    name: "OpenAI-compatible server",
    ..OPENAI
};

/// A Chat Completions backend.
#[derive(Debug)]
pub struct OpenAi {
    backend: Backend,
    /// OpenAI's own API wants `max_completion_tokens` (its reasoning models
    /// refuse `max_tokens`); other servers know `max_tokens`.
    completion_tokens_field: &'static str,
}

impl OpenAi {
    /// A backend from settings; `base_url` decides whether it is OpenAI's
    /// own API or another server.
    pub fn new(settings: ProviderSettings) -> Result<Self, PluginError> {
        let own_api = settings
            .base_url
            .as_deref()
            .is_none_or(|url| url.trim().trim_end_matches('/') == OPENAI.default_base_url);
        let provider = if own_api { OPENAI } else { COMPATIBLE };
        Ok(Self {
            backend: Backend::resolve(provider, settings)?,
            completion_tokens_field: if own_api {
                "max_completion_tokens"
            } else {
                "max_tokens"
            },
        })
    }
}

impl Model for OpenAi {
    fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
        let body = body::chat_request(&self.backend, &request, self.completion_tokens_field);
        let auth = self.backend.bearer_auth();
        let http = self
            .backend
            .request("/chat/completions", auth, &body, Framing::Sse);
        let warnings = llm_plugin_http::conversation::turn_warnings(&self.backend, &request);
        let provider = self.backend.provider.name;
        self.backend.stream(http, sink, &warnings, || {
            chunks::ChunkHandler::new(provider)
        })
    }
}

/// The plugin.
pub struct OpenAiPlugin;

impl Plugin for OpenAiPlugin {
    const NAME: &'static str = "openai";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "OpenAI Chat Completions and OpenAI-compatible servers (vLLM, llama.cpp, Ollama /v1, LM Studio, OpenRouter)";
    const KINDS: Kinds = Kinds::MODEL;

    fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
        let settings: ProviderSettings = api::parse_settings(settings)?;
        Ok(api::model_adapter(OpenAi::new(settings)?))
    }
}

api::export_plugin!(OpenAiPlugin);

#[cfg(test)]
mod tests;
