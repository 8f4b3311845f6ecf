//! Finding, staging and loading plugin libraries.
//!
//! The host never maps the file an operator writes: each `lib*.so` in the
//! plugin directory is copied to a private staging path named by its content
//! hash (written to `.tmp`, then renamed), and that copy is loaded. Identical
//! bytes hash the same, so a library is loaded once per content, and a new
//! build of a plugin loads beside the old one instead of replacing it in
//! place (FACTS.md: `dlopen` of the same path returns the old library, and
//! writing over a mapped file crashes the process). Libraries are never
//! unloaded.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use abi_stable::{
    library::{lib_header_from_path, LibraryError, RootModule},
    sabi_trait::TD_Opaque,
    std_types::{RStr, RString},
};
use llm_host_plugin_api::{
    HostApi, HostApi_TO, Kinds, LogLevel, ModelAdapterBox, PluginError, PluginModRef,
    StoreAdapterBox, API_VERSION,
};
use sha2::{Digest, Sha256};

/// The symbol every plugin library exports (the root module's header).
const ROOT_SYMBOL: &[u8] = b"_1as_0lib_1header_0root_bmodule_bloader";

/// A plugin library loaded into the process. Lives as long as the process:
/// libraries are never unloaded.
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
    module: PluginModRef,
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
        (self.module.new_model())(RStr::from(settings.as_str())).into_result()
    }

    /// Builds a store adapter from `settings` (a JSON object).
    pub fn new_store(&self, settings: &serde_json::Value) -> Result<StoreAdapterBox, PluginError> {
        let settings = settings.to_string();
        (self.module.new_store())(RStr::from(settings.as_str())).into_result()
    }

    /// The first 12 hex digits of the content hash, for logs.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
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
    /// Loaded plugins, by name.
    pub plugins: HashMap<String, Arc<LoadedPlugin>>,
    /// Libraries that failed to load.
    pub errors: Vec<LoadError>,
}

/// Loads plugin libraries, once per distinct content. Owned by the host for
/// its whole life.
pub struct Loader {
    staging_dir: PathBuf,
    base_dir: PathBuf,
    /// Libraries loaded so far, by content hash. Never shrinks: a loaded
    /// library stays mapped until the process ends.
    loaded: Mutex<HashMap<String, Arc<LoadedPlugin>>>,
}

impl Loader {
    /// A loader that stages copies under `staging_dir`; plugins resolve
    /// relative paths in their settings against `base_dir`.
    pub fn new(staging_dir: PathBuf, base_dir: PathBuf) -> Self {
        Self {
            staging_dir,
            base_dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// Scans `dir` for `lib*.so` plugins and loads each. Files that are not
    /// llm-host plugins (no root module symbol) are skipped; every other
    /// failure is collected, so the operator sees them all at once.
    pub fn scan(&self, dir: &Path) -> Catalog {
        let mut catalog = Catalog::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) => {
                catalog.errors.push(LoadError {
                    file: dir.to_owned(),
                    message: format!("cannot read the plugin directory: {err}"),
                });
                return catalog;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| is_library_name(path))
            .collect();
        files.sort();
        for file in files {
            match self.load(&file) {
                Ok(Some(plugin)) => {
                    if let Some(other) = catalog.plugins.get(&plugin.name) {
                        catalog.errors.push(LoadError {
                            file: file.clone(),
                            message: format!(
                                "plugin `{}` is also provided by {}; using that one",
                                plugin.name,
                                other.file.display()
                            ),
                        });
                    } else {
                        catalog.plugins.insert(plugin.name.clone(), plugin);
                    }
                }
                Ok(None) => tracing::debug!(file = %file.display(), "not an llm-host plugin"),
                Err(message) => {
                    crate::metrics::metrics().plugin_failures.inc();
                    catalog.errors.push(LoadError { file, message })
                }
            }
        }
        catalog
    }

    /// Loads one library. `Ok(None)`: not an llm-host plugin.
    pub fn load(&self, file: &Path) -> Result<Option<Arc<LoadedPlugin>>, String> {
        let bytes = std::fs::read(file).map_err(|err| format!("cannot read: {err}"))?;
        if !exports_root_module(&bytes)? {
            return Ok(None);
        }
        let hash = hex(&Sha256::digest(&bytes));
        if let Some(plugin) = self.lock().get(&hash) {
            return Ok(Some(plugin.clone()));
        }
        let staged = self.stage(file, &hash, &bytes)?;
        drop(bytes);
        let plugin = Arc::new(open(file, &staged, hash.clone(), &self.base_dir)?);
        crate::metrics::metrics().plugin_loads.inc();
        tracing::info!(
            plugin = %plugin.name,
            version = %plugin.version,
            hash = plugin.short_hash(),
            file = %file.display(),
            "plugin loaded"
        );
        Ok(Some(self.lock().entry(hash).or_insert(plugin).clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LoadedPlugin>>> {
        // Entries are inserted whole; a poisoned map is still consistent.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stage(&self, file: &Path, hash: &str, bytes: &[u8]) -> Result<PathBuf, String> {
        std::fs::create_dir_all(&self.staging_dir).map_err(|err| {
            format!(
                "cannot create the staging directory {}: {err}",
                self.staging_dir.display()
            )
        })?;
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".to_owned());
        let staged = self.staging_dir.join(format!("{stem}-{}.so", &hash[..16]));
        if staged.exists() {
            return Ok(staged);
        }
        let tmp =
            self.staging_dir
                .join(format!("{stem}-{}.{}.tmp", &hash[..16], std::process::id()));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &staged))
            .map_err(|err| {
                let _ = std::fs::remove_file(&tmp);
                format!(
                    "cannot stage a copy in {}: {err}",
                    self.staging_dir.display()
                )
            })?;
        Ok(staged)
    }
}

fn open(file: &Path, staged: &Path, hash: String, base_dir: &Path) -> Result<LoadedPlugin, String> {
    let header = lib_header_from_path(staged).map_err(|err| describe(&err))?;
    let api_version = header.version_strings().to_string();
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|err| describe(&err))?;
    let info = (module.info())();
    let name = info.name.to_string();
    let logger = HostApi_TO::from_value(
        PluginLogger {
            plugin: name.clone(),
            base_dir: base_dir.to_string_lossy().into_owned(),
        },
        TD_Opaque,
    );
    (module.init())(logger)
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
        module,
    })
}

