//! The store conformance suite: what every store adapter must do.
//!
//! [`check_store`] runs every check against adapters made by a closure and
//! answers one [`CheckResult`] per check; [`assert_store_conforms`] does the
//! same and panics with a readable report when any check fails, for use in a
//! `#[test]`. Each check gets a fresh adapter from the closure and drives it
//! through the FFI trait object ([`StoreAdapterBox`]), as the host does; the
//! `shared_*` checks build a second adapter with it, as a second host would.
//! [`check_store_with`] and [`assert_store_conforms_with`] take
//! [`StoreOptions`] too: the TTL the settings set, for the `expiry` check.
//!
//! The checks are safe to run against a real server that other runs share:
//! every session id starts with `conf-` and a token unique to the run, the
//! listing checks filter by an owner unique to the run, and each check
//! deletes the sessions it made. They do need a store that starts out without
//! sessions of those ids, which any store does.
//!
//! What is checked, by name:
//!
//! | check | what |
//! |---|---|
//! | `load_absent` | loading an id never saved answers none |
//! | `create` | a save with expected version 0 creates version 1; load gives it back |
//! | `create_conflict` | a second create conflicts with current 1 and writes nothing |
//! | `update_round_trip` | a save at the loaded version makes version + 1; owner and data (unicode, escapes, whitespace, odd ids) come back byte for byte |
//! | `large_document` | a document of about 1 MB comes back byte for byte |
//! | `stale_save` | a save with an old version conflicts with the current one and writes nothing |
//! | `absent_save` | a save with expected N > 0 on an absent session conflicts with current 0 and creates nothing |
//! | `delete` | delete answers true, then false; the session is gone |
//! | `recreate_after_delete` | after delete, a create with version 0 works again |
//! | `list_by_owner` | pages of one owner's ids: ascending, `limit` honoured, `next` continues, no duplicates, other owners left out |
//! | `list_after` | `after` starts the listing past the given id |
//! | `list_all_owners` | an empty owner lists the sessions of every owner |
//! | `concurrent_create` | 8 threads create one session at once: exactly one wins |
//! | `concurrent_cas` | 8 threads save one session at the same version: exactly one `Saved`, the rest `Conflict` |
//! | `concurrent_increments` | 4 threads x 10 load-modify-save loops with retry: all 40 applied exactly once |
//! | `shared_cas` | two adapters built from the same settings (two views of one store, as two hosts have) see each other's saves, and in 50 rounds of two saves at the same version racing from two threads, one through each adapter, exactly one wins each round. `Skip` for a store that is [in process](llm_host_plugin_api::StoreAdapter::in_process) (its adapters never share sessions) |
//! | `shared_increments` | 2 adapters x 2 threads x 10 load-modify-save loops with retry: all 40 applied exactly once. `Skip` for a store in process |
//! | `process_cas` | with a [second process](StoreOptions::second_process) only: that process builds an adapter from the same settings and loads the session this one saved (the two share one store), then in 50 rounds of two saves at the same version racing, one from each process, exactly one wins each round. `Skip` for a store in process |
//! | `process_increments` | with a second process only: 2 processes x 2 threads x 10 load-modify-save loops with retry: all 40 applied exactly once. `Skip` for a store in process |
//! | `updated_at` | `updated_at_ms` is set and within 10 minutes of this machine's clock |
//! | `ping` | ping answers Ok |
//! | `expiry` | with [`StoreOptions::ttl`] (`ttl_secs` in the settings of `llm-host check`), sessions left alone for the TTL plus 1 s are absent: `load` answers none, `list` leaves them out, `delete` answers false, a save at the old version conflicts with current 0 and one at version 0 creates version 1. `Skip` without a TTL, or with one over [`MAX_CHECKED_TTL`] (the check waits it out) |
//!
//! A store that keeps its compare-and-set atomic only inside one adapter
//! value (a lock of its own around a read and a write of shared storage)
//! passes the `concurrent_*` checks and fails the `shared_*` ones: two hosts
//! are two adapters. A store that says it is not in process but whose
//! adapters keep separate sessions fails `shared_cas` too. A store whose lock
//! is shared by every adapter of its process but no further (a `Mutex` in a
//! static around a file's read and write) passes `shared_*` and fails the
//! `process_*` checks: two hosts are two processes.
//!
//! The `process_*` checks run only with a [`SecondProcess`] to race:
//! [`check_plugin`] and [`assert_plugin_conforms`], which take the plugin's
//! type and its settings, run the calling test again as one (see
//! [`check_plugin`]), and `llm-host check` runs itself. [`check_store`] and
//! the other functions that take a closure cannot start a process that
//! builds the same adapter, so they leave those two checks out:
//!
//! ```no_run
//! use llm_host_conformance::store;
//! # use llm_host_plugin_api::Plugin;
//! # struct MyPlugin;
//! # impl Plugin for MyPlugin {
//! #     const NAME: &'static str = "mine";
//! #     const VERSION: &'static str = "0.1.0";
//! #     const KINDS: llm_host_plugin_api::Kinds = llm_host_plugin_api::Kinds::STORE;
//! # }
//! #[test]
//! fn my_store_conforms() {
//!     // Every check, the races between two processes included; a ttl_secs
//!     // in the settings is the TTL `expiry` waits out.
//!     store::assert_plugin_conforms::<MyPlugin>(r#"{"path": "/tmp/x"}"#);
//! }
//! ```
//!
//! To check expiry, build the adapters with a short TTL, 1 or 2 s (every
//! session of the other checks must then stay in use that long, which they
//! do), and give it in the options:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use llm_host_conformance::store::{self, StoreOptions};
//! use llm_host_plugin_api::Plugin;
//!
//! # struct MyPlugin;
//! # impl Plugin for MyPlugin {
//! #     const NAME: &'static str = "mine";
//! #     const VERSION: &'static str = "0.1.0";
//! #     const KINDS: llm_host_plugin_api::Kinds = llm_host_plugin_api::Kinds::STORE;
//! # }
//! #[test]
//! fn my_store_conforms_and_expires() {
//!     let settings = r#"{"path": "/tmp/x", "ttl_secs": 2}"#;
//!     let options = StoreOptions::from_settings(settings); // ttl: Some(2 s)
//!     assert_eq!(options.ttl, Some(Duration::from_secs(2)));
//!     store::assert_store_conforms_with(&|| MyPlugin::new_store(settings), &options);
//! }
//! ```
//!
//! `llm-host check PATH.so --kind store --settings '{"ttl_secs": 2}'` does the
//! same with a built library.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Barrier;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_host_plugin_api::{
    abi_stable::std_types::{RStr, RString},
    guard::panic_message,
    serde_json::{self, Value},
    ListQuery, PluginError, SaveOutcome, SessionPage, StoreAdapterBox, StoredSession,
};

