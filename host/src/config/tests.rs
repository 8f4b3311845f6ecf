//! Config parsing and validation: good configs, and every problem named.

use super::*;

const GOOD: &str = r#"
    [server]
    listen = "127.0.0.1:0"
    envelope = "nested"

    [plugins]
    dir = "plugins"

    [defaults]
    model = "echo"
    store = "memory"

    [models.echo]
    plugin = "echo"
    settings = { delay_ms = 20, nested = { a = [1, 2] } }

    [stores.memory]
    plugin = "memory"
"#;

#[test]
fn a_good_config_resolves_paths_and_settings() {
    let config = Config::parse(GOOD, Path::new("/etc/llm")).expect("valid");
    assert_eq!(config.plugins.dir, PathBuf::from("/etc/llm/plugins"));
    assert_eq!(config.server.envelope, Envelope::Nested);
    assert_eq!(config.server.max_frame_bytes, 65_536);
    assert_eq!(
        config.models["echo"].settings,
        serde_json::json!({"delay_ms": 20, "nested": {"a": [1, 2]}})
    );
    assert_eq!(config.stores["memory"].settings, serde_json::json!({}));
}

#[test]
fn unknown_keys_are_named() {
    let text = GOOD.replace("envelope = \"nested\"", "envelop = \"nested\"");
    let err = Config::parse(&text, Path::new(".")).expect_err("typo");
    assert!(err.contains("envelop"), "{err}");
}

#[test]
fn bad_values_are_named_together() {
    let text = GOOD
        .replace("127.0.0.1:0", "localhost")
        .replace("model = \"echo\"", "model = \"gpt\"");
    let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
    assert!(err.contains("server.listen"), "{err}");
    assert!(err.contains("defaults.model: `gpt`"), "{err}");
}

#[test]
fn a_bad_envelope_is_refused() {
    let text = GOOD.replace("\"nested\"", "\"deep\"");
    let err = Config::parse(&text, Path::new(".")).expect_err("bad enum");
    assert!(err.contains("deep"), "{err}");
}

#[test]
fn numbers_out_of_range_are_named() {
    let text = GOOD.replace(
        "envelope = \"nested\"",
        "envelope = \"nested\"\nidle_timeout_secs = 18446744073709552\n\
         max_queued_prompts = 100000000",
    );
    let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
    assert!(
        err.contains("server.idle_timeout_secs: 18446744073709552 is more than a year"),
        "{err}"
    );
    assert!(
        err.contains("server.max_queued_prompts: 100000000 is out of range"),
        "{err}"
    );
}

#[test]
fn lease_and_origin_settings_are_checked() {
    let text = GOOD.replace(
        "envelope = \"nested\"",
        "envelope = \"nested\"\nlease_ms = 1000\nlease_renew_ms = 800\n\
         store_timeout_ms = 0\nallowed_origins = [\"chat.example.com\", \"*\"]",
    );
    let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
    assert!(err.contains("server.lease_renew_ms: 800"), "{err}");
    assert!(
        err.contains("server.store_timeout_ms: 0 is out of range"),
        "{err}"
    );
    assert!(
        err.contains("server.allowed_origins: `chat.example.com`"),
        "{err}"
    );
    assert!(!err.contains("server.allowed_origins: `*`"), "{err}");
}

#[test]
fn limits_of_the_hardened_edge_are_checked() {
    let text = GOOD
        .replace(
            "envelope = \"nested\"",
            "envelope = \"nested\"\nheader_read_timeout_secs = 0\nmax_history_bytes = 10\n\
             max_pending_per_address = 0",
        )
        .replace(
            "[stores.memory]\n    plugin = \"memory\"",
            "[stores.memory]\n    plugin = \"memory\"\n    max_tokens_limit = 5",
        )
        .replace(
            "[models.echo]\n    plugin = \"echo\"",
            "[models.echo]\n    plugin = \"echo\"\n    max_tokens_limit = 0",
        );
    let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
    for key in [
        "server.header_read_timeout_secs",
        "server.max_history_bytes",
        "server.max_pending_per_address",
        "stores.memory.max_tokens_limit: only model backends",
        "models.echo.max_tokens_limit: must be at least 1",
    ] {
        assert!(err.contains(key), "{key} not in {err}");
    }
    let text = GOOD.replace(
        "[models.echo]\n    plugin = \"echo\"",
        "[models.echo]\n    plugin = \"echo\"\n    max_tokens_limit = 512",
    );
    let config = Config::parse(&text, Path::new(".")).expect("a good limit");
    assert_eq!(config.models["echo"].max_tokens_limit, Some(512));
}

#[test]
fn telemetry_is_off_unless_configured_and_takes_defaults() {
    let config = Config::parse(GOOD, Path::new(".")).expect("valid");
    assert_eq!(config.telemetry, None);
    let text = format!("{GOOD}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n");
    let config = Config::parse(&text, Path::new(".")).expect("valid");
    let telemetry = config.telemetry.expect("on");
    assert_eq!(telemetry.service_name, "llm-host");
    assert_eq!(telemetry.sample_ratio, 1.0);
    assert_eq!(telemetry.export_timeout_ms, 10_000);
    assert_eq!(telemetry.traces_url(), "http://127.0.0.1:4318/v1/traces");
    let text = format!(
        "{GOOD}\n[telemetry]\notlp_endpoint = \"http://collector:4318/otlp/\"\n\
         service_name = \"chat-edge\"\nsample_ratio = 0.25\n\
         headers = {{ Authorization = \"Bearer abc\" }}\n"
    );
    let telemetry = Config::parse(&text, Path::new("."))
        .expect("valid")
        .telemetry
        .expect("on");
    assert_eq!(
        telemetry.traces_url(),
        "http://collector:4318/otlp/v1/traces"
    );
    assert_eq!(telemetry.headers["authorization"], "Bearer abc");
}

