//! Drives the adapter through the same trait object the host calls.

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    EventSink, EventSink_TO, Flow, LogLevel, Message, ModelRequest, Plugin, Role, TurnParams,
    Usage,
};

use super::*;
use llm_host_plugin_api::FinishReason;
use llm_host_plugin_api::Next;

#[derive(Default)]
struct Recorder {
    events: Vec<String>,
    stop_after: Option<usize>,
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
            "usage {} {}",
            usage.input_tokens, usage.output_tokens
        ))
    }
    fn end(&mut self, reason: FinishReason) -> Flow {
        self.push(format!("end {}", reason.as_str()))
    }
    fn error(&mut self, code: RStr<'_>, _message: RStr<'_>) -> Flow {
        self.push(format!("error {code}"))
    }
    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, _data: RStr<'_>) -> Flow {
        self.push(format!("diagnostic {} {message}", level.as_str()))
    }
    fn is_cancelled(&self) -> bool {
        false
    }
}

fn run(
    settings: &str,
    prompt: &str,
    params: TurnParams,
    recorder: &mut Recorder,
) -> Result<(), PluginError> {
    let adapter = EchoPlugin::new_model(settings)?;
    let request = ModelRequest {
        messages: vec![
            Message::new(Role::User, "earlier words"),
            Message::new(Role::User, prompt),
        ],
        params,
        ..ModelRequest::default()
    };
    let json = llm_host_plugin_api::serde_json::to_string(&request).expect("request serializes");
    let sink = EventSink_TO::from_ptr(recorder, TD_Opaque);
    adapter.generate(json.as_str().into(), sink).into_result()
}

#[test]
fn echoes_the_last_user_message_word_by_word() {
    let mut rec = Recorder::default();
    run("{}", "Hello, world", TurnParams::default(), &mut rec).expect("echo runs");
    assert_eq!(
        rec.events,
        [
            "start echo",
            "text \"echo:\"",
            "text \" Hello,\"",
            "text \" world\"",
            "usage 4 3",
            "end stop"
        ]
    );
}

