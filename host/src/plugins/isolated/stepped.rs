//! A turn of a backend in a child process, run in steps on the async
//! workers (the turn core's stepped path), so that a turn holds no thread
//! of the host: the thread reading the child's frames puts each of the
//! turn's frames in its [`TurnQueue`] and wakes the turn when the queue was
//! empty, and each step hands everything queued to the sink, which sends it
//! as one batch. A turn waiting on a blocking thread of the host instead
//! cost a thread per turn (a thousand paced turns: a thousand threads each
//! woken per token) and two more thread switches per event.
//!
//! A turn that finds its backend's child dead waits in its first steps for
//! the new one ([`Supervisor::running`]: the backoff, then the start), as a
//! task on the runtime that wakes it; then it sends its request.
//!
//! A turn stopped (the client's cancel, the turn deadline, a client gone)
//! is dropped by the core; dropping it sends CANCEL and forgets its id, so
//! frames the child still sends for it are dropped. Dropped while it waits
//! for a new child, it stops waiting (a start already under way goes on,
//! for the next turn).
//!
//! Its first event is due within `first_event_timeout_ms`: a timer wakes
//! the turn then, and a turn still unanswered has the child killed, which
//! its queue then reports as a crash.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::child::{Child, Incoming, Refusal};
use super::model::{crashed, deliver};
use super::runner::WINDOW;
use super::supervisor::Supervisor;
use super::wire::{to_child, Encoder, Event};
use crate::config::ProcessLimits;
use crate::core::ports::{ModelError, Next, Wake};
use crate::core::sink::TurnSink;

/// Events one step hands to the sink at most (the core refuses a step of
/// more than `STEP_FRAMES`, 1024); the rest go in the next step.
const PER_STEP: usize = 512;

/// The frames of one turn that wait for its next step.
pub struct TurnQueue {
    items: Mutex<VecDeque<Incoming>>,
    wake: Wake,
}

impl TurnQueue {
    /// An empty queue that wakes the turn through `wake`.
    pub fn new(wake: Wake) -> Arc<Self> {
        Arc::new(Self {
            items: Mutex::new(VecDeque::new()),
            wake,
        })
    }

