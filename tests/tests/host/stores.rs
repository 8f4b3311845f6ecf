//! Durable sessions through the real host: restarts, concurrency across
//! connections and across hosts sharing one store, and store outages.
//!
//! Redis and PostgreSQL are the machine's own servers
//! (`LLM_HOST_TEST_REDIS_URL`, `LLM_HOST_TEST_POSTGRES_URL`); a test that cannot
//! reach one says it skipped, and fails instead under `CI=true`.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use llm_host_conformance::support::{env_or, skip_or_fail, unique_token};
use llm_host_tests::{artifacts, http, Client, Config, Host, Turn, Workdir};

use crate::common::{contents, free_port, stored, PrivateRedis};
use serde_json::Value;

/// A store the tests can run the host on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Sqlite,
    Redis,
    Postgres,
}

impl Kind {
    fn library(self) -> &'static str {
        match self {
            Kind::Sqlite => "libllm_plugin_sqlite.so",
            Kind::Redis => "libllm_plugin_redis.so",
            Kind::Postgres => "libllm_plugin_postgres.so",
        }
    }
}

fn reachable(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some()
}

/// `[stores.shared]` settings for `kind`, or None (skipped) if its server is
/// not reachable. `shared_dir` holds a sqlite file several hosts can share.
pub(crate) fn store_settings(kind: Kind, shared_dir: &Path) -> Option<String> {
    let run = unique_token();
    match kind {
        Kind::Sqlite => Some(format!(
            "{{ path = \"{}\" }}",
            shared_dir.join("sessions.db").display()
        )),
        Kind::Redis => {
            let url = env_or("LLM_HOST_TEST_REDIS_URL", "redis://127.0.0.1:6379");
            let addr = url.trim_start_matches("redis://").trim_end_matches('/');
            if !reachable(addr) {
                skip_or_fail(&format!("no Redis server at {url}"));
                return None;
            }
            Some(format!(
                "{{ url = \"{url}\", prefix = \"llm-host-e2e-{run}:\" }}"
            ))
        }
        Kind::Postgres => {
            let url = env_or(
                "LLM_HOST_TEST_POSTGRES_URL",
                "host=127.0.0.1 user=postgres dbname=test",
            );
            if !reachable("127.0.0.1:5432") && url.contains("127.0.0.1") {
                skip_or_fail(&format!("no PostgreSQL server at {url}"));
                return None;
            }
            Some(format!(
                "{{ url = \"{url}\", table = \"llm_host_e2e_{run}\" }}"
            ))
        }
    }
}

pub(crate) fn config_with_store(settings: &str) -> Config {
    Config {
        store: "shared".to_owned(),
        extra: format!("\n[stores.shared]\nplugin = \"shared\"\nsettings = {settings}\n"),
        ..Config::default()
    }
}

/// A host whose plugin directory also holds `kind`'s library, on `config`.
pub(crate) fn start_host(kind: Kind, config: &Config) -> Host {
    start_host_with_env(kind, config, &[])
}

/// [`start_host`] with more environment variables for the host's process.
fn start_host_with_env(kind: Kind, config: &Config, env: &[(&str, &str)]) -> Host {
    let workdir = Workdir::with_config(config);
    let library = artifacts()
        .host
        .parent()
        .expect("the profile directory")
        .join(kind.library());
    std::fs::copy(
        &library,
        workdir.path().join("plugins").join(kind.library()),
    )
    .unwrap_or_else(|err| panic!("copy {}: {err}", library.display()));
    let text = config.to_toml().replace(
        "plugin = \"shared\"",
        &format!(
            "plugin = \"{}\"",
            match kind {
                Kind::Sqlite => "sqlite",
                Kind::Redis => "redis",
                Kind::Postgres => "postgres",
            }
        ),
    );
    workdir.write_config(&text);
    Host::start_with_env(workdir, &[], env)
}

