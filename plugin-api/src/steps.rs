//! Turns in steps: a model that never waits on blocking I/O (a deterministic
//! or simulated model, one paced by a clock, one fed by a thread or event
//! loop of its own) runs its turns step by step on the host's async workers,
//! instead of each turn holding a thread of its own inside
//! [`ModelAdapter::generate`]. A thousand paced streams then cost a thousand
//! small state machines, not a thousand threads, and an instant model
//! streams without a single thread hop.
//!
//! The host asks [`ModelAdapter::stepped`] once per adapter. For a stepped
//! adapter it calls [`ModelAdapter::start`] once per turn, then
//! [`TurnStepper::step`] until it answers [`Step::DONE`]. Each step emits the
//! events that are ready into the sink, in the order the module
//! [`model`](crate::model) gives, and answers what comes next:
//!
//! - [`Step::READY`]: call again as soon as what this step emitted is sent;
//! - [`Step::sleep`]: call again after a pause (a paced model);
//! - [`Step::PENDING`]: call again once the turn's [`Waker`] is woken, from
//!   any thread (a wake may also come with nothing new ready, a late one
//!   from before the last step: answer `PENDING` again);
//! - [`Step::DONE`]: the turn is over.
//!
//! A step must not block: it runs on a worker that serves many connections.
//! The host sends a step's events when the step returns, so a step emits what
//! is ready, a few dozen events at most, and answers `READY` for more. On
//! cancel the host stops calling and drops the stepper (its `Drop` releases
//! what the turn holds); sink calls answer [`Flow::STOP`](crate::Flow::STOP)
//! as they do for `generate`.
//!
//! A stepped adapter still answers `generate`, for hosts and tools that call
//! only that: [`stepped_model_adapter`] does it by running the same steps on
//! the calling thread.
//!
//! Evolution rule: as everywhere in this crate (see its evolution rule),
//! trait methods are only appended with a default body, and [`Step`] kinds
//! are only added.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, RResult, RStr},
    StableAbi,
};

use crate::model::{EventSinkRef, ModelAdapter, ModelAdapterBox, ModelAdapter_TO, Sink};
use crate::{guard, ModelRequest, PluginError};

/// What a stepped turn does next.
///
/// A kind byte and a pause in microseconds. Evolution rule: kinds are only
/// added; a host that does not know a kind ends the turn with an error.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Step {
    kind: u8,
    micros: u64,
}

/// A [`Step`] as a Rust enum, for matching.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Next {
    /// See [`Step::DONE`].
    Done,
    /// See [`Step::READY`].
    Ready,
    /// See [`Step::PENDING`].
    Pending,
    /// See [`Step::sleep`].
    Sleep(Duration),
    /// A kind this plugin-api does not know (from a newer peer).
    Unknown(u8),
}

impl Step {
    /// The turn is over (its `end` or `error` was emitted, or the sink said stop).
    pub const DONE: Step = Step { kind: 0, micros: 0 };
    /// Call again as soon as this step's events are sent.
    pub const READY: Step = Step { kind: 1, micros: 0 };
    /// Call again once the turn's [`Waker`] is woken.
    pub const PENDING: Step = Step { kind: 2, micros: 0 };

    /// Call again after `pause` (rounded to microseconds; a paced model
    /// computes it from its own clock, so pauses do not add up drift).
    pub fn sleep(pause: Duration) -> Step {
        Step {
            kind: 3,
            micros: u64::try_from(pause.as_micros()).unwrap_or(u64::MAX),
        }
    }

    /// What the step asks for.
    pub fn next(self) -> Next {
        match self.kind {
            0 => Next::Done,
            1 => Next::Ready,
            2 => Next::Pending,
            3 => Next::Sleep(Duration::from_micros(self.micros)),
            other => Next::Unknown(other),
        }
    }
}

