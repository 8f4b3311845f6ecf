//! The Messages stream: `message_start`, content blocks (`content_block_start`,
//! `content_block_delta`, `content_block_stop`), `message_delta`,
//! `message_stop`, with `ping` and `error` anywhere.

use std::collections::HashMap;

use llm_host_plugin_api::{codes, FinishReason, LogLevel, ToolCall, Usage};
use llm_plugin_http::limits::{Held, ITEM_BYTES};
use llm_plugin_http::{error, Emitter, Frame, Halt, ProviderError, Step, StreamHandler};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: MessageInfo,
    },
    ContentBlockStart {
        index: u64,
        content_block: Value,
    },
    ContentBlockDelta {
        index: u64,
        delta: Value,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageChange,
        usage: Option<ApiUsage>,
    },
    MessageStop,
    Ping,
    Error,
    /// Event types added to the API later are skipped, as it asks.
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize, Debug, Default)]
struct MessageInfo {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize, Debug, Default)]
struct MessageChange {
    stop_reason: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone, Copy)]
struct ApiUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// A content block being received.
#[derive(Debug)]
enum Block {
    Text,
    Thinking,
    /// A tool call: its id, name, the `input` of its start, and the JSON
    /// text of its `input_json_delta` fragments so far.
    ToolUse {
        id: String,
        name: String,
        input: Value,
        json: String,
    },
    /// Anything this plugin does not pass on (redacted thinking, server
    /// tool results, ...).
    Other,
}

/// Turns one Messages stream into sink events.
#[derive(Debug)]
pub struct EventHandler {
    provider: &'static str,
    /// The open content blocks, each with the bytes counted in `held` for it.
    blocks: HashMap<u64, (Block, usize)>,
    /// What open blocks hold (tool calls until their block stops), bounded.
    held: Held,
    input_tokens: u64,
    output_tokens: u64,
    stop_reason: Option<String>,
}

impl EventHandler {
    /// A handler for one try; `provider` names the API in messages.
    pub fn new(provider: &'static str) -> Self {
        Self {
            provider,
            blocks: HashMap::new(),
            held: Held::new(provider),
            input_tokens: 0,
            output_tokens: 0,
            stop_reason: None,
        }
    }

    fn count(&mut self, usage: ApiUsage) {
        if let Some(input) = usage.input_tokens {
            // Cached prompt tokens are counted apart from `input_tokens`.
            self.input_tokens = input
                + usage.cache_creation_input_tokens.unwrap_or(0)
                + usage.cache_read_input_tokens.unwrap_or(0);
        }
        if let Some(output) = usage.output_tokens {
            self.output_tokens = output;
        }
    }

    /// A block starts; `size` is the bytes of its event, an upper bound of
    /// what holding it takes.
    fn block_start(
        &mut self,
        index: u64,
        block: &Value,
        size: usize,
        out: &mut Emitter<'_, '_>,
    ) -> Result<(), Halt> {
        let text = |key: &str| block.get(key).and_then(Value::as_str).unwrap_or_default();
        let kind = text("type");
        let started = match kind {
            "text" => {
                out.text(text("text"))?;
                Block::Text
            }
            "thinking" => {
                out.reasoning(text("thinking"))?;
                Block::Thinking
            }
            "tool_use" => Block::ToolUse {
                id: text("id").to_owned(),
                name: text("name").to_owned(),
                input: block.get("input").cloned().unwrap_or(Value::Null),
                json: String::new(),
            },
            _ => Block::Other,
        };
        let cost = match started {
            Block::ToolUse { .. } => ITEM_BYTES + size,
            _ => ITEM_BYTES,
        };
        self.held.add(cost)?;
        if let Some((_, replaced)) = self.blocks.insert(index, (started, cost)) {
            self.held.release(replaced);
        }
        Ok(())
    }

