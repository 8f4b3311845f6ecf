//! Finding, staging and loading plugin libraries.
//!
//! A scan of the plugin directory ([`Loader::scan`]):
//!
//! 1. checks the staging directory ([`super::staging`]: private to the
//!    host's user, or refused) and warns when others may write the plugin
//!    directory;
//! 2. reads each `lib*.so` ([`super::library`]): refused if anyone but the
//!    host's user or root could have written it (a symlink is judged by the
//!    file it points to), checked to be a whole ELF library that exports the
//!    plugin root module, and hashed;
//! 3. stages a copy named by its content hash, and learns which plugin it is
//!    (name, version, kinds) in a probe process ([`super::probe`]), once per
//!    distinct content: no code of a library runs in the host before the
//!    config is known to name it;
//! 4. refuses a plugin name that two libraries provide, naming both files
//!    (neither is loaded);
//! 5. loads into this process only the plugins the config names for an
//!    entry that runs in it: the staged copy is verified against its hash
//!    once more, mapped, ABI-checked (against today's contract, or an
//!    earlier layout it was published with: [`compat`]), and its `init`
//!    called. A plugin the config names only for entries with
//!    `isolation = "process"` is verified but never mapped here: its child
//!    process loads it ([`load_isolated`]), so none of its code (constructors,
//!    `init`, threads it starts) runs in the host.
//!
//! The host never maps the file an operator writes. Identical bytes are
//! loaded once, and a new build of a plugin is staged under another name and
//! loads beside the old one instead of replacing it in place: `dlopen` of a
//! path already loaded returns the library loaded before, and writing over a
//! mapped file crashes the process. Libraries are never unloaded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use abi_stable::{library::lib_header_from_path, std_types::RStr};
use llm_host_plugin_api::{Kinds, ModelAdapterBox, PluginError, StoreAdapterBox};

#[path = "compat.rs"]
pub(crate) mod compat;
#[path = "load_errors.rs"]
mod load_errors;

use self::compat::Root;
use self::load_errors::describe;
use super::library;
pub(crate) use super::logger::PluginLogger;
use super::probe::{Facts, Prober};
use super::staging::{sha256_hex, Staging};

/// A plugin library loaded into the process (or, for a plugin run only in
/// child processes, verified and known by its probe's answer). Lives as long
/// as the process: libraries are never unloaded.
pub struct LoadedPlugin {
    /// The plugin's own name, as config.toml names it.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// One line on what it is.
    pub description: String,
    /// Which adapters it provides.
    pub kinds: Kinds,
    /// The plugin-api version it was built against.
    pub api_version: String,
    /// The operator's file it was staged from.
    pub file: PathBuf,
    /// The staged copy that is mapped.
    pub staged: PathBuf,
    /// SHA-256 of its bytes, hex.
    pub hash: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Its root module; `None` when it is not mapped into this process.
    module: Option<Root>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("file", &self.file)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// Builds a model adapter from `settings` (a JSON object).
    pub fn new_model(&self, settings: &serde_json::Value) -> Result<ModelAdapterBox, PluginError> {
        let settings = settings.to_string();
        self.module()?
            .new_model(RStr::from(settings.as_str()))
            .into_result()
    }

    /// Builds a store adapter from `settings` (a JSON object).
    pub fn new_store(&self, settings: &serde_json::Value) -> Result<StoreAdapterBox, PluginError> {
        let settings = settings.to_string();
        self.module()?
            .new_store(RStr::from(settings.as_str()))
            .into_result()
    }

    /// Whether the library is mapped into this process (else it runs only
    /// in child processes).
    pub fn in_host(&self) -> bool {
        self.module.is_some()
    }

    fn module(&self) -> Result<&Root, PluginError> {
        self.module.as_ref().ok_or_else(|| {
            PluginError::internal(format!(
                "plugin `{}` is not loaded into the host: it runs in a process of its own",
                self.name
            ))
        })
    }

    /// The first 12 hex digits of the content hash, for logs.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }

