//! config.toml: parsed strictly into raw structs, then validated into [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
}

#[derive(Deserialize, Debug)]
#[serde(default, deny_unknown_fields)]
struct RawServer {
    listen: String,
    envelope: Envelope,
    max_frame_bytes: usize,
    max_queued_prompts: usize,
    max_prompt_bytes: usize,
    max_connections: usize,
    turns_per_minute: u32,
    idle_timeout_secs: u64,
    ping_interval_secs: u64,
    turn_timeout_secs: u64,
    shutdown_grace_secs: u64,
    write_timeout_secs: u64,
    lease_ms: u64,
    lease_renew_ms: u64,
    store_timeout_ms: u64,
    max_turn_events: u64,
    allowed_origins: Vec<String>,
    header_read_timeout_secs: u64,
    max_pending_connections: usize,
    max_pending_per_address: usize,
    max_connections_per_key: usize,
    max_queued_prompts_per_key: usize,
    max_history_bytes: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            envelope: Envelope::default(),
            max_frame_bytes: 65_536,
            max_queued_prompts: 8,
            max_prompt_bytes: 65_536,
            max_connections: 10_000,
            turns_per_minute: 0,
            idle_timeout_secs: 600,
            ping_interval_secs: 30,
            turn_timeout_secs: 600,
            shutdown_grace_secs: 30,
            write_timeout_secs: 30,
            lease_ms: 8_000,
            lease_renew_ms: 2_000,
            store_timeout_ms: 5_000,
            max_turn_events: 1_000_000,
            allowed_origins: Vec::new(),
            header_read_timeout_secs: 10,
            max_pending_connections: 1_024,
            max_pending_per_address: 64,
            max_connections_per_key: 1_000,
            max_queued_prompts_per_key: 256,
            max_history_bytes: 16 << 20,
        }
    }
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
    key: Option<String>,
    key_env: Option<String>,
    #[serde(default)]
    admin: bool,
}

fn default_listen() -> String {
    "127.0.0.1:3000".to_owned()
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
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// How frames are wrapped.
    pub envelope: Envelope,
    /// Largest client frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Prompts a session may queue behind its running turn.
    pub max_queued_prompts: usize,
    /// Longest prompt accepted, in bytes of text.
    pub max_prompt_bytes: usize,
    /// Most WebSocket connections served at once.
    pub max_connections: usize,
    /// Turns each API key may start per minute; 0: no limit.
    pub turns_per_minute: u32,
    /// Close a connection with no client message and no turn for this long; 0: never.
    pub idle_timeout_secs: u64,
    /// Ping each connection this often, and close it when a ping goes
    /// unanswered for as long; 0: no pings.
    pub ping_interval_secs: u64,
    /// Longest a turn may run; 0: no limit.
    pub turn_timeout_secs: u64,
    /// On shutdown, how long running turns may go on before they are cancelled.
    pub shutdown_grace_secs: u64,
    /// Drop a connection whose client takes no frame for this long while
    /// the host has frames for it; at least 1.
    pub write_timeout_secs: u64,
    /// How long a turn's lease on a shared store holds without renewal, as
    /// another host counts it: a session whose host died is served again
    /// after at most this long.
    pub lease_ms: u64,
    /// How often a running turn renews its lease; a turn that gets no
    /// renewal taken for `lease_ms - lease_renew_ms` stops (`lease_lost`).
    pub lease_renew_ms: u64,
    /// The longest any store call may take before it fails.
    pub store_timeout_ms: u64,
    /// Sequence numbers each turn reserves: the most events a turn may send.
    pub max_turn_events: u64,
    /// Browser origins (`scheme://host[:port]`, `null`, or `*` for any)
    /// allowed besides pages served from this machine's loopback names; a
    /// request whose `Origin` is none of them is refused (see
    /// [`crate::origins`]).
    pub allowed_origins: Vec<String>,
    /// How long a client may take to send a request's headers (and an
    /// idle keep-alive connection may wait for its next request).
    pub header_read_timeout_secs: u64,
    /// Most connections accepted and not (yet) upgraded to a session socket.
    pub max_pending_connections: usize,
    /// Most such connections from one IP address.
    pub max_pending_per_address: usize,
    /// Most session sockets one API key (in open mode: one client address)
    /// may hold open.
    pub max_connections_per_key: usize,
    /// Most prompts one API key (in open mode: one client address) may have
    /// waiting behind running turns, over all its connections.
    pub max_queued_prompts_per_key: usize,
    /// Largest a session's history may grow, in bytes of its messages as
    /// JSON; a prompt that would pass it is refused (`history_full`).
    pub max_history_bytes: usize,
}

