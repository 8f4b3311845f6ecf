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
//! suite (the thread is left behind).
//!
//! A stepped adapter (its
//! [`stepped`](llm_host_plugin_api::ModelAdapter::stepped) answers true) runs
//! its turns in the host as [`start`](llm_host_plugin_api::ModelAdapter::start), then
//! [`step`](llm_host_plugin_api::TurnStepper::step) until
//! [`Step::DONE`](llm_host_plugin_api::Step::DONE), on the host's shared
//! workers. The suite then runs the generation checks a second time that way,
//! under names of their own (`steps.event_order`, ...), with a driver that
//! plays the host on the run's thread: it sleeps for
//! [`Step::sleep`](llm_host_plugin_api::Step::sleep), waits on a condvar
//! behind the turn's [`TurnWaker`] for
//! [`Step::PENDING`](llm_host_plugin_api::Step::PENDING), stops stepping once
//! the sink answered stop, and drops the stepper. It times every `start`,
//! `step` and drop (without the time the thread spent waiting for a CPU,
//! where Linux tells it), since a call that blocks holds up every connection
//! on the host's worker. For an adapter that is not stepped those checks are
//! `Skip`ped, which does not fail the suite. A panic that escaped the plugin would
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
//! | `steps.event_order` | `event_order`, the turn run in steps (only for a stepped adapter; `Skip` otherwise) |
//! | `steps.cancel` | `cancel` in steps: the step in which the sink answered stop sends nothing more, and it and the stepper's drop return within the cancel bound |
//! | `steps.errors` | `errors` in steps: a malformed request fails `start` or the first step |
//! | `steps.no_panic` | `no_panic` in steps |
//! | `steps.no_blocking` | every `start`, `step` and drop of the stepped runs returned within [`ModelOptions::step_bound`] (20 ms) |
//! | `steps.wake` | a step that answered `PENDING` in the simple request was woken (from another thread) and stepped again; `Skip` when no step answered `PENDING` |
//! | `unknown_settings` | the settings plus `surely_not_a_setting` are refused as `invalid_settings`, naming the key (a warning otherwise: the host runs such a plugin, but typos in config.toml go unnoticed); `Skip` when `construct` failed, since then the settings alone are refused |

use std::fmt;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    guard::panic_message,
    serde_json::{self, Value},
    ErrorKind, EventSink, EventSink_TO, FinishReason, Flow, LogLevel, Message, ModelAdapterBox,
    ModelRequest, Next, PluginError, Role, TurnParams, TurnWaker, TurnWaker_TO, Usage,
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
    /// Not run: it does not apply to this adapter (the steps checks of an
    /// adapter that is not stepped, the wake check of one that never answers
    /// `PENDING`; the `shared_*` store checks of a store in process, the
    /// store's `expiry` check without a TTL), or it needs an adapter and none
    /// could be built (then `construct` fails). A skip alone does not fail
    /// the suite.
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
    /// How long a stepped adapter's `start`, `step` or stepper drop may take
    /// before `steps.no_blocking` fails: they run on the host's shared
    /// workers, where a call that blocks holds up every connection on the
    /// worker. Time the thread spent waiting for a CPU is not counted (on
    /// Linux), so a loaded machine does not fail a step that never blocked.
    pub step_bound: Duration,
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
            step_bound: Duration::from_millis(20),
        }
    }
}

/// The checks of a generation through `generate`, in order.
const GENERATE_CHECKS: [&str; 4] = ["event_order", "cancel", "errors", "no_panic"];

/// The checks of a stepped adapter's turns run in steps, in order.
const STEPS_CHECKS: [&str; 6] = [
    "steps.event_order",
    "steps.cancel",
    "steps.errors",
    "steps.no_panic",
    "steps.no_blocking",
    "steps.wake",
];

/// Why the steps checks of an adapter that is not stepped are skipped.
const NOT_STEPPED: &str = "not stepped: the adapter's stepped() answers false, so the host runs \
                           its turns through generate, on threads of their own";

/// The names of the checks [`check_model`] runs, in order.
pub fn check_names() -> Vec<&'static str> {
    let mut names = vec!["construct"];
    names.extend(GENERATE_CHECKS);
    names.extend(STEPS_CHECKS);
    names.push("unknown_settings");
    names
}

/// Runs every check against adapters made by `make`, and answers one result
/// per check, in the order of [`check_names`]. Never panics: a panic inside a
/// check (a bug in the suite) fails that check alone.
pub fn check_model(make: MakeModel<'_>, options: &ModelOptions) -> Vec<ModelCheck> {
    let mut results = Vec::new();
    let built = match make(&options.settings) {
        Err(err) => {
            results.push(ModelCheck::new(
                "construct",
                Verdict::Fail,
                format!(
                    "the plugin refused the settings {}: {err}",
                    options.settings
                ),
            ));
            for name in GENERATE_CHECKS.into_iter().chain(STEPS_CHECKS) {
                results.push(ModelCheck::new(
                    name,
                    Verdict::Skip,
                    "no adapter to check (see construct)",
                ));
            }
            false
        }
        Ok(adapter) => {
            results.push(ModelCheck::new(
                "construct",
                Verdict::Pass,
                format!("built with the settings {}", options.settings),
            ));
            let adapter = Arc::new(adapter);
            results.extend(check_path(&adapter, options, Path::Generate));
            if adapter.stepped() {
                results.extend(check_path(&adapter, options, Path::Steps));
            } else {
                for name in STEPS_CHECKS {
                    results.push(ModelCheck::new(name, Verdict::Skip, NOT_STEPPED));
                }
            }
            true
        }
    };
    results.push(if built {
        unknown_settings(make, &options.settings)
    } else {
        ModelCheck::new(
            "unknown_settings",
            Verdict::Skip,
            UNKNOWN_SETTINGS_UNTESTABLE,
        )
    });
    results
}

