//! The llama model adapter: weights loaded once, one context per running turn.

use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llm_host_plugin_api::{
    self as api, FinishReason, LogLevel, Message, Model, ModelRequest, PluginError, Role, Sink,
    Usage,
};

use crate::backend::backend;
use crate::settings::{LlamaSettings, Resolved};
use crate::slots::Slots;
use crate::text::{Pushed, StopText, Utf8Stream};

/// Prompt tokens decoded per `llama_decode` call; a cancel is noticed between
/// two such chunks.
const PROMPT_CHUNK: usize = 256;

/// llama.cpp's "draw a random seed" value.
const RANDOM_SEED: u32 = u32::MAX;

/// A GGUF model served through llama.cpp.
pub struct Llama {
    settings: LlamaSettings,
    path: PathBuf,
    model_id: String,
    backend: &'static LlamaBackend,
    model: LlamaModel,
    template: LlamaChatTemplate,
    slots: Slots,
    /// llama.cpp's context constructor may write to the model (see
    /// `LlamaModel::new_context`): never run two at once.
    new_context: Mutex<()>,
}

impl Llama {
    /// Loads the model file named by `settings` (relative paths are resolved
    /// with [`api::host::resolve_path`]). A missing, unreadable or invalid file
    /// is an `invalid_settings` error naming the path.
    pub fn load(settings: LlamaSettings) -> Result<Self, PluginError> {
        settings.validate()?;
        let path = api::host::resolve_path(&settings.model_path);
        check_model_file(&path)?;
        let backend = backend()?;
        let started = Instant::now();
        let model = LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default())
            .map_err(|err| {
                PluginError::invalid_settings(format!(
                    "model_path: llama.cpp could not load {} ({err}; its reason is in the log)",
                    path.display()
                ))
            })?;
        let template = chat_template(&model, &settings, &path)?;
        let model_id = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| "llama".to_owned());
        if settings.n_ctx > model.n_ctx_train() {
            api::warn!(
                "n_ctx {} is larger than the {} tokens {} was trained on; answers may degrade",
                settings.n_ctx,
                model.n_ctx_train(),
                path.display()
            );
        }
        api::info!(
            "loaded {} ({} MB, {} parameters) in {} ms",
            path.display(),
            model.size() / 1_000_000,
            model.n_params(),
            started.elapsed().as_millis()
        );
        Ok(Self {
            slots: Slots::new(settings.max_parallel),
            settings,
            path,
            model_id,
            backend,
            model,
            template,
            new_context: Mutex::new(()),
        })
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &LlamaSettings {
        &self.settings
    }

    /// The model file it serves.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The prompt for `messages` in the model's chat template, ending with the
    /// assistant's turn opening.
    pub fn format_prompt(&self, messages: &[Message]) -> Result<String, PluginError> {
        let chat = messages
            .iter()
            .map(|message| {
                LlamaChatMessage::new(
                    role_name(message.role).to_owned(),
                    message.content.replace('\0', ""),
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| PluginError::invalid_input(format!("a message: {err}")))?;
        self.model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|err| PluginError::internal(format!("applying the chat template: {err}")))
    }

    /// The prompt's tokens. When the whole conversation does not fit the
    /// context (with room for at least one answer token), the fewest oldest
    /// messages after any leading system messages are left out (the last
    /// message always stays); answers the tokens and how many were left out.
    fn prompt_tokens(&self, messages: &[Message]) -> Result<(Vec<LlamaToken>, usize), PluginError> {
        let n_ctx = self.settings.n_ctx as usize;
        let system = messages
            .iter()
            .take_while(|message| message.role == Role::System)
            .count();
        // The prompt without the `dropped` oldest messages after the system ones.
        let tokens_without = |dropped: usize| -> Result<Vec<LlamaToken>, PluginError> {
            let kept: Vec<Message> = messages[..system]
                .iter()
                .chain(&messages[system + dropped..])
                .cloned()
                .collect();
            let tokens = tokenize(&self.model, &self.format_prompt(&kept)?)?;
            if tokens.is_empty() {
                return Err(PluginError::internal(
                    "the chat template made an empty prompt",
                ));
            }
            Ok(tokens)
        };
        let all = tokens_without(0)?;
        if all.len() < n_ctx {
            return Ok((all, 0));
        }
        // Leaving messages out only shortens the prompt: binary search for
        // the fewest to leave out (a long session would otherwise be
        // templated and tokenised once per message).
        let most = messages.len().saturating_sub(system + 1);
        let shortest = tokens_without(most)?;
        if most == 0 || shortest.len() >= n_ctx {
            return Err(PluginError::invalid_input(format!(
                "the prompt is {} tokens, more than this backend's context of {n_ctx} \
                 (setting n_ctx) can hold",
                shortest.len()
            )));
        }
        // Invariant: leaving out `fits` messages fits, leaving out `low` does not.
        let (mut low, mut fits, mut best) = (0, most, shortest);
        while fits - low > 1 {
            let mid = low + (fits - low) / 2;
            let tokens = tokens_without(mid)?;
            if tokens.len() < n_ctx {
                (fits, best) = (mid, tokens);
            } else {
                low = mid;
            }
        }
        Ok((best, fits))
    }

    fn new_context(&self) -> Result<LlamaContext<'_>, PluginError> {
        let threads = i32::try_from(self.settings.threads).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.settings.n_ctx))
            .with_n_batch(PROMPT_CHUNK as u32)
            .with_n_ubatch(PROMPT_CHUNK as u32)
            .with_n_seq_max(1)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let _one_at_a_time = self
            .new_context
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.model
            .new_context(self.backend, params)
            .map_err(|err| PluginError::internal(format!("creating a llama.cpp context: {err}")))
    }

    fn sampler(params: &Resolved) -> LlamaSampler {
        if params.temperature <= 0.0 {
            return LlamaSampler::greedy();
        }
        LlamaSampler::chain_simple([
            LlamaSampler::top_k(params.top_k),
            LlamaSampler::top_p(params.top_p, 1),
            LlamaSampler::temp(params.temperature),
            LlamaSampler::dist(params.seed.unwrap_or(RANDOM_SEED)),
        ])
    }
}

