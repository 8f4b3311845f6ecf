//! Property tests ("fuzz targets") of the protocol's two edges:
//! [`Command::parse`], which reads whatever a command-mode client sends, and
//! [`Framer`], which writes every frame the host sends.
//!
//! Each property runs 256 cases, so `cargo test -p llm-host --lib` stays
//! fast. To search longer:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test -p llm-host --lib protocol::fuzz
//! ```
//!
//! `PROPTEST_RNG_SEED=N` replays a run. Failing cases are printed (shrunk),
//! not written to a regressions file; a case worth keeping becomes a unit
//! test in `protocol.rs`. The frames' properties are in [`frames`].

use std::fmt::Write as _;

use llm_host_plugin_api::{ToolSpec, TurnParams};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Number};

use super::*;

mod frames;
mod update;

/// `object` with `key` set to `value`, if there is one.
fn with<T: Serialize>(mut object: Value, key: &str, value: Option<T>) -> Value {
    if let Some(value) = value {
        object[key] = json!(value);
    }
    object
}

/// The codes `Command::parse` may refuse with (PROTOCOL.md section 6).
const CODES: [&str; 2] = ["bad_frame", "unknown_command"];
/// The fields of a prompt command.
const PROMPT_FIELDS: [&str; 5] = ["type", "id", "text", "model", "params"];
/// The fields of a tool result command.
const TOOL_RESULT_FIELDS: [&str; 4] = ["type", "callId", "content", "error"];
/// The fields of `params` with a type; any other is passed on as it is.
const TYPED: &str = "temperature maxTokens topP topK seed stop tools";
/// More keys for generated objects: the real ones and near misses.
const KEYS: &str = "type text model params name description parameters max_tokens Type texts \
     callId content error system";
/// Characters JSON escapes, or that trip hand-written escaping.
const AWKWARD: &str = "\"\\/\n\r\t\u{0}\u{8}\u{c}\u{1f}\u{7f}\u{2028}\u{2029}\u{feff}é🦀a ";

fn typed() -> Vec<&'static str> {
    TYPED.split(' ').collect()
}

// --- Generated JSON ----------------------------------------------------------

/// Any text, or text made of the awkward characters.
fn text() -> BoxedStrategy<String> {
    let awkward = vec(select(AWKWARD.chars().collect::<Vec<_>>()), 0..24);
    prop_oneof![any::<String>(), awkward.prop_map(String::from_iter)].boxed()
}

fn key() -> BoxedStrategy<String> {
    let keys: Vec<_> = KEYS.split(' ').chain(typed()).chain([""]).collect();
    prop_oneof![4 => select(keys).prop_map(str::to_owned), 1 => "[a-zA-Z_]{1,8}", 1 => text()]
        .boxed()
}