#[test]
fn telemetry_problems_are_named() {
    let err = Config::parse(
        &format!("{GOOD}\n[telemetry]\nendpoint = \"x\"\n"),
        Path::new("."),
    )
    .expect_err("unknown key");
    assert!(err.contains("endpoint"), "{err}");
    let err =
        Config::parse(&format!("{GOOD}\n[telemetry]\n"), Path::new(".")).expect_err("no endpoint");
    assert!(err.contains("telemetry.otlp_endpoint: required"), "{err}");
    let text = format!(
        "{GOOD}\n[telemetry]\notlp_endpoint = \"https://collector:4318\"\n\
         sample_ratio = 1.5\nexport_timeout_ms = 0\nmax_queued_spans = 0\nservice_name = \"\"\n\
         headers = {{ \"bad name\" = \"x\", content-type = \"text/plain\", x-token = \"a\\nb\" }}\n"
    );
    let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
    for key in [
        "telemetry.otlp_endpoint: `https://collector:4318` uses https",
        "telemetry.sample_ratio: 1.5 is out of range",
        "telemetry.export_timeout_ms: 0 is out of range",
        "telemetry.max_queued_spans: 0 is out of range",
        "telemetry.service_name",
        "telemetry.headers: `bad name` is not an HTTP header name",
        "telemetry.headers: `content-type` is set by the exporter",
        "telemetry.headers.x-token: the value is not a valid",
    ] {
        assert!(err.contains(key), "{key} not in {err}");
    }
    assert!(!err.contains("a\nb"), "a header value is not shown: {err}");
    for endpoint in [
        "collector:4318",
        "http://user:pw@collector:4318",
        "http://collector:4318/?x=1",
    ] {
        let text = format!("{GOOD}\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
        let err = Config::parse(&text, Path::new(".")).expect_err(endpoint);
        assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
    }
}

#[test]
fn history_policies_are_checked_strictly() {
    let good = GOOD.replace(
        "settings = { delay_ms = 20, nested = { a = [1, 2] } }",
        "settings = { delay_ms = 20, nested = { a = [1, 2] } }\n\
         history = { max_messages = 20, max_tokens = 4000, strategy = \"summarize\", summarizer = \"echo\" }",
    );
    let config = Config::parse(&good, Path::new(".")).expect("valid");
    let policy = config.models["echo"].history.clone().expect("a policy");
    assert_eq!(
        (
            policy.max_messages,
            policy.max_tokens,
            policy.summarizer.as_deref()
        ),
        (Some(20), Some(4000), Some("echo"))
    );
    let truncating = GOOD.replace(
        "[models.echo]\n",
        "[models.echo]\nhistory = { max_messages = 3 }\n",
    );
    let config = Config::parse(&truncating, Path::new(".")).expect("valid");
    assert_eq!(
        config.models["echo"].history.as_ref().map(|h| h.strategy),
        Some(crate::core::history::Strategy::Truncate),
        "truncate unless said"
    );
    for (history, named) in [
        ("{ max_message = 3 }", "max_message"),
        ("{ strategy = \"forget\", max_messages = 3 }", "forget"),
        ("{ max_messages = -1 }", "max_messages"),
    ] {
        let text = GOOD.replace(
            "[models.echo]\n",
            &format!("[models.echo]\nhistory = {history}\n"),
        );
        let err = Config::parse(&text, Path::new(".")).expect_err(history);
        assert!(err.contains(named), "{history}: {err}");
    }
    for (history, named) in [
        (
            "{ strategy = \"truncate\" }",
            "models.echo.history: give max_messages",
        ),
        (
            "{ max_messages = 0 }",
            "models.echo.history.max_messages: 0 is out of range",
        ),
        (
            "{ max_messages = 1, strategy = \"summarize\", summarizer = \"echo\" }",
            "max_messages: 1 is out of range (2-",
        ),
        (
            "{ max_tokens = 0 }",
            "models.echo.history.max_tokens: 0 is out of range",
        ),
        (
            "{ max_tokens = 9, strategy = \"summarize\" }",
            "needs a summarizer",
        ),
        (
            "{ max_tokens = 9, summarizer = \"echo\" }",
            "only strategy \"summarize\" takes a summarizer",
        ),
        (
            "{ max_tokens = 9, strategy = \"summarize\", summarizer = \"gpt\" }",
            "models.echo.history.summarizer: `gpt` is not a [models.*] entry",
        ),
    ] {
        let text = GOOD.replace(
            "[models.echo]\n",
            &format!("[models.echo]\nhistory = {history}\n"),
        );
        let err = Config::parse(&text, Path::new(".")).expect_err(history);
        assert!(err.contains(named), "{history}: {err}");
    }
    let store = GOOD.replace(
        "[stores.memory]\n",
        "[stores.memory]\nhistory = { max_messages = 3 }\n",
    );
    let err = Config::parse(&store, Path::new(".")).expect_err("a store");
    assert!(
        err.contains("stores.memory.history: only model backends"),
        "{err}"
    );
}
