//! llm-host: a WebSocket server that hosts LLM sessions and loads its model
//! backends and session stores as plugins.
//!
//! Three places, and what sits between them:
//!
//! - [`core`]: the turn core. A session's turns claimed, run and saved:
//!   ownership, leases, sequence numbers, commits. It knows no socket and no
//!   plugin ABI; it talks through its [`core::ports`] (a session store, a
//!   model, the client's frames) and is tested alone with fakes.
//! - [`web`]: the network edge. Routes, the WebSocket upgrade, one task per
//!   socket; turns client frames into prompts and writes the core's frames.
//! - [`plugins`]: the plugin side. Loading libraries, the active set of
//!   adapters, the core's ports over the FFI adapters, what reloads changed.
//!
//! Beside them: [`protocol`] (commands in, frames out: the wire format both
//! the core and the edge write), [`config`] (config.toml, parsed strictly and
//! validated), [`state`] (the running host: active set, reload, watcher),
//! [`origins`] (which browser pages may use the host), [`limits`],
//! [`metrics`] and [`telemetry`] (turns' trace spans, sent to an OTLP
//! collector; it reads `web`'s record of a finished turn), [`usage`] (turns
//! and tokens by key and backend, kept in the store). `llm-host check`
//! is a binary of its own (`src/bin/llm-host-check`), so the serving binary
//! carries no test suite;
//! [`scaffold`] is `llm-host new-plugin`, a new plugin crate from the templates;
//! [`chat`] is `llm-host chat`, a terminal client of a running host.
//!
//! Imports point one way: `core` uses only `protocol` and `metrics`;
//! `plugins` uses `core` and `config`; `state` uses `plugins`; `web` uses all
//! of those; [`serve`] starts `state` and `web`.

pub mod chat;
pub mod config;
pub mod core;
pub mod limits;
pub mod metrics;
pub mod origins;
pub mod plugins;
pub mod protocol;
pub mod scaffold;
pub mod state;
pub mod telemetry;
pub mod usage;
pub mod web;

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use state::{BootError, HostState};

/// Serves `host` on `listener` until `shutdown` resolves, then drains: no
/// new connections; each open one lets its running turn finish (up to
/// `server.shutdown_grace_secs`), saves it, and closes with 1001.
pub async fn serve(
    host: Arc<HostState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Ok(bound) = listener.local_addr() {
        let _ = host.listening.set(bound);
    }
    {
        let active = host.active.load();
        tracing::info!(
            models = %active.models.keys().cloned().collect::<Vec<_>>().join(","),
            default_model = %active.config.default_model,
            store = %active.config.default_store,
            "llm-host {} ready",
            env!("CARGO_PKG_VERSION")
        );
    }
    let plugins = host.active.load().config.plugins.clone();
    if plugins.watch {
        let debounce = Duration::from_millis(plugins.debounce_ms);
        if let Err(err) = state::watch(host.clone(), debounce) {
            tracing::error!("{err}; reload with SIGHUP or POST /v1/reload");
        }
    }
    reload_on_hangup(host.clone());
    state::flush_usage_periodically(host.clone());
    telemetry::start(&host);
    if let Some(bound) = host.listening.get() {
        tracing::info!("listening on {bound}");
    }
    let draining = host.clone();
    tokio::spawn(async move {
        shutdown.await;
        // First drain: `/readyz` fails while everything is still served, so
        // that a load balancer moves new clients elsewhere; then stop.
        draining
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        let drain = draining.active.load().config.server.drain_secs;
        if drain > 0 {
            tracing::info!(
                drain_secs = drain,
                "draining: /readyz answers 503; still serving"
            );
            tokio::time::sleep(Duration::from_secs(drain)).await;
        }
        let _ = draining.shutdown.send(true);
    });
    let mut stopping = host.shutdown.subscribe();
    let stop_accepting = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    web::server::serve(listener, host.clone(), stop_accepting).await;
    let grace = host.active.load().config.server.shutdown_grace_secs;
    tracing::info!(
        connections = host.connections.open(),
        grace_secs = grace,
        "shutting down: finishing running turns"
    );
    let drained =
        tokio::time::timeout(Duration::from_secs(grace + 5), host.connections.drained()).await;
    if drained.is_err() {
        tracing::warn!(
            connections = host.connections.open(),
            "connections still open after the grace period; stopping anyway"
        );
    }
    state::flush_usage(&host).await;
    telemetry::stop().await;
    tracing::info!("stopped");
}