    /// Which layout of the plugin contract the library was loaded through:
    /// `current`, or an earlier one (see [`compat`]).
    pub fn contract(&self) -> &'static str {
        self.module
            .as_ref()
            .map_or("known in its child process", Root::contract)
    }

    /// What it says it is.
    pub fn facts(&self) -> Facts {
        Facts {
            name: self.name.clone(),
            version: self.version.clone(),
            description: self.description.clone(),
            kinds: self.kinds.0,
            api_version: self.api_version.clone(),
        }
    }
}

/// A library in the plugin directory that could not be loaded.
#[derive(Clone, Debug)]
pub struct LoadError {
    /// The operator's file.
    pub file: PathBuf,
    /// Why, in a few lines an operator can act on.
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

/// What a scan of the plugin directory found.
#[derive(Debug, Default)]
pub struct Catalog {
    /// The plugins loaded into this process, by name: those the config
    /// names (and no other).
    pub plugins: HashMap<String, Arc<LoadedPlugin>>,
    /// Every plugin library found, loaded or not, in file name order.
    pub found: Vec<Found>,
    /// Plugin names that more than one library provides, with their files;
    /// none of those libraries is loaded.
    pub conflicts: BTreeMap<String, Vec<PathBuf>>,
    /// Libraries that were refused or failed to load.
    pub errors: Vec<LoadError>,
}

impl Catalog {
    fn fail(&mut self, file: PathBuf, message: String) {
        crate::metrics::metrics().plugin_failures.inc();
        self.errors.push(LoadError { file, message });
    }
}

/// A plugin library found in the plugin directory.
#[derive(Clone, Debug)]
pub struct Found {
    /// The file in the plugin directory.
    pub file: PathBuf,
    /// SHA-256 of its bytes, hex.
    pub hash: String,
    /// What it says it is (asked in a probe process, or when it was loaded).
    pub facts: Facts,
    /// Whether it is loaded: into this process, or (named only by entries
    /// with `isolation = "process"`) verified for its child processes.
    pub loaded: bool,
}

impl Found {
    /// The first 12 hex digits of the content hash.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }
}

/// A library of this scan: its file, its hash, and its staged copy if one
/// was made for it (see [`Loader::examine`]).
struct Entry {
    file: PathBuf,
    hash: String,
    staged: Option<PathBuf>,
}

/// Loads plugin libraries, once per distinct content. Owned by the host for
/// its whole life.
pub struct Loader {
    staging: Staging,
    base_dir: PathBuf,
    prober: Prober,
    /// Libraries loaded so far, by content hash. Never shrinks: a loaded
    /// library stays mapped until the process ends.
    loaded: Mutex<HashMap<String, Arc<LoadedPlugin>>>,
    /// What probes answered, by content hash.
    probed: Mutex<HashMap<String, Result<Facts, String>>>,
}

impl Loader {
    /// A loader that stages copies under `staging_dir` and probes libraries
    /// with this process's own executable (which must answer
    /// [`super::probe::ARG`] as `llm-host` does); plugins resolve relative
    /// paths in their settings against `base_dir`.
    pub fn new(staging_dir: PathBuf, base_dir: PathBuf) -> Self {
        Self {
            staging: Staging::new(staging_dir),
            base_dir,
            prober: Prober::current_exe(),
            loaded: Mutex::new(HashMap::new()),
            probed: Mutex::new(HashMap::new()),
        }
    }

    /// Removes the staged copies not in `keep` once unused for `grace` (see
    /// [`Staging::clean`]).
    pub fn clean_staging(&self, keep: &BTreeSet<PathBuf>, grace: std::time::Duration) {
        let removed = self.staging.clean(keep, grace);
        if removed > 0 {
            tracing::info!(
                removed,
                dir = %self.staging.dir().display(),
                "removed unused staged plugin copies"
            );
        }
    }

    /// The same loader, probing with `prober`.
    pub fn with_prober(mut self, prober: Prober) -> Self {
        self.prober = prober;
        self
    }

