//! `template`: a small, complete model plugin, made to be changed into your
//! own.
//!
//! The model answers the last user message back word by word, upper-cased
//! (`transform = "upper"`, the default) or with each word's letters reversed
//! (`transform = "reverse"`). It is deliberately simple, but it does
//! everything a real adapter must do, and each step says why:
//!
//! - settings parsed with [`api::parse_settings`] into a struct with
//!   `deny_unknown_fields`, plus a check of its own that names the bad key;
//! - events in the documented order: `start`, `diagnostic`/`text`/`usage`,
//!   then `end` (or a returned error);
//! - the per-turn params it understands (`maxTokens`, `stop`) honoured, the
//!   ones it does not reported in one diagnostic rather than silently dropped;
//! - every [`Flow`](api::Flow) answer checked, and [`Sink::is_cancelled`]
//!   polled while it waits (its `delay_ms` stands for a slow upstream);
//! - logging through the host with [`api::info!`] and [`api::debug!`].
//!
//! See PLUGIN-GUIDE.md in llm-host's repository for the whole contract, and
//! run the conformance suite against the built library:
//! `llm-host check target/release/libllm_plugin_template.so`.
//!
//! In config.toml:
//!
//! ```toml
//! [models.shout]
//! plugin = "template"
//! settings = { transform = "upper", delay_ms = 20, max_tokens = 64 }
//! ```

use std::thread;
use std::time::{Duration, Instant};

// Import the plugin-api under a short name: its macros (`api::info!`,
// `api::export_plugin!`) and helpers read well that way.
use llm_host_plugin_api::{
    self as api, serde_json::json, FinishReason, Kinds, LogLevel, Model, ModelAdapterBox,
    ModelRequest, Plugin, PluginError, Role, Sink, TurnParams, Usage,
};
use serde::Deserialize;

/// The longest `delay_ms` the settings accept (one minute per word is already
/// absurd; a bigger value is surely a typo).
pub const MAX_DELAY_MS: u64 = 60_000;

/// How often a pause looks at [`Sink::is_cancelled`]: the longest a cancelled
/// turn keeps this adapter's thread busy.
const CANCEL_POLL: Duration = Duration::from_millis(10);

/// What the model does to each word.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// `hello` becomes `HELLO`.
    #[default]
    Upper,
    /// `hello` becomes `olleh`.
    Reverse,
}

impl Transform {
    /// Applies the transform to one word.
    pub fn apply(self, word: &str) -> String {
        match self {
            Transform::Upper => word.to_uppercase(),
            Transform::Reverse => word.chars().rev().collect(),
        }
    }

    /// The name used in settings and in the model id.
    pub fn as_str(self) -> &'static str {
        match self {
            Transform::Upper => "upper",
            Transform::Reverse => "reverse",
        }
    }
}

/// The settings of a `template` backend: the `settings` table of its
/// `[models.NAME]` entry in config.toml, which the host hands over as JSON.
///
/// `deny_unknown_fields` makes a typo (`dela_ms`) an error that names the
/// key, instead of a setting silently ignored. Every field has a default, so
/// `{}` (no `settings` table at all) is valid.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct TemplateSettings {
    /// `"upper"` (default) or `"reverse"`.
    #[serde(default)]
    pub transform: Transform,
    /// Pause before each word, in milliseconds (at most [`MAX_DELAY_MS`]).
    #[serde(default)]
    pub delay_ms: u64,
    /// Most words to answer when the turn's params give no `maxTokens`.
    pub max_tokens: Option<u64>,
}

impl TemplateSettings {
    /// Checks what the types alone cannot. Like `parse_settings`, the error
    /// is [`ErrorKind::INVALID_SETTINGS`](api::ErrorKind::INVALID_SETTINGS)
    /// and names the key, so the operator knows what to fix.
    pub fn validate(&self) -> Result<(), PluginError> {
        if self.delay_ms > MAX_DELAY_MS {
            return Err(PluginError::invalid_settings(format!(
                "delay_ms: {} is more than the {MAX_DELAY_MS} allowed",
                self.delay_ms
            )));
        }
        Ok(())
    }
}