/// JSON trees with keys near the protocol's.
fn json_value() -> BoxedStrategy<Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u32..300).prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        select(vec!["prompt", "cancel", ""]).prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    scalar
        .prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((key(), inner), 0..6).prop_map(|f| Value::Object(f.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A valid value of the `params` field `key` (any JSON for an untyped one).
fn param(key: &str) -> BoxedStrategy<Value> {
    let null = Just(Value::Null);
    match key {
        "temperature" | "topP" => prop_oneof![
            null,
            (0u32..=200).prop_map(|k| json!(f64::from(k) / 100.0)),
            (0u32..1000).prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        ]
        .boxed(),
        "maxTokens" | "topK" | "seed" => {
            prop_oneof![null, any::<u64>().prop_map(Value::from)].boxed()
        }
        "stop" => vec(text().prop_map(Value::String), 0..3)
            .prop_map(Value::Array)
            .boxed(),
        "tools" => {
            let fields = (
                text(),
                prop::option::of(text()),
                prop::option::of(json_value()),
            );
            let tool = fields.prop_map(|(name, description, parameters)| {
                let tool = with(json!({ "name": name }), "description", description);
                with(tool, "parameters", parameters)
            });
            vec(tool, 0..3).prop_map(Value::Array).boxed()
        }
        _ => json_value(),
    }
}

/// Values of the wrong type for `key`.
fn wrong_values(key: &str) -> Vec<&'static str> {
    let values = match key {
        "type" => r#"1 true null [] {} ["prompt"]"#,
        "text" => r#"1 false null [] {} ["hi"]"#,
        "model" | "system" => "1 true [] {}",
        "params" => r#"1 true null "x" []"#,
        "temperature" | "topP" => r#""0.5" true [] {}"#,
        "maxTokens" | "topK" | "seed" => r#"-1 1.5 1e3 "256" true 18446744073709551616"#,
        "stop" => r#""END" [1] {} null"#,
        _ => r#"{} [1] [{}] [{"name":1}] [{"name":"a","description":null}] [[]] null"#,
    };
    values.split(' ').collect()
}

/// `params` fields, keys unique, in any order: valid values, or with
/// `near`, sometimes values of the wrong type or any JSON.
fn params(near: bool) -> BoxedStrategy<Vec<(String, Value)>> {
    let key = prop_oneof![3 => select(typed()).prop_map(str::to_owned), 1 => key()];
    let field = key.prop_flat_map(move |key| {
        let wrong = wrong_values(&key)
            .into_iter()
            .filter_map(|w| serde_json::from_str(w).ok());
        let value = match near {
            true => prop_oneof![
                3 => param(&key),
                1 => select(wrong.collect::<Vec<Value>>()),
                1 => json_value(),
            ]
            .boxed(),
            false => param(&key),
        };
        (Just(key), value)
    });
    vec(field, 0..5)
        .prop_flat_map(|mut fields| {
            let mut seen = std::collections::HashSet::new();
            fields.retain(|(key, _)| seen.insert(key.clone()));
            Just(fields).prop_shuffle()
        })
        .boxed()
}

/// Objects shaped like commands: mostly a real `type`, and fields mostly
/// of the right type.
fn command_like() -> BoxedStrategy<Value> {
    let kind = prop_oneof![
        6 => Just(json!("prompt")),
        2 => Just(json!("cancel")),
        2 => Just(json!("tool_result")),
        2 => Just(json!("session.update")),
        1 => json_value(),
    ];
    let result_text = || prop::option::weighted(0.5, mostly_text()).boxed();
    let mostly = |good: BoxedStrategy<Value>| prop_oneof![4 => good, 1 => json_value()];
    let model = prop_oneof![Just(Value::Null), "[a-z]{0,6}".prop_map(Value::String)].boxed();
    let params = params(true).prop_map(|p| Value::Object(p.into_iter().collect()));
    let fields = (
        prop::option::weighted(0.9, kind),
        prop::option::weighted(0.9, mostly(text().prop_map(Value::String).boxed())),
        prop::option::weighted(0.4, mostly(model)),
        prop::option::weighted(0.6, mostly(params.boxed())),
        prop::option::weighted(0.1, (key(), json_value())),
        (result_text(), result_text(), result_text(), result_text()),
    );
    fields
        .prop_map(
            |(kind, text, model, params, other, (call_id, content, error, system))| {
                let mut fields: Map<String, Value> = other.into_iter().collect();
                let named = [
                    "text", "model", "params", "type", "callId", "content", "error", "system",
                ]
                .into_iter()
                .zip([text, model, params, kind, call_id, content, error, system]);
                fields.extend(named.filter_map(|(name, value)| Some((name.to_owned(), value?))));
                Value::Object(fields)
            },
        )
        .boxed()
}

/// Mostly text, sometimes any JSON.
fn mostly_text() -> BoxedStrategy<Value> {
    prop_oneof![4 => text().prop_map(Value::String), 1 => json_value()].boxed()
}

// --- The grammar, written without serde --------------------------------------

/// What the grammar (PROTOCOL.md section 2, `TurnParams`, `ToolSpec`) makes
/// of `value`: the command, or the code it is refused with.
fn expected(value: &Value) -> Result<Command, &'static str> {
    let Some(fields) = value.as_object() else {
        return Err("bad_frame");
    };
    match fields.get("type").and_then(Value::as_str) {
        None => Err("bad_frame"),
        Some("cancel") if fields.len() == 1 => Ok(Command::Cancel),
        Some("prompt") => expected_prompt(fields).ok_or("bad_frame"),
        Some("tool_result") => expected_tool_result(fields).ok_or("bad_frame"),
        Some("session.update") => update::expected(fields).ok_or("bad_frame"),
        Some("cancel") => Err("bad_frame"),
        Some(_) => Err("unknown_command"),
    }
}

