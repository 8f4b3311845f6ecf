//! The suite against the memory store (which conforms) and against stores
//! broken on purpose (which must fail the right checks).

use std::sync::Mutex;

use llm_host_conformance::store::{self, CheckResult};
use llm_host_plugin_api::{
    self as api, Plugin, PluginError, SaveOutcome, SessionPage, Store, StoreAdapterBox,
    StoredSession,
};
use llm_plugin_memory::{MemoryPlugin, MemorySettings, MemoryStore};

fn failed(results: &[CheckResult]) -> Vec<&'static str> {
    results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name)
        .collect()
}

#[test]
fn the_memory_store_conforms() {
    let results = store::assert_store_conforms(&|| MemoryPlugin::new_store("{}"));
    assert_eq!(results.len(), store::check_names().len());
    assert!(results.iter().all(|r| !r.detail.is_empty()));
}

/// A store that forwards to the memory store but breaks one rule.
struct Broken {
    inner: MemoryStore,
    flaw: Flaw,
    lock: Mutex<()>,
}

#[derive(Clone, Copy)]
enum Flaw {
    /// Saves whatever the version (last writer wins).
    IgnoresVersions,
    /// Loses non-ASCII characters.
    Ascii,
    /// Lists every owner's sessions.
    ListsEveryOwner,
    /// Returns one more id than asked for.
    OverLimit,
    /// Delete always answers true.
    DeleteAlwaysTrue,
    /// Ping fails.
    PingFails,
}

impl Store for Broken {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        self.inner.load(id)
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        match self.flaw {
            Flaw::IgnoresVersions => {
                let _guard = self.lock.lock();
                let current = self.inner.load(id)?.map_or(0, |s| s.version);
                self.inner.save(id, current, owner, data)
            }
            Flaw::Ascii => {
                let data: String = data.chars().filter(char::is_ascii).collect();
                self.inner.save(id, expected_version, owner, &data)
            }
            _ => self.inner.save(id, expected_version, owner, data),
        }
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        let existed = self.inner.delete(id)?;
        Ok(existed || matches!(self.flaw, Flaw::DeleteAlwaysTrue))
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        match self.flaw {
            Flaw::ListsEveryOwner => self.inner.list("", after, limit),
            Flaw::OverLimit => self.inner.list(owner, after, limit + 1),
            _ => self.inner.list(owner, after, limit),
        }
    }

    fn ping(&self) -> Result<(), PluginError> {
        match self.flaw {
            Flaw::PingFails => Err(PluginError::unavailable("down on purpose")),
            _ => Ok(()),
        }
    }
}

fn broken(flaw: Flaw) -> impl Fn() -> Result<StoreAdapterBox, PluginError> {
    move || {
        Ok(api::store_adapter(Broken {
            inner: MemoryStore::new(MemorySettings::default()),
            flaw,
            lock: Mutex::new(()),
        }))
    }
}

#[test]
fn a_store_without_versions_fails_the_version_checks() {
    let failed = failed(&store::check_store(&broken(Flaw::IgnoresVersions)));
    for name in [
        "create_conflict",
        "stale_save",
        "absent_save",
        "concurrent_cas",
        "concurrent_create",
    ] {
        assert!(failed.contains(&name), "{name} not in {failed:?}");
    }
    assert!(!failed.contains(&"ping"), "{failed:?}");
}

#[test]
fn a_store_that_mangles_text_fails_the_round_trips() {
    let failed = failed(&store::check_store(&broken(Flaw::Ascii)));
    assert_eq!(failed, ["update_round_trip", "large_document"]);
}

#[test]
fn listing_flaws_are_caught() {
    let failed_owner = failed(&store::check_store(&broken(Flaw::ListsEveryOwner)));
    assert!(failed_owner.contains(&"list_by_owner"), "{failed_owner:?}");
    let failed_limit = failed(&store::check_store(&broken(Flaw::OverLimit)));
    assert!(failed_limit.contains(&"list_by_owner"), "{failed_limit:?}");
}

#[test]
fn delete_and_ping_flaws_are_caught() {
    assert_eq!(
        failed(&store::check_store(&broken(Flaw::DeleteAlwaysTrue))),
        ["delete"]
    );
    assert_eq!(
        failed(&store::check_store(&broken(Flaw::PingFails))),
        ["ping"]
    );
}

#[test]
fn a_constructor_error_fails_every_check_with_its_message() {
    let results = store::check_store(&|| Err(PluginError::invalid_settings("path: missing field")));
    assert!(results.iter().all(|r| !r.passed));
    assert!(results[0].detail.contains("path: missing field"));
}

#[test]
fn the_assertion_reports_each_failed_check() {
    let panic = std::panic::catch_unwind(|| {
        store::assert_store_conforms(&broken(Flaw::DeleteAlwaysTrue));
    })
    .expect_err("a broken store must not pass");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("FAIL delete"), "{message}");
    assert!(message.contains("16 passed, 1 failed"), "{message}");
}
