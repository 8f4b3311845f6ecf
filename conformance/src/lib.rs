//! Conformance suites for llm-host plugins.
//!
//! A plugin author runs these against their own adapter to learn whether it
//! keeps the contract the host relies on. The suites drive the adapter
//! through the same FFI trait object the host uses ([`StoreAdapterBox`]), so
//! what passes here behaves the same once the library is loaded by the host.
//!
//! ```no_run
//! use llm_host_conformance::store;
//! use llm_host_plugin_api::Plugin;
//!
//! # struct MyPlugin;
//! # impl Plugin for MyPlugin {
//! #     const NAME: &'static str = "mine";
//! #     const VERSION: &'static str = "0.1.0";
//! #     const KINDS: llm_host_plugin_api::Kinds = llm_host_plugin_api::Kinds::STORE;
//! # }
//! #[test]
//! fn my_store_conforms() {
//!     store::assert_plugin_conforms::<MyPlugin>(r#"{"path": "/tmp/x"}"#);
//! }
//! ```
//!
//! [`model`] checks a model adapter (event order, cancel, errors, panics,
//! and for a stepped adapter its turns run in steps); [`store`] checks a
//! store adapter (conditional saves, round trips, listings, races between
//! threads, between two adapters of one store and between two processes,
//! and with a TTL given, expiry). Each check answers `PASS`, `FAIL`, `SKIP` (it does not apply,
//! with the reason) or, for a few model checks, `WARN`; only a failure fails
//! the `assert_*` functions. `llm-host check PATH.so` runs the same suites
//! against a built library.
//!
//! [`support`] has the small helpers such tests need: unique names per run,
//! and the skip-or-fail rule for tests that need a server.
//!
//! Like the plugin-api, this crate is not on a registry yet: depend on it by
//! path (`llm-host-conformance = { path = "../llm-host/conformance" }`, as a
//! dev-dependency) or by git, from the same checkout as your plugin-api.
//!
//! [`StoreAdapterBox`]: llm_host_plugin_api::StoreAdapterBox

#![warn(missing_docs)]

pub mod model;
pub mod store;
pub mod support;