/// Why `unknown_settings` is skipped when the settings themselves are
/// refused: a refusal of them plus a typo could be for either.
pub const UNKNOWN_SETTINGS_UNTESTABLE: &str =
    "the settings alone were refused (see construct), so a refusal of them plus an unknown key \
     would tell nothing: fix the settings to check it";

/// The checks of one way of running turns: [`GENERATE_CHECKS`] or
/// [`STEPS_CHECKS`].
fn check_path(
    adapter: &Arc<ModelAdapterBox>,
    options: &ModelOptions,
    path: Path,
) -> Vec<ModelCheck> {
    let names = path.check_names();
    let mut seen = Seen::default();
    let mut results = Vec::new();
    let checks: [Check; 3] = [event_order, cancel, malformed_request];
    for (name, check) in names.iter().copied().zip(checks) {
        let result = catch_unwind(AssertUnwindSafe(|| {
            check(adapter, options, path, &mut seen)
        }))
        .unwrap_or_else(|panic| {
            (
                Verdict::Fail,
                format!("the check panicked: {}", panic_message(panic.as_ref())),
            )
        });
        results.push(ModelCheck::new(name, result.0, result.1));
    }
    // The errors seen in every run so far must be well-formed too.
    if let Some(errors_check) = results.get_mut(2) {
        if let Some(problem) = seen.malformed.first() {
            errors_check.verdict = Verdict::Fail;
            errors_check.detail = problem.clone();
        }
    }
    results.push(match seen.panics.first() {
        Some(panic) => ModelCheck::new(names[3], Verdict::Fail, panic.clone()),
        None => ModelCheck::new(
            names[3],
            Verdict::Pass,
            "no call panicked or aborted the process",
        ),
    });
    if path == Path::Steps {
        let (verdict, detail) = no_blocking(&seen, options);
        results.push(ModelCheck::new(names[4], verdict, detail));
        let (verdict, detail) = wake(&seen);
        results.push(ModelCheck::new(names[5], verdict, detail));
    }
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

/// Runs [`check_model`] and panics with the [`report`] if any check failed;
/// answers the results otherwise (warnings and skips included: a skipped
/// check does not apply, or `construct` failed).
///
/// # Panics
///
/// When the adapter fails a check: the message lists every failed check and
/// what went wrong.
pub fn assert_model_conforms(make: MakeModel<'_>, options: &ModelOptions) -> Vec<ModelCheck> {
    let results = check_model(make, options);
    if results.iter().any(|r| r.verdict == Verdict::Fail) {
        panic!("the model adapter does not conform:\n{}", report(&results));
    }
    results
}

type Check = fn(&Arc<ModelAdapterBox>, &ModelOptions, Path, &mut Seen) -> (Verdict, String);

/// What the runs of one path showed beyond their own check: error events and
/// returned errors, and, for stepped runs, how long the calls took and how
/// the simple request's steps went.
#[derive(Default)]
struct Seen {
    /// Descriptions of errors that are not well-formed.
    malformed: Vec<String>,
    /// Descriptions of caught panics.
    panics: Vec<String>,
    /// How many `start`, `step` and drop calls were timed.
    calls: usize,
    /// The slowest of each kind (by [`Call::index`]), and the run it was in.
    slowest: [Option<(Slow, String)>; 3],
    /// The steps of the simple request.
    simple: Option<StepReport>,
}

impl Seen {
    fn record(&mut self, run: &str, outcome: &RunOutcome) {
        if let Some(steps) = &outcome.steps {
            self.calls += steps.calls;
            for slow in steps.slowest.iter().flatten() {
                let slot = &mut self.slowest[slow.call.index()];
                if slot.as_ref().is_none_or(|(s, _)| slow.took > s.took) {
                    *slot = Some((*slow, run.to_owned()));
                }
            }
        }
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
    path: Path,
    seen: &mut Seen,
) -> (Verdict, String) {
    let outcome = run(adapter, &request(options), Mode::Follow, options, path);
    seen.record("the simple request", &outcome);
    if outcome.steps.is_some() {
        seen.simple.clone_from(&outcome.steps);
    }
    let summary = describe(&outcome.events);
    match &outcome.ended {
        Ended::TimedOut => {
            return (
                Verdict::Fail,
                format!(
                    "{} {} within {:?}{}; events so far: {summary}",
                    path.turn(),
                    path.did_not_end(),
                    options.generate_timeout,
                    outcome.stuck()
                ),
            )
        }
        Ended::NoThread(err) => return (Verdict::Fail, format!("no thread to run on: {err}")),
        Ended::Returned(_) => {}
    }
    if let Some(kind) = outcome.steps.as_ref().and_then(|s| s.unknown_kind) {
        return (
            Verdict::Fail,
            format!(
                "a step answered kind {kind}, which this plugin-api does not know (was the \
                 plugin built against a newer llm-host-plugin-api?) (events: {summary})"
            ),
        );
    }
    let summary = match &outcome.steps {
        Some(steps) => format!("{summary}; {}", steps.describe()),
        None => summary,
    };
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
    path: Path,
    seen: &mut Seen,
) -> (Verdict, String) {
    let outcome = run(
        adapter,
        &request(options),
        Mode::StopAfterFirstText,
        options,
        path,
    );
    seen.record("the cancelled request", &outcome);
    let Some(stopped_at) = outcome.stopped_at else {
        return match &outcome.ended {
            Ended::TimedOut => (
                Verdict::Fail,
                format!(
                    "no text within {:?} and {} {}{}; events: {}",
                    options.generate_timeout,
                    path.turn(),
                    path.did_not_end(),
                    outcome.stuck(),
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
                "{} {} within {:?} after the sink answered stop{}{}",
                path.turn(),
                path.did_not_end(),
                options.cancel_timeout,
                outcome.stuck(),
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
                "{} {} after the sink answered stop, sending nothing more",
                match path {
                    Path::Generate => "returned",
                    Path::Steps => "the step returned and the stepper was dropped",
                },
                waited.map_or_else(|| "at once".to_owned(), |d| format!("{d:.1?}"))
            ),
        ),
    }
}

fn malformed_request(
    adapter: &Arc<ModelAdapterBox>,
    options: &ModelOptions,
    path: Path,
    seen: &mut Seen,
) -> (Verdict, String) {
    let outcome = run(
        adapter,
        "this is not a model request",
        Mode::Follow,
        options,
        path,
    );
    seen.record("a malformed request", &outcome);
    let error_event = outcome.events.iter().find_map(|event| match event {
        Event::Error { code, message } => Some(format!("{code}: {message}")),
        _ => None,
    });
    match (&outcome.ended, error_event) {
        (Ended::TimedOut, _) => (
            Verdict::Fail,
            format!(
                "{} of a malformed request {} within {:?}{}",
                path.turn(),
                path.did_not_end(),
                options.generate_timeout,
                outcome.stuck()
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

fn no_blocking(seen: &Seen, options: &ModelOptions) -> (Verdict, String) {
    let bound = options.step_bound;
    // Steps first: they are the calls that most often block.
    let breaches: Vec<String> = [Call::Step, Call::Start, Call::Drop]
        .iter()
        .filter_map(|call| seen.slowest[call.index()].as_ref())
        .filter(|(slow, _)| slow.took > bound)
        .map(|(slow, run)| format!("in {run}, {}", slow.breach()))
        .collect();
    if !breaches.is_empty() {
        return (
            Verdict::Fail,
            format!("{}; the bound is {bound:?}", breaches.join("; also, ")),
        );
    }
    let slowest = seen
        .slowest
        .iter()
        .flatten()
        .max_by_key(|(slow, _)| slow.took);
    match slowest {
        None => (
            Verdict::Warn,
            "not exercised: no start, step or drop of a stepper returned to be timed".to_owned(),
        ),
        Some((slow, run)) => (
            Verdict::Pass,
            format!(
                "{} calls (start, step, drop), none over {bound:?}: the slowest, {} in {run}, \
                 took {:.1?}",
                seen.calls,
                slow.call.what(),
                slow.took
            ),
        ),
    }
}

fn wake(seen: &Seen) -> (Verdict, String) {
    let Some(steps) = &seen.simple else {
        return (
            Verdict::Skip,
            "the simple request did not run (see steps.event_order)".to_owned(),
        );
    };
    if let Some(waited) = steps.unwoken {
        return (
            Verdict::Fail,
            format!(
                "a step answered PENDING and no wake came in {waited:.1?}: the host would never \
                 step the turn again (keep the Waker that start gets and call wake() from the \
                 thread that makes the turn ready)"
            ),
        );
    }
    if steps.pending == 0 {
        return (
            Verdict::Skip,
            format!(
                "not exercised: no step of the simple request answered PENDING ({})",
                steps.describe()
            ),
        );
    }
    (
        Verdict::Pass,
        format!(
            "{} answered PENDING, each was woken and stepped again ({}, {} from another \
             thread)",
            plural(steps.pending, "step"),
            plural(steps.wakes, "wake"),
            steps.wakes_elsewhere
        ),
    )
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
        None => Some(format!(
            "{} without an `end` or `error` event (the host fills in `end`, but the contract \
             asks for one)",
            match outcome.path {
                Path::Generate => "generate returned",
                Path::Steps => "the steps ended",
            }
        )),
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
#[derive(Default)]
struct Log {
    events: Vec<Event>,
    /// Index of the event the sink first answered stop to because of a cancel.
    stopped_at: Option<usize>,
    /// When it did.
    stopped_when: Option<Instant>,
    /// Whether an `end` or `error` went by.
    ended: bool,
    /// What the step driver did (stepped runs).
    steps: StepLog,
}

impl Log {
    /// Whether the sink answered stop: the host stops stepping then.
    fn stopped(&self) -> bool {
        self.stopped_at.is_some() || self.ended
    }
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

fn lock<T>(log: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change is made whole; a poisoned lock still guards consistent data.
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
    /// generate (or the stepped turn) returned this.
    Returned(Result<(), PluginError>),
    /// It had not returned when the suite stopped waiting.
    TimedOut,
    /// No thread could be started.
    NoThread(String),
}

/// A generation as the suite saw it.
struct RunOutcome {
    path: Path,
    events: Vec<Event>,
    stopped_at: Option<usize>,
    returned_after_stop: Option<Duration>,
    ended: Ended,
    /// How the steps went (stepped runs).
    steps: Option<StepReport>,
}

impl RunOutcome {
    /// For a stepped run that did not end: what it was stuck in, as
    /// ` (...)`; empty otherwise.
    fn stuck(&self) -> String {
        match &self.steps {
            Some(steps) => match (steps.unwoken, steps.running) {
                (Some(waited), _) => {
                    format!(" (a step answered PENDING and no wake came in {waited:.1?})")
                }
                (None, Some(slow)) => format!(
                    " ({} had not returned after {:.1?})",
                    slow.call.what(),
                    slow.took
                ),
                _ => format!(" (after {})", steps.describe()),
            },
            None => String::new(),
        }
    }
}

/// Which way a turn runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// `generate`, on a thread of its own.
    Generate,
    /// `start`, then `step` until done, as the host runs a stepped adapter.
    Steps,
}

impl Path {
    /// The names of this path's checks.
    fn check_names(self) -> &'static [&'static str] {
        match self {
            Path::Generate => &GENERATE_CHECKS,
            Path::Steps => &STEPS_CHECKS,
        }
    }

    /// What runs the turn, for messages.
    fn turn(self) -> &'static str {
        match self {
            Path::Generate => "generate",
            Path::Steps => "the stepped turn",
        }
    }

    /// How it failed to end in time, for messages.
    fn did_not_end(self) -> &'static str {
        match self {
            Path::Generate => "did not return",
            Path::Steps => "did not end",
        }
    }
}

/// Runs a turn of `adapter` for `request` on a thread with a recording sink,
/// through `generate` or in steps, and waits: up to `generate_timeout`, or
/// `cancel_timeout` past the sink's stop answer in
/// [`Mode::StopAfterFirstText`]. A turn still running then is left to its
/// thread.
fn run(
    adapter: &Arc<ModelAdapterBox>,
    request: &str,
    mode: Mode,
    options: &ModelOptions,
    path: Path,
) -> RunOutcome {
    let log = Arc::new(Mutex::new(Log::default()));
    let wakes = Arc::new(Wakes::default());
    let (done, finished) = mpsc::channel();
    let started = Instant::now();
    let deadline = started + options.generate_timeout;
    let spawned = {
        let adapter = Arc::clone(adapter);
        let request = request.to_owned();
        let wakes = Arc::clone(&wakes);
        let mut recorder = Recorder {
            log: Arc::clone(&log),
            mode,
        };
        std::thread::Builder::new()
            .name("conformance-generate".to_owned())
            .spawn(move || {
                let result = match path {
                    Path::Generate => {
                        let sink = EventSink_TO::from_ptr(&mut recorder, TD_Opaque);
                        adapter
                            .generate(RStr::from(request.as_str()), sink)
                            .into_result()
                    }
                    Path::Steps => drive(&adapter, &request, &mut recorder, &wakes, deadline),
                };
                let _ = done.send((result, Instant::now()));
            })
    };
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
                        None => deadline,
                    };
                    if Instant::now() >= deadline {
                        break (Ended::TimedOut, None);
                    }
                }
            }
        },
    };
    let log = lock(&log);
    let steps = (path == Path::Steps).then(|| StepReport::new(&log.steps, &lock(&wakes.state)));
    RunOutcome {
        path,
        events: log.events.clone(),
        stopped_at: log.stopped_at,
        returned_after_stop: match (log.stopped_when, ended.1) {
            (Some(stopped), Some(returned)) => Some(returned.saturating_duration_since(stopped)),
            _ => None,
        },
        // A driver that gave up waiting ended the turn, but the turn did
        // not end.
        ended: if log.steps.gave_up {
            Ended::TimedOut
        } else {
            ended.0
        },
        steps,
    }
}