/// The model: one per configured backend. The host may call
/// [`Model::generate`] from several threads at once (one per running turn),
/// so it holds only immutable state; anything mutable would need a `Mutex`.
#[derive(Debug)]
pub struct Template {
    settings: TemplateSettings,
    model_id: String,
}

impl Template {
    /// A model with `settings`, checked.
    pub fn new(settings: TemplateSettings) -> Result<Self, PluginError> {
        settings.validate()?;
        // The answering model's id: the plugin's name and the transform.
        let model_id = format!("{}-{}", TemplatePlugin::NAME, settings.transform.as_str());
        Ok(Self { settings, model_id })
    }

    /// Waits `delay_ms` before a word, the way a real adapter waits on its
    /// upstream. The sink is not called while waiting, so a cancel would only
    /// be seen at the next event; polling [`Sink::is_cancelled`] notices it
    /// within [`CANCEL_POLL`]. Answers whether the turn was cancelled.
    fn pause(&self, sink: &Sink<'_>) -> bool {
        if self.settings.delay_ms == 0 {
            return false;
        }
        let deadline = Instant::now() + Duration::from_millis(self.settings.delay_ms);
        loop {
            if sink.is_cancelled() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            thread::sleep((deadline - now).min(CANCEL_POLL));
        }
    }
}

impl Model for Template {
    fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
        // A request this model cannot serve is a returned error. The host
        // turns it into the turn's `error` event, with the kind's name
        // (`invalid_input`) as its code. Nothing has been sent yet, and
        // nothing needs to be: the host fills in the `start`.
        let prompt = request
            .messages
            .iter()
            .rev()
            .find(|message| message.role == Role::User)
            .ok_or_else(|| PluginError::invalid_input("the request has no user message"))?;

        // Logging goes through the host's logger (`RUST_LOG` filters it);
        // the host tags each line with the plugin's name.
        api::debug!(
            "turn {} of session {}: {} messages",
            request.interaction_id,
            request.session_id,
            request.messages.len()
        );

        // Every sink call answers a `Flow`. On stop (the client cancelled or
        // went away) return at once with `Ok(())`: the host ends the turn as
        // `cancelled` itself. Returning an error here would be wrong.
        if sink.start("", &self.model_id).is_stop() {
            return Ok(());
        }

        // Tell the client about params it sent that this model cannot
        // honour. A diagnostic is not model output: the host attaches it to
        // the turn's `end` (or `error`) event.
        let ignored = ignored_params(&request.params);
        if !ignored.is_empty() {
            let message = format!(
                "the {} model ignores {}",
                TemplatePlugin::NAME,
                ignored.join(", ")
            );
            let data = json!({ "code": "params_ignored", "params": ignored });
            if sink
                .diagnostic(LogLevel::WARN, &message, Some(&data))
                .is_stop()
            {
                return Ok(());
            }
        }

        // Per-turn params override the backend's settings.
        let limit = request.params.max_tokens.or(self.settings.max_tokens);
        let mut stop = StopSequences::new(&request.params.stop);
        let mut reason = FinishReason::STOP;
        let mut output_tokens = 0u64;
        for (index, word) in prompt.content.split_whitespace().enumerate() {
            // This model's "tokens" are words.
            if limit.is_some_and(|limit| output_tokens >= limit) {
                reason = FinishReason::LENGTH;
                break;
            }
            if self.pause(sink) {
                return Ok(());
            }
            let word = self.settings.transform.apply(word);
            let piece = if index == 0 { word } else { format!(" {word}") };
            // A stop sequence ends the answer just before it; the stop
            // sequence itself is not sent.
            let (piece, stopped) = stop.cut(&piece);
            if !piece.is_empty() {
                // Text is borrowed for the call only: the host copies it.
                if sink.text(piece).is_stop() {
                    return Ok(());
                }
                output_tokens += 1;
            }
            if stopped {
                break;
            }
        }

