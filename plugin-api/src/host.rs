//! What the host gives a plugin at init: logging, and facts about the host.

use std::fmt;
use std::sync::OnceLock;

use abi_stable::{
    sabi_trait,
    std_types::{RBox, RStr, RString},
    StableAbi,
};

/// Severity of a log line or diagnostic.
///
/// A `u8` newtype so that unknown values from a newer peer are harmless.
/// Evolution rule: constants are only added, never renumbered.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogLevel(pub u8);

impl LogLevel {
    /// Something failed.
    pub const ERROR: LogLevel = LogLevel(1);
    /// Something is wrong but the work goes on.
    pub const WARN: LogLevel = LogLevel(2);
    /// A normal event worth an operator's attention.
    pub const INFO: LogLevel = LogLevel(3);
    /// Detail for debugging.
    pub const DEBUG: LogLevel = LogLevel(4);
    /// Very fine detail.
    pub const TRACE: LogLevel = LogLevel(5);

    /// Lowercase name: `error`, `warn`, `info`, `debug`, `trace`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ERROR => "error",
            Self::WARN => "warn",
            Self::INFO => "info",
            Self::DEBUG => "debug",
            _ => "trace",
        }
    }
}

impl fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Services the host offers to a plugin. The host implements it and hands one
/// to the plugin's `init`.
///
/// Evolution rule: methods are only appended at the end, each with a default
/// body, so a plugin built against a newer plugin-api still runs on an older
/// host (the default answers in place of the missing method);
/// `#[sabi(last_prefix_field)]` stays on `base_dir` (where 0.1.0 moved it
/// from `host_version`, a break [`compat`](crate::compat) repairs); the
/// release that appends freezes the layout it replaces in `compat` (the
/// crate's evolution rule).
#[sabi_trait]
pub trait HostApi: Send + Sync {
    /// Writes one log line through the host's logger. `target` names the
    /// plugin's module; the host prefixes the plugin's name.
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>);

    /// Whether a line at `level` would be written at all, so a plugin can skip
    /// formatting it.
    fn log_enabled(&self, level: LogLevel) -> bool;

    /// The host's own version, for diagnostics.
    fn host_version(&self) -> RString;

    /// The directory relative paths in settings are meant from: the one
    /// holding the host's config file.
    #[sabi(last_prefix_field)]
    fn base_dir(&self) -> RString;
}

/// A [`HostApi`] trait object as the host passes it.
pub type HostApiBox = HostApi_TO<'static, RBox<()>>;

static HOST: OnceLock<HostApiBox> = OnceLock::new();

/// Keeps the host's API for this plugin's lifetime. Called by the root module
/// that [`export_plugin!`](crate::export_plugin) makes; a second call is ignored.
pub fn set_host(host: HostApiBox) {
    let _ = HOST.set(host);
}

/// The host's API, once `init` has run.
pub fn host() -> Option<&'static HostApiBox> {
    HOST.get()
}

/// Resolves a path from settings: relative paths are taken from the host's
/// [`base_dir`](HostApi::base_dir) (before `init`, from the working directory).
pub fn resolve_path(path: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(path);
    match HOST.get() {
        Some(host) if path.is_relative() => {
            std::path::Path::new(host.base_dir().as_str()).join(path)
        }
        _ => path.to_owned(),
    }
}

/// Writes a log line through the host; before `init`, to stderr.
pub fn log(level: LogLevel, target: &str, message: fmt::Arguments<'_>) {
    match HOST.get() {
        Some(host) => {
            if host.log_enabled(level) {
                let text = message.to_string();
                host.log(level, target.into(), text.as_str().into());
            }
        }
        None => eprintln!("{} {target}: {message}", level.as_str()),
    }
}

/// Logs through the host at the given [`LogLevel`]:
/// `llm_host_plugin_api::log!(LogLevel::INFO, "loaded {n} rows")`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::host::log($level, module_path!(), format_args!($($arg)+))
    };
}

/// Logs an error through the host.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::ERROR, $($arg)+) };
}

/// Logs a warning through the host.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::WARN, $($arg)+) };
}

/// Logs an informational line through the host.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::INFO, $($arg)+) };
}

/// Logs a debug line through the host.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::DEBUG, $($arg)+) };
}
