//! The store suite for a plugin type and its settings: [`check_plugin`] and
//! [`assert_plugin_conforms`], which run every check, the races between two
//! processes included.
//!
//! The second process is this test binary, run again on the calling test
//! alone (`TEST --exact`), with the job in [`RACE_ENV`](super::RACE_ENV).
//! There the test runs again from its start; the first `check_plugin::<P>`
//! call it reaches (for the same `P`) builds its adapter with the first
//! process's settings, which the job carries (so a temporary directory or a
//! key prefix made anew by the test's second run does not matter), serves
//! the races, and answers no results; every other call of the suite there
//! answers none at once.

use std::sync::atomic::{AtomicBool, Ordering};

use llm_host_plugin_api::{serde_json::json, Plugin};

use super::processes::{job, serve_race, SecondProcess};
use super::{check_store_with, conforming, CheckResult, StoreOptions};

/// Whether this process, started as a second process, served its job.
static SERVED: AtomicBool = AtomicBool::new(false);

/// Runs every store check against adapters that `P::new_store(settings)`
/// builds, with the [`StoreOptions`] the settings imply (a `ttl_secs` for
/// `expiry`), and the `process_*` checks with a second process: this test
/// binary, running the calling test again (see the module docs). Call it
/// from a `#[test]` of the default harness; elsewhere (no test's name on the
/// thread) the `process_*` checks are skipped, saying why. Answers one
/// result per check, as [`check_store_with`].
///
/// The calling test runs again in the second process up to this call, so
/// its setup must not undo the first run's: make directories and key
/// prefixes unique to each run ([`unique_token`](crate::support::unique_token)),
/// rather than emptying a fixed one.
pub fn check_plugin<P: Plugin>(settings: &str) -> Vec<CheckResult> {
    let test = std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .map(str::to_owned);
    let plugin = std::any::type_name::<P>();
    if let Some(job) = job() {
        // A second process: serve the job at the first call it is for.
        let ours = job.as_ref().is_ok_and(|job| {
            job["call"]["test"].as_str() == test.as_deref()
                && job["call"]["plugin"].as_str() == Some(plugin)
        });
        if ours && !SERVED.swap(true, Ordering::SeqCst) {
            let settings = job
                .as_ref()
                .ok()
                .and_then(|job| job["call"]["settings"].as_str())
                .unwrap_or(settings)
                .to_owned();
            if let Err(err) = serve_race(&|| P::new_store(&settings)) {
                eprintln!("llm-host-conformance: as a second process: {err}");
            }
        }
        return Vec::new();
    }
    let second = match test {
        Some(test) => SecondProcess::this_test(
            &test,
            json!({ "test": test, "plugin": plugin, "settings": settings }),
        ),
        None => SecondProcess::unavailable(
            "this thread carries no test's name, so no test can be run again as a second \
             process (call check_plugin from a #[test] of the default harness, or give \
             StoreOptions a SecondProcess of your own); llm-host check races two processes"
                .to_owned(),
        ),
    };
    let options = StoreOptions::from_settings(settings).with_second_process(second);
    check_store_with(&|| P::new_store(settings), &options)
}

/// [`check_plugin`], panicking with the report if any check failed, as
/// [`assert_store_conforms_with`](super::assert_store_conforms_with) does.
///
/// ```no_run
/// use llm_host_conformance::store;
/// # use llm_host_plugin_api::Plugin;
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     const NAME: &'static str = "mine";
/// #     const VERSION: &'static str = "0.1.0";
/// #     const KINDS: llm_host_plugin_api::Kinds = llm_host_plugin_api::Kinds::STORE;
/// # }
/// # fn unique_dir() -> String { String::new() }
///
/// #[test]
/// fn my_store_conforms() {
///     let dir = unique_dir(); // a directory of this run's own
///     let settings = format!(r#"{{"dir": "{dir}", "ttl_secs": 2}}"#);
///     store::assert_plugin_conforms::<MyPlugin>(&settings);
/// }
/// ```
///
/// # Panics
///
/// When the adapter fails a check.
pub fn assert_plugin_conforms<P: Plugin>(settings: &str) -> Vec<CheckResult> {
    conforming(check_plugin::<P>(settings))
}