impl ServerConfig {
    /// How the turn core runs turns under this config.
    pub fn turn_settings(&self) -> crate::core::TurnSettings {
        use std::time::Duration;
        crate::core::TurnSettings {
            lease: Duration::from_millis(self.lease_ms),
            renew: Duration::from_millis(self.lease_renew_ms),
            store_timeout: Duration::from_millis(self.store_timeout_ms),
            turn_timeout: (self.turn_timeout_secs > 0)
                .then(|| Duration::from_secs(self.turn_timeout_secs)),
            max_turn_events: self.max_turn_events,
            max_history_bytes: self.max_history_bytes,
        }
    }
}

/// An API key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiKey {
    /// Its name: sessions it creates are owned by this id.
    pub id: String,
    /// The secret itself; never serialized.
    #[serde(skip_serializing)]
    pub secret: String,
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
        let raw: RawConfig = toml::from_str(text).map_err(|err| err.to_string())?;
        let mut problems = Vec::new();

        let listen = raw
            .server
            .listen
            .parse::<SocketAddr>()
            .unwrap_or_else(|err| {
                problems.push(format!(
                    "server.listen: `{}` is not an address like 127.0.0.1:3000 ({err})",
                    raw.server.listen
                ));
                SocketAddr::from(([127, 0, 0, 1], 0))
            });
        // Sizes and counts: a frame up to 64 MiB, a queue and a connection
        // count that fit in memory.
        for (key, value, range) in [
            ("max_frame_bytes", raw.server.max_frame_bytes, 16..=64 << 20),
            (
                "max_queued_prompts",
                raw.server.max_queued_prompts,
                1..=1024,
            ),
            (
                "max_prompt_bytes",
                raw.server.max_prompt_bytes,
                1..=64 << 20,
            ),
            ("max_connections", raw.server.max_connections, 1..=1_000_000),
            (
                "max_pending_connections",
                raw.server.max_pending_connections,
                1..=1_000_000,
            ),
            (
                "max_pending_per_address",
                raw.server.max_pending_per_address,
                1..=1_000_000,
            ),
            (
                "max_connections_per_key",
                raw.server.max_connections_per_key,
                1..=1_000_000,
            ),
            (
                "max_queued_prompts_per_key",
                raw.server.max_queued_prompts_per_key,
                1..=1_000_000,
            ),
            (
                "max_history_bytes",
                raw.server.max_history_bytes,
                1024..=1 << 30,
            ),
        ] {
            if !range.contains(&value) {
                problems.push(format!(
                    "server.{key}: {value} is out of range ({}-{})",
                    range.start(),
                    range.end()
                ));
            }
        }
        // Durations in seconds: at most a year (and so no overflow when the
        // host counts them in milliseconds).
        const YEAR_SECS: u64 = 365 * 24 * 3600;
        for (key, value) in [
            ("idle_timeout_secs", raw.server.idle_timeout_secs),
            ("ping_interval_secs", raw.server.ping_interval_secs),
            ("turn_timeout_secs", raw.server.turn_timeout_secs),
            ("shutdown_grace_secs", raw.server.shutdown_grace_secs),
            ("write_timeout_secs", raw.server.write_timeout_secs),
            (
                "header_read_timeout_secs",
                raw.server.header_read_timeout_secs,
            ),
        ] {
            if value > YEAR_SECS {
                problems.push(format!(
                    "server.{key}: {value} is more than a year ({YEAR_SECS} s)"
                ));
            }
        }
        for (key, value, range) in [
            ("lease_ms", raw.server.lease_ms, 100..=600_000),
            ("lease_renew_ms", raw.server.lease_renew_ms, 50..=300_000),
            (
                "store_timeout_ms",
                raw.server.store_timeout_ms,
                10..=600_000,
            ),
            (
                "max_turn_events",
                raw.server.max_turn_events,
                16..=1_000_000_000,
            ),
        ] {
            if !range.contains(&value) {
                problems.push(format!(
                    "server.{key}: {value} is out of range ({}-{})",
                    range.start(),
                    range.end()
                ));
            }
        }
        if raw.server.header_read_timeout_secs == 0 {
            problems.push(
                "server.header_read_timeout_secs: must be at least 1 (a client that never \
                 finishes its headers would hold its connection forever)"
                    .to_owned(),
            );
        }
        if raw.server.lease_renew_ms * 2 > raw.server.lease_ms {
            problems.push(format!(
                "server.lease_renew_ms: {} must be at most half of server.lease_ms ({}), so a \
                 turn renews its lease at least twice before it could run out",
                raw.server.lease_renew_ms, raw.server.lease_ms
            ));
        }
        for origin in &raw.server.allowed_origins {
            if let Err(why) = crate::origins::check_entry(origin) {
                problems.push(format!("server.allowed_origins: `{origin}` {why}"));
            }
        }
        let auth = auth(raw.auth, &mut problems);
        let models = adapters("models", raw.models, &mut problems);
        let stores = adapters("stores", raw.stores, &mut problems);
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
        let dir = base.join(raw.plugins.dir);
        let staging_dir = match raw.plugins.staging_dir {
            Some(dir) => base.join(dir),
            None => default_staging_dir(),
        };
        let config = Config {
            base_dir: base.to_owned(),
            server: ServerConfig {
                listen,
                envelope: raw.server.envelope,
                max_frame_bytes: raw.server.max_frame_bytes,
                max_queued_prompts: raw.server.max_queued_prompts,
                max_prompt_bytes: raw.server.max_prompt_bytes,
                max_connections: raw.server.max_connections,
                turns_per_minute: raw.server.turns_per_minute,
                idle_timeout_secs: raw.server.idle_timeout_secs,
                ping_interval_secs: raw.server.ping_interval_secs,
                turn_timeout_secs: raw.server.turn_timeout_secs,
                shutdown_grace_secs: raw.server.shutdown_grace_secs,
                write_timeout_secs: raw.server.write_timeout_secs.max(1),
                lease_ms: raw.server.lease_ms,
                lease_renew_ms: raw.server.lease_renew_ms,
                store_timeout_ms: raw.server.store_timeout_ms,
                max_turn_events: raw.server.max_turn_events,
                allowed_origins: raw.server.allowed_origins,
                header_read_timeout_secs: raw.server.header_read_timeout_secs,
                max_pending_connections: raw.server.max_pending_connections,
                max_pending_per_address: raw.server.max_pending_per_address,
                max_connections_per_key: raw.server.max_connections_per_key,
                max_queued_prompts_per_key: raw.server.max_queued_prompts_per_key,
                max_history_bytes: raw.server.max_history_bytes,
            },
            auth,
            plugins: PluginsConfig {
                dir,
                staging_dir,
                watch: raw.plugins.watch,
                debounce_ms: raw.plugins.debounce_ms,
            },
            default_model: raw.defaults.model,
            default_store: raw.defaults.store,
            models,
            stores,
        };
        Ok((config, problems))
    }
}