/// What a missing, unreadable or non-GGUF model file is reported as.
fn check_model_file(path: &Path) -> Result<(), PluginError> {
    let bad = |why: String| {
        Err(PluginError::invalid_settings(format!(
            "model_path: {}: {why}",
            path.display()
        )))
    };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return bad("no such file (scripts/fetch-model.sh fetches the test model)".into())
        }
        Err(err) => return bad(format!("cannot be read: {err}")),
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return bad("is not a file".into()),
        Err(err) => return bad(format!("cannot be read: {err}")),
    }
    let mut magic = [0u8; 4];
    if let Err(err) = file.read_exact(&mut magic) {
        return bad(format!("cannot be read as a GGUF file: {err}"));
    }
    if &magic != b"GGUF" {
        return bad("is not a GGUF file (it does not start with `GGUF`)".into());
    }
    if path.to_str().is_none() {
        return bad("llama.cpp needs a UTF-8 path".into());
    }
    Ok(())
}

/// The model's own chat template, or the one the settings name; checked once
/// here so that a template llama.cpp does not know fails the adapter, not
/// every turn.
fn chat_template(
    model: &LlamaModel,
    settings: &LlamaSettings,
    path: &Path,
) -> Result<LlamaChatTemplate, PluginError> {
    let template = match &settings.chat_template {
        Some(named) => LlamaChatTemplate::new(named)
            .map_err(|err| PluginError::invalid_settings(format!("chat_template: {err}")))?,
        None => match model.chat_template(None) {
            Ok(template) => template,
            Err(err) => {
                api::warn!(
                    "{} has no usable chat template ({err}); using chatml \
                     (set chat_template to choose another)",
                    path.display()
                );
                LlamaChatTemplate::new("chatml").map_err(|err| {
                    PluginError::internal(format!("the chatml template name: {err}"))
                })?
            }
        },
    };
    let probe = LlamaChatMessage::new("user".to_owned(), "hello".to_owned())
        .map_err(|err| PluginError::internal(format!("a probe message: {err}")))?;
    if let Err(err) = model.apply_chat_template(&template, &[probe], true) {
        let whose = match &settings.chat_template {
            Some(_) => "chat_template: llama.cpp does not know this template".to_owned(),
            None => format!(
                "model_path: llama.cpp does not know the chat template of {}; set \
                 chat_template to a template name llama.cpp knows, such as \"chatml\"",
                path.display()
            ),
        };
        return Err(PluginError::invalid_settings(format!("{whose} ({err})")));
    }
    Ok(template)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
        Role::User | Role::Other => "user",
    }
}

/// Tokenises a chat-templated prompt: special tokens (`<|im_start|>`) are
/// parsed, and a BOS is added if the model wants one.
fn tokenize(model: &LlamaModel, prompt: &str) -> Result<Vec<LlamaToken>, PluginError> {
    // llama.cpp counts bytes and tokens in i32.
    if prompt.len() >= i32::MAX as usize / 2 {
        return Err(PluginError::invalid_input("the prompt is too large"));
    }
    Ok(model.vocab().tokenize(prompt.as_bytes(), true, true))
}

/// How a generation loop ended.
enum Outcome {
    /// Normally: report usage and this reason.
    Finished(FinishReason),
    /// The sink said stop: return at once.
    Cancelled,
}

