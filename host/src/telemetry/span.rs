//! A finished turn as OTLP spans, in OTLP/JSON (the protobuf JSON mapping:
//! ids as hex, 64-bit numbers as strings, enums as numbers): the turn's
//! span with the GenAI semantic conventions' attributes, and a child span
//! for each of its parts (the session's claim, the model's run, the save).

use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::context::{self, to_hex, Parent};
use crate::core::report::{Phase, Report};
use crate::core::sink::Status;
use crate::web::access::TurnOf;

/// `SPAN_KIND_INTERNAL`.
const INTERNAL: u8 = 1;
/// `SPAN_KIND_SERVER`.
const SERVER: u8 = 2;
/// `STATUS_CODE_ERROR`.
const ERROR: u8 = 2;

/// What a turn's spans are written from.
pub(super) struct Ids<'a> {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The span the turn's span is a child of (the client's), if any.
    pub parent: Option<&'a Parent>,
}

/// Writes the spans of the turn `of`/`report`, ended `now`, into `out`
/// (span objects separated by commas); answers how many it wrote.
pub(super) fn turn_spans(
    out: &mut String,
    ids: &Ids<'_>,
    of: &TurnOf<'_>,
    report: &Report,
    now: SystemTime,
) -> usize {
    let end = nanos(now);
    let start = end.saturating_sub(nanos_of(report.duration));
    let turn_id = context::span_id();
    let failed = report.status == Status::Failed;
    let error = failed.then(|| report.code.as_deref().unwrap_or("_OTHER"));
    let mut span = Span {
        out,
        trace_id: &ids.trace_id,
        span_id: turn_id,
        parent: ids.parent.map(|parent| parent.span_id),
        state: ids.parent.and_then(|parent| parent.state.as_deref()),
    };
    let kind = if of.api == "openai" { SERVER } else { INTERNAL };
    span.open(&format_args!("chat {}", of.backend), kind, start, end);
    let mut attrs = span.attributes();
    attrs.str("gen_ai.operation.name", "chat");
    attrs.str("gen_ai.provider.name", of.plugin);
    attrs.str("gen_ai.system", of.plugin);
    attrs.str("gen_ai.request.model", of.backend);
    if !of.session.is_empty() {
        attrs.str("gen_ai.conversation.id", of.session);
    }
    if let Some(usage) = report.usage {
        attrs.int("gen_ai.usage.input_tokens", usage.input_tokens);
        attrs.int("gen_ai.usage.output_tokens", usage.output_tokens);
    }
    if let Some(reason) = report.finish_reason {
        attrs.strs("gen_ai.response.finish_reasons", &[reason]);
    }
    attrs.str("llm_host.api", of.api);
    attrs.str("llm_host.key_id", of.key);
    attrs.str("llm_host.turn.id", &report.interaction_id);
    attrs.str("llm_host.turn.status", report.status.as_str());
    if let Some(request) = of.request {
        attrs.str("llm_host.request.id", request);
    }
    if let Some(store) = of.store {
        attrs.str("llm_host.store", store);
    }
    if let Some(first) = report.first_token {
        attrs.int("llm_host.time_to_first_token_ms", millis(first));
    }
    if let Some(client) = of.client {
        attrs.str("client.address", &client.ip().to_string());
        attrs.int("client.port", u64::from(client.port()));
    }
    if let Some(error) = error {
        attrs.str("error.type", error);
    }
    attrs.close();
    if let Some(first) = report.first_token {
        span.event("gen_ai.first_token", start + nanos_of(first));
    }
    span.close(error);
    let mut written = 1;

    let parts: [(Option<Phase>, &str, &str); 3] = [
        (report.claim, "claim", of.store.unwrap_or("")),
        (report.model, "generate", of.backend),
        (report.commit, "commit", of.store.unwrap_or("")),
    ];
    for (phase, what, on) in parts {
        let Some(phase) = phase else { continue };
        span.out.push(',');
        span.span_id = context::span_id();
        span.parent = Some(turn_id);
        let begin = start + nanos_of(phase.start);
        let finish = begin + nanos_of(phase.duration);
        span.open(&format_args!("{what} {on}"), INTERNAL, begin, finish);
        let mut attrs = span.attributes();
        if what == "generate" {
            attrs.str("gen_ai.operation.name", "chat");
            attrs.str("gen_ai.provider.name", of.plugin);
            attrs.str("gen_ai.request.model", of.backend);
        } else {
            attrs.str("llm_host.store", on);
        }
        let error = (!phase.ok).then(|| report.code.as_deref().unwrap_or("_OTHER"));
        if let Some(error) = error {
            attrs.str("error.type", error);
        }
        attrs.close();
        span.close(error);
        written += 1;
    }
    written
}

/// One span being written.
struct Span<'a, 'b> {
    out: &'a mut String,
    trace_id: &'b [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    state: Option<&'b str>,
}

impl Span<'_, '_> {
    /// Writes the span's fields up to its attributes.
    fn open(&mut self, name: &std::fmt::Arguments<'_>, kind: u8, start: u64, end: u64) {
        let out = &mut *self.out;
        out.push_str("{\"traceId\":\"");
        to_hex(self.trace_id, out);
        out.push_str("\",\"spanId\":\"");
        to_hex(&self.span_id, out);
        out.push('"');
        if let Some(parent) = self.parent {
            out.push_str(",\"parentSpanId\":\"");
            to_hex(&parent, out);
            out.push('"');
        }
        if let Some(state) = self.state {
            out.push_str(",\"traceState\":");
            json_str(out, state);
        }
        out.push_str(",\"name\":");
        json_str(out, &name.to_string());
        let _ = write!(
            out,
            ",\"kind\":{kind},\"startTimeUnixNano\":\"{start}\",\"endTimeUnixNano\":\"{end}\""
        );
    }

