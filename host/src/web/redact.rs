//! What `GET /v1/config` shows of the config: every secret replaced by
//! `[redacted]`.
//!
//! The host cannot know every plugin's settings, so redaction does not rely
//! on a list of secret settings: every value is judged by where it sits and
//! what it looks like, and a string is shown only when it holds no credential
//! form. The rule, applied to the whole config:
//!
//! - **Keys that name a secret.** A key containing `key`, `secret`, `pass`
//!   (`password`, `passwd`, `passphrase`), `pwd`, `credential`, `auth`
//!   (`authorization`), `bearer`, `dsn`, `private`, `cookie` or `jwt`, in any
//!   case and spelling (`apiKey`, `API-KEY`, `session_key`): its value is
//!   replaced whole (strings, numbers, arrays, tables); only booleans and
//!   nulls stay. Two exceptions in the host's own config: its `auth` table
//!   (key secrets are never serialized; its `keys` list shows each key's
//!   `id` and `admin` flag and nothing else),
//!   and the names of backends and stores (`[models.NAME]`,
//!   `[stores.NAME]`), which are names, not settings.
//! - **Keys that name tokens** (`token`, `max_tokens`, `token_limit`) hold
//!   counts as often as credentials: numbers and booleans stay, strings go.
//! - **`*_env` keys** (`api_key_env`) name an environment variable: the value
//!   stays when it is a variable name (`A-Z a-z 0-9 _`, not starting with a
//!   digit), and goes otherwise.
//! - **Header maps** (a key containing `header`): every value goes, except
//!   those of `Accept`, `Accept-Encoding`, `Accept-Language`, `Content-Type`
//!   and `User-Agent`, which are judged as any other string.
//! - **Any other string** (and every table key) stays only if it holds no
//!   credential form. What such forms are replaced by `[redacted]`:
//!   - the userinfo of a URL, user name included (`postgres://[redacted]@db/x`);
//!   - the value of a `name=value` or `name: value` pair whose name is a
//!     secret as above: libpq connection strings (`password=x`,
//!     `password = 'x y'`), URL query parameters (`?api_key=x`,
//!     `?sslpassword=x`), `Authorization: ...`, JSON text, command-line
//!     options (`--api-key x`); an unquoted value runs to the next
//!     whitespace, a quoted one to its closing quote;
//!   - the word after `Bearer` or `Basic`;
//!   - tokens with the prefix of a well-known API key (`sk-`, `ghp_`,
//!     `xoxb-`, `AKIA`, ...).
//!
//!   The result is checked again: if it still holds one of these forms, or
//!   an `@` that follows a `://` without being the `@` of a redacted
//!   userinfo (a URL with `@` in its path or query, or a password holding
//!   `/`), or an `@` after `user:` outside a URL, the whole string is
//!   replaced.
//!
//! In an array, an option is judged as the key of the item after it:
//! `["--api-key", "x"]` hides `x`, `["--max-tokens", 5]` shows `5`. Numbers
//! and booleans under other keys are shown as they are.

use std::ops::Range;

use serde_json::{Map, Value};

/// What a secret is replaced by.
pub const REDACTED: &str = "[redacted]";

/// Words that make a key name a secret (separated by spaces), matched in the
/// key lowercased with everything but letters and digits removed.
const SECRET_WORDS: &str = "key secret pass pwd credential auth bearer dsn private cookie jwt";

/// Headers whose values are judged as ordinary strings (separated by
/// spaces); every other header's value is replaced.
const HARMLESS_HEADERS: &str = "accept accept-encoding accept-language content-type user-agent";

/// Prefixes of well-known API keys (separated by spaces).
const KEY_PREFIXES: &str = "sk- sk_ rk_ ghp_ gho_ ghs_ ghu_ ghr_ github_pat_ glpat- \
                            xoxa- xoxb- xoxp- xoxs- hf_ AKIA AIza";

/// A key prefix counts from this many characters of key.
const KEY_MIN_LEN: usize = 20;

/// Replaces every secret in `config` (the config serialized as JSON).
pub fn redact(config: &mut Value) {
    // Key ids and admin flags are the operator's names and rights, shown;
    // nothing else of a key is.
    let keys: Option<Vec<Value>> =
        config
            .pointer("/auth/keys")
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .map(|key| {
                        serde_json::json!({
                            "id": key.get("id").and_then(Value::as_str).unwrap_or_default(),
                            "admin": key.get("admin").and_then(Value::as_bool).unwrap_or(false),
                        })
                    })
                    .collect()
            });
    *config = match std::mem::take(config) {
        Value::Object(map) => Value::Object(entries(map, |key| match key {
            "auth" => Under::Plain,
            "models" | "stores" => Under::Names,
            key => judge(key),
        })),
        other => walk(other, Under::Plain),
    };
    if let (Some(keys), Some(auth)) = (keys, config.get_mut("auth")) {
        auth["keys"] = Value::Array(keys);
    }
}

