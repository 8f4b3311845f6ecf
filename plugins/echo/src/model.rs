//! The echo model itself, shared with the test fixture that plays a newer
//! build of this plugin.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_host_plugin_api::{
    codes, FinishReason, Message, ModelRequest, PluginError, Role, Sink, Step, SteppedModel, Steps,
    ToolCall, Usage, Waker,
};
use serde::Deserialize;

/// The echo backend's settings.
#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EchoSettings {
    /// Stream this many synthetic tokens (`token0 token1 ...`) instead of the prompt.
    pub tokens: Option<u64>,
    /// Pause before each token, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Send an error event after this many tokens.
    pub fail_after: Option<u64>,
    /// Panic after this many tokens.
    pub panic_after: Option<u64>,
    /// Make the tokens on a thread of the plugin's own, which wakes the host
    /// for each (the pending path of turns in steps), instead of on the
    /// host's timer.
    #[serde(default)]
    pub threaded: bool,
    /// Call the tools the request declares, deterministically, instead of
    /// answering at once (see [`Echo`]'s tool calls).
    #[serde(default)]
    pub call_tools: bool,
    /// With `call_tools`: how many rounds of calls a prompt gets before echo
    /// answers (default 1).
    pub tool_rounds: Option<u64>,
}

/// The echo model. Its turns run in steps on the host's workers (see
/// `llm_host_plugin_api::steps`): a paced turn sleeps on the host's timer,
/// not on a thread.
///
/// Tool calls (`call_tools`): when the request declares tools and fewer
/// than `tool_rounds` rounds of calls have been made since the last user
/// message (a round is an assistant message with tool calls), echo calls
/// every declared tool, in order, with arguments `{"prompt": PROMPT}` and
/// ids `call_N_I` (N: the request's message count, I: the tool's index),
/// and finishes with `tool-calls`. Otherwise it answers `echo:` followed by
/// the prompt's words and then the words of every tool result since that
/// user message, so a test sees the results reach the model.
pub struct Echo {
    settings: EchoSettings,
    prefix: &'static str,
}

impl Echo {
    /// An echo model with `settings`, answering `echo: ...`.
    pub fn new(settings: EchoSettings) -> Self {
        Self::with_prefix(settings, "echo:")
    }

    /// An echo model whose answers start with `prefix` instead of `echo:`.
    pub fn with_prefix(settings: EchoSettings, prefix: &'static str) -> Self {
        Self { settings, prefix }
    }

    fn tokens(&self, request: &ModelRequest) -> Tokens {
        let mut tokens = Tokens::default();
        if let Some(count) = self.settings.tokens {
            for i in 0..count {
                let space = if i == 0 { "" } else { " " };
                let _ = write!(tokens.text, "{space}token{i}");
                tokens.ends.push(tokens.text.len());
            }
            return tokens;
        }
        let (prompt, since) = last_prompt(request);
        tokens.text.push_str(self.prefix);
        tokens.ends.push(tokens.text.len());
        let results = since
            .iter()
            .filter(|m| m.role == Role::Tool)
            .map(|m| m.content.as_str());
        for word in std::iter::once(prompt)
            .chain(results)
            .flat_map(str::split_whitespace)
        {
            tokens.text.push(' ');
            tokens.text.push_str(word);
            tokens.ends.push(tokens.text.len());
        }
        tokens
    }

    /// The tool calls this turn makes instead of answering, if any (see
    /// [`Echo`]).
    fn tool_calls(&self, request: &ModelRequest) -> Vec<ToolCall> {
        if !self.settings.call_tools || request.params.tools.is_empty() {
            return Vec::new();
        }
        let (prompt, since) = last_prompt(request);
        let rounds = since
            .iter()
            .filter(|m| m.role == Role::Assistant && !m.tool_calls.is_empty())
            .count() as u64;
        if rounds >= self.settings.tool_rounds.unwrap_or(1) {
            return Vec::new();
        }
        let arguments = llm_host_plugin_api::serde_json::json!({ "prompt": prompt }).to_string();
        let count = request.messages.len();
        request
            .params
            .tools
            .iter()
            .enumerate()
            .map(|(index, tool)| ToolCall {
                id: format!("call_{count}_{index}"),
                name: tool.name.clone(),
                arguments: arguments.clone(),
            })
            .collect()
    }
}