#[test]
fn synthetic_tokens_and_max_tokens() {
    let mut rec = Recorder::default();
    let params = TurnParams {
        max_tokens: Some(2),
        ..TurnParams::default()
    };
    run(r#"{"tokens": 5}"#, "x", params, &mut rec).expect("echo runs");
    assert_eq!(
        rec.events,
        [
            "start echo",
            "text \"token0\"",
            "text \" token1\"",
            "usage 3 2",
            "end length"
        ]
    );
}

#[test]
fn stops_when_the_sink_says_stop() {
    let mut rec = Recorder {
        stop_after: Some(2),
        ..Recorder::default()
    };
    run(r#"{"tokens": 50}"#, "x", TurnParams::default(), &mut rec).expect("echo runs");
    assert_eq!(rec.events.len(), 2, "{:?}", rec.events);
}

#[test]
fn fail_after_sends_an_error_event() {
    let mut rec = Recorder::default();
    run(
        r#"{"tokens": 5, "fail_after": 1}"#,
        "x",
        TurnParams::default(),
        &mut rec,
    )
    .expect("echo runs");
    assert_eq!(
        rec.events,
        ["start echo", "text \"token0\"", "error injected_failure"]
    );
}

#[test]
fn a_panic_comes_back_as_an_error_value() {
    let mut rec = Recorder::default();
    let err = run(
        r#"{"panic_after": 0}"#,
        "x",
        TurnParams::default(),
        &mut rec,
    )
    .expect_err("panics");
    assert_eq!(err.kind, llm_host_plugin_api::ErrorKind::PANIC);
    assert!(err.message.contains("panic_after"), "{}", err.message);
}

#[test]
fn unknown_settings_are_refused_by_name() {
    let err = EchoPlugin::new_model(r#"{"dela_ms": 5}"#)
        .err()
        .expect("typo refused");
    assert!(err.message.contains("dela_ms"), "{}", err.message);
}

/// A waker for stepping by hand; echo never answers pending.
struct NoWake;

impl llm_host_plugin_api::TurnWaker for NoWake {
    fn wake(&self) {}
}

/// Starts a turn of `settings` and steps it until done; answers what each
/// step asked for and the events in order.
fn steps(settings: &str) -> (Vec<Next>, Vec<String>) {
    let adapter = EchoPlugin::new_model(settings).expect("settings are valid");
    assert!(adapter.stepped(), "echo runs in steps");
    let request = ModelRequest {
        messages: vec![Message::new(Role::User, "x")],
        ..ModelRequest::default()
    };
    let json = llm_host_plugin_api::serde_json::to_string(&request).expect("request serializes");
    let waker = llm_host_plugin_api::TurnWaker_TO::from_value(NoWake, TD_Opaque);
    let mut turn = adapter
        .start(json.as_str().into(), waker)
        .into_result()
        .expect("starts");
    let mut rec = Recorder::default();
    let mut nexts = Vec::new();
    loop {
        let next = turn
            .step(EventSink_TO::from_ptr(&mut rec, TD_Opaque))
            .into_result()
            .expect("steps")
            .next();
        nexts.push(next);
        match next {
            Next::Done => return (nexts, rec.events),
            Next::Sleep(pause) => std::thread::sleep(pause),
            Next::Ready => {}
            // Its thread makes tokens ready: look again shortly.
            Next::Pending => std::thread::sleep(std::time::Duration::from_millis(1)),
            other => panic!("echo answered {other:?}"),
        }
    }
}

#[test]
fn without_a_delay_a_step_sends_up_to_64_tokens() {
    let (nexts, events) = steps(r#"{"tokens": 100}"#);
    assert_eq!(nexts, [Next::Ready, Next::Done]);
    assert_eq!(events.len(), 1 + 100 + 2, "{events:?}");
    assert_eq!(events[100], "text \" token99\"");
    assert_eq!(events[102], "end stop");
}

#[test]
fn a_paced_turn_sleeps_between_tokens_by_the_clock() {
    let started = std::time::Instant::now();
    let (nexts, events) = steps(r#"{"tokens": 3, "delay_ms": 20}"#);
    // A pause before each token, then the token and the next pause.
    assert_eq!(nexts.len(), 4, "{nexts:?}");
    for next in &nexts[..3] {
        match next {
            Next::Sleep(pause) => {
                assert!(*pause <= std::time::Duration::from_millis(20), "{nexts:?}")
            }
            other => panic!("expected a pause, got {other:?}"),
        }
    }
    assert_eq!(nexts[3], Next::Done);
    assert!(started.elapsed() >= std::time::Duration::from_millis(60));
    assert_eq!(
        events,
        [
            "start echo",
            "text \"token0\"",
            "text \" token1\"",
            "text \" token2\"",
            "usage 1 3",
            "end stop"
        ]
    );
}

#[test]
fn a_threaded_turn_is_pending_until_its_thread_made_tokens_ready() {
    let (nexts, events) = steps(r#"{"tokens": 3, "delay_ms": 5, "threaded": true}"#);
    assert!(nexts.contains(&Next::Pending), "{nexts:?}");
    assert_eq!(nexts.last(), Some(&Next::Done));
    assert_eq!(
        events,
        [
            "start echo",
            "text \"token0\"",
            "text \" token1\"",
            "text \" token2\"",
            "usage 1 3",
            "end stop"
        ]
    );
}

/// Runs `settings` on `messages` with tools `lookup` and `weather` declared.
fn run_with_tools(settings: &str, messages: Vec<Message>) -> Vec<String> {
    let adapter = EchoPlugin::new_model(settings).expect("settings accepted");
    let tool = |name: &str| llm_host_plugin_api::ToolSpec {
        name: name.into(),
        ..Default::default()
    };
    let request = ModelRequest {
        messages,
        params: TurnParams {
            tools: vec![tool("lookup"), tool("weather")],
            ..TurnParams::default()
        },
        ..ModelRequest::default()
    };
    let json = llm_host_plugin_api::serde_json::to_string(&request).expect("request serializes");
    let mut recorder = Recorder::default();
    let sink = EventSink_TO::from_ptr(&mut recorder, TD_Opaque);
    adapter
        .generate(json.as_str().into(), sink)
        .into_result()
        .expect("echo runs");
    recorder.events
}

/// An assistant message calling `lookup` and `weather` with ids `call_N_0`
/// and `call_N_1`, and the two results.
fn round(n: usize, results: [&str; 2]) -> Vec<Message> {
    let call = |index: usize, name: &str| llm_host_plugin_api::ToolCall {
        id: format!("call_{n}_{index}"),
        name: name.into(),
        arguments: r#"{"prompt":"rain?"}"#.into(),
    };
    let result = |index: usize, text: &str| Message {
        tool_call_id: Some(format!("call_{n}_{index}")),
        ..Message::new(Role::Tool, text)
    };
    vec![
        Message {
            tool_calls: vec![call(0, "lookup"), call(1, "weather")],
            ..Message::new(Role::Assistant, "")
        },
        result(0, results[0]),
        result(1, results[1]),
    ]
}

#[test]
fn call_tools_calls_every_declared_tool_then_answers_with_the_results() {
    let prompt = vec![Message::new(Role::User, "rain?")];
    assert_eq!(
        run_with_tools(r#"{"call_tools": true}"#, prompt.clone()),
        [
            "start echo",
            r#"tool call_1_0 lookup {"prompt":"rain?"}"#,
            r#"tool call_1_1 weather {"prompt":"rain?"}"#,
            "usage 1 2",
            "end tool-calls"
        ]
    );
    let answered = [prompt.clone(), round(1, ["wet", "very cold"])].concat();
    assert_eq!(
        run_with_tools(r#"{"call_tools": true}"#, answered),
        [
            "start echo",
            "text \"echo:\"",
            "text \" rain?\"",
            "text \" wet\"",
            "text \" very\"",
            "text \" cold\"",
            "usage 4 5",
            "end stop"
        ]
    );
    // Two rounds: the second round's ids follow the request's length.
    let once = [prompt.clone(), round(1, ["wet", "cold"])].concat();
    let events = run_with_tools(r#"{"call_tools": true, "tool_rounds": 2}"#, once);
    assert_eq!(events[1], r#"tool call_4_0 lookup {"prompt":"rain?"}"#);
    assert_eq!(events.last().map(String::as_str), Some("end tool-calls"));
    // Without call_tools, declared tools are ignored.
    assert_eq!(
        run_with_tools("{}", prompt).last().map(String::as_str),
        Some("end stop")
    );
}

#[test]
fn a_new_user_message_starts_the_rounds_again() {
    let history = [
        vec![Message::new(Role::User, "rain?")],
        round(1, ["wet", "cold"]),
        vec![
            Message::new(Role::Assistant, "echo: rain? wet cold"),
            Message::new(Role::User, "snow?"),
        ],
    ]
    .concat();
    let events = run_with_tools(r#"{"call_tools": true}"#, history);
    assert_eq!(events[1], r#"tool call_6_0 lookup {"prompt":"snow?"}"#);
}
