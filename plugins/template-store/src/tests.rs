//! Tests: the conformance suite (what `llm-host check` runs) through the FFI
//! trait object the host calls, then what is particular to files: the names
//! of odd ids, the files on disk, writers in separate adapters (as separate
//! processes would be), expiry, and refused settings.

use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, SystemTime};

use llm_host_conformance::store::{self, StoreOptions, Verdict};
use llm_host_conformance::support::unique_token;
use llm_host_plugin_api::{serde_json::json, ErrorKind, Kinds, Plugin};

use super::*;

/// A fresh directory under the system's temporary directory, removed on
/// drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("file-store-test-{}", unique_token()));
        fs::create_dir_all(&path).expect("create a temporary directory");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// The settings of a store in this directory, as JSON text.
    fn settings(&self, ttl_secs: Option<u64>) -> String {
        json!({ "dir": self.0, "ttl_secs": ttl_secs }).to_string()
    }

    fn store(&self, ttl_secs: Option<u64>) -> FileStore {
        FileStore::open(FileStoreSettings {
            dir: self.0.to_string_lossy().into_owned(),
            ttl_secs,
        })
        .expect("open the store")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn conforms() {
    let dir = TempDir::new();
    let settings = dir.settings(None);
    // Through the plugin: the suite also races a second process of this
    // test on the same directory (`process_*`), which a lock held only
    // within one process would not pass.
    let results = store::assert_plugin_conforms::<FileStorePlugin>(&settings);
    assert!(
        results
            .iter()
            .any(|r| r.name.starts_with("process_") && r.verdict == Verdict::Pass),
        "{}",
        store::report(&results)
    );
    // With a short TTL too: the suite's `expiry` check waits it out. Every
    // check passes, the two adapters' races (`shared_*`) included: the store
    // is not in process.
    let settings = dir.settings(Some(2));
    let options = StoreOptions::from_settings(&settings);
    let results =
        store::assert_store_conforms_with(&|| FileStorePlugin::new_store(&settings), &options);
    assert!(
        results.iter().all(|r| r.verdict == Verdict::Pass),
        "{}",
        store::report(&results)
    );
}

#[test]
fn every_id_gets_a_file_name_of_its_own() {
    for (id, name) in [
        ("session-1", "session-1.session"),
        ("a.b:c_d-E", "a.b:c_d-E.session"),
        (".", "%2E.session"),
        ("..", "%2E..session"),
        (".hidden", "%2Ehidden.session"),
        ("a/../../etc", "a%2F..%2F..%2Fetc.session"),
        ("100%", "100%25.session"),
        ("two words", "two%20words.session"),
        ("é", "%C3%A9.session"),
    ] {
        assert_eq!(file_name(id).expect("a name"), name, "{id}");
        assert_eq!(id_of(name).as_deref(), Some(id), "{name}");
    }
    // Names that file_name never makes are not sessions.
    for name in [
        ".lock",
        ".save.tmp",
        "%2e.session",
        "%41.session",
        ".x.session",
        "%2.session",
        "%+1.session",
        "x.json",
        ".session",
    ] {
        assert_eq!(id_of(name), None, "{name}");
    }
    // The host's longest ids fit; a name past NAME_MAX is refused.
    assert!(file_name(&":".repeat(128)).is_ok());
    let err = file_name(&"/".repeat(100)).expect_err("too long");
    assert_eq!(err.kind, ErrorKind::INVALID_INPUT);
    assert_eq!(
        file_name("").expect_err("empty").kind,
        ErrorKind::INVALID_INPUT
    );
}

#[test]
fn a_session_is_a_header_line_and_the_document_verbatim() {
    let dir = TempDir::new();
    let store = dir.store(None);
    let data = "{\"b\": 1,\n \"a\": \"x\\ny\"}\n";
    assert_eq!(
        store.save("..", 0, "key-1", data).expect("save"),
        SaveOutcome::Saved { version: 1 }
    );
    let text = fs::read_to_string(dir.path().join("%2E..session")).expect("the file");
    let (header, rest) = text.split_once('\n').expect("a header line");
    let header: Header = serde_json::from_str(header).expect("a JSON header");
    assert_eq!((header.version, header.owner.as_str()), (1, "key-1"));
    assert_eq!(rest, data);
    let loaded = store.load("..").expect("load").expect("present");
    assert_eq!(loaded.data.as_str(), data);
    assert_eq!(store.load(".").expect("load"), None);
    // Nothing escaped the directory, and no temporary file is left.
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .expect("list")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["%2E..session", ".lock"]);
}

