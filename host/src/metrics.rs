//! Prometheus metrics, served at `GET /metrics`.
//!
//! One registry per process (a host is one process), reached through
//! [`metrics()`]; updates are atomic increments, cheap enough for every event.

use std::sync::LazyLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A single `name="value"` label.
pub type Label = [(&'static str, &'static str); 1];

type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

/// Histograms by a `backend` label.
type BackendHistograms = Family<[(&'static str, String); 1], Histogram, fn() -> Histogram>;

/// `backend`, `status` and `code` labels of a turn.
pub type TurnLabels = [(&'static str, String); 3];

/// The error codes a turn is labelled with; any other (a plugin's own) is
/// counted as `other`, so the label set stays bounded.
const TURN_CODES: &[&str] = &[
    "",
    "auth",
    "not_found",
    "rate_limited",
    "upstream_error",
    "bad_response",
    "connection",
    "interrupted",
    "timeout",
    "invalid_request",
    "plugin_panic",
    "invalid_input",
    "unavailable",
    "internal",
    "model_error",
    "turn_timeout",
    "lease_lost",
    "session_deleted",
    "turn_too_long",
    "session_not_found",
    "history_full",
    "store_unavailable",
    "plugin_crashed",
];

/// Every metric the host keeps.
pub struct Metrics {
    registry: Registry,
    /// WebSocket connections open now.
    pub connections: Gauge,
    /// WebSocket connections accepted.
    pub connections_total: Counter,
    /// Turns ended, by `status`.
    pub turns: Family<Label, Counter>,
    /// Turns ended, by `backend`, `status` and error `code`.
    pub backend_turns: Family<TurnLabels, Counter>,
    /// Tokens by `backend` and `kind`.
    pub backend_tokens: Family<[(&'static str, String); 2], Counter>,
    /// Turns by API `key`, `backend` and `status`, with
    /// `server.metrics_by_key` only (see [`Metrics::by_key`]).
    pub key_turns: Family<TurnLabels, Counter>,
    /// Tokens by API `key` and `kind`, with `server.metrics_by_key` only.
    pub key_tokens: Family<[(&'static str, String); 2], Counter>,
    /// Whether turns are also counted by key (`server.metrics_by_key`): key
    /// ids are labels only where the operator opts in.
    pub by_key: std::sync::atomic::AtomicBool,
    /// Model events sent to clients.
    pub events: Counter,
    /// Tokens reported by backends, by `kind` (`input`, `output`).
    pub tokens: Family<Label, Counter>,
    /// Turn latency, from its start to its end frame.
    pub turn_seconds: Histogram,
    /// Time from a turn's start to its first model event.
    pub first_event_seconds: Histogram,
    /// Time from a turn's start to its first output: text, reasoning or a
    /// tool call (the time to first token).
    pub first_token_seconds: Histogram,
    /// Plugin libraries loaded.
    pub plugin_loads: Counter,
    /// Plugin libraries refused, by `reason` (the loader's first word).
    pub plugin_failures: Counter,
    /// Reloads, by `result` (`applied`, `unchanged`, `failed`).
    pub reloads: Family<Label, Counter>,
    /// Store call latency, by `op`.
    pub store_seconds: HistogramFamily,
    /// Store calls that failed, by `op`.
    pub store_errors: Family<Label, Counter>,
    /// Requests and prompts refused by a limit or by authentication, by `reason`.
    pub refused: Family<Label, Counter>,
    /// Trace spans the collector took.
    pub spans_exported: Counter,
    /// Trace spans dropped, by `reason` (`queue_full`, `export_failed`).
    pub spans_dropped: Family<Label, Counter>,
    /// Plugin child processes that died, by `backend`.
    pub plugin_crashes: Family<[(&'static str, String); 1], Counter>,
    /// Plugin child processes started again after one died, by `backend`.
    pub plugin_restarts: Family<[(&'static str, String); 1], Counter>,
    /// Time of each turn's call in a plugin child process, from sending its
    /// request to its end, by `backend`.
    pub plugin_call_seconds: BackendHistograms,
    /// Prompts waiting behind a running turn, by the `backend` they would
    /// run on (the queue depth per backend).
    pub queued_prompts: Family<[(&'static str, String); 1], Gauge>,
}

fn latency_histogram() -> Histogram {
    // 100 us .. ~14 min: past the default turn timeout (600 s).
    Histogram::new(exponential_buckets(0.0001, 2.0, 24))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("llm_host");
        let metrics = Metrics {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            turns: Family::default(),
            backend_turns: Family::default(),
            backend_tokens: Family::default(),
            key_turns: Family::default(),
            key_tokens: Family::default(),
            by_key: std::sync::atomic::AtomicBool::new(false),
            events: Counter::default(),
            tokens: Family::default(),
            turn_seconds: latency_histogram(),
            first_event_seconds: latency_histogram(),
            first_token_seconds: latency_histogram(),
            plugin_loads: Counter::default(),
            plugin_failures: Counter::default(),
            reloads: Family::default(),
            store_seconds: Family::new_with_constructor(latency_histogram),
            store_errors: Family::default(),
            refused: Family::default(),
            spans_exported: Counter::default(),
            spans_dropped: Family::default(),
            plugin_crashes: Family::default(),
            plugin_restarts: Family::default(),
            plugin_call_seconds: Family::new_with_constructor(latency_histogram),
            queued_prompts: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "WebSocket connections open now",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "WebSocket connections accepted",
            metrics.connections_total.clone(),
        );
        registry.register("turns", "Turns ended, by status", metrics.turns.clone());
        registry.register(
            "backend_turns",
            "Turns ended, by backend, status and error code",
            metrics.backend_turns.clone(),
        );
        registry.register(
            "backend_tokens",
            "Tokens reported by backends, by backend and kind",
            metrics.backend_tokens.clone(),
        );
        registry.register(
            "events",
            "Model events sent to clients",
            metrics.events.clone(),
        );
        registry.register(
            "tokens",
            "Tokens reported by backends, by kind",
            metrics.tokens.clone(),
        );
        registry.register(
            "turn_duration_seconds",
            "Turn latency, from its start to its end frame",
            metrics.turn_seconds.clone(),
        );
        registry.register(
            "time_to_first_event_seconds",
            "Time from a turn's start to its first model event",
            metrics.first_event_seconds.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from a turn's start to its first text, reasoning or tool call",
            metrics.first_token_seconds.clone(),
        );
        registry.register(
            "plugin_loads",
            "Plugin libraries loaded",
            metrics.plugin_loads.clone(),
        );
        registry.register(
            "plugin_load_failures",
            "Plugin libraries that failed to load",
            metrics.plugin_failures.clone(),
        );
        registry.register("reloads", "Reloads, by result", metrics.reloads.clone());
        registry.register(
            "store_operation_seconds",
            "Store call latency, by operation",
            metrics.store_seconds.clone(),
        );
        registry.register(
            "store_errors",
            "Store calls that failed, by operation",
            metrics.store_errors.clone(),
        );
        registry.register(
            "refused",
            "Requests and prompts refused by a limit or authentication, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "spans_exported",
            "Trace spans the OTLP collector took",
            metrics.spans_exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Trace spans dropped (queue full, export failed), by reason",
            metrics.spans_dropped.clone(),
        );
        registry.register(
            "key_turns",
            "Turns by API key, backend and status (server.metrics_by_key)",
            metrics.key_turns.clone(),
        );
        registry.register(
            "key_tokens",
            "Tokens by API key and kind (server.metrics_by_key)",
            metrics.key_tokens.clone(),
        );
        registry.register(
            "plugin_crashes",
            "Plugin child processes (isolation = \"process\") that died, by backend",
            metrics.plugin_crashes.clone(),
        );
        registry.register(
            "plugin_restarts",
            "Plugin child processes started again after one died, by backend",
            metrics.plugin_restarts.clone(),
        );
        registry.register(
            "plugin_call_seconds",
            "Time of a turn's call in a plugin child process, from its request to its end, \
             by backend",
            metrics.plugin_call_seconds.clone(),
        );
        registry.register(
            "queued_prompts",
            "Prompts waiting behind a running turn, by the backend they would run on",
            metrics.queued_prompts.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// Counts a finished turn of `backend` for API key `key` (by key only
    /// with `server.metrics_by_key`).
    pub fn turn_of(
        &self,
        key: &str,
        backend: &str,
        status: &'static str,
        code: Option<&str>,
        usage: Option<llm_host_plugin_api::Usage>,
    ) {
        let code = code.unwrap_or("");
        let code = if TURN_CODES.contains(&code) {
            code
        } else {
            "other"
        };
        self.backend_turns
            .get_or_create(&[
                ("backend", backend.to_owned()),
                ("status", status.to_owned()),
                ("code", code.to_owned()),
            ])
            .inc();
        let by_key = self.by_key.load(std::sync::atomic::Ordering::Relaxed);
        if by_key {
            self.key_turns
                .get_or_create(&[
                    ("key", key.to_owned()),
                    ("backend", backend.to_owned()),
                    ("status", status.to_owned()),
                ])
                .inc();
        }
        if let Some(usage) = usage {
            for (kind, count) in [
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
            ] {
                self.backend_tokens
                    .get_or_create(&[("backend", backend.to_owned()), ("kind", kind.to_owned())])
                    .inc_by(count);
                if by_key {
                    self.key_tokens
                        .get_or_create(&[("key", key.to_owned()), ("kind", kind.to_owned())])
                        .inc_by(count);
                }
            }
        }
    }

    /// Counts the death of `backend`'s child process.
    pub fn plugin_crash(&self, backend: &str) {
        self.plugin_crashes
            .get_or_create(&[("backend", backend.to_owned())])
            .inc();
    }

    /// Counts a new child process of `backend` after one died.
    pub fn plugin_restart(&self, backend: &str) {
        self.plugin_restarts
            .get_or_create(&[("backend", backend.to_owned())])
            .inc();
    }

    /// Observes a turn's call of `took` in `backend`'s child process.
    pub fn plugin_call(&self, backend: &str, took: std::time::Duration) {
        self.plugin_call_seconds
            .get_or_create(&[("backend", backend.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// Counts a prompt waiting for `backend` until the answer is dropped.
    pub fn queued(&self, backend: &str) -> Queued {
        let gauge = self
            .queued_prompts
            .get_or_create(&[("backend", backend.to_owned())])
            .clone();
        gauge.inc();
        Queued(gauge)
    }

    /// Counts a refusal.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }
}

/// A prompt counted in [`Metrics::queued_prompts`] while this lives.
pub struct Queued(Gauge);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.dec();
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = metrics();
        m.turns.get_or_create(&[("status", "completed")]).inc();
        m.store_seconds
            .get_or_create(&[("op", "load")])
            .observe(0.002);
        let text = m.render();
        assert!(
            text.contains("llm_host_turns_total{status=\"completed\"}"),
            "{text}"
        );
        assert!(
            text.contains("llm_host_store_operation_seconds_bucket{"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
