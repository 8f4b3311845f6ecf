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
/// [`store_adapter`] in your plugin's `new_store`.
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
    /// See [`StoreAdapter::in_process`]. The default says no.
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
/// runs under [`guard`].
pub fn store_adapter(store: impl Store) -> StoreAdapterBox {
    StoreAdapter_TO::from_value(StoreShim(store), TD_Opaque)
}