pub use crate::model::Verdict;
use crate::support::unique_token;

mod increments;
mod plugin;
mod processes;

use increments::increment_together;
pub use plugin::{assert_plugin_conforms, check_plugin};
pub use processes::{serve_race, SecondProcess, RACE_ENV};

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's name (see the module docs for the list).
    pub name: &'static str,
    /// Whether the check did not fail: it passed, or it was skipped (see
    /// `verdict`). A skip does not fail the suite.
    pub passed: bool,
    /// What it concluded: [`Verdict::Pass`], [`Verdict::Fail`], or
    /// [`Verdict::Skip`] for a check that does not apply (the `shared_*`
    /// checks of a store in process, `expiry` without a TTL). Store checks
    /// never warn.
    pub verdict: Verdict,
    /// What was found: on failure, what went wrong; on success, a short
    /// note; when skipped, why.
    pub detail: String,
}

impl CheckResult {
    fn new(name: &'static str, verdict: Verdict, detail: String) -> Self {
        Self {
            name,
            passed: verdict != Verdict::Fail,
            verdict,
            detail,
        }
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.verdict {
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
            Verdict::Warn => "warn",
            Verdict::Pass => "ok  ",
        };
        write!(f, "{mark} {}: {}", self.name, self.detail)
    }
}

/// The closure the suite builds adapters with: usually a plugin's
/// `new_store` with fixed settings. It is called once per check, and twice
/// for the `shared_*` checks: every adapter it makes must be a view of the
/// same store (the same file, server, prefix), as those of two hosts with
/// the same settings are, not a fresh one.
pub type MakeStore<'a> = &'a dyn Fn() -> Result<StoreAdapterBox, PluginError>;

/// The longest TTL the `expiry` check waits out (it waits the TTL plus 1 s);
/// with a longer one it is skipped.
pub const MAX_CHECKED_TTL: Duration = Duration::from_secs(10);

/// What the settings the adapters are built with promise, beyond the
/// contract every store keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// The TTL the settings set (`ttl_secs`, by convention): the `expiry`
    /// check then leaves sessions alone for this long plus 1 s and checks
    /// that they are gone. `None` skips it, and so does a TTL over
    /// [`MAX_CHECKED_TTL`]. Give 1 or 2 s: the check waits it out.
    pub ttl: Option<Duration>,
    /// How to start a second process of the store, for the `process_*`
    /// checks; without one they are left out. [`check_plugin`] and
    /// `llm-host check` give one.
    pub second_process: Option<SecondProcess>,
}

impl StoreOptions {
    /// The options the adapter settings `settings` (a JSON object's text)
    /// imply: `ttl_secs`, if it is a whole number, as the TTL.
    pub fn from_settings(settings: &str) -> Self {
        let ttl = serde_json::from_str::<Value>(settings)
            .ok()
            .and_then(|settings| settings.get("ttl_secs").and_then(Value::as_u64))
            .map(Duration::from_secs);
        Self {
            ttl,
            second_process: None,
        }
    }

    /// The same options, with `second` to race for the `process_*` checks.
    pub fn with_second_process(mut self, second: SecondProcess) -> Self {
        self.second_process = Some(second);
        self
    }
}

/// What a check found when it did not fail.
enum Found {
    Pass(String),
    Skip(String),
}

impl From<String> for Found {
    fn from(detail: String) -> Self {
        Found::Pass(detail)
    }
}

/// What a check gets besides its adapter: the run, the closure that builds
/// more adapters, and the options.
struct Suite<'a> {
    run: Run,
    make: MakeStore<'a>,
    options: &'a StoreOptions,
}

