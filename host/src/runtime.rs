//! The active set: every configured backend and store, built from the loaded
//! plugins, behind one pointer that a reload swaps whole.
//!
//! A turn takes one snapshot ([`Active`]) and keeps it to the end, so it never
//! sees half an old set and half a new one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use llm_host_plugin_api::{Kinds, ModelAdapterBox, StoreAdapterBox};

use crate::config::{AdapterConfig, Config};
use crate::plugins::{Catalog, LoadedPlugin};

/// A configured model backend (`[models.NAME]`).
pub struct ModelBackend {
    /// Its name in config.toml.
    pub name: String,
    /// The library that built it.
    pub plugin: Arc<LoadedPlugin>,
    /// The adapter.
    pub adapter: ModelAdapterBox,
}

/// A configured store (`[stores.NAME]`).
pub struct StoreBackend {
    /// Its name in config.toml.
    pub name: String,
    /// The library that built it.
    pub plugin: Arc<LoadedPlugin>,
    /// The adapter.
    pub adapter: StoreAdapterBox,
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
    /// Builds every configured adapter from `catalog`. Fails with every
    /// problem found, each naming its config key.
    pub fn build(config: Arc<Config>, catalog: &Catalog) -> Result<Active, Vec<String>> {
        let mut problems = Vec::new();
        let mut models = BTreeMap::new();
        for (name, entry) in &config.models {
            let key = format!("models.{name}");
            let Some(plugin) = find(catalog, &key, entry, Kinds::MODEL, &mut problems) else {
                continue;
            };
            match plugin.new_model(&entry.settings) {
                Ok(adapter) => {
                    models.insert(
                        name.clone(),
                        Arc::new(ModelBackend {
                            name: name.clone(),
                            plugin,
                            adapter,
                        }),
                    );
                }
                Err(err) => problems.push(format!(
                    "{key}: plugin `{}` refused its settings: {err}",
                    entry.plugin
                )),
            }
        }
        let mut stores = BTreeMap::new();
        for (name, entry) in &config.stores {
            let key = format!("stores.{name}");
            let Some(plugin) = find(catalog, &key, entry, Kinds::STORE, &mut problems) else {
                continue;
            };
            match plugin.new_store(&entry.settings) {
                Ok(adapter) => {
                    stores.insert(
                        name.clone(),
                        Arc::new(StoreBackend {
                            name: name.clone(),
                            plugin,
                            adapter,
                        }),
                    );
                }
                Err(err) => problems.push(format!(
                    "{key}: plugin `{}` refused its settings: {err}",
                    entry.plugin
                )),
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

    /// The backend a client gets when it names none.
    pub fn default_model(&self) -> Option<&Arc<ModelBackend>> {
        self.models.get(&self.config.default_model)
    }

    /// The store sessions live in.
    pub fn store(&self) -> Option<&Arc<StoreBackend>> {
        self.stores.get(&self.config.default_store)
    }
}

fn find(
    catalog: &Catalog,
    key: &str,
    entry: &AdapterConfig,
    kind: Kinds,
    problems: &mut Vec<String>,
) -> Option<Arc<LoadedPlugin>> {
    let Some(plugin) = catalog.plugins.get(&entry.plugin) else {
        let mut message = format!(
            "{key}: no library in the plugin directory provides plugin `{}`",
            entry.plugin
        );
        let mut available: Vec<&str> = catalog.plugins.keys().map(String::as_str).collect();
        available.sort_unstable();
        if available.is_empty() {
            message.push_str(" (no plugin loaded)");
        } else {
            let _ = write!(message, " (loaded: {})", available.join(", "));
        }
        if !catalog.errors.is_empty() {
            message.push_str("; libraries that failed to load:");
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
