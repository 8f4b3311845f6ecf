//! The schemas in schema/ held against the host itself: the command schema
//! against `Command::parse` on good and bad commands, the server-frame
//! schema against every kind of frame the host's `Framer` writes, in both
//! envelopes, and against frames it must refuse.

use bytes::BytesMut;
use llm_host::core::settings::SessionSettings;
use llm_host::protocol::{
    protocol_diagnostic, Command, Diagnostic, DiagnosticEntry, Envelope, ErrorBody, Framer, Meta,
    ModelEvent, SessionEvent, TurnEvent, UsageBody, SOURCE_HOST, SOURCE_MODEL,
};
use llm_host_plugin_api::{ToolCall, ToolSpec, TurnParams};
use serde_json::{json, Value};

use super::{check_client_command, check_server_frame, workspace_root, CLIENT_COMMAND_SCHEMA};

/// Commands the host accepts.
fn good_commands() -> Vec<String> {
    let mut good: Vec<String> = [
        r#"{"type":"prompt","text":"Hello"}"#,
        r#"{"type":"prompt","text":""}"#,
        r#"{"type":"prompt","text":"Hello","model":"fast","params":{"temperature":0.2,"maxTokens":256}}"#,
        r#"{"type":"prompt","id":"q-17","text":"Hello"}"#,
        r#"{"type":"prompt","id":null,"text":"x","model":null}"#,
        r#"{"type":"prompt","text":"x","params":{}}"#,
        r#"{"type":"prompt","text":"x","params":{"temperature":null,"maxTokens":null,"topP":null,"topK":null,"seed":null}}"#,
        r#"{"type":"prompt","text":"x","params":{"topP":0.9,"topK":40,"seed":7,"stop":["\n","END"],"stop_extra":1}}"#,
        r#"{"type":"prompt","text":"x","params":{"stop":[],"tools":[]}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":[{"name":"lookup","description":"a city's weather","parameters":{"type":"object"}}]}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":[{"name":"t","parameters":null,"mine":true}]}}"#,
        r#"{"type":"prompt","text":"x","params":{"frequencyPenalty":0.5,"response_format":{"type":"json"}}}"#,
        r#"{"type":"prompt","text":"x","params":{"maxTokens":18446744073709551615}}"#,
        r#"{"type":"cancel"}"#,
        r#"{"type":"tool_result","callId":"c1","content":"21 degrees"}"#,
        r#"{"type":"tool_result","callId":"c1","content":""}"#,
        r#"{"type":"tool_result","callId":"c1","error":"no such city"}"#,
        r#"{"type":"tool_result","callId":"c1","content":"x","error":null}"#,
        r#"{"type":"tool_result","callId":"c1","content":null,"error":"x"}"#,
        r#"{"type":"session.update"}"#,
        r#"{"type":"session.update","system":"Answer briefly."}"#,
        r#"{"type":"session.update","model":"fast","params":{"temperature":0.1,"stop":["."]}}"#,
        r#"{"type":"session.update","system":null,"model":null,"params":null}"#,
    ]
    .map(str::to_owned)
    .into();
    let id = "i".repeat(128);
    good.push(json!({"type": "prompt", "id": id, "text": "x"}).to_string());
    let call = "c".repeat(256);
    good.push(json!({"type": "tool_result", "callId": call, "content": "x"}).to_string());
    good
}

