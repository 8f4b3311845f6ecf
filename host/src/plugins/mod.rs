//! The plugin side of the host: everything that knows the plugin ABI.
//!
//! - [`loader`]: scanning the plugin directory, loading the configured
//!   plugins; ABI and version checks with readable errors (worded in
//!   `load_errors.rs`, a module of the loader).
//! - [`library`]: reading a library file: who could have written it, and
//!   whether it is a whole plugin library.
//! - [`logger`]: the host API a plugin gets, and its log lines under a
//!   target of its own (`llm_host::plugin::NAME`).
//! - [`staging`]: the private staging directory and the content-hashed,
//!   verified copies that are loaded.
//! - [`probe`]: learning what a library is in a child process, so that no
//!   library the config does not name runs in the host.
//! - [`runtime`]: the active set of adapters built from config and plugins,
//!   swapped whole.
//! - [`ports`]: the turn core's store and model ports over the FFI adapters.
//! - [`reload`]: what a reload changed, and what sessions are told.
//! - [`isolated`]: model backends and stores whose plugin runs in a child
//!   process.

pub mod isolated;
pub mod library;
pub mod loader;
pub mod logger;
pub mod ports;
pub mod probe;
pub mod reload;
pub mod runtime;
pub mod staging;
