//! One WebSocket connection: reads client frames, queues prompts, runs the
//! session's turns one at a time, and writes frames through the connection's
//! [`Outbox`], where whoever has frames (a turn, the reader) writes them all
//! and flushes once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_tungstenite::tungstenite::{
    error::{CapacityError, Error as WsError},
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message as WsMessage,
};
use tokio_tungstenite::WebSocketStream;

use crate::auth::Caller;
use crate::metrics::metrics;
use crate::protocol::{
    now_ms, protocol_diagnostic, Command, DiagnosticEntry, Framer, Meta, SessionEvent, SOURCE_HOST,
};
use crate::reload::Notice;
use crate::session::{self, Loaded};
use crate::turn::{self, Prompt, TurnControl};
use crate::HostState;

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
    fn new(
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
    pub async fn send_numbered(
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
    pub async fn send_stamped(&self, frame: impl FnOnce(u64) -> WsMessage) -> bool {
        let mut socket = self.lock().await;
        let frame = frame(self.sequence.load(Ordering::Relaxed));
        self.write(&mut socket, [frame]).await
    }

    /// Sends a close frame; nothing is sent after it.
    async fn close(&self, frame: CloseFrame) {
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
    async fn failed(&self) {
        self.gone.notified().await;
    }

    /// Closes the socket if the host has not closed it.
    async fn finish(&self) {
        if let Some(mut sink) = self.socket.lock().await.take() {
            let _ = sink.close().await;
        }
    }
}

/// How long a new connection waits for a turn of its session that is still
/// finishing before it announces the session as stored.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// What the upgrade request asked for.
#[derive(Debug, Clone)]
pub struct Opening {
    /// The session id (given or generated).
    pub session_id: String,
    /// The backend the client chose with `?model=`; none follows the
    /// config's default from turn to turn.
    pub model: Option<String>,
    /// Whether the client asked for command mode.
    pub command_mode: bool,
    /// Who opened it.
    pub caller: Caller,
}

/// State shared by a connection's reader, its turn worker and its turns.
/// Lives until the last turn of the connection has finished.
pub struct Connection {
    /// The host.
    pub host: Arc<HostState>,
    /// The session this connection speaks for.
    pub session_id: String,
    /// Who opened it.
    pub caller: Caller,
    /// The owner recorded on the session if this connection creates it.
    pub owner: String,
    /// When the client last sent a frame or a turn ended, Unix ms.
    pub active_at: AtomicU64,
    /// The session as this connection last loaded or saved it, and the store
    /// it is in: the next turn tries its claim on that version without
    /// loading first (a conflict falls back to a load).
    pub cached: Mutex<Option<(String, Loaded)>>,
    /// The backend the client chose, if any; a reload that removes it makes
    /// the connection follow the default.
    pub model: Mutex<Option<String>>,
    /// The store the session lives in; kept while it exists, so a change of
    /// the default store does not move a connected session.
    pub store: Mutex<String>,
    /// Frame writer.
    pub framer: Framer,
    /// Where every frame of the connection goes.
    pub out: Outbox,
    /// The last sequence number handed to the socket (the outbox advances it
    /// as a turn's frames go out).
    pub last_sequence: Arc<AtomicU64>,
    /// Turns of the session known to this connection.
    pub turns: AtomicU64,
}

impl Connection {
    /// The backend the client chose, if any.
    pub fn model(&self) -> Option<String> {
        self.model.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The connection's store name.
    pub fn store(&self) -> String {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The session's current last sequence number.
    pub fn sequence(&self) -> u64 {
        self.last_sequence.load(Ordering::Relaxed)
    }

    /// Sends a frame. A closed socket drops it.
    pub async fn send(&self, frame: String) {
        self.out.send([WsMessage::text(frame)]).await;
    }

    /// An `interaction.diagnostic` outside any turn (it carries the current
    /// last sequence and does not advance it).
    pub async fn diagnostic(&self, level: &str, kind: &str, code: &str, message: &str) {
        let entry = DiagnosticEntry {
            level,
            kind,
            message,
            data: Some(serde_json::json!({ "code": code })),
        };
        self.send_entry(&entry).await;
    }

    async fn send_entry(&self, entry: &DiagnosticEntry<'_>) {
        self.out
            .send_stamped(|sequence| {
                let meta = Meta::now(sequence, SOURCE_HOST, None);
                WsMessage::text(self.framer.diagnostic(entry, &meta))
            })
            .await;
    }
}

/// The running turn's control, if a turn runs.
type CurrentTurn = Arc<Mutex<Option<Arc<TurnControl>>>>;

fn set_current(current: &CurrentTurn, control: Option<Arc<TurnControl>>) {
    *current.lock().unwrap_or_else(|p| p.into_inner()) = control;
}

fn turn_running(current: &CurrentTurn) -> bool {
    current.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// Cancels the running turn; answers whether there was one.
fn cancel_current(current: &CurrentTurn) -> bool {
    let guard = current.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(control) => {
            control.cancel();
            true
        }
        None => false,
    }
}

/// How the reading side of a connection ended.
enum Ended {
    /// The client closed or went away.
    ClientGone,
    /// The host closed it (a frame too large, idle).
    Closed,
    /// The host is shutting down.
    Shutdown,
}

/// Serves one upgraded socket until the client goes away.
pub async fn connected<S>(ws: WebSocketStream<S>, host: Arc<HostState>, opening: Opening)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let active = host.active.load_full();
    let framer = Framer {
        envelope: active.config.server.envelope,
    };
    let max_queued = active.config.server.max_queued_prompts;
    let (ws_tx, ws_rx) = ws.split();
    let last_sequence = Arc::new(AtomicU64::new(0));

    let conn = Arc::new(Connection {
        host: host.clone(),
        session_id: opening.session_id.clone(),
        owner: opening.caller.owner().to_owned(),
        caller: opening.caller.clone(),
        active_at: AtomicU64::new(now_ms()),
        cached: Mutex::new(None),
        model: Mutex::new(opening.model.clone()),
        store: Mutex::new(active.config.default_store.clone()),
        framer,
        out: Outbox::new(
            ws_tx,
            last_sequence.clone(),
            Duration::from_secs(active.config.server.write_timeout_secs),
        ),
        last_sequence,
        turns: AtomicU64::new(0),
    });

    let Some(store) = active.store().cloned() else {
        close(&conn, CloseCode::Error, "no store is configured").await;
        return;
    };
    // A turn of this session may still be finishing (a client that just
    // reconnected after a disconnect mid-turn): announce what it saved.
    let lock = host.locks.get(&opening.session_id);
    let finishing = tokio::time::timeout(CONNECT_WAIT, lock.lock()).await;
    let loaded = session::load(&store, &opening.session_id).await;
    drop(finishing);
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(err) => {
            tracing::error!(session = %opening.session_id, error = %err, "cannot load session");
            let message = format!("the session could not be loaded: {err}");
            conn.send_entry(&DiagnosticEntry {
                level: "error",
                kind: "store",
                message: &message,
                data: Some(serde_json::json!({ "code": "store_unavailable" })),
            })
            .await;
            close(
                &conn,
                CloseCode::Again,
                "store unavailable, try again later",
            )
            .await;
            conn.out.finish().await;
            return;
        }
    };
    let resumed = loaded.is_some();
    if let Some(found) = &loaded {
        *conn.cached.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((store.name.clone(), found.clone()));
    }
    let Loaded { doc, .. } = loaded.unwrap_or_default();
    conn.last_sequence
        .store(doc.last_sequence, Ordering::Relaxed);
    conn.turns.store(doc.turns, Ordering::Relaxed);
    let model = opening
        .model
        .clone()
        .unwrap_or_else(|| active.config.default_model.clone());
    tracing::debug!(session = %opening.session_id, resumed, model = %model, "connected");
    conn.send(framer.session(
        &SessionEvent::Open {
            session_id: &opening.session_id,
            resumed,
            model: &model,
            last_sequence: doc.last_sequence,
        },
        &Meta::now(doc.last_sequence, SOURCE_HOST, None),
    ))
    .await;

    let current: CurrentTurn = Arc::default();
    let closed = Arc::new(AtomicBool::new(false));
    let mut queue = Queue {
        started: None,
        max: max_queued,
        conn: conn.clone(),
        current: current.clone(),
        closed: closed.clone(),
    };

    let reading = Reading {
        notices: host.reloader.notices.subscribe(),
        shutdown: host.shutdown.subscribe(),
        queue: &mut queue,
        current: &current,
        command_mode: opening.command_mode,
    };
    let ended = read_frames(&conn, ws_rx, reading).await;

    // Queued prompts are dropped. When the client is gone, the running turn
    // is cancelled (and saved with what it had); on shutdown it may finish
    // within the grace period first.
    closed.store(true, Ordering::Relaxed);
    if let Some((prompts, mut worker)) = queue.started.take() {
        drop(prompts);
        if matches!(ended, Ended::Shutdown) {
            let grace = Duration::from_secs(host.active.load().config.server.shutdown_grace_secs);
            if tokio::time::timeout(grace, &mut worker).await.is_err() {
                cancel_current(&current);
                let _ = worker.await;
            }
        } else {
            cancel_current(&current);
            let _ = worker.await;
        }
    }
    drop(queue);
    if matches!(ended, Ended::Shutdown) {
        close(&conn, CloseCode::Away, "the server is shutting down").await;
    }
    conn.out.finish().await;
    tracing::debug!(session = %opening.session_id, "disconnected");
}

/// What the read loop works with besides the socket.
struct Reading<'a> {
    notices: broadcast::Receiver<Arc<Notice>>,
    shutdown: watch::Receiver<bool>,
    queue: &'a mut Queue,
    current: &'a CurrentTurn,
    command_mode: bool,
}

/// The connection's prompt queue and the task that runs its turns, both
/// made on the first prompt: an idle connection pays for neither.
struct Queue {
    started: Option<(mpsc::Sender<Prompt>, tokio::task::JoinHandle<()>)>,
    max: usize,
    conn: Arc<Connection>,
    current: CurrentTurn,
    closed: Arc<AtomicBool>,
}

impl Queue {
    fn sender(&mut self) -> &mpsc::Sender<Prompt> {
        let (conn, current, closed, max) = (&self.conn, &self.current, &self.closed, self.max);
        &self
            .started
            .get_or_insert_with(|| {
                let (prompts, receiver) = mpsc::channel(max);
                let worker = tokio::spawn(run_turns(
                    conn.clone(),
                    receiver,
                    current.clone(),
                    closed.clone(),
                ));
                (prompts, worker)
            })
            .0
    }

    /// Whether prompts wait in the queue.
    fn waiting(&self) -> bool {
        self.started
            .as_ref()
            .is_some_and(|(prompts, _)| prompts.capacity() < prompts.max_capacity())
    }
}

/// How often the read loop wakes to ping and to check idleness.
fn tick_period(server: &crate::config::ServerConfig) -> Option<Duration> {
    [server.ping_interval_secs, server.idle_timeout_secs]
        .into_iter()
        .filter(|secs| *secs > 0)
        .min()
        .map(|secs| Duration::from_secs(secs.clamp(1, 30)))
}

async fn read_frames<R>(conn: &Connection, mut frames: R, reading: Reading<'_>) -> Ended
where
    R: Stream<Item = Result<WsMessage, WsError>> + Unpin,
{
    let Reading {
        mut notices,
        mut shutdown,
        queue,
        current,
        command_mode,
    } = reading;
    let period = tick_period(&conn.host.active.load().config.server);
    let mut ticks = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = std::time::Instant::now();
    let mut last_ping = std::time::Instant::now();
    loop {
        let frame = tokio::select! {
            frame = frames.next() => frame,
            notice = notices.recv() => {
                match notice {
                    Ok(notice) => reloaded(conn, &notice).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {}
                }
                continue;
            }
            () = conn.out.failed() => {
                tracing::debug!(session = %conn.session_id, "the client takes no frames; dropping");
                return Ended::ClientGone;
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return Ended::Shutdown;
                }
                continue;
            }
            _ = ticks.tick(), if period.is_some() => {
                let server = conn.host.active.load().config.server.clone();
                let idle_for = now_ms().saturating_sub(conn.active_at.load(Ordering::Relaxed));
                let busy = turn_running(current) || queue.waiting();
                if server.idle_timeout_secs > 0 && !busy && idle_for >= server.idle_timeout_secs * 1000 {
                    let message = format!(
                        "no prompt for {} s (server.idle_timeout_secs); closing",
                        server.idle_timeout_secs
                    );
                    conn.send_entry(&protocol_diagnostic("warn", "idle_timeout", &message)).await;
                    close(conn, CloseCode::Normal, "idle timeout").await;
                    return Ended::Closed;
                }
                let ping = Duration::from_secs(server.ping_interval_secs);
                if !ping.is_zero() {
                    if last_seen.elapsed() >= ping * 2 {
                        tracing::debug!(session = %conn.session_id, "no answer to pings; dropping");
                        return Ended::ClientGone;
                    }
                    if last_ping.elapsed() >= ping {
                        last_ping = std::time::Instant::now();
                        conn.out.send([WsMessage::Ping(Default::default())]).await;
                    }
                }
                continue;
            }
        };
        let Some(frame) = frame else {
            return Ended::ClientGone;
        };
        last_seen = std::time::Instant::now();
        if matches!(frame, Ok(WsMessage::Text(_) | WsMessage::Binary(_))) {
            conn.active_at.store(now_ms(), Ordering::Relaxed);
        }
        match frame {
            Ok(WsMessage::Text(text)) if command_mode => match Command::parse(text.as_str()) {
                Ok(Command::Prompt {
                    text,
                    model,
                    params,
                }) => {
                    if let Some(name) = &model {
                        if !conn.host.active.load().models.contains_key(name) {
                            let message = format!("unknown model backend `{name}`");
                            let entry = protocol_diagnostic("error", "unknown_model", &message);
                            conn.send_entry(&entry).await;
                            continue;
                        }
                    }
                    enqueue(
                        conn,
                        queue,
                        Prompt {
                            text,
                            model,
                            params: Box::new(params),
                        },
                    )
                    .await;
                }
                Ok(Command::Cancel) => {
                    if !cancel_current(current) {
                        let entry = protocol_diagnostic(
                            "warn",
                            "nothing_to_cancel",
                            "no turn is running; nothing was cancelled",
                        );
                        conn.send_entry(&entry).await;
                    }
                }
                Err((code, message)) => {
                    conn.send_entry(&protocol_diagnostic("error", code, &message))
                        .await;
                }
            },
            Ok(WsMessage::Text(text)) => {
                let prompt = Prompt {
                    text: text.as_str().to_owned(),
                    model: None,
                    params: Box::default(),
                };
                enqueue(conn, queue, prompt).await;
            }
            Ok(WsMessage::Binary(bytes)) => {
                let message = format!(
                    "binary frames are not prompts ({} bytes ignored); send text frames",
                    bytes.len()
                );
                conn.send_entry(&protocol_diagnostic("error", "binary_frame", &message))
                    .await;
            }
            Ok(WsMessage::Close(_)) => return Ended::ClientGone,
            Ok(_) => {}
            Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                let message = format!(
                    "a frame of {size} bytes is over the limit of {max_size} (server.max_frame_bytes)"
                );
                conn.send_entry(&protocol_diagnostic("error", "frame_too_large", &message))
                    .await;
                close(conn, CloseCode::Size, "frame too large").await;
                return Ended::Closed;
            }
            Err(err) => {
                tracing::debug!(session = %conn.session_id, error = %err, "read failed");
                return Ended::ClientGone;
            }
        }
    }
}