/// What the key above a value says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Under {
    /// Nothing: strings are judged by their content.
    Plain,
    /// A table keyed by names the operator chose (`models`, `stores`):
    /// each entry is judged as under [`Under::Plain`], whatever its name.
    Names,
    /// A key naming a secret: all but booleans and nulls go.
    Secret,
    /// A key naming tokens: numbers stay, strings go.
    Tokens,
    /// A map of HTTP headers.
    Headers,
    /// A key naming an environment variable.
    EnvName,
}

/// What `key` says about its value.
fn judge(key: &str) -> Under {
    let lower = key.to_lowercase();
    if lower.len() > 4
        && (lower.ends_with("_env") || lower.ends_with("-env") || key.ends_with("Env"))
    {
        return Under::EnvName;
    }
    let compact: String = lower.chars().filter(|c| c.is_alphanumeric()).collect();
    if SECRET_WORDS.split(' ').any(|word| compact.contains(word)) {
        Under::Secret
    } else if compact.contains("header") {
        Under::Headers
    } else if compact.contains("token") {
        Under::Tokens
    } else {
        Under::Plain
    }
}

fn redacted() -> Value {
    Value::String(REDACTED.to_owned())
}

/// `value` with its secrets replaced, judged as sitting `under` a key.
fn walk(value: Value, under: Under) -> Value {
    match (under, value) {
        (_, Value::Null) => Value::Null,
        (_, Value::Bool(b)) => Value::Bool(b),
        (Under::Secret, _) => redacted(),
        (Under::Names, Value::Object(map)) => Value::Object(entries(map, |_| Under::Plain)),
        (Under::Headers, Value::Object(map)) => Value::Object(entries(map, |name| {
            if HARMLESS_HEADERS
                .split(' ')
                .any(|harmless| name.eq_ignore_ascii_case(harmless))
            {
                Under::Plain
            } else {
                Under::Secret
            }
        })),
        (Under::Headers, _) => redacted(),
        (Under::Tokens, Value::String(_)) => redacted(),
        (Under::EnvName, Value::String(name)) if variable_name(&name) => Value::String(name),
        (Under::EnvName, Value::String(_)) => redacted(),
        (_, Value::String(text)) => Value::String(clean(&text)),
        (_, Value::Number(n)) => Value::Number(n),
        (_, Value::Array(items)) => {
            // `["--api-key", "x"]`: an option is the key of the next item.
            let mut after_option = Under::Plain;
            let items = items.into_iter().map(|item| {
                let this = match after_option {
                    Under::Plain | Under::Names => under,
                    option => option,
                };
                after_option = match &item {
                    Value::String(option) if option.starts_with('-') => judge(option),
                    _ => Under::Plain,
                };
                walk(item, this)
            });
            Value::Array(items.collect())
        }
        (_, Value::Object(map)) => Value::Object(entries(map, |key| match (under, judge(key)) {
            (Under::Tokens, Under::Plain) => Under::Tokens,
            (_, own) => own,
        })),
    }
}

/// A table's entries walked, each under what `judge` says of its key; keys
/// holding a credential form are replaced too.
fn entries(map: Map<String, Value>, judge: impl Fn(&str) -> Under) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in map {
        let value = walk(value, judge(&key));
        let mut name = clean(&key);
        let mut n = 1;
        while out.contains_key(&name) {
            n += 1;
            name = format!("{REDACTED} {n}");
        }
        out.insert(name, value);
    }
    out
}

/// `A-Z a-z 0-9 _`, not starting with a digit.
fn variable_name(text: &str) -> bool {
    !text.is_empty()
        && !text.starts_with(|c: char| c.is_ascii_digit())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `text` with its credential forms replaced, or [`REDACTED`] whole when the
/// replaced text still holds one.
fn clean(text: &str) -> String {
    let rewritten = replace(text, secret_spans(text));
    // A span left must be one replaced: it starts with the placeholder (what
    // follows it, such as the `,` after a quoted value, was outside every
    // span of the first pass).
    let left = secret_spans(&rewritten);
    if left
        .iter()
        .all(|span| rewritten[span.clone()].starts_with(REDACTED))
        && !stray_at(&rewritten)
    {
        rewritten
    } else {
        REDACTED.to_owned()
    }
}

/// `text` with `spans` (merged where they overlap) replaced by [`REDACTED`].
fn replace(text: &str, mut spans: Vec<Range<usize>>) -> String {
    spans.sort_by_key(|span| span.start);
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    let mut spans = spans.into_iter().peekable();
    while let Some(mut span) = spans.next() {
        while let Some(next) = spans.next_if(|next| next.start < span.end) {
            span.end = span.end.max(next.end);
        }
        let start = span.start.max(done);
        out.push_str(&text[done..start]);
        out.push_str(REDACTED);
        done = span.end;
    }
    out.push_str(&text[done..]);
    out
}

/// Where `text` holds secret material: userinfo, pair values, the words
/// after `Bearer`/`Basic`, well-known key formats. Never empty spans.
fn secret_spans(text: &str) -> Vec<Range<usize>> {
    let mut spans = userinfo(text);
    spans.extend(pair_values(text));
    spans.extend(scheme_words(text));
    spans.extend(known_keys(text));
    spans.retain(|span| !span.is_empty());
    spans
}

fn ends_authority(c: char) -> bool {
    matches!(c, '/' | '?' | '#' | '\\') || c.is_whitespace()
}

/// The userinfo of every URL: after `://`, up to the last `@` before the
/// authority ends.
fn userinfo(text: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let start = from + found + 3;
        let end = text[start..]
            .find(ends_authority)
            .map_or(text.len(), |at| start + at);
        if let Some(at) = text[start..end].rfind('@') {
            spans.push(start..start + at);
        }
        from = start;
    }
    spans
}