        // Usage: optional, may come more than once (the last one counts).
        // Report it before `end`: nothing after `end` reaches the client.
        let input_tokens: u64 = request
            .messages
            .iter()
            .map(|message| message.content.split_whitespace().count() as u64)
            .sum();
        let usage = Usage {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
        };
        if sink.usage(usage).is_stop() {
            return Ok(());
        }

        // The last event. `end` always answers stop: the turn is over.
        sink.end(reason);
        Ok(())
    }
}

/// The params of `params` this model does not use, by their wire names
/// (`maxTokens` and `stop` are honoured).
fn ignored_params(params: &TurnParams) -> Vec<String> {
    let mut ignored: Vec<String> = [
        ("temperature", params.temperature.is_some()),
        ("topP", params.top_p.is_some()),
        ("topK", params.top_k.is_some()),
        ("seed", params.seed.is_some()),
        ("tools", !params.tools.is_empty()),
    ]
    .into_iter()
    .filter(|(_, present)| *present)
    .map(|(name, _)| name.to_owned())
    .collect();
    // Params this plugin-api does not know by name land in `extra`; an
    // adapter for a provider with vendor-specific params would read them
    // there (`params.extra["vendorThing"]`).
    ignored.extend(params.extra.keys().cloned());
    ignored
}

/// Watches the text sent so far for the turn's stop sequences.
struct StopSequences<'a> {
    sequences: Vec<&'a str>,
    sent: String,
}

impl<'a> StopSequences<'a> {
    fn new(sequences: &'a [String]) -> Self {
        Self {
            // An empty stop sequence would match everywhere: ignore it.
            sequences: sequences
                .iter()
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .collect(),
            sent: String::new(),
        }
    }

    /// The part of `piece` to send, and whether a stop sequence was reached
    /// (the answer ends there). A stop sequence may span pieces; the part of
    /// it already sent cannot be taken back (an adapter that must never show
    /// it would hold back the last few characters).
    fn cut<'p>(&mut self, piece: &'p str) -> (&'p str, bool) {
        if self.sequences.is_empty() {
            return (piece, false);
        }
        let before = self.sent.len();
        let mut text = std::mem::take(&mut self.sent);
        text.push_str(piece);
        let earliest = self
            .sequences
            .iter()
            .filter_map(|sequence| text.find(sequence))
            .min();
        let (kept, stopped) = match earliest {
            Some(at) => (&piece[..at.saturating_sub(before)], true),
            None => (piece, false),
        };
        text.truncate(before + kept.len());
        self.sent = text;
        (kept, stopped)
    }
}

/// The plugin: what it is called, what it provides, how to build it. A unit
/// struct; [`api::export_plugin!`] below turns it into the library's root
/// module, whose every entry point runs under the panic guard.
pub struct TemplatePlugin;

impl Plugin for TemplatePlugin {
    /// The name operators write in config.toml (`plugin = "template"`).
    const NAME: &'static str = "template";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "example model: answers the prompt upper-cased or reversed, word by word";
    const KINDS: Kinds = Kinds::MODEL;

    /// Runs once when the host loads the library, after its logger is in
    /// place. Nothing to set up here; a real plugin might build a shared
    /// HTTP agent. An error refuses the whole library.
    fn init() -> Result<(), PluginError> {
        let host = api::host::host()
            .map(|host| host.host_version().to_string())
            .unwrap_or_else(|| "an unknown host".to_owned());
        api::info!(
            "{} {} loaded by llm-host {host} (built against plugin-api {})",
            Self::NAME,
            Self::VERSION,
            api::API_VERSION
        );
        Ok(())
    }

    /// Builds one backend per `[models.NAME]` entry, and again whenever its
    /// settings change on a reload. An error here refuses that backend (at
    /// start) or the whole reload (while running), with this message shown
    /// to the operator next to the config key.
    fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
        let settings: TemplateSettings = api::parse_settings(settings)?;
        let model = Template::new(settings)?;
        api::info!("new backend {}: {:?}", model.model_id, model.settings);
        Ok(api::model_adapter(model))
    }

    // `new_store` is not overridden: the default answers `unsupported`.
}

api::export_plugin!(TemplatePlugin);

#[cfg(test)]
mod tests;
