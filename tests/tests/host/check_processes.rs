//! `llm-host check --kind store` races two processes on one store
//! (`store.process_cas`, `store.process_increments`): it starts a second
//! process of itself that loads the same library with the same settings.
//! A store whose saves lock only within their process (the broken fixture's
//! file store: a `Mutex` in a static) passes every other check, the races
//! between two adapters of one process included, and fails these two; the
//! shipped stores that other hosts share (sqlite, Redis, PostgreSQL, the
//! store template) pass them.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use llm_host_conformance::support::{env_or, skip_or_fail};
use llm_host_tests::{artifacts, Exit, Plugin, Workdir};

/// The checks that race a second process.
const PROCESS_CHECKS: &[&str] = &["store.process_cas", "store.process_increments"];

/// `llm-host check LIBRARY --kind store --settings SETTINGS`, from a
/// temporary directory; answers the report and how long it took.
fn check_store(library: &str, settings: &str) -> (Exit, Duration) {
    let workdir = Workdir::new(&[]);
    let began = Instant::now();
    let exit = workdir.run(&["check", library, "--kind", "store", "--settings", settings]);
    (exit, began.elapsed())
}

/// The verdict line of check `name`.
fn line<'a>(exit: &'a Exit, name: &str) -> &'a str {
    exit.stdout
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no verdict line for {name}:\n{exit}"))
}

fn assert_verdict(exit: &Exit, verdict: &str, name: &str, detail: &str) {
    let line = line(exit, name);
    assert!(
        line.starts_with(&format!("{verdict} {name}:")) && line.contains(detail),
        "{name} should be {verdict} and say {detail:?}: {line}\n{exit}"
    );
}

/// A shipped store library, by file name.
fn shipped(file: &str) -> String {
    let path: PathBuf = artifacts()
        .host
        .parent()
        .expect("the profile directory")
        .join(file);
    path.to_str().expect("UTF-8 build paths").to_owned()
}

// The broken plugin's file store (`dir` set) compares and writes under a
// Mutex in a static: every check of one process passes, the two adapters'
// races included, and both races with a second process fail, saying why.
#[test]
fn a_store_locked_within_its_process_fails_the_process_checks() {
    let dir = tempfile::tempdir().expect("a directory for the sessions");
    let settings = serde_json::json!({ "dir": dir.path() }).to_string();
    let library = Plugin::Broken.path().to_str().expect("UTF-8 build paths");
    let (exit, took) = check_store(library, &settings);
    eprintln!("checked in {took:.1?}");
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    for name in [
        "store.concurrent_cas",
        "store.concurrent_increments",
        "store.shared_cas",
        "store.shared_increments",
    ] {
        assert_verdict(&exit, "PASS", name, "");
    }
    assert_verdict(
        &exit,
        "FAIL",
        "store.process_cas",
        "one from this process and one from a second process with an adapter built from the \
         same settings: 2 of 2 racing saves at version",
    );
    // Lost updates, or a version that went back (a stale write landed last).
    let increments = line(&exit, "store.process_increments");
    assert!(
        increments.starts_with("FAIL ")
            && (increments.contains("increments were lost")
                || increments.contains("which is not newer")),
        "{exit}"
    );
    for name in PROCESS_CHECKS {
        assert_verdict(&exit, "FAIL", name, "even a Mutex in a static");
    }
    let summary = exit.stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains(" 2 failed, 1 warning, 1 skipped") && summary.contains("does NOT conform"),
        "only the process checks fail (and unknown settings warn): {summary}\n{exit}"
    );
}

fn reachable(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some()
}

/// Fails unless the report says the store conforms and passed the races
/// with a second process.
fn assert_passes_the_races(exit: &Exit, store: &str) {
    assert_eq!(exit.status.code(), Some(0), "{store}:\n{exit}");
    assert_verdict(
        exit,
        "PASS",
        "store.process_cas",
        "exactly one won each round",
    );
    assert_verdict(
        exit,
        "PASS",
        "store.process_increments",
        "2 processes x 2 threads x 10 increments all applied once",
    );
    assert!(!exit.stdout.contains("FAIL"), "{store}:\n{exit}");
}

// sqlite (one file), the store template (a directory locked by flock), Redis
// and PostgreSQL (the machine's servers; skipped when absent, failed under
// CI) pass the races between two processes. On the servers every run uses
// one key prefix and one table: the suite's session ids are unique to the
// run, and it deletes what it saved, so runs share them safely and leave
// no table behind per run.
#[test]
fn the_shipped_stores_pass_the_process_checks() {
    let dir = tempfile::tempdir().expect("a directory for the stores");
    let mut stores = vec![
        (
            shipped("libllm_plugin_sqlite.so"),
            serde_json::json!({ "path": dir.path().join("sessions.db") }).to_string(),
        ),
        (
            Plugin::TemplateStore
                .path()
                .to_str()
                .expect("UTF-8 build paths")
                .to_owned(),
            serde_json::json!({ "dir": dir.path().join("files") }).to_string(),
        ),
    ];
    let redis = env_or("LLM_HOST_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    if reachable(redis.trim_start_matches("redis://").trim_end_matches('/')) {
        stores.push((
            shipped("libllm_plugin_redis.so"),
            serde_json::json!({ "url": redis, "prefix": "llm-host-check:" }).to_string(),
        ));
    } else {
        skip_or_fail(&format!("no Redis server at {redis}"));
    }
    let postgres = env_or(
        "LLM_HOST_TEST_POSTGRES_URL",
        "host=127.0.0.1 user=postgres dbname=test",
    );
    if reachable("127.0.0.1:5432") || !postgres.contains("127.0.0.1") {
        stores.push((
            shipped("libllm_plugin_postgres.so"),
            serde_json::json!({ "url": postgres, "table": "llm_host_check" }).to_string(),
        ));
    } else {
        skip_or_fail(&format!("no PostgreSQL server at {postgres}"));
    }
    for (library, settings) in &stores {
        let (exit, took) = check_store(library, settings);
        eprintln!("{library}: checked in {took:.1?}");
        assert_passes_the_races(&exit, library);
    }
}
