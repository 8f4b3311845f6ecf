//! Cutting a streamed response body into frames: server-sent events
//! (`event:`/`data:` lines ended by a blank line) or newline-delimited JSON.
//! Bytes arrive in pieces of any size; a frame is handed on only once whole.
//! A line and an event are bounded ([`MAX_EVENT_BYTES`]): an upstream that
//! never ends one fails the turn instead of growing the host.

use crate::error::ProviderError;
use crate::limits::{frame_too_large, MAX_EVENT_BYTES};

/// How a provider frames its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events (`text/event-stream`), as OpenAI and Anthropic send.
    Sse,
    /// One JSON document per line (`application/x-ndjson`), as Ollama sends.
    Ndjson,
}

/// One whole unit of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A server-sent event: its `event:` name (`message` when it has none)
    /// and its `data:` lines joined with `\n`.
    Event {
        /// The event's name.
        event: String,
        /// The event's data.
        data: String,
    },
    /// One non-empty line of an NDJSON stream.
    Line(String),
}

/// Turns body bytes into [`Frame`]s, holding at most `limit` bytes of the
/// line being received and `limit` bytes of the event being assembled
/// ([`MAX_EVENT_BYTES`] unless a test sets another): a stream that goes past
/// either fails with [`codes::BAD_RESPONSE`](llm_host_plugin_api::codes::BAD_RESPONSE),
/// whatever the sizes of the pieces it comes in.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    /// Names the upstream in messages.
    provider: &'static str,
    limit: usize,
    /// Bytes of the line being received.
    pending: Vec<u8>,
    /// How many bytes at the start of `pending` are known to hold no line
    /// end, so that each byte is looked at once however the line is split.
    scanned: usize,
    /// Whether the byte-order mark at the very start was looked for.
    started: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl Decoder {
    /// A decoder for a stream framed as `framing`, from `provider`.
    pub fn new(framing: Framing, provider: &'static str) -> Self {
        Self::with_limit(framing, provider, MAX_EVENT_BYTES)
    }

    /// A decoder that takes lines and events of at most `limit` bytes.
    pub fn with_limit(framing: Framing, provider: &'static str, limit: usize) -> Self {
        Self {
            framing,
            provider,
            limit,
            pending: Vec::new(),
            scanned: 0,
            started: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
        }
    }

    /// Takes the next bytes of the body and appends the frames they complete
    /// to `out`. After an error the decoder is spent: the stream is dropped.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Frame>) -> Result<(), ProviderError> {
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        self.pending.extend_from_slice(bytes);
        if !self.started {
            if self.pending.len() < BOM.len() && BOM.starts_with(&self.pending) {
                return Ok(()); // maybe the start of a byte-order mark
            }
            self.started = true;
            if self.pending.starts_with(BOM) {
                self.pending.drain(..BOM.len());
            }
        }
        let mut start = 0;
        loop {
            let from = start.max(self.scanned);
            let Some(offset) = self.pending[from..]
                .iter()
                .position(|b| *b == b'\n' || *b == b'\r')
            else {
                self.scanned = self.pending.len();
                break;
            };
            let end = from + offset;
            let terminator = match (self.pending[end], self.pending.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                // A lone CR at the end may be the first half of a CRLF.
                (b'\r', None) => {
                    self.scanned = end;
                    break;
                }
                _ => 1,
            };
            if end - start > self.limit {
                return Err(self.too_large("stream line"));
            }
            let line = std::str::from_utf8(&self.pending[start..end])
                .map_err(|_| ProviderError::bad_response("the stream is not valid UTF-8"))?
                .to_owned();
            self.line(line, out)?;
            start = end + terminator;
        }
        self.pending.drain(..start);
        self.scanned -= start;
        if self.pending.len() > self.limit {
            return Err(self.too_large("stream line"));
        }
        Ok(())
    }

    /// The body ended: appends what the last lines completed. A last line
    /// without its line end counts only when it is whole JSON (NDJSON); a
    /// cut-off line is dropped, so the stream's own end marker is what tells
    /// a complete stream from an interrupted one. An event whose blank line
    /// never came is still handed on.
    pub fn finish(&mut self, out: &mut Vec<Frame>) -> Result<(), ProviderError> {
        let rest = std::mem::take(&mut self.pending);
        self.scanned = 0;
        // A CR held back in case an LF followed ends its line after all.
        let (rest, terminated) = match rest.strip_suffix(b"\r") {
            Some(line) => (line, true),
            None => (rest.as_slice(), false),
        };
        if let Ok(line) = std::str::from_utf8(rest) {
            let whole = terminated
                || (self.framing == Framing::Ndjson
                    && serde_json::from_str::<serde::de::IgnoredAny>(line).is_ok());
            if whole {
                self.line(line.to_owned(), out)?;
            }
        }
        if self.framing == Framing::Sse {
            self.dispatch(out);
        }
        Ok(())
    }

    fn too_large(&self, what: &str) -> ProviderError {
        frame_too_large(self.provider, what, self.limit)
    }

    fn line(&mut self, line: String, out: &mut Vec<Frame>) -> Result<(), ProviderError> {
        match self.framing {
            Framing::Ndjson => {
                if !line.trim().is_empty() {
                    out.push(Frame::Line(line));
                }
                Ok(())
            }
            Framing::Sse => self.sse_line(&line, out),
        }
    }

    fn sse_line(&mut self, line: &str, out: &mut Vec<Frame>) -> Result<(), ProviderError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(()); // a comment, often a keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                let joined = self.data.len() + usize::from(self.has_data) + value.len();
                if joined > self.limit {
                    return Err(self.too_large("stream event"));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // `id`, `retry` and unknown fields mean nothing here
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Frame>) {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push(Frame::Event {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
        });
    }
}

#[cfg(test)]
mod tests;
