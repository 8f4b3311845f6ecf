//! Load benchmark: drives the real release host over real WebSockets, and a
//! minimal tokio-tungstenite server sending the same frames (no plugins, no
//! sessions) in the same run, so the host's cost shows as a ratio to that
//! floor.
//!
//! `cargo build --release && cargo run --release -p llm-host-bench --bin load [-- SCENARIO... --secs N]`
//!
//! Scenarios: `c1`, `c16`, `c64` (64 tokens a turn, no delay, on 1/16/64
//! connections), `paced` (1,000 sessions streaming 50 tokens/s), `idle`
//! (10,000 connected sessions), `reload` (c16 with a plugin reload in the
//! middle), `sqlite`, `postgres` (c16 on those stores). Default: all.
//!
//! Crash isolation (not in the default set): `c16-isolated`,
//! `paced-isolated` (`isolated`: both) run c16 and paced against echo in the
//! host's process and echo in a child process (`isolation = { mode =
//! "process" }`) of one host, then the floor; `--rounds N` (default 1)
//! repeats them and prints the medians.
//!
//! Long sessions (not in the default set; they run to their length, never by
//! time): `long` (16 connections, each on one session of 1,000 turns),
//! `long10k` (one session of 10,000 turns), on the memory store, or on
//! another with a suffix: `long-sqlite`, `long-postgres`, `long-redis`,
//! `long10k-sqlite`, ... Options: `--rounds N` (host and floor alternately,
//! default 2), `--turns N`, `--connections N`, `--host-only` (for a profiler
//! wrapped around the host: `LLM_HOST_BENCH_WRAPPER` and
//! `LLM_HOST_BENCH_ON_START` in the library; BENCHMARKS.md has the command).

mod client;
mod floor;
mod isolated;
mod long;
mod measured;
mod report;
mod scenarios;
mod session;
mod store_metrics;

use std::time::Duration;

/// Tokens in one benchmark turn.
pub const TOKENS: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("floor-server") {
        floor::floor_server(args.get(1).map(String::as_str).unwrap_or("127.0.0.1:0"));
        return;
    }
    let mut secs = 10u64;
    let mut overrides = long::Overrides::default();
    let mut scenarios = Vec::new();
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        let mut number = || iter.next().and_then(|s| s.parse::<usize>().ok());
        match arg.as_str() {
            "--secs" => secs = number().map_or(secs, |n| n as u64),
            "--rounds" => overrides.rounds = number(),
            "--turns" => overrides.turns = number(),
            "--connections" => overrides.connections = number(),
            "--host-only" => overrides.host_only = true,
            other => scenarios.push(other.to_owned()),
        }
    }
    if scenarios.is_empty() {
        scenarios = [
            "c1", "c16", "c64", "paced", "idle", "reload", "sqlite", "postgres",
        ]
        .map(String::from)
        .to_vec();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("load: {err}");
            std::process::exit(1);
        }
    };
    let duration = Duration::from_secs(secs);
    let scenarios: Vec<String> = scenarios
        .into_iter()
        .flat_map(|name| match isolated::named(&name) {
            Some(names) => names.iter().map(|n| (*n).to_owned()).collect(),
            None => vec![name],
        })
        .collect();
    for scenario in scenarios {
        if let Err(err) = runtime.block_on(run_scenario(&scenario, duration, &overrides)) {
            eprintln!("load: {scenario}: {err}");
            std::process::exit(1);
        }
    }
}

async fn run_scenario(
    name: &str,
    duration: Duration,
    overrides: &long::Overrides,
) -> Result<(), String> {
    use scenarios::{idle, paced, throughput};
    match name {
        "c1" => throughput(name, 1, "", duration, false).await,
        "c16" => throughput(name, 16, "", duration, false).await,
        "c64" => throughput(name, 64, "", duration, false).await,
        "reload" => throughput(name, 16, "", duration, true).await,
        "sqlite" | "postgres" => throughput(name, 16, name, duration, false).await,
        "paced" => paced(duration).await,
        "idle" => idle().await,
        "c16-isolated" | "paced-isolated" => {
            isolated::run(name, duration, overrides.rounds.unwrap_or(1).max(1)).await
        }
        other => match long::Long::named(other, overrides) {
            Some(scenario) => long::run(&scenario?).await,
            None => Err(format!("unknown scenario {other}")),
        },
    }
}

/// The host's config: echo with `model_settings`, on `store` (`sqlite`,
/// `postgres`, `redis`; anything else: memory). Every client comes from one
/// address, as through a proxy: `max_pending_per_address` is raised past
/// the paced scenario's 1,000 handshakes at once (at its default, 512, the
/// host closes those over it before reading them, as it should).
pub fn host_config(model_settings: &str, store: &str) -> String {
    let (store_name, store_table) = match store {
        "sqlite" => (
            "sqlite",
            "[stores.sqlite]\nplugin = \"sqlite\"\nsettings = { path = \"sessions.db\" }\n"
                .to_owned(),
        ),
        "postgres" => {
            let url = std::env::var("LLM_HOST_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".to_owned());
            (
                "postgres",
                format!(
                    "[stores.postgres]\nplugin = \"postgres\"\nsettings = {{ url = \"{url}\", table = \"llm_host_bench_{}\" }}\n",
                    std::process::id()
                ),
            )
        }
        "redis" => {
            let url = std::env::var("LLM_HOST_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
            (
                "redis",
                format!(
                    "[stores.redis]\nplugin = \"redis\"\nsettings = {{ url = \"{url}\", prefix = \"llm-host-bench-{}:\" }}\n",
                    std::process::id()
                ),
            )
        }
        _ => (
            "memory",
            "[stores.memory]\nplugin = \"memory\"\n".to_owned(),
        ),
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_queued_prompts = 8\nidle_timeout_secs = 0\n\
         ping_interval_secs = 0\nmax_pending_per_address = 4096\n\n[plugins]\ndir = \"plugins\"\ndebounce_ms = 200\n\n\
         [defaults]\nmodel = \"bench\"\nstore = \"{store_name}\"\n\n[models.bench]\nplugin = \"echo\"\n\
         settings = {model_settings}\n\n{store_table}"
    )
}

/// The plugins the time-limited scenarios' host is given.
pub const PLUGINS: &[&str] = &[
    "libllm_plugin_echo.so",
    "libllm_plugin_memory.so",
    "libllm_plugin_sqlite.so",
    "libllm_plugin_postgres.so",
];
