//! The `process_*` checks from `cargo test`: `check_plugin` runs the calling
//! test again as a second process, which races this one on one store.
//!
//! The store is a directory of files whose saves compare and write under a
//! lock: a `Mutex` in a static (every adapter of one process shares it, a
//! second process has its own) fails the `process_*` checks and passes every
//! other one; `flock` on a file of the directory (which the kernel holds for
//! every process) passes them all. Both wait 2 ms between the compare and
//! the write, so that two saves that are not excluded do overlap.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_host_conformance::store::{self, CheckResult, Verdict};
use llm_host_conformance::support::unique_token;
use llm_host_plugin_api::{
    self as api,
    serde_json::{self, json, Value},
    Kinds, Plugin, PluginError, SaveOutcome, SessionPage, Store, StoreAdapterBox, StoredSession,
};

/// The lock of [`Lock::Process`] saves.
static SAVES: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy)]
enum Lock {
    /// A `Mutex` in a static: one process's threads and adapters only.
    Process,
    /// `flock` on the directory's `.lock`: every process.
    File,
}

struct Files {
    dir: PathBuf,
    lock: Lock,
}

impl Files {
    fn open(settings: &str, lock: Lock) -> Result<StoreAdapterBox, PluginError> {
        let settings: Value = serde_json::from_str(settings)?;
        let dir = PathBuf::from(settings["dir"].as_str().unwrap_or_default());
        fs::create_dir_all(&dir).map_err(|err| PluginError::invalid_settings(err.to_string()))?;
        Ok(api::store_adapter(Files { dir, lock }))
    }

    fn path(&self, id: &str) -> PathBuf {
        let name: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.json"))
    }

    fn read(&self, path: &Path) -> Result<Option<StoredSession>, PluginError> {
        let Ok(text) = fs::read_to_string(path) else {
            return Ok(None);
        };
        let doc: Value = serde_json::from_str(&text)?;
        Ok(Some(StoredSession::new(
            doc["version"].as_u64().unwrap_or_default(),
            doc["owner"].as_str().unwrap_or_default(),
            doc["data"].as_str().unwrap_or_default(),
            doc["at"].as_u64().unwrap_or_default(),
        )))
    }

    /// Runs `f` under the store's lock.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, PluginError>) -> Result<T, PluginError> {
        let unavailable = |err: std::io::Error| PluginError::unavailable(err.to_string());
        match self.lock {
            Lock::Process => {
                let _held = SAVES.lock().unwrap_or_else(|p| p.into_inner());
                f()
            }
            Lock::File => {
                let file = File::create(self.dir.join(".lock")).map_err(unavailable)?;
                file.lock().map_err(unavailable)?;
                f()
            }
        }
    }
}

impl Store for Files {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        self.read(&self.path(id))
    }

    fn save(
        &self,
        id: &str,
        expected: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        let path = self.path(id);
        self.locked(|| {
            let current = self.read(&path)?.map_or(0, |s| s.version);
            if current != expected {
                return Ok(SaveOutcome::Conflict { current });
            }
            std::thread::sleep(Duration::from_millis(2));
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let doc = json!({"version": expected + 1, "owner": owner, "data": data, "at": at});
            let temporary = path.with_extension(format!("tmp{}", std::process::id()));
            fs::write(&temporary, doc.to_string())
                .and_then(|()| fs::rename(&temporary, &path))
                .map_err(|err| PluginError::unavailable(err.to_string()))?;
            Ok(SaveOutcome::Saved {
                version: expected + 1,
            })
        })
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        self.locked(|| Ok(fs::remove_file(self.path(id)).is_ok()))
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            let bytes: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect();
            let Some(id) = bytes.and_then(|b| String::from_utf8(b).ok()) else {
                continue;
            };
            let Some(session) = self.read(&entry.path())? else {
                continue;
            };
            if id.as_str() > after && (owner.is_empty() || session.owner.as_str() == owner) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(SessionPage::from_ids(ids, limit))
    }
}

struct ProcessLocked;

