//! Properties of the frames the host writes: each reads back to what was
//! written, in either envelope.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::json;

use super::*;

/// The owned parts of a model event: the kind (0 start, 1 delta, 2 text
/// delta, 3 usage, 4 end, 5 error), two texts, a tool call, token counts and
/// diagnostics; each kind uses some of them.
#[derive(Clone, Debug)]
struct ModelParts(
    u8,
    [Option<String>; 2],
    Option<ToolCall>,
    [u64; 3],
    Vec<Diagnostic>,
);

fn model_parts() -> impl Strategy<Value = ModelParts> {
    let call = (text(), text(), text()).prop_map(|(id, name, arguments)| ToolCall {
        id,
        name,
        arguments,
    });
    let diagnostic =
        (text(), text(), prop::option::of(json_value())).prop_map(|(level, message, data)| {
            Diagnostic {
                level,
                message,
                data,
            }
        });
    // Text deltas: nearly every frame of a turn.
    let kind = prop_oneof![2 => 0u8..6, 1 => Just(2u8)];
    let texts = [prop::option::of(text()), prop::option::of(text())];
    (
        kind,
        texts,
        prop::option::of(call),
        any::<[u64; 3]>(),
        vec(diagnostic, 0..3),
    )
        .prop_map(|(kind, texts, call, usage, diagnostics)| {
            ModelParts(kind, texts, call, usage, diagnostics)
        })
}

impl ModelParts {
    fn event(&self) -> ModelEvent<'_> {
        let ModelParts(
            kind,
            [a, b],
            call,
            [input_tokens, output_tokens, total_tokens],
            diagnostics,
        ) = self;
        let (a, b, tool_call) = (a.as_deref(), b.as_deref(), call.as_ref());
        match kind {
            0 => ModelEvent::Start { id: a, model_id: b },
            1 => ModelEvent::Delta {
                text: a,
                reasoning: b,
                tool_call,
            },
            2 => ModelEvent::Delta {
                text: Some(a.unwrap_or_default()),
                reasoning: None,
                tool_call: None,
            },
            3 => {
                let usage = UsageBody {
                    input_tokens: *input_tokens,
                    output_tokens: *output_tokens,
                    total_tokens: *total_tokens,
                };
                ModelEvent::Usage { usage }
            }
            4 => ModelEvent::End {
                finish_reason: a,
                diagnostics,
            },
            _ => {
                let error = ErrorBody {
                    code: a.unwrap_or_default(),
                    message: b.unwrap_or_default(),
                };
                ModelEvent::Error { error, diagnostics }
            }
        }
    }

    /// The event as PROTOCOL.md section 3 spells it, absent fields left out.
    fn expected(&self) -> Value {
        let ModelParts(kind, [a, b], call, [i, o, t], diagnostics) = self;
        let (a, b, call) = (a.as_deref(), b.as_deref(), call.as_ref());
        let call = call.map(|c| json!({ "id": c.id, "name": c.name, "arguments": c.arguments }));
        let usage = json!({ "inputTokens": i, "outputTokens": o, "totalTokens": t });
        let error = json!({ "code": a.unwrap_or_default(), "message": b.unwrap_or_default() });
        let event = match kind {
            0 => with(with(json!({ "type": "start" }), "id", a), "modelId", b),
            1 => {
                let delta = with(json!({ "type": "delta" }), "text", a);
                with(with(delta, "reasoning", b), "toolCall", call)
            }
            2 => json!({ "type": "delta", "text": a.unwrap_or_default() }),
            3 => json!({ "type": "usage", "usage": usage }),
            4 => with(json!({ "type": "end" }), "finishReason", a),
            _ => json!({ "type": "error", "error": error }),
        };
        let entry = |d: &Diagnostic| {
            let entry = json!({ "level": d.level, "message": d.message });
            with(entry, "data", d.data.as_ref())
        };
        let listed: Vec<_> = diagnostics.iter().map(entry).collect();
        let listed = (*kind >= 4 && !listed.is_empty()).then_some(listed);
        with(event, "diagnostics", listed)
    }
}

