//! A session's sockets on this host: every socket of a session receives
//! the frames of its running turn, whichever socket asked for it; a socket
//! that connects with `?since=N` is first sent what it missed (from the
//! store's log of the latest turn and the running turn's own log, see
//! [`crate::core::replay`]), each frame once and in order, then follows
//! the turn live; and a turn whose sockets all went away runs on for
//! `server.reconnect_grace_secs` before it is cancelled.
//!
//! Frames reach the sockets under the hub's lock, and a socket joins under
//! it too: a frame is either in what a joining socket is sent first or
//! among those it follows, never both (each socket also skips numbers it
//! was already sent).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

use super::connection::Connection;
use crate::core::ports::{Frames, SessionStore};
use crate::core::replay::Replay;
use crate::core::sink::TurnControl;
use crate::protocol::protocol_diagnostic;

/// The hubs of the sessions with sockets on this host.
#[derive(Default)]
pub struct Hubs {
    hubs: Mutex<HashMap<String, Weak<Hub>>>,
}

impl Hubs {
    /// The hub of session `id`, made if it has none.
    pub fn of(&self, id: &str) -> Arc<Hub> {
        let mut hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hub) = hubs.get(id).and_then(Weak::upgrade) {
            return hub;
        }
        // Hubs whose sockets are all gone are forgotten now and then, so
        // the map stays as large as the sessions with sockets.
        if hubs.len() >= 64 && hubs.len().is_power_of_two() {
            hubs.retain(|_, hub| hub.strong_count() > 0);
        }
        let hub = Arc::new(Hub::default());
        hubs.insert(id.to_owned(), Arc::downgrade(&hub));
        hub
    }

    /// How many sessions have a hub (for tests of the forgetting).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.hubs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One session's sockets on this host and its running turn.
#[derive(Default)]
pub struct Hub {
    state: tokio::sync::Mutex<State>,
    /// `server.reconnect_grace_secs`, as the last socket to join saw it.
    grace_secs: AtomicU64,
}

#[derive(Default)]
struct State {
    sockets: Vec<Socket>,
    /// The turn running on this host, once it sent a frame.
    running: Option<Arc<TurnControl>>,
    /// Counts the times the hub was left with no socket: a grace timer
    /// acts only if no socket came and left since it started.
    alone: u64,
    /// The turn whose grace runs, while no socket is there.
    grace_of: Option<Arc<TurnControl>>,
    /// The last number a turn of this host sent.
    last_sent: u64,
}

/// Whether `conn` may follow `turn`: a turn of a session its key may use
/// (a socket that came before another key created the session may not).
fn may_follow(conn: &Connection, turn: &TurnControl) -> bool {
    turn.owner()
        .is_some_and(|owner| conn.attachment.party.may_use(owner))
}

/// A socket following the session.
struct Socket {
    conn: Weak<Connection>,
    /// The last number it was sent.
    through: u64,
}

impl Socket {
    fn is(&self, conn: &Connection) -> bool {
        std::ptr::eq(self.conn.as_ptr(), conn)
    }
}

/// A frame's JSON text as a WebSocket text message.
fn text(frame: &Bytes) -> Option<WsMessage> {
    Utf8Bytes::try_from(frame.clone()).ok().map(WsMessage::Text)
}