    fn attributes(&mut self) -> Attrs<'_> {
        self.out.push_str(",\"attributes\":[");
        Attrs {
            out: self.out,
            first: true,
        }
    }

    /// An event at `at` (the span's `events` list has only this one).
    fn event(&mut self, name: &str, at: u64) {
        let _ = write!(
            self.out,
            ",\"events\":[{{\"timeUnixNano\":\"{at}\",\"name\":"
        );
        json_str(self.out, name);
        self.out.push_str("}]");
    }

    /// Ends the span, with status error and `error` as its message if given.
    fn close(&mut self, error: Option<&str>) {
        if let Some(error) = error {
            let _ = write!(self.out, ",\"status\":{{\"code\":{ERROR},\"message\":");
            json_str(self.out, error);
            self.out.push('}');
        }
        self.out.push('}');
    }
}

/// A span's or a resource's `attributes` list being written.
pub(super) struct Attrs<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Attrs<'a> {
    /// A list written into `out` (which holds what comes before it).
    pub(super) fn new(out: &'a mut String) -> Self {
        out.push('[');
        Attrs { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push_str("{\"key\":");
        json_str(self.out, key);
        self.out.push_str(",\"value\":");
    }

    /// A string attribute.
    pub(super) fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.out.push_str("{\"stringValue\":");
        json_str(self.out, value);
        self.out.push_str("}}");
    }

    /// An integer attribute (a string in JSON, as int64 is).
    fn int(&mut self, key: &str, value: u64) {
        self.key(key);
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        let _ = write!(self.out, "{{\"intValue\":\"{value}\"}}}}");
    }

    /// A string-array attribute.
    fn strs(&mut self, key: &str, values: &[&str]) {
        self.key(key);
        self.out.push_str("{\"arrayValue\":{\"values\":[");
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str("{\"stringValue\":");
            json_str(self.out, value);
            self.out.push('}');
        }
        self.out.push_str("]}}}");
    }

    /// Ends the list.
    pub(super) fn close(self) {
        self.out.push(']');
    }
}

/// `text` as a JSON string.
pub(super) fn json_str(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, nanos_of)
}

fn nanos_of(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::Phase;

    #[test]
    fn a_failed_turn_is_a_span_tree_in_otlp_json() {
        let parent = Parent::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("k=v"),
        )
        .expect("valid");
        let of = TurnOf {
            api: "websocket",
            key: "alice",
            client: Some("10.0.0.7:51544".parse().expect("address")),
            session: "s-\"1\"",
            request: None,
            backend: "failing",
            plugin: "echo",
            store: Some("memory"),
            parent: Some(&parent),
        };
        let phase = |start, ok| {
            Some(Phase {
                start: Duration::from_millis(start),
                duration: Duration::from_millis(5),
                ok,
            })
        };
        let report = Report {
            status: Status::Failed,
            interaction_id: "turn-1".to_owned(),
            code: Some("model_error".to_owned()),
            usage: None,
            first_token: Some(Duration::from_millis(12)),
            duration: Duration::from_millis(40),
            finish_reason: None,
            claim: phase(1, true),
            model: phase(10, false),
            commit: phase(30, true),
        };
        let ids = Ids {
            trace_id: parent.trace_id,
            parent: Some(&parent),
        };
        let mut out = String::new();
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(turn_spans(&mut out, &ids, &of, &report, now), 4);
        let spans: Vec<serde_json::Value> =
            serde_json::from_str(&format!("[{out}]")).expect("JSON");
        let turn = &spans[0];
        assert_eq!(turn["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(turn["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(turn["traceState"], "k=v");
        assert_eq!(turn["name"], "chat failing");
        assert_eq!(turn["kind"], 1);
        assert_eq!(turn["endTimeUnixNano"], "1000000000000");
        assert_eq!(turn["startTimeUnixNano"], "999960000000");
        assert_eq!(turn["status"]["code"], 2);
        assert_eq!(turn["events"][0]["timeUnixNano"], "999972000000");
        let attr = |span: &serde_json::Value, key: &str| {
            span["attributes"]
                .as_array()
                .expect("attributes")
                .iter()
                .find(|a| a["key"] == key)
                .map(|a| a["value"].clone())
        };
        assert_eq!(
            attr(turn, "gen_ai.conversation.id"),
            Some(serde_json::json!({"stringValue": "s-\"1\""}))
        );
        assert_eq!(
            attr(turn, "error.type"),
            Some(serde_json::json!({"stringValue": "model_error"}))
        );
        assert_eq!(
            attr(turn, "client.port"),
            Some(serde_json::json!({"intValue": "51544"}))
        );
        let names: Vec<&str> = spans
            .iter()
            .map(|s| s["name"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "chat failing",
                "claim memory",
                "generate failing",
                "commit memory"
            ]
        );
        for child in &spans[1..] {
            assert_eq!(child["parentSpanId"], turn["spanId"]);
            assert_eq!(child["traceId"], turn["traceId"]);
        }
        assert_eq!(spans[2]["status"]["code"], 2);
        assert!(spans[1].get("status").is_none());
        assert_eq!(spans[2]["startTimeUnixNano"], "999970000000");
    }
}
