//! The plugin contract of llm-host, the only crate a plugin depends on.
//!
//! A plugin is a shared library (`crate-type = ["cdylib", "rlib"]`) that
//! provides model adapters, store adapters, or both. It implements [`Plugin`]
//! and exports it with [`export_plugin!`]. A whole model plugin, which
//! answers the prompt back word by word:
//!
//! ```
//! use llm_host_plugin_api::{
//!     self as api, FinishReason, Kinds, Model, ModelAdapterBox, ModelRequest, Plugin,
//!     PluginError, Sink,
//! };
//!
//! /// The `settings` of its `[models.NAME]` entry in the host's config.toml.
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)] // a typo is an error naming the key
//! struct Settings {
//!     #[serde(default)]
//!     shout: bool,
//! }
//!
//! /// The model: one value per `[models.NAME]` entry, called from many threads.
//! struct Parrot {
//!     shout: bool,
//! }
//!
//! impl Model for Parrot {
//!     fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError> {
//!         let prompt = request.messages.last().map_or("", |m| m.content.as_str());
//!         let answer = if self.shout { prompt.to_uppercase() } else { prompt.to_owned() };
//!         sink.start("", "parrot");
//!         for word in answer.split_inclusive(' ') {
//!             if sink.text(word).is_stop() {
//!                 return Ok(()); // cancelled: return at once, send nothing more
//!             }
//!         }
//!         sink.end(FinishReason::STOP);
//!         Ok(())
//!     }
//! }
//!
//! /// The plugin: its name in config.toml (`plugin = "parrot"`) and constructors.
//! pub struct ParrotPlugin;
//!
//! impl Plugin for ParrotPlugin {
//!     const NAME: &'static str = "parrot";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const DESCRIPTION: &'static str = "answers the prompt back";
//!     const KINDS: Kinds = Kinds::MODEL;
//!
//!     fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
//!         let settings: Settings = api::parse_settings(settings)?;
//!         Ok(api::model_adapter(Parrot { shout: settings.shout }))
//!     }
//!     // `new_store` is not overridden: it answers `ErrorKind::UNSUPPORTED`.
//! }
//!
//! // The library's root module, which the host loads. Once, at the crate root.
//! api::export_plugin!(ParrotPlugin);
//!
//! # fn main() {
//! // What the host does with the entry's settings:
//! assert!(ParrotPlugin::new_model(r#"{"shout": true}"#).is_ok());
//! let Err(err) = ParrotPlugin::new_model(r#"{"shout": "yes"}"#) else {
//!     panic!("a string is not a bool");
//! };
//! assert_eq!(err.kind, api::ErrorKind::INVALID_SETTINGS);
//! assert!(err.message.starts_with("shout: invalid type: string"), "{err}");
//! # }
//! ```
//!
//! Build it with `cargo build --release` and check the library as the host
//! would load it: `llm-host check target/release/libNAME.so`.
//! `llm-host new-plugin NAME --kind model|store` writes a crate like this one,
//! with tests and the conformance suite; PLUGIN-GUIDE.md in llm-host's
//! repository is the whole contract, in prose.
//!
//! # Depending on it
//!
//! This crate is not on a registry yet. Depend on it by path, on the
//! `plugin-api/` of an llm-host checkout, or by git:
//!
//! ```toml
//! [dependencies]
//! llm-host-plugin-api = { path = "../llm-host/plugin-api" }
//! # or: llm-host-plugin-api = { git = "URL of the llm-host repository", rev = "COMMIT" }
//! ```
//!
//! Build against a plugin-api with the host's `0.minor`, at least as new as
//! the host's (see [Compatibility](#compatibility)).
//!
//! # Layout
//!
//! - [`PluginMod`]: the root module the host loads (info, init, constructors).
//! - [`model`]: [`ModelAdapter`], the [`EventSink`] it streams into, and the
//!   request types; [`Model`] is the Rust-side trait to implement.
//! - [`steps`]: turns run step by step on the host's workers instead of a
//!   thread each ([`SteppedModel`]), for models that never block.
//! - [`store`]: [`StoreAdapter`] with versioned conditional saves; [`Store`]
//!   is the Rust-side trait.
//! - [`host`]: the [`HostApi`] given at init (logging) and the log macros.
//! - [`mod@guard`]: turns panics into error values; every entry point runs in
//!   it.
//! - [`RString`], [`RVec`], [`ROption`], [`RStr`], [`RResult`]: the FFI-safe
//!   standard types of [`abi_stable`] that the contract's types are made of
//!   (see [below](#the-ffi-safe-types)).
//!
//! # The FFI-safe types
//!
//! Values that cross the boundary are made of abi_stable's FFI-safe
//! counterparts of the standard types, because the host and each plugin have
//! a std and an allocator of their own. They are re-exported here, so a
//! plugin needs no abi_stable dependency of its own. The Rust-side traits
//! ([`Model`], [`Store`], [`SteppedModel`]) take and give `&str`, `String`
//! and `Option` wherever they can; where you do meet one, it converts:
//!
//! ```
//! use llm_host_plugin_api::{ROption, RStr, RString, RVec};
//!
//! let owner: RString = "key-1".into(); // from &str or String
//! let back: String = owner.clone().into_string(); // or String::from(owner)
//! assert_eq!(owner.as_str(), "key-1"); // and it derefs to &str
//!
//! let ids: RVec<RString> = vec!["a".into(), "b".into()].into(); // from a Vec
//! let ids: Vec<String> = ids.into_iter().map(RString::into_string).collect();
//! assert_eq!(ids, ["a", "b"]);
//!
//! let next: ROption<RString> = ROption::from(Some(RString::from("b"))); // from an Option
//! let next: Option<String> = next.into_option().map(RString::into_string);
//! assert_eq!(next.as_deref(), Some("b"));
//!
//! let borrowed: RStr<'_> = "a".into(); // a borrowed &str, for calls into adapters
//! assert_eq!(borrowed.as_str(), "a");
//! ```
//!
//! The store's types have constructors that take plain Rust values:
//! [`StoredSession::new`], [`SessionPage::new`] and [`SessionPage::from_ids`].
//!
//! # Compatibility
//!
//! The host checks, when it loads a library, that it was built against a
//! plugin-api with the same `0.minor` version and a compatible layout of every
//! type reachable from [`PluginMod`]. A library built against an older patch
//! release loads in a newer host, and one built against a newer patch
//! release loads in an older host as far as abi_stable allows (see the table
//! in PLUGIN-GUIDE.md, section 9). A change that breaks plugins built against
//! an earlier contract of the same `0.minor` is a bug.
//!
//! # The evolution rule
//!
//! Every type that crosses the boundary says on itself how it may change;
//! these are the rules behind those notes.
//!
//! 1. **Nothing changes in place.** No field, method or parameter is removed,
//!    reordered, renamed or retyped (parameter names are part of the layout
//!    abi_stable checks); no `#[repr]` changes; traits get no new marker
//!    supertraits. The `#[repr(C)]` structs ([`PluginInfo`], [`Usage`],
//!    [`StoredSession`], [`ListQuery`], [`SessionPage`], [`PluginError`],
//!    [`Step`]) and [`Flow`] never change at all.
//! 2. **Only appends.** Root module fields go after [`PluginMod`]'s last;
//!    trait methods ([`EventSink`], [`ModelAdapter`], [`StoreAdapter`],
//!    [`TurnStepper`], [`TurnWaker`], [`HostApi`]) go at the end of their
//!    trait, **each with a default body**: the default answers whenever the
//!    other side's build lacks the method (a host calling an older plugin's
//!    adapter, a plugin calling an older host's sink). The `u8` newtypes get
//!    new constants and [`Kinds`] new bits, never reused; JSON types get new
//!    optional fields with defaults.
//! 3. **`#[sabi(last_prefix_field)]` stays put.** abi_stable refuses a
//!    library whose prefix ends elsewhere than the host's ("prefix-types
//!    have a different prefix"), in both directions, and nothing a later
//!    release does can make an older host accept it. (0.1.0 moved it once,
//!    in [`HostApi`] and [`StoreAdapter`]: hosts of the first 0.1.0 release
//!    refuse every plugin built since.) A new `0.minor` puts it on the last
//!    field or method of its first release.
//! 4. **An append freezes the layout it replaces.** abi_stable lets a library
//!    have more fields than the host, never fewer ("too many fields"), so
//!    every append would shut out the plugins built before it. The release
//!    that appends to any type reachable from [`PluginMod`] first copies the
//!    layout it replaces into [`compat`] (see there), the host gains an
//!    adapter that drives libraries of that layout through it, and a fixture
//!    plugin built against the vendored older plugin-api proves they load and
//!    serve (`tests/fixtures/contract-0.1.0` in llm-host's repository). Such a
//!    release bumps the patch version.
//! 5. A change that cannot follow these rules is a new `0.minor`: every plugin
//!    must be rebuilt, and the host refuses the old ones with a message that
//!    says so.
//!
//! What never crosses the boundary is not part of the layout: inherent
//! methods and helper functions written in plain Rust (such as
//! [`StoredSession::new`] or [`parse_settings`]), documentation and
//! re-exports may be added in any release.