/// How a pending turn asks the host to step it again. The host implements
/// it; it may be called from any thread, any number of times (wakes before
/// the step that answers `PENDING` returns are not lost).
///
/// Evolution rule: methods are only appended at the end, each with a default
/// body; `#[sabi(last_prefix_field)]` stays on `wake`; the release that
/// appends freezes the layout it replaces in [`compat`](crate::compat) (the
/// crate's evolution rule).
#[sabi_trait]
pub trait TurnWaker: Send + Sync {
    /// Asks for the next step.
    #[sabi(last_prefix_field)]
    fn wake(&self);
}

/// A waker trait object as the host passes it to [`ModelAdapter::start`].
pub type TurnWakerBox = TurnWaker_TO<'static, RBox<()>>;

/// One turn run in steps. The adapter implements it; the host drops it when
/// the turn is over or cancelled.
///
/// Evolution rule: methods are only appended at the end, each with a default
/// body; `#[sabi(last_prefix_field)]` stays on `step`; the release that
/// appends freezes the layout it replaces in [`compat`](crate::compat) (the
/// crate's evolution rule).
#[sabi_trait]
pub trait TurnStepper: Send {
    /// Emits the events that are ready and answers what comes next. An
    /// error is the turn's error, as from `generate`.
    #[sabi(last_prefix_field)]
    fn step(&mut self, sink: EventSinkRef<'_>) -> RResult<Step, PluginError>;
}

/// A stepper trait object as [`ModelAdapter::start`] returns it.
pub type TurnStepperBox = TurnStepper_TO<'static, RBox<()>>;

/// The turn's waker, the Rust way: cheap to clone, to hand to another thread.
#[derive(Clone)]
pub struct Waker {
    inner: Arc<TurnWakerBox>,
}

impl Waker {
    /// Wraps the host's waker.
    pub fn new(inner: TurnWakerBox) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Asks the host to step the turn again.
    pub fn wake(&self) {
        self.inner.wake();
    }
}

/// One turn of a [`SteppedModel`].
pub trait Steps: Send + 'static {
    /// See [`TurnStepper::step`].
    fn step(&mut self, sink: &mut Sink<'_>) -> Result<Step, PluginError>;
}

/// A model backend whose turns run in steps, the Rust way. Implement it and
/// wrap the value with [`stepped_model_adapter`] in your plugin's `new_model`.
pub trait SteppedModel: Send + Sync + 'static {
    /// A turn in progress.
    type Turn: Steps;

    /// Starts a turn. Keep `waker` if a step will answer [`Step::PENDING`].
    fn start(&self, request: ModelRequest, waker: Waker) -> Result<Self::Turn, PluginError>;
}

struct SteppedShim<M>(M);

impl<M: SteppedModel> ModelAdapter for SteppedShim<M> {
    fn generate(&self, request: RStr<'_>, sink: EventSinkRef<'_>) -> RResult<(), PluginError> {
        guard(|| {
            let request: ModelRequest = serde_json::from_str(request.as_str())?;
            let signal = Arc::new(Signal::default());
            let waker = Waker::new(TurnWaker_TO::from_value(signal.clone(), TD_Opaque));
            let mut turn = self.0.start(request, waker)?;
            run_here(&mut turn, &mut Sink::new(sink), &signal)
        })
    }

    fn stepped(&self) -> bool {
        true
    }

    fn start(
        &self,
        request: RStr<'_>,
        waker: TurnWakerBox,
    ) -> RResult<TurnStepperBox, PluginError> {
        guard(|| {
            let request: ModelRequest = serde_json::from_str(request.as_str())?;
            let turn = self.0.start(request, Waker::new(waker))?;
            Ok(TurnStepper_TO::from_value(StepsShim(turn), TD_Opaque))
        })
    }
}

struct StepsShim<T>(T);

impl<T: Steps> TurnStepper for StepsShim<T> {
    fn step(&mut self, sink: EventSinkRef<'_>) -> RResult<Step, PluginError> {
        guard(|| self.0.step(&mut Sink::new(sink)))
    }
}

