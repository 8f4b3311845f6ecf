//! The llama backend's settings and the per-turn parameters resolved against them.

use llm_host_plugin_api::{PluginError, TurnParams};
use serde::Deserialize;

/// The llama backend's settings (`[models.NAME.settings]` in config.toml).
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LlamaSettings {
    /// The GGUF model file. A relative path is taken from the directory of the
    /// host's config file.
    pub model_path: String,
    /// Context size in tokens: prompt and answer together must fit in it.
    #[serde(default = "default_n_ctx")]
    pub n_ctx: u32,
    /// CPU threads each running turn uses.
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// Most tokens to generate per turn, unless the turn's `maxTokens` says otherwise.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// Sampling temperature; `0` picks the most likely token every time (greedy).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up
    /// to this (`1` turns it off).
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Keep only this many most likely tokens (`0` turns it off).
    #[serde(default = "default_top_k")]
    pub top_k: u64,
    /// Sampling seed (taken modulo 2^32). Absent: a fresh random seed per turn.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Turns generating at once on this backend; more wait in arrival order.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: usize,
    /// A chat template to use instead of the model's own: the name of one
    /// llama.cpp knows (`"chatml"`, `"llama3"`, ...) or a template text it
    /// recognises. Only needed for models whose own template llama.cpp does not
    /// recognise, or that have none.
    #[serde(default)]
    pub chat_template: Option<String>,
}

fn default_n_ctx() -> u32 {
    2048
}
fn default_threads() -> u32 {
    2
}
fn default_max_tokens() -> u64 {
    256
}
fn default_temperature() -> f64 {
    0.8
}
fn default_top_p() -> f64 {
    0.95
}
fn default_top_k() -> u64 {
    40
}
fn default_max_parallel() -> usize {
    1
}

/// Smallest context accepted: a chat template alone takes a dozen tokens.
pub const MIN_N_CTX: u32 = 64;
/// Largest context accepted (llama.cpp counts positions in i32).
pub const MAX_N_CTX: u32 = 1 << 24;
/// Largest thread count accepted.
pub const MAX_THREADS: u32 = 256;

impl LlamaSettings {
    /// Settings for `model_path` with every other value at its default.
    pub fn new(model_path: impl Into<String>) -> Self {
        Self {
            model_path: model_path.into(),
            n_ctx: default_n_ctx(),
            threads: default_threads(),
            max_tokens: default_max_tokens(),
            temperature: default_temperature(),
            top_p: default_top_p(),
            top_k: default_top_k(),
            seed: None,
            max_parallel: default_max_parallel(),
            chat_template: None,
        }
    }

    /// Checks the values serde cannot, naming the key of the first bad one.
    pub fn validate(&self) -> Result<(), PluginError> {
        let bad =
            |key: &str, why: String| Err(PluginError::invalid_settings(format!("{key}: {why}")));
        if self.model_path.trim().is_empty() {
            return bad("model_path", "must name a GGUF file".into());
        }
        if !(MIN_N_CTX..=MAX_N_CTX).contains(&self.n_ctx) {
            return bad(
                "n_ctx",
                format!("{} is not in {MIN_N_CTX}..={MAX_N_CTX}", self.n_ctx),
            );
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return bad(
                "threads",
                format!("{} is not in 1..={MAX_THREADS}", self.threads),
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if let Err(why) = check_temperature(self.temperature) {
            return bad("temperature", why);
        }
        if let Err(why) = check_top_p(self.top_p) {
            return bad("top_p", why);
        }
        if self.max_parallel == 0 {
            return bad("max_parallel", "must be at least 1".into());
        }
        if let Some(template) = &self.chat_template {
            if template.trim().is_empty() || template.contains('\0') {
                return bad("chat_template", "must be a template name or text".into());
            }
        }
        Ok(())
    }
}

fn check_temperature(value: f64) -> Result<(), String> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(format!("{value} is not a number >= 0"))
    }
}

fn check_top_p(value: f64) -> Result<(), String> {
    if value.is_finite() && value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(format!("{value} is not in (0, 1]"))
    }
}

/// The sampling and limits of one turn: the settings, overridden by the turn's params.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Most tokens to generate.
    pub max_tokens: u64,
    /// Temperature; `<= 0` means greedy.
    pub temperature: f32,
    /// Nucleus sampling threshold.
    pub top_p: f32,
    /// Top-k; `0` is off.
    pub top_k: i32,
    /// Seed for the sampler; `None` draws one.
    pub seed: Option<u32>,
    /// Stop sequences (empty ones dropped).
    pub stop: Vec<String>,
}

impl Resolved {
    /// Resolves `params` against `settings`; an invalid param is the turn's
    /// error, naming it.
    pub fn new(settings: &LlamaSettings, params: &TurnParams) -> Result<Self, PluginError> {
        let bad = |key: &str, why: String| Err(PluginError::invalid_input(format!("{key}: {why}")));
        let temperature = params.temperature.unwrap_or(settings.temperature);
        if let Err(why) = check_temperature(temperature) {
            return bad("temperature", why);
        }
        let top_p = params.top_p.unwrap_or(settings.top_p);
        if let Err(why) = check_top_p(top_p) {
            return bad("topP", why);
        }
        let top_k = params.top_k.unwrap_or(settings.top_k);
        Ok(Self {
            max_tokens: params.max_tokens.unwrap_or(settings.max_tokens),
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: i32::try_from(top_k).unwrap_or(i32::MAX),
            // llama.cpp seeds are 32-bit: keep the low bits.
            seed: params.seed.or(settings.seed).map(|seed| seed as u32),
            stop: params
                .stop
                .iter()
                .filter(|stop| !stop.is_empty())
                .cloned()
                .collect(),
        })
    }
}
