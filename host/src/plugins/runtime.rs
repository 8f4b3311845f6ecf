//! The active set: every configured backend and store, built from the loaded
//! plugins, behind one pointer that a reload swaps whole.
//!
//! A turn takes one snapshot ([`Active`]) and keeps it to the end, so it never
//! sees half an old set and half a new one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use llm_host_plugin_api::{Kinds, ModelAdapterBox, StoreAdapterBox};

use super::isolated::{child::Launch, IsolatedModel, IsolatedStore};
use super::loader::{Catalog, LoadedPlugin, Loader};
use crate::config::{AdapterConfig, Config, Isolation};

/// A configured model backend (`[models.NAME]`).
pub struct ModelBackend {
    /// Its name in config.toml.
    pub name: String,
    /// The library that built it.
    pub plugin: Arc<LoadedPlugin>,
    /// The settings it was built from.
    pub settings: serde_json::Value,
    /// Where its plugin runs, as configured.
    pub isolation: Isolation,
    /// The adapter, or the child process it runs in.
    pub engine: Engine,
    /// Whether its turns run in steps on the runtime's workers.
    pub stepped: bool,
}

/// Where a backend's turns run.
pub enum Engine {
    /// In this process, through the plugin's adapter.
    InProcess(ModelAdapterBox),
    /// In a child process of its own ([`super::isolated`]).
    Process(Box<IsolatedModel>),
}

impl ModelBackend {
    /// Builds backend `name` of `entry` from `plugin`: the adapter in this
    /// process, or a child process that builds it.
    fn build(
        name: &str,
        entry: &AdapterConfig,
        plugin: Arc<LoadedPlugin>,
        base_dir: &Path,
    ) -> Result<ModelBackend, String> {
        let (engine, stepped) = match entry.isolation {
            Isolation::InProcess => {
                let adapter = plugin
                    .new_model(&entry.settings)
                    .map_err(|err| refused(&format!("models.{name}"), entry, &err))?;
                let stepped = adapter.stepped();
                (Engine::InProcess(adapter), stepped)
            }
            Isolation::Process(limits) => {
                let launch = launch(name, entry, &plugin, base_dir);
                let model = IsolatedModel::start(launch, limits).map_err(|why| {
                    format!(
                        "models.{name}: plugin `{}` could not be started in a process of \
                         its own: {why}",
                        entry.plugin
                    )
                })?;
                // Its turns run in steps on the async workers, whatever the
                // plugin does in the child (see `isolated::stepped`).
                (Engine::Process(Box::new(model)), true)
            }
        };
        Ok(ModelBackend {
            name: name.to_owned(),
            plugin,
            settings: entry.settings.clone(),
            isolation: entry.isolation,
            engine,
            stepped,
        })
    }
}

/// What a child of backend or store `name` is started with.
fn launch(name: &str, entry: &AdapterConfig, plugin: &LoadedPlugin, base_dir: &Path) -> Launch {
    Launch {
        program: super::isolated::child::own_executable(),
        backend: name.to_owned(),
        plugin: plugin.name.clone(),
        file: plugin.file.clone(),
        staged: plugin.staged.clone(),
        hash: plugin.hash.clone(),
        base_dir: base_dir.to_owned(),
        settings: entry.settings.to_string(),
        store: false,
    }
}

/// A configured store (`[stores.NAME]`).
pub struct StoreBackend {
    /// Its name in config.toml.
    pub name: String,
    /// The library that built it.
    pub plugin: Arc<LoadedPlugin>,
    /// The settings it was built from.
    pub settings: serde_json::Value,
    /// Where its plugin runs, as configured.
    pub isolation: Isolation,
    /// The adapter, or the child process it runs in.
    pub engine: StoreEngine,
    /// Whether it lives in this process's memory (see
    /// `StoreAdapter::in_process`); never for a store in a child.
    pub in_process: bool,
}

/// Where a store's calls run.
pub enum StoreEngine {
    /// In this process, through the plugin's adapter.
    InProcess(StoreAdapterBox),
    /// In a child process of its own ([`super::isolated`]).
    Process(IsolatedStore),
}