/// How often a turn run on a thread looks at the sink's cancel flag while it
/// pauses or waits to be woken.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// Runs a stepped turn to its end on the calling thread: pauses sleep it,
/// pending steps wait on `signal`.
fn run_here<T: Steps>(
    turn: &mut T,
    sink: &mut Sink<'_>,
    signal: &Signal,
) -> Result<(), PluginError> {
    loop {
        if sink.is_cancelled() {
            return Ok(());
        }
        match turn.step(sink)?.next() {
            Next::Done => return Ok(()),
            Next::Ready => {}
            Next::Sleep(pause) => {
                // In slices, so that a cancel ends a long pause.
                let until = std::time::Instant::now() + pause;
                loop {
                    let now = std::time::Instant::now();
                    if now >= until || sink.is_cancelled() {
                        break;
                    }
                    std::thread::sleep((until - now).min(CANCEL_CHECK));
                }
            }
            Next::Pending => {
                while !signal.wait(CANCEL_CHECK) {
                    if sink.is_cancelled() {
                        return Ok(());
                    }
                }
            }
            Next::Unknown(kind) => {
                return Err(PluginError::internal(format!(
                    "a step answered kind {kind}, which this plugin-api does not know"
                )))
            }
        }
    }
}

/// A wake flag a thread can wait on.
#[derive(Default)]
struct Signal {
    woken: Mutex<bool>,
    changed: Condvar,
}

impl Signal {
    /// Waits up to `timeout` for a wake; answers whether one came (and
    /// consumes it).
    fn wait(&self, timeout: Duration) -> bool {
        let woken = self.woken.lock().unwrap_or_else(|p| p.into_inner());
        let (mut woken, _) = self
            .changed
            .wait_timeout_while(woken, timeout, |woken| !*woken)
            .unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *woken, false)
    }
}

impl TurnWaker for Arc<Signal> {
    fn wake(&self) {
        *self.woken.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }
}

