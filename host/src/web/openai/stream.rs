//! Between the turn and the HTTP answer: [`Channel`], the turn core's
//! [`Frames`] for an HTTP request (a bounded channel, so that a client that
//! reads slowly makes the turn wait, as a WebSocket's does, and one that
//! takes nothing for `server.write_timeout_secs` stops it), [`Stop`], which
//! cancels the turn when the answer is dropped (the client went away), and
//! [`SseBody`], the streamed answer's body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::chunks::Chunks;
use super::response::{Answer, Event};
use super::ApiError;
use crate::core::ports::Frames;
use crate::core::sink::TurnControl;
use warp::http::StatusCode;

/// Frames a turn may have waiting for the HTTP answer before it waits.
pub const CHANNEL_FRAMES: usize = 64;

/// The turn core's frames for one HTTP request: each frame goes into a
/// bounded channel that the answer reads.
pub struct Channel {
    frames: mpsc::Sender<Bytes>,
    /// The last sequence number used (shared with the session's
    /// attachment, when there is one).
    sequence: Arc<AtomicU64>,
    /// How long a frame may wait for room (`server.write_timeout_secs`):
    /// a client that takes nothing for this long is taken for gone, as a
    /// socket's is, and the turn stops.
    timeout: Duration,
    /// Set once a frame could not be sent: the rest are dropped.
    gone: AtomicBool,
}

impl Channel {
    /// A channel whose frames wait at most `timeout` for room, and its
    /// reading end.
    pub fn new(sequence: Arc<AtomicU64>, timeout: Duration) -> (Self, mpsc::Receiver<Bytes>) {
        let (frames, receiver) = mpsc::channel(CHANNEL_FRAMES);
        let channel = Self {
            frames,
            sequence,
            timeout,
            gone: AtomicBool::new(false),
        };
        (channel, receiver)
    }

    /// Sends one frame, unless the answer is gone or takes nothing for the
    /// timeout.
    async fn send(&self, frame: Bytes) -> bool {
        if self.gone.load(Ordering::Relaxed) {
            return false;
        }
        let sent = matches!(
            tokio::time::timeout(self.timeout, self.frames.send(frame)).await,
            Ok(Ok(()))
        );
        if !sent {
            self.gone.store(true, Ordering::Relaxed);
        }
        sent
    }
}

impl Frames for Channel {
    async fn send_numbered(&self, frames: &mut Vec<Bytes>, through: u64) -> bool {
        let mut sent = true;
        for frame in frames.drain(..) {
            sent = sent && self.send(frame).await;
        }
        self.sequence.fetch_max(through, Ordering::Relaxed);
        sent
    }

    async fn send_stamped(&self, make: impl FnOnce(u64) -> Bytes + Send) -> bool {
        let frame = make(self.sequence.load(Ordering::Relaxed));
        self.send(frame).await
    }
}

/// Cancels the turn when dropped before the turn ended: whoever holds it
/// (the request's future, then the streamed body) is dropped when the
/// client goes away, and the model is told to stop at its next event.
pub struct Stop {
    control: Arc<TurnControl>,
    ended: AtomicBool,
}

impl Stop {
    /// Guards the turn `control` stops.
    pub fn new(control: Arc<TurnControl>) -> Self {
        Self {
            control,
            ended: AtomicBool::new(false),
        }
    }

    /// The turn ended: nothing to cancel.
    pub fn ended(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        if !self.ended.load(Ordering::Relaxed) {
            tracing::debug!("the HTTP client went away; cancelling its turn");
            self.control.cancel();
        }
    }
}

/// A streamed answer's body: the turn's frames as `chat.completion.chunk`
/// events, as they come. Dropped when the client goes away, which cancels
/// the turn (its [`Stop`]).
pub struct SseBody {
    frames: mpsc::Receiver<Bytes>,
    chunks: Chunks,
    answer: Answer,
    /// Written and not yet taken.
    ready: VecDeque<Bytes>,
    finished: bool,
    stop: Stop,
}

impl SseBody {
    /// A body that first sends the role chunk and the chunks of `seen`
    /// (events read before the answer's status was decided), then the rest
    /// of the turn's `frames`.
    pub fn new(frames: mpsc::Receiver<Bytes>, chunks: Chunks, seen: &[Event], stop: Stop) -> Self {
        let mut body = Self {
            frames,
            ready: VecDeque::from([chunks.role()]),
            chunks,
            answer: Answer::default(),
            finished: false,
            stop,
        };
        for event in seen {
            body.take_in(event);
        }
        body
    }

    /// Takes in one event: its chunks, and the stream's end when it ends
    /// the turn.
    fn take_in(&mut self, event: &Event) {
        let chunks = self.chunks.event(event);
        self.ready.extend(chunks);
        self.answer.add(event);
        if self.answer.ended() {
            self.end();
        }
    }