impl Model for Llama {
    fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
        let params = Resolved::new(&self.settings, &request.params)?;
        if sink.start("", &self.model_id).is_stop() {
            return Ok(());
        }
        if !request.params.tools.is_empty()
            && sink
                .diagnostic(
                    LogLevel::WARN,
                    "the llama backend does not call tools; the tools sent were ignored",
                    None,
                )
                .is_stop()
        {
            return Ok(());
        }
        let (tokens, dropped) = self.prompt_tokens(&request.messages)?;
        if dropped > 0 {
            let data = api::serde_json::json!({"code": "history_truncated", "dropped": dropped});
            let message = format!(
                "the conversation does not fit the context of {} tokens: the {dropped} oldest \
                 messages were left out",
                self.settings.n_ctx
            );
            if sink
                .diagnostic(LogLevel::WARN, &message, Some(&data))
                .is_stop()
            {
                return Ok(());
            }
        }
        if self.slots.would_wait() {
            api::debug!(
                "turn {} waits for a slot (max_parallel {})",
                request.interaction_id,
                self.settings.max_parallel
            );
        }
        let Some(_slot) = self.slots.acquire(|| sink.is_cancelled()) else {
            return Ok(());
        };
        let mut ctx = self.new_context()?;
        let (outcome, generated) = self.run(&mut ctx, &tokens, &params, sink)?;
        drop(ctx);
        match outcome {
            Outcome::Cancelled => Ok(()),
            Outcome::Finished(reason) => {
                let input_tokens = tokens.len() as u64;
                if sink
                    .usage(Usage {
                        input_tokens,
                        output_tokens: generated,
                        total_tokens: input_tokens + generated,
                    })
                    .is_stop()
                {
                    return Ok(());
                }
                sink.end(reason);
                Ok(())
            }
        }
    }
}

impl Llama {
    /// Decodes the prompt, then samples, streams and decodes token by token.
    /// Answers how it ended and how many tokens were generated.
    fn run(
        &self,
        ctx: &mut LlamaContext<'_>,
        tokens: &[LlamaToken],
        params: &Resolved,
        sink: &mut Sink<'_>,
    ) -> Result<(Outcome, u64), PluginError> {
        let n_ctx = self.settings.n_ctx as usize;
        let decode_failed = |err: llama_cpp_2::DecodeError| {
            PluginError::internal(format!("llama.cpp decode: {err}"))
        };
        let batch_failed =
            |err: llama_cpp_2::llama_batch::BatchAddError| PluginError::internal(err.to_string());

        let mut batch = LlamaBatch::new(PROMPT_CHUNK, 1);
        let mut position: i32 = 0;
        let last = tokens.len().saturating_sub(1);
        for (index, chunk) in tokens.chunks(PROMPT_CHUNK).enumerate() {
            if sink.is_cancelled() {
                return Ok((Outcome::Cancelled, 0));
            }
            batch.clear();
            for (offset, &token) in chunk.iter().enumerate() {
                let is_last = index * PROMPT_CHUNK + offset == last;
                batch
                    .add(token, position, &[0], is_last)
                    .map_err(batch_failed)?;
                position += 1;
            }
            ctx.decode(&mut batch).map_err(decode_failed)?;
        }

        let vocab = self.model.vocab();
        let mut sampler = Self::sampler(params);
        let mut utf8 = Utf8Stream::new();
        let mut stops = StopText::new(&params.stop);
        let mut piece = Vec::with_capacity(16);
        let mut text = String::with_capacity(16);
        let mut logits_at = batch.n_tokens() - 1;
        let mut generated: u64 = 0;
        let reason = loop {
            if generated >= params.max_tokens {
                break FinishReason::LENGTH;
            }
            let token = sampler.sample(ctx, logits_at);
            if vocab.is_eog(token) {
                break FinishReason::STOP;
            }
            generated += 1;
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            text.clear();
            utf8.push(&piece, &mut text);
            let (emit, stopped) = match stops.push(&text) {
                Pushed::Text(emit) => (emit, false),
                Pushed::Stopped(emit) => (emit, true),
            };
            if !emit.is_empty() && sink.text(&emit).is_stop() {
                return Ok((Outcome::Cancelled, generated));
            }
            if stopped {
                return Ok((Outcome::Finished(FinishReason::STOP), generated));
            }
            if position as usize >= n_ctx {
                // The context is full: nothing more can be decoded.
                break FinishReason::LENGTH;
            }
            if generated >= params.max_tokens {
                break FinishReason::LENGTH;
            }
            batch.clear();
            batch
                .add(token, position, &[0], true)
                .map_err(batch_failed)?;
            position += 1;
            ctx.decode(&mut batch).map_err(decode_failed)?;
            logits_at = 0;
        };
        // Whatever is still held back: an unfinished character, the start of
        // a stop sequence that never completed.
        text.clear();
        utf8.finish(&mut text);
        let (mut rest, reason) = match stops.push(&text) {
            Pushed::Text(emit) => (emit, reason),
            Pushed::Stopped(emit) => (emit, FinishReason::STOP),
        };
        rest.push_str(&stops.finish());
        if !rest.is_empty() && sink.text(&rest).is_stop() {
            return Ok((Outcome::Cancelled, generated));
        }
        Ok((Outcome::Finished(reason), generated))
    }
}