/// Wraps a [`SteppedModel`] into the trait object the host takes. Every call
/// into it runs under [`guard`](fn@crate::guard); its `generate` runs the steps on the
/// calling thread.
pub fn stepped_model_adapter(model: impl SteppedModel) -> ModelAdapterBox {
    ModelAdapter_TO::from_value(SteppedShim(model), TD_Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventSink, EventSink_TO, FinishReason, Flow, LogLevel, Usage};
    use std::time::Instant;

    /// Counts to `until`, one number per step, pausing or waiting between.
    struct Count {
        next: u32,
        until: u32,
        pause: Option<Duration>,
        waker: Waker,
    }

    impl Steps for Count {
        fn step(&mut self, sink: &mut Sink<'_>) -> Result<Step, PluginError> {
            if self.next == self.until {
                sink.end(FinishReason::STOP);
                return Ok(Step::DONE);
            }
            if self.next == 99 {
                panic!("count reached 99");
            }
            sink.text(&self.next.to_string());
            self.next += 1;
            Ok(match self.pause {
                Some(pause) => Step::sleep(pause),
                None => {
                    let waker = self.waker.clone();
                    std::thread::spawn(move || waker.wake());
                    Step::PENDING
                }
            })
        }
    }

    struct Counter {
        pause: Option<Duration>,
        from: u32,
    }

    impl SteppedModel for Counter {
        type Turn = Count;

        fn start(&self, request: ModelRequest, waker: Waker) -> Result<Count, PluginError> {
            Ok(Count {
                next: self.from,
                until: self.from + request.messages.len() as u32,
                pause: self.pause,
                waker,
            })
        }
    }

    #[derive(Default)]
    struct Recorded {
        events: Vec<String>,
    }

    impl EventSink for Recorded {
        fn start(&mut self, _: RStr<'_>, _: RStr<'_>) -> Flow {
            Flow::CONTINUE
        }
        fn text(&mut self, text: RStr<'_>) -> Flow {
            self.events.push(text.to_string());
            Flow::CONTINUE
        }
        fn reasoning(&mut self, _: RStr<'_>) -> Flow {
            Flow::CONTINUE
        }
        fn tool_call(&mut self, _: RStr<'_>, _: RStr<'_>, _: RStr<'_>) -> Flow {
            Flow::CONTINUE
        }
        fn usage(&mut self, _: Usage) -> Flow {
            Flow::CONTINUE
        }
        fn end(&mut self, reason: FinishReason) -> Flow {
            self.events.push(format!("end {}", reason.as_str()));
            Flow::STOP
        }
        fn error(&mut self, code: RStr<'_>, _: RStr<'_>) -> Flow {
            self.events.push(format!("error {code}"));
            Flow::STOP
        }
        fn diagnostic(&mut self, _: LogLevel, _: RStr<'_>, _: RStr<'_>) -> Flow {
            Flow::CONTINUE
        }
        fn is_cancelled(&self) -> bool {
            false
        }
    }

    fn request(messages: usize) -> String {
        let request = ModelRequest {
            messages: vec![crate::Message::new(crate::Role::User, "x"); messages],
            ..ModelRequest::default()
        };
        serde_json::to_string(&request).expect("serializes")
    }

    #[test]
    fn generate_runs_the_steps_on_the_calling_thread() {
        for pause in [Some(Duration::from_millis(5)), None] {
            let adapter = stepped_model_adapter(Counter { pause, from: 0 });
            assert!(adapter.stepped());
            let mut sink = Recorded::default();
            let started = Instant::now();
            adapter
                .generate(
                    request(3).as_str().into(),
                    EventSink_TO::from_ptr(&mut sink, TD_Opaque),
                )
                .into_result()
                .expect("generates");
            assert_eq!(sink.events, ["0", "1", "2", "end stop"]);
            if pause.is_some() {
                assert!(started.elapsed() >= Duration::from_millis(15));
            }
        }
    }

    #[test]
    fn start_and_step_answer_what_comes_next() {
        let adapter = stepped_model_adapter(Counter {
            pause: Some(Duration::from_millis(7)),
            from: 0,
        });
        let waker = TurnWaker_TO::from_value(Arc::new(Signal::default()), TD_Opaque);
        let mut turn = adapter
            .start(request(1).as_str().into(), waker)
            .into_result()
            .expect("starts");
        let mut sink = Recorded::default();
        let mut step = || {
            turn.step(EventSink_TO::from_ptr(&mut sink, TD_Opaque))
                .into_result()
                .expect("steps")
                .next()
        };
        assert_eq!(step(), Next::Sleep(Duration::from_millis(7)));
        assert_eq!(step(), Next::Done);
        assert_eq!(sink.events, ["0", "end stop"]);
    }

    #[test]
    fn a_panicking_step_is_an_error_and_a_bad_request_fails_start() {
        let adapter = stepped_model_adapter(Counter {
            pause: Some(Duration::ZERO),
            from: 99,
        });
        let waker = || TurnWaker_TO::from_value(Arc::new(Signal::default()), TD_Opaque);
        let mut turn = adapter
            .start(request(1).as_str().into(), waker())
            .into_result()
            .expect("starts");
        let mut sink = Recorded::default();
        let err = turn
            .step(EventSink_TO::from_ptr(&mut sink, TD_Opaque))
            .into_result()
            .expect_err("panics");
        assert_eq!(err.kind, crate::ErrorKind::PANIC);
        assert!(err.message.contains("count reached 99"), "{err}");
        let err = adapter
            .start("not json".into(), waker())
            .into_result()
            .err()
            .expect("refused");
        assert_eq!(err.kind, crate::ErrorKind::INVALID_INPUT);
    }

    #[test]
    fn steps_round_trip_and_unknown_kinds_stay_unknown() {
        assert_eq!(Step::DONE.next(), Next::Done);
        assert_eq!(Step::READY.next(), Next::Ready);
        assert_eq!(Step::PENDING.next(), Next::Pending);
        assert_eq!(
            Step::sleep(Duration::from_micros(1500)).next(),
            Next::Sleep(Duration::from_micros(1500))
        );
        assert_eq!(Step { kind: 9, micros: 0 }.next(), Next::Unknown(9));
    }

    #[test]
    fn a_wake_before_the_wait_is_not_lost() {
        let signal = Arc::new(Signal::default());
        signal.wake();
        assert!(signal.wait(Duration::from_millis(1)));
        assert!(!signal.wait(Duration::from_millis(1)));
    }
}
