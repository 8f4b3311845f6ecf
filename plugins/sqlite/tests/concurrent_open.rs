//! Several stores opening one new database file at the same moment, as
//! hosts started together on one config do: every one of them must open.
//!
//! Connections of one process lock a SQLite file the way connections of
//! several processes do, so threads with a store each make many rounds
//! quickly; child processes (this test binary run again) are the real case.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_host_plugin_api::Plugin;
use llm_plugin_sqlite::SqlitePlugin;

/// In a child process: the file to open.
const CHILD_PATH: &str = "LLM_SQLITE_TEST_CHILD_PATH";
/// In a child process: when to open it, in Unix ms.
const CHILD_START_MS: &str = "LLM_SQLITE_TEST_CHILD_START_MS";

fn open_store(path: &Path) -> Result<(), String> {
    let settings = format!(r#"{{"path": {:?}}}"#, path.to_string_lossy());
    SqlitePlugin::new_store(&settings)
        .map(drop)
        .map_err(|err| err.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[test]
fn threads_opening_one_new_file_all_open() {
    for round in 0..40 {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.db");
        let barrier = Barrier::new(8);
        let failed: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (&path, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        open_store(path)
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().expect("no panic").err())
                .collect()
        });
        assert!(failed.is_empty(), "round {round}: {failed:?}");
    }
}

#[test]
fn processes_opening_one_new_file_all_open() {
    let exe = std::env::current_exe().expect("the test binary");
    for round in 0..8 {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.db");
        // Late enough for every child to be running and waiting.
        let start = now_ms() + 400;
        let children: Vec<_> = (0..6)
            .map(|_| {
                Command::new(&exe)
                    .args(["--exact", "child_opens_the_store", "--nocapture"])
                    .env(CHILD_PATH, &path)
                    .env(CHILD_START_MS, start.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn a child")
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().expect("wait for a child");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "round {round}: {text}");
            assert!(text.contains("opened"), "round {round}: {text}");
        }
    }
}

/// Opens the store named by the environment at the time it names, when run
/// as a child of [`processes_opening_one_new_file_all_open`]; does nothing
/// otherwise.
#[test]
fn child_opens_the_store() {
    let (Some(path), Some(start)) = (
        std::env::var_os(CHILD_PATH),
        std::env::var(CHILD_START_MS)
            .ok()
            .and_then(|ms| ms.parse::<u64>().ok()),
    ) else {
        return;
    };
    sleep(Duration::from_millis(start.saturating_sub(now_ms())));
    match open_store(Path::new(&path)) {
        Ok(()) => println!("opened"),
        Err(err) => panic!("{err}"),
    }
}
