//! `[models.NAME] isolation` and `[stores.NAME] isolation`: where a
//! backend's or a store's plugin runs. `"in_process"` (the default: in the
//! host's own process, the fast path) or `"process"` (in a child process of
//! its own, see [`crate::plugins::isolated`]), as a string or as a table
//! with the child's limits:
//! `isolation = { mode = "process", max_concurrent_turns = 64,
//! first_event_timeout_ms = 60000, memory_limit_mb = 2048 }`. A store takes
//! `mode` and `memory_limit_mb` only: `max_concurrent_turns` and
//! `first_event_timeout_ms` are about turns, which only a model runs (a
//! store's calls are bounded by `server.store_timeout_ms`).

use serde::{Deserialize, Serialize};

/// The key as written.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub(super) enum RawIsolation {
    Mode(String),
    Table(RawTable),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTable {
    mode: String,
    max_concurrent_turns: Option<u64>,
    first_event_timeout_ms: Option<u64>,
    memory_limit_mb: Option<u64>,
}

/// Where a backend's plugin runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Isolation {
    /// In the host's process.
    #[default]
    InProcess,
    /// In a child process of its own.
    Process(ProcessLimits),
}

impl Isolation {
    /// Whether the plugin runs in the host's process.
    pub fn is_in_process(&self) -> bool {
        *self == Isolation::InProcess
    }
}

/// The limits of a backend's child process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessLimits {
    /// Turns the child may run at once; past it a turn fails `unavailable`.
    pub max_concurrent_turns: u32,
    /// How long a turn may wait for its first event from the child; past it
    /// the child is killed (and restarted), as if it had crashed.
    pub first_event_timeout_ms: u64,
    /// The most address space the child may map, in MiB (`RLIMIT_AS`, set
    /// before it loads the library); `None`: no limit. An allocation past it
    /// fails, which ends the child (a Rust plugin aborts) as a crash.
    pub memory_limit_mb: Option<u64>,
}

impl Default for ProcessLimits {
    fn default() -> Self {
        Self {
            max_concurrent_turns: DEFAULT_MAX_TURNS,
            first_event_timeout_ms: DEFAULT_FIRST_EVENT_MS,
            memory_limit_mb: None,
        }
    }
}

/// Default `max_concurrent_turns`.
const DEFAULT_MAX_TURNS: u32 = 64;
/// Most `max_concurrent_turns`.
const MOST_TURNS: u64 = 4096;
/// Default `first_event_timeout_ms`: a minute.
const DEFAULT_FIRST_EVENT_MS: u64 = 60_000;
/// Most `first_event_timeout_ms`: an hour.
const MOST_FIRST_EVENT_MS: u64 = 3_600_000;
/// Least `memory_limit_mb`: the host's executable and the library must fit.
const LEAST_MEMORY_MB: u64 = 64;
/// Most `memory_limit_mb`: 1 TiB.
const MOST_MEMORY_MB: u64 = 1 << 20;

/// Keys of the table that apply to model backends only.
const MODEL_ONLY: [&str; 2] = ["max_concurrent_turns", "first_event_timeout_ms"];

/// Checks `isolation` of store `at` (`stores.NAME`), adding each problem
/// found: as [`isolation`], and the keys about turns are refused.
pub(super) fn store_isolation(
    at: &str,
    raw: RawIsolation,
    problems: &mut Vec<String>,
) -> Isolation {
    let raw = match raw {
        RawIsolation::Table(mut table) => {
            let given = [
                table.max_concurrent_turns.take().is_some(),
                table.first_event_timeout_ms.take().is_some(),
            ];
            for (key, given) in MODEL_ONLY.iter().zip(given) {
                if given {
                    problems.push(format!(
                        "{at}.isolation.{key}: applies to model backends only (a store runs \
                         no turns; its calls are bounded by server.store_timeout_ms): \
                         remove it"
                    ));
                }
            }
            RawIsolation::Table(table)
        }
        mode => mode,
    };
    isolation(at, raw, problems)
}