/// Commands the host refuses (`bad_frame` or `unknown_command`).
fn bad_commands() -> Vec<String> {
    let mut bad: Vec<String> = [
        "{oops",
        "null",
        "[]",
        r#""prompt""#,
        "{}",
        r#"{"type":1}"#,
        r#"{"type":null}"#,
        r#"{"type":"dance"}"#,
        r#"{"type":"Prompt","text":"x"}"#,
        r#"{"type":"session.Update"}"#,
        r#"{"type":"prompt"}"#,
        r#"{"type":"prompt","text":1}"#,
        r#"{"type":"prompt","text":null}"#,
        r#"{"type":"prompt","text":"x","extra":true}"#,
        r#"{"type":"prompt","text":"x","id":5}"#,
        r#"{"type":"prompt","text":"x","model":5}"#,
        r#"{"type":"prompt","text":"x","params":null}"#,
        r#"{"type":"prompt","text":"x","params":[]}"#,
        r#"{"type":"prompt","text":"x","params":"hot"}"#,
        r#"{"type":"prompt","text":"x","params":{"maxTokens":-1}}"#,
        r#"{"type":"prompt","text":"x","params":{"maxTokens":1.5}}"#,
        r#"{"type":"prompt","text":"x","params":{"maxTokens":"256"}}"#,
        r#"{"type":"prompt","text":"x","params":{"temperature":"hot"}}"#,
        r#"{"type":"prompt","text":"x","params":{"topK":-3}}"#,
        r#"{"type":"prompt","text":"x","params":{"seed":true}}"#,
        r#"{"type":"prompt","text":"x","params":{"stop":"\n"}}"#,
        r#"{"type":"prompt","text":"x","params":{"stop":null}}"#,
        r#"{"type":"prompt","text":"x","params":{"stop":[1]}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":{}}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":null}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":[["t","d",{}]]}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":["lookup"]}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":[{"description":"no name"}]}}"#,
        r#"{"type":"prompt","text":"x","params":{"tools":[{"name":"t","description":null}]}}"#,
        r#"{"type":"cancel","x":1}"#,
        r#"{"type":"cancel","id":"q-1"}"#,
        r#"{"type":"tool_result","callId":"c1"}"#,
        r#"{"type":"tool_result","callId":"c1","content":"a","error":"b"}"#,
        r#"{"type":"tool_result","callId":"c1","content":null,"error":null}"#,
        r#"{"type":"tool_result","callId":"","content":"x"}"#,
        r#"{"type":"tool_result","callId":null,"content":"x"}"#,
        r#"{"type":"tool_result","content":"x"}"#,
        r#"{"type":"tool_result","callId":"c1","content":1}"#,
        r#"{"type":"tool_result","callId":"c1","content":{"t":21}}"#,
        r#"{"type":"tool_result","call_id":"c1","content":"x"}"#,
        r#"{"type":"tool_result","callId":"c1","content":"x","extra":1}"#,
        r#"{"type":"session.update","system":5}"#,
        r#"{"type":"session.update","model":{"name":"fast"}}"#,
        r#"{"type":"session.update","params":[]}"#,
        r#"{"type":"session.update","params":{"stop":"."}}"#,
        r#"{"type":"session.update","params":{"maxTokens":-1}}"#,
        r#"{"type":"session.update","text":"hi"}"#,
    ]
    .map(str::to_owned)
    .into();
    let id = "i".repeat(129);
    bad.push(json!({"type": "prompt", "id": id, "text": "x"}).to_string());
    let call = "c".repeat(257);
    bad.push(json!({"type": "tool_result", "callId": call, "content": "x"}).to_string());
    bad
}

/// What the command schema says of `text` (not JSON: refused).
fn schema_verdict(text: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(text).map_err(|err| format!("not JSON: {err}"))?;
    check_client_command(&value)
}

#[test]
fn the_command_schema_agrees_with_the_parser() {
    for text in good_commands() {
        let parsed = Command::parse(&text);
        assert!(
            parsed.is_ok(),
            "the host refuses a good command {text}: {parsed:?}"
        );
        if let Err(err) = schema_verdict(&text) {
            panic!("the schema refuses {text}, which the host accepts:\n{err}");
        }
    }
    for text in bad_commands() {
        let Err((code, why)) = Command::parse(&text) else {
            panic!("the host accepts a bad command {text}");
        };
        assert!(
            schema_verdict(&text).is_err(),
            "the schema accepts {text}, which the host refuses ({code}: {why})"
        );
    }
}

#[test]
fn the_command_types_are_the_parsers() {
    let schema: Value = serde_json::from_str(CLIENT_COMMAND_SCHEMA).expect("the schema is JSON");
    let types: Vec<&str> = schema["properties"]["type"]["enum"]
        .as_array()
        .expect("the schema lists the command types")
        .iter()
        .map(|t| t.as_str().expect("a type is a string"))
        .collect();
    for type_ in &types {
        let frame = json!({ "type": type_ }).to_string();
        if let Err((code, why)) = Command::parse(&frame) {
            assert_ne!(code, "unknown_command", "the schema has {type_}: {why}");
        }
    }
    // A string `type` the schema does not list is the parser's unknown_command.
    for text in good_commands().into_iter().chain(bad_commands()) {
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(type_) = value.get("type").and_then(Value::as_str) else {
            continue;
        };
        let unknown = matches!(Command::parse(&text), Err(("unknown_command", _)));
        assert_eq!(unknown, !types.contains(&type_), "{text}");
    }
}

