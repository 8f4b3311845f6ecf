//! Store adapters: where sessions live between turns and across hosts.
//!
//! A store keeps, per session id, an opaque JSON document written by the host
//! (`data`), the id of the API key that owns it (`owner`, may be empty), and a
//! version. Versions make saves safe under concurrency: a save names the
//! version it loaded, and succeeds only if the stored one is still that;
//! otherwise it answers [`SaveOutcome::Conflict`] and writes nothing.
//!
//! Version `0` means "absent": saving with `expected_version = 0` creates the
//! session only if it does not exist. A successful save stores
//! `expected_version + 1`.
//!
//! Implement [`Store`] and wrap it with [`store_adapter`]; PLUGIN-GUIDE.md,
//! section "Stores", says what each call must do.
//!
//! # What a store must keep
//!
//! - **The compare and the write are one atomic step**, across threads, across
//!   the adapters built from the same settings, and across every host sharing
//!   the store: a transaction, a compare-and-set script, a lock held by the
//!   storage itself (a lock inside one adapter value is not enough: two hosts
//!   are two adapters). The conformance suite races saves through two adapters
//!   built from the same settings to check it.
//! - **Session ids** are what the host accepts from clients: 1 to 128
//!   characters of `A-Z a-z 0-9 . _ : -`. So `.` and `..` are legal ids, and a
//!   store that makes file names or keys of ids must encode them (the
//!   template store in llm-host's `plugins/template-store` shows one way).
//!   Treat an id as an opaque string otherwise: compare and order it by bytes.
//! - **Expiry.** With a `ttl_secs` setting (the convention), a session neither
//!   loaded nor saved for that long is absent to every call: `load` answers
//!   none, `list` leaves it out, `delete` answers false, and a save must
//!   create it anew (expected version 0; its old version conflicts with
//!   current 0).
//! - **[`in_process`](Store::in_process)** answers true only for a store whose
//!   sessions live in this adapter's memory: its calls never wait on I/O, and
//!   no other host (nor another adapter) can reach its sessions. The host then
//!   calls it on its async workers rather than on a blocking thread, runs a
//!   turn without first saving a claim for other hosts to see, and refuses to
//!   rebuild it on a reload (a new adapter would start empty). Every store
//!   that other processes can reach, or that does I/O, answers false (the
//!   default): files, databases, servers.
//!
//! # The types, in plain Rust
//!
//! [`StoredSession`] and [`SessionPage`] cross the boundary, so they are made
//! of abi_stable's [`RString`], [`RVec`] and [`ROption`] (re-exported at the
//! crate root). Build them from plain Rust values with
//! [`StoredSession::new`], [`SessionPage::new`] and [`SessionPage::from_ids`],
//! and read them as plain values: an `RString` derefs to `&str`
//! (`session.owner.as_str()`, `.into_string()`), an `RVec` iterates like a
//! `Vec`, an `ROption` becomes an `Option` with `.into_option()` (and back
//! with `ROption::from(option)`).
//!
//! A complete store, in this process's memory:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Mutex;
//!
//! use llm_host_plugin_api::{PluginError, SaveOutcome, SessionPage, Store, StoredSession};
//!
//! #[derive(Default)]
//! struct Sessions(Mutex<BTreeMap<String, StoredSession>>);
//!
//! impl Store for Sessions {
//!     fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
//!         Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned())
//!     }
//!
//!     fn save(
//!         &self,
//!         id: &str,
//!         expected_version: u64,
//!         owner: &str,
//!         data: &str,
//!     ) -> Result<SaveOutcome, PluginError> {
//!         // One lock around the compare and the write: atomic, in this
//!         // process, which is all an in-process store needs.
//!         let mut sessions = self.0.lock().unwrap_or_else(|p| p.into_inner());
//!         let current = sessions.get(id).map_or(0, |s| s.version);
//!         if current != expected_version {
//!             return Ok(SaveOutcome::Conflict { current });
//!         }
//!         let version = expected_version + 1;
//!         let session = StoredSession::new(version, owner, data, now_ms());
//!         sessions.insert(id.to_owned(), session);
//!         Ok(SaveOutcome::Saved { version })
//!     }
//!
//!     fn delete(&self, id: &str) -> Result<bool, PluginError> {
//!         Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id).is_some())
//!     }
//!
//!     fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
//!         let sessions = self.0.lock().unwrap_or_else(|p| p.into_inner());
//!         let ids = sessions
//!             .iter()
//!             .filter(|(id, _)| after.is_empty() || id.as_str() > after)
//!             .filter(|(_, s)| owner.is_empty() || s.owner.as_str() == owner)
//!             .map(|(id, _)| id.clone());
//!         // The first `limit` ids, and `next` if more follow.
//!         Ok(SessionPage::from_ids(ids, limit))
//!     }
//!
//!     fn in_process(&self) -> bool {
//!         true // sessions in this adapter's memory: no other host sees them
//!     }
//! }
//!
//! fn now_ms() -> u64 {
//!     let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
//!     now.map_or(0, |d| d.as_millis() as u64)
//! }
//!
//! let store = Sessions::default();
//! assert_eq!(store.save("a", 0, "k", "{}")?, SaveOutcome::Saved { version: 1 });
//! assert_eq!(store.save("a", 0, "k", "{}")?, SaveOutcome::Conflict { current: 1 });
//! store.save("b", 0, "k", "{}")?;
//! let page = store.list("k", "", 1)?;
//! assert_eq!(page, SessionPage::new(vec!["a".into()], Some("a".into())));
//! assert_eq!(page.next.into_option().as_deref(), Some("a"));
//! // In a plugin: `Ok(api::store_adapter(Sessions::default()))` in `new_store`.
//! # Ok::<(), PluginError>(())
//! ```