    /// Writes the end of the stream: the finish (and usage) chunks and
    /// `[DONE]`, or the error.
    fn end(&mut self) {
        self.stop.ended();
        self.finished = true;
        match self.answer.failure() {
            None => {
                let end = self.chunks.finish(&self.answer);
                self.ready.extend(end);
            }
            Some(err) => self.ready.push_back(Chunks::error(&err)),
        }
    }
}

impl futures_util::Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(chunk) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            match self.frames.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(frame)) => {
                    if let Some(event) = Event::parse(&frame) {
                        self.take_in(&event);
                    }
                }
                Poll::Ready(None) => {
                    // The turn's task ended without its last frame.
                    self.stop.ended();
                    self.finished = true;
                    let err = ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "internal",
                        "the turn ended before its last frame",
                    );
                    self.ready.push_back(Chunks::error(&err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Framer, Meta, ModelEvent, TurnEvent, SOURCE_HOST, SOURCE_MODEL};
    use futures_util::StreamExt;

    fn framer() -> Framer {
        Framer {
            envelope: crate::protocol::Envelope::Flat,
        }
    }

    fn text_frame(sequence: u64, text: &str) -> Bytes {
        let mut out = bytes::BytesMut::new();
        let event = ModelEvent::Delta {
            text: Some(text),
            reasoning: None,
            tool_call: None,
        };
        framer().write_model(&mut out, &event, &Meta::now(sequence, SOURCE_MODEL, None));
        out.freeze()
    }

    fn end_frame(sequence: u64, status: &str) -> Bytes {
        let end = TurnEvent::End {
            status,
            interaction_id: "chatcmpl-1",
            prompt_id: None,
        };
        Bytes::from(framer().turn(&end, &Meta::now(sequence, SOURCE_HOST, None)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_gone_after_the_write_timeout() {
        let sequence = Arc::new(AtomicU64::new(0));
        let (channel, mut receiver) = Channel::new(sequence.clone(), Duration::from_secs(30));
        let mut frames: Vec<Bytes> = (0..CHANNEL_FRAMES as u64)
            .map(|n| text_frame(n + 1, "x"))
            .collect();
        assert!(channel.send_numbered(&mut frames, 64).await);
        let started = tokio::time::Instant::now();
        assert!(
            !channel
                .send_numbered(&mut vec![text_frame(65, "y")], 65)
                .await
        );
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(sequence.load(Ordering::Relaxed), 65, "the numbers are used");
        // Gone for good, even once there is room.
        assert!(receiver.recv().await.is_some());
        assert!(!channel.send_stamped(|_| text_frame(66, "z")).await);
    }

    #[test]
    fn the_turn_is_cancelled_when_its_answer_is_dropped_before_it_ended() {
        let control = Arc::new(TurnControl::default());
        drop(Stop::new(control.clone()));
        assert!(control.is_cancelled());
        let control = Arc::new(TurnControl::default());
        let stop = Stop::new(control.clone());
        stop.ended();
        drop(stop);
        assert!(!control.is_cancelled());
    }

    async fn body_of(frames: Vec<Bytes>, close: bool) -> (String, Arc<TurnControl>) {
        let (sender, receiver) = mpsc::channel(16);
        for frame in frames {
            sender.send(frame).await.expect("room");
        }
        if close {
            drop(sender);
        } else {
            std::mem::forget(sender);
        }
        let control = Arc::new(TurnControl::default());
        let chunks = Chunks::new("chatcmpl-1".into(), 7, "echo".into(), false);
        let seen = [Event::Start];
        let body = SseBody::new(receiver, chunks, &seen, Stop::new(control.clone()));
        let parts: Vec<Bytes> = body.map(|chunk| chunk.expect("infallible")).collect().await;
        let text = parts
            .iter()
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        (text, control)
    }

    #[tokio::test]
    async fn the_body_streams_the_turn_to_done_or_to_an_error() {
        let (text, control) = body_of(
            vec![
                text_frame(2, "echo:"),
                text_frame(3, " hi"),
                end_frame(4, "completed"),
            ],
            false,
        )
        .await;
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "{text}");
        assert!(events[0].contains(r#""role":"assistant""#));
        assert!(events[1].contains(r#""content":"echo:""#));
        assert!(events[3].contains(r#""finish_reason":"stop""#));
        assert_eq!(events[4], "data: [DONE]");
        assert!(!control.is_cancelled(), "the turn ended by itself");

        // The turn's task ended without its last frame.
        let (text, _) = body_of(vec![text_frame(2, "echo:")], true).await;
        assert!(text.ends_with("\n\n") && !text.contains("[DONE]"), "{text}");
        let last = text.trim_end().rsplit("\n\n").next().unwrap_or_default();
        assert!(last.starts_with(r#"data: {"error":"#), "{text}");
    }
}
