//! `GET /v1/usage`: turns and tokens by key and backend, kept in the store,
//! the same from every host sharing it; and the host's own records kept out
//! of the session ids clients use.

use std::time::{Duration, Instant};

use llm_host_tests::{http, http_with, Host, HttpReply};
use serde_json::{json, Value};

use crate::stores::{config_with_store, start_host, store_settings, Kind};

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdef00";
const OPS: &str = "ops-key-0123456789abcdef000";

async fn usage(host: &Host, key: &str, query: &str) -> HttpReply {
    let bearer = format!("Bearer {key}");
    http_with(
        host.addr(),
        "GET",
        &format!("/v1/usage{query}"),
        &[("Authorization", &bearer)],
    )
    .await
}

/// The report of `key` in a usage answer.
fn of<'a>(answer: &'a Value, key: &str) -> &'a Value {
    answer["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["key"] == key))
        .unwrap_or_else(|| panic!("no key {key} in {answer:#}"))
}

/// Runs `prompt` on a new socket of `key` to `host`, on `path`'s session and
/// backend.
async fn turn(host: &Host, key: &str, path: &str, prompt: &str) {
    let mut client = host.connect(&format!("{path}&token={key}")).await;
    client.next_json().await;
    client.send_text(prompt).await;
    client.read_turn().await;
    client.close().await;
}

// Turns of two keys on two hosts sharing a sqlite file: each host adds its
// counts to the store, and either host answers the same totals, by key and
// backend; a key sees only its own usage.
#[tokio::test]
async fn usage_by_key_and_backend_is_the_same_from_every_host() {
    let shared = tempfile::tempdir().expect("a directory for the sqlite file");
    let settings = store_settings(Kind::Sqlite, shared.path()).expect("sqlite needs no server");
    let mut config = config_with_store(&settings);
    config.server_extra = "usage_flush_secs = 1".to_owned();
    config.extra.push_str(&format!(
        "\n[auth]\nkeys = [\n  {{ id = \"alice\", key = \"{ALICE}\" }},\n  \
         {{ id = \"bob\", key = \"{BOB}\" }},\n  {{ id = \"ops\", key = \"{OPS}\", admin = true }},\n]\n"
    ));
    let (one, two) = (
        start_host(Kind::Sqlite, &config),
        start_host(Kind::Sqlite, &config),
    );

    // alice: two echo turns on one, one `short` turn on two; bob: a failing turn on two.
    turn(&one, ALICE, "/v1/ws?session=u-1", "one two three").await;
    turn(&one, ALICE, "/v1/ws?session=u-1", "four").await;
    turn(&two, ALICE, "/v1/ws?session=u-2&model=short", "x").await;
    turn(&two, BOB, "/v1/ws?session=u-3&model=failing", "a b").await;

    // Host two adds its counts within its flush interval (1 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let reply = usage(&one, OPS, "").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let answer = reply.json();
        if of(&answer, "alice")["total"]["turns"] == 3 && of(&answer, "bob")["total"]["turns"] == 1
        {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "usage never added up: {answer:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let alice = of(&answer, "alice");
    // echo: 3 words in, 4 out; then 3 + 4 + 1 in (the history), 2 out.
    assert_eq!(
        alice["backends"]["echo"],
        json!({"turns": 2, "failedTurns": 0, "inputTokens": 11, "outputTokens": 6})
    );
    assert_eq!(
        alice["backends"]["short"],
        json!({"turns": 1, "failedTurns": 0, "inputTokens": 1, "outputTokens": 3})
    );
    assert_eq!(
        alice["total"],
        json!({"turns": 3, "failedTurns": 0, "inputTokens": 12, "outputTokens": 9})
    );
    let days = alice["days"].as_array().expect("days");
    assert_eq!(days.len(), 1, "{alice:#}");
    assert_eq!(days[0]["day"], answer["from"]);
    assert_eq!(of(&answer, "bob")["backends"]["failing"]["failedTurns"], 1);
    assert_eq!(of(&answer, "ops")["total"]["turns"], 0);

    // The other host answers the same.
    let from_two = usage(&two, OPS, "").await.json();
    assert_eq!(from_two["keys"], answer["keys"]);

    // A key sees its own usage only.
    let own = usage(&two, ALICE, "").await.json();
    assert_eq!(own["keys"].as_array().map(Vec::len), Some(1), "{own:#}");
    assert_eq!(own["keys"][0], *alice);
    assert_eq!(usage(&one, ALICE, "?key=bob").await.status, 403);
    let bob = usage(&one, OPS, "?key=bob").await.json();
    assert_eq!(bob["keys"].as_array().map(Vec::len), Some(1));

    // Windows.
    let day = answer["from"].as_str().expect("from").to_owned();
    let window = usage(&one, OPS, &format!("?from=2020-01-01&to={day}")).await;
    assert_eq!(window.status, 400, "more than 366 days: {}", window.body);
    let earlier = usage(&one, OPS, "?from=2020-01-01&to=2020-12-31")
        .await
        .json();
    assert_eq!(of(&earlier, "alice")["total"]["turns"], 0);
    for bad in [
        "?from=2026-02-30",
        "?to=yesterday",
        "?from=2026-12-02&to=2026-12-01",
    ] {
        let reply = usage(&one, OPS, bad).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
    }

    // The usage records are not sessions: not listed, not reachable by id.
    let bearer = format!("Bearer {OPS}");
    let listed = http_with(
        one.addr(),
        "GET",
        "/v1/sessions",
        &[("Authorization", &bearer)],
    )
    .await
    .json();
    let ids: Vec<&str> = listed["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(ids, ["u-1", "u-2", "u-3"], "{listed:#}");
    let record = format!("/v1/sessions/_host:usage:{day}:alice");
    let reply = http_with(one.addr(), "GET", &record, &[("Authorization", &bearer)]).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    let reply = one
        .http_upgrade(&format!(
            "/v1/ws?session=_host:usage:{day}:alice&token={ALICE}"
        ))
        .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
}

// `GET /v1/sessions` refuses a limit it cannot use instead of ignoring it.
#[tokio::test]
async fn a_bad_session_list_limit_is_refused() {
    let host = Host::start_default();
    for limit in ["0", "abc", "1001", "-1"] {
        let reply = http(host.addr(), "GET", &format!("/v1/sessions?limit={limit}")).await;
        assert_eq!(reply.status, 400, "limit={limit}: {}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "bad_limit");
    }
    let reply = http(host.addr(), "GET", "/v1/sessions?limit=1000").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}
