//! The access log, the metrics by backend and the turn's trace spans: one
//! record per finished turn, whichever door it came in by (a session
//! socket, the OpenAI-compatible HTTP API).

use std::net::SocketAddr;
use std::time::Duration;

use crate::core::turn::Report;
use crate::metrics::metrics;

/// Who a finished turn was for.
pub struct TurnOf<'a> {
    /// The door: `websocket` or `openai`.
    pub api: &'static str,
    /// The API key's id (`anonymous` in open mode).
    pub key: &'a str,
    /// The client's address.
    pub client: Option<SocketAddr>,
    /// The session (empty for an HTTP request without one).
    pub session: &'a str,
    /// The HTTP request's id, for a turn that was one.
    pub request: Option<&'a str>,
    /// The backend that ran it.
    pub backend: &'a str,
    /// The plugin that provides the backend.
    pub plugin: &'a str,
    /// The store the session lives in (none for a turn without a session).
    pub store: Option<&'a str>,
    /// The trace the client's request named (its `traceparent`), if any.
    pub parent: Option<&'a crate::telemetry::Parent>,
}

/// Records a finished turn: one line with target `llm_host::access` (so
/// `RUST_LOG=llm_host::access=info` keeps it alone; JSON fields with
/// `LLM_HOST_LOG_FORMAT=json`), and the turn and its tokens in the metrics
/// by backend, its usage by key ([`crate::usage`]), and (with
/// `[telemetry]`) its spans for the collector.
pub fn record_turn(of: &TurnOf<'_>, report: &Report) {
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let usage = report.usage.unwrap_or_default();
    tracing::info!(
        target: "llm_host::access",
        api = of.api,
        key = of.key,
        client = of.client.map(tracing::field::display),
        session = %of.session,
        request = of.request,
        backend = of.backend,
        turn = %report.interaction_id,
        status = report.status.as_str(),
        code = report.code.as_deref().unwrap_or(""),
        duration_ms = millis(report.duration),
        first_token_ms = report.first_token.map(millis),
        input_tokens = usage.input_tokens,
        output_tokens = usage.output_tokens,
        "turn"
    );
    metrics().turn_of(
        of.key,
        of.backend,
        report.status.as_str(),
        report.code.as_deref(),
        report.usage,
    );
    crate::telemetry::record(of, report);
    let failed = report.status == crate::core::sink::Status::Failed;
    crate::usage::pending().record(
        of.key,
        of.backend,
        crate::usage::Counts {
            turns: 1,
            failed_turns: u64::from(failed),
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        },
        crate::protocol::now_ms(),
    );
}
