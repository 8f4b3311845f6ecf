//! A session's settings with the core's fakes: saved with the session,
//! applied to later turns, never to another key's session, and not lost to
//! a turn running meanwhile on this host or another.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use llm_host_plugin_api::TurnParams;
use serde_json::json;

use super::*;
use crate::core::fakes::{prompt, Client, FakeBackends, FakeModel, FakeStore};
use crate::core::sink::Status;

fn set_system(text: &str) -> SettingsUpdate {
    SettingsUpdate {
        system: Some(Some(text.to_owned())),
        ..SettingsUpdate::default()
    }
}

fn backends(names: &[&str]) -> (FakeBackends, Vec<Arc<FakeModel>>) {
    let models: Vec<_> = names
        .iter()
        .map(|name| Arc::new(FakeModel::named(name, Duration::ZERO)))
        .collect();
    let backends = FakeBackends {
        models: models.clone(),
        ..FakeBackends::default()
    };
    (backends, models)
}

#[test]
fn a_prompts_params_override_the_defaults_field_by_field() {
    let defaults: TurnParams = serde_json::from_value(json!({
        "temperature": 0.2, "maxTokens": 50, "seed": 7, "stop": ["END"],
        "tools": [{"name": "lookup"}], "mirostat": 2, "keep": true
    }))
    .expect("params");
    let mine: TurnParams = serde_json::from_value(json!({
        "temperature": 0.9, "topK": 3, "stop": ["STOP", "HALT"], "mirostat": 1
    }))
    .expect("params");
    let merged = serde_json::to_value(merge_params(&defaults, mine)).expect("serializes");
    assert_eq!(
        merged,
        json!({
            "temperature": 0.9, "maxTokens": 50, "topK": 3, "seed": 7,
            "stop": ["STOP", "HALT"], "tools": [{"name": "lookup", "description": "", "parameters": null}],
            "mirostat": 1, "keep": true
        })
    );
    assert_eq!(
        merge_params(&TurnParams::default(), defaults.clone()),
        defaults
    );
}

#[test]
fn an_update_sets_clears_and_keeps() {
    let now = SessionSettings {
        system: Some("Be brief.".to_owned()),
        model: Some("fast".to_owned()),
        params: None,
    };
    let update = SettingsUpdate {
        system: Some(None),
        model: None,
        params: Some(Some(TurnParams {
            seed: Some(1),
            ..TurnParams::default()
        })),
    };
    let after = now.updated(&update);
    assert_eq!(after.system, None, "null clears");
    assert_eq!(after.model.as_deref(), Some("fast"), "absent keeps");
    assert_eq!(after.params.and_then(|p| p.seed), Some(1), "a value sets");
    assert_eq!(now.updated(&SettingsUpdate::default()), now);
    assert!(SessionSettings::default().is_empty());
}

