//! The echo model itself, shared with the test fixture that plays a newer
//! build of this plugin.

use std::thread;
use std::time::Duration;

use llm_host_plugin_api::{
    codes, FinishReason, Model, ModelRequest, PluginError, Role, Sink, Usage,
};
use serde::Deserialize;

/// The echo backend's settings.
#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EchoSettings {
    /// Stream this many synthetic tokens (`token0 token1 ...`) instead of the prompt.
    pub tokens: Option<u64>,
    /// Pause before each token, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Send an error event after this many tokens.
    pub fail_after: Option<u64>,
    /// Panic after this many tokens.
    pub panic_after: Option<u64>,
}

/// The echo model.
pub struct Echo {
    settings: EchoSettings,
    prefix: &'static str,
}

impl Echo {
    /// An echo model with `settings`, answering `echo: ...`.
    pub fn new(settings: EchoSettings) -> Self {
        Self::with_prefix(settings, "echo:")
    }

    /// An echo model whose answers start with `prefix` instead of `echo:`.
    pub fn with_prefix(settings: EchoSettings, prefix: &'static str) -> Self {
        Self { settings, prefix }
    }

    fn tokens(&self, request: &ModelRequest) -> Vec<String> {
        if let Some(count) = self.settings.tokens {
            return (0..count)
                .map(|i| {
                    if i == 0 {
                        "token0".to_owned()
                    } else {
                        format!(" token{i}")
                    }
                })
                .collect();
        }
        let prompt = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or_default();
        std::iter::once(self.prefix.to_owned())
            .chain(prompt.split_whitespace().map(|word| format!(" {word}")))
            .collect()
    }
}

impl Model for Echo {
    fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
        let input_tokens: u64 = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u64)
            .sum();
        let mut tokens = self.tokens(&request);
        let mut reason = FinishReason::STOP;
        if let Some(max) = request.params.max_tokens {
            if (max as usize) < tokens.len() {
                tokens.truncate(max as usize);
                reason = FinishReason::LENGTH;
            }
        }
        if sink.start("", "echo").is_stop() {
            return Ok(());
        }
        let delay = Duration::from_millis(self.settings.delay_ms);
        for (sent, token) in tokens.iter().enumerate() {
            let sent = sent as u64;
            if self.settings.fail_after == Some(sent) {
                sink.error(
                    codes::INJECTED,
                    &format!("echo failed after {sent} tokens, as its fail_after setting asks"),
                );
                return Ok(());
            }
            if self.settings.panic_after == Some(sent) {
                panic!("echo panicked after {sent} tokens, as its panic_after setting asks");
            }
            if !delay.is_zero() {
                thread::sleep(delay);
            }
            if sink.text(token).is_stop() {
                return Ok(());
            }
        }
        let output_tokens = tokens.len() as u64;
        sink.usage(Usage {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
        });
        sink.end(reason);
        Ok(())
    }
}
