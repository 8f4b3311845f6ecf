//! Sending spans to the collector: a bounded queue that turns add to
//! without waiting, and one task that posts what is queued as OTLP/JSON
//! (`POST /v1/traces`, `application/json`) over one kept HTTP/1.1
//! connection, every `flush_interval_ms` or as soon as a batch is full.
//!
//! Nothing here makes a turn wait: a span that finds the queue full is
//! dropped, and a batch the collector does not take (down, slow past
//! `export_timeout_ms`, an error status) is dropped; both are counted in
//! `llm_host_spans_dropped_total{reason}`. A warning is logged when spans
//! start being dropped, and a line when they are taken again: once per
//! change, not per span.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use crate::config::TelemetryConfig;
use crate::metrics::metrics;

/// Most spans sent in one request.
const BATCH_SPANS: usize = 512;

/// Spans waiting to be sent.
pub(super) struct Queue {
    pending: Mutex<Pending>,
    wake: Notify,
    max: usize,
}

#[derive(Default)]
struct Pending {
    /// Each turn's spans, as the comma-separated span objects and their count.
    turns: VecDeque<(String, usize)>,
    spans: usize,
    closed: bool,
    /// Whether spans were dropped for a full queue since an export last
    /// emptied it to half.
    full: bool,
}

impl Queue {
    /// A queue of at most `max` spans.
    pub(super) fn new(max: usize) -> Self {
        Queue {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a turn's `count` spans, or drops them (counted) when the
    /// queue has no room for them.
    pub(super) fn push(&self, spans: String, count: usize) {
        let mut pending = self.lock();
        if pending.closed {
            return;
        }
        if pending.spans + count > self.max {
            let first = !std::mem::replace(&mut pending.full, true);
            drop(pending);
            dropped("queue_full", count);
            if first {
                tracing::warn!(
                    max_queued_spans = self.max,
                    "telemetry: the span queue is full (the collector takes spans slower than \
                     turns make them); new spans are dropped until it has room"
                );
            }
            return;
        }
        pending.turns.push_back((spans, count));
        pending.spans += count;
        let batch_ready = pending.spans >= BATCH_SPANS;
        drop(pending);
        if batch_ready {
            self.wake.notify_one();
        }
    }

    /// Takes queued turns' spans, at most [`BATCH_SPANS`] (but at least one
    /// turn's), joined by commas.
    fn take(&self) -> Option<(String, usize)> {
        let mut pending = self.lock();
        let (mut batch, mut count) = pending.turns.pop_front()?;
        while let Some((_, next)) = pending.turns.front() {
            if count + next > BATCH_SPANS {
                break;
            }
            let Some((spans, next)) = pending.turns.pop_front() else {
                break;
            };
            batch.push(',');
            batch.push_str(&spans);
            count += next;
        }
        pending.spans -= count;
        Some((batch, count))
    }

    /// After an export the collector took: a queue that was full and is
    /// now at most half full takes spans again (logged once).
    fn taken(&self) {
        let mut pending = self.lock();
        if pending.full && pending.spans <= self.max / 2 {
            pending.full = false;
            drop(pending);
            tracing::info!("telemetry: the span queue has room again");
        }
    }

    /// Stops taking spans; the exporter sends what is queued and ends.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    fn closed(&self) -> bool {
        self.lock().closed
    }
}

fn dropped(reason: &'static str, count: usize) {
    metrics()
        .spans_dropped
        .get_or_create(&[("reason", reason)])
        .inc_by(count as u64);
}

/// The exporter's task: sends queued spans until the queue is closed and
/// empty. `envelope` is the request body around the spans: the text before
/// them and after them.
pub(super) async fn run(
    queue: Arc<Queue>,
    config: TelemetryConfig,
    envelope: (String, &'static str),
) {
    let mut collector = Collector::new(&config);
    let flush = Duration::from_millis(config.flush_interval_ms);
    let timeout = Duration::from_millis(config.export_timeout_ms);
    let mut healthy = true;
    loop {
        let closed = queue.closed();
        if !closed {
            tokio::select! {
                () = tokio::time::sleep(flush) => {}
                () = queue.wake.notified() => {}
            }
        }
        while let Some((spans, count)) = queue.take() {
            let mut body = String::with_capacity(envelope.0.len() + spans.len() + 16);
            body.push_str(&envelope.0);
            body.push_str(&spans);
            body.push_str(envelope.1);
            drop(spans);
            let sent = tokio::time::timeout(timeout, collector.post(Bytes::from(body)))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no answer within {} ms (telemetry.export_timeout_ms)",
                        config.export_timeout_ms
                    ))
                });
            match sent {
                Ok(()) => {
                    metrics().spans_exported.inc_by(count as u64);
                    queue.taken();
                    if !healthy {
                        healthy = true;
                        tracing::info!(
                            url = %collector.url,
                            "telemetry: the collector takes spans again"
                        );
                    }
                }
                Err(err) => {
                    // A connection in an unknown state is not used again.
                    collector.disconnect();
                    dropped("export_failed", count);
                    if healthy {
                        healthy = false;
                        tracing::warn!(
                            url = %collector.url,
                            error = %err,
                            "telemetry: cannot export spans; they are dropped until the \
                             collector takes them"
                        );
                    }
                }
            }
        }
        if closed {
            return;
        }
    }
}

