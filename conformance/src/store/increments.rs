//! Load-modify-save increments of one counter session, retried on conflict,
//! from many threads (`concurrent_increments`), two adapters
//! (`shared_increments`) or two processes (`process_increments`): every
//! increment must be applied exactly once.
//!
//! The session holds `{"n": counter, "log": [tags]}`; each increment adds 1
//! to `n` and appends its tag (`t3-7`: worker `t3`, increment 7), so a lost
//! update shows as a missing tag and a save applied twice as a repeated one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use llm_host_plugin_api::{
    serde_json::{self, json, Value},
    SaveOutcome,
};

use super::{join_all, Client};

/// How long one worker may take for all its increments.
pub(super) const INCREMENTS_WAIT: Duration = Duration::from_secs(120);

/// Creates session `id` holding a counter at 0 and an empty log.
pub(super) fn create_counter(store: &Client<'_>, id: &str) -> Result<(), String> {
    store.save_ok(id, 0, "o", &json!({"n": 0, "log": []}).to_string())
}

/// The tags that `workers` workers named `{prefix}{n}` applying
/// `increments` increments each log.
pub(super) fn tags(prefix: &str, workers: usize, increments: usize) -> BTreeSet<String> {
    (0..workers)
        .flat_map(|n| (0..increments).map(move |i| format!("{prefix}{n}-{i}")))
        .collect()
}

/// Worker `worker` (its tags are `{worker}-{i}`): `increments` load-modify-save
/// loops on session `id` through `store`, each retried on conflict until it
/// is saved or `deadline` passes. Answers how many conflicts were retried.
pub(super) fn increment(
    store: &Client<'_>,
    id: &str,
    worker: &str,
    increments: usize,
    deadline: Instant,
) -> Result<u64, String> {
    let mut conflicts = 0u64;
    for i in 0..increments {
        loop {
            if Instant::now() > deadline {
                return Err(format!(
                    "worker {worker} could not apply increment {i} within {} s",
                    INCREMENTS_WAIT.as_secs()
                ));
            }
            let session = store.load_some(id)?;
            let mut doc: Value = serde_json::from_str(session.data.as_str())
                .map_err(|err| format!("the stored document is no longer JSON: {err}"))?;
            let n = doc["n"].as_u64().unwrap_or_default();
            doc["n"] = json!(n + 1);
            if let Some(log) = doc["log"].as_array_mut() {
                log.push(json!(format!("{worker}-{i}")));
            }
            match store.save(id, session.version, "o", &doc.to_string())? {
                SaveOutcome::Saved { version } if version == session.version + 1 => break,
                SaveOutcome::Saved { version } => {
                    return Err(format!(
                        "a save at version {} answered Saved {{ version: {version} }}",
                        session.version
                    ))
                }
                SaveOutcome::Conflict { current } if current > session.version => {
                    conflicts += 1;
                }
                SaveOutcome::Conflict { current } => {
                    return Err(format!(
                        "a save at version {} conflicted with current {current}, which is not \
                         newer",
                        session.version
                    ))
                }
            }
        }
    }
    Ok(conflicts)
}

/// Runs `threads` workers through each of `stores` at once, named
/// `{prefix}0`, `{prefix}1`, ... in that order, each applying `increments`
/// increments to session `id`. Answers the conflicts retried.
pub(super) fn run_workers(
    stores: &[&Client<'_>],
    id: &str,
    prefix: &str,
    threads: usize,
    increments: usize,
) -> Result<u64, String> {
    let deadline = Instant::now() + INCREMENTS_WAIT;
    let workers: Vec<(String, &Client<'_>)> = stores
        .iter()
        .flat_map(|store| std::iter::repeat_n(*store, threads))
        .enumerate()
        .map(|(n, store)| (format!("{prefix}{n}"), store))
        .collect();
    let conflicts = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter()
            .map(|(worker, store)| {
                scope.spawn(move || increment(store, id, worker, increments, deadline))
            })
            .collect();
        join_all(handles)
    })?;
    Ok(conflicts.iter().sum())
}

/// Checks that session `id` went through exactly one save per tag in
/// `wanted`: its version is one more than their number (the create was
/// version 1), its counter is their number, and its log holds each once.
pub(super) fn verify_counter(
    store: &Client<'_>,
    id: &str,
    wanted: &BTreeSet<String>,
) -> Result<(), String> {
    let total = wanted.len();
    let session = store.load_some(id)?;
    let doc: Value = serde_json::from_str(session.data.as_str())
        .map_err(|err| format!("the final document is not JSON: {err}"))?;
    if doc["n"].as_u64() != Some(total as u64) {
        return Err(format!(
            "after {total} increments the counter is {}, expected {total}: increments were \
             lost, so two saves at one version both succeeded",
            doc["n"]
        ));
    }
    if session.version != total as u64 + 1 {
        return Err(format!(
            "after {total} increments the version is {}, expected {}",
            session.version,
            total + 1
        ));
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for entry in doc["log"].as_array().into_iter().flatten() {
        *seen
            .entry(entry.as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let twice: Vec<&String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|k| !seen.contains_key(*k)).collect();
    if !twice.is_empty() || !missing.is_empty() || seen.len() != wanted.len() {
        return Err(format!(
            "the log does not hold each increment once: applied twice {twice:?}, missing \
             {missing:?}"
        ));
    }
    Ok(())
}

/// Creates session `id` as a counter, then runs `threads` workers through
/// each of `stores` at once, each applying `increments` increments; checks
/// that every increment was applied exactly once. Answers how many
/// conflicts were retried.
pub(super) fn increment_together(
    stores: &[&Client<'_>],
    id: &str,
    threads: usize,
    increments: usize,
) -> Result<u64, String> {
    let first = stores.first().ok_or("no store to increment through")?;
    create_counter(first, id)?;
    let conflicts = run_workers(stores, id, "t", threads, increments)?;
    verify_counter(first, id, &tags("t", stores.len() * threads, increments))?;
    Ok(conflicts)
}
