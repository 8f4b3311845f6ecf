//! `${VAR}` in config strings: replaced by the environment variable's
//! value when the config is read (at start and on every reload), so that a
//! DSN's password or a per-host name need not be written into the file.
//! `$${` writes a literal `${`. A variable that is not set is a problem
//! naming the key and the variable.

use toml::Value;

/// Replaces `${VAR}` in every string of `value`, at any depth; `at` is the
/// dotted key of `value`, for problems.
pub(super) fn substitute(value: &mut Value, at: &str, problems: &mut Vec<String>) {
    match value {
        Value::String(text) if text.contains('$') => *text = expand(text, at, problems),
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute(item, &format!("{at}[{i}]"), problems);
            }
        }
        Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let at = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                substitute(item, &at, problems);
            }
        }
        _ => {}
    }
}

fn expand(text: &str, at: &str, problems: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(open) = after.strip_prefix("${") {
            match open.find('}') {
                Some(end) if is_name(&open[..end]) => {
                    let name = &open[..end];
                    match std::env::var(name) {
                        Ok(value) => out.push_str(&value),
                        Err(_) => problems.push(format!(
                            "{at}: `${{{name}}}` names an environment variable that is not set"
                        )),
                    }
                    rest = &open[end + 1..];
                }
                _ => {
                    problems.push(format!(
                        "{at}: `${{` starts no variable name (write `$${{` for a literal `${{`)"
                    ));
                    out.push_str("${");
                    rest = open;
                }
            }
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    out
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_replaced_at_any_depth_and_missing_ones_named() {
        std::env::set_var("LLM_HOST_VARS_TEST_PASS", "hunter2");
        let mut value: Value = toml::from_str(
            r#"
            url = "postgres://me:${LLM_HOST_VARS_TEST_PASS}@db/x"
            literal = "cost: $5, $${NOT_A_VAR}"
            [stores.a.settings]
            list = ["${LLM_HOST_VARS_TEST_MISSING}", "plain"]
            bad = "${not closed"
            "#,
        )
        .expect("toml");
        let mut problems = Vec::new();
        substitute(&mut value, "", &mut problems);
        assert_eq!(value["url"].as_str(), Some("postgres://me:hunter2@db/x"));
        assert_eq!(value["literal"].as_str(), Some("cost: $5, ${NOT_A_VAR}"));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("stores.a.settings.bad"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("stores.a.settings.list[0]")
                && problems[1].contains("LLM_HOST_VARS_TEST_MISSING"),
            "{problems:?}"
        );
    }
}