/// The last user message's text, and the messages after it.
fn last_prompt(request: &ModelRequest) -> (&str, &[Message]) {
    let messages = &request.messages;
    match messages.iter().rposition(|m| m.role == Role::User) {
        Some(at) => (messages[at].content.as_str(), &messages[at + 1..]),
        None => ("", &messages[..]),
    }
}

/// A turn's tokens, in one string.
#[derive(Default)]
struct Tokens {
    text: String,
    /// Where each token ends in `text`.
    ends: Vec<usize>,
}

impl Tokens {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, index: usize) -> Option<&str> {
        let end = *self.ends.get(index)?;
        let start = index.checked_sub(1).map_or(0, |before| self.ends[before]);
        self.text.get(start..end)
    }

    fn truncate(&mut self, len: usize) {
        self.ends.truncate(len);
    }
}

/// The words of `text` (what `split_whitespace` counts). ASCII text, the
/// usual case, is counted as word starts (a space followed by a non-space)
/// over each pair of neighbouring bytes, in runs of 255 pairs summed in one
/// byte: a loop the compiler turns into vector instructions, about six
/// times faster than `split_whitespace` (5-6 GB/s here). Long sessions
/// count their whole history every turn, so this is on their path.
fn words(text: &str) -> u64 {
    if !text.is_ascii() {
        return text.split_whitespace().count() as u64;
    }
    fn space(byte: u8) -> bool {
        byte == b' ' || (b'\t'..=b'\r').contains(&byte)
    }
    let bytes = text.as_bytes();
    let Some(first) = bytes.first() else {
        return 0;
    };
    let (before, after) = (&bytes[..bytes.len() - 1], &bytes[1..]);
    let mut starts = 0;
    for (before, after) in before.chunks(255).zip(after.chunks(255)) {
        let run = before.iter().zip(after).fold(0u8, |count, (before, byte)| {
            count.wrapping_add(u8::from(space(*before) & !space(*byte)))
        });
        starts += u64::from(run);
    }
    starts + u64::from(!space(*first))
}

/// Zero-delay tokens emitted per step before the host sends them.
const TOKENS_PER_STEP: usize = 64;

impl SteppedModel for Echo {
    type Turn = EchoTurn;

    fn start(&self, request: ModelRequest, waker: Waker) -> Result<EchoTurn, PluginError> {
        let input_tokens: u64 = request.messages.iter().map(|m| words(&m.content)).sum();
        let calls = self.tool_calls(&request);
        let mut tokens = if calls.is_empty() {
            self.tokens(&request)
        } else {
            Tokens::default()
        };
        let mut reason = if calls.is_empty() {
            FinishReason::STOP
        } else {
            FinishReason::TOOL_CALLS
        };
        if let Some(max) = request.params.max_tokens {
            if (max as usize) < tokens.len() {
                tokens.truncate(max as usize);
                reason = FinishReason::LENGTH;
            }
        }
        let feed = self
            .settings
            .threaded
            .then(|| Feed::start(tokens.len(), self.settings.delay_ms, waker));
        Ok(EchoTurn {
            settings: self.settings.clone(),
            feed,
            tokens,
            calls,
            sent: 0,
            started: false,
            due: None,
            reason,
            input_tokens,
        })
    }
}

/// Tokens made ready by a thread of the plugin's own (`threaded`).
struct Feed {
    /// How many tokens are ready.
    ready: AtomicUsize,
    /// Set when the turn is dropped: the thread stops.
    dropped: AtomicBool,
}

impl Feed {
    /// Starts the thread that makes `count` tokens ready, `delay_ms` apart,
    /// waking the host for each.
    fn start(count: usize, delay_ms: u64, waker: Waker) -> Arc<Feed> {
        let feed = Arc::new(Feed {
            ready: AtomicUsize::new(0),
            dropped: AtomicBool::new(false),
        });
        let shared = feed.clone();
        std::thread::spawn(move || {
            for ready in 1..=count {
                std::thread::sleep(Duration::from_millis(delay_ms));
                if shared.dropped.load(Ordering::Acquire) {
                    return;
                }
                shared.ready.store(ready, Ordering::Release);
                waker.wake();
            }
        });
        feed
    }
}