// Settings are saved with the session (created by the update) and each
// later turn sends the system prompt first and merges the default
// parameters; the stored history holds no system message.
#[tokio::test(start_paused = true)]
async fn settings_are_saved_and_shape_later_turns() {
    for shared in [false, true] {
        let store = FakeStore::new(shared);
        let locks = SessionLocks::default();
        let client = Client::new("host-1", &store, "s", "alice");
        let update = SettingsUpdate {
            system: Some(Some("Be \"brief\".".to_owned())),
            model: None,
            params: Some(Some(
                serde_json::from_value(json!({"maxTokens": 5, "temperature": 0.3, "mirostat": 1}))
                    .expect("params"),
            )),
        };
        let settings = update_settings(&client, &locks, &update)
            .await
            .expect("updated");
        assert_eq!(settings.system.as_deref(), Some("Be \"brief\"."));
        let doc = store.doc("s").expect("the update made the session");
        assert_eq!(doc["settings"]["params"]["maxTokens"], 5);
        assert_eq!(doc["turns"], 0);
        assert_eq!(store.owner("s").as_deref(), Some("alice"));

        let (backends, models) = backends(&["fake"]);
        let mut hi = prompt("hi there");
        hi.params =
            Box::new(serde_json::from_value(json!({"temperature": 0.9, "x": 2})).expect("params"));
        let (report, _) = client.prompt_on(&locks, &backends, &models[0], hi).await;
        assert_eq!(report.status, Status::Completed);
        let requests = models[0].requests.lock().expect("lock").clone();
        assert_eq!(
            requests[0]["messages"],
            json!([
                {"role": "system", "content": "Be \"brief\"."},
                {"role": "user", "content": "hi there"},
            ])
        );
        assert_eq!(
            requests[0]["params"],
            json!({"temperature": 0.9, "maxTokens": 5, "mirostat": 1, "x": 2})
        );
        assert_eq!(
            store.messages("s"),
            [
                ("user".to_owned(), "hi there".to_owned()),
                ("assistant".to_owned(), "echo: hi there".to_owned())
            ],
            "the system prompt is not stored in the history"
        );
        assert_eq!(
            store.doc("s").expect("stored")["settings"]["system"],
            "Be \"brief\".",
            "the turn keeps the settings"
        );

        // Cleared: the next request has no system message.
        let clear = SettingsUpdate {
            system: Some(None),
            ..SettingsUpdate::default()
        };
        update_settings(&client, &locks, &clear)
            .await
            .expect("updated");
        client
            .prompt_on(&locks, &backends, &models[0], prompt("again"))
            .await;
        assert_eq!(
            models[0].sent()[1],
            ["user: hi there", "assistant: echo: hi there", "user: again"]
        );
    }
}

async fn update_settings(
    client: &Client,
    locks: &SessionLocks,
    update: &SettingsUpdate,
) -> Result<SessionSettings, ClaimError> {
    super::update(&client.scope(), locks, update).await
}

// The session's backend wins over the one the turn is given, unless the
// prompt named that one; a backend that is gone is not used.
#[tokio::test(start_paused = true)]
async fn the_sessions_backend_wins_unless_the_prompt_names_one() {
    let store = FakeStore::new(false);
    let locks = SessionLocks::default();
    let client = Client::new("host-1", &store, "s", "alice");
    let (backends, models) = backends(&["fake", "other"]);
    let update = SettingsUpdate {
        model: Some(Some("other".to_owned())),
        ..SettingsUpdate::default()
    };
    update_settings(&client, &locks, &update)
        .await
        .expect("updated");
    let (_, ran) = client
        .prompt_on(&locks, &backends, &models[0], prompt("one"))
        .await;
    assert_eq!(ran.name, "other");
    assert_eq!(store.doc("s").expect("stored")["model"], "other");
    assert_eq!(client.attachment.settings_model().as_deref(), Some("other"));

    let mut named = prompt("two");
    named.model = Some("fake".to_owned());
    let (_, ran) = client.prompt_on(&locks, &backends, &models[0], named).await;
    assert_eq!(ran.name, "fake", "the prompt's own backend wins");

    // A backend the settings name that is no longer configured.
    let only_fake = FakeBackends {
        models: vec![models[0].clone()],
        ..FakeBackends::default()
    };
    let (report, ran) = client
        .prompt_on(&locks, &only_fake, &models[0], prompt("three"))
        .await;
    assert_eq!(
        (report.status, ran.name.as_str()),
        (Status::Completed, "fake")
    );
    assert_eq!(models[1].requests.lock().expect("lock").len(), 1);
}