impl StoreBackend {
    /// Builds store `name` of `entry` from `plugin`: the adapter in this
    /// process, or a child process that builds it.
    fn build(
        name: &str,
        entry: &AdapterConfig,
        plugin: Arc<LoadedPlugin>,
        base_dir: &Path,
    ) -> Result<StoreBackend, String> {
        let key = format!("stores.{name}");
        let (engine, in_process) = match entry.isolation {
            Isolation::InProcess => {
                let adapter = plugin
                    .new_store(&entry.settings)
                    .map_err(|err| refused(&key, entry, &err))?;
                let in_process = adapter.in_process();
                (StoreEngine::InProcess(adapter), in_process)
            }
            Isolation::Process(limits) => {
                let launch = launch(name, entry, &plugin, base_dir);
                let store =
                    IsolatedStore::start(launch, limits.memory_limit_mb).map_err(|why| {
                        format!(
                        "{key}: plugin `{}` could not be started in a process of its own: {why}",
                        entry.plugin
                    )
                    })?;
                (StoreEngine::Process(store), false)
            }
        };
        Ok(StoreBackend {
            name: name.to_owned(),
            plugin,
            settings: entry.settings.clone(),
            isolation: entry.isolation,
            engine,
            in_process,
        })
    }
}

/// One consistent set of adapters and the config they came from.
pub struct Active {
    /// The config this set was built from.
    pub config: Arc<Config>,
    /// Model backends by name.
    pub models: BTreeMap<String, Arc<ModelBackend>>,
    /// Stores by name.
    pub stores: BTreeMap<String, Arc<StoreBackend>>,
}

impl Active {
    /// The staged copies this set's adapters were built from.
    pub fn staged(&self) -> impl Iterator<Item = &std::path::PathBuf> {
        let models = self.models.values().map(|m| &m.plugin.staged);
        models.chain(self.stores.values().map(|s| &s.plugin.staged))
    }

