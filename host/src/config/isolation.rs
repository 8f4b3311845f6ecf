//! `[models.NAME] isolation`: where a backend's plugin runs. `"in_process"`
//! (the default: in the host's own process, the fast path) or `"process"`
//! (in a child process of its own, see [`crate::plugins::isolated`]), as a
//! string or as a table with the child's limits:
//! `isolation = { mode = "process", max_concurrent_turns = 64,
//! first_event_timeout_ms = 60000 }`.

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
}

impl Default for ProcessLimits {
    fn default() -> Self {
        Self {
            max_concurrent_turns: DEFAULT_MAX_TURNS,
            first_event_timeout_ms: DEFAULT_FIRST_EVENT_MS,
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

/// Checks `isolation` of `at` (`models.NAME`), adding each problem found.
pub(super) fn isolation(at: &str, raw: RawIsolation, problems: &mut Vec<String>) -> Isolation {
    let at = format!("{at}.isolation");
    let (mode, max_turns, first_event) = match raw {
        RawIsolation::Mode(mode) => (mode, None, None),
        RawIsolation::Table(table) => (
            table.mode,
            table.max_concurrent_turns,
            table.first_event_timeout_ms,
        ),
    };
    match mode.as_str() {
        "in_process" => {
            if max_turns.is_some() || first_event.is_some() {
                problems.push(format!(
                    "{at}: max_concurrent_turns and first_event_timeout_ms apply to \
                     mode \"process\" only"
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
            problems[0].contains("apply to mode \"process\" only"),
            "{problems:?}"
        );
    }
}