    /// Scans `dir` for `lib*.so` plugins (see the module's doc) and loads
    /// those whose plugin name `wanted` holds: into this process if `in_host`
    /// holds it too, else verified only, for child processes to load. Files
    /// that are not llm-host plugins (no root module symbol) are skipped;
    /// every other problem of a file is collected, so the operator sees them
    /// all at once. Fails only when the staging directory cannot be used.
    pub fn scan(
        &self,
        dir: &Path,
        wanted: &BTreeSet<String>,
        in_host: &BTreeSet<String>,
    ) -> Result<Catalog, String> {
        self.staging.prepare()?;
        library::check_dir(dir);
        let mut catalog = Catalog::default();
        let files = match library::list(dir) {
            Ok(files) => files,
            Err(err) => {
                catalog.fail(
                    dir.to_owned(),
                    format!("cannot read the plugin directory: {err}"),
                );
                return Ok(catalog);
            }
        };
        let mut entries = Vec::new();
        for file in files {
            match self.examine(&file, wanted) {
                Ok(Some(entry)) => entries.push(entry),
                Ok(None) => tracing::debug!(file = %file.display(), "not an llm-host plugin"),
                Err(message) => catalog.fail(file, message),
            }
        }
        let facts = self.facts_of(&entries);

        let mut by_name: BTreeMap<&str, Vec<(&Entry, &Facts)>> = BTreeMap::new();
        for entry in &entries {
            match facts.get(&entry.hash) {
                Some(Ok(facts)) => by_name.entry(&facts.name).or_default().push((entry, facts)),
                Some(Err(message)) => catalog.fail(entry.file.clone(), message.clone()),
                None => {}
            }
        }
        for (name, providers) in by_name {
            let mut loaded = false;
            if let [(first, _), others @ ..] = providers.as_slice() {
                if !others.is_empty() {
                    let files: Vec<PathBuf> =
                        providers.iter().map(|(e, _)| e.file.clone()).collect();
                    let others: Vec<String> =
                        files[1..].iter().map(|f| f.display().to_string()).collect();
                    catalog.fail(
                        first.file.clone(),
                        format!(
                            "plugin `{name}` is also provided by {}; a plugin name must come \
                             from one library, so none of them is loaded: remove all but one",
                            others.join(" and ")
                        ),
                    );
                    catalog.conflicts.insert(name.to_owned(), files);
                } else if wanted.contains(name) {
                    match self.load_entry(first, name, in_host.contains(name)) {
                        Ok(plugin) => {
                            catalog.plugins.insert(name.to_owned(), plugin);
                            loaded = true;
                        }
                        Err(message) => catalog.fail(first.file.clone(), message),
                    }
                }
            }
            for (entry, facts) in providers {
                catalog.found.push(Found {
                    file: entry.file.clone(),
                    hash: entry.hash.clone(),
                    facts: facts.clone(),
                    loaded,
                });
            }
        }
        catalog.found.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(catalog)
    }

    /// Reads and checks `file`; stages it unless its plugin is known and not
    /// wanted, or already loaded. `Ok(None)`: not an llm-host plugin.
    fn examine(&self, file: &Path, wanted: &BTreeSet<String>) -> Result<Option<Entry>, String> {
        let library = library::read(file)?;
        if !library::exports_root_module(&library.bytes)? {
            return Ok(None);
        }
        let known = self.lock().get(&library.hash).cloned();
        let stage = if let Some(plugin) = known {
            // Known for child processes only, its staged copy is what they
            // load: staged again if cleaning removed it (a rollback to a
            // build unused for a while).
            !plugin.in_host() && !plugin.staged.exists()
        } else {
            match self.probes().get(&library.hash) {
                Some(Ok(facts)) => wanted.contains(&facts.name),
                Some(Err(_)) => false,
                None => true,
            }
        };
        let staged = if stage {
            Some(self.staging.stage(file, &library.hash, &library.bytes)?)
        } else {
            None
        };
        Ok(Some(Entry {
            file: file.to_owned(),
            hash: library.hash,
            staged,
        }))
    }