// ---------------------------------------------------------------------------
// Running a turn in steps
// ---------------------------------------------------------------------------

/// Runs a stepped turn on the calling thread, as the host runs one on its
/// workers: `start`, then `step` until [`Next::Done`], sleeping for
/// [`Next::Sleep`], waiting on `wakes` for [`Next::Pending`], stepping at
/// once for [`Next::Ready`]; stepping stops as soon as the sink answered
/// stop, and the stepper is dropped. Every `start`, `step` and drop is timed
/// into the recorder's log. At `deadline` the driver gives up (and says so
/// in the log).
fn drive(
    adapter: &ModelAdapterBox,
    request: &str,
    recorder: &mut Recorder,
    wakes: &Arc<Wakes>,
    deadline: Instant,
) -> Result<(), PluginError> {
    let log = Arc::clone(&recorder.log);
    lock(&wakes.state).driver = Some(std::thread::current().id());
    let waker = TurnWaker_TO::from_value(WakeHandle(Arc::clone(wakes)), TD_Opaque);
    let mut stepper = timed(&log, Call::Start, || {
        adapter.start(RStr::from(request), waker).into_result()
    })?;
    let result = loop {
        let answer = timed(&log, Call::Step, || {
            stepper
                .step(EventSink_TO::from_ptr(&mut *recorder, TD_Opaque))
                .into_result()
        });
        let next = match answer {
            Ok(step) => step.next(),
            Err(err) => break Err(err),
        };
        {
            let mut log = lock(&log);
            log.steps.count(next);
            if log.stopped() {
                break Ok(());
            }
        }
        match next {
            Next::Done => break Ok(()),
            Next::Ready => {}
            Next::Sleep(pause) => {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            }
            Next::Pending => {
                lock(&log).steps.waiting_since = Some(Instant::now());
                if !wakes.wait_until(deadline) {
                    // `waiting_since` stays: the wake never came.
                    lock(&log).steps.gave_up = true;
                    break Ok(());
                }
                let mut log = lock(&log);
                log.steps.waiting_since = None;
                log.steps.woken += 1;
            }
            Next::Unknown(kind) => {
                lock(&log).steps.unknown_kind = Some(kind);
                break Ok(());
            }
        }
        if Instant::now() >= deadline {
            lock(&log).steps.gave_up = true;
            break Ok(());
        }
    };
    timed(&log, Call::Drop, move || drop(stepper));
    result
}

