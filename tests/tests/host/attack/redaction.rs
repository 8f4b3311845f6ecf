//! Secrets and internal details stay with the host: `/v1/config` shows
//! plugin settings holding every secret form with the secrets replaced, and
//! a store that does not answer is reported to an unauthenticated or
//! non-admin caller by code and short message only, its own words (address,
//! database, user) going to the log.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llm_host_tests::{artifacts, http, json, Config, Host, Workdir};

const ALICE: &str = "alice-key-0123456789abcdef";
const OPS: &str = "ops-key-0123456789abcdef000";

/// The `[auth]` table: a user key and an admin key.
fn keys() -> String {
    format!(
        "\n[auth]\nkeys = [\n  {{ id = \"alice\", key = \"{ALICE}\" }},\n  \
         {{ id = \"ops\", key = \"{OPS}\", admin = true }},\n]\n"
    )
}

/// The directory the harness builds into (`target/<profile>`).
fn profile_dir() -> PathBuf {
    artifacts()
        .host
        .parent()
        .expect("the profile directory")
        .to_owned()
}

/// `libllm_plugin_openai.so`, built into the harness's profile directory
/// (the harness builds the store plugins, not this one).
fn openai_library() -> PathBuf {
    llm_host_tests::build_packages(&["llm-plugin-openai"]).join("libllm_plugin_openai.so")
}

/// A host on `config` whose plugin directory also holds `libraries`.
fn start_with(config: &Config, libraries: &[PathBuf], env: &[(&str, &str)]) -> Host {
    let workdir = Workdir::with_config(config);
    for library in libraries {
        let name = library.file_name().expect("a library file name");
        std::fs::copy(library, workdir.path().join("plugins").join(name))
            .unwrap_or_else(|err| panic!("copy {}: {err}", library.display()));
    }
    Host::start_with_env(workdir, &[], env)
}

fn store_library(name: &str) -> PathBuf {
    profile_dir().join(format!("libllm_plugin_{name}.so"))
}

/// Settings with a secret in every form a plugin accepts: URL userinfo, a
/// password in a URL's query, libpq `key=value` (plain and quoted), header
/// values, `Bearer`, `password=` in free text, a URL with `@` in its query.
const SECRET_SETTINGS: &str = r#"
[models.remote]
plugin = "openai"
[models.remote.settings]
model = "gpt-redaction-test"
base_url = "https://me:OpenaiUserinfoSecret1@api.example.com/v1"
api_key_env = "REDACTION_TEST_KEY"
max_tokens = 256
system = "be brief; password=SystemPromptSecret2 Bearer SystemBearerSecret3"
stop = ["host=db user=me password='Quoted StopSecret4'"]
[models.remote.settings.headers]
Authorization = "Bearer HeaderBearerSecret5"
X-Api-Token = "HeaderPlainSecret6"
Content-Type = "application/json"
User-Agent = "redaction-test-agent"

[stores.pg_url]
plugin = "postgres"
[stores.pg_url.settings]
url = "postgres://llm:PgUserinfoSecret7@127.0.0.1:1/sessions?password=PgQuerySecret8"
table = "redaction_sessions"

[stores.pg_dsn]
plugin = "postgres"
settings = { url = "host=127.0.0.1 port=1 user=llm password=PgDsnSecret9 dbname=x" }

[stores.pg_quoted]
plugin = "postgres"
settings = { url = "host=127.0.0.1 port=1 user=llm password='Pg QuotedSecret10' dbname=x" }

[stores.pg_at]
plugin = "postgres"
settings = { url = "postgres://llm@127.0.0.1:1/db?application_name=a@b&password=PgAtQuerySecret11" }

[stores.kv]
plugin = "redis"
settings = { url = "redis://default:RedisUserinfoSecret12@127.0.0.1:1/0", prefix = "redaction:" }
"#;

const SECRETS: &[&str] = &[
    "OpenaiUserinfoSecret1",
    "SystemPromptSecret2",
    "SystemBearerSecret3",
    "StopSecret4",
    "HeaderBearerSecret5",
    "HeaderPlainSecret6",
    "PgUserinfoSecret7",
    "PgQuerySecret8",
    "PgDsnSecret9",
    "QuotedSecret10",
    "PgAtQuerySecret11",
    "RedisUserinfoSecret12",
    "EnvKeySecret13",
    ALICE,
    OPS,
];

