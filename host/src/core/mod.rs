//! The turn core: a session's turns claimed, run and saved, knowing neither
//! sockets nor the plugin ABI. It talks to the world through the
//! [`ports`]: a [`ports::SessionStore`], a [`ports::Model`] and the client's
//! [`ports::Frames`].
//!
//! - [`document`]: the session document a store keeps, its history's JSON.
//! - [`claim`]: claiming a session for a turn, and keeping the lease while
//!   it runs (ownership, leases, sequence reservations, fencing).
//! - [`commit`]: saving a finished turn.
//! - [`sink`]: a turn's model events into numbered frames and an answer.
//! - [`report`]: what became of a turn, and when its parts ran.
//! - [`turn`]: one turn from prompt to end frame (and [`generate`], the model
//!   run in steps or on the blocking pool);
//!   a model run once over given messages, with no session ([`turn::run_unsaved`]).
//! - [`replay`]: the frames of a session's latest turn, kept for clients
//!   that reconnect asking for what they missed.
//! - [`locks`]: one turn of a session at a time on this host.
//! - [`settings`]: a session's settings (`session.update`): its system
//!   prompt, backend and default parameters; [`history`]: a backend's
//!   history policy; both shape a turn's model requests ([`request`]).
//!
//! The guarantees (PROTOCOL.md "Guarantees"): a session belongs to the key
//! that created it, checked at every claim; one turn of a session streams at
//! a time across hosts; no sequence number is sent twice on a session, also
//! after a host dies mid-turn; a turn whose lease is lost stops (`lease_lost`)
//! and its answer is saved only if no other host took the session.

pub mod claim;
pub mod commit;
pub mod document;
mod generate;
pub mod history;
pub mod locks;
pub mod ports;
pub mod replay;
pub mod report;
mod request;
mod rounds;
pub mod settings;
pub mod sink;
pub mod tools;
pub mod turn;

#[cfg(test)]
pub(crate) mod fakes;
#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_host_plugin_api::TurnParams;

use document::Loaded;

/// A prompt waiting for its turn.
#[derive(Debug)]
pub struct Prompt {
    /// The client's name for it (command mode), repeated on its turn's end.
    pub id: Option<String>,
    /// The user's message.
    pub text: String,
    /// The backend for this turn, when the client named one.
    pub model: Option<String>,
    /// Whether the client can send tool results (command mode): then a
    /// model group that ends calling tools waits for them (see
    /// [`rounds`]).
    pub round_trips: bool,
    /// Per-turn parameters (boxed: the prompt queue allocates its slots
    /// up front for every connection).
    pub params: Box<TurnParams>,
}

/// How the host runs turns (from `[server]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnSettings {
    /// How long a lease holds without renewal, as another host counts it.
    pub lease: Duration,
    /// How often a running turn renews its lease.
    pub renew: Duration,
    /// The longest any store call may take.
    pub store_timeout: Duration,
    /// The longest a turn may run; none: no limit.
    pub turn_timeout: Option<Duration>,
    /// Sequence numbers a turn reserves: the most events it may send.
    pub max_turn_events: u64,
    /// Largest a session's messages may grow, in bytes of JSON.
    pub max_history_bytes: usize,
    /// The longest a turn waits for the results of a group's tool calls.
    pub tool_timeout: Duration,
    /// How many of a turn's numbered frames are kept for replay (0: none).
    pub replay_frames: usize,
}

impl Default for TurnSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(8),
            renew: Duration::from_secs(2),
            store_timeout: Duration::from_secs(5),
            turn_timeout: Some(Duration::from_secs(600)),
            max_turn_events: 1_000_000,
            max_history_bytes: 16 << 20,
            tool_timeout: Duration::from_secs(120),
            replay_frames: 1024,
        }
    }
}

/// Who a client is to the sessions it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// The owner recorded on a session this client creates.
    pub owner: String,
    /// Whether it may use sessions of any owner (open mode, admin keys).
    pub sees_all: bool,
}

impl Party {
    /// Whether it may use a session owned by `owner`.
    pub fn may_use(&self, owner: &str) -> bool {
        self.sees_all || self.owner == owner
    }
}

/// What the core keeps of one client's session between its turns. Lives as
/// long as the client's connection.
#[derive(Debug)]
pub struct Attachment {
    /// The session.
    pub session_id: String,
    /// Who uses it.
    pub party: Party,
    /// The session as this client last loaded or saved it, and the store it
    /// is in: the next turn tries its claim on that version without loading
    /// first (a conflict falls back to a load).
    pub cached: Mutex<Option<(String, Loaded)>>,
    /// Turns of the session known to this client.
    pub turns: AtomicU64,
    /// The last sequence number sent to this client (its frame sink advances
    /// it as a turn's frames go out).
    pub last_sequence: Arc<AtomicU64>,
    /// The backend the session's settings named when this client last
    /// loaded or saved it (a turn reads the settings it claims).
    pub settings_model: Mutex<Option<String>>,
}