fn expected_prompt(fields: &Map<String, Value>) -> Option<Command> {
    let unknown = |key: &String| !PROMPT_FIELDS.contains(&key.as_str());
    if fields.keys().any(unknown) {
        return None;
    }
    let params = match fields.get("params") {
        None => TurnParams::default(),
        Some(value) => expected_params(value.as_object()?)?,
    };
    let id = nullable(fields.get("id"), string)?;
    if id.as_ref().is_some_and(|id| id.len() > MAX_PROMPT_ID_BYTES) {
        return None;
    }
    Some(Command::Prompt {
        id,
        text: string(fields.get("text")?)?,
        model: nullable(fields.get("model"), string)?,
        params,
    })
}

fn expected_tool_result(fields: &Map<String, Value>) -> Option<Command> {
    let unknown = |key: &String| !TOOL_RESULT_FIELDS.contains(&key.as_str());
    if fields.keys().any(unknown) {
        return None;
    }
    let call_id = string(fields.get("callId")?)?;
    if call_id.is_empty() || call_id.len() > MAX_CALL_ID_BYTES {
        return None;
    }
    let content = nullable(fields.get("content"), string)?;
    let error = nullable(fields.get("error"), string)?;
    if content.is_some() == error.is_some() {
        return None;
    }
    Some(Command::ToolResult {
        call_id,
        content,
        error,
    })
}

fn string(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

/// `Some(None)` for absent or null, `Some(Some(x))` for what `read` takes.
fn nullable<T>(value: Option<&Value>, read: fn(&Value) -> Option<T>) -> Option<Option<T>> {
    match value {
        None | Some(Value::Null) => Some(None),
        Some(value) => read(value).map(Some),
    }
}

fn list<T>(value: &Value, read: fn(&Value) -> Option<T>) -> Option<Vec<T>> {
    value.as_array()?.iter().map(read).collect()
}

fn expected_params(fields: &Map<String, Value>) -> Option<TurnParams> {
    let mut params = TurnParams::default();
    for (key, value) in fields {
        let given = Some(value);
        match key.as_str() {
            "temperature" => params.temperature = nullable(given, Value::as_f64)?,
            "maxTokens" => params.max_tokens = nullable(given, Value::as_u64)?,
            "topP" => params.top_p = nullable(given, Value::as_f64)?,
            "topK" => params.top_k = nullable(given, Value::as_u64)?,
            "seed" => params.seed = nullable(given, Value::as_u64)?,
            "stop" => params.stop = list(value, string)?,
            "tools" => params.tools = list(value, tool_spec)?,
            _ => drop(params.extra.insert(key.clone(), value.clone())),
        }
    }
    Some(params)
}

/// A tool: an object with a string `name`, a string `description` if any
/// and any `parameters`; other fields are ignored. Never an array (serde
/// would read a struct from one; see `a_tool_is_an_object`).
fn tool_spec(value: &Value) -> Option<ToolSpec> {
    let (name, description, parameters) = match value {
        Value::Object(fields) => (
            fields.get("name")?,
            fields.get("description"),
            fields.get("parameters"),
        ),
        _ => return None,
    };
    Some(ToolSpec {
        name: string(name)?,
        description: description.map_or(Some(String::new()), string)?,
        parameters: parameters.cloned().unwrap_or_default(),
    })
}

/// Parses `text`, checking that a refusal has a known code and a message.
fn parse_checked(text: &str) -> Result<Result<Command, &'static str>, TestCaseError> {
    match Command::parse(text) {
        Ok(command) => Ok(Ok(command)),
        Err((code, message)) => {
            prop_assert!(CODES.contains(&code), "code {code:?} for {text:?}");
            prop_assert!(!message.trim().is_empty(), "no message for {text:?}");
            Ok(Err(code))
        }
    }
}

