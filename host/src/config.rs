//! config.toml: parsed strictly into raw structs, then validated into [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod history;
mod isolation;
mod server;
mod telemetry;
mod vars;
pub use isolation::{Isolation, ProcessLimits};
use server::RawServer;
pub use server::ServerConfig;
pub use telemetry::TelemetryConfig;

pub use crate::protocol::Envelope;

/// A config that could not be read or is invalid. The message names the file
/// and the key.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// What is wrong, naming the key.
    pub message: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    auth: RawAuth,
    plugins: RawPlugins,
    defaults: RawDefaults,
    #[serde(default)]
    models: BTreeMap<String, RawAdapter>,
    #[serde(default)]
    stores: BTreeMap<String, RawAdapter>,
    telemetry: Option<telemetry::RawTelemetry>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct RawAuth {
    open: bool,
    keys: Vec<RawKey>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    key: Option<OneOrMore>,
    key_env: Option<OneOrMore>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    admin: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    dir: PathBuf,
    staging_dir: Option<PathBuf>,
    #[serde(default = "default_watch")]
    watch: bool,
    #[serde(default = "default_debounce_ms")]
    debounce_ms: u64,
    #[serde(default = "default_staging_grace_secs")]
    staging_grace_secs: u64,
}

fn default_staging_grace_secs() -> u64 {
    600
}

fn default_watch() -> bool {
    true
}

/// `plugins.staging_dir` when the config sets none: the same path for every
/// run of this user, and one no other user shares.
/// `$XDG_RUNTIME_DIR/llm-host-staging` when `XDG_RUNTIME_DIR` is an absolute
/// path to a directory owned by this user that grants others no access (as
/// systemd makes `/run/user/UID`); otherwise
/// `<temporary directory>/llm-host-staging-<effective uid>`. That path is
/// predictable, so another user may create it first: the loader then refuses
/// it (it must be owned by this user with mode 0700) rather than use it.
pub fn default_staging_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    if let Some(runtime) = runtime.filter(|dir| dir.is_absolute()) {
        let private = std::fs::metadata(&runtime)
            .is_ok_and(|m| m.is_dir() && m.uid() == euid && m.mode() & 0o077 == 0);
        if private {
            return runtime.join("llm-host-staging");
        }
    }
    std::env::temp_dir().join(format!("llm-host-staging-{euid}"))
}

fn default_debounce_ms() -> u64 {
    500
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    model: String,
    store: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawAdapter {
    plugin: String,
    #[serde(default)]
    settings: Option<toml::Table>,
    #[serde(default)]
    max_tokens_limit: Option<u64>,
    #[serde(default)]
    history: Option<history::RawHistory>,
    #[serde(default)]
    isolation: Option<isolation::RawIsolation>,
}

/// An API key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiKey {
    /// Its name: sessions it creates are owned by this id.
    pub id: String,
    /// Its secrets (several while it is being rotated); never serialized.
    #[serde(skip_serializing)]
    pub secrets: Vec<String>,
    /// Whether it may use the admin endpoints.
    pub admin: bool,
}

/// `[auth]`.
#[derive(Clone, Debug, PartialEq, Serialize, Default)]
pub struct AuthConfig {
    /// Serve without keys even on a non-loopback address.
    pub open: bool,
    /// The keys; none means open mode.
    pub keys: Vec<ApiKey>,
}

impl AuthConfig {
    /// Why serving on `addr` with these keys is refused: open mode (no keys)
    /// on an address other machines reach needs `auth.open = true`.
    pub fn exposure_problem(&self, addr: SocketAddr) -> Option<String> {
        (self.keys.is_empty() && !self.open && !addr.ip().is_loopback()).then(|| {
            format!(
                "the host would listen on {addr}, which other machines reach, and [auth] has \
                 no keys: add [[auth.keys]], or set auth.open = true to serve without \
                 authentication"
            )
        })
    }
}

/// `[plugins]`, with paths resolved against the config file's directory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PluginsConfig {
    /// Where `lib*.so` plugins are found.
    pub dir: PathBuf,
    /// Where the content-hashed copies of plugin libraries that the host
    /// loads are written. Must be private to the host's user (owned by it,
    /// mode 0700): the loader refuses it otherwise. Default: see
    /// [`default_staging_dir`].
    pub staging_dir: PathBuf,
    /// Whether to reload when config.toml or a plugin library changes.
    pub watch: bool,
    /// How long files must be quiet before a reload, in milliseconds.
    pub debounce_ms: u64,
    /// How long a staged copy that this host does not map (nor mapped in
    /// the generation before) stays before it is removed, in seconds.
    pub staging_grace_secs: u64,
}