impl Hub {
    /// Adds `conn` to the session's sockets. With `since`, it is first sent
    /// every frame numbered after it that the host keeps, or told by a
    /// `replay_gap` diagnostic where what it can have begins. A turn that
    /// runs on another host sharing the store is followed from the store
    /// (see [`Hub::follow`]).
    pub async fn join(self: &Arc<Self>, conn: &Arc<Connection>, since: Option<u64>) {
        let active = conn.host.active.load_full();
        let server = &active.config.server;
        self.grace_secs
            .store(server.reconnect_grace_secs, Ordering::Relaxed);
        let store = active.stores.get(&conn.store()).or_else(|| active.store());
        let shared = store.is_some_and(|store| store.shared());
        let mut state = self.state.lock().await;
        let running = state
            .running
            .clone()
            .filter(|turn| !turn.has_ended() && may_follow(conn, turn));
        // The session as stored now: what to replay, and whether another
        // host runs a turn of it.
        let loaded = match store {
            Some(store) if since.is_some() || (shared && running.is_none()) => {
                let timeout = server.turn_settings().store_timeout;
                crate::core::load(store, conn.session_id(), timeout).await
            }
            _ => Ok(None),
        };
        let mut through = conn.attachment.sequence();
        if let Some(turn) = &running {
            through = through.max(turn.frames(|log| log.last()).unwrap_or(0));
        }
        let elsewhere = running.is_none()
            && loaded.as_ref().is_ok_and(|loaded| {
                loaded
                    .as_ref()
                    .and_then(|found| found.doc.lease.as_ref())
                    .is_some_and(|lease| lease.holder != conn.host.instance)
            });
        // The announcement named the last number saved: frames sent since
        // (the running turn's so far, or a turn that ended meanwhile) are
        // sent first, as to a client that asked for them.
        let announced = conn.attachment.sequence();
        let asked = since.is_some();
        let missed = since.is_none() && (running.is_some() || state.last_sent > announced);
        if missed && loaded.as_ref().is_ok_and(Option::is_none) && running.is_none() {
            let timeout = server.turn_settings().store_timeout;
            if let Some(store) = store {
                let loaded = crate::core::load(store, conn.session_id(), timeout).await;
                through = replay(conn, announced, false, None, loaded).await;
            }
        } else if let Some(since) = since.or(missed.then_some(announced)) {
            through = replay(conn, since, asked, running.as_deref(), loaded).await;
        }
        state.sockets.push(Socket {
            conn: Arc::downgrade(conn),
            through,
        });
        state.alone += 1;
        state.grace_of = None;
        drop(state);
        if elsewhere {
            let every = server.turn_settings().renew;
            let (hub, conn) = (self.clone(), Arc::downgrade(conn));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(conn) = conn.upgrade() else { return };
                    if !hub.follow(&conn).await {
                        return;
                    }
                }
            });
        }
    }

    /// Sends `conn` the frames of a turn running on another host that the
    /// store holds and it was not sent (the holder writes them at each
    /// lease renewal, so they come `server.lease_renew_ms` apart); answers
    /// whether that turn still runs there.
    async fn follow(&self, conn: &Connection) -> bool {
        let mut state = self.state.lock().await;
        // A turn of this host now: it sends its frames itself.
        if state.running.is_some() {
            return false;
        }
        let Some(socket) = state.sockets.iter_mut().find(|socket| socket.is(conn)) else {
            return false;
        };
        let active = conn.host.active.load_full();
        let Some(store) = active.stores.get(&conn.store()).or_else(|| active.store()) else {
            return false;
        };
        let timeout = active.config.server.turn_settings().store_timeout;
        let found = match crate::core::load(store, conn.session_id(), timeout).await {
            Ok(Some(found)) => found,
            Ok(None) => return false,
            // Tried again at the next round.
            Err(err) => {
                tracing::warn!(session = %conn.session_id(), error = %err, "cannot follow the turn");
                return true;
            }
        };
        let frames = found
            .doc
            .replay
            .as_ref()
            .map(|stored| stored.since(socket.through))
            .unwrap_or_default();
        if let Some(&(first, _)) = frames.first() {
            if first > socket.through + 1 {
                gap(conn, socket.through, first).await;
            }
        }
        if let Some(&(last, _)) = frames.last() {
            let messages: Vec<WsMessage> = frames.iter().filter_map(|(_, f)| text(f)).collect();
            if !conn.out.write_numbered(messages, last).await {
                return false;
            }
            socket.through = last;
        }
        found
            .doc
            .lease
            .is_some_and(|lease| lease.holder != conn.host.instance)
    }

    /// Takes `conn` off the session's sockets. A running turn left with no
    /// socket is cancelled after `server.reconnect_grace_secs` unless a
    /// socket joins first (at once when it is 0).
    pub async fn leave(self: &Arc<Self>, conn: &Connection) {
        let mut state = self.state.lock().await;
        state.sockets.retain(|socket| !socket.is(conn));
        self.left(&mut state);
    }

    /// Starts the grace of a running turn with no socket (its last one just
    /// went, or it started after they all had), unless it runs already.
    fn left(self: &Arc<Self>, state: &mut State) {
        if !state.sockets.is_empty() {
            return;
        }
        let Some(turn) = state.running.clone().filter(|turn| !turn.has_ended()) else {
            return;
        };
        if state
            .grace_of
            .as_ref()
            .is_some_and(|armed| Arc::ptr_eq(armed, &turn))
        {
            return;
        }
        state.grace_of = Some(turn.clone());
        state.alone += 1;
        let grace = Duration::from_secs(self.grace_secs.load(Ordering::Relaxed));
        if grace.is_zero() {
            turn.cancel();
            return;
        }
        let (hub, alone) = (Arc::downgrade(self), state.alone);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(hub) = hub.upgrade() else {
                turn.cancel();
                return;
            };
            let state = hub.state.lock().await;
            if state.alone == alone && state.sockets.is_empty() {
                tracing::debug!("no socket rejoined the turn within server.reconnect_grace_secs");
                turn.cancel();
            }
        });
    }

    /// Cancels the session's running turn on this host, for `conn`, one of
    /// its sockets; answers whether one ran.
    pub async fn cancel_running(&self, conn: &Connection) -> bool {
        let state = self.state.lock().await;
        match &state.running {
            Some(turn) if !turn.has_ended() && may_follow(conn, turn) => {
                turn.cancel();
                true
            }
            _ => false,
        }
    }

    /// The session's running turn on this host, if one runs that `conn`
    /// may follow.
    pub async fn running(&self, conn: &Connection) -> Option<Arc<TurnControl>> {
        let state = self.state.lock().await;
        state
            .running
            .clone()
            .filter(|turn| !turn.has_ended() && may_follow(conn, turn))
    }

    /// The turn `control` is over: it is no longer the running one.
    pub async fn finished(&self, control: &Arc<TurnControl>) {
        let mut state = self.state.lock().await;
        if state
            .running
            .as_ref()
            .is_some_and(|turn| Arc::ptr_eq(turn, control))
        {
            state.running = None;
        }
    }

    /// The frames port of turn `control`, run by `runner`, through this hub.
    pub fn turn(
        self: &Arc<Self>,
        control: Arc<TurnControl>,
        runner: &Arc<Connection>,
    ) -> TurnFrames {
        TurnFrames {
            hub: self.clone(),
            control,
            runner: Arc::downgrade(runner),
        }
    }
}

