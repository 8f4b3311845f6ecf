//! One WebSocket connection: reads client frames, queues prompts, and runs
//! the session's turns one at a time through the turn core, its frames going
//! out through the connection's [`Outbox`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::{
    error::{CapacityError, Error as WsError, ProtocolError},
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message as WsMessage,
};
use tokio_tungstenite::WebSocketStream;

use super::announce::announce;
use super::auth::Caller;
use super::outbox::Outbox;
use super::queue::{
    cancel_current, deliver_tool_result, enqueue, over_token_limit, refuse, turn_running,
    CurrentTurn, Queue,
};
use crate::core::document::Loaded;
use crate::core::settings::SettingsUpdate;
use crate::core::{Attachment, Party, Prompt};
use crate::metrics::metrics;
use crate::plugins::reload::Notice;
use crate::protocol::{
    now_ms, protocol_diagnostic, Command, DiagnosticEntry, Framer, Meta, SOURCE_HOST,
};
use crate::state::HostState;

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
    /// The session as the upgrade loaded it (to check its owner), if it did.
    pub found: Option<Option<Loaded>>,
    /// The name per-key limits count this connection under: its key, or
    /// in open mode its client's address.
    pub limit_name: String,
    /// What the caller was admitted with (see [`super::auth::credential`]).
    pub credential: Option<[u8; 32]>,
    /// The client's address.
    pub peer: Option<std::net::SocketAddr>,
    /// The trace the upgrade request named (`traceparent`), read only when
    /// telemetry is on: every turn of the socket is a child of it.
    pub trace: Option<crate::telemetry::Parent>,
    /// `?since=N`: the last sequence number the client has, when it asks
    /// for what followed (see [`super::hub`]).
    pub since: Option<u64>,
}

/// State shared by a connection's reader, its turn worker and its turns.
/// Lives until the last turn of the connection has finished.
pub struct Connection {
    /// The host.
    pub host: Arc<HostState>,
    /// What the turn core keeps of the session between turns.
    pub attachment: Attachment,
    /// Who opened it.
    pub caller: Caller,
    /// The name per-key limits count it under (see [`Opening::limit_name`]).
    pub limit_name: String,
    /// What the caller was admitted with.
    pub credential: Option<[u8; 32]>,
    /// The client's address.
    pub peer: Option<std::net::SocketAddr>,
    /// The trace its turns' spans belong to (see [`Opening::trace`]).
    pub trace: Option<crate::telemetry::Parent>,
    /// When the client last sent a frame or a turn ended, Unix ms.
    pub active_at: AtomicU64,
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
    /// The session's sockets on this host: its turns' frames go to each.
    pub hub: Arc<super::hub::Hub>,
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