#![deny(missing_docs)]
// abi_stable's `#[sabi_trait]` expands to impls inside a const block.
#![allow(non_local_definitions)]

pub mod compat;
pub mod error;
pub mod guard;
pub mod host;
pub mod model;
pub mod steps;
pub mod store;

use std::fmt;

use abi_stable::{
    declare_root_module_statics, library::RootModule, package_version_strings,
    prefix_type::PrefixTypeTrait, sabi_types::VersionStrings, StableAbi,
};
use serde::de::DeserializeOwned;

pub use error::{ErrorKind, PluginError};
pub use guard::guard;
pub use host::{HostApi, HostApiBox, HostApi_TO, LogLevel};
pub use model::{
    model_adapter, EventSink, EventSinkRef, EventSink_TO, FinishReason, Flow, Message, Model,
    ModelAdapter, ModelAdapterBox, ModelAdapter_TO, ModelRequest, Role, Sink, ToolCall, ToolSpec,
    TurnParams, Usage,
};
pub use steps::{
    stepped_model_adapter, Next, Step, SteppedModel, Steps, TurnStepper, TurnStepperBox,
    TurnStepper_TO, TurnWaker, TurnWakerBox, TurnWaker_TO, Waker,
};
pub use store::{
    store_adapter, ListQuery, SaveOutcome, SessionPage, Store, StoreAdapter, StoreAdapterBox,
    StoreAdapter_TO, StoredSession,
};

