//! Unit tests that drive the plugin through the same FFI trait object the
//! host calls: `TemplatePlugin::new_model` gives the `ModelAdapterBox`, the
//! request goes in as JSON text, and a recording `EventSink` plays the host.
//! Keep them as the model changes: testing through the trait object (not
//! the `Model` impl directly) also exercises the JSON of the request and the
//! panic guard, exactly as the host will. The last test runs the conformance
//! suite `llm-host check` runs.

use std::time::{Duration, Instant};

use llm_host_conformance::model::{assert_model_conforms, ModelOptions};
use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    serde_json::{self, json, Value},
    ErrorKind, EventSink, EventSink_TO, FinishReason, Flow, LogLevel, Message, ModelRequest,
    Plugin, PluginError, Role, TurnParams, Usage,
};

use super::*;

/// Plays the host's sink: records each event as a line of text, answers
/// stop after `stop_after` events, and reports `cancelled` from
/// `is_cancelled`.
#[derive(Default)]
struct Recorder {
    events: Vec<String>,
    stop_after: Option<usize>,
    cancelled: bool,
}

impl Recorder {
    fn push(&mut self, event: String) -> Flow {
        self.events.push(event);
        match self.stop_after {
            Some(n) if self.events.len() >= n => Flow::STOP,
            _ => Flow::CONTINUE,
        }
    }
}

impl EventSink for Recorder {
    fn start(&mut self, _id: RStr<'_>, model_id: RStr<'_>) -> Flow {
        self.push(format!("start {model_id}"))
    }
    fn text(&mut self, text: RStr<'_>) -> Flow {
        self.push(format!("text {text:?}"))
    }
    fn reasoning(&mut self, text: RStr<'_>) -> Flow {
        self.push(format!("reasoning {text:?}"))
    }
    fn tool_call(&mut self, id: RStr<'_>, name: RStr<'_>, arguments: RStr<'_>) -> Flow {
        self.push(format!("tool {id} {name} {arguments}"))
    }
    fn usage(&mut self, usage: Usage) -> Flow {
        self.push(format!(
            "usage {} {} {}",
            usage.input_tokens, usage.output_tokens, usage.total_tokens
        ))
    }
    fn end(&mut self, reason: FinishReason) -> Flow {
        self.push(format!("end {}", reason.as_str()));
        Flow::STOP
    }
    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        self.push(format!("error {code}: {message}"));
        Flow::STOP
    }
    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, data: RStr<'_>) -> Flow {
        self.push(format!("diagnostic {} {message} {data}", level.as_str()))
    }
    fn is_cancelled(&self) -> bool {
        self.cancelled
    }
}

/// Builds the adapter from `settings` and runs one generation of `request`
/// (JSON text) into `recorder`, as the host would.
fn run_raw(settings: &str, request: &str, recorder: &mut Recorder) -> Result<(), PluginError> {
    let adapter = TemplatePlugin::new_model(settings)?;
    let sink = EventSink_TO::from_ptr(recorder, TD_Opaque);
    adapter.generate(request.into(), sink).into_result()
}

/// One user message `prompt` (after an earlier exchange) with `params`.
fn run(
    settings: &str,
    prompt: &str,
    params: TurnParams,
    recorder: &mut Recorder,
) -> Result<(), PluginError> {
    let request = ModelRequest {
        session_id: "s".to_owned(),
        interaction_id: "turn-2".to_owned(),
        messages: vec![
            Message::new(Role::User, "earlier words"),
            Message::new(Role::Assistant, "EARLIER WORDS"),
            Message::new(Role::User, prompt),
        ],
        params,
        ..ModelRequest::default()
    };
    let json = serde_json::to_string(&request).expect("a request serializes");
    run_raw(settings, &json, recorder)
}

fn params(value: Value) -> TurnParams {
    serde_json::from_value(value).expect("valid params")
}

#[test]
fn upper_cases_the_last_user_message_word_by_word() {
    let mut rec = Recorder::default();
    run("{}", "hello big  world", TurnParams::default(), &mut rec).expect("runs");
    assert_eq!(
        rec.events,
        [
            "start template-upper",
            "text \"HELLO\"",
            "text \" BIG\"",
            "text \" WORLD\"",
            // 2 + 2 + 3 words in, 3 out.
            "usage 7 3 10",
            "end stop"
        ]
    );
}

#[test]
fn reverses_each_word_when_asked() {
    let mut rec = Recorder::default();
    run(
        r#"{"transform": "reverse"}"#,
        "héllo wörld",
        TurnParams::default(),
        &mut rec,
    )
    .expect("runs");
    assert_eq!(
        rec.events,
        [
            "start template-reverse",
            "text \"olléh\"",
            "text \" dlröw\"",
            "usage 6 2 8",
            "end stop"
        ]
    );
}