    /// The session this connection speaks for.
    pub fn session_id(&self) -> &str {
        &self.attachment.session_id
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

    pub(super) async fn send_entry(&self, entry: &DiagnosticEntry<'_>) {
        self.out
            .write_stamped(|sequence| {
                let meta = Meta::now(sequence, SOURCE_HOST, None);
                WsMessage::text(self.framer.diagnostic(entry, &meta))
            })
            .await;
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
    // Subscribed before anything here can wait: a shutdown that begins while
    // this connection waits for its session still reaches it.
    let shutdown = host.shutdown.subscribe();
    let active = host.active.load_full();
    let framer = Framer {
        envelope: active.config.server.envelope,
    };
    let max_queued = active.config.server.max_queued_prompts;
    let (ws_tx, ws_rx) = ws.split();
    let last_sequence = Arc::new(AtomicU64::new(0));
    let party = Party {
        owner: opening.caller.owner().to_owned(),
        sees_all: opening.caller.sees_all(),
    };
    let conn = Arc::new(Connection {
        host: host.clone(),
        attachment: Attachment::new(opening.session_id.clone(), party, last_sequence.clone()),
        caller: opening.caller.clone(),
        limit_name: opening.limit_name.clone(),
        credential: opening.credential,
        peer: opening.peer,
        trace: opening.trace,
        active_at: AtomicU64::new(now_ms()),
        model: Mutex::new(opening.model.clone()),
        store: Mutex::new(active.config.default_store.clone()),
        framer,
        out: Outbox::new(
            ws_tx,
            last_sequence,
            Duration::from_secs(active.config.server.write_timeout_secs),
        ),
        hub: host.hubs.of(&opening.session_id),
    });

    // Boxed: what connecting holds is freed once the session is announced,
    // instead of staying in every idle connection's task.
    if !Box::pin(announce(
        &conn,
        &active,
        opening.session_id.clone(),
        opening.found,
        opening.model.as_deref(),
    ))
    .await
    {
        return;
    }
    // The snapshot was for connecting only: a socket must not hold the
    // active set (its adapters, an old plugin child) for its life.
    drop(active);

    // One of the session's sockets from now on; with `?since=N`, sent what
    // it missed first.
    conn.hub.join(&conn, opening.since).await;

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
        shutdown,
        queue: &mut queue,
        current: &current,
        command_mode: opening.command_mode,
    };
    let ended = read_frames(&conn, ws_rx, reading).await;

    // Queued prompts are dropped. When the client is gone, the running turn
    // runs on for server.reconnect_grace_secs, for a socket to rejoin it,
    // and is then cancelled (and saved with what it had); when the host
    // closed the socket it is cancelled at once; on shutdown it may finish
    // within the shutdown grace first.
    closed.store(true, Ordering::Relaxed);
    // A client gone leaves its session's sockets now (its turn's grace
    // starts if it was the last); otherwise the socket still gets the end
    // of its turn.
    if matches!(ended, Ended::ClientGone) {
        conn.hub.leave(&conn).await;
    }
    if let Some((prompts, mut worker)) = queue.started.take() {
        drop(prompts);
        match ended {
            Ended::Shutdown => {
                let grace =
                    Duration::from_secs(host.active.load().config.server.shutdown_grace_secs);
                if tokio::time::timeout(grace, &mut worker).await.is_err() {
                    cancel_current(&current);
                    let _ = worker.await;
                }
            }
            Ended::ClientGone => {
                let _ = worker.await;
            }
            Ended::Closed => {
                cancel_current(&current);
                let _ = worker.await;
            }
        }
    }
    drop(queue);
    conn.hub.leave(&conn).await;
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
    if *shutdown.borrow() {
        return Ended::Shutdown;
    }
    let period = tick_period(&conn.host.active.load().config.server);
    let mut ticks = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = std::time::Instant::now();
    let mut last_ping = std::time::Instant::now();
    loop {
        let frame = tokio::select! {
            frame = frames.next() => frame,
            notice = notices.recv() => {
                let admitted = super::auth::still_admitted(
                    &conn.host.active.load().config.auth,
                    &conn.caller,
                    conn.credential,
                );
                if !admitted {
                    revoked(conn).await;
                    return Ended::Closed;
                }
                match notice {
                    Ok(notice) => reloaded(conn, &notice).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {}
                }
                continue;
            }
            () = conn.out.failed() => {
                tracing::debug!(session = %conn.session_id(), "the client takes no frames; dropping");
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
                    metrics().refuse("idle_timeout");
                    conn.send_entry(&protocol_diagnostic("warn", "idle_timeout", &message)).await;
                    close(conn, CloseCode::Normal, "idle timeout").await;
                    return Ended::Closed;
                }
                let ping = Duration::from_secs(server.ping_interval_secs);
                if !ping.is_zero() {
                    if last_seen.elapsed() >= ping * 2 {
                        tracing::debug!(session = %conn.session_id(), "no answer to pings; dropping");
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
                    id,
                    text,
                    model,
                    params,
                }) => {
                    if let Some(name) = &model {
                        if !conn.host.active.load().models.contains_key(name) {
                            let message = format!("unknown model backend `{name}`");
                            refuse(conn, id.as_deref(), "unknown_model", &message).await;
                            continue;
                        }
                    }
                    if let Some(message) = over_token_limit(conn, model.as_deref(), &params) {
                        refuse(conn, id.as_deref(), "max_tokens_too_large", &message).await;
                        continue;
                    }
                    enqueue(
                        conn,
                        queue,
                        Prompt {
                            id,
                            text,
                            model,
                            params: Box::new(params),
                            round_trips: true,
                        },
                    )
                    .await;
                }
                Ok(Command::Cancel) => {
                    // The session's running turn, whichever socket's; else
                    // this socket's own, while it waits to claim.
                    if !conn.hub.cancel_running(conn).await && !cancel_current(current) {
                        let entry = protocol_diagnostic(
                            "warn",
                            "nothing_to_cancel",
                            "no turn is running; nothing was cancelled",
                        );
                        conn.send_entry(&entry).await;
                    }
                }
                Ok(Command::ToolResult {
                    call_id,
                    content,
                    error,
                }) => {
                    let outcome = content.ok_or(error.unwrap_or_default());
                    let mut delivered = deliver_tool_result(current, &call_id, outcome.clone());
                    // The turn waiting may be another socket's.
                    if matches!(delivered, Err(crate::core::tools::Refused::NotWaiting)) {
                        if let Some(turn) = conn.hub.running(conn).await {
                            delivered = turn.tools.deliver(&call_id, outcome);
                        }
                    }
                    if let Err(refused) = delivered {
                        let message = refused.message(&call_id);
                        let entry = protocol_diagnostic("error", "bad_tool_result", &message);
                        conn.send_entry(&entry).await;
                    }
                }
                Ok(Command::SessionUpdate {
                    system,
                    model,
                    params,
                }) => {
                    let update = SettingsUpdate {
                        system,
                        model,
                        params,
                    };
                    match super::settings::check(conn, &update) {
                        Ok(()) => super::settings::enqueue(conn, queue, update).await,
                        Err((code, message)) => {
                            conn.send_entry(&protocol_diagnostic("error", code, &message))
                                .await;
                        }
                    }
                }
                Err((code, message)) => {
                    conn.send_entry(&protocol_diagnostic("error", code, &message))
                        .await;
                }
            },
            Ok(WsMessage::Text(text)) => {
                let prompt = Prompt {
                    id: None,
                    text: text.as_str().to_owned(),
                    model: None,
                    params: Box::default(),
                    round_trips: false,
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
                metrics().refuse("frame_too_large");
                conn.send_entry(&protocol_diagnostic("error", "frame_too_large", &message))
                    .await;
                close(conn, CloseCode::Size, "frame too large").await;
                return Ended::Closed;
            }
            // RFC 6455 7.4.1: 1007 for a text frame that is not UTF-8, 1002
            // for any other protocol violation (an unmasked or reserved
            // frame, RSV bits, a lone continuation, a control frame over
            // 125 bytes).
            Err(WsError::Utf8(err)) => {
                tracing::debug!(session = %conn.session_id(), error = %err, "not UTF-8");
                metrics().refuse("protocol_violation");
                close(conn, CloseCode::Invalid, "text frame is not UTF-8").await;
                return Ended::Closed;
            }
            // A client that went away without a close frame is gone, not
            // at fault.
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return Ended::ClientGone;
            }
            Err(WsError::Protocol(err)) => {
                tracing::debug!(session = %conn.session_id(), error = %err, "protocol violation");
                metrics().refuse("protocol_violation");
                let reason = match err.to_string() {
                    reason if reason.len() <= 100 => reason,
                    _ => "protocol violation".to_owned(),
                };
                close(conn, CloseCode::Protocol, &reason).await;
                return Ended::Closed;
            }
            Err(err) => {
                tracing::debug!(session = %conn.session_id(), error = %err, "read failed");
                return Ended::ClientGone;
            }
        }
    }
}