/// Tells the client what a reload changed, and moves the connection off a
/// backend or store that no longer exists.
async fn reloaded(conn: &Connection, notice: &Notice) {
    let mut lines = notice.changes.clone();
    {
        let mut model = conn.model.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(chosen) = model.as_ref().filter(|m| notice.removed_models.contains(m)) {
            lines.push(format!(
                "this session's backend `{chosen}` was removed; it now uses the default, `{}`",
                notice.default_model
            ));
            *model = None;
        }
    }
    {
        let mut store = conn.store.lock().unwrap_or_else(|p| p.into_inner());
        if notice.removed_stores.contains(&store) {
            lines.push(format!(
                "this session's store `{store}` was removed; it now lives in `{}`",
                notice.default_store
            ));
            *store = notice.default_store.clone();
        }
    }
    let message = lines.join("; ");
    let entry = DiagnosticEntry {
        level: "warn",
        kind: "host",
        message: &message,
        data: Some(serde_json::json!({ "code": "reloaded", "changes": lines })),
    };
    conn.send_entry(&entry).await;
}

async fn enqueue(conn: &Connection, queue: &mut Queue, prompt: Prompt) {
    let server = conn.host.active.load().config.server.clone();
    if prompt.text.len() > server.max_prompt_bytes {
        metrics().refuse("prompt_too_long");
        let message = format!(
            "the prompt has {} bytes, over server.max_prompt_bytes = {}; it was not run",
            prompt.text.len(),
            server.max_prompt_bytes
        );
        conn.send_entry(&protocol_diagnostic("error", "prompt_too_long", &message))
            .await;
        return;
    }
    if !conn
        .host
        .turn_rate
        .allow(conn.caller.id(), server.turns_per_minute)
    {
        metrics().refuse("rate_limited");
        let message = format!(
            "more than {} turns a minute for this API key (server.turns_per_minute); \
             this prompt was not run",
            server.turns_per_minute
        );
        conn.send_entry(&protocol_diagnostic("error", "rate_limited", &message))
            .await;
        return;
    }
    let prompts = queue.sender();
    if prompts.try_send(prompt).is_err() {
        metrics().refuse("queue_full");
        let message = format!(
            "too many prompts queued behind the running turn (server.max_queued_prompts = {}); \
             this one was not run",
            prompts.max_capacity()
        );
        conn.send_entry(&protocol_diagnostic("error", "queue_full", &message))
            .await;
    }
}

/// Runs queued prompts one after another until the connection closes.
async fn run_turns(
    conn: Arc<Connection>,
    mut prompts: mpsc::Receiver<Prompt>,
    current: CurrentTurn,
    closed: Arc<AtomicBool>,
) {
    while let Some(prompt) = prompts.recv().await {
        let control = Arc::new(TurnControl::default());
        set_current(&current, Some(control.clone()));
        if closed.load(Ordering::Relaxed) {
            break;
        }
        let limit = conn.host.active.load().config.server.turn_timeout_secs;
        let turn = turn::run(&conn, prompt, control.clone());
        tokio::pin!(turn);
        // Past its deadline a turn is stopped, and still runs to its end
        // (the error event, the save, the turn frame).
        let deadline = tokio::time::sleep(Duration::from_secs(limit));
        tokio::select! {
            () = &mut turn => {}
            () = deadline, if limit > 0 => {
                control.time_out(limit);
                turn.await;
            }
        }
        set_current(&current, None);
        conn.active_at.store(now_ms(), Ordering::Relaxed);
    }
}

async fn close(conn: &Connection, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    conn.out.close(frame).await;
}