impl Attachment {
    /// A client's hold on `session_id`, numbering after `last_sequence`.
    pub fn new(session_id: String, party: Party, last_sequence: Arc<AtomicU64>) -> Self {
        Self {
            session_id,
            party,
            cached: Mutex::new(None),
            turns: AtomicU64::new(0),
            last_sequence,
            settings_model: Mutex::new(None),
        }
    }

    /// The last sequence number sent to this client.
    pub fn sequence(&self) -> u64 {
        self.last_sequence.load(Ordering::Relaxed)
    }

    /// The largest session a client keeps between its turns, in bytes of
    /// its messages as JSON. A larger one is loaded again for each turn:
    /// clients resuming one large session on many sockets must not hold a
    /// copy each.
    pub const KEEP_AT_MOST: usize = 256 << 10;

    /// Remembers `loaded` (in store `store`) as the session's latest state,
    /// if it is no larger than [`Attachment::KEEP_AT_MOST`].
    pub fn remember(&self, store: &str, loaded: Loaded) {
        self.turns.fetch_max(loaded.doc.turns, Ordering::Relaxed);
        {
            let mut model = self
                .settings_model
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *model != loaded.doc.settings.model {
                model.clone_from(&loaded.doc.settings.model);
            }
        }
        let keep = loaded.messages_json.bytes(&loaded.doc.messages) <= Self::KEEP_AT_MOST;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) =
            keep.then(|| (store.to_owned(), loaded));
    }

    /// Takes the remembered state if it is of `store`.
    fn take_cached(&self, store: &str) -> Option<Loaded> {
        self.cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(name, _)| name == store)
            .map(|(_, loaded)| loaded)
    }

    /// The backend the session's settings name, as last seen.
    pub fn settings_model(&self) -> Option<String> {
        self.settings_model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The id the next turn would have.
    pub fn next_turn_id(&self) -> String {
        format!("turn-{}", self.turns.load(Ordering::Relaxed) + 1)
    }
}

/// Runs a store call within `limit`.
pub async fn within<T>(
    store: &str,
    op: &'static str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, ports::StoreError>>,
) -> Result<T, ports::StoreError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(ports::StoreError::TimedOut {
            store: store.to_owned(),
            op,
            ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

/// Loads session `id` within the store timeout.
pub async fn load(
    store: &impl ports::SessionStore,
    id: &str,
    limit: Duration,
) -> Result<Option<Loaded>, ports::StoreError> {
    refresh(store, id, limit, None).await
}

/// Loads session `id` like [`load`], but answers `cached` as it is, unparsed,
/// if the store holds exactly it ([`Loaded::is_stored`]).
pub async fn refresh(
    store: &impl ports::SessionStore,
    id: &str,
    limit: Duration,
    cached: Option<Loaded>,
) -> Result<Option<Loaded>, ports::StoreError> {
    match within(store.name(), "load", limit, store.load(id)).await? {
        None => Ok(None),
        Some(stored) => match cached {
            Some(cached) if cached.is_stored(&stored) => Ok(Some(cached)),
            _ => Loaded::parse(store.name(), id, stored).map(Some),
        },
    }
}

/// What a turn works with: this host, the client's session, the store, the
/// client's frames.
pub struct Scope<'a, S, F> {
    /// This host's id among hosts sharing a store (named in leases).
    pub host: &'a str,
    /// The client's session.
    pub attachment: &'a Attachment,
    /// The store the session lives in.
    pub store: &'a S,
    /// The client.
    pub frames: &'a F,
    /// How frames are written.
    pub framer: crate::protocol::Framer,
    /// Leases, timeouts, limits.
    pub settings: TurnSettings,
}

impl<S: ports::SessionStore, F: ports::Frames> Scope<'_, S, F> {
    /// Sends an `interaction.diagnostic` outside the turn's numbered frames
    /// (stamped with the last number sent) with a stable `code`.
    pub async fn diagnostic(&self, level: &str, kind: &str, code: &str, message: &str) {
        let entry = crate::protocol::DiagnosticEntry {
            level,
            kind,
            message,
            data: Some(serde_json::json!({ "code": code })),
        };
        let framer = self.framer;
        self.frames
            .send_stamped(|sequence| {
                let meta = crate::protocol::Meta::now(sequence, crate::protocol::SOURCE_HOST, None);
                bytes::Bytes::from(framer.diagnostic(&entry, &meta))
            })
            .await;
    }

    /// Loads the session within the store timeout.
    pub async fn load(&self) -> Result<Option<Loaded>, ports::StoreError> {
        load(
            self.store,
            &self.attachment.session_id,
            self.settings.store_timeout,
        )
        .await
    }

    /// Saves `doc` if the store holds `expected`, within the store timeout.
    async fn save(
        &self,
        expected: u64,
        owner: &str,
        doc: &document::SessionDoc,
        messages: &mut document::MessagesJson,
    ) -> Result<ports::SaveOutcome, ports::StoreError> {
        let data = messages
            .document(doc)
            .map_err(|err| ports::StoreError::Failed {
                store: self.store.name().to_owned(),
                message: format!("the session could not be written: {err}"),
            })?;
        within(
            self.store.name(),
            "save",
            self.settings.store_timeout,
            self.store
                .save(&self.attachment.session_id, expected, owner, data),
        )
        .await
    }
}
