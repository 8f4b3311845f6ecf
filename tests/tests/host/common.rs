//! Assertions and helpers shared by the test modules.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llm_host_conformance::support::skip_or_fail;
use llm_host_tests::{http, http_with, Frame, Host, Turn};
use serde_json::Value;

/// Which envelope a host was configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Envelope {
    Flat,
    Nested,
}

/// Fails if `value` holds a `null` anywhere (absent fields must be omitted).
pub fn assert_no_nulls(value: &Value, frame: &str) {
    match value {
        Value::Null => panic!("a null in frame {frame}"),
        Value::Array(items) => items.iter().for_each(|item| assert_no_nulls(item, frame)),
        Value::Object(fields) => fields
            .values()
            .for_each(|field| assert_no_nulls(field, frame)),
        _ => {}
    }
}

/// Checks the bytes of `frame`, field order included:
/// flat `{"name":N,"data":{"kind":K,"<body>":B,"meta":M}}` or nested
/// `{"name":N,"data":{"event":{"kind":K,"<body>":B,"meta":M}}}`, where
/// `<body>` is `event` (or `entry` for diagnostics) and
/// `M` is `{"sequence":..,"timestamp":..,"sourceId":..[,"interactionId":..]}`.
/// Returns the text of `B`, for exact comparisons.
pub fn assert_shape(frame: &Frame, envelope: Envelope, name: &str) -> String {
    let text = frame.text.as_str();
    assert_no_nulls(&frame.json, text);
    assert_eq!(frame.name(), name, "frame name in {text}");
    let kind = name
        .strip_prefix("interaction.")
        .unwrap_or_else(|| panic!("frame names start with `interaction.`: {text}"));
    let body_key = if kind == "diagnostic" {
        "entry"
    } else {
        "event"
    };
    let (prefix, suffix) = match envelope {
        Envelope::Flat => (
            format!(r#"{{"name":"{name}","data":{{"kind":"{kind}","{body_key}":"#),
            "}}",
        ),
        Envelope::Nested => (
            format!(r#"{{"name":"{name}","data":{{"event":{{"kind":"{kind}","{body_key}":"#),
            "}}}",
        ),
    };
    assert!(
        text.starts_with(&prefix),
        "the frame does not start with {prefix}: {text}"
    );
    assert!(
        text.ends_with(suffix),
        "the frame does not end with {suffix}: {text}"
    );
    let inner = &text[prefix.len()..text.len() - suffix.len()];
    let meta_at = inner
        .rfind(r#","meta":{"#)
        .unwrap_or_else(|| panic!("`meta` does not follow `{body_key}`: {text}"));
    let body = &inner[..meta_at];
    let meta_text = &inner[meta_at + r#","meta":"#.len()..];

    let meta = frame.meta();
    let sequence = meta["sequence"]
        .as_u64()
        .unwrap_or_else(|| panic!("meta.sequence is not an unsigned integer: {text}"));
    let timestamp = meta["timestamp"]
        .as_u64()
        .unwrap_or_else(|| panic!("meta.timestamp is not an unsigned integer: {text}"));
    assert!(
        timestamp > 1_600_000_000_000,
        "meta.timestamp is not Unix milliseconds: {text}"
    );
    let source = meta["sourceId"]
        .as_str()
        .unwrap_or_else(|| panic!("meta.sourceId is not a string: {text}"));
    let expected_source = if kind == "model" {
        "model.primary"
    } else {
        "host"
    };
    assert_eq!(source, expected_source, "meta.sourceId in {text}");
    let mut expected_meta =
        format!(r#"{{"sequence":{sequence},"timestamp":{timestamp},"sourceId":"{source}""#);
    if let Some(id) = meta.get("interactionId") {
        let id = id
            .as_str()
            .unwrap_or_else(|| panic!("meta.interactionId is not a string: {text}"));
        expected_meta.push_str(&format!(r#","interactionId":"{id}""#));
    }
    expected_meta.push('}');
    assert_eq!(
        meta_text, expected_meta,
        "meta fields or their order in {text}"
    );

    if envelope == Envelope::Nested {
        let data = frame.json["data"]
            .as_object()
            .unwrap_or_else(|| panic!("data is not an object: {text}"));
        assert_eq!(data.len(), 1, "nested data holds only `event`: {text}");
    }
    body.to_owned()
}

/// Checks the session announcement, first frame of every connection.
/// Returns its `sessionId`.
pub fn assert_session_open(
    frame: &Frame,
    envelope: Envelope,
    resumed: bool,
    model: &str,
    last_sequence: u64,
) -> String {
    let body = assert_shape(frame, envelope, "interaction.session");
    let session_id = frame.event()["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("sessionId is not a string: {}", frame.text))
        .to_owned();
    let expected = format!(
        r#"{{"type":"open","sessionId":"{session_id}","resumed":{resumed},"model":"{model}","lastSequence":{last_sequence},"protocol":"1.1"}}"#
    );
    assert_eq!(body, expected, "the session announcement: {}", frame.text);
    assert_eq!(
        frame.sequence(),
        last_sequence,
        "the announcement's meta.sequence is the session's last sequence: {}",
        frame.text
    );
    session_id
}

/// Checks that `session_id` is one the host made: `session-<uuid v4>`.
pub fn assert_generated_session_id(session_id: &str) {
    let uuid = session_id
        .strip_prefix("session-")
        .unwrap_or_else(|| panic!("a generated id starts with `session-`: {session_id}"));
    let groups: Vec<&str> = uuid.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|group| group.len()).collect();
    assert_eq!(
        lengths,
        [8, 4, 4, 4, 12],
        "a generated id ends with a UUID: {session_id}"
    );
    assert!(
        uuid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
        "a UUID is hexadecimal: {session_id}"
    );
    assert!(
        groups[2].starts_with('4'),
        "the UUID is version 4: {session_id}"
    );
}

/// Checks that the turn's own frames are numbered `first, first+1, ...`
/// without gaps or repeats; returns the last sequence.
pub fn assert_contiguous(turn: &Turn, first: u64) -> u64 {
    let sequences = turn.sequences();
    let expected: Vec<u64> = (first..first + sequences.len() as u64).collect();
    assert_eq!(
        sequences,
        expected,
        "the turn's sequences must continue from {first} by one per event:\n{}",
        turn.dump()
    );
    *sequences.last().expect("a turn has frames")
}

/// Checks the turn is a completed echo of `prompt` (no params, no failures)
/// with `input_tokens` of history, as turn `interaction_id`.
pub fn assert_echo_turn(turn: &Turn, prompt: &str, input_tokens: u64, interaction_id: &str) {
    let dump = turn.dump();
    let expected_text = std::iter::once("echo:".to_owned())
        .chain(prompt.split_whitespace().map(|word| format!(" {word}")))
        .collect::<String>();
    assert_eq!(
        turn.text(),
        expected_text,
        "the echo of {prompt:?}:\n{dump}"
    );
    assert_eq!(turn.status(), "completed", "{dump}");
    assert_eq!(turn.interaction_id(), interaction_id, "{dump}");
    assert_eq!(turn.finish_reason(), Some("stop"), "{dump}");
    assert_eq!(
        turn.input_tokens(),
        Some(input_tokens),
        "usage.inputTokens counts the words of the whole conversation:\n{dump}"
    );
}

/// A private redis-server that keeps its data on disk (an append-only file
/// synced before each write is answered: what it acknowledged survives a
/// kill), so it can be stopped and started again with the sessions it had;
/// killed on drop.
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    pub fn start(dir: &Path, port: u16) -> Option<PrivateRedis> {
        let binary = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(binary) = binary else {
            skip_or_fail("no redis-server binary for a private Redis server");
            return None;
        };
        let child = Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(PrivateRedis {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        })
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            let signal = if frozen { "-STOP" } else { "-CONT" };
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal}");
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let mut again = PrivateRedis::start(&self.dir, self.port).expect("redis-server restarts");
        self.child = again.child.take();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The packages `scripts/install.sh` installs (the Dockerfile's builder
/// stage runs it): the host and the shipped plugins.
pub const SHIPPED: &[&str] = &[
    "llm-host",
    "llm-plugin-echo",
    "llm-plugin-memory",
    "llm-plugin-sqlite",
    "llm-plugin-redis",
    "llm-plugin-postgres",
    "llm-plugin-openai",
    "llm-plugin-anthropic",
    "llm-plugin-ollama",
];

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Session `id` as `GET /v1/sessions/{id}` answers it (which must be 200).
pub async fn stored(host: &Host, id: &str) -> Value {
    let reply = http(host.addr(), "GET", &format!("/v1/sessions/{id}")).await;
    assert_eq!(reply.status, 200, "GET /v1/sessions/{id}: {}", reply.body);
    reply.json()
}

/// The messages of a stored `session`, as `role: content`.
pub fn contents(session: &Value) -> Vec<String> {
    session["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("messages is an array: {session}"))
        .iter()
        .map(|m| {
            format!(
                "{}: {}",
                m["role"].as_str().unwrap_or("?"),
                m["content"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// The stored messages of session `id`, as `role: content`.
pub async fn stored_messages(host: &Host, id: &str) -> Vec<String> {
    contents(&stored(host, id).await)
}

/// `POST /v1/reload` with the admin key `key`, which must answer 200.
pub async fn reload_as(host: &Host, key: &str) {
    let reply = http_with(
        host.addr(),
        "POST",
        "/v1/reload",
        &[("Authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(reply.status, 200, "POST /v1/reload: {}", reply.body);
}