/// `llm-host validate`: everything a start does short of listening: the
/// config read strictly, every configured plugin loaded and every backend
/// and store built with its settings (so an unknown setting or a missing
/// model file shows), the listen address checked against the auth mode, and
/// every store asked to answer. Prints each problem; exit status 1 if there
/// is one, for a CI job to gate a config change on.
pub fn validate(config: &Path) -> ExitCode {
    let host = match HostState::boot(config) {
        Ok(host) => host,
        Err(err) => {
            eprintln!("llm-host: the config would not start:\n{err}");
            return ExitCode::FAILURE;
        }
    };
    let active = host.active.load_full();
    let mut problems = Vec::new();
    if let Some(problem) = active
        .config
        .auth
        .exposure_problem(active.config.server.listen)
    {
        problems.push(problem);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llm-host: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let limit = active.config.server.turn_settings().store_timeout;
    runtime.block_on(async {
        for (name, store) in &active.stores {
            let ping = crate::core::within(name, "ping", limit, plugins::ports::ping(store));
            if let Err(err) = ping.await {
                problems.push(format!("stores.{name}: does not answer: {err}"));
            }
        }
    });
    if !problems.is_empty() {
        eprintln!(
            "llm-host: the config would not serve:\n{}",
            problems.join("\n")
        );
        return ExitCode::FAILURE;
    }
    println!(
        "{}: valid ({} backends, {} stores answering, default `{}` on `{}`)",
        config.display(),
        active.models.len(),
        active.stores.len(),
        active.config.default_model,
        active.config.default_store
    );
    ExitCode::SUCCESS
}

/// `llm-host`: boots the host from the config at `config`, listens on
/// `listen` (or `[server] listen`), and serves until SIGINT or SIGTERM.
pub fn run(config: &Path, listen: Option<SocketAddr>) -> ExitCode {
    let host = match HostState::boot(config) {
        Ok(host) => host,
        Err(err) => {
            eprintln!("llm-host: cannot start:\n{err}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listen.unwrap_or(host.active.load().config.server.listen);
    if let Some(problem) = host.active.load().config.auth.exposure_problem(addr) {
        eprintln!("llm-host: cannot start:\n{problem}");
        return ExitCode::FAILURE;
    }
    // Each running turn of a blocking model holds one blocking thread while
    // it streams (on HTTP, on llama.cpp, on its pacing), so the pool must
    // allow as many as turns may run at once: one per connection.
    let max_connections = host.active.load().config.server.max_connections;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(max_connections.clamp(512, 16_384) + 64)
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llm-host: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let listener = match web::server::bind(addr) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("llm-host: cannot listen on {addr}: {err}");
                return ExitCode::FAILURE;
            }
        };
        serve(host, listener, shutdown_signal()).await;
        ExitCode::SUCCESS
    });
    // Models still running on blocking threads were told to stop; do not
    // wait long for one that does not listen.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

/// Logs to stderr: human-readable, or one JSON object per line when
/// `LLM_HOST_LOG_FORMAT=json`. `RUST_LOG` filters (default `info`).
pub fn init_logging() -> LogGuard {
    init_logging_at("info")
}

/// Keeps the log writer's thread; the lines still queued are written when
/// it is dropped (at the end of `main`).
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// Like [`init_logging`], at `default` unless `RUST_LOG` says otherwise.
pub fn init_logging_at(default: &str) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Lines go to stderr from a thread of their own, several per write when
    // they come fast (an access-log line per turn), instead of one write
    // per line on the turn's worker. Never lossy: a full queue waits.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if std::env::var("LLM_HOST_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
    guard
}

/// SIGHUP reloads config.toml and the plugin directory.
fn reload_on_hangup(host: Arc<HostState>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            let outcome = match state::reload(&host, "SIGHUP").await {
                Ok(plugins::reload::Outcome::Unchanged) => "unchanged".to_owned(),
                Ok(plugins::reload::Outcome::Reloaded(changes)) => {
                    format!("reloaded: {}", changes.join("; "))
                }
                Err(message) => format!("refused: {message}"),
            };
            web::audit::admin("reload (SIGHUP)", "operator", None, &outcome);
        }
    });
}

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `llm-host plugins`: what the plugin directory provides. Every library is
/// probed in a child process (see [`plugins::probe`]), none is loaded into
/// this one; each line says whether the config uses the plugin.
pub fn list_plugins(config: &Path) -> ExitCode {
    let config = match config::Config::load(config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("llm-host: {err}");
            return ExitCode::FAILURE;
        }
    };
    let loader =
        plugins::loader::Loader::new(config.plugins.staging_dir.clone(), config.base_dir.clone());
    let catalog = match loader.scan(
        &config.plugins.dir,
        &Default::default(),
        &Default::default(),
    ) {
        Ok(catalog) => catalog,
        Err(err) => {
            eprintln!("llm-host: {err}");
            return ExitCode::FAILURE;
        }
    };
    let used: std::collections::BTreeSet<&str> = config
        .models
        .values()
        .chain(config.stores.values())
        .map(|entry| entry.plugin.as_str())
        .collect();
    println!("plugin directory: {}", config.plugins.dir.display());
    if catalog.found.is_empty() {
        println!("no plugins found");
    }
    for found in &catalog.found {
        let facts = &found.facts;
        let conflict = catalog.conflicts.contains_key(&facts.name);
        println!(
            "{:<12} {:<8} {:<12} plugin-api {:<7} {}  {:<9} {}  {}",
            facts.name,
            facts.version,
            facts.kinds().names().join("+"),
            facts.api_version,
            found.short_hash(),
            match (conflict, used.contains(facts.name.as_str())) {
                (true, _) => "CONFLICT",
                (false, true) => "used",
                (false, false) => "unused",
            },
            found.file.display(),
            facts.description
        );
    }
    if catalog
        .found
        .iter()
        .any(|f| !used.contains(f.facts.name.as_str()))
    {
        println!(
            "\n(unused plugins are not loaded by the host: name one in a [models.*] or \
             [stores.*] entry, plugin = \"NAME\", to use it)"
        );
    }
    if !catalog.errors.is_empty() {
        println!("\nnot loaded:");
        for error in &catalog.errors {
            println!("{error}");
        }
    }
    ExitCode::SUCCESS
}
