//! What became of a turn ([`Report`]): how it ended, its tokens, and when
//! each of its parts ran, for the access log, the metrics and traces. Plain
//! values only: the core knows no log or trace format.

use std::time::{Duration, Instant};

use super::sink::{Status, TurnSink};

/// What became of a turn: for the access log and the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// How it ended.
    pub status: Status,
    /// Its id (`turn-N`).
    pub interaction_id: String,
    /// The code it failed with (the model's error event, or the host's
    /// diagnostic when the turn did not run or was not saved).
    pub code: Option<String>,
    /// The tokens the model reported.
    pub usage: Option<llm_host_plugin_api::Usage>,
    /// How long after the turn started its first output came.
    pub first_token: Option<Duration>,
    /// From the prompt's turn starting to its end frame.
    pub duration: Duration,
    /// Why the model's generation ended (`stop`, `length`, `tool-calls`,
    /// `cancelled`), when its end event went out.
    pub finish_reason: Option<&'static str>,
    /// The claim of the session (its load, and on a shared store the save
    /// of the prompt with a lease); none when the turn had no session or
    /// did not get that far.
    pub claim: Option<Phase>,
    /// The model's run; none when the turn did not get that far.
    pub model: Option<Phase>,
    /// The save of the answer; none when the turn had no session or did
    /// not get that far.
    pub commit: Option<Phase>,
}

/// When one part of a turn ran, for the turn's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// How long after the turn started it began.
    pub start: Duration,
    /// How long it took.
    pub duration: Duration,
    /// Whether it did its part (a claim or save that failed, a model run
    /// that ended in an error: false).
    pub ok: bool,
}

impl Phase {
    /// The part that began `began` after the turn started at `started`,
    /// ending now.
    pub(super) fn until_now(started: Instant, began: Duration, ok: bool) -> Self {
        Phase {
            start: began,
            duration: started.elapsed().saturating_sub(began),
            ok,
        }
    }
}

impl Report {
    pub(super) fn new(
        status: Status,
        interaction_id: String,
        code: Option<&str>,
        started: Instant,
    ) -> Self {
        Report {
            status,
            interaction_id,
            code: code.map(str::to_owned),
            usage: None,
            first_token: None,
            duration: started.elapsed(),
            finish_reason: None,
            claim: None,
            model: None,
            commit: None,
        }
    }

    /// Takes what the model's sink kept of the run.
    pub(super) fn took(&mut self, sink: &mut TurnSink) {
        self.usage = sink.usage;
        self.first_token = sink.first_output;
        self.code = sink.error_code.take();
        self.finish_reason = sink.finish_reason;
    }
}
