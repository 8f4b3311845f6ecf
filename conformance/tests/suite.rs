//! The suite against the memory store (which conforms) and against stores
//! broken on purpose (which must fail the right checks).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_host_conformance::store::{self, CheckResult, StoreOptions, Verdict};
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

fn verdict<'a>(results: &'a [CheckResult], name: &str) -> (Verdict, &'a str) {
    let result = results
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no result for {name}"));
    (result.verdict, &result.detail)
}

// The memory store conforms; it is in process, so the checks of two
// adapters sharing one store do not apply, and without a TTL neither does
// expiry.
#[test]
fn the_memory_store_conforms() {
    let results = store::assert_store_conforms(&|| MemoryPlugin::new_store("{}"));
    assert_eq!(results.len(), store::check_names().len());
    assert!(results.iter().all(|r| !r.detail.is_empty()));
    for name in ["shared_cas", "shared_increments"] {
        let (verdict, detail) = verdict(&results, name);
        assert_eq!(verdict, Verdict::Skip, "{detail}");
        assert!(detail.contains("in_process() answers true"), "{detail}");
    }
    let (expiry, detail) = verdict(&results, "expiry");
    assert_eq!(expiry, Verdict::Skip, "{detail}");
    assert!(
        detail.contains("give ttl_secs in --settings to check expiry"),
        "{detail}"
    );
    let report = store::report(&results);
    assert!(
        report.contains("17 passed, 0 failed, 3 skipped"),
        "{report}"
    );
    assert!(report.contains("skip expiry: give ttl_secs"), "{report}");
}

// With the TTL its settings give, the memory store's idle sessions expire,
// and the check waits no longer than the TTL and a second.
#[test]
fn the_memory_store_expires_idle_sessions() {
    let settings = r#"{"ttl_secs": 1}"#;
    let options = StoreOptions::from_settings(settings);
    assert_eq!(options.ttl, Some(Duration::from_secs(1)));
    let began = Instant::now();
    let results =
        store::assert_store_conforms_with(&|| MemoryPlugin::new_store(settings), &options);
    let (expiry, detail) = verdict(&results, "expiry");
    assert_eq!(expiry, Verdict::Pass, "{detail}");
    assert!(detail.contains("left alone for 2.0 s"), "{detail}");
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "{:?}",
        began.elapsed()
    );
    // A TTL too long to wait out is skipped, saying why.
    let options = StoreOptions::from_settings(r#"{"ttl_secs": 3600}"#);
    let results = store::check_store_with(&|| MemoryPlugin::new_store("{}"), &options);
    let (expiry, detail) = verdict(&results, "expiry");
    assert_eq!(expiry, Verdict::Skip, "{detail}");
    assert!(detail.contains("ttl_secs is 3600"), "{detail}");
    assert_eq!(StoreOptions::from_settings("{}"), StoreOptions::default());
    assert_eq!(StoreOptions::from_settings("not json").ttl, None);
}

// A store that does not expire anything fails expiry when a TTL is given.
#[test]
fn a_store_that_keeps_idle_sessions_fails_expiry() {
    let options = StoreOptions {
        ttl: Some(Duration::from_secs(1)),
        ..StoreOptions::default()
    };
    let results = store::check_store_with(&|| MemoryPlugin::new_store("{}"), &options);
    let (expiry, detail) = verdict(&results, "expiry");
    assert_eq!(expiry, Verdict::Fail, "{detail}");
    assert!(detail.contains("are still listed"), "{detail}");
}

/// Sessions in a map every adapter of one "server" shares, as a database
/// holds them.
type Shared = Arc<Mutex<BTreeMap<String, StoredSession>>>;

/// A store over shared storage whose save compares and writes under a lock
/// of its own adapter only: atomic among the threads of one adapter, not
/// between two adapters (two hosts).
struct LocksPerAdapter {
    sessions: Shared,
    lock: Mutex<()>,
}

impl LocksPerAdapter {
    fn sessions(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StoredSession>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for LocksPerAdapter {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        Ok(self.sessions().get(id).cloned())
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        let _own = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.sessions().get(id).map_or(0, |s| s.version);
        if current != expected_version {
            return Ok(SaveOutcome::Conflict { current });
        }
        // A round trip to the server between the read and the write.
        std::thread::sleep(Duration::from_millis(2));
        let version = expected_version + 1;
        self.sessions().insert(
            id.to_owned(),
            StoredSession::new(version, owner, data, 1_700_000_000_000),
        );
        Ok(SaveOutcome::Saved { version })
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        Ok(self.sessions().remove(id).is_some())
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        let sessions = self.sessions();
        let ids = sessions
            .iter()
            .filter(|(id, _)| after.is_empty() || id.as_str() > after)
            .filter(|(_, s)| owner.is_empty() || s.owner.as_str() == owner)
            .map(|(id, _)| id.clone());
        Ok(SessionPage::from_ids(ids, limit))
    }
}

// A store atomic only within one adapter passes the races between threads
// and fails those between two adapters of one store.
#[test]
fn a_store_atomic_only_within_one_adapter_fails_the_shared_checks() {
    let server: Shared = Arc::default();
    let make = || {
        Ok(api::store_adapter(LocksPerAdapter {
            sessions: server.clone(),
            lock: Mutex::new(()),
        }))
    };
    let results = store::check_store(&make);
    let failed = failed(&results);
    assert!(
        failed.contains(&"shared_cas"),
        "{}",
        store::report(&results)
    );
    for name in [
        "concurrent_create",
        "concurrent_cas",
        "concurrent_increments",
    ] {
        assert!(!failed.contains(&name), "{}", store::report(&results));
    }
    let (_, detail) = verdict(&results, "shared_cas");
    assert!(detail.contains("racing through two adapters"), "{detail}");
    assert!(
        detail.contains("2 of 2 racing saves") && detail.contains("succeeded"),
        "{detail}"
    );
}

/// A store whose adapters each keep sessions of their own, yet say they are
/// not in process.
struct Private(MemoryStore);

impl Store for Private {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        self.0.load(id)
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        self.0.save(id, expected_version, owner, data)
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        self.0.delete(id)
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        self.0.list(owner, after, limit)
    }
    // `in_process` left at its default: false.
}

#[test]
fn adapters_that_share_nothing_must_say_they_are_in_process() {
    let results = store::check_store(&|| {
        Ok(api::store_adapter(Private(MemoryStore::new(
            MemorySettings::default(),
        ))))
    });
    assert_eq!(
        failed(&results),
        ["shared_cas", "shared_increments"],
        "{}",
        store::report(&results)
    );
    for name in ["shared_cas", "shared_increments"] {
        let (_, detail) = verdict(&results, name);
        assert!(
            detail.contains("do not share one store") && detail.contains("in_process() = true"),
            "{detail}"
        );
    }
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

    /// Its sessions are in its memory, as the memory store's.
    fn in_process(&self) -> bool {
        true
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
    assert!(
        message.contains("16 passed, 1 failed, 3 skipped"),
        "{message}"
    );
}
