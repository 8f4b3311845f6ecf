//! The child's side of a stepped adapter's turns: run as tasks of one small
//! async runtime in the child, as the host runs them in its own process,
//! instead of a thread each. A thousand paced turns were a thousand threads
//! woken per token; as tasks they are timers on one worker.
//!
//! The worker holds the frames its turns send and writes them when it
//! parks (or once 64 KiB wait): at 50 tokens a second over a thousand
//! turns, the events of every turn one timer tick woke go out in one write,
//! not one each.
//!
//! A step's pause (`Sleep`) and a pending wait (`Pending`, until the
//! adapter's waker is called) end early only on a cancel. A turn that is
//! [`WINDOW`] events ahead of the host's acknowledgements waits between
//! steps (never inside one: a task must not block) until the host catches
//! up, so a slow client slows the model down as in the host's process.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    EventSink_TO, ModelAdapterBox, Next, PluginError, TurnWaker_TO,
};
use tokio::time::Instant;

use super::runner::{finish, hold_frames, release, ChildSink, Out, TurnState, Woken, WINDOW};

/// The child's runtime for stepped turns: one worker and timers, started
/// with the first such turn.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("steps")
            // Frames its turns send wait for the worker to park, then go
            // out together (see `runner::release`).
            .on_thread_park(release)
            .enable_time()
            .build()
            .unwrap_or_else(|err| {
                eprintln!("the plugin's process cannot start its runtime: {err}");
                std::process::exit(3)
            })
    })
}

/// Runs turn `turn` of a stepped `adapter` as a task; its frames go to
/// `out`, and it ends with DONE or FAILED as a turn on a thread does.
pub(super) fn spawn(
    adapter: Arc<ModelAdapterBox>,
    out: Arc<Out>,
    turn: u64,
    state: Arc<TurnState>,
    request: String,
) {
    runtime().spawn(async move {
        // Tasks run on the runtime's one worker: it holds their frames.
        hold_frames();
        let mut sink = ChildSink::new(out, turn, state.clone(), false);
        let result = run(&adapter, &mut sink, &state, &request).await;
        finish(sink, result);
    });
}

async fn run(
    adapter: &ModelAdapterBox,
    sink: &mut ChildSink,
    state: &Arc<TurnState>,
    request: &str,
) -> Result<(), PluginError> {
    let waker = TurnWaker_TO::from_value(Woken(state.clone()), TD_Opaque);
    let mut stepper = adapter.start(RStr::from(request), waker).into_result()?;
    loop {
        if state.cancelled() {
            return Ok(());
        }
        let step = stepper
            .step(EventSink_TO::from_ptr(&mut *sink, TD_Opaque))
            .into_result()?;
        // The host is behind (a slow client): wait for it.
        while !state.cancelled() && sink.sent > *state.lock() + WINDOW {
            state.notify.notified().await;
        }
        match step.next() {
            Next::Done => return Ok(()),
            Next::Ready => tokio::task::yield_now().await,
            Next::Sleep(pause) => {
                let until = Instant::now() + pause;
                while !state.cancelled() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = state.notify.notified() => {}
                    }
                }
            }
            Next::Pending => {
                while !state.cancelled() && !state.woken.swap(false, Ordering::AcqRel) {
                    state.notify.notified().await;
                }
            }
            Next::Unknown(kind) => {
                return Err(PluginError::internal(format!(
                    "the model's step answered kind {kind}, which this host does not know"
                )))
            }
        }
    }
}