#[test]
fn the_protocols_command_examples_conform() {
    let path = workspace_root().join("PROTOCOL.md");
    let text = std::fs::read_to_string(&path).expect("PROTOCOL.md");
    let mut examples = 0;
    for block in text.split("```json").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        for line in block.lines().filter(|line| line.starts_with(r#"{"type""#)) {
            examples += 1;
            assert!(Command::parse(line).is_ok(), "the host refuses {line}");
            if let Err(err) = schema_verdict(line) {
                panic!("PROTOCOL.md's example {line} does not conform:\n{err}");
            }
        }
    }
    assert!(examples >= 4, "PROTOCOL.md has command examples");
}

/// Every kind of frame the host writes, in `envelope`.
fn host_frames(envelope: Envelope) -> Vec<String> {
    let framer = Framer { envelope };
    let host = |sequence| Meta {
        sequence,
        timestamp: 1_764_028_800_000,
        source_id: SOURCE_HOST,
        interaction_id: None,
    };
    let in_turn = |sequence, source_id| Meta {
        sequence,
        timestamp: 1_764_028_800_001,
        source_id,
        interaction_id: Some("turn-12"),
    };
    let mut frames = Vec::new();

    let settings = SessionSettings {
        system: Some("Answer briefly.".into()),
        model: Some("fast".into()),
        params: Some(TurnParams {
            temperature: Some(0.2),
            max_tokens: Some(256),
            stop: vec![".".into()],
            tools: vec![ToolSpec {
                name: "lookup".into(),
                description: String::new(),
                parameters: Value::Null,
            }],
            extra: json!({"frequencyPenalty": 0.5})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            ..TurnParams::default()
        }),
    };
    let none = SessionSettings::default();
    for (resumed, last_sequence, settings) in [(false, 0, None), (true, 41, Some(&settings))] {
        let open = SessionEvent::Open {
            session_id: "session-6f1c:a.b_c",
            resumed,
            model: "echo",
            last_sequence,
            settings,
        };
        frames.push(framer.session(&open, &host(last_sequence)));
    }
    for settings in [&settings, &none] {
        frames.push(framer.session(&SessionEvent::Updated { settings }, &host(41)));
    }

    let call = ToolCall {
        id: "call-1".into(),
        name: "lookup".into(),
        arguments: r#"{"city":"Oslo"}"#.into(),
    };
    let diagnostics = [
        Diagnostic {
            level: "warn".into(),
            message: "retried".into(),
            data: Some(json!({"attempt": 2})),
        },
        Diagnostic {
            level: "info".into(),
            message: "a setting ignored".into(),
            data: None,
        },
    ];
    let mut events = vec![
        ModelEvent::Start {
            id: None,
            model_id: None,
        },
        ModelEvent::Start {
            id: Some("chatcmpl-1"),
            model_id: Some("gpt-x"),
        },
        ModelEvent::Delta {
            text: Some("Hi \"there\"\n"),
            reasoning: None,
            tool_call: None,
        },
        ModelEvent::Delta {
            text: Some(""),
            reasoning: None,
            tool_call: None,
        },
        ModelEvent::Delta {
            text: None,
            reasoning: Some("thinking"),
            tool_call: None,
        },
        ModelEvent::Delta {
            text: None,
            reasoning: None,
            tool_call: Some(&call),
        },
        ModelEvent::Usage {
            usage: UsageBody {
                input_tokens: 3,
                output_tokens: 5,
                total_tokens: 8,
            },
        },
        ModelEvent::End {
            finish_reason: None,
            diagnostics: &[],
        },
        ModelEvent::Error {
            error: ErrorBody {
                code: "timeout",
                message: "too slow",
            },
            diagnostics: &diagnostics,
        },
    ];
    for reason in ["stop", "length", "tool-calls", "cancelled"] {
        events.push(ModelEvent::End {
            finish_reason: Some(reason),
            diagnostics: &diagnostics,
        });
    }
    let mut out = BytesMut::new();
    for (n, event) in events.iter().enumerate() {
        framer.write_model(&mut out, event, &in_turn(n as u64 + 1, SOURCE_MODEL));
        let frame = out.split().freeze();
        frames.push(String::from_utf8(frame.to_vec()).expect("UTF-8"));
    }

    for status in ["completed", "cancelled", "failed"] {
        for prompt_id in [None, Some("q-17")] {
            let end = TurnEvent::End {
                status,
                interaction_id: "turn-12",
                prompt_id,
            };
            frames.push(framer.turn(&end, &in_turn(20, SOURCE_HOST)));
        }
    }
    for prompt_id in [None, Some("q-18")] {
        let refused = TurnEvent::End {
            status: "refused",
            interaction_id: "",
            prompt_id,
        };
        frames.push(framer.turn(&refused, &host(20)));
    }

    let mut refusal = protocol_diagnostic("error", "queue_full", "too many prompts wait");
    if let Some(data) = refusal.data.as_mut() {
        data["promptId"] = "q-18".into();
    }
    let entries = [
        protocol_diagnostic("error", "bad_frame", "the frame is not JSON"),
        protocol_diagnostic("warn", "nothing_to_cancel", "no turn is running"),
        refusal,
        DiagnosticEntry {
            level: "warn",
            kind: "host",
            message: "gone",
            data: Some(json!({"code": "model_unavailable", "model": "old"})),
        },
        DiagnosticEntry {
            level: "warn",
            kind: "host",
            message: "reloaded",
            data: Some(json!({"code": "reloaded", "changes": ["backend `echo` was rebuilt"]})),
        },
        DiagnosticEntry {
            level: "info",
            kind: "host",
            message: "the backend's history policy left out the 4 oldest messages",
            data: Some(
                json!({"code": "history_summarized", "dropped": 4, "sent": 3, "estimatedTokens": 900, "fresh": true}),
            ),
        },
        DiagnosticEntry {
            level: "error",
            kind: "store",
            message: "the turn could not be saved",
            data: Some(json!({"code": "store_unavailable"})),
        },
    ];
    for entry in &entries {
        frames.push(framer.diagnostic(entry, &host(20)));
    }
    frames
}