/// One echo turn in progress: a token per step, `delay_ms` apart by the
/// clock (so pauses do not add up), or all at once without a delay; with
/// `threaded`, the tokens its thread made ready.
pub struct EchoTurn {
    settings: EchoSettings,
    feed: Option<Arc<Feed>>,
    tokens: Tokens,
    /// Tool calls made at the start, before any token.
    calls: Vec<ToolCall>,
    sent: usize,
    started: bool,
    /// When the next token is due (paced turns).
    due: Option<Instant>,
    reason: FinishReason,
    input_tokens: u64,
}

impl Steps for EchoTurn {
    fn step(&mut self, sink: &mut Sink<'_>) -> Result<Step, PluginError> {
        let delay = Duration::from_millis(self.settings.delay_ms);
        if !self.started {
            self.started = true;
            if sink.start("", "echo").is_stop() {
                return Ok(Step::DONE);
            }
            for call in &self.calls {
                if sink.tool_call(call).is_stop() {
                    return Ok(Step::DONE);
                }
            }
        }
        let mut this_step = 0;
        while let Some(token) = self.tokens.get(self.sent) {
            let sent = self.sent as u64;
            if self.settings.fail_after == Some(sent) {
                sink.error(
                    codes::INJECTED,
                    &format!("echo failed after {sent} tokens, as its fail_after setting asks"),
                );
                return Ok(Step::DONE);
            }
            if self.settings.panic_after == Some(sent) {
                panic!("echo panicked after {sent} tokens, as its panic_after setting asks");
            }
            if this_step == TOKENS_PER_STEP {
                return Ok(Step::READY);
            }
            if let Some(feed) = &self.feed {
                if self.sent >= feed.ready.load(Ordering::Acquire) {
                    return Ok(Step::PENDING);
                }
            } else if !delay.is_zero() {
                let now = Instant::now();
                let due = *self.due.get_or_insert(now + delay);
                if due > now {
                    return Ok(Step::sleep(due - now));
                }
                self.due = Some(due + delay);
            }
            if sink.text(token).is_stop() {
                return Ok(Step::DONE);
            }
            self.sent += 1;
            this_step += 1;
        }
        let output_tokens = (self.tokens.len() + self.calls.len()) as u64;
        sink.usage(Usage {
            input_tokens: self.input_tokens,
            output_tokens,
            total_tokens: self.input_tokens + output_tokens,
        });
        sink.end(self.reason);
        Ok(Step::DONE)
    }
}

impl Drop for EchoTurn {
    fn drop(&mut self) {
        if let Some(feed) = &self.feed {
            feed.dropped.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod word_tests {
    use super::words;

    #[test]
    fn words_are_counted_as_split_whitespace_counts_them() {
        for text in [
            "",
            " ",
            "one",
            "  two words ",
            "tab\tand\nnewline\r\nand\x0bvertical\x0cfeed",
            "non-breaking\u{a0}space and é",
            "ideographic\u{3000}space",
        ] {
            assert_eq!(
                words(text),
                text.split_whitespace().count() as u64,
                "{text:?}"
            );
        }
        // Long texts: runs of pairs end at every offset relative to words.
        for gap in 1..8 {
            let text: String = (0..3000)
                .map(|i| format!("w{i}{}", " \t\n".repeat(gap).get(..gap).unwrap_or(" ")))
                .collect();
            for cut in [0, 1, 254, 255, 256, 511, text.len() - 1] {
                let text = &text[cut..];
                assert_eq!(
                    words(text),
                    text.split_whitespace().count() as u64,
                    "{gap} {cut}"
                );
            }
        }
        for text in ["x", " ", "  x"] {
            assert_eq!(
                words(text),
                text.split_whitespace().count() as u64,
                "{text:?}"
            );
        }
    }
}