enum Check {
    /// Against one adapter; passes or fails.
    One(fn(&Run, &Client<'_>) -> Result<String, String>),
    /// May build more adapters, look at the options, or not apply.
    Suite(fn(&Suite<'_>, &Client<'_>) -> Result<Found, String>),
    /// Races a second process: run only when the options give one.
    Process(fn(&Suite<'_>, &Client<'_>) -> Result<Found, String>),
}

const CHECKS: &[(&str, Check)] = &[
    ("load_absent", Check::One(load_absent)),
    ("create", Check::One(create)),
    ("create_conflict", Check::One(create_conflict)),
    ("update_round_trip", Check::One(update_round_trip)),
    ("large_document", Check::One(large_document)),
    ("stale_save", Check::One(stale_save)),
    ("absent_save", Check::One(absent_save)),
    ("delete", Check::One(delete)),
    ("recreate_after_delete", Check::One(recreate_after_delete)),
    ("list_by_owner", Check::One(list_by_owner)),
    ("list_after", Check::One(list_after)),
    ("list_all_owners", Check::One(list_all_owners)),
    ("concurrent_create", Check::One(concurrent_create)),
    ("concurrent_cas", Check::One(concurrent_cas)),
    ("concurrent_increments", Check::One(concurrent_increments)),
    ("shared_cas", Check::Suite(shared_cas)),
    ("shared_increments", Check::Suite(shared_increments)),
    ("process_cas", Check::Process(processes::process_cas)),
    (
        "process_increments",
        Check::Process(processes::process_increments),
    ),
    ("updated_at", Check::One(updated_at)),
    ("ping", Check::One(ping)),
    ("expiry", Check::Suite(expiry)),
];

/// The names of the checks [`check_store`] runs, in order. With a
/// [`SecondProcess`] in the options, `process_cas` and `process_increments`
/// follow `shared_increments`.
pub fn check_names() -> Vec<&'static str> {
    CHECKS
        .iter()
        .filter(|(_, check)| !matches!(check, Check::Process(_)))
        .map(|(name, _)| *name)
        .collect()
}

/// Runs every check, each against a fresh adapter from `make`, and answers
/// one result per check, in the order of [`check_names`], with the default
/// [`StoreOptions`] (no TTL: `expiry` is skipped). Never panics: a
/// constructor error, an adapter error or a panic inside a check (a bug in
/// the suite) fails that check alone.
pub fn check_store(make: MakeStore<'_>) -> Vec<CheckResult> {
    check_store_with(make, &StoreOptions::default())
}

/// [`check_store`] with `options`: what the settings `make` builds with
/// promise (a TTL), and a second process to race.
///
/// In a process started as a second process (with [`RACE_ENV`] set) it runs
/// nothing and answers no results.
pub fn check_store_with(make: MakeStore<'_>, options: &StoreOptions) -> Vec<CheckResult> {
    if processes::job().is_some() {
        return Vec::new();
    }
    let suite = Suite {
        run: Run::new(),
        make,
        options,
    };
    CHECKS
        .iter()
        .filter(|(_, check)| {
            !matches!(check, Check::Process(_)) || options.second_process.is_some()
        })
        .map(|(name, check)| {
            let outcome = match make() {
                Err(err) => Err(format!("could not build the adapter: {err}")),
                Ok(adapter) => {
                    let client = Client(&adapter);
                    let outcome = catch_unwind(AssertUnwindSafe(|| match check {
                        Check::One(check) => check(&suite.run, &client).map(Found::from),
                        Check::Suite(check) | Check::Process(check) => check(&suite, &client),
                    }))
                    .unwrap_or_else(|panic| {
                        Err(format!(
                            "the check panicked: {}",
                            panic_message(panic.as_ref())
                        ))
                    });
                    suite.run.clean_up(name, &client);
                    outcome
                }
            };
            match outcome {
                Ok(Found::Pass(detail)) => CheckResult::new(name, Verdict::Pass, detail),
                Ok(Found::Skip(detail)) => CheckResult::new(name, Verdict::Skip, detail),
                Err(detail) => CheckResult::new(name, Verdict::Fail, detail),
            }
        })
        .collect()
}

/// A report of `results`: a summary line, then one line per check.
pub fn report(results: &[CheckResult]) -> String {
    let count = |verdict| results.iter().filter(|r| r.verdict == verdict).count();
    let mut text = format!(
        "store conformance: {} passed, {} failed, {} skipped\n",
        count(Verdict::Pass),
        count(Verdict::Fail),
        count(Verdict::Skip)
    );
    for result in results {
        text.push_str(&format!("  {result}\n"));
    }
    text
}

/// Runs [`check_store`] and panics with the [`report`] if any check failed;
/// answers the results otherwise (skips included: a skipped check does not
/// apply to the store).
///
/// # Panics
///
/// When the adapter fails a check: the message lists every failed check and
/// what went wrong.
pub fn assert_store_conforms(make: MakeStore<'_>) -> Vec<CheckResult> {
    assert_store_conforms_with(make, &StoreOptions::default())
}

/// [`assert_store_conforms`] with `options` (see [`check_store_with`]).
///
/// # Panics
///
/// When the adapter fails a check, as [`assert_store_conforms`].
pub fn assert_store_conforms_with(make: MakeStore<'_>, options: &StoreOptions) -> Vec<CheckResult> {
    conforming(check_store_with(make, options))
}

/// `results`, if no check failed.
///
/// # Panics
///
/// When a check failed, with the report.
fn conforming(results: Vec<CheckResult>) -> Vec<CheckResult> {
    if results.iter().any(|r| !r.passed) {
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| format!("  {r}"))
            .collect();
        panic!(
            "the store does not conform:\n{}\n\n{}",
            failed.join("\n"),
            report(&results)
        );
    }
    results
}

/// What the checks of one run share: the run's unique token.
struct Run {
    token: String,
}

impl Run {
    fn new() -> Self {
        Self {
            token: unique_token(),
        }
    }

    /// The prefix of every id check `check` makes.
    fn prefix(&self, check: &str) -> String {
        format!("conf-{}-{check}-", self.token)
    }