    /// What each entry's library is: from the libraries loaded, the probes
    /// answered before, or new probes (each distinct content once).
    fn facts_of(&self, entries: &[Entry]) -> HashMap<String, Result<Facts, String>> {
        let mut facts = HashMap::new();
        let mut unknown: Vec<(&str, PathBuf)> = Vec::new();
        for entry in entries {
            if facts.contains_key(&entry.hash) || unknown.iter().any(|(h, _)| *h == entry.hash) {
                continue;
            }
            if let Some(plugin) = self.lock().get(&entry.hash) {
                facts.insert(entry.hash.clone(), Ok(plugin.facts()));
            } else if let Some(known) = self.probes().get(&entry.hash) {
                facts.insert(entry.hash.clone(), known.clone());
            } else if let Some(staged) = &entry.staged {
                unknown.push((&entry.hash, staged.clone()));
            }
        }
        let staged: Vec<PathBuf> = unknown.iter().map(|(_, s)| s.clone()).collect();
        let answers = self.prober.probe_all(&staged);
        let mut probes = self.probes();
        for ((hash, staged), probed) in unknown.into_iter().zip(answers) {
            match &probed.result {
                Ok(f) => tracing::debug!(plugin = %f.name, staged = %staged.display(), "probed"),
                Err(why) => tracing::debug!(staged = %staged.display(), "probe: {why}"),
            }
            if probed.lasting {
                probes.insert(hash.to_owned(), probed.result.clone());
            }
            facts.insert(hash.to_owned(), probed.result);
        }
        facts
    }

    /// Loads `entry`, whose probe said it is plugin `name`: into this
    /// process with `in_host`, else only verified and described (for child
    /// processes to load; mapped later if an entry in the host comes to name
    /// it).
    fn load_entry(
        &self,
        entry: &Entry,
        name: &str,
        in_host: bool,
    ) -> Result<Arc<LoadedPlugin>, String> {
        let known = self.lock().get(&entry.hash).cloned();
        let usable = |p: &Arc<LoadedPlugin>| p.in_host() || (!in_host && entry.staged.is_none());
        if let Some(plugin) = known.as_ref().filter(|p| usable(p)) {
            return Ok(plugin.clone());
        }
        let staged = match (&entry.staged, &known) {
            (Some(staged), _) => staged.clone(),
            (None, Some(plugin)) => plugin.staged.clone(),
            (None, None) => return Err("no staged copy was made for it".to_owned()),
        };
        if in_host {
            return self.map(&entry.file, &staged, &entry.hash, Some(name));
        }
        self.staging.verify(&staged, &entry.hash)?;
        let facts = match self.probes().get(&entry.hash) {
            Some(Ok(facts)) => facts.clone(),
            _ => return Err("its probe's answer was lost".to_owned()),
        };
        let plugin = Arc::new(LoadedPlugin {
            name: facts.name,
            version: facts.version,
            description: facts.description,
            kinds: Kinds(facts.kinds),
            api_version: facts.api_version,
            file: entry.file.clone(),
            staged,
            hash: entry.hash.clone(),
            loaded_at: SystemTime::now(),
            module: None,
        });
        tracing::info!(
            plugin = %plugin.name,
            version = %plugin.version,
            hash = plugin.short_hash(),
            file = %entry.file.display(),
            "plugin verified for its child processes (not loaded into the host)"
        );
        let mut loaded = self.lock();
        let kept = loaded.entry(entry.hash.clone()).or_insert(plugin.clone());
        if !kept.in_host() {
            // Known for children before, at a staged copy since removed.
            *kept = plugin;
        }
        Ok(kept.clone())
    }

