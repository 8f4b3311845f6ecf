//! The SQLite store through the plugin's FFI adapter, on files in a
//! temporary directory.

use std::sync::Barrier;
use std::thread::sleep;
use std::time::Duration;

use llm_host_conformance::support::listed_ids as list;
use llm_host_conformance::{store, support};
use llm_host_plugin_api::{ErrorKind, Plugin, SaveOutcome, StoreAdapterBox};
use llm_plugin_sqlite::SqlitePlugin;

fn settings(dir: &tempfile::TempDir, extra: &str) -> String {
    let path = dir.path().join("sessions.db");
    let mut json = format!(r#"{{"path": {:?}"#, path.to_string_lossy());
    if !extra.is_empty() {
        json.push_str(", ");
        json.push_str(extra);
    }
    json.push('}');
    json
}

fn adapter(dir: &tempfile::TempDir, extra: &str) -> StoreAdapterBox {
    match SqlitePlugin::new_store(&settings(dir, extra)) {
        Ok(store) => store,
        Err(err) => panic!("the store opens: {err}"),
    }
}

fn version(store: &StoreAdapterBox, id: &str) -> Option<u64> {
    support::stored_version(store, id).expect("load")
}

fn save(store: &StoreAdapterBox, id: &str, expected: u64) -> SaveOutcome {
    support::save_empty(store, id, expected, "k")
}

#[test]
fn conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = settings(&dir, "");
    // Through the plugin: a second process of this test races this one on
    // the same file (`store.process_*`).
    let results = store::assert_plugin_conforms::<SqlitePlugin>(&settings);
    eprintln!("{}", store::report(&results));
}

#[test]
fn conforms_with_a_ttl_and_one_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = settings(&dir, r#""ttl_secs": 600, "pool_size": 1"#);
    store::assert_store_conforms(&|| SqlitePlugin::new_store(&settings));
}

#[test]
fn sessions_survive_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = adapter(&dir, "");
    assert_eq!(save(&store, "a", 0), SaveOutcome::Saved { version: 1 });
    assert_eq!(save(&store, "a", 1), SaveOutcome::Saved { version: 2 });
    drop(store);
    let store = adapter(&dir, "");
    assert_eq!(version(&store, "a"), Some(2));
}

#[test]
fn two_stores_on_one_file_race_safely() {
    // Two adapters with pools of their own stand for two hosts sharing the
    // file: only SQLite's locking keeps their saves apart.
    let dir = tempfile::tempdir().expect("tempdir");
    let stores = [adapter(&dir, ""), adapter(&dir, "")];
    assert_eq!(
        save(&stores[0], "shared", 0),
        SaveOutcome::Saved { version: 1 }
    );
    let barrier = Barrier::new(8);
    let outcomes: Vec<SaveOutcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|n| {
                let (store, barrier) = (&stores[n % 2], &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    save(store, "shared", 1)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });
    let saved = outcomes
        .iter()
        .filter(|o| **o == SaveOutcome::Saved { version: 2 })
        .count();
    let conflicts = outcomes
        .iter()
        .filter(|o| **o == SaveOutcome::Conflict { current: 2 })
        .count();
    assert_eq!((saved, conflicts), (1, 7), "{outcomes:?}");
    assert_eq!(version(&stores[1], "shared"), Some(2));
}

#[test]
fn idle_sessions_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = adapter(&dir, r#""ttl_secs": 1"#);
    assert_eq!(save(&store, "idle", 0), SaveOutcome::Saved { version: 1 });
    assert_eq!(save(&store, "busy", 0), SaveOutcome::Saved { version: 1 });
    // Loading counts as use: "busy" is loaded every 0.6 s and outlives the ttl.
    for _ in 0..3 {
        sleep(Duration::from_millis(600));
        assert_eq!(version(&store, "busy"), Some(1));
    }
    assert_eq!(version(&store, "idle"), None, "idle for 1.8 s");
    assert_eq!(list(&store, "k"), ["busy"]);
    sleep(Duration::from_millis(2100));
    assert_eq!(version(&store, "busy"), None);
    assert_eq!(list(&store, "k"), Vec::<String>::new());
    assert_eq!(list(&store, ""), Vec::<String>::new());
    assert!(!store.delete("busy".into()).into_result().expect("delete"));
    assert_eq!(
        save(&store, "busy", 1),
        SaveOutcome::Conflict { current: 0 }
    );
    assert_eq!(save(&store, "busy", 0), SaveOutcome::Saved { version: 1 });
}

#[test]
fn invalid_settings_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (extra, key) in [
        (r#""pool_size": 0"#, "pool_size"),
        (r#""ttl_secs": 0"#, "ttl_secs"),
        (r#""busy_timeout_ms": 99999999999"#, "busy_timeout_ms"),
        (r#""paht": "x.db""#, "paht"),
    ] {
        let json = settings(&dir, extra);
        let Err(err) = SqlitePlugin::new_store(&json) else {
            panic!("{json} was accepted");
        };
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{json}");
        assert!(err.message.contains(key), "{json}: {err}");
    }
    for json in [r#"{}"#, r#"{"path": ""}"#, r#"{"path": ":memory:"}"#] {
        let Err(err) = SqlitePlugin::new_store(json) else {
            panic!("{json} was accepted");
        };
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{json}");
        assert!(err.message.contains("path"), "{json}: {err}");
    }
}

#[test]
fn file_problems_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-dir").join("s.db");
    let Err(err) = SqlitePlugin::new_store(&format!(r#"{{"path": {:?}}}"#, missing)) else {
        panic!("a file in a missing directory opened");
    };
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE, "{err}");
    assert!(err.message.contains("no-such-dir"), "{err}");

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![b'x'; 4096]).expect("write");
    let Err(err) = SqlitePlugin::new_store(&format!(r#"{{"path": {:?}}}"#, garbage)) else {
        panic!("a file that is not a database opened");
    };
    assert_eq!(err.kind, ErrorKind::CORRUPT, "{err}");
    assert!(err.message.contains("garbage.db"), "{err}");
}
