//! The `/api/chat` stream: one JSON object per line, the last one with
//! `done: true` and the counts; `{"error": ...}` when generation fails.

use llm_host_plugin_api::{codes, FinishReason, ToolCall, Usage};
use llm_plugin_http::{error, Emitter, Frame, Halt, ProviderError, Step, StreamHandler};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Debug, Default)]
struct Line {
    #[serde(default)]
    model: String,
    message: Option<ChatMessage>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
struct ChatMessage {
    content: Option<String>,
    thinking: Option<String>,
    tool_calls: Option<Vec<ApiToolCall>>,
}

#[derive(Deserialize, Debug, Default)]
struct ApiToolCall {
    id: Option<String>,
    function: ApiFunction,
}

#[derive(Deserialize, Debug, Default)]
struct ApiFunction {
    #[serde(default)]
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Turns one `/api/chat` stream into sink events.
#[derive(Debug)]
pub struct LineHandler {
    provider: &'static str,
    calls: usize,
}

impl LineHandler {
    /// A handler for one try; `provider` names the server in messages.
    pub fn new(provider: &'static str) -> Self {
        Self { provider, calls: 0 }
    }

    fn tool_call(&mut self, call: ApiToolCall, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        let arguments = match call.function.arguments {
            Value::Null => "{}".to_owned(),
            Value::String(text) if text.trim().is_empty() => "{}".to_owned(),
            Value::String(text) => text,
            other => other.to_string(),
        };
        let id = call
            .id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("call_{}", self.calls));
        self.calls += 1;
        out.tool_call(&ToolCall {
            id,
            name: call.function.name,
            arguments,
        })
    }

    fn finish(&mut self, line: &Line, out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        let reason = match line.done_reason.as_deref() {
            Some("length") => FinishReason::LENGTH,
            // Ollama says `stop` after calling tools.
            _ if self.calls > 0 => FinishReason::TOOL_CALLS,
            _ => FinishReason::STOP,
        };
        let input = line.prompt_eval_count.unwrap_or(0);
        let output = line.eval_count.unwrap_or(0);
        out.usage(Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: input + output,
        })?;
        out.end(reason);
        Ok(())
    }
}

impl StreamHandler for LineHandler {
    fn frame(&mut self, frame: Frame, out: &mut Emitter<'_, '_>) -> Result<Step, Halt> {
        let Frame::Line(text) = frame else {
            return Ok(Step::Continue);
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|err| ProviderError::malformed(self.provider, &err, &text))?;
        if value.get("error").is_some_and(|e| !e.is_null()) {
            return Err(error::from_stream_error(self.provider, &value).into());
        }
        let mut line: Line = serde_json::from_value(value)
            .map_err(|err| ProviderError::malformed(self.provider, &err, &text))?;
        out.start("", &line.model)?;
        if let Some(message) = line.message.take() {
            out.reasoning(message.thinking.as_deref().unwrap_or_default())?;
            out.text(message.content.as_deref().unwrap_or_default())?;
            for call in message.tool_calls.unwrap_or_default() {
                self.tool_call(call, out)?;
            }
        }
        if line.done {
            self.finish(&line, out)?;
            return Ok(Step::Done);
        }
        Ok(Step::Continue)
    }

    fn eof(&mut self, _out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        Err(ProviderError::new(
            codes::INTERRUPTED,
            format!(
                "the stream from {} ended before its `done: true` line",
                self.provider
            ),
        )
        .into())
    }
}
