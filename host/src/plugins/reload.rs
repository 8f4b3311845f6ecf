//! Live reload of plugins and config.toml: what a reload changed and what
//! sessions are told. The reload itself and the file watcher run in
//! [`crate::state`], which owns the running set.
//!
//! A reload runs in two phases. *Prepare* does everything that can fail: read
//! and validate the config, scan the plugin directory (each library checked
//! for completeness and its name learnt by a probe in a child process; the
//! ones the config names staged under their content hash and loaded), and build
//! every adapter that changed. *Swap* then replaces the whole active set in
//! one store. A failed prepare changes nothing: the running set keeps
//! serving and the error is logged and kept for `GET /v1/plugins`.
//!
//! Adapters whose plugin library and settings did not change are carried over
//! as they are (a memory store keeps its sessions, a pool its connections).
//! A turn keeps the snapshot it started with; the next turn uses the new one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use tokio::sync::broadcast;

use super::loader::{Catalog, LoadError, LoadedPlugin};
use super::runtime::Active;
use crate::config::Config;

/// What connected sessions are told after a reload.
#[derive(Debug, Clone)]
pub struct Notice {
    /// One line per change.
    pub changes: Vec<String>,
    /// Model backends that no longer exist.
    pub removed_models: Vec<String>,
    /// Stores that no longer exist.
    pub removed_stores: Vec<String>,
    /// Backends added or rebuilt, with what a client is told about each
    /// (the plugin and version; no hashes).
    pub changed_models: BTreeMap<String, String>,
    /// Stores rebuilt, the same way.
    pub changed_stores: BTreeMap<String, String>,
    /// The default backend changed.
    pub default_model_changed: bool,
    /// The default backend now.
    pub default_model: String,
    /// The default store now.
    pub default_store: String,
}

/// The result of a reload that did not fail.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Config and plugins are as they were; nothing was swapped.
    Unchanged,
    /// A new active set is serving; one line per change.
    Reloaded(Vec<String>),
}

/// A plugin library as the admin endpoint shows it.
#[derive(Clone)]
pub struct PluginStatus {
    /// The library.
    pub plugin: Arc<LoadedPlugin>,
    /// How many other libraries with this plugin's name were loaded before it.
    pub reloads: u64,
}

/// What reloads did, for `GET /v1/plugins`.
#[derive(Default)]
pub struct Status {
    /// Reloads applied since start.
    pub reloads: u64,
    /// When the last one was applied, Unix ms.
    pub last_reload_ms: Option<u64>,
    /// The last failed reload: when, and why.
    pub last_error: Option<(u64, String)>,
    /// Libraries of the last scan that failed to load.
    pub load_errors: Vec<LoadError>,
    /// Libraries of the last successful scan, by plugin name.
    pub plugins: BTreeMap<String, PluginStatus>,
    /// Distinct libraries loaded per plugin name.
    loads: HashMap<String, Vec<String>>,
}

impl Status {
    pub(crate) fn record_scan(&mut self, catalog: &Catalog) {
        self.load_errors = catalog.errors.clone();
        self.plugins.clear();
        for (name, plugin) in &catalog.plugins {
            let hashes = self.loads.entry(name.clone()).or_default();
            if !hashes.contains(&plugin.hash) {
                hashes.push(plugin.hash.clone());
            }
            let reloads = hashes.len() as u64 - 1;
            self.plugins.insert(
                name.clone(),
                PluginStatus {
                    plugin: plugin.clone(),
                    reloads,
                },
            );
        }
    }
}

/// What an active set was built from; an unchanged fingerprint means there
/// is nothing to reload.
#[derive(Clone, PartialEq, Default)]
pub(crate) struct Fingerprint {
    config: Option<Config>,
    plugins: BTreeMap<String, String>,
}