    /// Builds every configured adapter from `catalog`. Adapters of `previous`
    /// whose library and settings are unchanged are kept as they are. Fails
    /// with every problem found, each naming its config key.
    pub fn build(
        config: Arc<Config>,
        catalog: &Catalog,
        previous: Option<&Active>,
    ) -> Result<Active, Vec<String>> {
        let mut problems = Vec::new();
        let mut models = BTreeMap::new();
        for (name, entry) in &config.models {
            let key = format!("models.{name}");
            let Some(plugin) = find(catalog, &key, entry, Kinds::MODEL, &mut problems) else {
                continue;
            };
            let kept = previous.and_then(|p| p.models.get(name)).filter(|b| {
                b.plugin.hash == plugin.hash
                    && b.settings == entry.settings
                    && b.isolation == entry.isolation
            });
            if let Some(backend) = kept {
                models.insert(name.clone(), backend.clone());
                continue;
            }
            match ModelBackend::build(name, entry, plugin, &config.base_dir) {
                Ok(backend) => {
                    models.insert(name.clone(), Arc::new(backend));
                }
                Err(problem) => problems.push(problem),
            }
        }
        let mut stores = BTreeMap::new();
        for (name, entry) in &config.stores {
            let key = format!("stores.{name}");
            let Some(plugin) = find(catalog, &key, entry, Kinds::STORE, &mut problems) else {
                continue;
            };
            let before = previous.and_then(|p| p.stores.get(name));
            let kept = before.filter(|b| {
                b.plugin.hash == plugin.hash
                    && b.settings == entry.settings
                    && b.isolation == entry.isolation
            });
            if let Some(store) = kept {
                stores.insert(name.clone(), store.clone());
                continue;
            }
            if let Some(before) = before.filter(|b| b.in_process) {
                // A new adapter would start empty, and turns in flight would
                // save into the one dropped.
                let what = if before.plugin.hash != plugin.hash {
                    "its library"
                } else if before.settings != entry.settings {
                    "its settings"
                } else {
                    "its isolation"
                };
                problems.push(format!(
                    "{key}: store `{name}` keeps its sessions in this process's memory; \
                     changing {what} at runtime would drop every session. Restart the host \
                     to apply it, or configure the change as a store of another name"
                ));
                stores.insert(name.clone(), before.clone());
                continue;
            }
            match StoreBackend::build(name, entry, plugin, &config.base_dir) {
                Ok(store) => {
                    stores.insert(name.clone(), Arc::new(store));
                }
                Err(problem) => problems.push(problem),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Active {
            config,
            models,
            stores,
        })
    }

    /// Reads the config at `path`, scans its plugin directory with `loader`
    /// (loading into this process only the plugins the config names) and
    /// builds the set, reusing what `previous` has. Every problem of the
    /// config, the libraries and the adapters is reported together.
    pub fn assemble(
        path: &Path,
        loader: &Loader,
        previous: Option<&Active>,
    ) -> Result<(Catalog, Active), Vec<String>> {
        let (config, problems) = Config::load_checked(path).map_err(|err| vec![err.to_string()])?;
        let mut problems: Vec<String> = problems
            .into_iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect();
        // Only the plugins some entry names are loaded into this process.
        let wanted: BTreeSet<String> = config
            .models
            .values()
            .chain(config.stores.values())
            .map(|entry| entry.plugin.clone())
            .collect();
        // Of those, only the ones some entry runs in this process are mapped
        // into it; the others are loaded by their child processes alone.
        let in_host: BTreeSet<String> = config
            .models
            .values()
            .chain(config.stores.values())
            .filter(|entry| entry.isolation == Isolation::InProcess)
            .map(|entry| entry.plugin.clone())
            .collect();
        let catalog = match loader.scan(&config.plugins.dir, &wanted, &in_host) {
            Ok(catalog) => catalog,
            Err(problem) => {
                problems.push(problem);
                return Err(problems);
            }
        };
        for error in &catalog.errors {
            tracing::warn!("plugin not loaded: {error}");
        }
        match Active::build(Arc::new(config), &catalog, previous) {
            Ok(active) if problems.is_empty() => Ok((catalog, active)),
            Ok(_) => Err(problems),
            Err(more) => {
                problems.extend(more);
                Err(problems)
            }
        }
    }

    /// The backend a client gets when it names none.
    pub fn default_model(&self) -> Option<&Arc<ModelBackend>> {
        self.models.get(&self.config.default_model)
    }

    /// The store sessions live in.
    pub fn store(&self) -> Option<&Arc<StoreBackend>> {
        self.stores.get(&self.config.default_store)
    }
}

fn refused(key: &str, entry: &AdapterConfig, err: &llm_host_plugin_api::PluginError) -> String {
    format!(
        "{key}: plugin `{}` refused its settings: {err}",
        entry.plugin
    )
}

fn find(
    catalog: &Catalog,
    key: &str,
    entry: &AdapterConfig,
    kind: Kinds,
    problems: &mut Vec<String>,
) -> Option<Arc<LoadedPlugin>> {
    if let Some(files) = catalog.conflicts.get(&entry.plugin) {
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        problems.push(format!(
            "{key}: plugin `{}` is provided by more than one library ({}), so none of them \
             is loaded; remove all but one from the plugin directory",
            entry.plugin,
            files.join(" and ")
        ));
        return None;
    }
    let Some(plugin) = catalog.plugins.get(&entry.plugin) else {
        let provider = catalog.found.iter().find(|f| f.facts.name == entry.plugin);
        let mut message = match provider {
            Some(found) => format!(
                "{key}: plugin `{}` ({}) could not be loaded",
                entry.plugin,
                found.file.display()
            ),
            None => format!(
                "{key}: no library in the plugin directory provides plugin `{}`",
                entry.plugin
            ),
        };
        if provider.is_none() {
            let mut available: Vec<&str> = catalog
                .found
                .iter()
                .map(|found| found.facts.name.as_str())
                .collect();
            available.sort_unstable();
            available.dedup();
            if available.is_empty() {
                message.push_str(" (no plugin found)");
            } else {
                let _ = write!(message, " (found: {})", available.join(", "));
            }
        }
        if !catalog.errors.is_empty() {
            message.push_str("; libraries that were refused or failed to load:");
            for error in &catalog.errors {
                let _ = write!(message, "\n  {error}");
            }
        }
        problems.push(message);
        return None;
    };
    if !plugin.kinds.contains(kind) {
        problems.push(format!(
            "{key}: plugin `{}` provides {:?}, not {:?}",
            entry.plugin, plugin.kinds, kind
        ));
        return None;
    }
    Some(plugin.clone())
}