// /v1/config shows none of the secrets, and every harmless setting as it is.
#[tokio::test]
async fn the_config_shows_no_secret_and_every_harmless_setting() {
    let config = Config {
        extra: format!("{}{SECRET_SETTINGS}", keys()),
        ..Config::default()
    };
    let libraries = [
        openai_library(),
        store_library("postgres"),
        store_library("redis"),
    ];
    let host = start_with(
        &config,
        &libraries,
        &[("REDACTION_TEST_KEY", "EnvKeySecret13")],
    );
    let reply = http(host.addr(), "GET", &format!("/v1/config?token={OPS}")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    for secret in SECRETS {
        assert!(
            !reply.body.contains(secret),
            "{secret} shows: {}",
            reply.body
        );
    }

    let config = reply.json();
    let remote = &config["models"]["remote"]["settings"];
    assert_eq!(remote["model"], "gpt-redaction-test", "{config:#}");
    assert_eq!(remote["base_url"], "https://[redacted]@api.example.com/v1");
    assert_eq!(remote["api_key_env"], "REDACTION_TEST_KEY");
    assert_eq!(remote["max_tokens"], 256);
    assert_eq!(
        remote["system"],
        "be brief; password=[redacted] Bearer [redacted]"
    );
    assert_eq!(remote["stop"][0], "host=db user=me password=[redacted]");
    let headers = &remote["headers"];
    assert_eq!(headers["Authorization"], "[redacted]");
    assert_eq!(headers["X-Api-Token"], "[redacted]");
    assert_eq!(headers["Content-Type"], "application/json");
    assert_eq!(headers["User-Agent"], "redaction-test-agent");

    let stores = &config["stores"];
    assert_eq!(
        stores["pg_url"]["settings"]["url"],
        "postgres://[redacted]@127.0.0.1:1/sessions?password=[redacted]"
    );
    assert_eq!(stores["pg_url"]["settings"]["table"], "redaction_sessions");
    assert_eq!(
        stores["pg_dsn"]["settings"]["url"],
        "host=127.0.0.1 port=1 user=llm password=[redacted] dbname=x"
    );
    assert_eq!(
        stores["pg_quoted"]["settings"]["url"],
        "host=127.0.0.1 port=1 user=llm password=[redacted] dbname=x"
    );
    assert_eq!(stores["pg_at"]["settings"]["url"], "[redacted]");
    assert_eq!(
        stores["kv"]["settings"]["url"],
        "redis://[redacted]@127.0.0.1:1/0"
    );
    assert_eq!(stores["kv"]["settings"]["prefix"], "redaction:");

    assert_eq!(config["models"]["slow"]["settings"]["tokens"], 100);
    assert_eq!(config["models"]["slow"]["settings"]["delay_ms"], 50);
    assert_eq!(config["auth"]["open"], false);
    // Key ids and admin flags show; the keys themselves never do.
    assert_eq!(
        config["auth"]["keys"],
        json!([{ "id": "alice", "admin": false }, { "id": "ops", "admin": true }])
    );
    assert_eq!(config["default_store"], "memory");
}

/// Whether `log` shows `line` `times` times within a few seconds.
async fn logged(host: &Host, line: &str, times: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let count = host.log().matches(line).count();
        if count == times || Instant::now() > deadline {
            return count == times;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// A store that does not answer: /readyz says so by code alone, a user key gets the
// kind of failure, an admin key the store's words; the log has them once per change.
#[tokio::test]
async fn a_store_that_does_not_answer_is_not_described_to_callers() {
    const URL: &str = "postgres://llm:PgReadySecret@127.0.0.1:1/ready_db";
    let config = Config {
        store: "pg".to_owned(),
        extra: format!(
            "{}\n[stores.pg]\nplugin = \"postgres\"\n\
             settings = {{ url = \"{URL}\", connect_timeout_ms = 1000 }}\n",
            keys()
        ),
        ..Config::default()
    };
    let host = start_with(&config, &[store_library("postgres")], &[]);
    let internal = [
        "127.0.0.1",
        "ready_db",
        "PgReadySecret",
        "llm_host_sessions",
    ];

    for _ in 0..3 {
        let reply = http(host.addr(), "GET", "/readyz").await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        let body = reply.json();
        assert_eq!(body["error"]["code"], "store_unavailable");
        assert_eq!(
            body["error"]["message"],
            "the session store does not answer"
        );
        for word in internal {
            assert!(!reply.body.contains(word), "{word}: {}", reply.body);
        }
    }
    let not_ready = "not ready: the default store does not answer";
    assert!(
        logged(&host, not_ready, 1).await,
        "one warning for three polls:\n{}",
        host.log()
    );
    assert!(
        host.log().contains("127.0.0.1:1"),
        "the log has the details:\n{}",
        host.log()
    );

    for path in ["/v1/sessions", "/v1/sessions/some-id"] {
        let reply = http(host.addr(), "GET", &format!("{path}?token={ALICE}")).await;
        assert_eq!(reply.status, 503, "{path}: {}", reply.body);
        let body = reply.json();
        assert_eq!(body["error"]["code"], "store_unavailable");
        assert_eq!(body["error"]["message"], "the session store failed");
        for word in internal {
            assert!(!reply.body.contains(word), "{path} {word}: {}", reply.body);
        }
    }
    let reply = http(
        host.addr(),
        "DELETE",
        &format!("/v1/sessions/some-id?token={ALICE}"),
    )
    .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(!reply.body.contains("127.0.0.1"), "{}", reply.body);
    assert!(
        logged(&host, "a session store call failed", 3).await,
        "{}",
        host.log()
    );
    let log = host.log();
    assert!(
        log.contains("GET /v1/sessions/{id}") && log.contains("alice"),
        "the log names the route and the caller:\n{log}"
    );

    let reply = http(host.addr(), "GET", &format!("/v1/sessions?token={OPS}")).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let message = &reply.json()["error"]["message"];
    assert!(
        message.as_str().is_some_and(|m| m.contains("store `pg`")),
        "an admin gets the store's words: {message}"
    );
}