#[test]
fn every_frame_the_host_writes_conforms() {
    for envelope in [Envelope::Flat, Envelope::Nested] {
        for frame in host_frames(envelope) {
            let value: Value = serde_json::from_str(&frame).expect("the host writes JSON");
            if let Err(err) = check_server_frame(&value) {
                panic!("{envelope:?}: {frame}\n{err}");
            }
        }
    }
}

#[test]
fn the_frame_schema_refuses_what_the_host_must_not_write() {
    let good = json!({
        "name": "interaction.model",
        "data": {
            "kind": "model",
            "event": {"type": "delta", "text": "Hi"},
            "meta": {"sequence": 2, "timestamp": 1, "sourceId": "model.primary", "interactionId": "turn-1"}
        }
    });
    check_server_frame(&good).expect("a text delta conforms");
    let nested = json!({ "name": good["name"], "data": { "event": good["data"] } });
    check_server_frame(&nested).expect("a nested text delta conforms");

    let changed = |pointer: &str, value: Value| {
        let mut frame = good.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
        frame.pointer_mut(parent).expect(pointer)[key] = value;
        frame
    };
    let removed = |pointer: &str| {
        let mut frame = good.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
        frame
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .and_then(|object| object.remove(key))
            .expect(pointer);
        frame
    };
    let open = |event: Value| {
        json!({
            "name": "interaction.session",
            "data": {"kind": "session", "event": event, "meta": {"sequence": 0, "timestamp": 1, "sourceId": "host"}}
        })
    };
    let turn_end = |event: Value, meta: Value| json!({"name": "interaction.turn", "data": {"kind": "turn", "event": event, "meta": meta}});
    let diagnostic = |entry: Value| {
        json!({
            "name": "interaction.diagnostic",
            "data": {"kind": "diagnostic", "entry": entry, "meta": {"sequence": 3, "timestamp": 1, "sourceId": "host"}}
        })
    };
    let announcement = json!({"type": "open", "sessionId": "s-1", "resumed": false, "model": "echo", "lastSequence": 0, "protocol": "1.1"});
    check_server_frame(&open(announcement.clone())).expect("an announcement conforms");
    let with = |mut value: Value, key: &str, field: Value| {
        value[key] = field;
        value
    };
    let without = |mut value: Value, key: &str| {
        value.as_object_mut().map(|object| object.remove(key));
        value
    };
    let host_meta = json!({"sequence": 9, "timestamp": 1, "sourceId": "host"});
    let turn_meta =
        json!({"sequence": 9, "timestamp": 1, "sourceId": "host", "interactionId": "turn-1"});

    let bad = [
        (
            "null for an absent field",
            changed("/data/meta/interactionId", Value::Null),
        ),
        (
            "a field the protocol does not have",
            changed("/data/event/colour", json!("red")),
        ),
        ("a field in the envelope", changed("/extra", json!(1))),
        (
            "a sequence as text",
            changed("/data/meta/sequence", json!("2")),
        ),
        (
            "a negative sequence",
            changed("/data/meta/sequence", json!(-1)),
        ),
        (
            "a fractional sequence",
            changed("/data/meta/sequence", json!(2.5)),
        ),
        (
            "a model event from the host",
            changed("/data/meta/sourceId", json!("host")),
        ),
        (
            "a model event outside a turn",
            removed("/data/meta/interactionId"),
        ),
        (
            "a turn id that is not turn-N",
            changed("/data/meta/interactionId", json!("t1")),
        ),
        ("a delta with nothing", removed("/data/event/text")),
        (
            "a text that is not text",
            changed("/data/event/text", json!(5)),
        ),
        (
            "an unknown model event",
            changed("/data/event/type", json!("stop")),
        ),
        (
            "a name that is not the kind's",
            changed("/name", json!("interaction.turn")),
        ),
        (
            "an unknown name",
            changed("/name", json!("interaction.tool")),
        ),
        ("no meta", removed("/data/meta")),
        ("no timestamp", removed("/data/meta/timestamp")),
        (
            "nested data with more than the event",
            with(
                nested.clone(),
                "data",
                json!({"event": good["data"], "kind": "model"}),
            ),
        ),
        (
            "an unknown finish reason",
            changed(
                "/data/event",
                json!({"type": "end", "finishReason": "done"}),
            ),
        ),
        (
            "an empty diagnostics list",
            changed(
                "/data/event",
                json!({"type": "end", "finishReason": "stop", "diagnostics": []}),
            ),
        ),
        (
            "an error event without its code",
            changed("/data/event", json!({"type": "error", "error": {}})),
        ),
        (
            "usage in floats",
            changed(
                "/data/event",
                json!({"type": "usage", "usage": {"inputTokens": 1.5, "outputTokens": 1, "totalTokens": 2}}),
            ),
        ),
        (
            "a tool call without arguments",
            changed(
                "/data/event",
                json!({"type": "delta", "toolCall": {"id": "c", "name": "n"}}),
            ),
        ),
        (
            "an announcement without the protocol",
            open(without(announcement.clone(), "protocol")),
        ),
        (
            "another protocol",
            open(with(announcement.clone(), "protocol", json!("1.0"))),
        ),
        (
            "a host record's id",
            open(with(announcement.clone(), "sessionId", json!("_host:keys"))),
        ),
        (
            "an empty session id",
            open(with(announcement.clone(), "sessionId", json!(""))),
        ),
        (
            "empty settings announced",
            open(with(announcement.clone(), "settings", json!({}))),
        ),
        (
            "a refused prompt with a turn id",
            turn_end(
                json!({"type": "end", "status": "refused", "interactionId": "turn-1"}),
                host_meta.clone(),
            ),
        ),
        (
            "a turn end without its turn",
            turn_end(
                json!({"type": "end", "status": "completed"}),
                host_meta.clone(),
            ),
        ),
        (
            "a turn end whose meta lacks the turn",
            turn_end(
                json!({"type": "end", "status": "completed", "interactionId": "turn-1"}),
                host_meta.clone(),
            ),
        ),
        (
            "an unknown status",
            turn_end(
                json!({"type": "end", "status": "done", "interactionId": "turn-1"}),
                turn_meta.clone(),
            ),
        ),
        (
            "a diagnostic without a code",
            diagnostic(json!({"level": "warn", "kind": "host", "message": "m", "data": {}})),
        ),
        (
            "a diagnostic at level debug",
            diagnostic(
                json!({"level": "debug", "kind": "host", "message": "m", "data": {"code": "x"}}),
            ),
        ),
        (
            "a diagnostic of an unknown kind",
            diagnostic(
                json!({"level": "warn", "kind": "model", "message": "m", "data": {"code": "x"}}),
            ),
        ),
        (
            "a diagnostic with an event",
            json!({
                "name": "interaction.diagnostic",
                "data": {"kind": "diagnostic", "event": {}, "meta": {"sequence": 3, "timestamp": 1, "sourceId": "host"}}
            }),
        ),
    ];
    for (what, frame) in bad {
        assert!(
            check_server_frame(&frame).is_err(),
            "the schema accepts {what}: {frame}"
        );
    }
    check_server_frame(&turn_end(
        json!({"type": "end", "status": "refused", "promptId": "q-1"}),
        host_meta,
    ))
    .expect("a refused prompt's end conforms");
    check_server_frame(&turn_end(
        json!({"type": "end", "status": "failed", "interactionId": "turn-1"}),
        turn_meta,
    ))
    .expect("a failed turn's end conforms");
}
