//! A streamed answer's `chat.completion.chunk` server-sent events: the
//! role first, a chunk per piece of output, the finish reason, the usage
//! when the client asked for it (`stream_options.include_usage`), and
//! `data: [DONE]`; or, when the turn fails after its output began, the
//! error object, as OpenAI's API sends one mid-stream.

use bytes::Bytes;
use serde_json::{json, Value};

use super::response::{tool_call_object, usage_object, Answer, Event};
use super::ApiError;

/// Writes a streamed answer's `chat.completion.chunk` events, each a
/// `data: {json}` line and a blank line.
#[derive(Debug, Clone)]
pub struct Chunks {
    /// The completion's id, the same in every chunk.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The backend's name.
    pub model: String,
    /// Whether a usage chunk ends the stream (then every other chunk has
    /// `"usage": null`, as OpenAI's do).
    pub include_usage: bool,
    /// Tool calls sent so far: the next one's `index`.
    tool_calls: usize,
}

/// An event-stream line: `data: ` and the JSON, then a blank line.
pub fn sse(value: &Value) -> Bytes {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"data: ");
    // Writing a `Value` into memory cannot fail.
    let _ = serde_json::to_writer(&mut line, value);
    line.extend_from_slice(b"\n\n");
    Bytes::from(line)
}

/// The event stream's last line.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

impl Chunks {
    /// Chunks of completion `id`.
    pub fn new(id: String, created: u64, model: String, include_usage: bool) -> Self {
        Self {
            id,
            created,
            model,
            include_usage,
            tool_calls: 0,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish,
            }],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        sse(&chunk)
    }

    /// The first chunk: the assistant's role.
    pub fn role(&self) -> Bytes {
        self.chunk(json!({ "role": "assistant", "content": "" }), None)
    }

    /// The chunks for `event`, if it is output.
    pub fn event(&mut self, event: &Event) -> Vec<Bytes> {
        let Event::Delta {
            text,
            reasoning,
            tool_call,
        } = event
        else {
            return Vec::new();
        };
        let mut chunks = Vec::new();
        if let Some(reasoning) = reasoning {
            chunks.push(self.chunk(json!({ "reasoning_content": reasoning }), None));
        }
        if let Some(text) = text {
            chunks.push(self.chunk(json!({ "content": text }), None));
        }
        if let Some(call) = tool_call {
            let mut object = tool_call_object(call);
            object["index"] = self.tool_calls.into();
            self.tool_calls += 1;
            chunks.push(self.chunk(json!({ "tool_calls": [object] }), None));
        }
        chunks
    }

    /// The chunks that end a completed answer: the finish reason, the usage
    /// if asked for, `[DONE]`.
    pub fn finish(&self, answer: &Answer) -> Vec<Bytes> {
        let mut chunks = vec![self.chunk(json!({}), Some(answer.finish_reason()))];
        if self.include_usage {
            chunks.push(sse(&json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_object(answer.usage.unwrap_or_default()),
            })));
        }
        chunks.push(Bytes::from_static(DONE));
        chunks
    }

    /// The event that ends an answer that failed after its output began:
    /// the error object, as OpenAI sends one mid-stream (its clients raise
    /// it). No `[DONE]` follows.
    pub fn error(err: &ApiError) -> Bytes {
        sse(&err.body())
    }
}

#[cfg(test)]
mod tests {
    use super::super::response::tests::{answer_of, text};
    use super::*;
    use llm_host_plugin_api::{ToolCall, Usage};

    fn data(chunk: &Bytes) -> Value {
        let text = std::str::from_utf8(chunk).expect("UTF-8");
        let json = text
            .strip_prefix("data: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .expect("a data line and a blank line");
        serde_json::from_str(json).expect("JSON")
    }

    #[test]
    fn chunks_are_openais_event_stream() {
        let mut chunks = Chunks::new("chatcmpl-1".into(), 7, "echo".into(), true);
        let role = data(&chunks.role());
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(role["usage"], Value::Null);

        let out = chunks.event(&text("hi"));
        assert_eq!(
            data(&out[0])["choices"][0]["delta"],
            json!({"content": "hi"})
        );
        assert!(chunks.event(&Event::Start).is_empty());
        for index in 0..2 {
            let call = Event::Delta {
                text: None,
                reasoning: None,
                tool_call: Some(ToolCall {
                    id: format!("call_{index}"),
                    name: "f".into(),
                    arguments: "{}".into(),
                }),
            };
            let out = chunks.event(&call);
            let delta = &data(&out[0])["choices"][0]["delta"];
            assert_eq!(delta["tool_calls"][0]["index"], index);
            assert_eq!(delta["tool_calls"][0]["function"]["name"], "f");
        }

        let answer = answer_of(&[
            Event::Usage(Usage {
                input_tokens: 1,
                output_tokens: 1,
                total_tokens: 2,
            }),
            Event::End(Some("stop".into())),
            Event::TurnEnd("completed".into()),
        ]);
        let end = chunks.finish(&answer);
        assert_eq!(end.len(), 3);
        assert_eq!(data(&end[0])["choices"][0]["finish_reason"], "stop");
        let usage = data(&end[1]);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 2);
        assert_eq!(&end[2][..], DONE);

        let plain = Chunks::new("chatcmpl-2".into(), 7, "echo".into(), false);
        let end = plain.finish(&answer);
        assert_eq!(end.len(), 2);
        assert!(data(&plain.role()).get("usage").is_none());
    }
}