/// abi_stable 0.11, the crate the contract's FFI types come from, at the
/// version the host uses. Name it from here (`llm_host_plugin_api::abi_stable`)
/// rather than as a dependency of your own: a library built with another
/// abi_stable `0.minor` is refused.
pub use abi_stable;
/// The FFI-safe standard types the contract is made of; see
/// [the crate docs](crate#the-ffi-safe-types) for their conversions.
pub use abi_stable::std_types::{ROption, RResult, RStr, RString, RVec};
/// The JSON library the contract uses, for plugins that need no other.
pub use serde_json;

/// The version of this crate, which the host compares with the one a plugin
/// was built against.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Stable `code` values for model error events. Adapters may use others; these
/// are the ones clients can rely on.
pub mod codes {
    /// The provider refused the credentials (401, 403).
    pub const AUTH: &str = "auth";
    /// The model or endpoint does not exist (404).
    pub const NOT_FOUND: &str = "not_found";
    /// Too many requests (429) after the retries allowed.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The provider failed (5xx) after the retries allowed.
    pub const UPSTREAM: &str = "upstream_error";
    /// The provider answered something that is not its documented format.
    pub const BAD_RESPONSE: &str = "bad_response";
    /// The provider could not be reached.
    pub const CONNECTION: &str = "connection";
    /// The stream stopped before it was complete.
    pub const INTERRUPTED: &str = "interrupted";
    /// No answer within the configured time.
    pub const TIMEOUT: &str = "timeout";
    /// The request was refused as invalid (400, 422).
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// A deliberate failure (test and demo adapters).
    pub const INJECTED: &str = "injected_failure";
}

/// Which adapter kinds a plugin provides, as bit flags.
///
/// Evolution rule: new kinds take new bits; unknown bits are ignored.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kinds(pub u32);

impl Kinds {
    /// Provides model adapters.
    pub const MODEL: Kinds = Kinds(1);
    /// Provides store adapters.
    pub const STORE: Kinds = Kinds(2);
    /// Provides both.
    pub const MODEL_AND_STORE: Kinds = Kinds(3);

