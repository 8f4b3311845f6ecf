//! The redaction rule, form by form, and properties over planted secrets.

use super::*;
use proptest::prelude::*;
use serde_json::json;

/// `settings` redacted as the settings of a model backend.
fn redacted_settings(settings: Value) -> Value {
    let mut config = json!({ "models": { "m": { "plugin": "p", "settings": settings } } });
    redact(&mut config);
    config["models"]["m"]["settings"].take()
}

fn shown(value: &Value) -> String {
    serde_json::to_string(value).expect("JSON")
}

#[test]
fn strings_lose_their_credential_forms() {
    // `*` stands for `[redacted]`.
    let cases = [
        // libpq key=value: plain, quoted with an escape, spaced.
        ("user=me password=hunter2 db=x", "user=me password=* db=x"),
        ("password = 'x y\\'z' port=5", "password = * port=5"),
        ("host=db sslpassword=s3cret", "host=db sslpassword=*"),
        // URL userinfo, user name included; a password holding `@`.
        ("postgres://me:pw@db:5432/x", "postgres://*@db:5432/x"),
        ("redis://:p@ss@h:6379/0", "redis://*@h:6379/0"),
        ("https://ghp_u@github.com/o", "https://*@github.com/o"),
        // Query parameters named like secrets; token counts stay.
        ("pg://u:p@h/d?password=x", "pg://*@h/d?password=*"),
        ("https://h/v1?api_key=abc", "https://h/v1?api_key=*"),
        ("http://h?m=1&sslpassword=x", "http://h?m=1&sslpassword=*"),
        ("https://h/v1?max_tokens=5", "https://h/v1?max_tokens=5"),
        // `@` in a path or query, `/` in a password, userinfo outside a URL.
        ("https://h/x?u=a@b&token=t0ken", "*"),
        ("https://h/p@th/x", "*"),
        ("postgres://u:pa/ss@h/db", "*"),
        ("postgres://u:p@h/db?x=a@b", "*"),
        ("me:hunter2@db:5432", "*"),
        // Authorization schemes, JSON text, well-known key formats.
        ("Authorization: Basic dXNlcjpwdw==", "Authorization: * *"),
        ("{\"pwd\": \"x y\", \"m\": 1}", "{\"pwd\": *, \"m\": 1}"),
        ("use sk-proj-0123456789abcdefghij now", "use * now"),
        ("AKIAABCDEFGHIJKLMNOP", "*"),
        ("serve --api-key abc --port 8", "serve --api-key * --port 8"),
        // Harmless strings stay.
        ("https://api.example.com/v1", "https://api.example.com/v1"),
        ("ops@example.com", "ops@example.com"),
        ("risk-free gpt-4o-mini", "risk-free gpt-4o-mini"),
    ];
    for (text, shown) in cases {
        let settings = redacted_settings(json!({ "s": text }));
        assert_eq!(settings["s"], shown.replace('*', REDACTED), "{text}");
    }
}

#[test]
fn header_values_are_replaced_but_harmless_ones() {
    let settings = redacted_settings(json!({
        "headers": {
            "Authorization": "Bearer sk-abc", "X-Custom": "opaque",
            "Content-Type": "application/json", "User-Agent": "llm-host",
            "Accept": "Bearer hidden",
        },
        "extra_headers": ["X-Key: abc"],
    }));
    assert_eq!(
        settings,
        json!({
            "headers": {
                "Authorization": REDACTED, "X-Custom": REDACTED,
                "Content-Type": "application/json", "User-Agent": "llm-host",
                "Accept": "Bearer [redacted]",
            },
            "extra_headers": REDACTED,
        })
    );
}

#[test]
fn secret_keys_in_any_spelling_are_replaced() {
    let keys = "apikey apiKey API-KEY auth authorization bearer dsn private pass pwd cookie \
                session_key clientSecret access_token jwt";
    for key in keys.split(' ') {
        let settings = redacted_settings(json!({ key: "value-0123" }));
        assert_eq!(settings[key], REDACTED, "{key}");
    }
    let settings = redacted_settings(json!({
        "password": 123456, "private_key": ["a", {"b": "c"}], "auth": true, "key": null,
    }));
    assert_eq!(
        settings,
        json!({ "password": REDACTED, "private_key": REDACTED, "auth": true, "key": null })
    );
}

#[test]
fn token_counts_and_variable_names_are_shown() {
    let settings = redacted_settings(json!({
        "max_tokens": 256, "tokens": 3, "token_limits": { "input": 100, "name": "x" },
        "token": "t-0123", "access_tokens": ["a"], "api_key_env": "OPENAI_API_KEY",
        "passwordEnv": "DB_PASS", "token_env": "sk-proj-0123456789abcdefghij",
    }));
    let shown = json!({
        "max_tokens": 256, "tokens": 3, "token_limits": { "input": 100, "name": REDACTED },
        "token": REDACTED, "access_tokens": [REDACTED], "api_key_env": "OPENAI_API_KEY",
        "passwordEnv": "DB_PASS", "token_env": REDACTED,
    });
    assert_eq!(settings, shown);
}

