//! `[telemetry]`: OpenTelemetry traces of turns, exported over OTLP/HTTP.
//! Off unless the table is there; then `otlp_endpoint` is required.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Deserialize, Debug)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawTelemetry {
    otlp_endpoint: Option<String>,
    service_name: String,
    sample_ratio: f64,
    export_timeout_ms: u64,
    flush_interval_ms: u64,
    max_queued_spans: usize,
    headers: BTreeMap<String, String>,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "llm-host".to_owned(),
            sample_ratio: 1.0,
            export_timeout_ms: 10_000,
            flush_interval_ms: 5_000,
            max_queued_spans: 2_048,
            headers: BTreeMap::new(),
        }
    }
}

/// `[telemetry]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (`http://HOST:PORT[/PREFIX]`);
    /// spans go to `/v1/traces` under it.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// The share of new traces recorded (0.0-1.0); a turn whose client sent
    /// a `traceparent` follows that header's sampled flag instead.
    pub sample_ratio: f64,
    /// The longest one export request may take (connecting included).
    pub export_timeout_ms: u64,
    /// How often queued spans are sent (sooner when a batch is full).
    pub flush_interval_ms: u64,
    /// Most spans waiting to be sent; past it new spans are dropped (and
    /// counted in `llm_host_spans_dropped_total`).
    pub max_queued_spans: usize,
    /// Headers sent with every export (a collector's `authorization`).
    pub headers: BTreeMap<String, String>,
}

impl TelemetryConfig {
    /// The URL spans are posted to: the endpoint's path with `/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.otlp_endpoint.trim_end_matches('/'))
    }
}

/// Headers the exporter sets itself.
const OWN_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
];

/// Checks `[telemetry]` as written, adding each problem to `problems`.
pub(super) fn telemetry(raw: RawTelemetry, problems: &mut Vec<String>) -> TelemetryConfig {
    let endpoint = match raw.otlp_endpoint {
        Some(endpoint) => {
            if let Err(why) = check_endpoint(&endpoint) {
                problems.push(format!("telemetry.otlp_endpoint: `{endpoint}` {why}"));
            }
            endpoint
        }
        None => {
            problems.push(
                "telemetry.otlp_endpoint: required, the collector's OTLP/HTTP address (like \
                 http://127.0.0.1:4318); remove [telemetry] to export no traces"
                    .to_owned(),
            );
            String::new()
        }
    };
    let name = raw.service_name.trim();
    if name.is_empty() || name.len() > 256 {
        problems.push("telemetry.service_name: must be 1-256 characters".to_owned());
    }
    if !(0.0..=1.0).contains(&raw.sample_ratio) {
        problems.push(format!(
            "telemetry.sample_ratio: {} is out of range (0.0-1.0)",
            raw.sample_ratio
        ));
    }
    for (key, value, range) in [
        ("export_timeout_ms", raw.export_timeout_ms, 10..=600_000),
        ("flush_interval_ms", raw.flush_interval_ms, 10..=600_000),
        (
            "max_queued_spans",
            raw.max_queued_spans as u64,
            1..=1_000_000,
        ),
    ] {
        if !range.contains(&value) {
            problems.push(format!(
                "telemetry.{key}: {value} is out of range ({}-{})",
                range.start(),
                range.end()
            ));
        }
    }
    let mut headers = BTreeMap::new();
    for (name, value) in raw.headers {
        let lower = name.to_ascii_lowercase();
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.push(format!(
                "telemetry.headers: `{name}` is not an HTTP header name"
            ));
        } else if OWN_HEADERS.contains(&lower.as_str()) {
            problems.push(format!(
                "telemetry.headers: `{name}` is set by the exporter itself"
            ));
        } else if hyper::header::HeaderValue::from_str(&value).is_err() {
            // The value is not shown: it may be a secret.
            problems.push(format!(
                "telemetry.headers.{name}: the value is not a valid HTTP header value \
                 (visible ASCII, no line breaks)"
            ));
        }
        headers.insert(lower, value);
    }
    TelemetryConfig {
        otlp_endpoint: endpoint,
        service_name: name.to_owned(),
        sample_ratio: raw.sample_ratio,
        export_timeout_ms: raw.export_timeout_ms,
        flush_interval_ms: raw.flush_interval_ms,
        max_queued_spans: raw.max_queued_spans,
        headers,
    }
}

/// Why `endpoint` is not a collector address the exporter can post to.
fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let uri: hyper::Uri = endpoint
        .parse()
        .map_err(|_| "is not a URL like http://127.0.0.1:4318")?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "uses https, which the exporter does not speak: point it at a collector over \
                 plain http (an OpenTelemetry Collector on this machine or beside the host, \
                 which may forward over TLS)",
            )
        }
        _ => return Err("is not an http:// URL like http://127.0.0.1:4318"),
    }
    let authority = uri.authority().ok_or("names no host")?;
    if authority.as_str().contains('@') {
        return Err("has credentials in the URL: give them in telemetry.headers");
    }
    if authority.host().is_empty() {
        return Err("names no host");
    }
    if uri.query().is_some() || endpoint.contains('#') {
        return Err("has a query or fragment: give the collector's base URL");
    }
    Ok(())
}