    /// A session id for check `check`.
    fn id(&self, check: &str, part: &str) -> String {
        format!("{}{part}", self.prefix(check))
    }

    /// An owner unique to this run.
    fn owner(&self, part: &str) -> String {
        format!("conf-{}-{part}", self.token)
    }

    /// Deletes whatever check `check` left behind, found by listing its ids.
    fn clean_up(&self, check: &str, client: &Client<'_>) {
        let prefix = self.prefix(check);
        let mut after = prefix.clone();
        for _ in 0..100 {
            let Ok(page) = client.list("", &after, 100) else {
                return;
            };
            let mut done = page.next.is_none();
            for id in page.ids.iter().map(RString::as_str) {
                if !id.starts_with(&prefix) {
                    if id > prefix.as_str() {
                        done = true;
                    }
                    continue;
                }
                let _ = client.delete(id);
            }
            match page.next.into_option() {
                Some(next) if !done => after = next.into_string(),
                _ => return,
            }
        }
    }
}

/// The adapter, with calls that answer plain `Result`s with readable errors.
struct Client<'a>(&'a StoreAdapterBox);

impl Client<'_> {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, String> {
        self.0
            .load(RStr::from(id))
            .into_result()
            .map(|session| session.into_option())
            .map_err(|err| format!("load(`{id}`) failed: {err}"))
    }

    fn save(
        &self,
        id: &str,
        expected: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, String> {
        self.0
            .save(id.into(), expected, owner.into(), data.into())
            .into_result()
            .map_err(|err| format!("save(`{id}`, expected {expected}) failed: {err}"))
    }

    /// A save that must answer `Saved { version: expected + 1 }`.
    fn save_ok(&self, id: &str, expected: u64, owner: &str, data: &str) -> Result<(), String> {
        match self.save(id, expected, owner, data)? {
            SaveOutcome::Saved { version } if version == expected + 1 => Ok(()),
            other => Err(format!(
                "save(`{id}`, expected {expected}) answered {other:?}, expected Saved {{ version: {} }}",
                expected + 1
            )),
        }
    }

    fn delete(&self, id: &str) -> Result<bool, String> {
        self.0
            .delete(id.into())
            .into_result()
            .map_err(|err| format!("delete(`{id}`) failed: {err}"))
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, String> {
        self.0
            .list(ListQuery {
                owner: owner.into(),
                after: after.into(),
                limit,
            })
            .into_result()
            .map_err(|err| {
                format!("list(owner `{owner}`, after `{after}`, limit {limit}) failed: {err}")
            })
    }

    /// Loads a session that must exist.
    fn load_some(&self, id: &str) -> Result<StoredSession, String> {
        self.load(id)?
            .ok_or_else(|| format!("load(`{id}`) answered none for a session that was saved"))
    }

    /// Checks that `id` holds exactly this version, owner and data.
    fn expect(&self, id: &str, version: u64, owner: &str, data: &str) -> Result<(), String> {
        let session = self.load_some(id)?;
        if session.version != version {
            return Err(format!(
                "load(`{id}`) gave version {}, expected {version}",
                session.version
            ));
        }
        if session.owner.as_str() != owner {
            return Err(format!(
                "load(`{id}`) gave owner {:?}, expected {owner:?}",
                session.owner.as_str()
            ));
        }
        if session.data.as_str() != data {
            return Err(format!(
                "load(`{id}`) gave data that differs from what was saved: {}",
                describe_difference(data, session.data.as_str())
            ));
        }
        Ok(())
    }
}

/// Where two texts first differ, briefly.
fn describe_difference(expected: &str, found: &str) -> String {
    let at = expected
        .char_indices()
        .zip(found.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(expected.len().min(found.len()));
    let excerpt = |text: &str| -> String {
        let start = floor_boundary(text, at.saturating_sub(20));
        let end = floor_boundary(text, (at + 40).min(text.len()));
        format!("{:?}", &text[start..end])
    };
    format!(
        "{} bytes saved, {} bytes loaded, first difference at byte {at}: saved …{}…, loaded …{}…",
        expected.len(),
        found.len(),
        excerpt(expected),
        excerpt(found)
    )
}

fn floor_boundary(text: &str, mut index: usize) -> usize {
    index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A JSON document with what stores get wrong: non-ASCII text in several
/// scripts, emoji, JSON escapes (including an escaped NUL), and whitespace
/// that a store parsing the JSON would lose.
fn tricky_document() -> String {
    concat!(
        "  {\"text\": \"héllo wörld — 日本語 ☃ 🎉 𝄞\",\n",
        "   \"escapes\": \"quote \\\" backslash \\\\ tab \\t nul \\u0000 pair \\ud83d\\ude00\",\n",
        "   \"rtl\": \"שלום مرحبا\", \"numbers\": [1.50, 1E3, -0],\n",
        "   \"dup\": 1, \"dup\": 2 }\t\r\n "
    )
    .to_owned()
}

// ---- the checks ----

fn load_absent(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("load_absent", "never-saved");
    match store.load(&id)? {
        None => Ok("an unknown id loads as none".into()),
        Some(session) => Err(format!(
            "load of an id never saved answered a session (version {})",
            session.version
        )),
    }
}

fn create(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("create", "s");
    let owner = run.owner("create");
    store.save_ok(&id, 0, &owner, r#"{"messages":[]}"#)?;
    store.expect(&id, 1, &owner, r#"{"messages":[]}"#)?;
    Ok("expected 0 creates version 1".into())
}

fn create_conflict(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("create_conflict", "s");
    store.save_ok(&id, 0, "first", r#"{"n":1}"#)?;
    match store.save(&id, 0, "second", r#"{"n":2}"#)? {
        SaveOutcome::Conflict { current: 1 } => {}
        other => {
            return Err(format!(
                "a second create answered {other:?}, expected Conflict {{ current: 1 }}"
            ))
        }
    }
    store.expect(&id, 1, "first", r#"{"n":1}"#)?;
    Ok("a second create conflicts with current 1 and writes nothing".into())
}

fn update_round_trip(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("update_round_trip", "ids:with.odd_chars-Z9");
    let owner = format!("{} ünïcødé", run.owner("update"));
    let data = tricky_document();
    store.save_ok(&id, 0, &owner, "{}")?;
    store.save_ok(&id, 1, &owner, &data)?;
    store.expect(&id, 2, &owner, &data)?;
    // The owner may change, and may be empty.
    store.save_ok(&id, 2, "", "[]")?;
    store.expect(&id, 3, "", "[]")?;
    Ok("versions count up by one; owner and data come back byte for byte".into())
}

fn large_document(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("large_document", "s");
    let line = "{\"role\":\"assistant\",\"content\":\"Ünïcode ✓ 🎉 — the quick brown fox \\\"jumps\\\"\"},\n";
    let mut data = String::from("{\"messages\":[\n");
    let mut n = 0usize;
    while data.len() < 1_000_000 {
        data.push_str(&line.replace("fox", &format!("fox {n}")));
        n += 1;
    }
    data.push_str("{}]}");
    store.save_ok(&id, 0, "big", &data)?;
    store.expect(&id, 1, "big", &data)?;
    let half = &data[..floor_boundary(&data, data.len() / 2)];
    store.save_ok(&id, 1, "big", half)?;
    store.expect(&id, 2, "big", half)?;
    Ok(format!("a {} byte document round-trips", data.len()))
}

fn stale_save(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("stale_save", "s");
    store.save_ok(&id, 0, "o", r#"{"v":1}"#)?;
    store.save_ok(&id, 1, "o", r#"{"v":2}"#)?;
    for stale in [1, 0, 3, 7] {
        match store.save(&id, stale, "intruder", r#"{"v":"stale"}"#)? {
            SaveOutcome::Conflict { current: 2 } => {}
            other => {
                return Err(format!(
                    "a save with expected {stale} while the session is at 2 answered {other:?}, \
                     expected Conflict {{ current: 2 }}"
                ))
            }
        }
    }
    store.expect(&id, 2, "o", r#"{"v":2}"#)?;
    Ok("stale and future versions conflict with the current one and write nothing".into())
}

fn absent_save(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("absent_save", "s");
    for expected in [1, 5] {
        match store.save(&id, expected, "o", "{}")? {
            SaveOutcome::Conflict { current: 0 } => {}
            other => {
                return Err(format!(
                    "a save with expected {expected} on an absent session answered {other:?}, \
                     expected Conflict {{ current: 0 }}"
                ))
            }
        }
    }
    if let Some(session) = store.load(&id)? {
        return Err(format!(
            "a conflicting save created the session (version {})",
            session.version
        ));
    }
    Ok("saves with expected > 0 on an absent session conflict with current 0".into())
}

fn delete(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("delete", "s");
    let owner = run.owner("delete");
    store.save_ok(&id, 0, &owner, "{}")?;
    if !store.delete(&id)? {
        return Err("delete of an existing session answered false".into());
    }
    if store.delete(&id)? {
        return Err("a second delete answered true".into());
    }
    if let Some(session) = store.load(&id)? {
        return Err(format!(
            "the session loads after delete (version {})",
            session.version
        ));
    }
    let page = store.list(&owner, "", 10)?;
    if !page.ids.is_empty() {
        return Err(format!(
            "the owner still lists {:?} after delete",
            page.ids.iter().map(RString::as_str).collect::<Vec<_>>()
        ));
    }
    if store.delete(&run.id("delete", "never-saved"))? {
        return Err("delete of an id never saved answered true".into());
    }
    Ok("delete answers true, then false; the session is gone".into())
}

fn recreate_after_delete(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("recreate_after_delete", "s");
    store.save_ok(&id, 0, "o", r#"{"life":1}"#)?;
    store.save_ok(&id, 1, "o", r#"{"life":1,"more":true}"#)?;
    store.delete(&id)?;
    match store.save(&id, 2, "o", "{}")? {
        SaveOutcome::Conflict { current: 0 } => {}
        other => {
            return Err(format!(
                "after delete, a save with the old version answered {other:?}, \
                 expected Conflict {{ current: 0 }}"
            ))
        }
    }
    store.save_ok(&id, 0, "o2", r#"{"life":2}"#)?;
    store.expect(&id, 1, "o2", r#"{"life":2}"#)?;
    Ok("a deleted session can be created again at version 1".into())
}

/// Follows `next` from `after` until the end; checks the page rules on the way.
fn collect_pages(
    store: &Client<'_>,
    owner: &str,
    after: &str,
    limit: u32,
    stop_past: Option<&str>,
) -> Result<Vec<String>, String> {
    let mut ids: Vec<String> = Vec::new();
    let mut after = after.to_owned();
    for _ in 0..200 {
        let page = store.list(owner, &after, limit)?;
        if page.ids.len() > limit as usize {
            return Err(format!(
                "list with limit {limit} answered {} ids",
                page.ids.len()
            ));
        }
        for id in page.ids.iter().map(RString::as_str) {
            if id <= after.as_str() {
                return Err(format!(
                    "list after `{after}` answered `{id}`, which is not past it"
                ));
            }
            if let Some(last) = ids.last() {
                if id <= last.as_str() {
                    return Err(format!(
                        "ids are not strictly ascending: `{id}` came after `{last}`"
                    ));
                }
            }
            ids.push(id.to_owned());
        }
        let past = stop_past
            .is_some_and(|limit_id| ids.last().is_some_and(|last| last.as_str() > limit_id));
        match page.next.into_option() {
            Some(_) if past => return Ok(ids),
            Some(next) => {
                let next = next.into_string();
                if next.as_str() < after.as_str() {
                    return Err(format!(
                        "`next` went backwards: `{next}` after a page that started past `{after}`"
                    ));
                }
                if page.ids.is_empty() && next == after {
                    return Err(format!(
                        "an empty page answered `next` = `{next}`, the cursor it was given: \
                         paging would never end"
                    ));
                }
                after = next;
            }
            None => return Ok(ids),
        }
    }
    Err("paging did not end after 200 pages".into())
}

/// Makes the listing fixture: 7 sessions of owner A, 3 of owner B whose ids
/// fall between A's, saved out of order. Answers (A's ids, B's ids), sorted.
fn listing_fixture(
    run: &Run,
    check: &str,
    store: &Client<'_>,
    owner_a: &str,
    owner_b: &str,
) -> Result<(Vec<String>, Vec<String>), String> {
    let a: Vec<String> = (0..7).map(|n| run.id(check, &format!("{n:02}a"))).collect();
    let b: Vec<String> = [1, 3, 5]
        .iter()
        .map(|n| run.id(check, &format!("{n:02}b")))
        .collect();
    for i in [3usize, 0, 6, 1, 5, 2, 4] {
        store.save_ok(&a[i], 0, owner_a, "{}")?;
        if let Some(id) = b.get(i % 3) {
            if store.load(id)?.is_none() {
                store.save_ok(id, 0, owner_b, "{}")?;
            }
        }
    }
    Ok((a, b))
}

fn list_by_owner(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let owner_a = run.owner("list-a");
    let owner_b = run.owner("list-b");
    let (a, b) = listing_fixture(run, "list_by_owner", store, &owner_a, &owner_b)?;
    for limit in [3u32, 1, 7, 100] {
        let listed = collect_pages(store, &owner_a, "", limit, None)?;
        if listed != a {
            return Err(format!(
                "paging owner A with limit {limit} gave {listed:?}, expected {a:?}"
            ));
        }
    }
    let first = store.list(&owner_a, "", 3)?;
    if first.next.is_none() {
        return Err(format!(
            "a first page of {} of 7 ids answered no `next`",
            first.ids.len()
        ));
    }
    let listed = collect_pages(store, &owner_b, "", 2, None)?;
    if listed != b {
        return Err(format!("paging owner B gave {listed:?}, expected {b:?}"));
    }
    let nobody = store.list(&run.owner("list-nobody"), "", 10)?;
    if !nobody.ids.is_empty() || nobody.next.is_some() {
        return Err(format!(
            "an owner without sessions listed {:?} (next {:?})",
            nobody.ids, nobody.next
        ));
    }
    Ok("pages are ascending, honour the limit, continue at `next` and keep to the owner".into())
}

fn list_after(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let owner_a = run.owner("after-a");
    let owner_b = run.owner("after-b");
    let (a, _) = listing_fixture(run, "list_after", store, &owner_a, &owner_b)?;
    let listed = collect_pages(store, &owner_a, &a[2], 100, None)?;
    if listed != a[3..] {
        return Err(format!(
            "listing after `{}` gave {listed:?}, expected {:?}",
            a[2],
            &a[3..]
        ));
    }
    // `after` need not be an id that exists.
    let between = format!("{}~", a[4]);
    let listed = collect_pages(store, &owner_a, &between, 100, None)?;
    if listed != a[5..] {
        return Err(format!(
            "listing after `{between}` (not an id) gave {listed:?}, expected {:?}",
            &a[5..]
        ));
    }
    let listed = collect_pages(store, &owner_a, &a[6], 100, None)?;
    if !listed.is_empty() {
        return Err(format!(
            "listing after the last id gave {listed:?}, expected nothing"
        ));
    }
    Ok("`after` starts the listing past the given id".into())
}

fn list_all_owners(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let owner_a = run.owner("all-a");
    let owner_b = run.owner("all-b");
    let (a, b) = listing_fixture(run, "list_all_owners", store, &owner_a, &owner_b)?;
    let mut ours: Vec<String> = a.iter().chain(&b).cloned().collect();
    ours.sort();
    let prefix = run.prefix("list_all_owners");
    let last = ours.last().cloned().unwrap_or_default();
    // Other sessions of a shared store may surround ours: start just before
    // our prefix and stop once past our last id.
    let listed: Vec<String> = collect_pages(store, "", &prefix, 4, Some(&last))?
        .into_iter()
        .filter(|id| id.starts_with(&prefix))
        .collect();
    if listed != ours {
        return Err(format!(
            "listing every owner from `{prefix}` gave {listed:?}, expected {ours:?}"
        ));
    }
    Ok("an empty owner lists the sessions of every owner".into())
}

fn concurrent_create(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("concurrent_create", "s");
    let threads = 8;
    let barrier = Barrier::new(threads);
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|n| {
                let (barrier, id) = (&barrier, &id);
                scope.spawn(move || {
                    barrier.wait();
                    store.save(id, 0, &format!("t{n}"), &format!(r#"{{"by":{n}}}"#))
                })
            })
            .collect();
        join_all(handles)
    })?;
    let winners = exactly_one_winner(&outcomes, 0)?;
    store.expect(
        &id,
        1,
        &format!("t{winners}"),
        &format!(r#"{{"by":{winners}}}"#),
    )?;
    Ok(format!(
        "{threads} racing creates: one Saved, the rest Conflict"
    ))
}

fn concurrent_cas(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("concurrent_cas", "s");
    store.save_ok(&id, 0, "o", r#"{"by":"setup"}"#)?;
    let threads = 8;
    let barrier = Barrier::new(threads);
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|n| {
                let (barrier, id) = (&barrier, &id);
                scope.spawn(move || {
                    barrier.wait();
                    store.save(id, 1, "o", &format!(r#"{{"by":{n}}}"#))
                })
            })
            .collect();
        join_all(handles)
    })?;
    let winner = exactly_one_winner(&outcomes, 1)?;
    store.expect(&id, 2, "o", &format!(r#"{{"by":{winner}}}"#))?;
    Ok(format!(
        "{threads} racing saves at one version: one Saved, the rest Conflict"
    ))
}

fn join_all<T>(
    handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T, String>>>,
) -> Result<Vec<T>, String> {
    let mut results = Vec::new();
    for handle in handles {
        match handle.join() {
            Ok(result) => results.push(result?),
            Err(panic) => {
                return Err(format!(
                    "a thread panicked: {}",
                    panic_message(panic.as_ref())
                ))
            }
        }
    }
    Ok(results)
}

/// Checks that exactly one outcome is `Saved { expected + 1 }` and the others
/// `Conflict { expected + 1 }`; answers the winner's index.
fn exactly_one_winner(outcomes: &[SaveOutcome], expected: u64) -> Result<usize, String> {
    let winners: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, SaveOutcome::Saved { .. }))
        .map(|(n, _)| n)
        .collect();
    let [winner] = winners[..] else {
        return Err(format!(
            "{} of {} racing saves at version {expected} succeeded, expected exactly one: {outcomes:?}",
            winners.len(),
            outcomes.len()
        ));
    };
    for (n, outcome) in outcomes.iter().enumerate() {
        let wanted = if n == winner {
            SaveOutcome::Saved {
                version: expected + 1,
            }
        } else {
            SaveOutcome::Conflict {
                current: expected + 1,
            }
        };
        if *outcome != wanted {
            return Err(format!(
                "racing save {n} answered {outcome:?}, expected {wanted:?} (all: {outcomes:?})"
            ));
        }
    }
    Ok(winner)
}

fn concurrent_increments(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("concurrent_increments", "s");
    let (threads, increments) = (4usize, 10usize);
    let conflicts = increment_together(&[store], &id, threads, increments)?;
    Ok(format!(
        "{threads} threads x {increments} increments all applied once ({conflicts} conflicts retried)"
    ))
}

/// Why the `shared_*` checks skip a store in process.
const IN_PROCESS: &str = "the store is in process (its in_process() answers true): its adapters \
                          never share sessions and no other host can reach them, so there is no \
                          atomicity across adapters to check";

/// A second adapter of the store `store` belongs to, built from the same
/// settings: a second view of one backing store, as a second host has. None
/// for a store in process, whose adapters share nothing.
fn second_adapter(
    suite: &Suite<'_>,
    store: &Client<'_>,
) -> Result<Option<StoreAdapterBox>, String> {
    if store.0.in_process() {
        return Ok(None);
    }
    (suite.make)()
        .map(Some)
        .map_err(|err| format!("could not build a second adapter: {err}"))
}

/// Fails unless session `id`, saved at `version` through another adapter,
/// loads through `b` at that version: the adapters share one store.
fn sees_saves_of(b: &Client<'_>, id: &str, version: u64) -> Result<(), String> {
    match b.load(id)? {
        Some(session) if session.version == version => Ok(()),
        found => Err(format!(
            "a session saved at version {version} through one adapter loads as {} through \
             another built from the same settings: the two do not share one store, as two \
             hosts must (a store that keeps its sessions in this process's memory answers \
             in_process() = true)",
            match found {
                Some(session) => format!("version {}", session.version),
                None => "none".to_owned(),
            }
        )),
    }
}

fn shared_cas(suite: &Suite<'_>, a: &Client<'_>) -> Result<Found, String> {
    let Some(second) = second_adapter(suite, a)? else {
        return Ok(Found::Skip(IN_PROCESS.to_owned()));
    };
    let b = Client(&second);
    let id = suite.run.id("shared_cas", "s");
    a.save_ok(&id, 0, "o", r#"{"round":0}"#)?;
    sees_saves_of(&b, &id, 1)?;
    let rounds = 50u64;
    let barrier = Barrier::new(2);
    for round in 1..=rounds {
        let outcomes = std::thread::scope(|scope| {
            let handles: Vec<_> = [a, &b]
                .into_iter()
                .enumerate()
                .map(|(n, store)| {
                    let (barrier, id) = (&barrier, &id);
                    scope.spawn(move || {
                        barrier.wait();
                        store.save(id, round, "o", &format!(r#"{{"round":{round},"by":{n}}}"#))
                    })
                })
                .collect();
            join_all(handles)
        })?;
        let winner = exactly_one_winner(&outcomes, round).map_err(|problem| {
            format!("round {round} of two saves racing through two adapters: {problem}")
        })?;
        // The loser's adapter sees the winner's save.
        let loser = if winner == 0 { &b } else { a };
        loser.expect(
            &id,
            round + 1,
            "o",
            &format!(r#"{{"round":{round},"by":{winner}}}"#),
        )?;
    }
    Ok(Found::Pass(format!(
        "two adapters built from the same settings share one store; in {rounds} rounds of two \
         saves at one version racing through them, exactly one won each round"
    )))
}

fn shared_increments(suite: &Suite<'_>, a: &Client<'_>) -> Result<Found, String> {
    let Some(second) = second_adapter(suite, a)? else {
        return Ok(Found::Skip(IN_PROCESS.to_owned()));
    };
    let b = Client(&second);
    let probe = suite.run.id("shared_increments", "probe");
    a.save_ok(&probe, 0, "o", "{}")?;
    sees_saves_of(&b, &probe, 1)?;
    let id = suite.run.id("shared_increments", "s");
    let (threads, increments) = (2usize, 10usize);
    let conflicts = increment_together(&[a, &b], &id, threads, increments)?;
    Ok(Found::Pass(format!(
        "2 adapters x {threads} threads x {increments} increments all applied once \
         ({conflicts} conflicts retried)"
    )))
}

fn updated_at(run: &Run, store: &Client<'_>) -> Result<String, String> {
    let id = run.id("updated_at", "s");
    store.save_ok(&id, 0, "o", "{}")?;
    let session = store.load_some(&id)?;
    let now = now_ms();
    let tolerance = 10 * 60 * 1000;
    if session.updated_at_ms == 0 {
        return Err("updated_at_ms is 0".into());
    }
    if session.updated_at_ms.abs_diff(now) > tolerance {
        return Err(format!(
            "updated_at_ms is {} but this machine's clock says {now}: more than 10 minutes apart",
            session.updated_at_ms
        ));
    }
    Ok(format!(
        "updated_at_ms is set ({} ms from this machine's clock)",
        session.updated_at_ms.abs_diff(now)
    ))
}

fn ping(_run: &Run, store: &Client<'_>) -> Result<String, String> {
    store
        .0
        .ping()
        .into_result()
        .map(|()| "ping answers Ok".into())
        .map_err(|err| format!("ping failed: {err}"))
}

/// Why `expiry` is skipped without a TTL.
const NO_TTL: &str = "give ttl_secs in --settings to check expiry (StoreOptions::ttl in a test); \
                      1 or 2 keeps the wait short";

fn expiry(suite: &Suite<'_>, store: &Client<'_>) -> Result<Found, String> {
    let Some(ttl) = suite.options.ttl else {
        return Ok(Found::Skip(NO_TTL.to_owned()));
    };
    let secs = ttl.as_secs_f64();
    if ttl > MAX_CHECKED_TTL {
        return Ok(Found::Skip(format!(
            "ttl_secs is {secs}, and the check would wait that long plus 1 s: give ttl_secs of \
             at most {} in --settings (1 or 2 keeps the wait short) to check expiry",
            MAX_CHECKED_TTL.as_secs()
        )));
    }
    let run = &suite.run;
    let owner = run.owner("expiry");
    let [loaded, deleted, saved] = ["load", "delete", "save"].map(|part| run.id("expiry", part));
    for id in [&loaded, &deleted, &saved] {
        store.save_ok(id, 0, &owner, r#"{"life":1}"#)?;
    }
    store.save_ok(&saved, 1, &owner, r#"{"life":1,"more":true}"#)?;
    // From the last save on, nothing touches these sessions.
    let wait = ttl + Duration::from_secs(1);
    std::thread::sleep(wait);
    let idle = format!(
        "left alone for {:.1} s with ttl_secs {secs}",
        wait.as_secs_f64()
    );
    let page = store.list(&owner, "", 10)?;
    if !page.ids.is_empty() {
        return Err(format!(
            "sessions {idle} are still listed: {:?}",
            page.ids.iter().map(RString::as_str).collect::<Vec<_>>()
        ));
    }
    if let Some(session) = store.load(&loaded)? {
        return Err(format!(
            "a session {idle} still loads (version {})",
            session.version
        ));
    }
    if store.delete(&deleted)? {
        return Err(format!("delete of a session {idle} answered true"));
    }
    match store.save(&saved, 2, &owner, r#"{"life":"stale"}"#)? {
        SaveOutcome::Conflict { current: 0 } => {}
        other => {
            return Err(format!(
                "a save at its old version 2 of a session {idle} answered {other:?}, expected \
                 Conflict {{ current: 0 }}: an expired session is absent"
            ))
        }
    }
    store.save_ok(&saved, 0, &owner, r#"{"life":2}"#)?;
    store.expect(&saved, 1, &owner, r#"{"life":2}"#)?;
    // Gone for good: an expired session left in storage goes with a delete.
    if store.delete(&loaded)? {
        return Err(format!("delete of a session {idle} answered true"));
    }
    Ok(Found::Pass(format!(
        "sessions {idle} were absent to list, load and delete, and a save created one anew at \
         version 1"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_located() {
        let text = describe_difference("abcdef", "abXdef");
        assert!(text.contains("first difference at byte 2"), "{text}");
        let text = describe_difference("日本語", "日本");
        assert!(text.contains("6 bytes loaded"), "{text}");
    }

    #[test]
    fn the_tricky_document_is_json() {
        let doc = tricky_document();
        assert!(serde_json::from_str::<Value>(&doc).is_ok(), "{doc}");
    }
}