    /// Queues a frame of the turn; wakes the turn if nothing was queued (a
    /// wake before the turn waits is kept, so none is lost).
    pub fn push(&self, incoming: Incoming) {
        let was_empty = {
            let mut items = self.lock();
            let was_empty = items.is_empty();
            items.push_back(incoming);
            was_empty
        };
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Moves everything queued to the end of `into`.
    fn take(&self, into: &mut VecDeque<Incoming>) {
        into.append(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Incoming>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One turn on a child, run in steps.
pub struct SteppedTurn(Phase);

enum Phase {
    /// The child died: waiting for the new one.
    Starting(Starting),
    /// Its request went to the child.
    Running(Running),
}

/// A turn waiting for its backend's new child.
struct Starting {
    supervisor: Arc<Supervisor>,
    limits: ProcessLimits,
    request: String,
    wake: Wake,
    child: tokio::sync::oneshot::Receiver<Result<Arc<Child>, String>>,
    /// The task waiting for the child; aborted when the turn is dropped.
    task: tokio::task::JoinHandle<()>,
}

impl SteppedTurn {
    /// Starts a turn on `supervisor`'s child: at once when it runs, else in
    /// the steps after a new child is up.
    pub(super) fn start(
        supervisor: &Arc<Supervisor>,
        limits: ProcessLimits,
        request: &str,
        wake: Wake,
    ) -> Result<Self, ModelError> {
        if let Some(child) = supervisor.current() {
            return Running::open(supervisor, limits, child, request, wake)
                .map(|running| Self(Phase::Running(running)));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ModelError::internal("a turn in a plugin's process needs the runtime"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (waiting, woken) = (supervisor.clone(), wake.clone());
        let task = runtime.spawn(async move {
            let _ = tx.send(waiting.running().await);
            woken.notify_one();
        });
        Ok(Self(Phase::Starting(Starting {
            supervisor: supervisor.clone(),
            limits,
            request: request.to_owned(),
            wake,
            child: rx,
            task,
        })))
    }

    /// Hands what the child sent to `sink`; never blocks.
    pub fn step(&mut self, sink: &mut TurnSink) -> Result<Next, ModelError> {
        let starting = match &mut self.0 {
            Phase::Running(running) => return running.step(sink),
            Phase::Starting(starting) => starting,
        };
        use tokio::sync::oneshot::error::TryRecvError;
        let child = match starting.child.try_recv() {
            Ok(Ok(child)) => child,
            Ok(Err(why)) => return Err(crashed(why)),
            Err(TryRecvError::Empty) => return Ok(Next::Pending),
            Err(TryRecvError::Closed) => {
                return Err(crashed(
                    "the plugin's process could not be restarted".to_owned(),
                ))
            }
        };
        let running = Running::open(
            &starting.supervisor,
            starting.limits,
            child,
            &starting.request,
            starting.wake.clone(),
        )?;
        self.0 = Phase::Running(running);
        Ok(Next::Ready)
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A turn whose request went to the child.
struct Running {
    child: Arc<Child>,
    turn: u64,
    queue: Arc<TurnQueue>,
    supervisor: Arc<Supervisor>,
    /// `isolation.first_event_timeout_ms`.
    first_due: Duration,
    started: Instant,
    /// When the first event is due at the latest.
    due: Instant,
    /// The timer that wakes the turn then.
    timer: Option<tokio::task::JoinHandle<()>>,
    pending: VecDeque<Incoming>,
    enc: Encoder,
    answered: bool,
    taken: u64,
    /// Its end came (or it failed): nothing to cancel.
    finished: bool,
}

impl Running {
    /// Opens the turn on `child` (within `isolation.max_concurrent_turns`)
    /// and sends its request; wakes it when its first event is due.
    fn open(
        supervisor: &Arc<Supervisor>,
        limits: ProcessLimits,
        child: Arc<Child>,
        request: &str,
        wake: Wake,
    ) -> Result<Self, ModelError> {
        let queue = TurnQueue::new(wake);
        let turn = match child.open_queue(limits.max_concurrent_turns, queue.clone()) {
            Ok(turn) => turn,
            Err(Refusal::Busy) => {
                return Err(ModelError {
                    code: "unavailable".to_owned(),
                    message: format!(
                        "backend `{}` runs at most {} turns at once \
                         (isolation.max_concurrent_turns); try again shortly",
                        supervisor.name(),
                        limits.max_concurrent_turns
                    ),
                })
            }
            Err(Refusal::Dead(why)) => return Err(crashed(why)),
        };
        let mut enc = Encoder::default();
        enc.begin(to_child::GENERATE, turn).str(request).finish();
        // A child that cannot take it is gone: its crash comes in the queue.
        child.send(&enc.buf);
        let first_due = Duration::from_millis(limits.first_event_timeout_ms);
        let started = Instant::now();
        let due = started + first_due;
        // The timer sleeps until the very instant `step` compares with, so
        // its wake never comes before the deadline has passed.
        let timer = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let wake = queue.wake.clone();
            runtime.spawn(async move {
                tokio::time::sleep_until(due.into()).await;
                wake.notify_one();
            })
        });
        Ok(Self {
            child,
            turn,
            queue,
            supervisor: supervisor.clone(),
            first_due,
            started,
            due,
            timer,
            pending: VecDeque::new(),
            enc,
            answered: false,
            taken: 0,
            finished: false,
        })
    }

    /// Hands what the child sent to `sink`; never blocks.
    pub fn step(&mut self, sink: &mut TurnSink) -> Result<Next, ModelError> {
        self.queue.take(&mut self.pending);
        let mut handed = 0;
        while let Some(incoming) = self.pending.pop_front() {
            match incoming {
                Incoming::Event(event) => {
                    self.answered = true;
                    self.taken += 1;
                    let last = matches!(event, Event::End(_) | Event::Error(..));
                    if matches!(event, Event::End(_)) {
                        self.supervisor.answered();
                    }
                    // After its last event the child's turn is over: no
                    // CANCEL when the core drops it before DONE comes.
                    self.finished |= last;
                    if !deliver(sink, event) && !last {
                        // The sink stopped the turn: dropped, it cancels.
                        return Ok(Next::Done);
                    }
                    if self.taken.is_multiple_of(WINDOW / 4) {
                        self.enc.buf.clear();
                        self.enc
                            .begin(to_child::ACK, self.turn)
                            .u64(self.taken)
                            .finish();
                        self.child.send(&self.enc.buf);
                    }
                    handed += 1;
                    if handed == PER_STEP {
                        return Ok(Next::Ready);
                    }
                }
                Incoming::Done(result) => {
                    self.finished = true;
                    if result.is_ok() {
                        self.supervisor.answered();
                    }
                    return result.map(|()| Next::Done);
                }
                Incoming::Crashed(why) => {
                    self.finished = true;
                    return Err(crashed(why));
                }
                Incoming::Reply(_) => {
                    self.finished = true;
                    return Err(ModelError::internal(
                        "the plugin's process answered a turn with a store's frame",
                    ));
                }
            }
        }
        if !self.answered && Instant::now() >= self.due {
            self.child.kill(format!(
                "did not answer a turn within {} ms (isolation.first_event_timeout_ms) \
                 and was killed",
                self.first_due.as_millis()
            ));
            // Its end comes as Crashed, through the queue.
            self.answered = true;
        }
        Ok(Next::Pending)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        if !self.finished {
            self.enc.buf.clear();
            self.enc.begin(to_child::CANCEL, self.turn).finish();
            self.child.send(&self.enc.buf);
        }
        self.child.close(self.turn);
        crate::metrics::metrics().plugin_call(self.supervisor.name(), self.started.elapsed());
    }
}