// --- Commands written by hand ------------------------------------------------

/// JSON as the test writes it, so that keys can be repeated and strings
/// escaped in more than one way.
#[derive(Clone, Debug)]
enum Json {
    Str(String),
    /// JSON text as it is.
    Raw(String),
    Obj(Vec<(String, Json)>),
}

/// How text is written: the whitespace between tokens, and whether strings
/// escape all but ASCII letters and digits (`\/`, `\b`, `\f`, `\uXXXX` in
/// mixed case, surrogate pairs past U+FFFF) or only what JSON must.
type Style = (String, bool);

fn write_str(out: &mut String, text: &str, escape_all: bool) {
    if !escape_all {
        return out.push_str(&Value::from(text).to_string());
    }
    out.push('"');
    for c in text.chars() {
        match c {
            c if c.is_ascii_alphanumeric() => out.push(c),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c => {
                for &mut unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = match unit % 2 {
                        0 => write!(out, "\\u{unit:04X}"),
                        _ => write!(out, "\\u{unit:04x}"),
                    };
                }
            }
        }
    }
    out.push('"');
}

fn write_value(out: &mut String, value: &Json, style: &Style) {
    let (space, escape_all) = style;
    match value {
        Json::Str(text) => write_str(out, text, *escape_all),
        Json::Raw(raw) => out.push_str(raw),
        Json::Obj(fields) => {
            out.push('{');
            for (i, (key, value)) in fields.iter().enumerate() {
                out.push_str(if i == 0 { "" } else { "," });
                out.push_str(space);
                write_str(out, key, *escape_all);
                write!(out, "{space}:{space}").unwrap_or_default();
                write_value(out, value, style);
            }
            write!(out, "{space}}}").unwrap_or_default();
        }
    }
}

fn render(fields: &[(String, Json)], style: &Style) -> String {
    let mut out = style.0.clone();
    write_value(&mut out, &Json::Obj(fields.to_vec()), style);
    out + &style.0
}

/// A valid command, its fields in any order (strings as `Json::Str`, to be
/// escaped by the style), and the object it stands for.
fn command() -> BoxedStrategy<(Vec<(String, Json)>, Value)> {
    let kind = |name: &str| ("type".to_owned(), Json::Str(name.to_owned()));
    let model = prop::option::of(prop_oneof![
        Just(Json::Raw("null".to_owned())),
        "[a-z0-9_-]{0,12}".prop_map(Json::Str),
    ]);
    let prompt = (text(), model, prop::option::of(params(false))).prop_flat_map(
        move |(text, model, params)| {
            let mut fields = vec![kind("prompt"), ("text".to_owned(), Json::Str(text))];
            fields.extend(model.map(|m| ("model".to_owned(), m)));
            let params = params.map(|p| {
                p.iter()
                    .map(|(k, v)| (k.clone(), Json::Raw(v.to_string())))
                    .collect()
            });
            fields.extend(params.map(|p| ("params".to_owned(), Json::Obj(p))));
            Just(fields).prop_shuffle()
        },
    );
    let update = update::command();
    prop_oneof![4 => prompt.boxed(), 2 => update.boxed(), 1 => Just(vec![kind("cancel")]).boxed()]
        .prop_map(|fields| {
            let value = meant(&Json::Obj(fields.clone()));
            (fields, value)
        })
        .boxed()
}