// A session survives a host restart on sqlite, redis and postgres.
#[tokio::test]
async fn sessions_survive_a_restart() {
    let shared = tempfile::tempdir().expect("a directory for the sqlite file");
    for kind in [Kind::Sqlite, Kind::Redis, Kind::Postgres] {
        let Some(settings) = store_settings(kind, shared.path()) else {
            continue;
        };
        let config = config_with_store(&settings);
        let last = {
            let host = start_host(kind, &config);
            let mut client = host.connect("/v1/ws?session=restart-1").await;
            client.next_json().await;
            client.send_text("remember this").await;
            let turn = client.read_turn().await;
            assert_eq!(turn.status(), "completed", "{kind:?}: {}", turn.dump());
            turn.end().sequence()
        }; // the host is killed here
        let host = start_host(kind, &config);
        let mut client = host.connect("/v1/ws?session=restart-1").await;
        let open = client.next_json().await;
        assert_eq!(open.event()["resumed"], true, "{kind:?}: {}", open.text);
        assert_eq!(
            open.event()["lastSequence"],
            last,
            "{kind:?}: {}",
            open.text
        );
        client.send_text("and this").await;
        let turn = client.read_turn().await;
        assert_eq!(turn.interaction_id(), "turn-2", "{kind:?}");
        assert_eq!(
            contents(&stored(&host, "restart-1").await),
            [
                "user: remember this",
                "assistant: echo: remember this",
                "user: and this",
                "assistant: echo: and this"
            ],
            "{kind:?}"
        );
        let _ = http(host.addr(), "DELETE", "/v1/sessions/restart-1").await;
    }
}

/// Sends `prompts` as fast as possible and reads every turn they start.
async fn run_prompts(mut client: Client, prompts: Vec<String>, all: usize) -> Vec<Turn> {
    for prompt in &prompts {
        client.send_text(prompt.clone()).await;
    }
    let mut turns = Vec::new();
    while turns.len() < all {
        turns.push(client.read_turn().await);
    }
    // A socket follows every turn of its session run on its host, each
    // once, in order; its own are those of its prompts.
    let sequences: Vec<u64> = turns.iter().flat_map(Turn::sequences).collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "a socket saw numbers out of order: {sequences:?}"
    );
    turns.retain(|turn| {
        prompts
            .iter()
            .any(|prompt| turn.text() == format!("echo: {prompt}"))
    });
    assert_eq!(turns.len(), prompts.len());
    turns
}

/// Checks the stored session after concurrent writers: every prompt stored
/// exactly once followed by its answer, each writer's prompts in its order,
/// and no sequence number used twice.
fn assert_nothing_lost(session: &Value, writers: &[Vec<String>], turns: &[Turn], what: &str) {
    let messages = contents(session);
    let expected: usize = writers.iter().map(Vec::len).sum::<usize>() * 2;
    assert_eq!(messages.len(), expected, "{what}: {messages:#?}");
    for pair in messages.chunks(2) {
        let prompt = pair[0]
            .strip_prefix("user: ")
            .unwrap_or_else(|| panic!("{what}: {pair:?}"));
        assert_eq!(
            pair[1],
            format!("assistant: echo: {prompt}"),
            "{what}: {messages:#?}"
        );
    }
    for prompts in writers {
        let positions: Vec<usize> = prompts
            .iter()
            .map(|p| {
                let found: Vec<usize> = messages
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m == format!("user: {p}"))
                    .map(|(i, _)| i)
                    .collect();
                assert_eq!(found.len(), 1, "{what}: `{p}` stored {} times", found.len());
                found[0]
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{what}: out of order {positions:?}"
        );
    }
    let mut seen = HashSet::new();
    for turn in turns {
        assert_eq!(turn.status(), "completed", "{what}: {}", turn.dump());
        for sequence in turn.sequences() {
            assert!(
                seen.insert(sequence),
                "{what}: sequence {sequence} used twice"
            );
        }
    }
    assert_eq!(
        session["turns"],
        writers.iter().map(Vec::len).sum::<usize>(),
        "{what}"
    );
}

fn prompts(who: &str, count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("{who}{i}")).collect()
}

