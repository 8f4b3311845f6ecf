//! The grammar of `session.update` (PROTOCOL.md section 2) for the
//! properties in [`super`]: the commands it accepts, and valid ones.

use super::*;

/// The fields of a session update command.
const FIELDS: [&str; 4] = ["type", "system", "model", "params"];

/// What the grammar makes of a `session.update` object's `fields`: the
/// command, or none when it is refused.
pub(super) fn expected(fields: &Map<String, Value>) -> Option<Command> {
    let unknown = |key: &String| !FIELDS.contains(&key.as_str());
    if fields.keys().any(unknown) {
        return None;
    }
    let params = match fields.get("params") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(value) => Some(Some(expected_params(value.as_object()?)?)),
    };
    Some(Command::SessionUpdate {
        system: given(fields.get("system"), string)?,
        model: given(fields.get("model"), string)?,
        params,
    })
}

/// `Some(None)` for absent, `Some(Some(None))` for null, `Some(Some(Some(x)))`
/// for what `read` takes.
fn given<T>(value: Option<&Value>, read: fn(&Value) -> Option<T>) -> Option<Option<Option<T>>> {
    match value {
        None => Some(None),
        Some(Value::Null) => Some(Some(None)),
        Some(value) => read(value).map(|x| Some(Some(x))),
    }
}

/// A valid `session.update`, its fields in any order.
pub(super) fn command() -> BoxedStrategy<Vec<(String, Json)>> {
    let text_or_null = || {
        prop::option::of(prop_oneof![
            Just(Json::Raw("null".to_owned())),
            text().prop_map(Json::Str),
        ])
    };
    let update = (
        text_or_null(),
        text_or_null(),
        prop::option::of(prop::option::of(params(false))),
    )
        .prop_flat_map(|(system, model, params)| {
            let mut fields = vec![("type".to_owned(), Json::Str("session.update".to_owned()))];
            fields.extend(system.map(|s| ("system".to_owned(), s)));
            fields.extend(model.map(|m| ("model".to_owned(), m)));
            let params = params.map(|p| match p {
                None => Json::Raw("null".to_owned()),
                Some(p) => Json::Obj(
                    p.iter()
                        .map(|(k, v)| (k.clone(), Json::Raw(v.to_string())))
                        .collect(),
                ),
            });
            fields.extend(params.map(|p| ("params".to_owned(), p)));
            Just(fields).prop_shuffle()
        });
    update.boxed()
}
