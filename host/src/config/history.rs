//! `[models.NAME] history`: a backend's history policy as written, and its
//! checks (see [`crate::core::history`]).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::AdapterConfig;
use crate::core::history::{HistoryPolicy, Strategy};

/// `history = { max_messages, max_tokens, strategy, summarizer }`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHistory {
    max_messages: Option<u64>,
    max_tokens: Option<u64>,
    #[serde(default = "truncate")]
    strategy: Strategy,
    summarizer: Option<String>,
}

fn truncate() -> Strategy {
    Strategy::Truncate
}

/// The most messages or tokens a limit may name.
const MOST: u64 = 1 << 32;

/// Checks the history policy of `models.NAME` (`at`), adding each problem
/// to `problems`. The summarizer is checked against the backends by
/// [`check_summarizers`].
pub(super) fn policy(at: &str, raw: RawHistory, problems: &mut Vec<String>) -> HistoryPolicy {
    let at = format!("{at}.history");
    if raw.max_messages.is_none() && raw.max_tokens.is_none() {
        problems.push(format!(
            "{at}: give max_messages, max_tokens or both (a policy without a limit cuts nothing)"
        ));
    }
    let least = match raw.strategy {
        // The prompt, and the summary in place of what is cut.
        Strategy::Summarize => 2,
        Strategy::Truncate => 1,
    };
    if let Some(max) = raw.max_messages {
        if !(least..=MOST).contains(&max) {
            problems.push(format!(
                "{at}.max_messages: {max} is out of range ({least}-{MOST})"
            ));
        }
    }
    if let Some(max) = raw.max_tokens {
        if !(1..=MOST).contains(&max) {
            problems.push(format!("{at}.max_tokens: {max} is out of range (1-{MOST})"));
        }
    }
    match (raw.strategy, &raw.summarizer) {
        (Strategy::Summarize, None) => problems.push(format!(
            "{at}.summarizer: strategy \"summarize\" needs a summarizer (a [models.*] backend)"
        )),
        (Strategy::Truncate, Some(_)) => problems.push(format!(
            "{at}.summarizer: only strategy \"summarize\" takes a summarizer"
        )),
        _ => {}
    }
    HistoryPolicy {
        max_messages: raw
            .max_messages
            .map(|max| usize::try_from(max).unwrap_or(usize::MAX)),
        max_tokens: raw.max_tokens,
        strategy: raw.strategy,
        summarizer: raw.summarizer,
    }
}

/// Checks that every summarizer names a backend.
pub(super) fn check_summarizers(
    models: &BTreeMap<String, AdapterConfig>,
    problems: &mut Vec<String>,
) {
    for (name, model) in models {
        let summarizer = model.history.as_ref().and_then(|h| h.summarizer.as_ref());
        if let Some(summarizer) = summarizer.filter(|s| !models.contains_key(*s)) {
            problems.push(format!(
                "models.{name}.history.summarizer: `{summarizer}` is not a [models.*] entry \
                 (have: {})",
                super::names(models)
            ));
        }
    }
}