/// Closes a connection whose key a reload revoked (1008, `key_revoked`).
/// Boxed: the read loop should not carry this state while it waits.
fn revoked(
    conn: &Connection,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        tracing::info!(
            session = %conn.session_id(),
            key = conn.caller.id(),
            "closing: its key was removed or changed by a reload"
        );
        let message = "this connection's API key was removed or changed by a reload; \
                       reconnect with a valid key";
        conn.send_entry(&protocol_diagnostic("error", "key_revoked", message))
            .await;
        close(conn, CloseCode::Policy, "key revoked").await;
    })
}

/// Tells the client what a reload changed of what its session uses (its
/// backend, its store), and moves the connection off a backend or store
/// that no longer exists. A reload that changed nothing it uses is not
/// mentioned.
async fn reloaded(conn: &Connection, notice: &Notice) {
    let mut lines = Vec::new();
    {
        let mut model = conn.model.lock().unwrap_or_else(|p| p.into_inner());
        match model.as_ref() {
            Some(chosen) if notice.removed_models.contains(chosen) => {
                lines.push(format!(
                    "this session's backend `{chosen}` was removed; it now uses the default, `{}`",
                    notice.default_model
                ));
                *model = None;
            }
            Some(chosen) => lines.extend(notice.changed_models.get(chosen).cloned()),
            None if notice.default_model_changed => lines.push(format!(
                "this session now uses the default backend `{}`",
                notice.default_model
            )),
            None => lines.extend(notice.changed_models.get(&notice.default_model).cloned()),
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
        } else {
            lines.extend(notice.changed_stores.get(&*store).cloned());
        }
    }
    if lines.is_empty() {
        return;
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

pub(super) async fn close(conn: &Connection, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    conn.out.close(frame).await;
}
