//! The Redis store against a real server: `LLM_HOST_TEST_REDIS_URL`
//! (default redis://127.0.0.1:6379). Without a server these tests print
//! `skipped: ...`, except under CI (`CI=true`), where they fail.
//!
//! Every test works under a key prefix of its own and deletes its keys when
//! it ends, so runs may share the server.

use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use llm_host_conformance::support::{
    listed_ids as list, save_empty as save, stored_version as load,
};
use llm_host_conformance::{store, support};
use llm_host_plugin_api::{self as api, ErrorKind, Plugin, SaveOutcome, StoreAdapterBox};
use llm_plugin_redis::{RedisPlugin, RedisSettings, RedisStore};

fn url() -> String {
    support::env_or("LLM_HOST_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

/// A connection of the test's own, and the prefix the test's stores use;
/// deletes every key under the prefix when dropped.
struct Server {
    conn: redis::Connection,
    prefix: String,
}

impl Server {
    /// Connects, or skips (fails under CI) when nothing answers.
    fn connect() -> Option<Server> {
        let url = url();
        let conn = support::require(
            redis::Client::open(url.as_str())
                .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
                .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn).map(|_| conn)),
            &format!("no Redis server at {url} (set LLM_HOST_TEST_REDIS_URL)"),
        )?;
        Some(Server {
            conn,
            prefix: format!("llm-host-test:{}:", support::unique_token()),
        })
    }

    fn settings(&self, extra: &str) -> String {
        let mut json = format!(
            r#"{{"url": {:?}, "prefix": {:?}, "pool_size": 4, "timeout_ms": 3000"#,
            url(),
            self.prefix
        );
        if !extra.is_empty() {
            json.push_str(", ");
            json.push_str(extra);
        }
        json.push('}');
        json
    }

    fn adapter(&self, extra: &str) -> StoreAdapterBox {
        RedisPlugin::new_store(&self.settings(extra)).expect("the settings are valid")
    }

    fn try_keys(&mut self) -> redis::RedisResult<Vec<String>> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut self.conn)?;
        keys.sort();
        Ok(keys)
    }

    fn keys(&mut self) -> Vec<String> {
        self.try_keys().expect("KEYS")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(keys) = self.try_keys() {
            if !keys.is_empty() {
                let _ = redis::cmd("DEL").arg(keys).exec(&mut self.conn);
            }
        }
    }
}

#[test]
fn conforms() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let settings = server.settings("");
    let results = store::assert_store_conforms(&|| RedisPlugin::new_store(&settings));
    eprintln!("{}", store::report(&results));
    assert_eq!(server.keys(), Vec::<String>::new(), "the suite cleans up");
}

#[test]
fn conforms_with_a_ttl() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let settings = server.settings(r#""ttl_secs": 600"#);
    store::assert_store_conforms(&|| RedisPlugin::new_store(&settings));
    assert_eq!(server.keys(), Vec::<String>::new(), "the suite cleans up");
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
    // An expired session is absent for saves too.
    assert_eq!(
        save(&store, "busy", 1, "k"),
        SaveOutcome::Conflict { current: 0 }
    );
    assert_eq!(
        save(&store, "busy", 0, "k"),
        SaveOutcome::Saved { version: 1 }
    );
    // The index sets expire with their sessions.
    sleep(Duration::from_millis(2100));
    assert_eq!(server.keys(), Vec::<String>::new());
}

