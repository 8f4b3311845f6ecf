//! The model conformance suite: what every model adapter must do.
//!
//! [`check_model`] builds an adapter with a closure (usually a plugin's
//! `new_model`), drives it through the FFI trait object
//! ([`ModelAdapterBox`]) with a recording [`EventSink`] that plays the host,
//! and answers one [`ModelCheck`] per check. [`assert_model_conforms`] does
//! the same and panics with a readable report when a check fails, for use in
//! a `#[test]`; `llm-host check` runs it against a built library.
//!
//! Every generation runs on a thread of its own and is waited for with a
//! timeout, so an adapter that hangs fails its check instead of hanging the
//! suite (the thread is left behind). A panic that escaped the plugin would
//! abort the process before any report: plugins made with the plugin-api's
//! `model_adapter` and `export_plugin!` run every call under its guard,
//! which turns a panic into a `plugin_panic` error (the `no_panic` check
//! fails on it).
//!
//! ```no_run
//! use llm_host_conformance::model::{self, ModelOptions};
//! use llm_host_plugin_api::Plugin;
//!
//! # struct MyPlugin;
//! # impl Plugin for MyPlugin {
//! #     const NAME: &'static str = "mine";
//! #     const VERSION: &'static str = "0.1.0";
//! #     const KINDS: llm_host_plugin_api::Kinds = llm_host_plugin_api::Kinds::MODEL;
//! # }
//! #[test]
//! fn my_model_conforms() {
//!     let options = ModelOptions {
//!         settings: r#"{"delay_ms": 0}"#.to_owned(),
//!         ..ModelOptions::default()
//!     };
//!     model::assert_model_conforms(&|settings: &str| MyPlugin::new_model(settings), &options);
//! }
//! ```
//!
//! What is checked, by name:
//!
//! | check | what |
//! |---|---|
//! | `construct` | the adapter builds from the given settings (the plugin's own error otherwise) |
//! | `event_order` | a simple request: `start` first and once, then `text`/`reasoning`/`tool_call`/`usage`/`diagnostic`, then exactly one `end` or `error` (or a returned error), last; usage counts sane |
//! | `cancel` | the sink answers stop after the first `text`: generate returns within the cancel bound, sending nothing more |
//! | `errors` | a malformed request comes back as an error; every error event has a code and a message, every returned error a known kind and a message |
//! | `no_panic` | no call panicked (a caught panic comes back as `plugin_panic`) |
//! | `unknown_settings` | the settings plus `surely_not_a_setting` are refused as `invalid_settings`, naming the key (a warning otherwise: the host runs such a plugin, but typos in config.toml go unnoticed) |

use std::fmt;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    guard::panic_message,
    serde_json::{self, Value},
    ErrorKind, EventSink, EventSink_TO, FinishReason, Flow, LogLevel, Message, ModelAdapterBox,
    ModelRequest, PluginError, Role, TurnParams, Usage,
};

/// The settings key no plugin has, for the `unknown_settings` check.
pub const UNKNOWN_SETTING: &str = "surely_not_a_setting";

/// What a check concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The adapter keeps this part of the contract.
    Pass,
    /// Not a breach the host suffers from, but worth fixing (or the check
    /// could not be exercised).
    Warn,
    /// The adapter breaks the contract.
    Fail,
    /// Not run: it needs an adapter, and none could be built.
    Skip,
}

impl Verdict {
    /// `PASS`, `WARN`, `FAIL` or `SKIP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCheck {
    /// The check's name (see the module docs for the list).
    pub name: &'static str,
    /// What it concluded.
    pub verdict: Verdict,
    /// What was found: on failure, what went wrong; on success, a short note.
    pub detail: String,
}

impl ModelCheck {
    fn new(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Self {
        Self {
            name,
            verdict,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for ModelCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.verdict, self.name, self.detail)
    }
}

/// Builds an adapter from settings (a JSON object's text): usually a
/// plugin's `new_model`.
pub type MakeModel<'a> = &'a dyn Fn(&str) -> Result<ModelAdapterBox, PluginError>;

/// How the suite runs.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// The adapter's settings, a JSON object's text.
    pub settings: String,
    /// The user message of the requests.
    pub prompt: String,
    /// How long a generation may take before its check fails.
    pub generate_timeout: Duration,
    /// How long generate may go on after the sink answered stop.
    pub cancel_timeout: Duration,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            settings: "{}".to_owned(),
            prompt: "Count from one to twelve in words: one two three four five six seven \
                     eight nine ten eleven twelve"
                .to_owned(),
            generate_timeout: Duration::from_secs(30),
            cancel_timeout: Duration::from_secs(5),
        }
    }
}

