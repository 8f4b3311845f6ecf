//! Running the model for a turn: in steps on the turn's own task (each
//! step's frames sent as one batch), or on the blocking pool with its frames
//! forwarded through a bounded channel, so a slow client makes the model
//! wait rather than grow the host's memory.

use std::sync::Arc;

use llm_host_plugin_api::{Message, TurnParams};
use tokio::sync::{mpsc, Notify};

use super::document::MessagesJson;
use super::ports::{Frames, Model, ModelError, Next, Stepper};
use super::sink::{Status, TurnSink, STEP_FRAMES};
use crate::protocol::now_ms;

/// Runs the model, in steps on this task or on the blocking pool; gives the
/// sink back with the status, or nothing if the host's own sink code panicked
/// (a plugin's panics are caught inside the plugin).
pub(super) async fn generate<M: Model>(
    frames: &impl Frames,
    model: Arc<M>,
    request: serde_json::Result<String>,
    mut sink: TurnSink,
) -> Option<(TurnSink, Status)> {
    let request = match request {
        Ok(json) => json,
        Err(err) => {
            let status = sink.close(Err(ModelError::internal(err.to_string())));
            sink.send_batch(frames).await;
            return Some((sink, status));
        }
    };
    if model.stepped() {
        return Some(step(frames, &*model, &request, sink).await);
    }
    let (sender, mut ready) = mpsc::channel(BLOCKING_FRAMES);
    sink.out = Some(sender);
    let running = tokio::task::spawn_blocking(move || {
        let result = model.generate(&request, &mut sink);
        let status = sink.close(result);
        sink.out = None;
        (sink, status)
    });
    // Forward the model's frames as they come, every frame that is ready
    // with one flush, until it returns and its last frames are out.
    let mut batch = Vec::new();
    while let Some((mut through, frame)) = ready.recv().await {
        batch.push(frame);
        while let Ok((sequence, frame)) = ready.try_recv() {
            batch.push(frame);
            through = sequence;
        }
        if !frames.send_numbered(&mut batch, through).await {
            // The client is gone: the model's next frame finds the channel
            // closed and its sink answers stop.
            batch.clear();
            ready.close();
        }
    }
    running
        .await
        .map_err(|err| tracing::error!(error = %err, "turn task failed"))
        .ok()
}

/// Frames a model on the blocking pool may have waiting for the client
/// before it waits itself.
const BLOCKING_FRAMES: usize = 64;

/// Runs a stepped model's turn on this task: each step's frames go out as
/// one batch, its pauses and pending waits end early when the turn is
/// stopped, and the stepper is dropped as soon as the turn stops.
async fn step<M: Model>(
    frames: &impl Frames,
    model: &M,
    request: &str,
    mut sink: TurnSink,
) -> (TurnSink, Status) {
    sink.batch.reserve(96);
    let control = sink.control.clone();
    let woken = Arc::new(Notify::new());
    // Registered once for the whole turn, not at every pause.
    let stopped = control.stopped.notified();
    tokio::pin!(stopped);
    let result = match model.start(request, woken.clone()) {
        Err(err) => Err(err),
        Ok(mut stepper) => loop {
            if sink.stopped() {
                break Ok(());
            }
            sink.step_time = Some(now_ms());
            let step = stepper.step(&mut sink);
            sink.step_time = None;
            // A pause counts from the step's answer, not from after the send.
            let answered = tokio::time::Instant::now();
            sink.send_batch(frames).await;
            let next = match step {
                Ok(_) if sink.step_overflowed => {
                    break Err(ModelError::internal(format!(
                        "a step emitted more than {STEP_FRAMES} events without returning; \
                         a step emits what is ready and answers READY for more"
                    )))
                }
                Ok(next) => next,
                Err(err) => break Err(err),
            };
            if sink.stopped() {
                break Ok(());
            }
            match next {
                Next::Done => break Ok(()),
                Next::Ready => tokio::task::yield_now().await,
                Next::Sleep(pause) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(answered + pause) => {}
                        _ = &mut stopped => {}
                    }
                }
                Next::Pending => {
                    tokio::select! {
                        _ = woken.notified() => {}
                        _ = &mut stopped => {}
                    }
                }
                Next::Unknown(kind) => {
                    break Err(ModelError::internal(format!(
                        "the model's step answered kind {kind}, which this host does not know \
                         (the plugin was built against a newer plugin-api)"
                    )))
                }
            }
        },
    };
    let status = sink.close(result);
    sink.send_batch(frames).await;
    (sink, status)
}

/// The JSON of a [`ModelRequest`], written from borrowed parts (the history
/// is not copied to be sent).
#[derive(serde::Serialize, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub(super) struct RequestRef<'a> {
    pub(super) session_id: &'a str,
    pub(super) interaction_id: &'a str,
    pub(super) backend: &'a str,
    pub(super) messages: &'a [Message],
    pub(super) params: &'a TurnParams,
}

impl RequestRef<'_> {
    /// The request's JSON, as `serde_json::to_string(self)` writes it, with
    /// the history taken from `json`, the text of `self.messages`.
    #[cfg(test)]
    pub(super) fn to_json(self, json: &mut MessagesJson) -> serde_json::Result<String> {
        self.to_json_headed(json, None)
    }

    /// Like [`RequestRef::to_json`], with `first` (a system prompt) sent
    /// before the history.
    pub(super) fn to_json_headed(
        self,
        json: &mut MessagesJson,
        first: Option<&Message>,
    ) -> serde_json::Result<String> {
        let shell = serde_json::to_string(&RequestRef {
            messages: &[],
            ..self
        })?;
        json.splice_headed(self.messages, &shell, first)
    }
}