// Two connections on one host send turns to one session at once: nothing lost, nothing twice.
#[tokio::test]
async fn two_connections_on_one_session_lose_nothing() {
    let host = Host::start_default();
    let mut a = host
        .connect("/v1/ws?session=shared-1&model=slow_echo")
        .await;
    let mut b = host
        .connect("/v1/ws?session=shared-1&model=slow_echo")
        .await;
    a.next_json().await;
    b.next_json().await;
    let writers = [prompts("a", 4), prompts("b", 4)];
    // Each socket follows all eight turns.
    let (ta, tb) = tokio::join!(
        run_prompts(a, writers[0].clone(), 8),
        run_prompts(b, writers[1].clone(), 8)
    );
    let turns: Vec<Turn> = ta.into_iter().chain(tb).collect();
    assert_nothing_lost(&stored(&host, "shared-1").await, &writers, &turns, "memory");
}

// Two llm-host processes sharing one store take turns on one session: nothing lost, no sequence twice.
#[tokio::test]
async fn two_hosts_sharing_a_store_lose_nothing() {
    let shared = tempfile::tempdir().expect("a directory for the sqlite file");
    for kind in [Kind::Sqlite, Kind::Redis, Kind::Postgres] {
        let Some(settings) = store_settings(kind, shared.path()) else {
            continue;
        };
        let config = config_with_store(&settings);
        let (one, two) = (start_host(kind, &config), start_host(kind, &config));
        let id = format!("shared-{kind:?}");
        let mut a = one
            .connect(&format!("/v1/ws?session={id}&model=slow_echo"))
            .await;
        let mut b = two
            .connect(&format!("/v1/ws?session={id}&model=slow_echo"))
            .await;
        a.next_json().await;
        b.next_json().await;
        let writers = [prompts("a", 4), prompts("b", 4)];
        let (ta, tb) = tokio::join!(
            run_prompts(a, writers[0].clone(), 4),
            run_prompts(b, writers[1].clone(), 4)
        );
        let turns: Vec<Turn> = ta.into_iter().chain(tb).collect();
        let what = format!("{kind:?}");
        assert_nothing_lost(&stored(&one, &id).await, &writers, &turns, &what);
        let _ = http(one.addr(), "DELETE", &format!("/v1/sessions/{id}")).await;
    }
}

// The store goes away mid-turn: the turn fails with a store error, the host goes on,
// and once the store is back the session continues with nothing partial or corrupt.
#[tokio::test]
async fn a_store_outage_fails_the_turn_and_the_session_recovers() {
    let dir = tempfile::tempdir().expect("a directory for redis");
    let port = free_port();
    let Some(mut redis) = PrivateRedis::start(dir.path(), port) else {
        return;
    };
    let config = config_with_store(&format!("{{ url = \"redis://127.0.0.1:{port}\" }}"));
    let host = start_host(Kind::Redis, &config);
    let mut client = host
        .connect("/v1/ws?session=outage-1&model=slow_echo")
        .await;
    client.next_json().await;
    client.send_text("before the outage").await;
    assert_eq!(client.read_turn().await.status(), "completed");

    client.send_text("during the outage").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    redis.stop();
    frames.extend(client.read_turn().await.frames);
    let failed = Turn { frames };
    assert_eq!(failed.status(), "failed", "{}", failed.dump());
    let store_error = failed
        .diagnostics()
        .into_iter()
        .find(|d| d.diagnostic_code() == "store_unavailable")
        .unwrap_or_else(|| panic!("no store diagnostic: {}", failed.dump()))
        .entry()
        .clone();
    assert_eq!(store_error["kind"], "store");
    assert_eq!(http(host.addr(), "GET", "/healthz").await.status, 200);
    assert_eq!(http(host.addr(), "GET", "/readyz").await.status, 503);

    redis.restart();
    client.send_text("after the outage").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "echo: after the outage");
    let session = stored(&host, "outage-1").await;
    let messages = contents(&session);
    assert_eq!(
        messages.first().map(String::as_str),
        Some("user: before the outage")
    );
    assert_eq!(
        messages
            .iter()
            .filter(|m| m.ends_with("after the outage"))
            .count(),
        2,
        "{messages:#?}"
    );
    assert_eq!(http(host.addr(), "GET", "/readyz").await.status, 200);
}

