//! Cutting a streamed response body into frames: server-sent events
//! (`event:`/`data:` lines ended by a blank line) or newline-delimited JSON.
//! Bytes arrive in pieces of any size; a frame is handed on only once whole.

use crate::error::ProviderError;

/// Longest line accepted before the stream is called malformed.
const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

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

/// Turns body bytes into [`Frame`]s.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    /// Bytes of the line being received.
    pending: Vec<u8>,
    /// Whether the byte-order mark at the very start was looked for.
    started: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl Decoder {
    /// A decoder for a stream framed as `framing`.
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            pending: Vec::new(),
            started: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
        }
    }

    /// Takes the next bytes of the body and appends the frames they complete
    /// to `out`.
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
        while let Some(offset) = self.pending[start..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
        {
            let end = start + offset;
            let terminator = match (self.pending[end], self.pending.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                // A lone CR at the end may be the first half of a CRLF.
                (b'\r', None) => break,
                _ => 1,
            };
            let line = std::str::from_utf8(&self.pending[start..end])
                .map_err(|_| ProviderError::bad_response("the stream is not valid UTF-8"))?
                .to_owned();
            self.line(line, out);
            start = end + terminator;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_LINE_BYTES {
            return Err(ProviderError::bad_response(format!(
                "the stream has a line longer than {MAX_LINE_BYTES} bytes"
            )));
        }
        Ok(())
    }

    /// The body ended: appends what the last lines completed. A last line
    /// without its line end counts only when it is whole JSON (NDJSON); a
    /// cut-off line is dropped, so the stream's own end marker is what tells
    /// a complete stream from an interrupted one. An event whose blank line
    /// never came is still handed on.
    pub fn finish(&mut self, out: &mut Vec<Frame>) {
        let rest = std::mem::take(&mut self.pending);
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
                self.line(line.to_owned(), out);
            }
        }
        if self.framing == Framing::Sse {
            self.dispatch(out);
        }
    }

    fn line(&mut self, line: String, out: &mut Vec<Frame>) {
        match self.framing {
            Framing::Ndjson => {
                if !line.trim().is_empty() {
                    out.push(Frame::Line(line));
                }
            }
            Framing::Sse => self.sse_line(&line, out),
        }
    }

    fn sse_line(&mut self, line: &str, out: &mut Vec<Frame>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return; // a comment, often a keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // `id`, `retry` and unknown fields mean nothing here
        }
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
mod tests {
    use super::*;

    fn event(event: &str, data: &str) -> Frame {
        Frame::Event {
            event: event.to_owned(),
            data: data.to_owned(),
        }
    }

    fn decode_in_pieces(framing: Framing, body: &[u8], piece: usize) -> Vec<Frame> {
        let mut decoder = Decoder::new(framing);
        let mut out = Vec::new();
        for chunk in body.chunks(piece) {
            decoder.feed(chunk, &mut out).expect("valid stream");
        }
        decoder.finish(&mut out);
        out
    }

    #[test]
    fn sse_events_survive_any_split() {
        let body = "\u{feff}: keep-alive\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\n\
                    data: one\ndata: two\n\nretry: 10\nid: 7\ndata:no-space\n\n\
                    data: é\r\r";
        let want = vec![
            event("message_start", "{\"a\":1}"),
            event("message", "one\ntwo"),
            event("message", "no-space"),
            event("message", "é"),
        ];
        for piece in 1..body.len() {
            assert_eq!(
                decode_in_pieces(Framing::Sse, body.as_bytes(), piece),
                want,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn sse_at_eof_keeps_whole_lines_and_drops_a_cut_one() {
        assert_eq!(
            decode_in_pieces(Framing::Sse, b"data: [DONE]\n", 4),
            vec![event("message", "[DONE]")]
        );
        assert_eq!(
            decode_in_pieces(Framing::Sse, b"data: {\"a\":1}\n\ndata: {\"b\"", 4),
            vec![event("message", "{\"a\":1}")]
        );
    }

    #[test]
    fn ndjson_lines_and_a_whole_last_line() {
        let body = b"{\"a\":1}\n\n{\"b\":2}\r\n{\"c\":3}";
        for piece in 1..body.len() {
            assert_eq!(
                decode_in_pieces(Framing::Ndjson, body, piece),
                vec![
                    Frame::Line("{\"a\":1}".into()),
                    Frame::Line("{\"b\":2}".into()),
                    Frame::Line("{\"c\":3}".into())
                ]
            );
        }
        assert_eq!(
            decode_in_pieces(Framing::Ndjson, b"{\"a\":1}\n{\"b\":", 3),
            vec![Frame::Line("{\"a\":1}".into())]
        );
    }

    #[test]
    fn invalid_utf8_is_a_bad_response() {
        let mut decoder = Decoder::new(Framing::Sse);
        let err = decoder
            .feed(b"data: \xff\xfe\n\n", &mut Vec::new())
            .expect_err("not UTF-8");
        assert_eq!(err.code, llm_host_plugin_api::codes::BAD_RESPONSE);
    }
}