#[test]
fn nested_arrays_and_tables_are_walked() {
    let settings = redacted_settings(json!({
        "backends": [
            { "name": "a", "url": "redis://u:pw@h/0", "options": [{ "password": "x" }] },
            ["Bearer abc", "plain", { "dsn": "host=h" }, "--token", "t", "--n", "m"],
        ],
        "password=x": true,
    }));
    assert_eq!(
        settings,
        json!({
            "backends": [
                { "name": "a", "url": "redis://[redacted]@h/0",
                  "options": [{ "password": REDACTED }] },
                ["Bearer [redacted]", "plain", { "dsn": REDACTED }, "--token", REDACTED,
                 "--n", "m"],
            ],
            "password=[redacted]": true,
        })
    );
}

#[test]
fn the_hosts_own_config_is_shown() {
    let mut config = json!({
        "base_dir": "/etc/llm-host",
        "server": { "listen": "127.0.0.1:8080", "max_frame_bytes": 65536,
                    "allowed_origins": ["https://chat.example.com"] },
        "auth": { "open": false, "keys": [{ "id": "alice", "admin": false }, { "id": "ops", "admin": true, "secret": "sk-planted-0123456789abcdef" }] },
        "stores": { "keystore": { "plugin": "sqlite", "settings": { "path": "k.db" } } },
        "plugins": { "dir": "plugins", "watch": true },
        "default_model": "echo",
    });
    let before = config.clone();
    redact(&mut config);
    // Key ids and admin flags show (a secret, were one serialized, would not).
    assert_eq!(
        config["auth"],
        json!({ "open": false, "keys": [{ "id": "alice", "admin": false }, { "id": "ops", "admin": true }] })
    );
    config["auth"] = before["auth"].clone();
    assert_eq!(config, before);
}

/// A planted secret: long alphanumeric parts joined by characters a
/// password may hold.
fn secret() -> impl Strategy<Value = (Vec<String>, String)> {
    (
        prop::collection::vec("[A-Za-z0-9]{12,16}", 1..3),
        "[@:/#?&=+%!~.,;]",
    )
        .prop_map(|(parts, joint)| {
            let secret = parts.join(&joint);
            (parts, secret)
        })
}

/// The settings fragment that holds `secret` in one of the secret forms.
fn planted(form: usize, pick: usize, secret: &str, parts: &[String]) -> Value {
    let one = |options: &str| {
        let options: Vec<&str> = options.split(' ').collect();
        options[pick % options.len()].to_owned()
    };
    match form {
        0 => {
            let key = one(
                "api_key apiKey API-KEY password pwd auth authorization bearer dsn \
                 private_key cookie session_key client_secret access_token token",
            );
            let value = if pick.is_multiple_of(2) {
                secret.to_owned()
            } else {
                parts.join(" ")
            };
            json!({ key: value })
        }
        1 => {
            let name = one("Authorization X-Api-Key X-Custom Cookie");
            json!({ "headers": { name: secret } })
        }
        2 => {
            let scheme = one("postgres redis https mysql");
            json!({ "url": format!("{scheme}://user:{secret}@db.example:5432/x") })
        }
        3 => json!({ "url": format!("https://{secret}@github.com/org/repo") }),
        4 => json!({ "url": format!("https://h.example/p@th?u=a@b&token={secret}") }),
        5 => json!({ "url": format!("postgres://u:{secret}@h/db?x=a@b") }),
        6 => {
            let name = one("api_key apikey sslpassword password token key");
            json!({ "url": format!("https://h.example/v1?{name}={secret}&model=m") })
        }
        7 => json!({ "url": format!("host=db user=me password={secret} dbname=x") }),
        8 => json!({ "url": format!("host=db password='{}' dbname=x", parts.join(" ")) }),
        9 => {
            let scheme = one("Bearer Basic bearer");
            json!({ "note": format!("Authorization: {scheme} {secret}") })
        }
        10 => json!({ "api_key_env": format!("sk-{secret}") }),
        11 => json!({ "args": ["-v", "--api-key", secret, "--port", "8"] }),
        12 => json!({ "command": format!("serve --password {secret} --port 8") }),
        _ => json!({ "options": format!("{{\"password\": \"{}\"}}", parts.join(" ")) }),
    }
}

/// Harmless values to put beside the planted one.
fn sibling(pick: usize) -> Value {
    let siblings = json!(["gpt-4o", "/var/lib/sessions.db", 256, true, null, { "tokens": 6 }]);
    siblings[pick % 6].clone()
}

proptest! {
    #[test]
    fn a_planted_secret_never_shows(
        (parts, secret) in secret(),
        form in 0usize..14,
        pick in 0usize..64,
        layers in prop::collection::vec((any::<bool>(), 0usize..64), 0..4),
    ) {
        let mut tree = planted(form, pick, &secret, &parts);
        for (array, sibling_pick) in layers {
            let beside = sibling(sibling_pick);
            tree = if array {
                json!([beside, tree])
            } else {
                json!({ "nested": tree, "model": beside })
            };
        }
        let shown = shown(&redacted_settings(tree));
        prop_assert!(!shown.contains(&secret), "{shown}");
        for part in &parts {
            prop_assert!(!shown.contains(part.as_str()), "{part} in {shown}");
        }
    }

    #[test]
    fn a_secret_number_never_shows(number in 100_000_000_000u64.., pick in 0usize..4) {
        let key = ["password", "api_key", "pin_secret", "auth"][pick];
        let shown = shown(&redacted_settings(json!({ key: number })));
        prop_assert!(!shown.contains(&number.to_string()), "{shown}");
    }
}