/// The names of the checks [`check_model`] runs, in order.
pub fn check_names() -> Vec<&'static str> {
    vec![
        "construct",
        "event_order",
        "cancel",
        "errors",
        "no_panic",
        "unknown_settings",
    ]
}

/// Runs every check against adapters made by `make`, and answers one result
/// per check, in the order of [`check_names`]. Never panics: a panic inside a
/// check (a bug in the suite) fails that check alone.
pub fn check_model(make: MakeModel<'_>, options: &ModelOptions) -> Vec<ModelCheck> {
    let mut results = Vec::new();
    let mut errors = ErrorsSeen::default();
    match make(&options.settings) {
        Err(err) => {
            results.push(ModelCheck::new(
                "construct",
                Verdict::Fail,
                format!(
                    "the plugin refused the settings {}: {err}",
                    options.settings
                ),
            ));
            for name in ["event_order", "cancel", "errors", "no_panic"] {
                results.push(ModelCheck::new(
                    name,
                    Verdict::Skip,
                    "no adapter to check (see construct)",
                ));
            }
        }
        Ok(adapter) => {
            results.push(ModelCheck::new(
                "construct",
                Verdict::Pass,
                format!("built with the settings {}", options.settings),
            ));
            let adapter = Arc::new(adapter);
            let checks: [(&'static str, Check); 3] = [
                ("event_order", event_order),
                ("cancel", cancel),
                ("errors", malformed_request),
            ];
            for (name, check) in checks {
                let result =
                    catch_unwind(AssertUnwindSafe(|| check(&adapter, options, &mut errors)))
                        .unwrap_or_else(|panic| {
                            (
                                Verdict::Fail,
                                format!("the check panicked: {}", panic_message(panic.as_ref())),
                            )
                        });
                results.push(ModelCheck::new(name, result.0, result.1));
            }
            // The errors seen in every run so far must be well-formed too.
            if let Some(errors_check) = results.iter_mut().find(|r| r.name == "errors") {
                if let Some(problem) = errors.malformed.first() {
                    errors_check.verdict = Verdict::Fail;
                    errors_check.detail = problem.clone();
                }
            }
            results.push(match errors.panics.first() {
                Some(panic) => ModelCheck::new("no_panic", Verdict::Fail, panic.clone()),
                None => ModelCheck::new(
                    "no_panic",
                    Verdict::Pass,
                    "no call panicked or aborted the process",
                ),
            });
        }
    }
    results.push(unknown_settings(make, &options.settings));
    results
}

/// A report of `results`: a summary line, then one line per check.
pub fn report(results: &[ModelCheck]) -> String {
    let count = |verdict| results.iter().filter(|r| r.verdict == verdict).count();
    let mut text = format!(
        "model conformance: {} passed, {} failed, {}, {} skipped\n",
        count(Verdict::Pass),
        count(Verdict::Fail),
        plural(count(Verdict::Warn), "warning"),
        count(Verdict::Skip)
    );
    for result in results {
        let _ = writeln!(text, "  {result}");
    }
    text
}

/// Runs [`check_model`] and panics with the [`report`] if any check failed or
/// was skipped; answers the results otherwise (warnings included).
///
/// # Panics
///
/// When the adapter fails a check: the message lists every failed check and
/// what went wrong.
pub fn assert_model_conforms(make: MakeModel<'_>, options: &ModelOptions) -> Vec<ModelCheck> {
    let results = check_model(make, options);
    if results
        .iter()
        .any(|r| matches!(r.verdict, Verdict::Fail | Verdict::Skip))
    {
        panic!("the model adapter does not conform:\n{}", report(&results));
    }
    results
}

type Check = fn(&Arc<ModelAdapterBox>, &ModelOptions, &mut ErrorsSeen) -> (Verdict, String);

/// Error events and returned errors seen during the runs.
#[derive(Default)]
struct ErrorsSeen {
    /// Descriptions of errors that are not well-formed.
    malformed: Vec<String>,
    /// Descriptions of caught panics.
    panics: Vec<String>,
}

impl ErrorsSeen {
    fn record(&mut self, run: &str, outcome: &RunOutcome) {
        for event in &outcome.events {
            if let Event::Error { code, message } = event {
                if code.is_empty() || message.is_empty() {
                    self.malformed.push(format!(
                        "{run}: an error event with {} (code {code:?}, message {message:?})",
                        if code.is_empty() {
                            "an empty code"
                        } else {
                            "an empty message"
                        }
                    ));
                }
                if code == ErrorKind::PANIC.as_str() {
                    self.panics
                        .push(format!("{run}: the plugin panicked: {message}"));
                }
            }
        }
        if let Ended::Returned(Err(err)) = &outcome.ended {
            if err.kind.as_str() == "error" {
                self.malformed.push(format!(
                    "{run}: returned an error of unknown kind {} ({})",
                    err.kind.0, err.message
                ));
            }
            if err.message.is_empty() {
                self.malformed.push(format!(
                    "{run}: returned a `{}` error with an empty message",
                    err.kind
                ));
            }
            if err.kind == ErrorKind::PANIC {
                self.panics.push(format!("{run}: {}", err.message));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------

fn event_order(
    adapter: &Arc<ModelAdapterBox>,
    options: &ModelOptions,
    errors: &mut ErrorsSeen,
) -> (Verdict, String) {
    let outcome = generate(adapter, &request(options), Mode::Follow, options);
    errors.record("the simple request", &outcome);
    let summary = describe(&outcome.events);
    match &outcome.ended {
        Ended::TimedOut => {
            return (
                Verdict::Fail,
                format!(
                    "generate did not return within {:?}; events so far: {summary}",
                    options.generate_timeout
                ),
            )
        }
        Ended::NoThread(err) => return (Verdict::Fail, format!("no thread to run on: {err}")),
        Ended::Returned(_) => {}
    }
    if let Some(problem) = order_problem(&outcome) {
        return (Verdict::Fail, format!("{problem} (events: {summary})"));
    }
    if let Some(problem) = usage_problem(&outcome.events) {
        return (Verdict::Fail, format!("{problem} (events: {summary})"));
    }
    match &outcome.ended {
        Ended::Returned(Err(err)) if outcome.events.is_empty() => (
            Verdict::Warn,
            format!("the simple request failed at once, so there was no answer to judge: {err}"),
        ),
        Ended::Returned(Err(err)) => (Verdict::Pass, format!("{summary}, returned {err}")),
        _ => (Verdict::Pass, summary),
    }
}

fn cancel(
    adapter: &Arc<ModelAdapterBox>,
    options: &ModelOptions,
    errors: &mut ErrorsSeen,
) -> (Verdict, String) {
    let outcome = generate(
        adapter,
        &request(options),
        Mode::StopAfterFirstText,
        options,
    );
    errors.record("the cancelled request", &outcome);
    let Some(stopped_at) = outcome.stopped_at else {
        return match &outcome.ended {
            Ended::TimedOut => (
                Verdict::Fail,
                format!(
                    "no text within {:?} and generate did not return; events: {}",
                    options.generate_timeout,
                    describe(&outcome.events)
                ),
            ),
            _ => (
                Verdict::Warn,
                format!(
                    "not exercised: the generation sent no text to answer stop to (events: {})",
                    describe(&outcome.events)
                ),
            ),
        };
    };
    let after = &outcome.events[stopped_at + 1..];
    let waited = outcome.returned_after_stop;
    match (&outcome.ended, after.is_empty()) {
        (Ended::TimedOut, _) => (
            Verdict::Fail,
            format!(
                "generate did not return within {:?} after the sink answered stop{}",
                options.cancel_timeout,
                if after.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; it sent {} more: {}",
                        plural(after.len(), "event"),
                        describe(after)
                    )
                }
            ),
        ),
        (Ended::NoThread(err), _) => (Verdict::Fail, format!("no thread to run on: {err}")),
        (Ended::Returned(_), false) => (
            Verdict::Fail,
            format!(
                "{} after the sink answered stop to the first text: {}",
                plural(after.len(), "event"),
                describe(after)
            ),
        ),
        (Ended::Returned(_), true) => (
            Verdict::Pass,
            format!(
                "returned {} after the sink answered stop, sending nothing more",
                waited.map_or_else(|| "at once".to_owned(), |d| format!("{d:.1?}"))
            ),
        ),
    }
}

fn malformed_request(
    adapter: &Arc<ModelAdapterBox>,
    options: &ModelOptions,
    errors: &mut ErrorsSeen,
) -> (Verdict, String) {
    let outcome = generate(
        adapter,
        "this is not a model request",
        Mode::Follow,
        options,
    );
    errors.record("a malformed request", &outcome);
    let error_event = outcome.events.iter().find_map(|event| match event {
        Event::Error { code, message } => Some(format!("{code}: {message}")),
        _ => None,
    });
    match (&outcome.ended, error_event) {
        (Ended::TimedOut, _) => (
            Verdict::Fail,
            format!(
                "generate of a malformed request did not return within {:?}",
                options.generate_timeout
            ),
        ),
        (Ended::NoThread(err), _) => (Verdict::Fail, format!("no thread to run on: {err}")),
        (Ended::Returned(Err(err)), _) => (
            Verdict::Pass,
            format!("a malformed request came back as {err}"),
        ),
        (Ended::Returned(Ok(())), Some(error)) => (
            Verdict::Pass,
            format!("a malformed request came back as an error event {error}"),
        ),
        (Ended::Returned(Ok(())), None) => (
            Verdict::Warn,
            format!(
                "a request that is not JSON was answered as if valid: {}",
                describe(&outcome.events)
            ),
        ),
    }
}

fn unknown_settings(make: MakeModel<'_>, settings: &str) -> ModelCheck {
    let build = |settings: &str| make(settings).map(|_| ());
    let (verdict, detail) = unknown_settings_verdict(&build, settings);
    ModelCheck::new("unknown_settings", verdict, detail)
}

/// The `unknown_settings` check for any adapter kind: `build` (a
/// constructor) gets `settings` (a JSON object's text) plus
/// [`UNKNOWN_SETTING`], and must refuse them as `invalid_settings`, naming the
/// key. Accepting them, or refusing them otherwise, is a warning: the host
/// runs such a plugin, but a typo in config.toml goes unnoticed.
pub fn unknown_settings_verdict(
    build: &dyn Fn(&str) -> Result<(), PluginError>,
    settings: &str,
) -> (Verdict, String) {
    let mut object = match serde_json::from_str::<Value>(settings) {
        Ok(Value::Object(object)) => object,
        _ => serde_json::Map::new(),
    };
    object.insert(UNKNOWN_SETTING.to_owned(), Value::from(1));
    let with_typo = Value::Object(object).to_string();
    match catch_unwind(AssertUnwindSafe(|| build(&with_typo))) {
        Err(panic) => (
            Verdict::Fail,
            format!(
                "the constructor panicked: {}",
                panic_message(panic.as_ref())
            ),
        ),
        Ok(Ok(())) => (
            Verdict::Warn,
            format!(
                "the settings {with_typo} were accepted: a typo in config.toml would go \
                 unnoticed (parse settings with #[serde(deny_unknown_fields)])"
            ),
        ),
        Ok(Err(err)) if err.kind != ErrorKind::INVALID_SETTINGS => (
            Verdict::Warn,
            format!(
                "refused as `{}` rather than invalid_settings: {err}",
                err.kind
            ),
        ),
        Ok(Err(err)) if !err.message.contains(UNKNOWN_SETTING) => (
            Verdict::Warn,
            format!("refused, but the message does not name the key: {err}"),
        ),
        Ok(Err(err)) => (Verdict::Pass, format!("refused: {err}")),
    }
}

/// Whether `outcome` keeps the documented order; the problem otherwise.
fn order_problem(outcome: &RunOutcome) -> Option<String> {
    let events = &outcome.events;
    if let Some(first) = events.first() {
        if !matches!(first, Event::Start) {
            return Some(format!(
                "the first event is `{}`, not `start`",
                first.name()
            ));
        }
    }
    let starts = events.iter().filter(|e| matches!(e, Event::Start)).count();
    if starts > 1 {
        return Some(format!("{starts} `start` events"));
    }
    let terminal = events.iter().position(Event::is_terminal);
    let returned_error = matches!(outcome.ended, Ended::Returned(Err(_)));
    match terminal {
        None if returned_error => None,
        None => Some(
            "generate returned without an `end` or `error` event (the host fills in \
             `end`, but the contract asks for one)"
                .to_owned(),
        ),
        Some(at) => {
            if let Some(next) = events.get(at + 1) {
                Some(format!("`{}` after `{}`", next.name(), events[at].name()))
            } else if let Ended::Returned(Err(err)) = &outcome.ended {
                Some(format!(
                    "sent `{}` and then also returned an error ({err}): two endings",
                    events[at].name()
                ))
            } else {
                None
            }
        }
    }
}

/// Whether the usage events are sane; the problem otherwise.
fn usage_problem(events: &[Event]) -> Option<String> {
    let texts = events
        .iter()
        .filter(|e| matches!(e, Event::Text(_)))
        .count();
    let mut last = None;
    for event in events {
        if let Event::Usage(usage) = event {
            match usage.input_tokens.checked_add(usage.output_tokens) {
                Some(sum) if sum <= usage.total_tokens => {}
                _ => {
                    return Some(format!(
                        "usage total {} is less than input {} + output {}",
                        usage.total_tokens, usage.input_tokens, usage.output_tokens
                    ))
                }
            }
            last = Some(*usage);
        }
    }
    match last {
        Some(usage) if texts > 0 && usage.output_tokens == 0 => Some(format!(
            "usage counts 0 output tokens after {texts} text events"
        )),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Running a generation
// ---------------------------------------------------------------------------

/// The JSON of the suite's simple request.
fn request(options: &ModelOptions) -> String {
    let request = ModelRequest {
        session_id: "conformance-session".to_owned(),
        interaction_id: "turn-1".to_owned(),
        backend: "conformance".to_owned(),
        messages: vec![
            Message::new(Role::System, "You are checked for conformance. Be brief."),
            Message::new(Role::User, options.prompt.as_str()),
        ],
        params: TurnParams::default(),
    };
    // A request of plain strings always serializes.
    serde_json::to_string(&request).unwrap_or_default()
}

/// One event as the recording sink saw it.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    Start,
    Text(String),
    Reasoning,
    ToolCall,
    Usage(Usage),
    Diagnostic,
    End(FinishReason),
    Error { code: String, message: String },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::Text(_) => "text",
            Event::Reasoning => "reasoning",
            Event::ToolCall => "tool_call",
            Event::Usage(_) => "usage",
            Event::Diagnostic => "diagnostic",
            Event::End(_) => "end",
            Event::Error { .. } => "error",
        }
    }

    fn is_terminal(&self) -> bool {
        matches!(self, Event::End(_) | Event::Error { .. })
    }
}

/// `1 event`, `2 events`.
pub fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// A short summary of `events`: `start, 3 text, usage (7 in, 3 out, 10 total), end stop`.
fn describe(events: &[Event]) -> String {
    if events.is_empty() {
        return "none".to_owned();
    }
    let mut parts: Vec<String> = Vec::new();
    let mut index = 0;
    while index < events.len() {
        let event = &events[index];
        let run = events[index..]
            .iter()
            .take_while(|e| e.name() == event.name())
            .count();
        let part = match event {
            Event::Usage(usage) => format!(
                "usage ({} in, {} out, {} total)",
                usage.input_tokens, usage.output_tokens, usage.total_tokens
            ),
            Event::End(reason) => format!("end {}", reason.as_str()),
            Event::Error { code, .. } => format!("error {code:?}"),
            other if run > 1 => format!("{run} {}", other.name()),
            other => other.name().to_owned(),
        };
        let step = if matches!(event, Event::Usage(_) | Event::End(_) | Event::Error { .. }) {
            1
        } else {
            run
        };
        parts.push(part);
        index += step;
    }
    parts.join(", ")
}

/// How the recording sink answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Like the host when nobody cancels: continue until `end` or `error`.
    Follow,
    /// Like the host when the client cancels right after the first text.
    StopAfterFirstText,
}

/// What the recording sink saw, shared with the thread that waits.
struct Log {
    events: Vec<Event>,
    /// Index of the event the sink first answered stop to because of a cancel.
    stopped_at: Option<usize>,
    /// When it did.
    stopped_when: Option<Instant>,
    /// Whether an `end` or `error` went by.
    ended: bool,
}

/// The host's part, played: records the events and answers as the host
/// would. Runs on the adapter's thread; never panics.
struct Recorder {
    log: Arc<Mutex<Log>>,
    mode: Mode,
}

impl Recorder {
    fn log(&self) -> MutexGuard<'_, Log> {
        lock(&self.log)
    }

    fn push(&mut self, event: Event) -> Flow {
        let mode = self.mode;
        let mut log = self.log();
        let terminal = event.is_terminal();
        let text = matches!(event, Event::Text(_));
        log.events.push(event);
        if log.stopped_at.is_none() && mode == Mode::StopAfterFirstText && text {
            log.stopped_at = Some(log.events.len() - 1);
            log.stopped_when = Some(Instant::now());
        }
        if terminal {
            log.ended = true;
        }
        if log.stopped_at.is_some() || log.ended {
            Flow::STOP
        } else {
            Flow::CONTINUE
        }
    }
}

fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    // Events are pushed whole; a poisoned log is still consistent.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EventSink for Recorder {
    fn start(&mut self, _id: RStr<'_>, _model_id: RStr<'_>) -> Flow {
        self.push(Event::Start)
    }

    fn text(&mut self, text: RStr<'_>) -> Flow {
        self.push(Event::Text(text.to_string()))
    }

    fn reasoning(&mut self, _text: RStr<'_>) -> Flow {
        self.push(Event::Reasoning)
    }

    fn tool_call(&mut self, _id: RStr<'_>, _name: RStr<'_>, _arguments: RStr<'_>) -> Flow {
        self.push(Event::ToolCall)
    }

    fn usage(&mut self, usage: Usage) -> Flow {
        self.push(Event::Usage(usage))
    }

    fn end(&mut self, reason: FinishReason) -> Flow {
        self.push(Event::End(reason))
    }

    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        self.push(Event::Error {
            code: code.to_string(),
            message: message.to_string(),
        })
    }

    fn diagnostic(&mut self, _level: LogLevel, _message: RStr<'_>, _data: RStr<'_>) -> Flow {
        self.push(Event::Diagnostic)
    }

    fn is_cancelled(&self) -> bool {
        self.log().stopped_at.is_some()
    }
}

/// How a generation ended.
enum Ended {
    /// generate returned this.
    Returned(Result<(), PluginError>),
    /// It had not returned when the suite stopped waiting.
    TimedOut,
    /// No thread could be started.
    NoThread(String),
}

