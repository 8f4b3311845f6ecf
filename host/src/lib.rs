//! llm-host: a WebSocket server that hosts LLM sessions and loads its model
//! backends and session stores as plugins.
//!
//! Layout:
//! - [`config`]: config.toml, parsed strictly and validated.
//! - [`plugins`]: finding, staging (content-hashed copies) and loading plugin
//!   libraries; ABI and version checks with readable errors.
//! - [`runtime`]: the active set of adapters built from config and plugins,
//!   swapped whole.
//! - [`check`]: `llm-host check`: a plugin library against the conformance suites.
//! - [`reload`]: watching files, two-phase reloads, what sessions are told.
//! - [`server`]: the listener and HTTP routes; the WebSocket upgrade.
//! - [`admin`]: the HTTP API: plugins, config, reload, sessions.
//! - [`connection`]: one socket: reading frames, the prompt queue, the outbox.
//! - [`auth`], [`limits`], [`metrics`]: API keys, caps and rates, Prometheus.
//! - [`turn`]: one turn: store load, the model streaming through a sink, save.
//! - [`session`]: the stored session document and store calls.
//! - [`protocol`]: commands in, frames out (PROTOCOL.md).

pub mod admin;
pub mod auth;
pub mod check;
pub mod config;
pub mod connection;
pub mod limits;
pub mod metrics;
pub mod plugins;
pub mod protocol;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod session;
pub mod turn;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError};
use crate::limits::{ConnectionSlots, TurnRate};
use crate::plugins::Loader;
use crate::reload::Reloader;
use crate::runtime::Active;
use crate::session::SessionLocks;

/// Everything the host serves from. One per process, shared by every
/// connection through an `Arc`; lives until the process ends.
pub struct HostState {
    /// The active adapters and config; a turn takes one snapshot and keeps it.
    pub active: ArcSwap<Active>,
    /// Per-session turn locks.
    pub locks: SessionLocks,
    /// Loads plugin libraries (and remembers every one it loaded).
    pub loader: Loader,
    /// Reload bookkeeping and the channel that tells sessions about reloads.
    pub reloader: Reloader,
    /// The config file the host was started with.
    pub config_path: PathBuf,
    /// This process's id among hosts sharing a store (in turn leases).
    pub instance: String,
    /// Open connections, against `server.max_connections`.
    pub connections: ConnectionSlots,
    /// Turns per minute per API key.
    pub turn_rate: TurnRate,
    /// Becomes true when the host starts shutting down.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// The address the host listens on, once bound.
    pub listening: std::sync::OnceLock<std::net::SocketAddr>,
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// config.toml is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The config, plugins or adapters have problems; every one is listed.
    #[error("{}", .0.join("\n"))]
    Problems(Vec<String>),
}

impl HostState {
    /// Reads the config at `path`, loads the plugin directory and builds every
    /// configured adapter. Reports every problem at once.
    pub fn boot(path: &Path) -> Result<Arc<HostState>, BootError> {
        // The staging directory comes from the config; read it first (a
        // config that does not even parse fails here, alone).
        let config = match Config::load_checked(path) {
            Ok((config, _)) => config,
            Err(err) => return Err(BootError::Config(err)),
        };
        let loader = Loader::new(config.plugins.staging_dir.clone(), config.base_dir.clone());
        let (catalog, active) =
            Active::assemble(path, &loader, None).map_err(BootError::Problems)?;
        let reloader = Reloader::new(&active.config, &catalog);
        Ok(Arc::new(HostState {
            active: ArcSwap::from_pointee(active),
            locks: SessionLocks::default(),
            loader,
            reloader,
            config_path: path.to_owned(),
            instance: format!("host-{}", uuid::Uuid::new_v4()),
            connections: ConnectionSlots::default(),
            turn_rate: TurnRate::default(),
            shutdown: tokio::sync::watch::channel(false).0,
            listening: std::sync::OnceLock::new(),
        }))
    }
}
