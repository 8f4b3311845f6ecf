//! `memory`: sessions kept in the host process, lost when it stops.
//!
//! For demos, tests and single-process setups. Saves are conditional on the
//! version like every store's; `ttl_secs` (a day unless set) forgets
//! sessions idle that long, so a long-running host does not keep every
//! session it ever served.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llm_host_plugin_api::{
    self as api, Kinds, Plugin, PluginError, SaveOutcome, SessionPage, Store, StoreAdapterBox,
    StoredSession,
};
use serde::Deserialize;

/// The memory store's settings.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Forget sessions not saved or loaded for this many seconds; a day
    /// ([`DEFAULT_TTL_SECS`]) when not set.
    pub ttl_secs: Option<u64>,
}

/// How long an idle session is kept when `ttl_secs` is not set.
pub const DEFAULT_TTL_SECS: u64 = 24 * 3600;

/// The longest between two sweeps of expired sessions.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

struct Entry {
    session: StoredSession,
    touched: Instant,
}

/// The memory store.
pub struct MemoryStore {
    ttl: Duration,
    sessions: Mutex<Sessions>,
}

/// The sessions, and when expired ones were last swept out.
struct Sessions {
    by_id: BTreeMap<String, Entry>,
    swept: Instant,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(settings: MemorySettings) -> Self {
        Self {
            ttl: Duration::from_secs(settings.ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
            sessions: Mutex::new(Sessions {
                by_id: BTreeMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    fn expired(&self, entry: &Entry, now: Instant) -> bool {
        now.duration_since(entry.touched) >= self.ttl
    }

    /// Drops every expired session, at most once per `ttl` (and per
    /// minute): sessions nobody calls about again go too.
    fn sweep(&self, sessions: &mut Sessions, now: Instant) {
        if now.duration_since(sessions.swept) < self.ttl.min(SWEEP_EVERY) {
            return;
        }
        sessions.swept = now;
        sessions.by_id.retain(|_, entry| !self.expired(entry, now));
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // A panic while holding the lock cannot leave an entry half-written
        // (entries are replaced whole), so a poisoned map is still sound.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Store for MemoryStore {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        let now = Instant::now();
        let mut sessions = self.sessions();
        match sessions.by_id.get_mut(id) {
            Some(entry) if self.expired(entry, now) => {
                sessions.by_id.remove(id);
                Ok(None)
            }
            Some(entry) => {
                entry.touched = now;
                Ok(Some(entry.session.clone()))
            }
            None => Ok(None),
        }
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        let now = Instant::now();
        let mut sessions = self.sessions();
        self.sweep(&mut sessions, now);
        let current = match sessions.by_id.get(id) {
            Some(entry) if !self.expired(entry, now) => entry.session.version,
            _ => 0,
        };
        if current != expected_version {
            return Ok(SaveOutcome::Conflict { current });
        }
        let version = expected_version + 1;
        sessions.by_id.insert(
            id.to_owned(),
            Entry {
                session: StoredSession::new(version, owner, data, now_ms()),
                touched: now,
            },
        );
        Ok(SaveOutcome::Saved { version })
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        let now = Instant::now();
        let removed = self.sessions().by_id.remove(id);
        Ok(removed.is_some_and(|entry| !self.expired(&entry, now)))
    }

    fn in_process(&self) -> bool {
        true
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        let now = Instant::now();
        let sessions = self.sessions();
        let start = if after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after)
        };
        let ids = sessions
            .by_id
            .range::<str, _>((start, Bound::Unbounded))
            .filter(|(_, entry)| !self.expired(entry, now))
            .filter(|(_, entry)| owner.is_empty() || entry.session.owner == owner)
            .map(|(id, _)| id.clone());
        // The first `limit` of them, and `next` if more follow.
        Ok(SessionPage::from_ids(ids, limit))
    }
}

/// The plugin.
pub struct MemoryPlugin;

impl Plugin for MemoryPlugin {
    const NAME: &'static str = "memory";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "sessions in process memory, for demos and tests";
    const KINDS: Kinds = Kinds::STORE;

    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        let settings: MemorySettings = api::parse_settings(settings)?;
        Ok(api::store_adapter(MemoryStore::new(settings)))
    }
}

api::export_plugin!(MemoryPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_are_conditional_on_the_version() {
        let store = MemoryStore::new(MemorySettings::default());
        assert_eq!(store.load("a").expect("load"), None);
        assert_eq!(
            store.save("a", 0, "k", "{}").expect("save"),
            SaveOutcome::Saved { version: 1 }
        );
        assert_eq!(
            store.save("a", 0, "k", "{}").expect("save"),
            SaveOutcome::Conflict { current: 1 }
        );
        assert_eq!(
            store.save("a", 1, "k", "[1]").expect("save"),
            SaveOutcome::Saved { version: 2 }
        );
        let loaded = store.load("a").expect("load").expect("present");
        assert_eq!(
            (loaded.version, loaded.data.as_str(), loaded.owner.as_str()),
            (2, "[1]", "k")
        );
        assert!(store.delete("a").expect("delete"));
        assert!(!store.delete("a").expect("delete"));
        assert_eq!(
            store.save("a", 5, "", "{}").expect("save"),
            SaveOutcome::Conflict { current: 0 }
        );
    }

    #[test]
    fn lists_in_pages_filtered_by_owner() {
        let store = MemoryStore::new(MemorySettings::default());
        for (id, owner) in [("s1", "x"), ("s2", "y"), ("s3", "x"), ("s4", "x")] {
            store.save(id, 0, owner, "{}").expect("save");
        }
        let page = store.list("x", "", 2).expect("list");
        assert_eq!(
            page.ids.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["s1", "s3"]
        );
        let next = page.next.into_option().expect("more to come");
        let page = store.list("x", &next, 2).expect("list");
        assert_eq!(
            page.ids.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["s4"]
        );
        assert!(page.next.is_none());
        assert_eq!(store.list("", "", 10).expect("list").ids.len(), 4);
    }

    #[test]
    fn sessions_nobody_asks_for_again_are_swept_out_and_a_day_is_the_default() {
        let store = MemoryStore::new(MemorySettings { ttl_secs: Some(0) });
        for id in ["a", "b", "c"] {
            store.save(id, 0, "", "{}").expect("save");
        }
        // The next save sweeps (a TTL of 0 sweeps on every save).
        store.save("d", 0, "", "{}").expect("save");
        assert_eq!(store.sessions().by_id.len(), 1);
        let default = MemoryStore::new(MemorySettings::default());
        assert_eq!(default.ttl, Duration::from_secs(DEFAULT_TTL_SECS));
    }

    #[test]
    fn idle_sessions_expire() {
        let store = MemoryStore::new(MemorySettings { ttl_secs: Some(0) });
        store.save("a", 0, "", "{}").expect("save");
        assert_eq!(store.load("a").expect("load"), None);
        assert_eq!(
            store.save("a", 0, "", "{}").expect("save"),
            SaveOutcome::Saved { version: 1 }
        );
    }
}