/// A generation as the suite saw it.
struct RunOutcome {
    events: Vec<Event>,
    stopped_at: Option<usize>,
    returned_after_stop: Option<Duration>,
    ended: Ended,
}

/// Runs `adapter.generate(request)` on a thread with a recording sink and
/// waits: up to `generate_timeout`, or `cancel_timeout` past the sink's
/// stop answer in [`Mode::StopAfterFirstText`]. A generation still running
/// then is left to its thread.
fn generate(
    adapter: &Arc<ModelAdapterBox>,
    request: &str,
    mode: Mode,
    options: &ModelOptions,
) -> RunOutcome {
    let log = Arc::new(Mutex::new(Log {
        events: Vec::new(),
        stopped_at: None,
        stopped_when: None,
        ended: false,
    }));
    let (done, finished) = mpsc::channel();
    let spawned = {
        let adapter = Arc::clone(adapter);
        let request = request.to_owned();
        let mut recorder = Recorder {
            log: Arc::clone(&log),
            mode,
        };
        std::thread::Builder::new()
            .name("conformance-generate".to_owned())
            .spawn(move || {
                let sink = EventSink_TO::from_ptr(&mut recorder, TD_Opaque);
                let result = adapter
                    .generate(RStr::from(request.as_str()), sink)
                    .into_result();
                let _ = done.send((result, Instant::now()));
            })
    };
    let started = Instant::now();
    let ended = match spawned {
        Err(err) => (Ended::NoThread(err.to_string()), None),
        Ok(_) => loop {
            match finished.recv_timeout(Duration::from_millis(10)) {
                Ok((result, when)) => break (Ended::Returned(result), Some(when)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The thread ended without sending: only a panic in the
                    // suite's own code can do that.
                    break (
                        Ended::Returned(Err(PluginError::internal(
                            "the generate thread ended without an answer",
                        ))),
                        None,
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let stopped_when = lock(&log).stopped_when;
                    let deadline = match stopped_when {
                        Some(when) => when + options.cancel_timeout,
                        None => started + options.generate_timeout,
                    };
                    if Instant::now() >= deadline {
                        break (Ended::TimedOut, None);
                    }
                }
            }
        },
    };
    let log = lock(&log);
    RunOutcome {
        events: log.events.clone(),
        stopped_at: log.stopped_at,
        returned_after_stop: match (log.stopped_when, ended.1) {
            (Some(stopped), Some(returned)) => Some(returned.saturating_duration_since(stopped)),
            _ => None,
        },
        ended: ended.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_host_plugin_api::{self as api, Model, Sink};

    /// A model with one flaw at most, run through the plugin-api's wrapper.
    #[derive(Clone, Copy, PartialEq)]
    enum Flaw {
        None,
        IgnoresStop,
        HangsAfterCancel,
        Panics,
    }

    struct Words(Flaw);

    impl Model for Words {
        fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
            let prompt = request
                .messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default();
            if sink.start("", "words").is_stop() {
                return Ok(());
            }
            let mut sent = 0;
            for word in prompt.split_whitespace() {
                if self.0 == Flaw::Panics {
                    panic!("words panicked on purpose");
                }
                let stop = sink.text(word).is_stop();
                sent += 1;
                if stop && self.0 == Flaw::HangsAfterCancel {
                    std::thread::sleep(Duration::from_secs(3));
                }
                if stop && self.0 != Flaw::IgnoresStop {
                    return Ok(());
                }
            }
            sink.usage(Usage {
                input_tokens: 3,
                output_tokens: sent,
                total_tokens: 3 + sent,
            });
            sink.end(FinishReason::STOP);
            Ok(())
        }
    }

    /// Refuses every settings key, as `deny_unknown_fields` on an empty
    /// struct would.
    fn no_settings(settings: &str) -> Result<(), PluginError> {
        let value: Value = serde_json::from_str(settings)?;
        match value.as_object().and_then(|object| object.keys().next()) {
            Some(key) => Err(PluginError::invalid_settings(format!(
                "unknown field `{key}`"
            ))),
            None => Ok(()),
        }
    }

    fn run(flaw: Flaw) -> Vec<ModelCheck> {
        let options = ModelOptions {
            cancel_timeout: Duration::from_millis(300),
            ..ModelOptions::default()
        };
        check_model(
            &|settings: &str| {
                no_settings(settings)?;
                Ok(api::model_adapter(Words(flaw)))
            },
            &options,
        )
    }

    fn verdict(results: &[ModelCheck], name: &str) -> (Verdict, String) {
        results
            .iter()
            .find(|r| r.name == name)
            .map(|r| (r.verdict, r.detail.clone()))
            .unwrap_or_else(|| panic!("no result for {name}: {results:?}"))
    }

    #[test]
    fn a_conforming_model_passes_every_check() {
        let results = run(Flaw::None);
        assert_eq!(
            results.iter().map(|r| r.name).collect::<Vec<_>>(),
            check_names()
        );
        assert!(
            results.iter().all(|r| r.verdict == Verdict::Pass),
            "{}",
            report(&results)
        );
    }

    #[test]
    fn flaws_fail_their_checks() {
        let results = run(Flaw::IgnoresStop);
        let (cancel, detail) = verdict(&results, "cancel");
        assert_eq!(cancel, Verdict::Fail, "{detail}");
        assert!(detail.contains("after the sink answered stop"), "{detail}");
        assert_eq!(verdict(&results, "event_order").0, Verdict::Pass);

        let results = run(Flaw::HangsAfterCancel);
        let (cancel, detail) = verdict(&results, "cancel");
        assert_eq!(cancel, Verdict::Fail, "{detail}");
        assert!(detail.contains("did not return within 300ms"), "{detail}");

        let results = run(Flaw::Panics);
        let (no_panic, detail) = verdict(&results, "no_panic");
        assert_eq!(no_panic, Verdict::Fail, "{detail}");
        assert!(detail.contains("on purpose"), "{detail}");
    }

    #[test]
    fn a_refused_constructor_skips_the_rest() {
        let results = check_model(
            &|_: &str| Err(PluginError::invalid_settings("url: missing")),
            &ModelOptions::default(),
        );
        let (construct, detail) = verdict(&results, "construct");
        assert_eq!(construct, Verdict::Fail);
        assert!(
            detail.contains("invalid_settings: url: missing"),
            "{detail}"
        );
        assert_eq!(verdict(&results, "cancel").0, Verdict::Skip);
        let (unknown, detail) = verdict(&results, "unknown_settings");
        assert_eq!(unknown, Verdict::Warn, "{detail}");
        assert!(detail.contains("does not name the key"), "{detail}");
    }

    fn outcome(events: Vec<Event>, ended: Result<(), PluginError>) -> RunOutcome {
        RunOutcome {
            events,
            stopped_at: None,
            returned_after_stop: None,
            ended: Ended::Returned(ended),
        }
    }

    #[test]
    fn the_documented_order_passes() {
        let events = vec![
            Event::Start,
            Event::Diagnostic,
            Event::Text("a".into()),
            Event::Text("b".into()),
            Event::Usage(Usage {
                input_tokens: 1,
                output_tokens: 2,
                total_tokens: 3,
            }),
            Event::End(FinishReason::STOP),
        ];
        assert_eq!(order_problem(&outcome(events.clone(), Ok(()))), None);
        assert_eq!(usage_problem(&events), None);
        assert_eq!(
            describe(&events),
            "start, diagnostic, 2 text, usage (1 in, 2 out, 3 total), end stop"
        );
        // A returned error ends a generation too.
        let failed = outcome(
            vec![Event::Start],
            Err(PluginError::unavailable("no upstream")),
        );
        assert_eq!(order_problem(&failed), None);
    }

    #[test]
    fn order_breaches_are_named() {
        let late = outcome(
            vec![
                Event::Start,
                Event::End(FinishReason::STOP),
                Event::Text("x".into()),
            ],
            Ok(()),
        );
        let problem = order_problem(&late).unwrap_or_default();
        assert!(problem.contains("`text` after `end`"), "{problem}");

        let headless = outcome(vec![Event::Text("x".into())], Ok(()));
        let problem = order_problem(&headless).unwrap_or_default();
        assert!(problem.contains("not `start`"), "{problem}");

        let endless = outcome(vec![Event::Start], Ok(()));
        assert!(order_problem(&endless).is_some());

        let twice = outcome(
            vec![Event::Start, Event::End(FinishReason::STOP)],
            Err(PluginError::internal("late")),
        );
        assert!(order_problem(&twice).is_some());
    }

    #[test]
    fn usage_must_add_up() {
        let bad = [Event::Usage(Usage {
            input_tokens: 5,
            output_tokens: 5,
            total_tokens: 3,
        })];
        assert!(usage_problem(&bad).is_some());
        let none_out = [
            Event::Text("x".into()),
            Event::Usage(Usage {
                input_tokens: 5,
                output_tokens: 0,
                total_tokens: 5,
            }),
        ];
        assert!(usage_problem(&none_out).is_some());
        let overflow = [Event::Usage(Usage {
            input_tokens: u64::MAX,
            output_tokens: 1,
            total_tokens: u64::MAX,
        })];
        assert!(usage_problem(&overflow).is_some());
    }

    #[test]
    fn malformed_errors_and_panics_are_collected() {
        let mut seen = ErrorsSeen::default();
        seen.record(
            "run",
            &outcome(
                vec![
                    Event::Start,
                    Event::Error {
                        code: String::new(),
                        message: "m".into(),
                    },
                ],
                Ok(()),
            ),
        );
        seen.record(
            "run",
            &outcome(Vec::new(), Err(PluginError::new(ErrorKind(200), "odd"))),
        );
        seen.record(
            "run",
            &outcome(
                Vec::new(),
                Err(PluginError::new(ErrorKind::PANIC, "plugin panicked: boom")),
            ),
        );
        assert_eq!(seen.malformed.len(), 2, "{:?}", seen.malformed);
        assert!(seen.malformed[0].contains("empty code"));
        assert!(seen.malformed[1].contains("unknown kind 200"));
        assert_eq!(seen.panics.len(), 1);
    }
}