/// Checks `isolation` of `at` (`models.NAME`), adding each problem found.
pub(super) fn isolation(at: &str, raw: RawIsolation, problems: &mut Vec<String>) -> Isolation {
    let at = format!("{at}.isolation");
    let (mode, max_turns, first_event, memory) = match raw {
        RawIsolation::Mode(mode) => (mode, None, None, None),
        RawIsolation::Table(table) => (
            table.mode,
            table.max_concurrent_turns,
            table.first_event_timeout_ms,
            table.memory_limit_mb,
        ),
    };
    match mode.as_str() {
        "in_process" => {
            let given: Vec<&str> = [
                ("max_concurrent_turns", max_turns.is_some()),
                ("first_event_timeout_ms", first_event.is_some()),
                ("memory_limit_mb", memory.is_some()),
            ]
            .into_iter()
            .filter_map(|(key, given)| given.then_some(key))
            .collect();
            if !given.is_empty() {
                problems.push(format!(
                    "{at}: {} applies to mode \"process\" only (a plugin in the host's \
                     process shares the host's limits)",
                    given.join(", ")
                ));
            }
            Isolation::InProcess
        }
        "process" => {
            let mut limits = ProcessLimits::default();
            if let Some(max) = max_turns {
                match u32::try_from(max) {
                    Ok(max) if (1..=MOST_TURNS).contains(&u64::from(max)) => {
                        limits.max_concurrent_turns = max
                    }
                    _ => problems.push(format!(
                        "{at}.max_concurrent_turns: {max} is out of range (1-{MOST_TURNS})"
                    )),
                }
            }
            if let Some(ms) = first_event {
                if (100..=MOST_FIRST_EVENT_MS).contains(&ms) {
                    limits.first_event_timeout_ms = ms;
                } else {
                    problems.push(format!(
                        "{at}.first_event_timeout_ms: {ms} is out of range \
                         (100-{MOST_FIRST_EVENT_MS})"
                    ));
                }
            }
            if let Some(mb) = memory {
                if (LEAST_MEMORY_MB..=MOST_MEMORY_MB).contains(&mb) {
                    limits.memory_limit_mb = Some(mb);
                } else {
                    problems.push(format!(
                        "{at}.memory_limit_mb: {mb} is out of range \
                         ({LEAST_MEMORY_MB}-{MOST_MEMORY_MB})"
                    ));
                }
            }
            Isolation::Process(limits)
        }
        other => {
            problems.push(format!(
                "{at}: `{other}` is not a mode: \"in_process\" (the default) or \"process\""
            ));
            Isolation::InProcess
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> (Isolation, Vec<String>) {
        #[derive(Deserialize)]
        struct Entry {
            isolation: RawIsolation,
        }
        let raw: Entry = toml::from_str(text).expect("parses");
        let mut problems = Vec::new();
        let isolation = isolation("models.x", raw.isolation, &mut problems);
        (isolation, problems)
    }

    #[test]
    fn modes_and_limits_are_checked() {
        assert_eq!(check("isolation = \"in_process\"").0, Isolation::InProcess);
        assert_eq!(
            check("isolation = \"process\""),
            (Isolation::Process(ProcessLimits::default()), vec![])
        );
        let (isolation, problems) = check(
            "isolation = { mode = \"process\", max_concurrent_turns = 4, \
             first_event_timeout_ms = 2000 }",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            isolation,
            Isolation::Process(ProcessLimits {
                max_concurrent_turns: 4,
                first_event_timeout_ms: 2000,
                memory_limit_mb: None,
            })
        );
        let (_, problems) = check("isolation = \"processes\"");
        assert!(
            problems[0].contains("models.x.isolation: `processes`"),
            "{problems:?}"
        );
        let (_, problems) = check(
            "isolation = { mode = \"process\", max_concurrent_turns = 0, \
             first_event_timeout_ms = 5 }",
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        let (_, problems) =
            check("isolation = { mode = \"in_process\", max_concurrent_turns = 2 }");
        assert!(
            problems[0].contains("max_concurrent_turns applies to mode \"process\" only"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_store_takes_the_mode_and_the_memory_limit_only() {
        let store = |text: &str| {
            #[derive(Deserialize)]
            struct Entry {
                isolation: RawIsolation,
            }
            let raw: Entry = toml::from_str(text).expect("parses");
            let mut problems = Vec::new();
            let isolation = store_isolation("stores.s", raw.isolation, &mut problems);
            (isolation, problems)
        };
        assert_eq!(
            store("isolation = \"process\""),
            (Isolation::Process(ProcessLimits::default()), vec![])
        );
        let (isolation, problems) =
            store("isolation = { mode = \"process\", memory_limit_mb = 256 }");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            isolation,
            Isolation::Process(ProcessLimits {
                memory_limit_mb: Some(256),
                ..ProcessLimits::default()
            })
        );
        let (_, problems) = store(
            "isolation = { mode = \"process\", max_concurrent_turns = 4, \
             first_event_timeout_ms = 2000 }",
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "stores.s.isolation.max_concurrent_turns: applies to model backends only"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("stores.s.isolation.first_event_timeout_ms: applies"),
            "{problems:?}"
        );
        let (_, problems) = store("isolation = \"elsewhere\"");
        assert!(
            problems[0].contains("stores.s.isolation: `elsewhere`"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_memory_limit_needs_a_process() {
        let (isolation, problems) =
            check("isolation = { mode = \"process\", memory_limit_mb = 512 }");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            isolation,
            Isolation::Process(ProcessLimits {
                memory_limit_mb: Some(512),
                ..ProcessLimits::default()
            })
        );
        let (isolation, problems) =
            check("isolation = { mode = \"in_process\", memory_limit_mb = 512 }");
        assert_eq!(isolation, Isolation::InProcess);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("models.x.isolation: memory_limit_mb applies to mode"),
            "{problems:?}"
        );
        for mb in [0, 63, (1 << 20) + 1] {
            let (_, problems) = check(&format!(
                "isolation = {{ mode = \"process\", memory_limit_mb = {mb} }}"
            ));
            assert!(
                problems[0].contains(&format!("models.x.isolation.memory_limit_mb: {mb} is out")),
                "{problems:?}"
            );
        }
    }
}