    /// Whether every kind of `other` is in `self`.
    pub fn contains(self, other: Kinds) -> bool {
        self.0 & other.0 == other.0
    }

    /// The kinds' names, e.g. `["model", "store"]`.
    pub fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.contains(Kinds::MODEL) {
            names.push("model");
        }
        if self.contains(Kinds::STORE) {
            names.push("store");
        }
        names
    }
}

impl fmt::Debug for Kinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join("+"))
    }
}

/// What a plugin says about itself.
///
/// Evolution rule: this struct never changes layout.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginInfo {
    /// The name operators write in config.toml (`plugin = "echo"`).
    pub name: RString,
    /// The plugin's own version.
    pub version: RString,
    /// One line on what it is.
    pub description: RString,
    /// Which adapters it provides.
    pub kinds: Kinds,
}

/// The root module every plugin library exports. Made by [`export_plugin!`].
///
/// Evolution rule: fields are only appended after the last one, and
/// `#[sabi(last_prefix_field)]` stays on `new_store`. An append, here or in
/// any trait reachable from here, freezes the layout it replaces in
/// [`compat`] (the crate's evolution rule, 4), so that older plugins keep
/// loading.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    /// The plugin's name, version and kinds.
    pub info: extern "C" fn() -> PluginInfo,

    /// Called once after loading, before any constructor, with the host's API.
    pub init: extern "C" fn(host: HostApiBox) -> RResult<(), PluginError>,

    /// Builds a model adapter from its settings (a JSON object's text).
    pub new_model: extern "C" fn(settings: RStr<'_>) -> RResult<ModelAdapterBox, PluginError>,

    /// Builds a store adapter from its settings (a JSON object's text).
    #[sabi(last_prefix_field)]
    pub new_store: extern "C" fn(settings: RStr<'_>) -> RResult<StoreAdapterBox, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "llm_host_plugin";
    const NAME: &'static str = "llm-host plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// A plugin, the Rust way: implement it on a unit struct and export it with
/// [`export_plugin!`]. Constructors you do not override answer
/// [`ErrorKind::UNSUPPORTED`].
pub trait Plugin: 'static {
    /// The name operators write in config.toml.
    const NAME: &'static str;
    /// The plugin's version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// One line on what it is.
    const DESCRIPTION: &'static str = "";
    /// Which adapters it provides.
    const KINDS: Kinds;

    /// Runs once after loading, after the host's logger is in place.
    fn init() -> Result<(), PluginError> {
        Ok(())
    }

    /// Builds a model adapter; `settings` is a JSON object's text (see
    /// [`parse_settings`]).
    fn new_model(settings: &str) -> Result<ModelAdapterBox, PluginError> {
        let _ = settings;
        Err(PluginError::new(
            ErrorKind::UNSUPPORTED,
            format!("plugin `{}` provides no model adapter", Self::NAME),
        ))
    }

    /// Builds a store adapter; `settings` is a JSON object's text.
    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        let _ = settings;
        Err(PluginError::new(
            ErrorKind::UNSUPPORTED,
            format!("plugin `{}` provides no store adapter", Self::NAME),
        ))
    }
}

/// Parses adapter settings into `T`, with an error ([`ErrorKind::INVALID_SETTINGS`])
/// that names the bad key by its path: `delay_ms: invalid type: string "x",
/// expected u64`, `retry.delay_ms: ...` for a nested one. Use
/// `#[serde(deny_unknown_fields)]` on `T` so typos are reported
/// (`dela_ms: unknown field ...`). Empty settings parse as `{}`.
pub fn parse_settings<T: DeserializeOwned>(settings: &str) -> Result<T, PluginError> {
    let text = if settings.trim().is_empty() {
        "{}"
    } else {
        settings
    };
    let mut json = serde_json::Deserializer::from_str(text);
    let parsed = serde_path_to_error::deserialize(&mut json).map_err(|err| {
        let path = err.path().to_string();
        let err = settings_error(&err.into_inner());
        PluginError::invalid_settings(if path == "." {
            err
        } else {
            format!("{path}: {err}")
        })
    })?;
    json.end()
        .map_err(|err| PluginError::invalid_settings(settings_error(&err)))?;
    Ok(parsed)
}