// SIGTERM mid-turn on a durable store: the turn finishes, is saved, and is there after a restart.
#[tokio::test]
async fn sigterm_mid_turn_saves_the_turn() {
    let shared = tempfile::tempdir().expect("a directory for the sqlite file");
    let Some(settings) = store_settings(Kind::Sqlite, shared.path()) else {
        return;
    };
    let config = config_with_store(&settings);
    let mut host = start_host(Kind::Sqlite, &config);
    let mut client = host.connect("/v1/ws?session=term-1&model=slow_echo").await;
    client.next_json().await;
    client.send_text("finish me please").await;
    client.read_until("interaction.model", "delta").await;
    host.signal("TERM");
    let rest = client.read_turn().await;
    assert_eq!(rest.status(), "completed", "{}", rest.dump());
    let status = host
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the host did not exit; log:\n{}", host.log()));
    assert!(status.success(), "{status}");

    let host = start_host(Kind::Sqlite, &config);
    assert_eq!(
        contents(&stored(&host, "term-1").await),
        [
            "user: finish me please",
            "assistant: echo: finish me please"
        ]
    );
}

// Two hosts on Redis; the first is killed (SIGKILL) four frames into a turn. The client
// resumes on the second and is told at once why it waits; the session is served again
// within 10 s, and no sequence number it already saw is sent again.
#[tokio::test]
async fn a_session_whose_host_was_killed_is_served_again_without_repeating_a_number() {
    let shared = tempfile::tempdir().expect("a scratch directory");
    let Some(settings) = store_settings(Kind::Redis, shared.path()) else {
        return;
    };
    let config = config_with_store(&settings);
    let mut first = start_host(Kind::Redis, &config);
    let second = start_host(Kind::Redis, &config);
    let mut client = first
        .connect("/v1/ws?session=killed-1&model=slow_echo")
        .await;
    client.next_json().await;
    client.send_text("a b c d e f g h i j k l m n o p").await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let frame = client.next_json().await;
        seen.push(frame.meta()["sequence"].as_u64().expect("a sequence"));
    }
    first.signal("KILL");
    first
        .wait_exit(Duration::from_secs(10))
        .expect("the host died");

    let mut resumed = second
        .connect("/v1/ws?session=killed-1&model=slow_echo")
        .await;
    resumed.next_json().await;
    let asked = Instant::now();
    resumed.send_text("still there").await;
    let busy = resumed.next_json().await;
    assert_eq!(busy.diagnostic_code(), "session_busy", "{}", busy.text);
    assert!(asked.elapsed() < Duration::from_secs(2), "told at once");
    let turn = resumed.read_turn().await;
    assert!(
        asked.elapsed() < Duration::from_secs(10) + Duration::from_secs(2),
        "served again after {:?}",
        asked.elapsed()
    );
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "echo: still there");
    let highest = seen.iter().max().copied().unwrap_or(0);
    assert!(
        turn.sequences().iter().all(|s| *s > highest),
        "{:?} repeats one of {seen:?}",
        turn.sequences()
    );
    let session = stored(&second, "killed-1").await;
    assert!(
        session["lastSequence"].as_u64() > Some(highest),
        "{session}"
    );
}