use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::{guard, PluginError};

/// A session as the store holds it.
///
/// Evolution rule: this struct never changes layout.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    /// The version of this state; at least 1.
    pub version: u64,
    /// Who owns the session (an API key's id), or empty.
    pub owner: RString,
    /// The host's JSON document.
    pub data: RString,
    /// When it was last saved, Unix milliseconds.
    pub updated_at_ms: u64,
}

/// The result of a conditional save.
///
/// Evolution rule: never extended.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Written; the session now has `version`.
    Saved {
        /// The new version (`expected_version + 1`).
        version: u64,
    },
    /// Not written: the stored version is not the one expected. `current` is
    /// the version found (0 if the session is absent).
    Conflict {
        /// The version the store holds now.
        current: u64,
    },
}

/// Which session ids to list.
///
/// Evolution rule: this struct never changes layout.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct ListQuery<'a> {
    /// Only sessions of this owner; empty lists every session.
    pub owner: RStr<'a>,
    /// Only ids greater than this one (the `next` of the previous page); empty
    /// starts at the beginning.
    pub after: RStr<'a>,
    /// At most this many ids (the store may return fewer).
    pub limit: u32,
}

/// One page of session ids, in ascending order.
///
/// Evolution rule: this struct never changes layout.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq, Default)]
pub struct SessionPage {
    /// The ids, ascending.
    pub ids: RVec<RString>,
    /// Where the next page starts (pass it as `after`), or none at the end.
    pub next: ROption<RString>,
}

impl StoredSession {
    /// A session from plain Rust values: `version` (at least 1), the
    /// `owner`'s id (or empty), the host's document `data` exactly as it was
    /// saved, and when it was last saved (`updated_at_ms`, Unix milliseconds).
    pub fn new(
        version: u64,
        owner: impl Into<String>,
        data: impl Into<String>,
        updated_at_ms: u64,
    ) -> Self {
        Self {
            version,
            owner: RString::from(owner.into()),
            data: RString::from(data.into()),
            updated_at_ms,
        }
    }
}

impl SessionPage {
    /// A page of `ids` (ascending), and where the next one starts: the id to
    /// pass as `after`, or none at the end.
    pub fn new(ids: Vec<String>, next: Option<String>) -> Self {
        Self {
            ids: ids.into_iter().map(RString::from).collect(),
            next: ROption::from(next.map(RString::from)),
        }
    }

    /// The page of the first `limit` of `ids` (at least one, as a `limit` of 0
    /// would never end a listing), with `next` set to the last of them when
    /// more follow. `ids` must be ascending and already filtered (by owner,
    /// past `after`, without expired sessions); at most `limit + 1` of them
    /// are read, so a lazy iterator stops early.
    pub fn from_ids(ids: impl IntoIterator<Item = String>, limit: u32) -> Self {
        let limit = limit.max(1) as usize;
        let mut page: Vec<String> = ids.into_iter().take(limit + 1).collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more { page.last().cloned() } else { None };
        Self::new(page, next)
    }
}