/// Runs `call` and times it into `log`: wall time, less the time the thread
/// waited for a CPU meanwhile (where the system tells it), so a preempted
/// call on a loaded machine does not count as a blocking one.
fn timed<T>(log: &Mutex<Log>, call: Call, run: impl FnOnce() -> T) -> T {
    let queued_before = cpu_wait();
    let began = Instant::now();
    lock(log).steps.in_call = Some((call, began));
    let value = run();
    let wall = began.elapsed();
    let queued = match (queued_before, cpu_wait()) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => Duration::ZERO,
    };
    let took = wall.saturating_sub(queued);
    let mut log = lock(log);
    log.steps.in_call = None;
    log.steps.calls += 1;
    if call == Call::Step {
        log.steps.steps += 1;
    }
    keep_slowest(
        &mut log.steps.slowest,
        Slow {
            call,
            took,
            unfinished: false,
        },
    );
    value
}

/// Keeps `slow` in its kind's slot of `slowest` if it is the slowest yet.
fn keep_slowest(slowest: &mut [Option<Slow>; 3], slow: Slow) {
    let slot = &mut slowest[slow.call.index()];
    if slot.is_none_or(|kept| slow.took > kept.took) {
        *slot = Some(slow);
    }
}

/// How long the calling thread has waited for a CPU since it started, from
/// Linux's `/proc/thread-self/schedstat` (its second field); `None` where
/// that is not available.
fn cpu_wait() -> Option<Duration> {
    let stats = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = stats.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// A call into a stepped adapter that runs on the host's workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Start,
    Step,
    Drop,
}

