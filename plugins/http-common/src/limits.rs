//! Bounds on what an upstream can make a provider plugin hold in memory.
//!
//! An upstream controls the size of what it streams. Everything a plugin
//! holds because of it is bounded: the frame being received (one SSE event
//! with all its `data:` lines, or one NDJSON line; see [`crate::framing`])
//! and what a stream handler assembles across frames before emitting it
//! (tool calls sent in fragments; see [`Held`]). Past either bound the turn
//! fails with [`codes::BAD_RESPONSE`] and the connection is closed. The body
//! of an error response is read up to its first 64 KiB only (see
//! [`crate::stream`]).

use llm_host_plugin_api::codes;

use crate::error::ProviderError;

/// The most bytes one stream frame may have: an SSE event's `data:` lines
/// together (with the line being received), or one NDJSON line.
///
/// A frame carries one delta of an answer: a few tokens of text or
/// reasoning, a fragment of a tool call's arguments, or (Anthropic's
/// `content_block_start`, Ollama's lines) a whole tool call. The largest
/// legal one is a whole tool call of a model's longest output: 128k tokens
/// of about 4 bytes, up to 6 bytes each once escaped in JSON, is about 3 MB.
/// 8 MiB is well above that, and keeps what one turn's reader holds to a
/// few such buffers however the upstream frames its stream.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// The most bytes a stream handler holds across frames: the tool calls of a
/// turn while they arrive in fragments, before they are emitted whole. The
/// same reasoning as [`MAX_EVENT_BYTES`] applies: all of it is bounded by
/// the model's output.
pub const MAX_HELD_BYTES: usize = MAX_EVENT_BYTES;

/// What holding one more item (a tool call, a content block) costs beyond
/// its text, counted against [`MAX_HELD_BYTES`] so that many empty items
/// are bounded too.
pub const ITEM_BYTES: usize = 64;

/// `bytes` as `N MiB (bytes)` when a whole number of MiB, for messages.
pub fn describe(bytes: usize) -> String {
    if bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB ({bytes} bytes)", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

/// The error of an upstream frame over `limit` bytes: `what` names it
/// (`stream event`, `stream line`).
pub fn frame_too_large(provider: &str, what: &str, limit: usize) -> ProviderError {
    ProviderError::new(
        codes::BAD_RESPONSE,
        format!(
            "{provider} sent a {what} larger than {}, the most one may have; \
             the stream was dropped",
            describe(limit)
        ),
    )
}

/// The bytes a stream handler holds across frames, bounded by a limit
/// ([`MAX_HELD_BYTES`] unless a test sets another).
#[derive(Debug, Clone)]
pub struct Held {
    provider: &'static str,
    bytes: usize,
    limit: usize,
}

impl Held {
    /// Nothing held yet; `provider` names the upstream in messages.
    pub fn new(provider: &'static str) -> Self {
        Self::with_limit(provider, MAX_HELD_BYTES)
    }

    /// Nothing held yet, with `limit` as the bound.
    pub fn with_limit(provider: &'static str, limit: usize) -> Self {
        Self {
            provider,
            bytes: 0,
            limit,
        }
    }

    /// Counts `bytes` more held; fails with [`codes::BAD_RESPONSE`] once the
    /// total is over the limit.
    pub fn add(&mut self, bytes: usize) -> Result<(), ProviderError> {
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes > self.limit {
            return Err(ProviderError::new(
                codes::BAD_RESPONSE,
                format!(
                    "{} sent more than {} of tool calls before finishing them, the most \
                     a turn may hold; the stream was dropped",
                    self.provider,
                    describe(self.limit)
                ),
            ));
        }
        Ok(())
    }

    /// `bytes` held earlier were let go (emitted or dropped).
    pub fn release(&mut self, bytes: usize) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Everything held was let go.
    pub fn clear(&mut self) {
        self.bytes = 0;
    }

    /// The bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_fail_past_the_limit_and_can_be_released() {
        let mut held = Held::with_limit("P", 100);
        held.add(60).expect("under");
        held.add(40).expect("at the limit");
        let err = held.add(1).expect_err("over");
        assert_eq!(err.code, codes::BAD_RESPONSE);
        assert!(
            err.message.starts_with("P sent more than 100 bytes"),
            "{}",
            err.message
        );
        held.release(50);
        assert_eq!(held.bytes(), 51);
        held.add(49).expect("room again");
        held.clear();
        assert_eq!(held.bytes(), 0);
    }

    #[test]
    fn limits_read_as_mib() {
        assert_eq!(describe(MAX_EVENT_BYTES), "8 MiB (8388608 bytes)");
        assert_eq!(describe(1000), "1000 bytes");
        let err = frame_too_large("OpenAI", "stream event", MAX_EVENT_BYTES);
        assert_eq!(
            err.message,
            "OpenAI sent a stream event larger than 8 MiB (8388608 bytes), the most one may \
             have; the stream was dropped"
        );
    }
}