impl Plugin for ProcessLocked {
    const NAME: &'static str = "process-locked";
    const VERSION: &'static str = "0.1.0";
    const KINDS: Kinds = Kinds::STORE;

    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        Files::open(settings, Lock::Process)
    }
}

struct FileLocked;

impl Plugin for FileLocked {
    const NAME: &'static str = "file-locked";
    const VERSION: &'static str = "0.1.0";
    const KINDS: Kinds = Kinds::STORE;

    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        Files::open(settings, Lock::File)
    }
}

/// A directory of this run's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("conformance-processes-{}", unique_token()));
        fs::create_dir_all(&path).expect("create a temporary directory");
        Self(path)
    }

    fn settings(&self) -> String {
        json!({ "dir": self.0 }).to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn verdict<'a>(results: &'a [CheckResult], name: &str) -> (Verdict, &'a str) {
    let result = results
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no result for {name}:\n{}", store::report(results)));
    (result.verdict, &result.detail)
}

// Locked by a static Mutex, the store passes every check of one process, the
// two adapters' races included, and fails both races with a second process.
#[test]
fn a_store_locked_within_its_process_fails_the_process_checks() {
    let dir = TempDir::new();
    let results = store::check_plugin::<ProcessLocked>(&dir.settings());
    if results.is_empty() {
        return; // The second process, which served the races.
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name)
        .collect();
    assert_eq!(
        failed,
        ["process_cas", "process_increments"],
        "{}",
        store::report(&results)
    );
    let (_, detail) = verdict(&results, "process_cas");
    assert!(
        detail.contains("2 of 2 racing saves at version"),
        "{detail}"
    );
    assert!(detail.contains("even a Mutex in a static"), "{detail}");
    // Lost updates, or a version that went back (a stale write landed last).
    let (_, detail) = verdict(&results, "process_increments");
    assert!(
        detail.contains("increments were lost") || detail.contains("which is not newer"),
        "{detail}"
    );
    assert!(detail.contains("even a Mutex in a static"), "{detail}");
    for name in ["shared_cas", "shared_increments", "concurrent_cas"] {
        assert_eq!(verdict(&results, name).0, Verdict::Pass, "{name}");
    }
}

// Locked by flock, it passes every check, the races between two processes
// included.
#[test]
fn a_store_locked_by_a_file_passes_the_process_checks() {
    let dir = TempDir::new();
    let results = store::assert_plugin_conforms::<FileLocked>(&dir.settings());
    if results.is_empty() {
        return; // The second process.
    }
    let (cas, detail) = verdict(&results, "process_cas");
    assert_eq!(cas, Verdict::Pass, "{detail}");
    assert!(detail.contains("exactly one won each round"), "{detail}");
    let (increments, detail) = verdict(&results, "process_increments");
    assert_eq!(increments, Verdict::Pass, "{detail}");
    assert!(
        detail.contains("2 processes x 2 threads x 10 increments all applied once"),
        "{detail}"
    );
    assert_eq!(results.len(), store::check_names().len() + 2);
}

// From a thread that carries no test's name there is no test to run again:
// the process checks are skipped, saying why; the closure API leaves them out.
#[test]
fn without_a_test_to_run_again_the_process_checks_are_skipped() {
    let dir = TempDir::new();
    let settings = dir.settings();
    let results = std::thread::spawn(move || store::check_plugin::<FileLocked>(&settings))
        .join()
        .expect("the suite returns");
    if results.is_empty() {
        return; // A second process started for another test.
    }
    for name in ["process_cas", "process_increments"] {
        let (verdict, detail) = verdict(&results, name);
        assert_eq!(verdict, Verdict::Skip, "{detail}");
        assert!(detail.contains("no test's name"), "{detail}");
    }
    let settings = dir.settings();
    let results = store::check_store(&|| FileLocked::new_store(&settings));
    assert_eq!(
        results.iter().map(|r| r.name).collect::<Vec<_>>(),
        store::check_names()
    );
    assert!(!store::check_names().contains(&"process_cas"));
}