    /// Loads one library into this process, as `llm-host check` does with
    /// the file the operator names: no ownership checks and no probe (the
    /// operator chose this file to run). `Ok(None)`: not an llm-host plugin.
    pub fn load(&self, file: &Path) -> Result<Option<Arc<LoadedPlugin>>, String> {
        let bytes = std::fs::read(file).map_err(|err| format!("cannot read: {err}"))?;
        if !library::exports_root_module(&bytes)? {
            return Ok(None);
        }
        let hash = sha256_hex(&bytes);
        if let Some(plugin) = self.lock().get(&hash) {
            return Ok(Some(plugin.clone()));
        }
        self.staging.prepare()?;
        let staged = self.staging.stage(file, &hash, &bytes)?;
        drop(bytes);
        self.map(file, &staged, &hash, None).map(Some)
    }

    /// Verifies the staged copy, maps it and initialises the plugin;
    /// `expected` is the name its probe reported.
    fn map(
        &self,
        file: &Path,
        staged: &Path,
        hash: &str,
        expected: Option<&str>,
    ) -> Result<Arc<LoadedPlugin>, String> {
        self.staging.verify(staged, hash)?;
        let plugin = Arc::new(open(
            file,
            staged,
            hash.to_owned(),
            &self.base_dir,
            expected,
        )?);
        crate::metrics::metrics().plugin_loads.inc();
        tracing::info!(
            plugin = %plugin.name,
            version = %plugin.version,
            hash = plugin.short_hash(),
            contract = plugin.contract(),
            file = %file.display(),
            "plugin loaded"
        );
        let mut loaded = self.lock();
        let kept = loaded.entry(hash.to_owned()).or_insert(plugin.clone());
        if !kept.in_host() {
            // Known before for child processes only: mapped now.
            *kept = plugin;
        }
        Ok(kept.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LoadedPlugin>>> {
        // Entries are inserted whole; a poisoned map is still consistent.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Result<Facts, String>>> {
        self.probed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Loads plugin `name` from `staged` (a copy the host staged from `file`)
/// into a plugin's child process (see [`super::isolated`]): the copy is
/// verified against `hash` as the host would before mapping it, then mapped,
/// checked and initialised the same way.
pub(crate) fn load_isolated(
    file: &Path,
    staged: &Path,
    hash: &str,
    base_dir: &Path,
    name: &str,
) -> Result<LoadedPlugin, String> {
    let dir = staged.parent().unwrap_or(Path::new("."));
    Staging::new(dir.to_owned()).verify(staged, hash)?;
    open(file, staged, hash.to_owned(), base_dir, Some(name))
}

/// Maps `staged` and checks its plugin-api version and the layout of its
/// root module (today's, or one of the earlier layouts [`compat`] knows): the
/// root module and the plugin-api version it was built against. Runs the
/// library's code (its constructors and root module loader); the probe
/// process runs exactly this.
pub(crate) fn read_root(staged: &Path) -> Result<(Root, String), String> {
    let header = lib_header_from_path(staged).map_err(|err| describe(&err, None))?;
    let api_version = header.version_strings().to_string();
    let module = compat::open(header).map_err(|err| describe(&err, Some(&api_version)))?;
    Ok((module, api_version))
}

fn open(
    file: &Path,
    staged: &Path,
    hash: String,
    base_dir: &Path,
    expected: Option<&str>,
) -> Result<LoadedPlugin, String> {
    let (module, api_version) = read_root(staged)?;
    let info = (module.info())();
    let name = info.name.to_string();
    if let Some(expected) = expected.filter(|e| *e != name) {
        return Err(format!(
            "loaded into the host it says it is plugin `{name}`, but its probe said \
             `{expected}`; not initialised"
        ));
    }
    let logger = PluginLogger::new(&name, base_dir.to_string_lossy().into_owned());
    module
        .init(logger)
        .into_result()
        .map_err(|err| format!("plugin `{name}` failed to initialise: {err}"))?;
    Ok(LoadedPlugin {
        name,
        version: info.version.to_string(),
        description: info.description.to_string(),
        kinds: info.kinds,
        api_version,
        file: file.to_owned(),
        staged: staged.to_owned(),
        hash,
        loaded_at: SystemTime::now(),
        module: Some(module),
    })
}