/// The value `json` stands for (serde_json reads `Raw` parts, so floats
/// are what it makes of their text).
fn meant(json: &Json) -> Value {
    match json {
        Json::Str(text) => json!(text),
        Json::Raw(raw) => serde_json::from_str(raw).unwrap_or_default(),
        Json::Obj(fields) => fields.iter().map(|(k, v)| (k.clone(), meant(v))).collect(),
    }
}

/// The fields of `params`, added empty if the command has none (or has
/// `null`).
fn params_of(fields: &mut Vec<(String, Json)>) -> &mut Vec<(String, Json)> {
    fields.retain(|(key, value)| key != "params" || matches!(value, Json::Obj(_)));
    if !fields.iter().any(|(key, _)| key == "params") {
        fields.push(("params".to_owned(), Json::Obj(Vec::new())));
    }
    match fields.iter_mut().find(|(key, _)| key == "params") {
        Some((_, Json::Obj(params))) => params,
        _ => unreachable!("a valid command's params is an object"),
    }
}

/// Breaks a valid command's `fields` in way `kind` (see the match), at the
/// places `one` and `two` pick; answers the code it must be refused with.
fn mutate(
    fields: &mut Vec<(String, Json)>,
    kind: u8,
    [one, two]: [Index; 2],
    name: &str,
) -> &'static str {
    let is = |name: &str| {
        fields
            .iter()
            .any(|(key, value)| key == "type" && matches!(value, Json::Str(kind) if kind == name))
    };
    let (cancel, update) = (is("cancel"), is("session.update"));
    match kind {
        // A field the command does not have.
        0 => fields.push((format!("{name}_"), Json::Raw("1".to_owned()))),
        // A field written twice, the copy at another place.
        1 => {
            let copy = one.get(fields).clone();
            fields.insert(two.index(fields.len() + 1), copy);
        }
        // A typed field of `params` written twice (a cancel gets a
        // `params`, which it may not have).
        2 => {
            let params = params_of(fields);
            let typed = typed();
            let mut given: Vec<_> = params
                .iter()
                .filter(|(k, _)| typed.contains(&k.as_str()))
                .cloned()
                .collect();
            if given.is_empty() && !cancel {
                given.push(("seed".to_owned(), Json::Raw("7".to_owned())));
                params.extend(given.clone());
            }
            if !cancel {
                params.insert(two.index(params.len() + 1), one.get(&given).clone());
            }
        }
        // A field given a value of another type (`params` of an update
        // may be `null`).
        3 => {
            let (key, json) = one.get_mut(fields);
            let mut wrong = wrong_values(key);
            wrong.retain(|value| !(update && key == "params" && *value == "null"));
            *json = Json::Raw(two.get(&wrong).to_string());
        }
        // A typed field of `params` given a value of another type.
        4 => {
            let key = *one.get(&typed());
            let wrong = Json::Raw(two.get(&wrong_values(key)).to_string());
            let params = params_of(fields);
            params.retain(|(name, _)| name != key);
            params.push((key.to_owned(), wrong));
        }
        // No `type`.
        5 => fields.retain(|(key, _)| key != "type"),
        // A `type` naming no command.
        _ => {
            let kind = Json::Str(format!("{name}!"));
            fields
                .iter_mut()
                .filter(|(key, _)| key == "type")
                .for_each(|f| f.1 = kind.clone());
            return "unknown_command";
        }
    }
    "bad_frame"
}

fn style() -> impl Strategy<Value = Style> {
    ("[ \t\r\n]{0,2}", any::<bool>())
}

