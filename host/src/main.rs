//! The `llm-host` command.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use llm_host::config::Config;
use llm_host::plugins::Loader;
use llm_host::{reload, server, HostState};

const USAGE: &str = "\
usage:
  llm-host [--config PATH] [--listen ADDR]   serve (the flag overrides [server] listen)
  llm-host plugins [--config PATH]           list what the plugin directory provides
  llm-host check PATH.so [--settings JSON] [--kind model|store]
                                             load a plugin as the host would and run
                                             the conformance suite against it
  llm-host --help | --version

PATH defaults to ./config.toml. Logging: RUST_LOG (default `info`).";

enum Command {
    Serve {
        config: PathBuf,
        listen: Option<SocketAddr>,
    },
    Plugins {
        config: PathBuf,
    },
    Help,
    Version,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut config = PathBuf::from("config.toml");
    let mut listen = None;
    let mut plugins = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = args.next().ok_or("--config needs a path")?.into();
            }
            "--listen" | "-l" => {
                let addr = args.next().ok_or("--listen needs an address")?;
                listen = Some(
                    addr.parse()
                        .map_err(|err| format!("--listen `{addr}`: {err}"))?,
                );
            }
            "plugins" if !plugins => plugins = true,
            "--help" | "-h" | "help" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    if plugins {
        if listen.is_some() {
            return Err("--listen does not apply to `plugins`".to_owned());
        }
        return Ok(Command::Plugins { config });
    }
    Ok(Command::Serve { config, listen })
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|arg| arg == "check") {
        args.next();
        match llm_host::check::Options::parse(args) {
            Ok(Some(options)) => {
                init_logging();
                return llm_host::check::main(&options);
            }
            Ok(None) => {
                println!("{}", llm_host::check::USAGE);
                return ExitCode::SUCCESS;
            }
            Err(message) => {
                eprintln!("llm-host check: {message}\n\n{}", llm_host::check::USAGE);
                return ExitCode::from(2);
            }
        }
    }
    let command = match parse_args(args) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("llm-host: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    match command {
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!(
                "llm-host {} (plugin-api {})",
                env!("CARGO_PKG_VERSION"),
                llm_host_plugin_api::API_VERSION
            );
            ExitCode::SUCCESS
        }
        Command::Plugins { config } => list_plugins(config),
        Command::Serve { config, listen } => serve(config, listen),
    }
}

/// Logs to stderr: human-readable, or one JSON object per line when
/// `LLM_HOST_LOG_FORMAT=json`. `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LLM_HOST_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn serve(config: PathBuf, listen: Option<SocketAddr>) -> ExitCode {
    let host = match HostState::boot(&config) {
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
    // Each running turn holds one blocking thread while its adapter streams
    // (adapters block: on HTTP, on llama.cpp, on their pacing), so the pool
    // must allow as many as turns may run at once: one per connection.
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
        let listener = match server::bind(addr) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("llm-host: cannot listen on {addr}: {err}");
                return ExitCode::FAILURE;
            }
        };
        let bound = listener.local_addr().unwrap_or(addr);
        let _ = host.listening.set(bound);
        {
            let active = host.active.load();
            tracing::info!(
                models = ?active.models.keys().collect::<Vec<_>>(),
                default_model = %active.config.default_model,
                store = %active.config.default_store,
                "llm-host {} ready",
                env!("CARGO_PKG_VERSION")
            );
        }
        let plugins = host.active.load().config.plugins.clone();
        if plugins.watch {
            let debounce = std::time::Duration::from_millis(plugins.debounce_ms);
            if let Err(err) = reload::watch(host.clone(), debounce) {
                tracing::error!("{err}; reload with SIGHUP or POST /v1/reload");
            }
        }
        reload_on_hangup(host.clone());
        tracing::info!("listening on {bound}");

        let trigger = host.shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = trigger.send(true);
        });
        let mut stopping = host.shutdown.subscribe();
        let stop_accepting = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        server::serve(listener, host.clone(), stop_accepting).await;
        // No new connections now. Each open one lets its running turn finish
        // (up to the grace period), saves it, and closes with 1001.
        let grace = host.active.load().config.server.shutdown_grace_secs;
        tracing::info!(
            connections = host.connections.open(),
            grace_secs = grace,
            "shutting down: finishing running turns"
        );
        let drained = tokio::time::timeout(
            std::time::Duration::from_secs(grace + 5),
            host.connections.drained(),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = host.connections.open(),
                "connections still open after the grace period; stopping anyway"
            );
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    });
    // Adapters still running on blocking threads were told to stop; do not
    // wait long for one that does not listen.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

/// SIGHUP reloads config.toml and the plugin directory.
fn reload_on_hangup(host: std::sync::Arc<HostState>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            let _ = reload::reload(&host, "SIGHUP").await;
        }
    });
}

async fn shutdown_signal() {
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

fn list_plugins(config: PathBuf) -> ExitCode {
    let config = match Config::load(&config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("llm-host: {err}");
            return ExitCode::FAILURE;
        }
    };
    let loader = Loader::new(config.plugins.staging_dir.clone(), config.base_dir.clone());
    let catalog = loader.scan(&config.plugins.dir);
    println!("plugin directory: {}", config.plugins.dir.display());
    let mut plugins: Vec<_> = catalog.plugins.values().collect();
    plugins.sort_by(|a, b| a.name.cmp(&b.name));
    if plugins.is_empty() {
        println!("no plugins loaded");
    }
    for plugin in plugins {
        println!(
            "{:<12} {:<8} {:<12} plugin-api {:<7} {}  {}  {}",
            plugin.name,
            plugin.version,
            plugin.kinds.names().join("+"),
            plugin.api_version,
            plugin.short_hash(),
            plugin.file.display(),
            plugin.description
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