// An update that changes nothing writes nothing; one of another key's
// session is refused as if it did not exist, and changes nothing.
#[tokio::test(start_paused = true)]
async fn no_write_for_nothing_and_none_for_another_key() {
    let store = FakeStore::new(true);
    let locks = SessionLocks::default();
    let alice = Client::new("host-1", &store, "s", "alice");
    let none = update_settings(&alice, &locks, &SettingsUpdate::default())
        .await
        .expect("answered");
    assert!(none.is_empty());
    assert!(store.doc("s").is_none(), "no session made for nothing");

    update_settings(&alice, &locks, &set_system("mine"))
        .await
        .expect("updated");
    let version = store.sessions.lock().expect("lock")["s"].0;
    update_settings(&alice, &locks, &set_system("mine"))
        .await
        .expect("updated");
    assert_eq!(store.sessions.lock().expect("lock")["s"].0, version);

    let bob = Client::new("host-1", &store, "s", "bob");
    let refused = update_settings(&bob, &locks, &set_system("bob's")).await;
    assert!(
        matches!(refused, Err(ClaimError::NotYours(_))),
        "{refused:?}"
    );
    assert_eq!(
        store.doc("s").expect("stored")["settings"]["system"],
        "mine"
    );
}

// A save that fails changes nothing; one that is applied but reported
// failed is recognised as applied.
#[tokio::test(start_paused = true)]
async fn failed_saves() {
    let store = FakeStore::new(true);
    let locks = SessionLocks::default();
    let client = Client::new("host-1", &store, "s", "alice");
    store.fail_saves.store(1, Ordering::SeqCst);
    let failed = update_settings(&client, &locks, &set_system("a")).await;
    assert!(matches!(failed, Err(ClaimError::Store(_))), "{failed:?}");
    assert!(store.doc("s").is_none());

    store.lose_answers.store(1, Ordering::SeqCst);
    let applied = update_settings(&client, &locks, &set_system("b")).await;
    assert_eq!(applied.expect("applied").system.as_deref(), Some("b"));
}

// An update sent while a turn of the session runs, on this host or on
// another, applies from the next turn: the running turn is saved whole and
// the settings are not lost to its lease renewals or its save.
#[tokio::test(start_paused = true)]
async fn an_update_during_a_turn_applies_from_the_next() {
    for (shared, other_host) in [(false, false), (true, false), (true, true)] {
        let store = FakeStore::new(shared);
        let locks = Arc::new(SessionLocks::default());
        let other_locks = Arc::new(SessionLocks::default());
        let model = Arc::new(FakeModel::named("fake", Duration::from_millis(1_000)));
        let backends = Arc::new(FakeBackends {
            models: vec![model.clone()],
            ..FakeBackends::default()
        });
        let turn_client = Arc::new(Client::new("host-1", &store, "s", "alice"));
        let running = {
            let (client, locks, backends, model) = (
                turn_client.clone(),
                locks.clone(),
                backends.clone(),
                model.clone(),
            );
            tokio::spawn(async move {
                client
                    .prompt_on(&locks, &backends, &model, prompt("a b c d e f g h"))
                    .await
                    .0
                    .status
            })
        };
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        let (host, update_locks) = match other_host {
            true => ("host-2", &other_locks),
            false => ("host-1", &locks),
        };
        let updater = Client::new(host, &store, "s", "alice");
        let started = tokio::time::Instant::now();
        update_settings(&updater, update_locks, &set_system("From now on."))
            .await
            .expect("updated");
        if !other_host {
            assert!(
                started.elapsed() >= Duration::from_secs(5),
                "waited for the turn on this host"
            );
        }
        assert_eq!(
            running.await.expect("turn"),
            Status::Completed,
            "{shared} {other_host}"
        );
        assert_eq!(
            store.messages("s").len(),
            2,
            "the running turn was saved ({shared}, {other_host})"
        );
        assert_eq!(
            model.sent()[0],
            ["user: a b c d e f g h"],
            "the running turn had no system prompt"
        );
        let doc = store.doc("s").expect("stored");
        assert_eq!(
            doc["settings"]["system"], "From now on.",
            "kept by the turn's save ({shared}, {other_host}): {doc}"
        );
        turn_client
            .prompt_on(&locks, &backends, &model, prompt("next"))
            .await;
        assert_eq!(model.sent()[1][0], "system: From now on.");
    }
}