/// Sends `conn` the frames after `since` from `loaded` (the session as
/// stored) and `running` (a turn running here), and when `asked` (the
/// client asked with `?since=`) tells it of a gap; answers the last number
/// it was sent. Called under the hub's lock.
async fn replay(
    conn: &Connection,
    since: u64,
    asked: bool,
    running: Option<&TurnControl>,
    loaded: Result<Option<crate::core::document::Loaded>, crate::core::ports::StoreError>,
) -> u64 {
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(err) => {
            tracing::error!(session = %conn.session_id(), error = %err, "cannot load the frames to replay");
            let message = format!(
                "the frames after {since} could not be read: {}",
                err.public()
            );
            conn.send_entry(&protocol_diagnostic("error", "store_unavailable", &message))
                .await;
            return conn.attachment.sequence();
        }
    };
    let saved_last = loaded.as_ref().map_or(0, |found| found.doc.last_sequence);
    // A turn running on another host may have sent the client numbers the
    // store does not hold yet, up to its reservation.
    let reserved = loaded
        .as_ref()
        .and_then(|found| found.doc.lease.as_ref())
        .map_or(0, |lease| lease.reserved);
    let stored = loaded.as_ref().and_then(|found| found.doc.replay.as_ref());
    let replay = match running {
        Some(turn) => turn.frames(|log| Replay::after(since, saved_last, stored, Some(log))),
        None => Replay::after(since, saved_last, stored, None),
    };
    if let Some(first) = replay.gap.filter(|_| asked) {
        gap(conn, since, first).await;
    }
    let Some(&(last, _)) = replay.frames.last() else {
        // A client that says it has more than was ever sent has what was.
        let known = running
            .and_then(|turn| turn.frames(|log| log.last()))
            .unwrap_or(0)
            .max(saved_last)
            .max(reserved)
            .max(conn.attachment.sequence());
        return since.min(known);
    };
    let frames: Vec<WsMessage> = replay
        .frames
        .iter()
        .filter_map(|(_, frame)| text(frame))
        .collect();
    conn.out.write_numbered(frames, last).await;
    last
}