/// Whether an `@` is left that may end credentials: after a `://`, any `@`
/// but that of a redacted userinfo; elsewhere, one after `user:`.
fn stray_at(text: &str) -> bool {
    let redacted_userinfo = format!("://{REDACTED}");
    text.match_indices('@').any(|(at, _)| {
        let before = &text[..at];
        if before.contains("://") {
            !before.ends_with(&redacted_userinfo)
        } else {
            let word = before
                .char_indices()
                .rev()
                .find(|(_, c)| c.is_whitespace())
                .map_or(0, |(i, c)| i + c.len_utf8());
            before[word..].contains(':')
        }
    })
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '%')
}

/// The values of `name=value`, `name: value` and `--name value` pairs whose
/// name is a secret (or a token name with a value other than digits, or an `*_env`
/// name with a value other than a variable name).
fn pair_values(text: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    for (at, sep) in text.char_indices() {
        let after = &text[at + 1..];
        let separator = match sep {
            '=' => true,
            ':' => after.starts_with(|c: char| c.is_whitespace() || c == '"' || c == '\''),
            c => c.is_whitespace(),
        };
        if !separator {
            continue;
        }
        let before = text[..at].trim_end();
        let before = before.strip_suffix(['"', '\'']).unwrap_or(before);
        let name_start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| name_char(*c))
            .last()
            .map_or(before.len(), |(i, _)| i);
        let name = &before[name_start..];
        // Whitespace separates a value from a long option only (`--password x`).
        if name.is_empty() || (sep.is_whitespace() && !name.starts_with("--")) {
            continue;
        }
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        let start = at + 1 + (after.len() - after.trim_start().len());
        let value = value_at(text, start);
        let raw = &text[value.clone()];
        let secret = match judge(&name) {
            Under::Secret | Under::Headers => true,
            Under::Tokens => !raw.chars().all(|c| c.is_ascii_digit()),
            Under::EnvName => !variable_name(raw),
            Under::Plain | Under::Names => false,
        };
        if secret {
            spans.push(value);
        }
    }
    spans
}

/// The value starting at `start`: a quoted one up to its closing quote
/// (`\` escapes), otherwise up to the next whitespace (`\` escapes too, as
/// in libpq).
fn value_at(text: &str, start: usize) -> Range<usize> {
    let mut chars = text[start..].char_indices();
    let quote = match text[start..].chars().next() {
        Some(q @ ('\'' | '"')) => {
            chars.next();
            Some(q)
        }
        _ => None,
    };
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if Some(c) == quote {
            return start..start + i + 1;
        } else if quote.is_none() && c.is_whitespace() {
            return start..start + i;
        }
    }
    start..text.len()
}

/// The word after each `Bearer` or `Basic` (any case) that starts a word.
fn scheme_words(text: &str) -> Vec<Range<usize>> {
    let lower = text.to_ascii_lowercase();
    let mut spans = Vec::new();
    for scheme in ["bearer", "basic"] {
        for (at, _) in lower.match_indices(scheme) {
            let starts_word = !text[..at]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric);
            let rest = &text[at + scheme.len()..];
            let word = rest.trim_start();
            if !starts_word || word.len() == rest.len() || word.is_empty() {
                continue;
            }
            let start = text.len() - word.len();
            spans.push(value_at(text, start));
        }
    }
    spans
}

/// Words that start with a well-known API key prefix and are long enough
/// to be one.
fn known_keys(text: &str) -> Vec<Range<usize>> {
    let key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut spans = Vec::new();
    for prefix in KEY_PREFIXES.split(' ') {
        for (at, _) in text.match_indices(prefix) {
            if text[..at].chars().next_back().is_some_and(key_char) {
                continue;
            }
            let len = text[at..].find(|c| !key_char(c)).unwrap_or(text.len() - at);
            if len >= KEY_MIN_LEN {
                spans.push(at..at + len);
            }
        }
    }
    spans
}

#[cfg(test)]
mod tests;
