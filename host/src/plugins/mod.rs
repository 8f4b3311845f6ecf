//! The plugin side of the host: everything that knows the plugin ABI.
//!
//! - [`loader`]: finding, staging (content-hashed copies) and loading plugin
//!   libraries; ABI and version checks with readable errors.
//! - [`runtime`]: the active set of adapters built from config and plugins,
//!   swapped whole.
//! - [`ports`]: the turn core's store and model ports over the FFI adapters.
//! - [`reload`]: what a reload changed, and what sessions are told.

pub mod loader;
pub mod ports;
pub mod reload;
pub mod runtime;