impl Fingerprint {
    pub(crate) fn of(config: &Config, catalog: &Catalog) -> Self {
        Self {
            config: Some(config.clone()),
            plugins: catalog
                .plugins
                .iter()
                .map(|(name, plugin)| (name.clone(), plugin.hash.clone()))
                .collect(),
        }
    }
}

/// Reload bookkeeping. One per host.
pub struct Reloader {
    /// One reload at a time.
    pub(crate) lock: tokio::sync::Mutex<()>,
    pub(crate) fingerprint: Mutex<Fingerprint>,
    /// What reloads did.
    pub status: Mutex<Status>,
    /// Connected sessions subscribe to hear about applied reloads.
    pub notices: broadcast::Sender<Arc<Notice>>,
}

impl Reloader {
    /// Bookkeeping for a host that booted from `config` and `catalog`.
    pub fn new(config: &Config, catalog: &Catalog) -> Self {
        let mut status = Status::default();
        status.record_scan(catalog);
        Self {
            lock: tokio::sync::Mutex::new(()),
            fingerprint: Mutex::new(Fingerprint::of(config, catalog)),
            status: Mutex::new(status),
            notices: broadcast::channel(16).0,
        }
    }

    /// The bookkeeping, locked.
    pub fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Says what differs between two active sets.
pub(crate) fn describe(old: &Active, new: &Active) -> Notice {
    let mut changes = Vec::new();
    let mut removed_models = Vec::new();
    let mut removed_stores = Vec::new();
    let mut changed_models = BTreeMap::new();
    let mut changed_stores = BTreeMap::new();
    for (name, backend) in &new.models {
        match old.models.get(name) {
            None => changes.push(format!(
                "model backend `{name}` added (plugin {} {})",
                backend.plugin.name, backend.plugin.version
            )),
            Some(before) if !Arc::ptr_eq(before, backend) => {
                changes.push(adapter_change(
                    "model backend",
                    name,
                    &before.plugin,
                    &backend.plugin,
                ));
                changed_models.insert(
                    name.clone(),
                    client_change("model backend", name, &before.plugin, &backend.plugin),
                );
            }
            Some(_) => {}
        }
    }
    for name in old.models.keys().filter(|n| !new.models.contains_key(*n)) {
        changes.push(format!("model backend `{name}` removed"));
        removed_models.push(name.clone());
    }
    for (name, store) in &new.stores {
        match old.stores.get(name) {
            None => changes.push(format!(
                "store `{name}` added (plugin {} {})",
                store.plugin.name, store.plugin.version
            )),
            Some(before) if !Arc::ptr_eq(before, store) => {
                changes.push(adapter_change("store", name, &before.plugin, &store.plugin));
                changed_stores.insert(
                    name.clone(),
                    client_change("store", name, &before.plugin, &store.plugin),
                );
            }
            Some(_) => {}
        }
    }
    for name in old.stores.keys().filter(|n| !new.stores.contains_key(*n)) {
        changes.push(format!("store `{name}` removed"));
        removed_stores.push(name.clone());
    }
    let (was, now) = (&old.config, &new.config);
    if was.default_model != now.default_model {
        changes.push(format!(
            "default model backend: `{}` -> `{}`",
            was.default_model, now.default_model
        ));
    }
    if was.default_store != now.default_store {
        changes.push(format!(
            "default store: `{}` -> `{}` (connected sessions keep their store while it exists; \
             new connections use the new one)",
            was.default_store, now.default_store
        ));
    }
    if was.server.listen != now.server.listen {
        changes.push(format!(
            "server.listen changed to {}: restart the host to apply it (still listening on {})",
            now.server.listen, was.server.listen
        ));
    }
    let server: Vec<String> = changed_keys(&was.server, &now.server)
        .into_iter()
        .filter(|key| key != "listen")
        .collect();
    if !server.is_empty() {
        changes.push(format!(
            "[server] {} changed: they apply to new connections",
            server.join(", ")
        ));
    }
    changes.extend(auth_changes(&was.auth, &now.auth));
    if was.plugins.dir != now.plugins.dir {
        changes.push(format!(
            "plugin directory is now {}",
            now.plugins.dir.display()
        ));
    }
    if was.plugins.watch != now.plugins.watch || was.plugins.staging_dir != now.plugins.staging_dir
    {
        changes.push(
            "plugins.watch or plugins.staging_dir changed: that takes effect when the host \
             restarts"
                .to_owned(),
        );
    }
    if was.telemetry != now.telemetry {
        changes.push("[telemetry] changed: applies to turns that end from now on".to_owned());
    }
    if changes.is_empty() {
        changes.push("plugin libraries rescanned; no backend or store changed".to_owned());
    }
    Notice {
        changes,
        removed_models,
        removed_stores,
        changed_models,
        changed_stores,
        default_model_changed: was.default_model != now.default_model,
        default_model: now.default_model.clone(),
        default_store: now.default_store.clone(),
    }
}

/// The keys whose values differ between two serializations of one type.
fn changed_keys<T: serde::Serialize>(was: &T, now: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(was)), Ok(serde_json::Value::Object(now))) =
        (serde_json::to_value(was), serde_json::to_value(now))
    else {
        return Vec::new();
    };
    now.iter()
        .filter(|(key, value)| was.get(*key) != Some(*value))
        .map(|(key, _)| key.clone())
        .collect()
}