#[test]
fn listing_drops_ids_of_expired_sessions_from_the_index() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let store = server.adapter(r#""ttl_secs": 30"#);
    for id in ["a", "b", "c"] {
        save(&store, id, 0, "k");
    }
    // Expire "b" behind the store's back, as Redis would.
    let key = format!("{}session:b", server.prefix);
    redis::cmd("DEL")
        .arg(&key)
        .exec(&mut server.conn)
        .expect("DEL");
    let index = format!("{}owner:k", server.prefix);
    let count = |server: &mut Server| -> usize {
        redis::cmd("ZCARD")
            .arg(&index)
            .query(&mut server.conn)
            .expect("ZCARD")
    };
    assert_eq!(count(&mut server), 3);
    assert_eq!(list(&store, "k"), ["a", "c"]);
    assert_eq!(
        count(&mut server),
        2,
        "the listing removed `b` from the index"
    );
    assert_eq!(list(&store, ""), ["a", "c"]);
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

/// The ids of the server's connections named `name`.
fn connections_named(server: &mut Server, name: &str) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut server.conn)
        .expect("CLIENT LIST");
    list.lines()
        .filter(|line| line.split(' ').any(|field| field == format!("name={name}")))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("id="))
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn recovers_after_its_connections_are_killed() {
    let Some(mut server) = Server::connect() else {
        return;
    };
    let settings: RedisSettings = api::parse_settings(&server.settings("")).expect("settings");
    let store = RedisStore::new(settings).expect("store");
    let name = store.client_name().to_owned();
    let store = api::store_adapter(store);
    // Open several connections at once, so the pool holds more than one.
    std::thread::scope(|scope| {
        for n in 0..4 {
            let store = &store;
            scope.spawn(move || save(store, &format!("s{n}"), 0, "k"));
        }
    });
    let ids = connections_named(&mut server, &name);
    assert!(!ids.is_empty(), "the store's connections are named {name}");
    for id in &ids {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .exec(&mut server.conn)
            .expect("CLIENT KILL");
    }
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
    eprintln!(
        "killed {} connections; {failures} call(s) failed before the store reconnected",
        ids.len()
    );
}

#[test]
fn an_unreachable_server_is_an_error_not_a_panic() {
    // Nothing listens on port 1; the constructor must not care.
    let store = RedisPlugin::new_store(r#"{"url": "redis://127.0.0.1:1", "timeout_ms": 500}"#)
        .expect("the store is built while the server is down");
    let err = store.ping().into_result().expect_err("nothing to ping");
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE);
    assert!(err.message.contains("redis 127.0.0.1:1/0"), "{err}");
    assert!(err.message.contains("cannot connect"), "{err}");
    let err = load(&store, "x").expect_err("nothing to load from");
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE);
}

#[test]
fn invalid_settings_are_refused_with_the_key_named() {
    for (json, key) in [
        (r#"{"url": "mysql://127.0.0.1"}"#, "url"),
        (r#"{"pool_size": 0}"#, "pool_size"),
        (r#"{"ttl_secs": 0}"#, "ttl_secs"),
        (r#"{"timeout": 10}"#, "timeout"),
    ] {
        let Err(err) = RedisPlugin::new_store(json) else {
            panic!("{json} was accepted");
        };
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{json}");
        assert!(err.message.contains(key), "{json}: {err}");
    }
}

/// A redis-server of the test's own on a free port, so it can be stopped
/// and started again.
struct OwnServer {
    child: Child,
    port: u16,
}

impl OwnServer {
    fn start(port: u16) -> Result<OwnServer, String> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot run redis-server: {err}"))?;
        let mut server = OwnServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("redis-server exited at once: {status}"));
            }
            if Instant::now() > deadline {
                server.stop();
                return Err("redis-server did not listen within 10 s".into());
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

#[test]
fn recovers_after_the_server_restarts() {
    let port = free_port();
    let Some(mut redis) = support::require(OwnServer::start(port), "redis-server") else {
        return;
    };
    let store = RedisPlugin::new_store(&format!(
        r#"{{"url": "redis://127.0.0.1:{}", "timeout_ms": 1000}}"#,
        redis.port
    ))
    .expect("store");
    assert_eq!(save(&store, "a", 0, "k"), SaveOutcome::Saved { version: 1 });
    redis.stop();
    let err = load(&store, "a").expect_err("the server is down");
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE, "{err}");
    assert!(err.message.contains(&format!("127.0.0.1:{port}")), "{err}");
    let err = store.ping().into_result().expect_err("still down");
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE, "{err}");
    // The same port again; this server keeps nothing, so the session is gone.
    let Some(_redis) = support::require(OwnServer::start(port), "redis-server restart") else {
        return;
    };
    assert!(store.ping().into_result().is_ok());
    assert_eq!(load(&store, "a").expect("load after restart"), None);
    assert_eq!(save(&store, "a", 0, "k"), SaveOutcome::Saved { version: 1 });
}
