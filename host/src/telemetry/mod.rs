//! OpenTelemetry traces of turns, exported over OTLP/HTTP with JSON
//! encoding. Off unless config.toml has a `[telemetry]` table; then each
//! finished turn that is sampled becomes a span (`chat BACKEND`, with the
//! GenAI semantic conventions' attributes) with a child span for each of
//! its parts, built from the turn's [`Report`] after it ended: the turn core
//! knows nothing of traces, it only times its parts.
//!
//! A client may send a W3C `traceparent` (and `tracestate`): on a WebSocket
//! upgrade, every turn of that socket is a child of it; on
//! `POST /v1/chat/completions`, that request's turn. A malformed one is
//! ignored. Without one, each turn starts a trace of its own.
//!
//! The exporter is one process-wide value, swapped when a reload changes
//! `[telemetry]` ([`start`] watches for that). With no `[telemetry]` a
//! turn's record costs one atomic load, and the upgrade's headers are not
//! read.

mod context;
mod export;
mod span;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;

pub use context::Parent;

use crate::config::TelemetryConfig;
use crate::core::report::Report;
use crate::state::HostState;
use crate::web::access::TurnOf;

/// The exporter, when `[telemetry]` is configured.
static TRACER: ArcSwapOption<Tracer> = ArcSwapOption::const_empty();

/// Sends the spans of finished turns to one collector.
struct Tracer {
    config: TelemetryConfig,
    queue: Arc<export::Queue>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Tracer {
    /// Starts an exporter for `config` on the current runtime.
    fn start(config: TelemetryConfig, instance: &str) -> Self {
        let queue = Arc::new(export::Queue::new(config.max_queued_spans));
        let envelope = envelope(&config, instance);
        let task = tokio::spawn(export::run(queue.clone(), config.clone(), envelope));
        Tracer {
            config,
            queue,
            task: Mutex::new(Some(task)),
        }
    }

    /// Closes the queue and waits (at most the export timeout and a
    /// second) for what it held to be sent.
    async fn finish(&self) {
        self.queue.close();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let limit = Duration::from_millis(self.config.export_timeout_ms + 1_000);
            let _ = tokio::time::timeout(limit, task).await;
        }
    }
}

/// The request body around the spans: the resource (`service.name`,
/// `service.version`, `service.instance.id`) and the scope.
fn envelope(config: &TelemetryConfig, instance: &str) -> (String, &'static str) {
    let mut head = String::from("{\"resourceSpans\":[{\"resource\":{\"attributes\":");
    let mut attrs = span::Attrs::new(&mut head);
    attrs.str("service.name", &config.service_name);
    attrs.str("service.version", env!("CARGO_PKG_VERSION"));
    attrs.str("service.instance.id", instance);
    attrs.str("telemetry.sdk.name", "llm-host");
    attrs.str("telemetry.sdk.language", "rust");
    attrs.close();
    head.push_str("},\"scopeSpans\":[{\"scope\":{\"name\":\"llm-host\",\"version\":");
    span::json_str(&mut head, env!("CARGO_PKG_VERSION"));
    head.push_str("},\"spans\":[");
    (head, "]}]}]}")
}

/// Applies the host's `[telemetry]` now and again after every reload that
/// changes it, until the host stops. Call once, on the host's runtime.
pub fn start(host: &Arc<HostState>) {
    // Subscribed first: a reload while the exporter starts is not missed.
    let mut notices = host.reloader.notices.subscribe();
    apply(host);
    let host = Arc::downgrade(host);
    tokio::spawn(async move {
        // A lagging receiver has missed notices, not the active config.
        while !matches!(
            notices.recv().await,
            Err(tokio::sync::broadcast::error::RecvError::Closed)
        ) {
            let Some(host) = host.upgrade() else { return };
            apply(&host);
        }
    });
}

/// Starts, changes or stops the exporter to match the active config.
fn apply(host: &HostState) {
    let wanted = host.active.load().config.telemetry.clone();
    let current = TRACER.load_full();
    if current.as_ref().map(|tracer| &tracer.config) == wanted.as_ref() {
        return;
    }
    let next = wanted.map(|config| {
        tracing::info!(
            url = %config.traces_url(),
            service_name = %config.service_name,
            sample_ratio = config.sample_ratio,
            "telemetry: exporting turn spans over OTLP/HTTP"
        );
        Arc::new(Tracer::start(config, &host.instance))
    });
    if next.is_none() {
        tracing::info!("telemetry: off ([telemetry] removed)");
    }
    TRACER.store(next);
    if let Some(previous) = current {
        // Its queued spans still go to the collector it had.
        tokio::spawn(async move { previous.finish().await });
    }
}

/// Stops exporting, after sending what is queued (within the export
/// timeout). For the end of [`crate::serve`].
pub async fn stop() {
    if let Some(tracer) = TRACER.swap(None) {
        tracer.finish().await;
    }
}

/// The trace context a request's headers carry, when telemetry is on (off,
/// the headers are not read).
pub fn parent(headers: &hyper::HeaderMap) -> Option<Parent> {
    if TRACER.load().is_none() {
        return None;
    }
    Parent::from_headers(headers)
}

/// Queues the spans of a finished turn, when telemetry is on and the turn's
/// trace is sampled. Never waits.
pub fn record(of: &TurnOf<'_>, report: &Report) {
    let tracer = TRACER.load();
    let Some(tracer) = tracer.as_ref() else {
        return;
    };
    let (trace_id, sampled) = match of.parent {
        Some(parent) => (parent.trace_id, parent.sampled),
        None => {
            let id = context::trace_id();
            (id, context::sampled(&id, tracer.config.sample_ratio))
        }
    };
    if !sampled {
        return;
    }
    let ids = span::Ids {
        trace_id,
        parent: of.parent,
    };
    let mut spans = String::with_capacity(4096);
    let count = span::turn_spans(&mut spans, &ids, of, report, SystemTime::now());
    tracer.queue.push(spans, count);
}
