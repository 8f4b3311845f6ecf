//! What the chat writes to the terminal: the answer streamed on stdout as
//! its deltas arrive, reasoning after a dimmed `thinking:` mark, tool calls
//! on a line of their own, the turn's usage dimmed after it, errors and
//! warnings on stderr (red, yellow), and the chat's own notes on stderr,
//! dimmed.
//!
//! A stream gets ANSI escapes only when it is a terminal and `NO_COLOR` is
//! unset or empty (no-color.org).

use std::io::{IsTerminal, Write};

use super::frames::{Event, Usage};

const RESET: &str = "\x1b[0m";

/// How a piece of text is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tone {
    Plain,
    Dim,
    Red,
    Yellow,
}

impl Tone {
    fn escape(self) -> &'static str {
        match self {
            Tone::Plain => "",
            Tone::Dim => "\x1b[2m",
            Tone::Red => "\x1b[31m",
            Tone::Yellow => "\x1b[33m",
        }
    }
}

/// Which streams take ANSI escapes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    /// Standard output.
    pub out: bool,
    /// Standard error.
    pub err: bool,
}

impl Style {
    /// Escapes on each stream that is a terminal, none under `NO_COLOR`.
    pub fn detect() -> Self {
        let allowed = std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
        Self {
            out: allowed && std::io::stdout().is_terminal(),
            err: allowed && std::io::stderr().is_terminal(),
        }
    }
}

/// `text` in `tone` if `colour`; a trailing newline goes after the reset.
fn paint(colour: bool, tone: Tone, text: &str) -> String {
    if !colour || tone == Tone::Plain || text.is_empty() {
        return text.to_owned();
    }
    let (stem, newline) = match text.strip_suffix('\n') {
        Some(stem) => (stem, "\n"),
        None => (text, ""),
    };
    format!("{}{stem}{RESET}{newline}", tone.escape())
}

/// The terminal, as the chat writes to it. Write errors are ignored: a
/// closed stdout must not stop the chat from cancelling or quitting.
pub struct Screen<O, E> {
    out: O,
    err: E,
    style: Style,
    /// The cursor is at the start of a line (stdout and stderr are taken to
    /// share one terminal; only stdout leaves a line open).
    at_line_start: bool,
    /// A reasoning run is being written.
    reasoning: bool,
    /// The `> ` prompt is the last thing written.
    prompting: bool,
    /// The running turn's usage so far, summed over its model calls.
    usage: Option<Usage>,
}

impl<O: Write, E: Write> Screen<O, E> {
    /// A screen writing answers to `out` and notes and errors to `err`.
    pub fn new(out: O, err: E, style: Style) -> Self {
        Self {
            out,
            err,
            style,
            at_line_start: true,
            reasoning: false,
            prompting: false,
            usage: None,
        }
    }

    /// The two streams (for tests).
    #[cfg(test)]
    fn into_parts(self) -> (O, E) {
        (self.out, self.err)
    }

    fn write_out(&mut self, tone: Tone, text: &str) {
        if text.is_empty() {
            return;
        }
        let painted = paint(self.style.out, tone, text);
        let _ = self.out.write_all(painted.as_bytes());
        let _ = self.out.flush();
        self.at_line_start = text.ends_with('\n');
        self.prompting = false;
    }

    fn line_err(&mut self, tone: Tone, text: &str) {
        self.end_line();
        let painted = paint(self.style.err, tone, text);
        let _ = writeln!(self.err, "{painted}");
        let _ = self.err.flush();
    }

    /// Ends the open line, if one is open, and any reasoning run.
    pub fn end_line(&mut self) {
        self.reasoning = false;
        if !self.at_line_start {
            self.write_out(Tone::Plain, "\n");
        }
    }

    /// A line of the chat's own on stderr, dimmed.
    pub fn note(&mut self, text: &str) {
        self.line_err(Tone::Dim, text);
    }

    /// `error: TEXT` on stderr, in red.
    pub fn error(&mut self, text: &str) {
        self.line_err(Tone::Red, &format!("error: {text}"));
    }

    /// A plain line on stdout (what a command answers).
    pub fn line(&mut self, text: &str) {
        self.end_line();
        self.write_out(Tone::Plain, &format!("{text}\n"));
    }

    /// `> ` on stdout, unless it is already the last thing written.
    pub fn prompt(&mut self) {
        if !self.prompting {
            self.end_line();
            self.write_out(Tone::Plain, "> ");
            self.prompting = true;
        }
    }

    /// The user ended a line: the terminal echoed its newline.
    pub fn entered(&mut self) {
        self.at_line_start = true;
        self.prompting = false;
    }

