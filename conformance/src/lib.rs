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
//!     store::assert_store_conforms(&|| MyPlugin::new_store(r#"{"path": "/tmp/x"}"#));
//! }
//! ```
//!
//! [`support`] has the small helpers such tests need: unique names per run,
//! and the skip-or-fail rule for tests that need a server.
//!
//! [`StoreAdapterBox`]: llm_host_plugin_api::StoreAdapterBox

#![warn(missing_docs)]

pub mod model;
pub mod store;
pub mod support;
