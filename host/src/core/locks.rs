//! One turn of a session at a time on this host, even when several
//! connections share the session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

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
