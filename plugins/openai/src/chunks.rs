//! The Chat Completions stream: `chat.completion.chunk` objects, one per
//! `data:` line, then `data: [DONE]`.

use std::collections::HashMap;

use llm_host_plugin_api::{codes, FinishReason, LogLevel, ToolCall, Usage};
use llm_plugin_http::limits::{Held, ITEM_BYTES};
use llm_plugin_http::{error, Emitter, Frame, Halt, ProviderError, Step, StreamHandler};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Debug, Default)]
struct Chunk {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    choices: Option<Vec<Choice>>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize, Debug, Default)]
struct Choice {
    #[serde(default)]
    index: u64,
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize, Debug, Default)]
struct ToolCallDelta {
    index: Option<u64>,
    id: Option<String>,
    function: Option<FunctionDelta>,
}

#[derive(Deserialize, Debug, Default)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
struct ApiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    total_tokens: Option<u64>,
}

/// Tool calls of the first choice, assembled from fragments keyed by their
/// `index`. A fragment with a new id at a known index starts a new call,
/// for servers that number every call 0. What they hold until the choice
/// finishes is bounded ([`Held`]).
#[derive(Debug)]
struct ToolCalls {
    calls: Vec<ToolCall>,
    slots: HashMap<u64, usize>,
    held: Held,
}

impl ToolCalls {
    fn new(provider: &'static str) -> Self {
        Self {
            calls: Vec::new(),
            slots: HashMap::new(),
            held: Held::new(provider),
        }
    }

    fn apply(&mut self, position: usize, delta: ToolCallDelta) -> Result<(), ProviderError> {
        let index = delta.index.unwrap_or(position as u64);
        let id = delta.id.filter(|id| !id.is_empty());
        let known = self.slots.get(&index).copied().filter(|&slot| {
            let have = &self.calls[slot].id;
            id.as_ref().is_none_or(|id| have.is_empty() || have == id)
        });
        let slot = match known {
            Some(slot) => slot,
            None => {
                self.held.add(ITEM_BYTES)?;
                self.calls.push(ToolCall::default());
                self.slots.insert(index, self.calls.len() - 1);
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[slot];
        if let Some(id) = id {
            self.held.add(id.len())?;
            call.id = id;
        }
        if let Some(function) = delta.function {
            if let Some(name) = function.name.filter(|n| !n.is_empty()) {
                if call.name.is_empty() {
                    self.held.add(name.len())?;
                    call.name = name;
                }
            }
            if let Some(arguments) = function.arguments {
                self.held.add(arguments.len())?;
                call.arguments.push_str(&arguments);
            }
        }
        Ok(())
    }

    /// The calls, whole, in the order they began; missing ids and empty
    /// arguments filled in.
    fn take(&mut self) -> Vec<ToolCall> {
        self.slots.clear();
        self.held.clear();
        let mut calls = std::mem::take(&mut self.calls);
        for (n, call) in calls.iter_mut().enumerate() {
            if call.id.is_empty() {
                call.id = format!("call_{n}");
            }
            if call.arguments.trim().is_empty() {
                call.arguments = "{}".to_owned();
            }
        }
        calls
    }
}

/// Turns one Chat Completions stream into sink events.
#[derive(Debug)]
pub struct ChunkHandler {
    provider: &'static str,
    calls: ToolCalls,
    called_tools: bool,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl ChunkHandler {
    /// A handler for one try; `provider` names the server in messages.
    pub fn new(provider: &'static str) -> Self {
        Self {
            provider,
            calls: ToolCalls::new(provider),
            called_tools: false,
            finish: None,
            usage: None,
        }
    }

    fn chunk(&mut self, chunk: Chunk, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        out.start(&chunk.id, &chunk.model)?;
        if let Some(usage) = chunk.usage {
            self.usage = Some(Usage {
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
                total_tokens: usage
                    .total_tokens
                    .unwrap_or(usage.prompt_tokens + usage.completion_tokens),
            });
        }
        // One answer is asked for (n = 1): other choices are not expected.
        for choice in chunk.choices.unwrap_or_default() {
            if choice.index != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                let reasoning = delta
                    .reasoning_content
                    .filter(|r| !r.is_empty())
                    .or(delta.reasoning);
                out.reasoning(reasoning.as_deref().unwrap_or_default())?;
                out.text(delta.content.as_deref().unwrap_or_default())?;
                out.text(delta.refusal.as_deref().unwrap_or_default())?;
                for (position, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate()
                {
                    self.calls.apply(position, call)?;
                }
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finish = Some(reason);
                self.emit_calls(out)?;
            }
        }
        Ok(())
    }

    fn emit_calls(&mut self, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        for call in self.calls.take() {
            self.called_tools = true;
            out.tool_call(&call)?;
        }
        Ok(())
    }

    /// The stream is complete: pending calls, usage, then the end.
    fn complete(&mut self, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        self.emit_calls(out)?;
        let reason = match self.finish.as_deref() {
            Some("length") => FinishReason::LENGTH,
            Some("tool_calls" | "function_call") => FinishReason::TOOL_CALLS,
            Some("content_filter") => {
                out.diagnostic(
                    LogLevel::WARN,
                    &format!("{}'s content filter stopped the answer", self.provider),
                    Some(&serde_json::json!({"finishReason": "content_filter"})),
                )?;
                FinishReason::STOP
            }
            // Some servers say `stop` after calling tools.
            _ if self.called_tools => FinishReason::TOOL_CALLS,
            _ => FinishReason::STOP,
        };
        if let Some(usage) = self.usage {
            out.usage(usage)?;
        }
        out.end(reason);
        Ok(())
    }
}

impl StreamHandler for ChunkHandler {
    fn frame(&mut self, frame: Frame, out: &mut Emitter<'_, '_>) -> Result<Step, Halt> {
        let Frame::Event { event, data } = frame else {
            return Ok(Step::Continue);
        };
        if data.trim() == "[DONE]" {
            self.complete(out)?;
            return Ok(Step::Done);
        }
        let value: Value = serde_json::from_str(&data)
            .map_err(|err| ProviderError::malformed(self.provider, &err, &data))?;
        if value.get("error").is_some_and(|e| !e.is_null()) || event == "error" {
            return Err(error::from_stream_error(self.provider, &value).into());
        }
        let chunk: Chunk = serde_json::from_value(value)
            .map_err(|err| ProviderError::malformed(self.provider, &err, &data))?;
        self.chunk(chunk, out)?;
        Ok(Step::Continue)
    }

    fn eof(&mut self, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        // An answer whose choice finished is whole even if `[DONE]` (and
        // the usage chunk before it) got lost.
        if self.finish.is_some() {
            return self.complete(out);
        }
        Err(ProviderError::new(
            codes::INTERRUPTED,
            format!(
                "the stream from {} ended before `data: [DONE]`",
                self.provider
            ),
        )
        .into())
    }
}