impl Call {
    /// Its slot in the arrays of slowest calls.
    fn index(self) -> usize {
        match self {
            Call::Start => 0,
            Call::Step => 1,
            Call::Drop => 2,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Call::Start => "start",
            Call::Step => "a step",
            Call::Drop => "dropping the stepper",
        }
    }
}

/// A timed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slow {
    call: Call,
    /// How long it took (less the time spent waiting for a CPU).
    took: Duration,
    /// Whether it had not returned yet when the suite stopped waiting (then
    /// `took` is how long it had run by then).
    unfinished: bool,
}

impl Slow {
    /// What is wrong with taking that long, and what to do instead.
    fn breach(&self) -> String {
        let took = format!(
            "{} {} ms{}",
            if self.unfinished { "over" } else { "" },
            self.took.as_millis(),
            if self.unfinished {
                " (it had not returned when the suite stopped waiting)"
            } else {
                ""
            }
        );
        let took = took.trim_start();
        match self.call {
            Call::Step => format!(
                "a step took {took}; steps run on the host's shared workers and must not block \
                 (answer Step::sleep or PENDING instead)"
            ),
            Call::Start => format!(
                "start took {took}; start runs on the host's shared workers and must not block \
                 (do slow setup in the steps, answering PENDING until it is done)"
            ),
            Call::Drop => format!(
                "dropping the stepper took {took}; the host drops it on its shared workers, so \
                 its Drop must not block (hand slow cleanup to a thread of its own)"
            ),
        }
    }
}

/// What the step driver did, shared with the thread that waits.
#[derive(Clone, Debug, Default)]
struct StepLog {
    /// `start`, `step` and drop calls that returned.
    calls: usize,
    /// `step` calls that returned.
    steps: usize,
    /// The slowest call of each kind that returned (by [`Call::index`]).
    slowest: [Option<Slow>; 3],
    /// The call in progress, and since when.
    in_call: Option<(Call, Instant)>,
    /// Steps answered, by kind.
    ready: usize,
    sleep: usize,
    pending: usize,
    done: usize,
    /// `PENDING` answers a wake came for.
    woken: usize,
    /// Since when the driver waits for a wake.
    waiting_since: Option<Instant>,
    /// A step answered a kind this plugin-api does not know.
    unknown_kind: Option<u8>,
    /// The driver gave up at the deadline.
    gave_up: bool,
}

impl StepLog {
    fn count(&mut self, next: Next) {
        match next {
            Next::Ready => self.ready += 1,
            Next::Sleep(_) => self.sleep += 1,
            Next::Pending => self.pending += 1,
            Next::Done => self.done += 1,
            Next::Unknown(_) => {}
        }
    }
}

/// How a stepped run went, as the checks judge it.
#[derive(Clone, Debug, Default)]
struct StepReport {
    calls: usize,
    steps: usize,
    /// The slowest call of each kind, the one still running included.
    slowest: [Option<Slow>; 3],
    /// The call still running when the suite stopped waiting, and for how
    /// long it had run.
    running: Option<Slow>,
    ready: usize,
    sleep: usize,
    pending: usize,
    done: usize,
    /// How long the driver had waited for a wake that never came.
    unwoken: Option<Duration>,
    unknown_kind: Option<u8>,
    /// Calls of the turn's waker, and those from a thread other than the
    /// driver's.
    wakes: usize,
    wakes_elsewhere: usize,
}

impl StepReport {
    fn new(log: &StepLog, wakes: &WakeState) -> Self {
        let now = Instant::now();
        let running = log.in_call.map(|(call, since)| Slow {
            call,
            took: now.saturating_duration_since(since),
            unfinished: true,
        });
        let mut slowest = log.slowest;
        if let Some(running) = running {
            keep_slowest(&mut slowest, running);
        }
        Self {
            calls: log.calls + usize::from(running.is_some()),
            steps: log.steps,
            slowest,
            running,
            ready: log.ready,
            sleep: log.sleep,
            pending: log.pending,
            done: log.done,
            unwoken: log
                .waiting_since
                .map(|since| now.saturating_duration_since(since)),
            unknown_kind: log.unknown_kind,
            wakes: wakes.count,
            wakes_elsewhere: wakes.elsewhere,
        }
    }