    /// Shows one event of the host.
    pub fn show(&mut self, event: &Event) {
        match event {
            Event::Open { .. } => {}
            Event::Text(text) => {
                if self.reasoning {
                    self.end_line();
                }
                self.write_out(Tone::Plain, text);
            }
            Event::Reasoning(text) => {
                if !self.reasoning {
                    self.end_line();
                    self.write_out(Tone::Dim, "thinking: ");
                    self.reasoning = true;
                }
                self.write_out(Tone::Dim, text);
            }
            Event::ToolCall { name, arguments } => {
                self.end_line();
                self.write_out(Tone::Dim, &format!("[tool call] {name} {arguments}\n"));
            }
            Event::Usage(usage) => {
                let sum = self.usage.get_or_insert_with(Usage::default);
                sum.input += usage.input;
                sum.output += usage.output;
                sum.total += usage.total;
            }
            Event::ModelError { code, message } => {
                self.line_err(Tone::Red, &format!("error: {message} ({code})"));
            }
            Event::Diagnostic {
                level,
                code,
                message,
            } => {
                let (tone, label) = match level.as_str() {
                    "error" => (Tone::Red, "error"),
                    _ => (Tone::Yellow, "warning"),
                };
                let text = if code.is_empty() {
                    format!("{label}: {message}")
                } else {
                    format!("{label}: {message} ({code})")
                };
                self.line_err(tone, &text);
            }
            Event::TurnEnd { status, .. } => {
                self.end_line();
                match status.as_str() {
                    // A refused prompt's diagnostic said why.
                    "completed" | "refused" => {}
                    "cancelled" => self.write_out(Tone::Dim, "[cancelled]\n"),
                    other => self.line_err(Tone::Red, &format!("[turn {other}]")),
                }
                if let Some(usage) = self.usage.take() {
                    let line = format!(
                        "usage: {} in, {} out, {} total\n",
                        usage.input, usage.output, usage.total
                    );
                    self.write_out(Tone::Dim, &line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(style: Style, events: &[Event]) -> (String, String) {
        let mut screen = Screen::new(Vec::new(), Vec::new(), style);
        for event in events {
            screen.show(event);
        }
        let (out, err) = screen.into_parts();
        (
            String::from_utf8(out).expect("UTF-8"),
            String::from_utf8(err).expect("UTF-8"),
        )
    }

    fn text(text: &str) -> Event {
        Event::Text(text.to_owned())
    }

    fn end(status: &str) -> Event {
        Event::TurnEnd {
            status: status.to_owned(),
            prompt_id: None,
        }
    }

    const USAGE: Event = Event::Usage(Usage {
        input: 4,
        output: 5,
        total: 9,
    });

    #[test]
    fn streams_the_answer_then_the_usage() {
        let turn = [text("echo:"), text(" hi"), USAGE, end("completed")];
        let (out, err) = render(Style::default(), &turn);
        assert_eq!(out, "echo: hi\nusage: 4 in, 5 out, 9 total\n");
        assert_eq!(err, "");
        let colour = Style {
            out: true,
            err: true,
        };
        let (out, _) = render(colour, &turn);
        assert_eq!(out, "echo: hi\n\x1b[2musage: 4 in, 5 out, 9 total\x1b[0m\n");
    }

    #[test]
    fn sums_the_usage_of_a_turns_model_calls() {
        let (out, _) = render(Style::default(), &[USAGE, USAGE, end("completed")]);
        assert_eq!(out, "usage: 8 in, 10 out, 18 total\n");
    }

    #[test]
    fn marks_reasoning_and_tool_calls() {
        let events = [
            Event::Reasoning("let me".to_owned()),
            Event::Reasoning(" see".to_owned()),
            text("Yes."),
            Event::ToolCall {
                name: "lookup".to_owned(),
                arguments: "{}".to_owned(),
            },
            end("completed"),
        ];
        let (out, _) = render(Style::default(), &events);
        assert_eq!(out, "thinking: let me see\nYes.\n[tool call] lookup {}\n");
        let (out, _) = render(
            Style {
                out: true,
                err: false,
            },
            &events[..2],
        );
        assert_eq!(
            out,
            "\x1b[2mthinking: \x1b[0m\x1b[2mlet me\x1b[0m\x1b[2m see\x1b[0m"
        );
    }

    #[test]
    fn errors_go_to_stderr_after_the_open_line() {
        let events = [
            text("echo: one"),
            Event::ModelError {
                code: "injected_failure".to_owned(),
                message: "failed on purpose".to_owned(),
            },
            end("failed"),
        ];
        let (out, err) = render(Style::default(), &events);
        assert_eq!(out, "echo: one\n");
        assert_eq!(
            err,
            "error: failed on purpose (injected_failure)\n[turn failed]\n"
        );
        let colour = Style {
            out: false,
            err: true,
        };
        let warning = Event::Diagnostic {
            level: "warn".to_owned(),
            code: "reloaded".to_owned(),
            message: "the backend changed".to_owned(),
        };
        let (_, err) = render(colour, &[warning]);
        assert_eq!(
            err,
            "\x1b[33mwarning: the backend changed (reloaded)\x1b[0m\n"
        );
    }

    #[test]
    fn a_cancelled_turn_says_so() {
        let (out, _) = render(Style::default(), &[text("token0 tok"), end("cancelled")]);
        assert_eq!(out, "token0 tok\n[cancelled]\n");
        let (out, err) = render(Style::default(), &[end("refused")]);
        assert_eq!((out.as_str(), err.as_str()), ("", ""));
    }

    #[test]
    fn the_prompt_is_written_once_and_closed_before_notes() {
        let mut screen = Screen::new(Vec::new(), Vec::new(), Style::default());
        screen.prompt();
        screen.prompt();
        screen.note("connection lost");
        screen.prompt();
        screen.entered();
        screen.show(&text("echo: x"));
        screen.line("s-1");
        let (out, err) = screen.into_parts();
        assert_eq!(String::from_utf8_lossy(&out), "> \n> echo: x\ns-1\n");
        assert_eq!(String::from_utf8_lossy(&err), "connection lost\n");
    }
}
