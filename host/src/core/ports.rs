//! The ports: what the turn core needs from the world, as small traits named
//! for what the core does with them. The plugin loader implements them for
//! the FFI adapters (`plugins::ports`), the socket layer implements
//! [`Frames`] (`web::outbox`), and the core's tests implement all three with
//! in-memory fakes.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
pub use llm_host_plugin_api::Next;

use super::sink::TurnSink;

/// A session as a store holds it: the host's JSON document, its owner and
/// its version (at least 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The version of this state.
    pub version: u64,
    /// The API key id that owns the session, or empty.
    pub owner: String,
    /// The session document's JSON.
    pub data: String,
}

/// The result of a conditional save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Written; the session now has `version`.
    Saved {
        /// The new version.
        version: u64,
    },
    /// Not written: the stored version was `current` (0: absent).
    Conflict {
        /// The version the store holds.
        current: u64,
    },
}

/// A store call that failed, for the client and the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store answered with an error.
    #[error("store `{store}` failed: {message}")]
    Failed {
        /// The store's name.
        store: String,
        /// What it said.
        message: String,
    },
    /// The call did not answer in time.
    #[error("store `{store}` did not answer `{op}` within {ms} ms (server.store_timeout_ms)")]
    TimedOut {
        /// The store's name.
        store: String,
        /// The call.
        op: &'static str,
        /// The limit.
        ms: u64,
    },
    /// The stored document is not a session document.
    #[error("session `{id}` in store `{store}` is not readable: {error}")]
    Unreadable {
        /// The store's name.
        store: String,
        /// The session.
        id: String,
        /// Its owner, as the store keeps it beside the document.
        owner: String,
        /// The parse error.
        error: String,
    },
    /// The call was lost (its task panicked).
    #[error("store `{0}` call did not complete")]
    Lost(String),
    /// Saves kept conflicting with other writers.
    #[error("store `{0}`: the session kept changing under this save; gave up")]
    Contended(String),
}

impl StoreError {
    /// What a client is told: the kind of failure, without the store's own
    /// words (file paths, database hosts), which go to the log only.
    pub fn public(&self) -> &'static str {
        match self {
            StoreError::Failed { .. } | StoreError::Lost(_) => "the session store failed",
            StoreError::TimedOut { .. } => "the session store did not answer in time",
            StoreError::Unreadable { .. } => "the stored session is not readable",
            StoreError::Contended(_) => "the session kept changing under this save",
        }
    }
}

/// Where sessions live. Versions make saves safe under concurrency: a save
/// names the version it loaded and writes only if the store still holds it
/// (0: only if absent).
pub trait SessionStore: Send + Sync + 'static {
    /// Its name in config.
    fn name(&self) -> &str;
    /// Whether other hosts may reach its sessions (then turns hold leases),
    /// as opposed to a store in this process's memory.
    fn shared(&self) -> bool;
    /// The session, or none.
    fn load(&self, id: &str) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send;
    /// Writes the session if the store holds `expected` (0: absent).
    fn save(
        &self,
        id: &str,
        expected: u64,
        owner: &str,
        data: String,
    ) -> impl Future<Output = Result<SaveOutcome, StoreError>> + Send;
    /// Removes the session; answers whether it existed.
    fn delete(&self, id: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// Why a model failed: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    /// Machine-readable (`invalid_request`, `upstream`, ...).
    pub code: String,
    /// What happened.
    pub message: String,
}

impl ModelError {
    /// An `internal` error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            code: "internal".to_owned(),
            message: message.into(),
        }
    }
}

/// Wakes a stepped turn whose step answered [`Next::Pending`]; may be
/// called from any thread.
pub type Wake = Arc<tokio::sync::Notify>;

/// A model backend. Its events go into the turn's [`TurnSink`].
pub trait Model: Send + Sync + 'static {
    /// One turn run in steps.
    type Stepper: Stepper;
    /// Its name in config.
    fn name(&self) -> &str;
    /// Whether its turns run in steps on the async workers (never blocking)
    /// rather than in one blocking call.
    fn stepped(&self) -> bool;
    /// Runs a whole turn; called on a blocking thread. `request` is the
    /// model request's JSON.
    fn generate(&self, request: &str, sink: &mut TurnSink) -> Result<(), ModelError>;
    /// Starts a turn run in steps.
    fn start(&self, request: &str, wake: Wake) -> Result<Self::Stepper, ModelError>;
}

/// A turn run in steps; dropped when the turn is over or stopped.
pub trait Stepper: Send {
    /// Emits what is ready and answers what comes next. Never blocks.
    fn step(&mut self, sink: &mut TurnSink) -> Result<Next, ModelError>;
}

/// Where a connection's frames go: the client's socket, or a test's record.
/// Frames are JSON text.
pub trait Frames: Send + Sync {
    /// Sends `frames` (drained) with one flush, numbered up to `through`,
    /// and records `through` as the last number used (even when the client
    /// is gone: the numbers are used). Answers false once the client is gone.
    fn send_numbered(
        &self,
        frames: &mut Vec<Bytes>,
        through: u64,
    ) -> impl Future<Output = bool> + Send;
    /// Sends the frame `make` writes from the last number used, read in the
    /// same step as the send (a diagnostic never names a number the client
    /// was not sent).
    fn send_stamped(
        &self,
        make: impl FnOnce(u64) -> Bytes + Send,
    ) -> impl Future<Output = bool> + Send;
}

/// The backends a turn may use besides the one it is given: the one the
/// session's settings name ([`super::settings`]), and each backend's
/// history policy and its summarizer ([`super::history`]).
pub trait Backends<M: Model>: Sync {
    /// The backend named `name`, if one is configured.
    fn model(&self, name: &str) -> Option<Arc<M>>;
    /// The history policy of backend `name`, if it has one.
    fn history(&self, name: &str) -> Option<&super::history::HistoryPolicy>;
}

/// No other backend, and no history policy.
pub struct NoBackends;

impl<M: Model> Backends<M> for NoBackends {
    fn model(&self, _name: &str) -> Option<Arc<M>> {
        None
    }

    fn history(&self, _name: &str) -> Option<&super::history::HistoryPolicy> {
        None
    }
}