/// Checks `frame`: one JSON object on one line, equal to the envelope
/// around `body` (under `field`, `event` or `entry`) and `meta`, its fields
/// in the protocol's order.
fn check_frame(
    frame: &str,
    envelope: Envelope,
    (kind, field): (&str, &str),
    body: Value,
    meta: &Meta<'_>,
) -> Result<(), TestCaseError> {
    let parsed: Value = serde_json::from_str(frame)
        .map_err(|err| TestCaseError::fail(format!("not JSON ({err}): {frame}")))?;
    let (sequence, timestamp, source) = (meta.sequence, meta.timestamp, meta.source_id);
    let meta_json = json!({ "sequence": sequence, "timestamp": timestamp, "sourceId": source });
    let meta_json = with(meta_json, "interactionId", meta.interaction_id);
    // Floats in `body` as serde_json reads back its own text.
    let body: Value = serde_json::from_str(&body.to_string()).unwrap_or_default();
    let mut data = json!({ "kind": kind, "meta": meta_json });
    data[field] = body;
    let (data, nesting) = match envelope {
        Envelope::Flat => (data, ""),
        Envelope::Nested => (json!({ "event": data }), r#"{"event":"#),
    };
    prop_assert_eq!(
        &parsed,
        &json!({ "name": format!("interaction.{kind}"), "data": data })
    );
    let head =
        format!(r#"{{"name":"interaction.{kind}","data":{nesting}{{"kind":"{kind}","{field}":"#);
    prop_assert!(frame.starts_with(&head), "{frame}");
    let meta_head =
        format!(r#","meta":{{"sequence":{sequence},"timestamp":{timestamp},"sourceId":"#);
    prop_assert!(frame.contains(&meta_head), "{frame}");
    // One line: a raw line break would split a line-based reader's frame.
    prop_assert!(!frame.contains(['\n', '\r']), "{frame:?}");
    Ok(())
}

fn meta_parts() -> impl Strategy<Value = (u64, u64, String, Option<String>)> {
    let source = prop_oneof![Just(SOURCE_MODEL.into()), Just(SOURCE_HOST.into()), text()];
    (any::<u64>(), any::<u64>(), source, prop::option::of(text()))
}

fn envelope() -> impl Strategy<Value = Envelope> {
    prop_oneof![Just(Envelope::Flat), Just(Envelope::Nested)]
}

proptest! {
    #![proptest_config(config())]

    // Guards every model frame the host writes: one JSON object on one line
    // that reads back to the values written, in either envelope; and the hot
    // path (`write_model`, appending to a buffer) writes serde's bytes.
    #[test]
    fn model_frames_read_back_to_what_was_written(
        parts in model_parts(),
        (sequence, timestamp, source, interaction) in meta_parts(),
        envelope in envelope(),
        before in vec(any::<u8>(), 0..8),
    ) {
        let framer = Framer { envelope };
        let meta = Meta { sequence, timestamp, source_id: &source, interaction_id: interaction.as_deref() };
        let event = parts.event();
        let frame = framer.model(&event, &meta);
        check_frame(&frame, envelope, ("model", "event"), parts.expected(), &meta)?;
        let mut out = bytes::BytesMut::from(&before[..]);
        framer.write_model(&mut out, &event, &meta);
        prop_assert_eq!(&out[..before.len()], &before[..]);
        prop_assert_eq!(&out[before.len()..], frame.as_bytes());
    }

    // The same for the host's own frames: session open, turn end, diagnostics.
    #[test]
    fn host_frames_read_back_to_what_was_written(
        (id, model, status, level, code, message) in (text(), text(), text(), text(), text(), text()),
        (resumed, last, data) in (any::<bool>(), any::<u64>(), prop::option::of(json_value())),
        (sequence, timestamp, source, interaction) in meta_parts(),
        envelope in envelope(),
    ) {
        let framer = Framer { envelope };
        let meta = Meta { sequence, timestamp, source_id: &source, interaction_id: interaction.as_deref() };
        let settings = crate::core::settings::SessionSettings {
            system: Some(message.clone()),
            model: Some(model.clone()),
            params: None,
        };
        let open = SessionEvent::Open { session_id: &id, resumed, model: &model, last_sequence: last, settings: resumed.then_some(&settings) };
        let want = json!({ "type": "open", "sessionId": id, "resumed": resumed, "model": model, "lastSequence": last, "protocol": crate::protocol::PROTOCOL_VERSION });
        let want = with(want, "settings", resumed.then(|| json!({ "system": message, "model": model })));
        check_frame(&framer.session(&open, &meta), envelope, ("session", "event"), want, &meta)?;
        let updated = SessionEvent::Updated { settings: &settings };
        let want = json!({ "type": "updated", "settings": { "system": message, "model": model } });
        check_frame(&framer.session(&updated, &meta), envelope, ("session", "event"), want, &meta)?;
        let end = TurnEvent::End { status: &status, interaction_id: &id, prompt_id: Some(&code) };
        let want = with(json!({ "type": "end", "status": status }), "interactionId", (!id.is_empty()).then_some(&id));
        let want = with(want, "promptId", Some(&code));
        check_frame(&framer.turn(&end, &meta), envelope, ("turn", "event"), want, &meta)?;
        let entry = protocol_diagnostic(&level, &code, &message);
        let want = json!({ "level": level, "kind": "protocol", "message": message, "data": { "code": code } });
        check_frame(&framer.diagnostic(&entry, &meta), envelope, ("diagnostic", "entry"), want, &meta)?;
        let entry = DiagnosticEntry { level: &level, kind: &status, message: &message, data: data.clone() };
        let want = with(json!({ "level": level, "kind": status, "message": message }), "data", data);
        check_frame(&framer.diagnostic(&entry, &meta), envelope, ("diagnostic", "entry"), want, &meta)?;
    }
}