/// A session store built from its settings. Called from several threads at once.
///
/// Evolution rule: methods are only appended at the end, each with a default
/// body; `#[sabi(last_prefix_field)]` stays on `ping` (where 0.1.0 moved it
/// from `list`, a break [`compat`](crate::compat) repairs); the release that
/// appends freezes the layout it replaces in `compat` (the crate's evolution
/// rule).
#[sabi_trait]
pub trait StoreAdapter: Send + Sync {
    /// The session, or none if the store does not have it (or it expired).
    fn load(&self, id: RStr<'_>) -> RResult<ROption<StoredSession>, PluginError>;

    /// Writes the session if its stored version is `expected_version`
    /// (0: only if absent). See the module docs.
    fn save(
        &self,
        id: RStr<'_>,
        expected_version: u64,
        owner: RStr<'_>,
        data: RStr<'_>,
    ) -> RResult<SaveOutcome, PluginError>;

    /// Removes the session; answers whether it existed.
    fn delete(&self, id: RStr<'_>) -> RResult<bool, PluginError>;

    /// One page of session ids.
    fn list(&self, query: ListQuery<'_>) -> RResult<SessionPage, PluginError>;

    /// Whether the store can serve now (its server answers); used for readiness.
    #[sabi(last_prefix_field)]
    fn ping(&self) -> RResult<(), PluginError>;

    /// Whether the store lives in this process's memory: its calls never wait
    /// on I/O, and no other host can reach its sessions. The host then calls
    /// it directly instead of on a blocking thread, and skips the cross-host
    /// claim a turn otherwise saves first. Added after `ping`, so it has a
    /// default: a store built before it is treated as shared and blocking.
    fn in_process(&self) -> bool {
        false
    }
}

/// A store adapter trait object as the host holds it.
pub type StoreAdapterBox = StoreAdapter_TO<'static, RBox<()>>;

/// A session store, the Rust way. Implement it and wrap the value with
/// [`store_adapter`] in your plugin's `new_store`. The module docs say what
/// every store must keep, with an example.
pub trait Store: Send + Sync + 'static {
    /// See [`StoreAdapter::load`].
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError>;
    /// See [`StoreAdapter::save`].
    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError>;
    /// See [`StoreAdapter::delete`].
    fn delete(&self, id: &str) -> Result<bool, PluginError>;
    /// See [`StoreAdapter::list`].
    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError>;
    /// See [`StoreAdapter::ping`]. The default answers ready.
    fn ping(&self) -> Result<(), PluginError> {
        Ok(())
    }
    /// See [`StoreAdapter::in_process`]: true only for sessions in this
    /// adapter's memory, which no other host can reach and whose calls never
    /// wait on I/O (see the module docs). The default says no: shared and
    /// blocking.
    fn in_process(&self) -> bool {
        false
    }
}

struct StoreShim<S>(S);

impl<S: Store> StoreAdapter for StoreShim<S> {
    fn load(&self, id: RStr<'_>) -> RResult<ROption<StoredSession>, PluginError> {
        guard(|| self.0.load(id.as_str()).map(ROption::from))
    }

    fn save(
        &self,
        id: RStr<'_>,
        expected_version: u64,
        owner: RStr<'_>,
        data: RStr<'_>,
    ) -> RResult<SaveOutcome, PluginError> {
        guard(|| {
            self.0
                .save(id.as_str(), expected_version, owner.as_str(), data.as_str())
        })
    }

    fn delete(&self, id: RStr<'_>) -> RResult<bool, PluginError> {
        guard(|| self.0.delete(id.as_str()))
    }

    fn list(&self, query: ListQuery<'_>) -> RResult<SessionPage, PluginError> {
        guard(|| {
            self.0
                .list(query.owner.as_str(), query.after.as_str(), query.limit)
        })
    }

    fn ping(&self) -> RResult<(), PluginError> {
        guard(|| self.0.ping())
    }

    fn in_process(&self) -> bool {
        // A panic here would cross the boundary: answer the safe default.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.in_process()))
            .unwrap_or(false)
    }
}

/// Wraps a [`Store`] into the trait object the host takes. Every call into it
/// runs under [`guard`](fn@crate::guard).
pub fn store_adapter(store: impl Store) -> StoreAdapterBox {
    StoreAdapter_TO::from_value(StoreShim(store), TD_Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(page: &SessionPage) -> Vec<&str> {
        page.ids.iter().map(RString::as_str).collect()
    }

    #[test]
    fn pages_from_plain_ids() {
        let all = || ["a", "b", "c"].map(String::from);
        let page = SessionPage::from_ids(all(), 2);
        assert_eq!(ids(&page), ["a", "b"]);
        assert_eq!(page.next, ROption::RSome(RString::from("b")));
        let page = SessionPage::from_ids(all(), 3);
        assert_eq!(ids(&page), ["a", "b", "c"]);
        assert!(page.next.is_none());
        // A limit of 0 still makes progress.
        let page = SessionPage::from_ids(all(), 0);
        assert_eq!(ids(&page), ["a"]);
        assert_eq!(page.next.into_option().as_deref(), Some("a"));
        assert_eq!(SessionPage::from_ids(Vec::new(), 5), SessionPage::default());
        // At most limit + 1 ids are read.
        let mut read = 0;
        let page = SessionPage::from_ids(
            (0..100).map(|n| {
                read += 1;
                format!("{n:03}")
            }),
            4,
        );
        assert_eq!(page.ids.len(), 4);
        assert_eq!(read, 5);
    }

    #[test]
    fn sessions_from_plain_values() {
        let session = StoredSession::new(3, "key-1", String::from("{}"), 7);
        assert_eq!(
            session,
            StoredSession {
                version: 3,
                owner: "key-1".into(),
                data: "{}".into(),
                updated_at_ms: 7,
            }
        );
    }
}