#[test]
fn a_damaged_file_is_reported_as_corrupt_and_left_out_of_listings() {
    let dir = TempDir::new();
    let store = dir.store(None);
    store.save("good", 0, "", "{}").expect("save");
    fs::write(dir.path().join("bad.session"), "not a header\n{}").expect("write");
    let err = store.load("bad").expect_err("corrupt");
    assert_eq!(err.kind, ErrorKind::CORRUPT);
    assert!(err.message.contains("bad.session"), "{}", err.message);
    let page = store.list("", "", 10).expect("list");
    assert_eq!(
        page.ids.iter().map(|id| id.as_str()).collect::<Vec<_>>(),
        ["good"]
    );
    assert!(store.delete("bad").expect("delete"));
}

// Separate adapters take the lock through files of their own, exactly as
// separate processes do: increments from each are all applied once.
#[test]
fn writers_in_separate_adapters_take_turns() {
    let dir = TempDir::new();
    let (writers, rounds) = (4, 10);
    let barrier = Barrier::new(writers);
    std::thread::scope(|scope| {
        for _ in 0..writers {
            scope.spawn(|| {
                let store = dir.store(None);
                barrier.wait();
                let mut done = 0;
                while done < rounds {
                    let (version, count) = match store.load("counter").expect("load") {
                        Some(session) => (
                            session.version,
                            session.data.parse::<u64>().expect("a count"),
                        ),
                        None => (0, 0),
                    };
                    let data = (count + 1).to_string();
                    if let SaveOutcome::Saved { .. } =
                        store.save("counter", version, "", &data).expect("save")
                    {
                        done += 1;
                    }
                }
            });
        }
    });
    let session = dir
        .store(None)
        .load("counter")
        .expect("load")
        .expect("saved");
    let total = (writers * rounds) as u64;
    assert_eq!(
        (session.version, session.data.as_str()),
        (total, total.to_string().as_str())
    );
}

/// Makes session `id`'s file look last used `ago`.
fn age(dir: &TempDir, id: &str, ago: Duration) {
    let path = dir.path().join(file_name(id).expect("a name"));
    let file = File::options().write(true).open(path).expect("open");
    file.set_modified(SystemTime::now() - ago)
        .expect("set the modification time");
}

#[test]
fn idle_sessions_expire_and_use_keeps_them() {
    let dir = TempDir::new();
    let store = dir.store(Some(60));
    for id in ["idle", "used"] {
        store.save(id, 0, "k", "{}").expect("save");
        age(&dir, id, Duration::from_secs(59));
    }
    // Loading "used" marks it used now; "idle" reaches its TTL.
    assert!(store.load("used").expect("load").is_some());
    age(&dir, "idle", Duration::from_secs(61));
    assert_eq!(store.load("idle").expect("load"), None);
    let page = store.list("k", "", 10).expect("list");
    assert_eq!(
        page.ids.iter().map(|id| id.as_str()).collect::<Vec<_>>(),
        ["used"]
    );
    assert_eq!(
        store.save("idle", 1, "k", "{}").expect("save"),
        SaveOutcome::Conflict { current: 0 }
    );
    assert!(!store.delete("idle").expect("delete"));
    assert_eq!(
        store.save("idle", 0, "k", "{}").expect("save"),
        SaveOutcome::Saved { version: 1 }
    );

    // A save sweeps expired files out once the sweep is due.
    age(&dir, "used", Duration::from_secs(120));
    *store.swept.lock().expect("not poisoned") -= Duration::from_secs(61);
    store.save("other", 0, "k", "{}").expect("save");
    assert!(!dir.path().join("used.session").exists());
    assert!(dir.path().join("idle.session").exists());
}

#[test]
fn bad_settings_are_refused_by_name() {
    let dir = TempDir::new();
    let file = dir.path().join("a-file");
    fs::write(&file, "").expect("write");
    for (settings, named) in [
        (json!({ "dri": "x" }), "dri"),
        (json!({ "dir": "" }), "dir"),
        (json!({ "dir": dir.path(), "ttl_secs": 0 }), "ttl_secs"),
        (json!({ "dir": dir.path(), "ttl_secs": "1" }), "ttl_secs"),
        (json!({ "dir": file }), "dir"),
    ] {
        let err = FileStorePlugin::new_store(&settings.to_string())
            .err()
            .unwrap_or_else(|| panic!("{settings} must be refused"));
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{settings}");
        assert!(err.message.contains(named), "{settings}: {}", err.message);
    }
}

#[test]
fn the_plugin_says_what_it_is() {
    assert_eq!(FileStorePlugin::NAME, "template-store");
    assert_eq!(FileStorePlugin::KINDS, Kinds::STORE);
    let err = FileStorePlugin::new_model("{}")
        .err()
        .expect("no model adapter");
    assert_eq!(err.kind, ErrorKind::UNSUPPORTED);
}