/// serde_json's message for a value it could not take, without its
/// `at line L column C`: the host writes the settings' JSON itself (from
/// config.toml), so the position would only mislead. Syntax errors keep it.
fn settings_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    if !err.is_data() {
        return text;
    }
    let position = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&position) {
        Some(message) => message.to_owned(),
        None => text,
    }
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    /// The name of the symbol a library exports its root module under; the
    /// host looks for it. Checked against abi_stable's own in a test.
    pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

    extern "C" fn info<P: Plugin>() -> PluginInfo {
        PluginInfo {
            name: P::NAME.into(),
            version: P::VERSION.into(),
            description: P::DESCRIPTION.into(),
            kinds: P::KINDS,
        }
    }

    extern "C" fn init<P: Plugin>(host_api: HostApiBox) -> RResult<(), PluginError> {
        guard(|| {
            host::set_host(host_api);
            std::panic::set_hook(Box::new(|panic| {
                let location = panic
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let message = guard::panic_message(panic.payload());
                host::log(
                    LogLevel::ERROR,
                    "panic",
                    format_args!("plugin panicked{location}: {message}"),
                );
            }));
            P::init()
        })
    }

    extern "C" fn new_model<P: Plugin>(
        settings: RStr<'_>,
    ) -> RResult<ModelAdapterBox, PluginError> {
        guard(|| P::new_model(settings.as_str()))
    }

    extern "C" fn new_store<P: Plugin>(
        settings: RStr<'_>,
    ) -> RResult<StoreAdapterBox, PluginError> {
        guard(|| P::new_store(settings.as_str()))
    }

    /// The root module of plugin `P`.
    pub fn root_module<P: Plugin>() -> PluginModRef {
        PluginMod {
            info: info::<P>,
            init: init::<P>,
            new_model: new_model::<P>,
            new_store: new_store::<P>,
        }
        .leak_into_prefix()
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as this library's root
/// module. Use it once, at the crate root of a `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        #[no_mangle]
        pub static _1as_0lib_1header_0root_bmodule_bloader:
            $crate::abi_stable::library::LibHeader = {
            extern "C" fn __llm_host_root_module() -> $crate::abi_stable::library::RootModuleResult
            {
                $crate::abi_stable::library::__call_root_module_loader(|| {
                    $crate::__private::root_module::<$plugin>()
                })
            }
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModRef>(
                    __llm_host_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exported_symbol_is_the_one_abi_stable_looks_for() {
        assert_eq!(
            __private::ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }

    #[test]
    fn settings_errors_name_the_key() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Settings {
            delay_ms: u64,
        }
        let err = parse_settings::<Settings>(r#"{"dela_ms": 3}"#).expect_err("typo");
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS);
        assert!(err.message.contains("dela_ms"), "{}", err.message);
        assert!(parse_settings::<Settings>(r#"{"delay_ms": 3}"#).is_ok());
        // A value of the wrong type names its key, nested keys by their path.
        let err = parse_settings::<Settings>(r#"{"delay_ms": "3"}"#).expect_err("a string");
        // Without a position in JSON the operator never wrote.
        assert_eq!(
            err.message.as_str(),
            r#"delay_ms: invalid type: string "3", expected u64"#
        );
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Outer {
            retry: Settings,
        }
        let err = parse_settings::<Outer>(r#"{"retry": {"delay_ms": -1}}"#).expect_err("negative");
        assert!(
            err.message.starts_with("retry.delay_ms: "),
            "{}",
            err.message
        );
        let err = parse_settings::<Settings>(r#"{"delay_ms": 3} x"#).expect_err("trailing");
        assert!(err.message.contains("trailing"), "{}", err.message);
    }

    #[test]
    fn requests_ignore_fields_they_do_not_know() {
        let request: ModelRequest = serde_json::from_str(
            r#"{"sessionId":"s","messages":[{"role":"user","content":"hi","future":1}],
                "params":{"temperature":0.5,"maxTokens":9,"vendorThing":true},"later":{}}"#,
        )
        .expect("a request from a newer host parses");
        assert_eq!(request.messages[0].content, "hi");
        assert_eq!(request.params.max_tokens, Some(9));
        assert_eq!(request.params.extra["vendorThing"], serde_json::json!(true));
    }
}
