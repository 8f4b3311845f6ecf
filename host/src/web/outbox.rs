//! A connection's outbox: the socket's sending half, shared by the turn
//! running on the connection and its reader; the turn core's [`Frames`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{
    error::Error as WsError, protocol::CloseFrame, Message as WsMessage, Utf8Bytes,
};

use crate::core::ports::Frames;

/// The socket's sending half, shared by whoever has frames to send: the turn
/// running on the connection (its frames, a step's or a batch's at a time)
/// and the reader (diagnostics, pings, close). A writer takes the lock,
/// feeds its frames and flushes once; the lock is fair, so frames go out in
/// the order their writers came. A client that reads slowly makes writers
/// wait in the flush: it cannot grow the host's memory; one that takes
/// nothing for `server.write_timeout_secs` is dropped.
///
/// It also keeps the connection's last sequence number, advanced under the
/// lock once a turn's frames are handed to the socket: a diagnostic stamped
/// with it never names a frame the client has not been sent.
pub struct Outbox {
    socket: tokio::sync::Mutex<Option<BoxedSink>>,
    sequence: Arc<AtomicU64>,
    /// How long a write may wait for a client that takes nothing.
    timeout: Duration,
    /// Told when a write fails or times out: the reader ends the connection.
    gone: tokio::sync::Notify,
}

type BoxedSink = std::pin::Pin<Box<dyn futures_util::Sink<WsMessage, Error = WsError> + Send>>;

impl Outbox {
    pub fn new(
        sink: impl futures_util::Sink<WsMessage, Error = WsError> + Send + 'static,
        sequence: Arc<AtomicU64>,
        timeout: Duration,
    ) -> Self {
        Self {
            socket: tokio::sync::Mutex::new(Some(Box::pin(sink))),
            sequence,
            timeout,
            gone: tokio::sync::Notify::new(),
        }
    }

    async fn lock(&self) -> tokio::sync::MutexGuard<'_, Option<BoxedSink>> {
        // Usually nobody else is writing: take the lock without queueing.
        match self.socket.try_lock() {
            Ok(socket) => socket,
            Err(_) => self.socket.lock().await,
        }
    }

    /// Sends `frames` with one flush; answers false once the socket is gone
    /// (failed, timed out, or closed by the host), and the frames are dropped.
    pub async fn send(&self, frames: impl IntoIterator<Item = WsMessage>) -> bool {
        self.write(&mut *self.lock().await, frames).await
    }

    /// Sends a turn's frames numbered up to `through`, and records that
    /// number as the connection's last (even if the client is gone: the
    /// numbers are used).
    pub async fn write_numbered(
        &self,
        frames: impl IntoIterator<Item = WsMessage>,
        through: u64,
    ) -> bool {
        let mut socket = self.lock().await;
        let sent = self.write(&mut socket, frames).await;
        self.sequence.fetch_max(through, Ordering::Relaxed);
        sent
    }

    /// Sends the frame `frame` makes from the connection's last sequence
    /// number, read under the lock.
    pub async fn write_stamped(&self, frame: impl FnOnce(u64) -> WsMessage) -> bool {
        let mut socket = self.lock().await;
        let frame = frame(self.sequence.load(Ordering::Relaxed));
        self.write(&mut socket, [frame]).await
    }

    /// Sends a close frame; nothing is sent after it.
    pub async fn close(&self, frame: CloseFrame) {
        let mut socket = self.lock().await;
        self.write(&mut socket, [WsMessage::Close(Some(frame))])
            .await;
        *socket = None;
    }

    /// Feeds `frames` and flushes once, within the write timeout; a failure
    /// leaves the socket gone and tells the reader.
    async fn write(
        &self,
        socket: &mut Option<BoxedSink>,
        frames: impl IntoIterator<Item = WsMessage>,
    ) -> bool {
        let Some(sink) = socket.as_mut() else {
            return false;
        };
        let written = tokio::time::timeout(self.timeout, async {
            for frame in frames {
                sink.feed(frame).await?;
            }
            sink.flush().await
        })
        .await;
        let sent = matches!(written, Ok(Ok(())));
        if !sent {
            *socket = None;
            self.gone.notify_one();
        }
        sent
    }

    /// Waits until a write failed or timed out.
    pub async fn failed(&self) {
        self.gone.notified().await;
    }

    /// Closes the socket if the host has not closed it.
    pub async fn finish(&self) {
        if let Some(mut sink) = self.socket.lock().await.take() {
            let _ = sink.close().await;
        }
    }
}

/// A frame's JSON text as a WebSocket text message. The framer writes
/// JSON text only; anything else is dropped.
fn text(frame: Bytes) -> Option<WsMessage> {
    Utf8Bytes::try_from(frame).ok().map(WsMessage::Text)
}

impl Frames for Outbox {
    async fn send_numbered(&self, frames: &mut Vec<Bytes>, through: u64) -> bool {
        self.write_numbered(frames.drain(..).filter_map(text), through)
            .await
    }

    async fn send_stamped(&self, make: impl FnOnce(u64) -> Bytes + Send) -> bool {
        let mut socket = self.lock().await;
        let frame = make(self.sequence.load(Ordering::Relaxed));
        self.write(&mut socket, text(frame)).await
    }
}