// Redis freezes mid-turn (SIGSTOP: its connections stay open, nothing answers). The
// turn ends failed within a few seconds instead of hanging, and once Redis answers
// again the session goes on, with no number sent twice.
#[tokio::test]
async fn a_frozen_store_fails_the_turn_in_time_and_the_session_goes_on() {
    let dir = tempfile::tempdir().expect("a directory for redis");
    let port = free_port();
    let Some(redis) = PrivateRedis::start(dir.path(), port) else {
        return;
    };
    let mut config = config_with_store(&format!("{{ url = \"redis://127.0.0.1:{port}\" }}"));
    config.server_extra =
        "store_timeout_ms = 500\nlease_ms = 2000\nlease_renew_ms = 500\n".to_owned();
    let host = start_host(Kind::Redis, &config);
    let mut client = host
        .connect("/v1/ws?session=frozen-1&model=slow_echo")
        .await;
    client.next_json().await;
    client.send_text("before the freeze").await;
    assert_eq!(client.read_turn().await.status(), "completed");

    client.send_text("during the freeze a b c d e f g h").await;
    let mut frames = client.read_until("interaction.model", "delta").await;
    redis.freeze(true);
    let frozen = Instant::now();
    frames.extend(client.read_turn().await.frames);
    let failed = Turn { frames };
    let waited = frozen.elapsed();
    redis.freeze(false);
    assert_eq!(failed.status(), "failed", "{}", failed.dump());
    assert!(
        waited < Duration::from_secs(8),
        "the turn hung for {waited:?}"
    );
    assert!(
        failed
            .diagnostics()
            .iter()
            .any(|d| d.diagnostic_code() == "store_unavailable"),
        "{}",
        failed.dump()
    );

    client.send_text("after the freeze").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "echo: after the freeze");
    let before: HashSet<u64> = failed.sequences().into_iter().collect();
    assert!(turn.sequences().iter().all(|s| !before.contains(s)));
    let messages = contents(&stored(&host, "frozen-1").await);
    assert_eq!(
        messages.first().map(String::as_str),
        Some("user: before the freeze")
    );
    assert_eq!(
        messages.last().map(String::as_str),
        Some("assistant: echo: after the freeze"),
        "{messages:#?}"
    );
}

// A session whose stored document does not parse is reported (close 1011, code
// `session_unreadable`), never retried, and can be deleted; the id then starts over.
#[tokio::test]
async fn an_unreadable_session_is_reported_and_can_be_deleted() {
    let shared = tempfile::tempdir().expect("a scratch directory");
    let Some(settings) = store_settings(Kind::Redis, shared.path()) else {
        return;
    };
    let prefix = settings
        .split("prefix = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the settings name a prefix")
        .to_owned();
    let url = env_or("LLM_HOST_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let host = start_host(Kind::Redis, &config_with_store(&settings));
    let mut client = host.connect("/v1/ws?session=garbled-1").await;
    client.next_json().await;
    client.send_text("hello").await;
    assert_eq!(client.read_turn().await.status(), "completed");
    drop(client);
    let garbled = Command::new("redis-cli")
        .args([
            "-u",
            &url,
            "HSET",
            &format!("{prefix}session:garbled-1"),
            "data",
            "{not json",
        ])
        .output()
        .expect("run redis-cli");
    assert!(garbled.status.success(), "{garbled:?}");

    let mut client = host.connect("/v1/ws?session=garbled-1").await;
    let told = client.next_json().await;
    assert_eq!(
        told.diagnostic_code(),
        "session_unreadable",
        "{}",
        told.text
    );
    match client.expect_end().await {
        llm_host_tests::Ending::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1011),
        other => panic!("expected close 1011, got {other:?}"),
    }
    let reply = http(host.addr(), "GET", "/v1/sessions/garbled-1").await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "session_unreadable");
    let reply = http(host.addr(), "DELETE", "/v1/sessions/garbled-1").await;
    assert_eq!(reply.status, 204, "{}", reply.body);

    let mut client = host.connect("/v1/ws?session=garbled-1").await;
    let open = client.next_json().await;
    assert_eq!(open.event()["resumed"], false, "{}", open.text);
    client.send_text("again").await;
    assert_eq!(client.read_turn().await.status(), "completed");
}

/// A TCP proxy to `target` whose traffic can be stopped: while stalled it
/// keeps its connections open and forwards nothing, as a network partition
/// between one host and the store would.
struct StallingProxy {
    addr: SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StallingProxy {
    async fn start(target: SocketAddr) -> StallingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let stalled = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)]
                {
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            let n = match from.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if to.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        StallingProxy { addr, stalled }
    }

    fn stall(&self, stalled: bool) {
        self.stalled
            .store(stalled, std::sync::atomic::Ordering::SeqCst);
    }
}

