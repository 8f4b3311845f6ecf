//! `llama`: local GGUF models through llama.cpp (the `llama-cpp-2` crate).
//!
//! The adapter loads the model file once (memory-mapped) when it is built and
//! shares the weights between its turns. Each running turn gets its own
//! llama.cpp context (KV cache of `n_ctx` tokens); at most `max_parallel`
//! turns generate at once and the others wait in arrival order (a waiting
//! turn that is cancelled leaves the queue at once).
//!
//! A turn formats the session's messages with the model's own chat template
//! (from the GGUF metadata), decodes the prompt, then samples token by token
//! and streams each piece of text as it comes: a character split across
//! tokens is held until complete, and text that may be the start of a stop
//! sequence is held until it is known not to be one (a stop sequence itself
//! is never sent). Per-turn `temperature`, `maxTokens`, `topP`, `topK`, `seed`
//! and `stop` override the settings. The turn ends `stop` at the model's
//! end-of-generation token or a stop sequence, `length` at `max_tokens` or a
//! full context; usage counts the prompt's tokens and the generated tokens.
//! A conversation longer than the context loses its oldest messages (leading
//! system messages are kept) with a `history_truncated` diagnostic.
//!
//! Settings: see [`LlamaSettings`]. `docs/llama.md` in the repository has a
//! config example, how to get a model, and measured speeds.

#![warn(missing_docs)]

mod backend;
mod model;
mod settings;
mod slots;
mod text;

use llm_host_plugin_api::{self as api, Kinds, ModelAdapterBox, Plugin, PluginError};

pub use backend::backend;
pub use model::Llama;
pub use settings::{LlamaSettings, Resolved};
pub use text::{Pushed, StopText, Utf8Stream};

/// The plugin.
pub struct LlamaPlugin;

impl Plugin for LlamaPlugin {
    const NAME: &'static str = "llama";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "local GGUF models through llama.cpp";
    const KINDS: Kinds = Kinds::MODEL;

    fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
        let settings: LlamaSettings = api::parse_settings(settings)?;
        Ok(api::model_adapter(Llama::load(settings)?))
    }
}

api::export_plugin!(LlamaPlugin);

#[cfg(test)]
mod tests;