/// JSON-ish tokens, to reach past the first character of the parser.
fn tokens() -> impl Strategy<Value = String> {
    let tokens = r#"{ } [ ] : , " \ \u d800 null 1e999 -0 "type" "prompt" "cancel" "text" "params" "maxTokens" "tools" "x""#;
    let tokens: Vec<&str> = tokens.split(' ').chain([" ", "\u{0}", "é"]).collect();
    vec(select(tokens), 0..40).prop_map(|tokens| tokens.concat())
}

/// 256 cases a property, or `PROPTEST_CASES`; failures are printed, not
/// written to a regressions file.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    // Guards the socket task against any text frame (any text, JSON-ish
    // tokens, bytes a broken encoder sent made UTF-8): parsing never panics,
    // and a refusal has a known code and a message to show.
    #[test]
    fn any_text_is_parsed_or_refused_with_a_code(
        text in prop_oneof![any::<String>(), tokens()],
        bytes in vec(any::<u8>(), 0..256),
    ) {
        let _ = parse_checked(&text)?;
        let _ = parse_checked(&String::from_utf8_lossy(&bytes))?;
    }

    // Guards the grammar on any JSON: what is accepted is exactly what the
    // grammar (written above without serde) accepts, parsed to the same
    // command, and what is refused is refused with the grammar's code.
    #[test]
    fn any_json_is_judged_as_the_grammar_says(
        value in prop_oneof![json_value(), command_like()],
        pretty in any::<bool>(),
    ) {
        let text = match pretty {
            true => serde_json::to_string_pretty(&value).unwrap_or_default(),
            false => value.to_string(),
        };
        // Judged on the value as serde_json reads it back (floats included).
        let read: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parse_checked(&text)?, expected(&read), "{}", text);
    }

    // Guards acceptance: a command written from its parts (any text, any key
    // order, any whitespace, strings escaped in several ways) is accepted and
    // parses to exactly those parts.
    #[test]
    fn valid_commands_parse_to_their_parts((fields, value) in command(), style in style()) {
        let text = render(&fields, &style);
        let want = expected(&value);
        prop_assert!(want.is_ok(), "the generator wrote an invalid command: {}", text);
        prop_assert_eq!(parse_checked(&text)?, want, "{}", text);
    }

    // Guards strictness: an unknown field, a key given twice, a value of the
    // wrong type, a missing or unknown `type`: refused, with their code.
    #[test]
    fn broken_commands_are_refused(
        (mut fields, _) in command(),
        (kind, one, two, name) in (0u8..7, any::<Index>(), any::<Index>(), "[a-zA-Z_]{1,10}"),
        style in style(),
    ) {
        let code = mutate(&mut fields, kind, [one, two], &name);
        let text = render(&fields, &style);
        prop_assert_eq!(parse_checked(&text)?, Err(code), "{}", text);
    }

    // Guards `params` against a key given twice, as the rest of a command
    // is guarded: refused, rather than one of the two values picked.
    #[test]
    fn a_params_key_given_twice_is_refused(
        (mut fields, _) in command(),
        (name, first, second, at) in ("x_[a-z]{1,6}", json_value(), json_value(), any::<Index>()),
        style in style(),
    ) {
        let params = params_of(&mut fields);
        params.push((name.clone(), Json::Raw(first.to_string())));
        params.insert(at.index(params.len() + 1), (name, Json::Raw(second.to_string())));
        let text = render(&fields, &style);
        prop_assert_eq!(parse_checked(&text)?.map(drop), Err("bad_frame"), "{}", text);
    }

    // Guards tools: a tool is an object (`ToolSpec`); serde also reads a
    // struct from an array of its fields in order.
    #[test]
    fn a_tool_is_an_object(name in text(), description in prop::option::of(text())) {
        let tool: Vec<_> = [Some(name), description].into_iter().flatten().collect();
        let text = json!({ "type": "prompt", "text": "hi", "params": { "tools": [tool] } });
        prop_assert_eq!(parse_checked(&text.to_string())?.map(drop), Err("bad_frame"), "{}", text);
    }
}