/// Turns a loader error into the few lines an operator can act on; the full
/// report goes to the debug log.
fn describe(err: &LibraryError) -> String {
    match err {
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "built against plugin-api {actual_version}, but this host needs \
             {}.{}.x (rebuild the plugin against llm-host-plugin-api {API_VERSION})",
            expected_version.major, expected_version.minor
        ),
        LibraryError::AbiInstability(report) => {
            let full = report.to_string();
            tracing::debug!(report = %full, "full ABI report");
            let useful: Vec<&str> = full
                .lines()
                .map(str::trim)
                .filter(|line| line.starts_with("Error:") || line.contains("incompatible"))
                .take(6)
                .collect();
            let mut message = format!(
                "incompatible plugin-api layout (was it built against another \
                 llm-host-plugin-api {}?)",
                <PluginModRef as RootModule>::VERSION_STRINGS
            );
            for line in useful {
                let _ = write!(message, "\n    {line}");
            }
            message
        }
        LibraryError::OpenError { err, .. } => format!("cannot be loaded: {err}"),
        other => other.to_string(),
    }
}

fn is_library_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with("lib") && name.ends_with(".so") && path.is_file()
}

/// Checks that `bytes` is a whole ELF shared library (every segment and
/// section lies inside the file: a half-copied library passes `dlopen` and
/// crashes on first call) and answers whether it exports the plugin root
/// module.
fn exports_root_module(bytes: &[u8]) -> Result<bool, String> {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

    if !bytes.starts_with(b"\x7fELF") {
        return Err("not an ELF shared library".to_owned());
    }
    let elf = ElfFile64::<object::Endianness>::parse(bytes)
        .map_err(|err| format!("not a readable 64-bit ELF library ({err}); truncated?"))?;
    let len = bytes.len() as u64;
    let inside =
        |(offset, size): (u64, u64)| offset.checked_add(size).is_some_and(|end| end <= len);
    if let Some(segment) = elf.segments().find(|s| !inside(s.file_range())) {
        let (offset, size) = segment.file_range();
        return Err(format!(
            "truncated: a segment ends at byte {} but the file has {len} bytes \
             (still being written? copy to a temporary name, then mv)",
            offset + size
        ));
    }
    if elf
        .sections()
        .filter_map(|s| s.file_range())
        .any(|range| !inside(range))
    {
        return Err(format!(
            "truncated: a section lies past the end of the file ({len} bytes)"
        ));
    }
    Ok(elf
        .dynamic_symbols()
        .any(|symbol| symbol.name_bytes().is_ok_and(|name| name == ROOT_SYMBOL)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The host API a plugin gets at init: its log lines go through the host's
/// tracing subscriber, tagged with the plugin's name.
struct PluginLogger {
    plugin: String,
    base_dir: String,
}

impl HostApi for PluginLogger {
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
        let (plugin, target, message) = (&self.plugin, target.as_str(), message.as_str());
        match level {
            LogLevel::ERROR => tracing::error!(plugin, target, "{message}"),
            LogLevel::WARN => tracing::warn!(plugin, target, "{message}"),
            LogLevel::INFO => tracing::info!(plugin, target, "{message}"),
            LogLevel::DEBUG => tracing::debug!(plugin, target, "{message}"),
            _ => tracing::trace!(plugin, target, "{message}"),
        }
    }

    fn log_enabled(&self, level: LogLevel) -> bool {
        match level {
            LogLevel::ERROR => tracing::enabled!(tracing::Level::ERROR),
            LogLevel::WARN => tracing::enabled!(tracing::Level::WARN),
            LogLevel::INFO => tracing::enabled!(tracing::Level::INFO),
            LogLevel::DEBUG => tracing::enabled!(tracing::Level::DEBUG),
            _ => tracing::enabled!(tracing::Level::TRACE),
        }
    }

    fn host_version(&self) -> RString {
        env!("CARGO_PKG_VERSION").into()
    }

    fn base_dir(&self) -> RString {
        self.base_dir.as_str().into()
    }
}