/// Shortest API key accepted.
const MIN_KEY_LEN: usize = 16;

fn auth(raw: RawAuth, problems: &mut Vec<String>) -> AuthConfig {
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
        let secret = match (key.key, key.key_env) {
            (Some(secret), None) => secret,
            (None, Some(var)) => match std::env::var(&var) {
                Ok(secret) => secret,
                Err(_) => {
                    problems.push(format!("{at}: key_env names `{var}`, which is not set"));
                    continue;
                }
            },
            _ => {
                problems.push(format!("{at}: give exactly one of `key` and `key_env`"));
                continue;
            }
        };
        if secret.len() < MIN_KEY_LEN {
            problems.push(format!(
                "{at}: the key is shorter than {MIN_KEY_LEN} characters"
            ));
        }
        keys.push(ApiKey {
            id: key.id,
            secret,
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
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:0"
        envelope = "nested"

        [plugins]
        dir = "plugins"

        [defaults]
        model = "echo"
        store = "memory"

        [models.echo]
        plugin = "echo"
        settings = { delay_ms = 20, nested = { a = [1, 2] } }

        [stores.memory]
        plugin = "memory"
    "#;

    #[test]
    fn a_good_config_resolves_paths_and_settings() {
        let config = Config::parse(GOOD, Path::new("/etc/llm")).expect("valid");
        assert_eq!(config.plugins.dir, PathBuf::from("/etc/llm/plugins"));
        assert_eq!(config.server.envelope, Envelope::Nested);
        assert_eq!(config.server.max_frame_bytes, 65_536);
        assert_eq!(
            config.models["echo"].settings,
            serde_json::json!({"delay_ms": 20, "nested": {"a": [1, 2]}})
        );
        assert_eq!(config.stores["memory"].settings, serde_json::json!({}));
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = GOOD.replace("envelope = \"nested\"", "envelop = \"nested\"");
        let err = Config::parse(&text, Path::new(".")).expect_err("typo");
        assert!(err.contains("envelop"), "{err}");
    }

    #[test]
    fn bad_values_are_named_together() {
        let text = GOOD
            .replace("127.0.0.1:0", "localhost")
            .replace("model = \"echo\"", "model = \"gpt\"");
        let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
        assert!(err.contains("server.listen"), "{err}");
        assert!(err.contains("defaults.model: `gpt`"), "{err}");
    }

    #[test]
    fn a_bad_envelope_is_refused() {
        let text = GOOD.replace("\"nested\"", "\"deep\"");
        let err = Config::parse(&text, Path::new(".")).expect_err("bad enum");
        assert!(err.contains("deep"), "{err}");
    }

    #[test]
    fn numbers_out_of_range_are_named() {
        let text = GOOD.replace(
            "envelope = \"nested\"",
            "envelope = \"nested\"\nidle_timeout_secs = 18446744073709552\n\
             max_queued_prompts = 100000000",
        );
        let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
        assert!(
            err.contains("server.idle_timeout_secs: 18446744073709552 is more than a year"),
            "{err}"
        );
        assert!(
            err.contains("server.max_queued_prompts: 100000000 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn lease_and_origin_settings_are_checked() {
        let text = GOOD.replace(
            "envelope = \"nested\"",
            "envelope = \"nested\"\nlease_ms = 1000\nlease_renew_ms = 800\n\
             store_timeout_ms = 0\nallowed_origins = [\"chat.example.com\", \"*\"]",
        );
        let err = Config::parse(&text, Path::new(".")).expect_err("bad values");
        assert!(err.contains("server.lease_renew_ms: 800"), "{err}");
        assert!(
            err.contains("server.store_timeout_ms: 0 is out of range"),
            "{err}"
        );
        assert!(
            err.contains("server.allowed_origins: `chat.example.com`"),
            "{err}"
        );
        assert!(!err.contains("server.allowed_origins: `*`"), "{err}");
    }
}
