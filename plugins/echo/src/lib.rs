//! `echo`: a deterministic model for demos, tests and benchmarks.
//!
//! It streams the last user message back word by word (`echo:`, ` Hello,`,
//! ` world`), or `tokens` synthetic tokens, `delay_ms` apart. `fail_after`
//! and `panic_after` inject failures so the host's error paths can be seen.
//! Its turns run in steps on the host's workers (a paced turn sleeps on the
//! host's timer); `threaded` makes the tokens on a thread of its own that
//! wakes the host instead, the pending path of turns in steps.
//! The per-turn `maxTokens` param caps the output (finish reason `length`),
//! and usage counts the words of the whole conversation as input tokens, so
//! history reaching the model shows in the numbers.

mod model;

use llm_host_plugin_api::{self as api, Kinds, ModelAdapterBox, Plugin, PluginError};

pub use model::{Echo, EchoSettings};

/// The plugin.
pub struct EchoPlugin;

impl Plugin for EchoPlugin {
    const NAME: &'static str = "echo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "deterministic streaming model for demos, tests and benchmarks";
    const KINDS: Kinds = Kinds::MODEL;

    fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
        let settings: EchoSettings = api::parse_settings(settings)?;
        Ok(api::stepped_model_adapter(Echo::new(settings)))
    }
}

api::export_plugin!(EchoPlugin);

#[cfg(test)]
mod tests;