    fn block_delta(
        &mut self,
        index: u64,
        delta: &Value,
        out: &mut Emitter<'_, '_>,
    ) -> Result<(), Halt> {
        let Some((block, cost)) = self.blocks.get_mut(&index) else {
            return Err(ProviderError::bad_response(format!(
                "{} sent a delta for content block {index}, which never started",
                self.provider
            ))
            .into());
        };
        let text = |key: &str| delta.get(key).and_then(Value::as_str).unwrap_or_default();
        match (delta.get("type").and_then(Value::as_str), block) {
            (Some("text_delta"), _) => out.text(text("text")),
            (Some("thinking_delta"), _) => out.reasoning(text("thinking")),
            (Some("input_json_delta"), Block::ToolUse { json, .. }) => {
                let partial = text("partial_json");
                self.held.add(partial.len())?;
                *cost += partial.len();
                json.push_str(partial);
                Ok(())
            }
            // Signatures, citations and deltas of blocks not passed on.
            _ => Ok(()),
        }
    }

    fn block_stop(&mut self, index: u64, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        let Some((block, cost)) = self.blocks.remove(&index) else {
            return Ok(());
        };
        self.held.release(cost);
        if let Block::ToolUse {
            id,
            name,
            input,
            json,
        } = block
        {
            let arguments = if !json.trim().is_empty() {
                json
            } else if input.as_object().is_some_and(|o| !o.is_empty()) {
                input.to_string()
            } else {
                "{}".to_owned()
            };
            out.tool_call(&ToolCall {
                id,
                name,
                arguments,
            })?;
        }
        Ok(())
    }

    /// The message is complete: usage, then the end.
    fn complete(&mut self, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        let reason = match self.stop_reason.as_deref() {
            Some("max_tokens" | "model_context_window_exceeded") => FinishReason::LENGTH,
            Some("tool_use") => FinishReason::TOOL_CALLS,
            Some("refusal") => {
                out.diagnostic(
                    LogLevel::WARN,
                    "the model declined to answer (stop reason `refusal`)",
                    Some(&serde_json::json!({"stopReason": "refusal"})),
                )?;
                FinishReason::STOP
            }
            _ => FinishReason::STOP,
        };
        out.usage(Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            total_tokens: self.input_tokens + self.output_tokens,
        })?;
        out.end(reason);
        Ok(())
    }
}

impl StreamHandler for EventHandler {
    fn frame(&mut self, frame: Frame, out: &mut Emitter<'_, '_>) -> Result<Step, Halt> {
        let Frame::Event { event: name, data } = frame else {
            return Ok(Step::Continue);
        };
        let mut value: Value = serde_json::from_str(&data)
            .map_err(|err| ProviderError::malformed(self.provider, &err, &data))?;
        if value.get("type").is_none() {
            if let Value::Object(fields) = &mut value {
                fields.insert("type".into(), name.into());
            }
        }
        if value.get("type").and_then(Value::as_str) == Some("error") {
            return Err(error::from_stream_error(self.provider, &value).into());
        }
        let event: Event = serde_json::from_value(value)
            .map_err(|err| ProviderError::malformed(self.provider, &err, &data))?;
        match event {
            Event::MessageStart { message } => {
                if let Some(usage) = message.usage {
                    self.count(usage);
                }
                out.start(&message.id, &message.model)?;
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => self.block_start(index, &content_block, data.len(), out)?,
            Event::ContentBlockDelta { index, delta } => self.block_delta(index, &delta, out)?,
            Event::ContentBlockStop { index } => self.block_stop(index, out)?,
            Event::MessageDelta { delta, usage } => {
                if let Some(usage) = usage {
                    self.count(usage);
                }
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
            }
            Event::MessageStop => {
                self.complete(out)?;
                return Ok(Step::Done);
            }
            Event::Ping | Event::Error | Event::Unknown => {}
        }
        Ok(Step::Continue)
    }

    fn eof(&mut self, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        // A message with its stop reason is whole even if `message_stop`
        // got lost; open tool blocks are not.
        if self.stop_reason.is_some() && self.blocks.is_empty() {
            return self.complete(out);
        }
        Err(ProviderError::new(
            codes::INTERRUPTED,
            format!(
                "the stream from {} ended before `message_stop`",
                self.provider
            ),
        )
        .into())
    }
}
