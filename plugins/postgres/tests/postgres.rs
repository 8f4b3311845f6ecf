//! The PostgreSQL store against a real server: `LLM_HOST_TEST_POSTGRES_URL`
//! (default `host=127.0.0.1 user=postgres dbname=test`). Without a server
//! these tests print `skipped: ...`, except under CI (`CI=true`), where they
//! fail.
//!
//! Every test uses a table and an application_name of its own and drops the
//! table when it ends, so runs may share the server.

use std::thread::sleep;
use std::time::Duration;

use llm_host_conformance::store;
use llm_host_conformance::support::{
    listed_ids as list, save_empty as save, stored_version as load,
};
use llm_host_plugin_api::{ErrorKind, Plugin, SaveOutcome, StoreAdapterBox};
use llm_plugin_postgres::{PostgresPlugin, MIGRATIONS_TABLE};

mod common;
use common::Server;

#[test]
fn conforms() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let settings = server.settings("");
    let results = store::assert_store_conforms(&|| PostgresPlugin::new_store(&settings));
    eprintln!("{}", store::report(&results));
    let table = server.table.clone();
    assert_eq!(
        server.count(&format!("SELECT COUNT(*) FROM \"{table}\"")),
        0,
        "the suite cleans up"
    );
}

#[test]
fn conforms_with_a_ttl() {
    let Some(server) = Server::connect() else {
        return;
    };
    let settings = server.settings(r#""ttl_secs": 600"#);
    store::assert_store_conforms(&|| PostgresPlugin::new_store(&settings));
}

#[test]
fn the_migration_runs_once_even_when_hosts_start_together() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    // Eight "hosts" whose first calls race to create the table.
    let stores: Vec<StoreAdapterBox> = (0..8).map(|_| server.adapter("")).collect();
    std::thread::scope(|scope| {
        for (n, store) in stores.iter().enumerate() {
            scope.spawn(move || {
                assert_eq!(
                    save(store, &format!("s{n}"), 0, "k"),
                    SaveOutcome::Saved { version: 1 }
                );
            });
        }
    });
    let table = server.table.clone();
    assert_eq!(
        server.count(&format!(
            "SELECT COUNT(*) FROM {MIGRATIONS_TABLE} WHERE table_name = '{table}'"
        )),
        1
    );
    assert_eq!(list(&stores[0], "k").len(), 8);
    // The table's schema version is recorded; a newer one is refused.
    server
        .client
        .execute(
            &format!("INSERT INTO {MIGRATIONS_TABLE} (table_name, version) VALUES ($1, 99)"),
            &[&table],
        )
        .expect("insert");
    let store = server.adapter("");
    let err = store
        .ping()
        .into_result()
        .expect_err("version 99 is unknown");
    assert_eq!(err.kind, ErrorKind::UNSUPPORTED, "{err}");
    assert!(err.message.contains("version 99"), "{err}");
}

#[test]
fn idle_sessions_expire() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let store = server.adapter(r#""ttl_secs": 1"#);
    assert_eq!(
        save(&store, "idle", 0, "k"),
        SaveOutcome::Saved { version: 1 }
    );
    assert_eq!(
        save(&store, "busy", 0, "k"),
        SaveOutcome::Saved { version: 1 }
    );
    // Loading counts as use: "busy" is loaded every 0.6 s and outlives the ttl.
    for _ in 0..3 {
        sleep(Duration::from_millis(600));
        assert_eq!(load(&store, "busy").expect("load"), Some(1));
    }
    assert_eq!(load(&store, "idle").expect("load"), None, "idle for 1.8 s");
    assert_eq!(list(&store, "k"), ["busy"]);
    sleep(Duration::from_millis(2100));
    assert_eq!(load(&store, "busy").expect("load"), None);
    assert_eq!(list(&store, "k"), Vec::<String>::new());
    assert_eq!(list(&store, ""), Vec::<String>::new());
    assert!(!store.delete("idle".into()).into_result().expect("delete"));
    assert_eq!(
        save(&store, "busy", 1, "k"),
        SaveOutcome::Conflict { current: 0 }
    );
    assert_eq!(
        save(&store, "busy", 0, "k"),
        SaveOutcome::Saved { version: 1 }
    );
    // The expired rows met by calls are gone, not just hidden.
    let table = server.table.clone();
    assert_eq!(
        server.count(&format!("SELECT COUNT(*) FROM \"{table}\"")),
        1
    );
}