/// A `[models.NAME]` or `[stores.NAME]` entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdapterConfig {
    /// The plugin's own name.
    pub plugin: String,
    /// The adapter's settings as a JSON object.
    pub settings: serde_json::Value,
    /// Models only: the most output tokens a client may ask for a turn
    /// (`maxTokens`); a prompt asking more is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens_limit: Option<u64>,
    /// Models only: how much of a session's history a request holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<crate::core::history::HistoryPolicy>,
    /// Where the plugin runs (in the host's process, or in a child process
    /// of its own); a store's takes no turn limits.
    #[serde(skip_serializing_if = "Isolation::is_in_process")]
    pub isolation: Isolation,
}

/// A validated config.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// The directory relative paths are resolved against (the config file's).
    pub base_dir: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[plugins]`.
    pub plugins: PluginsConfig,
    /// `[defaults] model`: the backend used when a client names none.
    pub default_model: String,
    /// `[defaults] store`: the store sessions live in.
    pub default_store: String,
    /// Named model backends.
    pub models: BTreeMap<String, AdapterConfig>,
    /// Named stores.
    pub stores: BTreeMap<String, AdapterConfig>,
    /// `[telemetry]`: traces exported over OTLP; none: no traces.
    pub telemetry: Option<TelemetryConfig>,
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match Self::load_checked(path)? {
            (config, problems) if problems.is_empty() => Ok(config),
            (_, problems) => Err(ConfigError {
                path: path.to_owned(),
                message: problems.join("\n"),
            }),
        }
    }

    /// Parses and validates config text; relative paths resolve against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        match Self::check(text, base)? {
            (config, problems) if problems.is_empty() => Ok(config),
            (_, problems) => Err(problems.join("\n")),
        }
    }

    /// Like [`Config::load`], but a config that parses and has only
    /// semantic problems (bad values, a default naming no entry) comes back
    /// with those problems, so that plugin problems can be reported with them.
    pub fn load_checked(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let error = |message: String| ConfigError {
            path: path.to_owned(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|err| error(format!("cannot read: {err}")))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = base.canonicalize().unwrap_or_else(|_| base.to_owned());
        Self::check(&text, &base).map_err(error)
    }

    /// Parses config text. Err: it does not parse (syntax, unknown keys,
    /// wrong types). Ok: the config with every semantic problem found.
    pub fn check(text: &str, base: &Path) -> Result<(Config, Vec<String>), String> {
        // Read once as written, for errors that point into the text; then
        // again with `${VAR}`s replaced.
        toml::from_str::<RawConfig>(text).map_err(|err| err.to_string())?;
        let mut problems = Vec::new();
        let mut value: toml::Value = toml::from_str(text).map_err(|err| err.to_string())?;
        vars::substitute(&mut value, "", &mut problems);
        let raw: RawConfig = value.try_into().map_err(|err| err.to_string())?;

        let server = server::server(raw.server, &mut problems);
        let auth = auth(raw.auth, base, &mut problems);
        let models = adapters("models", raw.models, &mut problems);
        let stores = adapters("stores", raw.stores, &mut problems);
        history::check_summarizers(&models, &mut problems);
        let telemetry = raw
            .telemetry
            .map(|raw| telemetry::telemetry(raw, &mut problems));
        if !models.contains_key(&raw.defaults.model) {
            problems.push(format!(
                "defaults.model: `{}` is not a [models.*] entry (have: {})",
                raw.defaults.model,
                names(&models)
            ));
        }
        if !stores.contains_key(&raw.defaults.store) {
            problems.push(format!(
                "defaults.store: `{}` is not a [stores.*] entry (have: {})",
                raw.defaults.store,
                names(&stores)
            ));
        }
        if raw.plugins.staging_grace_secs > YEAR_SECS {
            problems.push(format!(
                "plugins.staging_grace_secs: {} is more than a year ({YEAR_SECS} s)",
                raw.plugins.staging_grace_secs
            ));
        }
        let dir = base.join(raw.plugins.dir);
        let staging_dir = match raw.plugins.staging_dir {
            Some(dir) => base.join(dir),
            None => default_staging_dir(),
        };
        let config = Config {
            base_dir: base.to_owned(),
            server,
            auth,
            plugins: PluginsConfig {
                dir,
                staging_dir,
                watch: raw.plugins.watch,
                debounce_ms: raw.plugins.debounce_ms,
                staging_grace_secs: raw.plugins.staging_grace_secs,
            },
            default_model: raw.defaults.model,
            default_store: raw.defaults.store,
            models,
            stores,
            telemetry,
        };
        Ok((config, problems))
    }
}

/// The longest duration a setting in seconds may have: a year (and so no
/// overflow when the host counts it in milliseconds).
const YEAR_SECS: u64 = 365 * 24 * 3600;

/// Shortest API key accepted.
const MIN_KEY_LEN: usize = 16;

/// A string, or a list of them.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum OneOrMore {
    One(String),
    More(Vec<String>),
}

impl OneOrMore {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMore::One(one) => vec![one],
            OneOrMore::More(more) => more,
        }
    }
}

fn auth(raw: RawAuth, base: &Path, problems: &mut Vec<String>) -> AuthConfig {
    let mut keys: Vec<ApiKey> = Vec::new();
    for (i, key) in raw.keys.into_iter().enumerate() {
        let at = format!("auth.keys[{i}] (id `{}`)", key.id);
        if !crate::core::document::valid_name(&key.id) {
            problems.push(format!(
                "{at}: ids are 1-128 characters of A-Z a-z 0-9 . _ : -"
            ));
        }
        if keys.iter().any(|k| k.id == key.id) {
            problems.push(format!("{at}: the id is used twice"));
        }
        let mut secrets: Vec<String> = key.key.map(OneOrMore::into_vec).unwrap_or_default();
        for var in key.key_env.map(OneOrMore::into_vec).unwrap_or_default() {
            match std::env::var(&var) {
                Ok(secret) => secrets.push(secret),
                Err(_) => problems.push(format!("{at}: key_env names `{var}`, which is not set")),
            }
        }
        if let Some(file) = key.key_file {
            // Read again on every reload: rotate by editing the file.
            let file = base.join(file);
            match std::fs::read_to_string(&file) {
                Ok(text) => secrets.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|line| !line.is_empty() && !line.starts_with('#'))
                        .map(str::to_owned),
                ),
                Err(err) => problems.push(format!(
                    "{at}: key_file {} cannot be read: {err}",
                    file.display()
                )),
            }
        }
        if secrets.is_empty() {
            problems.push(format!(
                "{at}: give its secret as `key`, `key_env` or `key_file` (a list while rotating)"
            ));
            continue;
        }
        if secrets.iter().any(|secret| secret.len() < MIN_KEY_LEN) {
            problems.push(format!(
                "{at}: a key is shorter than {MIN_KEY_LEN} characters"
            ));
        }
        keys.push(ApiKey {
            id: key.id,
            secrets,
            admin: key.admin,
        });
    }
    AuthConfig {
        open: raw.open,
        keys,
    }
}

fn names(map: &BTreeMap<String, AdapterConfig>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn adapters(
    section: &str,
    raw: BTreeMap<String, RawAdapter>,
    problems: &mut Vec<String>,
) -> BTreeMap<String, AdapterConfig> {
    raw.into_iter()
        .filter_map(|(name, adapter)| {
            if !crate::core::document::valid_name(&name) {
                problems.push(format!(
                    "{section}.{name}: names are 1-128 characters of A-Z a-z 0-9 . _ : -"
                ));
                return None;
            }
            if section != "models" && adapter.max_tokens_limit.is_some() {
                problems.push(format!(
                    "{section}.{name}.max_tokens_limit: only model backends take a token limit"
                ));
            }
            if adapter.max_tokens_limit == Some(0) {
                problems.push(format!(
                    "{section}.{name}.max_tokens_limit: must be at least 1"
                ));
            }
            if section != "models" && adapter.history.is_some() {
                problems.push(format!(
                    "{section}.{name}.history: only model backends take a history policy"
                ));
            }
            let at = format!("{section}.{name}");
            let history = adapter
                .history
                .map(|raw| history::policy(&at, raw, problems));
            let isolation = match adapter.isolation {
                Some(raw) if section == "models" => isolation::isolation(&at, raw, problems),
                Some(raw) => isolation::store_isolation(&at, raw, problems),
                None => Isolation::InProcess,
            };
            let settings = adapter.settings.unwrap_or_default();
            let settings = serde_json::to_value(settings).unwrap_or_else(|err| {
                problems.push(format!("{section}.{name}.settings: {err}"));
                serde_json::Value::Null
            });
            Some((
                name,
                AdapterConfig {
                    plugin: adapter.plugin,
                    settings,
                    max_tokens_limit: adapter.max_tokens_limit,
                    history,
                    isolation,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests;