    /// `3 steps: 1 ready, 1 pending, 1 done`.
    fn describe(&self) -> String {
        let kinds: Vec<String> = [
            (self.ready, "ready"),
            (self.sleep, "sleep"),
            (self.pending, "pending"),
            (self.done, "done"),
        ]
        .iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, kind)| format!("{count} {kind}"))
        .collect();
        if kinds.is_empty() {
            plural(self.steps, "step")
        } else {
            format!("{}: {}", plural(self.steps, "step"), kinds.join(", "))
        }
    }
}

/// The turn's wake flag, which the driver waits on, and a count of wakes.
#[derive(Default)]
struct Wakes {
    state: Mutex<WakeState>,
    changed: Condvar,
}

#[derive(Default)]
struct WakeState {
    /// A wake not yet consumed by the driver.
    woken: bool,
    /// Wakes in all.
    count: usize,
    /// Wakes from a thread other than the driver's.
    elsewhere: usize,
    /// The driver's thread.
    driver: Option<ThreadId>,
}

impl Wakes {
    /// Waits until woken (consuming the wake) or `deadline`; answers whether
    /// a wake came. A wake before the wait is not lost.
    fn wait_until(&self, deadline: Instant) -> bool {
        let mut state = lock(&self.state);
        loop {
            if std::mem::replace(&mut state.woken, false) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map_or_else(|poisoned| poisoned.into_inner().0, |(state, _)| state);
        }
    }
}

/// The waker the suite hands to `start`: wakes the driver, from any thread.
struct WakeHandle(Arc<Wakes>);