// Two hosts on one Redis; the first is cut off from Redis mid-turn (its connections
// stall, as in a network partition). The second takes the session once the first's
// lease has run out, and the first stops streaming first (`lease_lost`). When the
// first reaches Redis again its save is refused: the history does not fork, and no
// sequence number went to both clients.
#[tokio::test]
async fn a_host_cut_off_from_the_store_stops_and_its_save_is_fenced() {
    let dir = tempfile::tempdir().expect("a directory for redis");
    let port = free_port();
    let Some(_redis) = PrivateRedis::start(dir.path(), port) else {
        return;
    };
    let proxy =
        StallingProxy::start(format!("127.0.0.1:{port}").parse().expect("an address")).await;
    let server = "lease_ms = 2000\nlease_renew_ms = 500\nstore_timeout_ms = 1000\n";
    let mut cut_off = config_with_store(&format!("{{ url = \"redis://{}\" }}", proxy.addr));
    cut_off.server_extra = server.to_owned();
    let mut direct = config_with_store(&format!("{{ url = \"redis://127.0.0.1:{port}\" }}"));
    direct.server_extra = server.to_owned();
    let first = start_host(Kind::Redis, &cut_off);
    let second = start_host(Kind::Redis, &direct);

    let mut early = first
        .connect("/v1/ws?session=fenced-1&model=slow_echo")
        .await;
    early.next_json().await;
    let long: String = (0..60).map(|i| format!("w{i} ")).collect();
    early.send_text(long.trim_end()).await;
    let mut frames = early.read_until("interaction.model", "delta").await;
    proxy.stall(true);

    let mut late = second
        .connect("/v1/ws?session=fenced-1&model=slow_echo")
        .await;
    late.next_json().await;
    late.send_text("mine now").await;
    let taken = late.read_turn().await;
    assert_eq!(taken.status(), "completed", "{}", taken.dump());
    assert_eq!(taken.text(), "echo: mine now");

    // The first host stopped its turn when it could not renew its lease.
    frames.extend(early.read_turn().await.frames);
    let stopped = Turn { frames };
    assert_eq!(stopped.status(), "failed", "{}", stopped.dump());
    assert!(stopped.dump().contains("lease_lost"), "{}", stopped.dump());
    let stopped_at = stopped
        .frames
        .iter()
        .filter(|f| f.name() == "interaction.model")
        .filter_map(|f| f.meta()["timestamp"].as_u64())
        .max()
        .expect("model frames");
    let taken_from = taken
        .frames
        .iter()
        .filter(|f| f.name() == "interaction.model")
        .filter_map(|f| f.meta()["timestamp"].as_u64())
        .min()
        .expect("model frames");
    assert!(
        stopped_at <= taken_from,
        "the first host streamed until {stopped_at}, the second from {taken_from}"
    );
    proxy.stall(false);

    let first_numbers: HashSet<u64> = stopped.sequences().into_iter().collect();
    assert!(
        taken.sequences().iter().all(|s| !first_numbers.contains(s)),
        "{:?} / {:?}",
        stopped.sequences(),
        taken.sequences()
    );
    // Give the first host's save the time to be tried and refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = contents(&stored(&second, "fenced-1").await);
    let answers: Vec<&String> = messages
        .iter()
        .filter(|m| m.starts_with("assistant:"))
        .collect();
    assert_eq!(answers, ["assistant: echo: mine now"], "{messages:#?}");
    assert_eq!(
        messages.last().map(String::as_str),
        Some("assistant: echo: mine now"),
        "{messages:#?}"
    );
}

/// libfaketime, which shifts the wall clock of a process it is preloaded
/// into, or None (skipped; a failure under CI) when it is not installed.
fn libfaketime() -> Option<&'static str> {
    const LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    if Path::new(LIBRARY).exists() {
        Some(LIBRARY)
    } else {
        skip_or_fail("libfaketime is not installed (apt-get install faketime)");
        None
    }
}