#[test]
fn hosts_sharing_a_server_see_each_others_saves() {
    let Some(server) = Server::connect() else {
        return;
    };
    let first = server.adapter("");
    let second = server.adapter("");
    assert_eq!(
        save(&first, "shared", 0, "k"),
        SaveOutcome::Saved { version: 1 }
    );
    assert_eq!(load(&second, "shared").expect("load"), Some(1));
    assert_eq!(
        save(&second, "shared", 1, "k"),
        SaveOutcome::Saved { version: 2 }
    );
    assert_eq!(
        save(&first, "shared", 1, "k"),
        SaveOutcome::Conflict { current: 2 }
    );
    assert_eq!(list(&first, "k"), ["shared"]);
}

#[test]
fn recovers_after_its_connections_are_killed() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let store = server.adapter("");
    // Open several connections at once, so the pool holds more than one.
    std::thread::scope(|scope| {
        for n in 0..4 {
            let store = &store;
            scope.spawn(move || save(store, &format!("s{n}"), 0, "k"));
        }
    });
    let killed = server.kill_store_connections();
    assert!(
        killed >= 1,
        "the store's connections carry its application_name"
    );
    let mut failures = 0;
    for n in 0..4 {
        match load(&store, &format!("s{n}")) {
            Ok(found) => assert_eq!(found, Some(1)),
            Err(err) => {
                assert_eq!(err.kind, ErrorKind::UNAVAILABLE, "{err}");
                failures += 1;
            }
        }
    }
    assert!(failures <= 1, "{failures} calls failed after the kill");
    assert_eq!(
        save(&store, "s0", 1, "k"),
        SaveOutcome::Saved { version: 2 }
    );
    // A save whose connection was killed is retried, not doubled.
    server.kill_store_connections();
    assert_eq!(
        save(&store, "s0", 2, "k"),
        SaveOutcome::Saved { version: 3 }
    );
    eprintln!(
        "killed {killed} connections; {failures} call(s) failed before the store reconnected"
    );
}

#[test]
fn an_unreachable_server_is_an_error_not_a_panic() {
    // Nothing listens on port 1; the constructor must not care.
    let store = match PostgresPlugin::new_store(
        r#"{"url": "host=127.0.0.1 port=1 user=postgres dbname=test", "connect_timeout_ms": 500}"#,
    ) {
        Ok(store) => store,
        Err(err) => panic!("the store is built while the server is down: {err}"),
    };
    let err = store.ping().into_result().expect_err("nothing to ping");
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE);
    assert!(err.message.contains("postgres 127.0.0.1:1/test"), "{err}");
    assert!(err.message.contains("cannot connect"), "{err}");
    let err = load(&store, "x").expect_err("nothing to load from");
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE);
}

#[test]
fn invalid_settings_are_refused_with_the_key_named() {
    for (json, key) in [
        (r#"{"url": "host=x port=notanumber"}"#, "url"),
        (r#"{"table": "Robert'); DROP TABLE students;--"}"#, "table"),
        (r#"{"pool_size": 0}"#, "pool_size"),
        (r#"{"ttl_secs": 0}"#, "ttl_secs"),
        (r#"{"tabel": "x"}"#, "tabel"),
    ] {
        let Err(err) = PostgresPlugin::new_store(json) else {
            panic!("{json} was accepted");
        };
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{json}");
        assert!(err.message.contains(key), "{json}: {err}");
    }
}

#[test]
fn a_nul_character_is_refused_as_input() {
    let Some(server) = Server::connect() else {
        return;
    };
    let store = server.adapter("");
    let err = store
        .save("nul".into(), 0, "".into(), "{\"a\":\"\0\"}".into())
        .into_result()
        .expect_err("PostgreSQL text holds no NUL");
    assert_eq!(err.kind, ErrorKind::INVALID_INPUT, "{err}");
    assert!(
        store.ping().into_result().is_ok(),
        "the connection is still good"
    );
}

#[test]
fn a_statement_blocked_by_a_lock_fails_within_the_statement_timeout() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let store = server.adapter(r#""statement_timeout_ms": 300"#);
    assert!(matches!(
        save(&store, "locked", 0, ""),
        SaveOutcome::Saved { .. }
    ));
    // Another session holds the table for longer than any call may wait.
    let table = server.table.clone();
    server
        .client
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE \"{table}\" IN ACCESS EXCLUSIVE MODE"
        ))
        .expect("lock the table");
    let started = std::time::Instant::now();
    let err = load(&store, "locked").expect_err("the table is locked");
    let waited = started.elapsed();
    server.client.batch_execute("ROLLBACK").expect("unlock");
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    assert!(
        err.message.contains("statement timeout") || err.message.contains("canceling"),
        "{err}"
    );
    assert_eq!(load(&store, "locked").expect("unlocked"), Some(1));
}