/// Tells `conn` that the frames after `since` are kept from `first` on.
async fn gap(conn: &Connection, since: u64, first: u64) {
    let message = format!(
        "frames after {since} are no longer kept (server.replay_frames); the first this host \
         can send is {first}"
    );
    let mut entry = protocol_diagnostic("warn", "replay_gap", &message);
    if let Some(data) = entry.data.as_mut() {
        data["firstAvailable"] = first.into();
    }
    conn.send_entry(&entry).await;
}

/// A turn's frames, sent to every socket of its session on this host.
pub struct TurnFrames {
    hub: Arc<Hub>,
    control: Arc<TurnControl>,
    /// The socket whose prompt it is: its diagnostics go there only.
    runner: Weak<Connection>,
}

impl Frames for TurnFrames {
    async fn send_numbered(&self, frames: &mut Vec<Bytes>, through: u64) -> bool {
        let mut state = self.hub.state.lock().await;
        // The turn sends frames once it holds the session: from now on it
        // is the one sockets joining here follow.
        if !state
            .running
            .as_ref()
            .is_some_and(|turn| Arc::ptr_eq(turn, &self.control))
        {
            state.running = Some(self.control.clone());
        }
        state.last_sent = state.last_sent.max(through);
        let first = (through + 1).saturating_sub(frames.len() as u64);
        let mut at = 0;
        while at < state.sockets.len() {
            let socket = &mut state.sockets[at];
            let Some(conn) = socket.conn.upgrade() else {
                state.sockets.swap_remove(at);
                continue;
            };
            if !may_follow(&conn, &self.control) {
                at += 1;
                continue;
            }
            // Numbers the socket was already sent (while it joined) are
            // skipped.
            let skip = usize::try_from((socket.through + 1).saturating_sub(first))
                .unwrap_or(usize::MAX)
                .min(frames.len());
            if skip < frames.len() {
                let messages: Vec<WsMessage> = frames[skip..].iter().filter_map(text).collect();
                let sent = conn.out.write_numbered(messages, through).await;
                if !sent {
                    state.sockets.swap_remove(at);
                    continue;
                }
                socket.through = through;
            }
            at += 1;
        }
        frames.clear();

        if state.sockets.is_empty() {
            self.hub.left(&mut state);
        }
        // With no socket the turn runs on, within its grace (which cancels
        // it); with none, it stops now.
        !state.sockets.is_empty() || self.hub.grace_secs.load(Ordering::Relaxed) > 0
    }

    async fn send_stamped(&self, make: impl FnOnce(u64) -> Bytes + Send) -> bool {
        match self.runner.upgrade() {
            Some(runner) => runner.out.send_stamped(make).await,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hubs_of_sessions_without_sockets_are_forgotten() {
        let hubs = Hubs::default();
        let kept = hubs.of("kept");
        assert!(Arc::ptr_eq(&kept, &hubs.of("kept")));
        for at in 0..200 {
            drop(hubs.of(&format!("gone-{at}")));
        }
        assert!(hubs.len() < 200, "{}", hubs.len());
        assert!(Arc::ptr_eq(&kept, &hubs.of("kept")));
    }
}
