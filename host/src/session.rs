//! Sessions as the host stores them, and the store calls that move them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use llm_host_plugin_api::{
    abi_stable::std_types::RStr, ListQuery, Message, PluginError, SaveOutcome, StoreAdapterBox,
};
use serde::{Deserialize, Serialize};

use crate::runtime::StoreBackend;

/// Whether `id` is a valid session id or config name: 1-128 characters of
/// `[A-Za-z0-9._:-]`.
pub fn valid_name(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A fresh, unguessable session id.
pub fn new_session_id() -> String {
    format!("session-{}", uuid::Uuid::new_v4())
}

/// The document the host keeps in the store for each session.
///
/// Fields are only ever added, with defaults, so older documents still load.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionDoc {
    /// The conversation.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// The last sequence number used.
    #[serde(default)]
    pub last_sequence: u64,
    /// Turns run so far; the next turn is `turn-{turns + 1}`.
    #[serde(default)]
    pub turns: u64,
    /// The claim of the turn running now, if one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

/// A running turn's claim on its session: while it holds, no other host runs
/// a turn of the session (see `turn::claim`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The host instance running the turn.
    pub holder: String,
    /// The turn's id.
    pub turn: String,
    /// When the claim runs out unless renewed, Unix ms.
    pub expires_ms: u64,
}

/// A session loaded from the store.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Its document.
    pub doc: SessionDoc,
    /// The version loaded (0: not in the store).
    pub version: u64,
    /// Its owner.
    pub owner: String,
}

/// A store call that failed, for the client and the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store plugin returned an error.
    #[error("store `{store}` failed: {error}")]
    Plugin {
        /// The store's name.
        store: String,
        /// Its error.
        error: PluginError,
    },
    /// The stored document is not a session document.
    #[error("session `{id}` in store `{store}` is not readable: {error}")]
    Corrupt {
        /// The store's name.
        store: String,
        /// The session.
        id: String,
        /// The parse error.
        error: serde_json::Error,
    },
    /// The blocking task running the call was lost.
    #[error("store `{0}` call did not complete")]
    Lost(String),
    /// Saves kept conflicting with other writers.
    #[error("store `{0}`: the session kept changing under this save; gave up")]
    Contended(String),
}

/// Loads session `id` on the blocking pool.
pub async fn load(store: &Arc<StoreBackend>, id: &str) -> Result<Option<Loaded>, StoreError> {
    let key = id.to_owned();
    let found = call(store, "load", move |adapter| {
        adapter.load(RStr::from(key.as_str())).into_result()
    })
    .await?;
    let Some(stored) = found.into_option() else {
        return Ok(None);
    };
    let doc = serde_json::from_str(stored.data.as_str()).map_err(|error| StoreError::Corrupt {
        store: store.name.clone(),
        id: id.to_owned(),
        error,
    })?;
    Ok(Some(Loaded {
        doc,
        version: stored.version,
        owner: stored.owner.into_string(),
    }))
}

/// Saves `doc` if the stored version is still `expected_version`.
pub async fn save(
    store: &Arc<StoreBackend>,
    id: &str,
    expected_version: u64,
    owner: &str,
    doc: &SessionDoc,
) -> Result<SaveOutcome, StoreError> {
    let data = serde_json::to_string(doc).map_err(|error| StoreError::Corrupt {
        store: store.name.clone(),
        id: id.to_owned(),
        error,
    })?;
    let (id, owner) = (id.to_owned(), owner.to_owned());
    call(store, "save", move |adapter| {
        adapter
            .save(
                RStr::from(id.as_str()),
                expected_version,
                RStr::from(owner.as_str()),
                RStr::from(data.as_str()),
            )
            .into_result()
    })
    .await
}

/// Deletes session `id`; answers whether it existed.
pub async fn delete(store: &Arc<StoreBackend>, id: &str) -> Result<bool, StoreError> {
    let id = id.to_owned();
    call(store, "delete", move |adapter| {
        adapter.delete(RStr::from(id.as_str())).into_result()
    })
    .await
}

/// One page of the session ids of `owner` (empty: every owner).
pub async fn list(
    store: &Arc<StoreBackend>,
    owner: &str,
    after: &str,
    limit: u32,
) -> Result<Page, StoreError> {
    let (owner, after) = (owner.to_owned(), after.to_owned());
    call(store, "list", move |adapter| {
        adapter
            .list(ListQuery {
                owner: RStr::from(owner.as_str()),
                after: RStr::from(after.as_str()),
                limit,
            })
            .into_result()
            .map(|page| Page {
                ids: page.ids.into_iter().map(|id| id.into_string()).collect(),
                next: page.next.into_option().map(|n| n.into_string()),
            })
    })
    .await
}

/// A page of session ids.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The ids, ascending.
    pub ids: Vec<String>,
    /// Where the next page starts.
    pub next: Option<String>,
}

/// Whether the store answers.
pub async fn ping(store: &Arc<StoreBackend>) -> Result<(), StoreError> {
    call(store, "ping", |adapter| adapter.ping().into_result()).await
}

/// Runs one store call on the blocking pool, timed and counted by `op`.
async fn call<T: Send + 'static>(
    store: &Arc<StoreBackend>,
    op: &'static str,
    body: impl FnOnce(&StoreAdapterBox) -> Result<T, PluginError> + Send + 'static,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let result = if store.in_process {
        // The store answers from memory: a blocking thread would cost more
        // than the call.
        Ok(body(&store.adapter))
    } else {
        let backend = store.clone();
        tokio::task::spawn_blocking(move || body(&backend.adapter)).await
    };
    let metrics = crate::metrics::metrics();
    metrics
        .store_seconds
        .get_or_create(&[("op", op)])
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            metrics.store_errors.get_or_create(&[("op", op)]).inc();
            Err(StoreError::Plugin {
                store: store.name.clone(),
                error,
            })
        }
        Err(_) => {
            metrics.store_errors.get_or_create(&[("op", op)]).inc();
            Err(StoreError::Lost(store.name.clone()))
        }
    }
}

/// Per-session locks, so that the turns of one session run one at a time on
/// this host even when several connections share the session.
#[derive(Default)]
pub struct SessionLocks {
    /// Held weakly: a session's lock lives while some turn holds or waits for it.
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl SessionLocks {
    /// The lock of session `id`.
    pub fn get(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = locks.get(id).and_then(Weak::upgrade) {
            return lock;
        }
        if locks.len() > 1024 {
            locks.retain(|_, weak| weak.strong_count() > 0);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(id.to_owned(), Arc::downgrade(&lock));
        lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert!(valid_name("session-6f1c:a.b_c"));
        assert!(valid_name(&"x".repeat(128)));
        assert!(!valid_name(""));
        assert!(!valid_name(&"x".repeat(129)));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a/b"));
        assert!(valid_name(&new_session_id()));
        assert_ne!(new_session_id(), new_session_id());
    }

    #[test]
    fn old_documents_still_load() {
        let doc: SessionDoc = serde_json::from_str(r#"{"messages":[]}"#).expect("loads");
        assert_eq!(doc, SessionDoc::default());
    }
}