/// The collector's `/v1/traces`, and the connection to it.
struct Collector {
    url: String,
    /// `HOST:PORT` to connect to.
    address: String,
    /// The `Host` header.
    authority: HeaderValue,
    path: String,
    headers: HeaderMap,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// The task driving the connection, ended when it is given up (a
    /// collector that never answers would keep it otherwise).
    connection: Option<tokio::task::AbortHandle>,
}

impl Collector {
    fn new(config: &TelemetryConfig) -> Self {
        let url = config.traces_url();
        // Checked when the config was read.
        let uri: hyper::Uri = url.parse().unwrap_or_default();
        let host = uri.host().unwrap_or("127.0.0.1");
        let port = uri.port_u16().unwrap_or(80);
        let address = format!(
            "{}:{port}",
            host.trim_start_matches('[').trim_end_matches(']')
        );
        let authority = uri
            .authority()
            .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
            .unwrap_or_else(|| HeaderValue::from_static("localhost"));
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        Collector {
            address,
            authority,
            path: uri.path().to_owned(),
            headers,
            sender: None,
            connection: None,
            url,
        }
    }

    /// Drops the connection.
    fn disconnect(&mut self) {
        self.sender = None;
        if let Some(connection) = self.connection.take() {
            connection.abort();
        }
    }

    /// Posts one request body; Err says why it was not taken.
    async fn post(&mut self, body: Bytes) -> Result<(), String> {
        let mut sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                self.disconnect();
                self.connect().await?
            }
        };
        sender
            .ready()
            .await
            .map_err(|err| format!("the connection failed: {err}"))?;
        let mut request = hyper::Request::post(self.path.as_str())
            .header(HOST, self.authority.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .map_err(|err| err.to_string())?;
        request.headers_mut().extend(self.headers.clone());
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| format!("the request failed: {err}"))?;
        let status = response.status();
        // Read to its end, so that the connection can be used again.
        let answer = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("the answer failed: {err}"))?
            .to_bytes();
        self.sender = Some(sender);
        if status.is_success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
        Err(format!("the collector answered {status}: {text}"))
    }

    async fn connect(&mut self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|err| format!("cannot connect to {}: {err}", self.address))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| format!("cannot talk HTTP to {}: {err}", self.address))?;
        let task = tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "telemetry: collector connection ended");
            }
        });
        self.connection = Some(task.abort_handle());
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_and_batches() {
        let queue = Queue::new(600);
        for _ in 0..150 {
            queue.push("{}".to_owned(), 4);
        }
        // 600 spans queued; the next turn's are dropped.
        let before = metrics()
            .spans_dropped
            .get_or_create(&[("reason", "queue_full")])
            .get();
        queue.push("{}".to_owned(), 4);
        let after = metrics()
            .spans_dropped
            .get_or_create(&[("reason", "queue_full")])
            .get();
        assert!(after >= before + 4);
        let (batch, count) = queue.take().expect("a batch");
        assert_eq!(count, BATCH_SPANS);
        assert_eq!(batch.matches("{}").count(), BATCH_SPANS / 4);
        let (_, count) = queue.take().expect("the rest");
        assert_eq!(count, 600 - BATCH_SPANS);
        assert!(queue.take().is_none());
    }
}