impl TurnWaker for WakeHandle {
    fn wake(&self) {
        // Called by the plugin, maybe across the FFI boundary: never panics.
        let mut state = lock(&self.0.state);
        state.woken = true;
        state.count += 1;
        if state.driver != Some(std::thread::current().id()) {
            state.elsewhere += 1;
        }
        drop(state);
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_host_plugin_api::{self as api, Model, Sink, Step, SteppedModel, Steps, Waker};

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
        // Not stepped: the steps checks do not apply, and that is no failure.
        for result in &results {
            let expected = if result.name.starts_with("steps.") {
                Verdict::Skip
            } else {
                Verdict::Pass
            };
            assert_eq!(result.verdict, expected, "{}", report(&results));
        }
        let (_, detail) = verdict(&results, "steps.event_order");
        assert!(detail.starts_with("not stepped"), "{detail}");
        assert_model_conforms(
            &|settings: &str| {
                no_settings(settings)?;
                Ok(api::model_adapter(Words(Flaw::None)))
            },
            &ModelOptions::default(),
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
        assert_eq!(unknown, Verdict::Skip, "{detail}");
        assert!(detail.contains("settings alone were refused"), "{detail}");
    }

    /// A stepped model with one flaw at most: the prompt's words, one a
    /// step, each next step woken from the model's own thread (PENDING), or
    /// paced by the clock (sleep).
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum StepFlaw {
        None,
        /// Answers sleep instead of PENDING: never waits for a wake.
        Paced,
        /// Sleeps 60 ms inside every step.
        Blocks,
        /// Sleeps 2 s inside its third step.
        HangsInAStep,
        /// Answers PENDING and never wakes the turn.
        LosesTheWake,
        /// Sends one more text in the step whose text the sink stopped.
        TalksAfterStop,
        /// Sleeps 60 ms in its Drop.
        SlowDrop,
        /// Panics in its second step.
        Panics,
    }

    struct SteppedWords {
        flaw: StepFlaw,
        /// To the model's thread, which wakes each turn it is sent.
        wakes: mpsc::Sender<Waker>,
    }

    impl SteppedWords {
        fn new(flaw: StepFlaw) -> Self {
            let (wakes, to_wake) = mpsc::channel::<Waker>();
            // Ends when the model (every sender) is gone.
            std::thread::spawn(move || to_wake.into_iter().for_each(|waker| waker.wake()));
            Self { flaw, wakes }
        }
    }

    struct WordSteps {
        flaw: StepFlaw,
        words: Vec<String>,
        sent: usize,
        started: bool,
        waker: Waker,
        wakes: mpsc::Sender<Waker>,
    }

    impl SteppedModel for SteppedWords {
        type Turn = WordSteps;

        fn start(&self, request: ModelRequest, waker: Waker) -> Result<WordSteps, PluginError> {
            let prompt = request
                .messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default();
            Ok(WordSteps {
                flaw: self.flaw,
                words: prompt.split_whitespace().map(str::to_owned).collect(),
                sent: 0,
                started: false,
                waker,
                wakes: self.wakes.clone(),
            })
        }
    }

    impl Steps for WordSteps {
        fn step(&mut self, sink: &mut Sink<'_>) -> Result<Step, PluginError> {
            if !self.started {
                self.started = true;
                if sink.start("", "stepped-words").is_stop() {
                    return Ok(Step::DONE);
                }
            }
            match self.flaw {
                StepFlaw::Blocks => std::thread::sleep(Duration::from_millis(60)),
                StepFlaw::HangsInAStep if self.sent == 2 => {
                    std::thread::sleep(Duration::from_secs(2));
                }
                StepFlaw::Panics if self.sent == 1 => panic!("stepped words panicked on purpose"),
                _ => {}
            }
            let Some(word) = self.words.get(self.sent) else {
                let sent = self.sent as u64;
                sink.usage(Usage {
                    input_tokens: 3,
                    output_tokens: sent,
                    total_tokens: 3 + sent,
                });
                sink.end(FinishReason::STOP);
                return Ok(Step::DONE);
            };
            let stop = sink.text(word).is_stop();
            self.sent += 1;
            if stop {
                if self.flaw == StepFlaw::TalksAfterStop {
                    let _ = sink.text("one more");
                }
                return Ok(Step::DONE);
            }
            Ok(match self.flaw {
                StepFlaw::Paced => Step::sleep(Duration::from_millis(1)),
                StepFlaw::LosesTheWake => Step::PENDING,
                _ => {
                    // The model's thread wakes the turn, maybe before this
                    // step returns (no wake is lost).
                    let _ = self.wakes.send(self.waker.clone());
                    Step::PENDING
                }
            })
        }
    }

    impl Drop for WordSteps {
        fn drop(&mut self) {
            if self.flaw == StepFlaw::SlowDrop {
                std::thread::sleep(Duration::from_millis(60));
            }
        }
    }

    fn run_stepped(flaw: StepFlaw, options: &ModelOptions) -> Vec<ModelCheck> {
        check_model(
            &|settings: &str| {
                no_settings(settings)?;
                Ok(api::stepped_model_adapter(SteppedWords::new(flaw)))
            },
            options,
        )
    }

    /// The milliseconds in `... {what} took N ms; ...`.
    fn millis_taken(detail: &str, what: &str) -> u128 {
        detail
            .split(&format!("{what} took "))
            .nth(1)
            .and_then(|rest| rest.trim_start_matches("over ").split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no duration in {detail}"))
    }

    #[test]
    fn a_conforming_stepped_model_passes_every_check_both_ways() {
        let results = run_stepped(StepFlaw::None, &ModelOptions::default());
        assert_eq!(
            results.iter().map(|r| r.name).collect::<Vec<_>>(),
            check_names()
        );
        assert!(
            results.iter().all(|r| r.verdict == Verdict::Pass),
            "{}",
            report(&results)
        );
        let (_, detail) = verdict(&results, "steps.event_order");
        assert!(detail.starts_with("start, 19 text, usage"), "{detail}");
        assert!(detail.contains("20 steps: 19 pending, 1 done"), "{detail}");
        let (_, detail) = verdict(&results, "steps.wake");
        assert!(
            detail.starts_with("19 steps answered PENDING, each was woken and stepped again"),
            "{detail}"
        );
        assert!(
            detail.contains("19 wakes, 19 from another thread"),
            "{detail}"
        );
        let (_, detail) = verdict(&results, "steps.cancel");
        assert!(detail.contains("the stepper was dropped"), "{detail}");
        let (_, detail) = verdict(&results, "steps.errors");
        assert!(detail.contains("invalid_input"), "{detail}");
        let (_, detail) = verdict(&results, "steps.no_blocking");
        assert!(detail.contains("none over 20ms"), "{detail}");
    }

    #[test]
    fn a_stepped_model_that_never_waits_skips_only_the_wake_check() {
        let options = ModelOptions::default();
        let results = run_stepped(StepFlaw::Paced, &options);
        for result in &results {
            let expected = if result.name == "steps.wake" {
                Verdict::Skip
            } else {
                Verdict::Pass
            };
            assert_eq!(result.verdict, expected, "{}", report(&results));
        }
        let (_, detail) = verdict(&results, "steps.wake");
        assert!(detail.contains("no step of the simple request answered PENDING"));
        assert!(detail.contains("19 sleep, 1 done"), "{detail}");
        let make = |settings: &str| {
            no_settings(settings)?;
            Ok(api::stepped_model_adapter(SteppedWords::new(
                StepFlaw::Paced,
            )))
        };
        assert_model_conforms(&make, &options);
    }

    #[test]
    fn a_step_that_blocks_fails_no_blocking_alone() {
        let results = run_stepped(StepFlaw::Blocks, &ModelOptions::default());
        let (no_blocking, detail) = verdict(&results, "steps.no_blocking");
        assert_eq!(no_blocking, Verdict::Fail, "{}", report(&results));
        assert!(
            detail.contains(
                "ms; steps run on the host's shared workers and must not block (answer \
                 Step::sleep or PENDING instead)"
            ),
            "{detail}"
        );
        assert!(millis_taken(&detail, "a step") >= 60, "{detail}");
        // Blocking is no breach on generate's own thread, and the steps keep
        // the order: only the step path's no_blocking says what is wrong.
        for result in results.iter().filter(|r| r.name != "steps.no_blocking") {
            assert_eq!(result.verdict, Verdict::Pass, "{}", report(&results));
        }
        let (_, detail) = verdict(&results, "steps.event_order");
        assert!(detail.contains("20 steps"), "{detail}");

        // The bound is the caller's.
        let lenient = ModelOptions {
            step_bound: Duration::from_secs(1),
            ..ModelOptions::default()
        };
        let results = run_stepped(StepFlaw::Blocks, &lenient);
        let (no_blocking, detail) = verdict(&results, "steps.no_blocking");
        assert_eq!(no_blocking, Verdict::Pass, "{detail}");
        assert!(detail.contains("none over 1s"), "{detail}");
    }

    #[test]
    fn a_slow_drop_fails_no_blocking() {
        let results = run_stepped(StepFlaw::SlowDrop, &ModelOptions::default());
        let (no_blocking, detail) = verdict(&results, "steps.no_blocking");
        assert_eq!(no_blocking, Verdict::Fail, "{detail}");
        assert!(
            detail.contains("dropping the stepper took ")
                && detail.contains("its Drop must not block"),
            "{detail}"
        );
        assert!(
            millis_taken(&detail, "dropping the stepper") >= 60,
            "{detail}"
        );
    }

    #[test]
    fn a_step_that_hangs_fails_in_bounded_time() {
        let options = ModelOptions {
            generate_timeout: Duration::from_millis(400),
            ..ModelOptions::default()
        };
        let began = Instant::now();
        let results = run_stepped(StepFlaw::HangsInAStep, &options);
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
        let (event_order, detail) = verdict(&results, "steps.event_order");
        assert_eq!(event_order, Verdict::Fail, "{detail}");
        assert!(
            detail.contains("the stepped turn did not end within 400ms (a step had not returned"),
            "{detail}"
        );
        let (no_blocking, detail) = verdict(&results, "steps.no_blocking");
        assert_eq!(no_blocking, Verdict::Fail, "{detail}");
        assert!(
            detail.contains("a step took over ")
                && detail.contains("it had not returned when the suite stopped waiting"),
            "{detail}"
        );
    }

    #[test]
    fn a_lost_wake_fails_the_wake_check() {
        let options = ModelOptions {
            generate_timeout: Duration::from_millis(300),
            ..ModelOptions::default()
        };
        let results = run_stepped(StepFlaw::LosesTheWake, &options);
        let (wake, detail) = verdict(&results, "steps.wake");
        assert_eq!(wake, Verdict::Fail, "{}", report(&results));
        assert!(
            detail.starts_with("a step answered PENDING and no wake came in")
                && detail.contains("the host would never step the turn again"),
            "{detail}"
        );
        let (event_order, detail) = verdict(&results, "steps.event_order");
        assert_eq!(event_order, Verdict::Fail, "{detail}");
        assert!(
            detail.contains("did not end within 300ms (a step answered PENDING and no wake came"),
            "{detail}"
        );
        assert!(detail.contains("events so far: start, text"), "{detail}");
        // A stop answer ends the turn before any wait: cancel still passes.
        assert_eq!(verdict(&results, "steps.cancel").0, Verdict::Pass);
    }

    #[test]
    fn talking_after_a_stop_fails_steps_cancel() {
        let results = run_stepped(StepFlaw::TalksAfterStop, &ModelOptions::default());
        let (cancel, detail) = verdict(&results, "steps.cancel");
        assert_eq!(cancel, Verdict::Fail, "{detail}");
        assert!(
            detail.contains("1 event after the sink answered stop to the first text: text"),
            "{detail}"
        );
        assert_eq!(verdict(&results, "steps.event_order").0, Verdict::Pass);
    }

    #[test]
    fn a_panicking_step_fails_steps_no_panic() {
        let results = run_stepped(StepFlaw::Panics, &ModelOptions::default());
        let (no_panic, detail) = verdict(&results, "steps.no_panic");
        assert_eq!(no_panic, Verdict::Fail, "{detail}");
        assert!(
            detail.contains("stepped words panicked on purpose"),
            "{detail}"
        );
        // generate runs the same steps, so it panics there too.
        assert_eq!(verdict(&results, "no_panic").0, Verdict::Fail);
    }

    #[test]
    fn no_blocking_names_each_kind_of_call_over_the_bound() {
        let slow = |call, millis| Slow {
            call,
            took: Duration::from_millis(millis),
            unfinished: false,
        };
        let mut seen = Seen {
            calls: 5,
            ..Seen::default()
        };
        seen.slowest[Call::Start.index()] = Some((slow(Call::Start, 1), "run a".to_owned()));
        seen.slowest[Call::Drop.index()] = Some((slow(Call::Drop, 30), "run b".to_owned()));
        seen.slowest[Call::Step.index()] = Some((slow(Call::Step, 45), "run c".to_owned()));
        let (verdict, detail) = no_blocking(&seen, &ModelOptions::default());
        assert_eq!(verdict, Verdict::Fail);
        assert!(
            detail.starts_with("in run c, a step took 45 ms; steps run on the host's shared")
                && detail.contains("; also, in run b, dropping the stepper took 30 ms; ")
                && detail.ends_with("; the bound is 20ms"),
            "{detail}"
        );
        assert!(!detail.contains("start took"), "{detail}");
        let lenient = ModelOptions {
            step_bound: Duration::from_millis(50),
            ..ModelOptions::default()
        };
        let (verdict, detail) = no_blocking(&seen, &lenient);
        assert_eq!(verdict, Verdict::Pass);
        assert!(
            detail.contains("5 calls (start, step, drop), none over 50ms: the slowest, a step in run c, took 45.0ms"),
            "{detail}"
        );
        let (verdict, _) = no_blocking(&Seen::default(), &lenient);
        assert_eq!(verdict, Verdict::Warn);
    }

    #[test]
    fn a_refused_constructor_skips_the_steps_checks_too() {
        let results = check_model(
            &|_: &str| Err(PluginError::invalid_settings("no")),
            &ModelOptions::default(),
        );
        for name in STEPS_CHECKS {
            let (skip, detail) = verdict(&results, name);
            assert_eq!(skip, Verdict::Skip, "{name}");
            assert!(detail.contains("see construct"), "{detail}");
        }
    }

    fn outcome(events: Vec<Event>, ended: Result<(), PluginError>) -> RunOutcome {
        RunOutcome {
            path: Path::Generate,
            events,
            stopped_at: None,
            returned_after_stop: None,
            ended: Ended::Returned(ended),
            steps: None,
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
        let mut seen = Seen::default();
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
