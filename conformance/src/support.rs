//! Helpers for tests that run a suite against a real server.
//!
//! Two rules such tests follow: every run uses names of its own (a key
//! prefix, a table, session ids), so runs against one shared server do not
//! collide; and a server that cannot be reached skips the test on a
//! developer's machine but fails it under CI, where it must be there.

use std::fmt::Display;

use llm_host_plugin_api::{
    abi_stable::std_types::RStr, ListQuery, PluginError, SaveOutcome, StoreAdapterBox,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A token unique to this call: it differs between processes, between runs,
/// and between calls in one process. Lowercase ASCII letters and digits only,
/// starting with a letter, at most 32 characters: usable in a table name, a
/// key prefix or a session id as it is.
pub fn unique_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Truncated to 64 bits: the low bits are the ones that change.
    format!("r{:x}p{:x}c{count:x}", nanos as u64, std::process::id())
}

/// Whether tests run under CI, where the environment variable `CI` is `true`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true"))
}

/// What a test does when a service it needs is missing: under CI it panics
/// with `reason` (the service is part of CI's machine, so its absence is a
/// failure); elsewhere it prints `skipped: <reason>` and returns, and the
/// test should return too.
///
/// # Panics
///
/// Under CI, always.
#[track_caller]
pub fn skip_or_fail(reason: &str) {
    if in_ci() {
        panic!("{reason} (CI=true: a test that needs this service may not be skipped)");
    }
    eprintln!("skipped: {reason}");
}

/// The value of `result`, or, if it is an error, [`skip_or_fail`] with
/// "`what`: error" and `None`:
///
/// ```no_run
/// # fn connect() -> Result<(), String> { Ok(()) }
/// let Some(server) = llm_host_conformance::support::require(connect(), "Redis at redis://127.0.0.1")
/// else {
///     return; // skipped
/// };
/// ```
///
/// # Panics
///
/// Under CI, when `result` is an error.
#[track_caller]
pub fn require<T, E: Display>(result: Result<T, E>, what: &str) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(err) => {
            skip_or_fail(&format!("{what}: {err}"));
            None
        }
    }
}

/// The environment variable `name`, or `default` when it is unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value,
        _ => default.to_owned(),
    }
}

/// The version `store` holds of session `id`, or none if it does not hold it.
pub fn stored_version(store: &StoreAdapterBox, id: &str) -> Result<Option<u64>, PluginError> {
    store
        .load(RStr::from(id))
        .into_result()
        .map(|stored| stored.into_option().map(|stored| stored.version))
}

/// Saves an empty document (`{}`) as session `id` of `owner`, conditionally
/// on `expected`; panics if the store fails.
pub fn save_empty(store: &StoreAdapterBox, id: &str, expected: u64, owner: &str) -> SaveOutcome {
    store
        .save(id.into(), expected, owner.into(), "{}".into())
        .into_result()
        .expect("save")
}

/// The session ids the first page (up to 100) of `owner`'s lists; panics if
/// the store fails.
pub fn listed_ids(store: &StoreAdapterBox, owner: &str) -> Vec<String> {
    store
        .list(ListQuery {
            owner: owner.into(),
            after: "".into(),
            limit: 100,
        })
        .into_result()
        .expect("list")
        .ids
        .into_iter()
        .map(|id| id.into_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_plain() {
        let a = unique_token();
        let b = unique_token();
        assert_ne!(a, b);
        assert!(a.len() <= 32, "{a}");
        assert!(a.starts_with('r'), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{a}"
        );
    }
}