/// What a reload changed in `[auth]`: keys by id (never their secrets).
fn auth_changes(was: &crate::config::AuthConfig, now: &crate::config::AuthConfig) -> Vec<String> {
    let mut changes = Vec::new();
    if was.open != now.open {
        changes.push(format!("auth.open is now {}", now.open));
    }
    for key in &now.keys {
        match was.keys.iter().find(|old| old.id == key.id) {
            None => changes.push(format!("API key `{}` added", key.id)),
            Some(old) if old.secrets != key.secrets => changes.push(format!(
                "API key `{}` now takes {} secret(s); sockets opened with one it no longer \
                 takes are closed",
                key.id,
                key.secrets.len()
            )),
            Some(old) if old.admin != key.admin => changes.push(format!(
                "API key `{}` admin: {} -> {}",
                key.id, old.admin, key.admin
            )),
            Some(_) => {}
        }
    }
    for old in was
        .keys
        .iter()
        .filter(|old| !now.keys.iter().any(|k| k.id == old.id))
    {
        changes.push(format!(
            "API key `{}` removed; its open sockets are closed",
            old.id
        ));
    }
    changes
}

/// A change as a client using the adapter is told it: no content hashes.
fn client_change(what: &str, name: &str, before: &LoadedPlugin, now: &LoadedPlugin) -> String {
    if before.hash == now.hash {
        format!("{what} `{name}` was rebuilt with new settings")
    } else {
        format!(
            "{what} `{name}` now runs plugin {} {} (was {} {})",
            now.name, now.version, before.name, before.version
        )
    }
}

fn adapter_change(what: &str, name: &str, before: &LoadedPlugin, now: &LoadedPlugin) -> String {
    if before.hash == now.hash {
        format!("{what} `{name}` rebuilt with new settings")
    } else {
        format!(
            "{what} `{name}` now runs plugin {} {} ({}; was {} {} {})",
            now.name,
            now.version,
            now.short_hash(),
            before.name,
            before.version,
            before.short_hash()
        )
    }
}

/// Whether a file event can change what a reload would build. Reads
/// (including the host's own) and metadata changes do not.
pub(crate) fn relevant(event: &notify::Event, config_path: &Path, plugin_dir: &Path) -> bool {
    let kind_matters = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    kind_matters
        && event.paths.iter().any(|path| {
            path == config_path
                || (path.parent() == Some(plugin_dir)
                    && path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("lib") && n.ends_with(".so")))
        })
}

pub(crate) fn absolute(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_owned())
}