#[test]
fn max_tokens_caps_the_answer_and_the_param_overrides_the_setting() {
    let mut rec = Recorder::default();
    run(
        r#"{"max_tokens": 1}"#,
        "one two three",
        TurnParams::default(),
        &mut rec,
    )
    .expect("runs");
    assert_eq!(
        rec.events,
        [
            "start template-upper",
            "text \"ONE\"",
            "usage 7 1 8",
            "end length"
        ]
    );

    let mut rec = Recorder::default();
    run(
        r#"{"max_tokens": 1}"#,
        "one two three",
        params(json!({"maxTokens": 2})),
        &mut rec,
    )
    .expect("runs");
    assert_eq!(rec.events[1..3], ["text \"ONE\"", "text \" TWO\""]);
    assert_eq!(rec.events.last().map(String::as_str), Some("end length"));

    // Exactly enough is not a cut.
    let mut rec = Recorder::default();
    run("{}", "one two", params(json!({"maxTokens": 2})), &mut rec).expect("runs");
    assert_eq!(rec.events.last().map(String::as_str), Some("end stop"));
}

#[test]
fn a_stop_sequence_ends_the_answer_before_it() {
    let mut rec = Recorder::default();
    run(
        "{}",
        "alpha beta gamma delta",
        params(json!({"stop": ["", "MMA"]})),
        &mut rec,
    )
    .expect("runs");
    assert_eq!(
        rec.events,
        [
            "start template-upper",
            "text \"ALPHA\"",
            "text \" BETA\"",
            "text \" GA\"",
            "usage 8 3 11",
            "end stop"
        ]
    );

    // A stop sequence spanning two words: the second is not sent at all.
    let mut rec = Recorder::default();
    run(
        "{}",
        "alpha beta gamma",
        params(json!({"stop": ["A BETA"]})),
        &mut rec,
    )
    .expect("runs");
    assert_eq!(
        rec.events,
        [
            "start template-upper",
            "text \"ALPHA\"",
            "usage 7 1 8",
            "end stop"
        ]
    );
}

#[test]
fn params_it_ignores_are_reported_in_one_diagnostic() {
    let mut rec = Recorder::default();
    run(
        "{}",
        "hi",
        params(json!({"temperature": 0.2, "maxTokens": 5, "vendorThing": true})),
        &mut rec,
    )
    .expect("runs");
    assert_eq!(
        rec.events,
        [
            "start template-upper",
            "diagnostic warn the template model ignores temperature, vendorThing \
             {\"code\":\"params_ignored\",\"params\":[\"temperature\",\"vendorThing\"]}",
            "text \"HI\"",
            "usage 5 1 6",
            "end stop"
        ]
    );
}

#[test]
fn stops_when_the_sink_says_stop() {
    let mut rec = Recorder {
        stop_after: Some(2),
        ..Recorder::default()
    };
    run("{}", "a b c d e f", TurnParams::default(), &mut rec).expect("runs");
    assert_eq!(rec.events, ["start template-upper", "text \"A\""]);
}

#[test]
fn a_cancel_is_noticed_while_waiting() {
    let mut rec = Recorder {
        cancelled: true,
        ..Recorder::default()
    };
    let began = Instant::now();
    run(
        r#"{"delay_ms": 30000}"#,
        "slow words",
        TurnParams::default(),
        &mut rec,
    )
    .expect("runs");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}",
        began.elapsed()
    );
    assert_eq!(rec.events, ["start template-upper"]);
}

#[test]
fn requests_it_cannot_serve_are_returned_errors() {
    let mut rec = Recorder::default();
    let request = serde_json::to_string(&ModelRequest {
        messages: vec![Message::new(Role::System, "be brief")],
        ..ModelRequest::default()
    })
    .expect("a request serializes");
    let err = run_raw("{}", &request, &mut rec).expect_err("no user message");
    assert_eq!(err.kind, ErrorKind::INVALID_INPUT);
    assert!(err.message.contains("user message"), "{}", err.message);
    assert!(rec.events.is_empty(), "{:?}", rec.events);

    // Not even JSON: the plugin-api's shim answers `invalid_input`.
    let err = run_raw("{}", "not json", &mut rec).expect_err("malformed");
    assert_eq!(err.kind, ErrorKind::INVALID_INPUT);
}

#[test]
fn bad_settings_are_refused_by_name() {
    for (settings, named) in [
        (r#"{"dela_ms": 5}"#, "dela_ms"),
        (r#"{"transform": "sideways"}"#, "sideways"),
        (r#"{"delay_ms": 60001}"#, "delay_ms"),
        (r#"{"max_tokens": -1}"#, "-1"),
    ] {
        let err = TemplatePlugin::new_model(settings)
            .err()
            .unwrap_or_else(|| panic!("{settings} must be refused"));
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{settings}");
        assert!(err.message.contains(named), "{settings}: {}", err.message);
    }
    // No settings table at all is the same as `{}`.
    assert!(TemplatePlugin::new_model("").is_ok());
}

#[test]
fn the_plugin_says_what_it_is() {
    assert_eq!(TemplatePlugin::NAME, "template");
    assert_eq!(TemplatePlugin::KINDS, Kinds::MODEL);
    let err = TemplatePlugin::new_store("{}")
        .err()
        .expect("no store adapter");
    assert_eq!(err.kind, ErrorKind::UNSUPPORTED);
}

// The conformance suite `llm-host check` runs against the built library,
// here through `cargo test`: with no settings, and paced.
#[test]
fn conforms() {
    let make = |settings: &str| TemplatePlugin::new_model(settings);
    assert_model_conforms(&make, &ModelOptions::default());
    let paced = ModelOptions {
        settings: r#"{"transform": "reverse", "delay_ms": 1}"#.to_owned(),
        ..ModelOptions::default()
    };
    assert_model_conforms(&make, &paced);
}