// Two hosts on one Redis whose wall clocks disagree by an hour. The one ahead does not
// take the other's live lease for expired: its prompt waits for the running turn, and
// the history stays in turn order.
#[tokio::test]
async fn hosts_whose_clocks_disagree_never_share_a_session() {
    let shared = tempfile::tempdir().expect("a scratch directory");
    let Some(settings) = store_settings(Kind::Redis, shared.path()) else {
        return;
    };
    let Some(faketime) = libfaketime() else {
        return;
    };
    let config = config_with_store(&settings);
    let first = start_host(Kind::Redis, &config);
    let ahead = start_host_with_env(
        Kind::Redis,
        &config,
        &[
            ("LD_PRELOAD", faketime),
            ("FAKETIME", "+1h"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let mut running = first
        .connect("/v1/ws?session=skewed-1&model=slow_echo")
        .await;
    running.next_json().await;
    running.send_text("one two three four five six").await;
    running.read_until("interaction.model", "delta").await;
    let mut waiting = ahead
        .connect("/v1/ws?session=skewed-1&model=slow_echo")
        .await;
    waiting.next_json().await;
    waiting.send_text("second").await;
    let busy = waiting.next_json().await;
    assert_eq!(busy.diagnostic_code(), "session_busy", "{}", busy.text);
    assert_eq!(running.read_turn().await.status(), "completed");
    assert_eq!(waiting.read_turn().await.status(), "completed");
    assert_eq!(
        contents(&stored(&first, "skewed-1").await),
        [
            "user: one two three four five six",
            "assistant: echo: one two three four five six",
            "user: second",
            "assistant: echo: second"
        ]
    );
}

// Hosts started together on one new SQLite file all start: the plugin's
// setup of the file (WAL mode, schema) waits for the others' instead of
// failing with `database is locked`. Each host then serves a turn that is
// saved in the shared file.
#[tokio::test]
async fn hosts_started_together_on_one_new_sqlite_file_all_start() {
    const HOSTS: usize = 4;
    for round in 0..4 {
        let shared = tempfile::tempdir().expect("a directory for the sqlite file");
        let settings = store_settings(Kind::Sqlite, shared.path()).expect("sqlite needs no server");
        let config = config_with_store(&settings);
        // The plugin directories are made first, so that the hosts start at
        // the same moment.
        let library = artifacts()
            .host
            .parent()
            .expect("the profile directory")
            .join(Kind::Sqlite.library());
        let workdirs: Vec<Workdir> = (0..HOSTS)
            .map(|_| {
                let workdir = Workdir::with_config(&config);
                std::fs::copy(
                    &library,
                    workdir.path().join("plugins").join(Kind::Sqlite.library()),
                )
                .unwrap_or_else(|err| panic!("copy {}: {err}", library.display()));
                workdir.write_config(
                    &config
                        .to_toml()
                        .replace("plugin = \"shared\"", "plugin = \"sqlite\""),
                );
                workdir
            })
            .collect();
        let barrier = std::sync::Barrier::new(HOSTS);
        let hosts: Vec<Host> = std::thread::scope(|scope| {
            let starting: Vec<_> = workdirs
                .into_iter()
                .map(|workdir| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        Host::start_in(workdir, &[])
                    })
                })
                .collect();
            starting
                .into_iter()
                .enumerate()
                .map(|(n, handle)| {
                    handle
                        .join()
                        .unwrap_or_else(|_| panic!("round {round}: host {n} did not start"))
                })
                .collect()
        });
        for (n, host) in hosts.iter().enumerate() {
            let id = format!("together-{n}");
            let mut client = host.connect(&format!("/v1/ws?session={id}")).await;
            client.next_json().await;
            client.send_text(format!("from host {n}")).await;
            let turn = client.read_turn().await;
            assert_eq!(
                turn.status(),
                "completed",
                "round {round}, host {n}: {}",
                turn.dump()
            );
        }
        // Every host sees every session: they share the one file.
        for n in 0..HOSTS {
            let session = stored(&hosts[(n + 1) % HOSTS], &format!("together-{n}")).await;
            assert_eq!(
                contents(&session),
                [
                    format!("user: from host {n}"),
                    format!("assistant: echo: from host {n}")
                ],
                "round {round}"
            );
        }
    }
}
