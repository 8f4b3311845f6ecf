//! The contract's earlier layouts, frozen, for hosts that load libraries built
//! against them. Plugins never use this module.
//!
//! # Why a host needs them
//!
//! When a host loads a library, abi_stable checks the layout of every type
//! reachable from the host's [`PluginMod`](crate::PluginMod) (the
//! *interface*) against the library's (the *implementation*). For prefix types
//! (the root module, and the vtable `#[sabi_trait]` makes for each trait) it
//! lets the library have **more** fields than the host, never fewer
//! (`abi_stability/abi_checking.rs`, `AbiChecker::check_fields`:
//! `(Ordering::Greater, _) => FieldCountMismatch`, "too many fields"), and
//! the `#[sabi(last_prefix_field)]` of both must sit on the same field
//! (`check_prefix_types`: "prefix-types have a different prefix").
//! `last_prefix_field` decides which fields the *accessors* may find missing
//! at run time; the load-time check does not look at it for the count. So
//! appending a method, even with a default body, makes every library built
//! before it fail a check against the new layout: a plugin built against an
//! older contract could never load in a newer host.
//!
//! A host therefore checks a library against today's layout first and, if
//! that fails and the library says it was built against an earlier version,
//! against each layout that version was released with, kept here under the
//! same type names (abi_stable compares a type's name, its package's name and
//! its `0.minor` version, not its module path). A library that matches one is
//! driven through that layout's types only: the host wraps its adapters into
//! today's trait objects, answering for the methods the layout lacks as their
//! default bodies do.
//!
//! # The rule
//!
//! A release that changes the layout of any type reachable from `PluginMod`
//! (it can only append: see each type's evolution rule) first freezes the
//! layout it replaces here, as a module `vX_Y_Z` (or a submodule per layout,
//! if one version number was released with several), holding a copy of
//! every prefix type that changed or refers to one that changed, down to
//! `PluginMod` itself, with the same names, field names, parameter names and
//! `#[sabi(last_prefix_field)]` placements; types that did not change are
//! taken from the crate as they are. The host adds an adapter for it, and a
//! fixture plugin built against the vendored old plugin-api proves it
//! (`tests/fixtures/contract-0.1.0`). A frozen module never changes again.

use abi_stable::{
    declare_root_module_statics, library::RootModule, package_version_strings, sabi_trait,
    sabi_types::VersionStrings, std_types::RBox, std_types::RResult, std_types::RStr, StableAbi,
};

use crate::{EventSinkRef, PluginError, PluginInfo};

/// plugin-api 0.1.0, released with three layouts (every later one appended
/// to the one before, or moved a `last_prefix_field`):
///
/// - [`initial`](v0_1_0::initial): as first released (commit 9a21da3);
/// - [`ping`](v0_1_0::ping): `HostApi::base_dir` and `StoreAdapter::ping` appended as
///   required methods, the `last_prefix_field` moved onto them (commit
///   7927f3a; also commit 43e095b, whose `StoreAdapter::blocks` the host
///   ignores);
/// - [`in_process`](v0_1_0::in_process): `StoreAdapter::in_process` appended (commit efb72fe),
///   the last before 0.1.1.
///
/// All three have the [`ModelAdapter`](v0_1_0::ModelAdapter) of before turns
/// in steps. 0.1.1
/// appended `ModelAdapter::stepped` and `ModelAdapter::start`.
pub mod v0_1_0 {
    use super::*;

    /// A model adapter of plugin-api 0.1.0: one generation per call, on a
    /// thread of the host's.
    #[sabi_trait]
    pub trait ModelAdapter: Send + Sync {
        /// See [`crate::ModelAdapter::generate`].
        #[sabi(last_prefix_field)]
        fn generate(&self, request: RStr<'_>, sink: EventSinkRef<'_>) -> RResult<(), PluginError>;
    }

    /// A 0.1.0 model adapter trait object.
    pub type ModelAdapterBox = ModelAdapter_TO<'static, RBox<()>>;

    /// plugin-api 0.1.0 as first released: `HostApi` ends at `host_version`,
    /// `StoreAdapter` at `list`.
    pub mod initial {
        use super::*;
        use crate::{ListQuery, LogLevel, SaveOutcome, SessionPage, StoredSession};
        use abi_stable::std_types::{ROption, RString};

        /// The host API of this layout; see [`crate::HostApi`].
        #[sabi_trait]
        pub trait HostApi: Send + Sync {
            /// See [`crate::HostApi::log`].
            fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>);

            /// See [`crate::HostApi::log_enabled`].
            fn log_enabled(&self, level: LogLevel) -> bool;

            /// See [`crate::HostApi::host_version`].
            #[sabi(last_prefix_field)]
            fn host_version(&self) -> RString;
        }

        /// A host API trait object of this layout.
        pub type HostApiBox = HostApi_TO<'static, RBox<()>>;

        /// The store adapter of this layout; see [`crate::StoreAdapter`].
        #[sabi_trait]
        pub trait StoreAdapter: Send + Sync {
            /// See [`crate::StoreAdapter::load`].
            fn load(&self, id: RStr<'_>) -> RResult<ROption<StoredSession>, PluginError>;

            /// See [`crate::StoreAdapter::save`].
            fn save(
                &self,
                id: RStr<'_>,
                expected_version: u64,
                owner: RStr<'_>,
                data: RStr<'_>,
            ) -> RResult<SaveOutcome, PluginError>;

            /// See [`crate::StoreAdapter::delete`].
            fn delete(&self, id: RStr<'_>) -> RResult<bool, PluginError>;

            /// See [`crate::StoreAdapter::list`].
            #[sabi(last_prefix_field)]
            fn list(&self, query: ListQuery<'_>) -> RResult<SessionPage, PluginError>;
        }

        /// A store adapter trait object of this layout.
        pub type StoreAdapterBox = StoreAdapter_TO<'static, RBox<()>>;

        /// The root module of this layout; see [`crate::PluginMod`].
        #[repr(C)]
        #[derive(StableAbi)]
        #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
        pub struct PluginMod {
            /// See [`crate::PluginMod::info`].
            pub info: extern "C" fn() -> PluginInfo,
            /// See [`crate::PluginMod::init`].
            pub init: extern "C" fn(host: HostApiBox) -> RResult<(), PluginError>,
            /// See [`crate::PluginMod::new_model`].
            pub new_model:
                extern "C" fn(settings: RStr<'_>) -> RResult<ModelAdapterBox, PluginError>,
            /// See [`crate::PluginMod::new_store`].
            #[sabi(last_prefix_field)]
            pub new_store:
                extern "C" fn(settings: RStr<'_>) -> RResult<StoreAdapterBox, PluginError>,
        }

        impl RootModule for PluginModRef {
            declare_root_module_statics! {PluginModRef}
            const BASE_NAME: &'static str = "llm_host_plugin";
            const NAME: &'static str = "llm-host plugin";
            const VERSION_STRINGS: VersionStrings = package_version_strings!();
        }
    }

    /// plugin-api 0.1.0 with `HostApi::base_dir` and `StoreAdapter::ping`:
    /// today's `HostApi`, a `StoreAdapter` that ends at `ping`.
    pub mod ping {
        use super::*;
        use crate::{HostApiBox, ListQuery, SaveOutcome, SessionPage, StoredSession};
        use abi_stable::std_types::ROption;

        /// The store adapter of this layout; see [`crate::StoreAdapter`].
        #[sabi_trait]
        pub trait StoreAdapter: Send + Sync {
            /// See [`crate::StoreAdapter::load`].
            fn load(&self, id: RStr<'_>) -> RResult<ROption<StoredSession>, PluginError>;

            /// See [`crate::StoreAdapter::save`].
            fn save(
                &self,
                id: RStr<'_>,
                expected_version: u64,
                owner: RStr<'_>,
                data: RStr<'_>,
            ) -> RResult<SaveOutcome, PluginError>;

            /// See [`crate::StoreAdapter::delete`].
            fn delete(&self, id: RStr<'_>) -> RResult<bool, PluginError>;

            /// See [`crate::StoreAdapter::list`].
            fn list(&self, query: ListQuery<'_>) -> RResult<SessionPage, PluginError>;

            /// See [`crate::StoreAdapter::ping`].
            #[sabi(last_prefix_field)]
            fn ping(&self) -> RResult<(), PluginError>;
        }

        /// A store adapter trait object of this layout.
        pub type StoreAdapterBox = StoreAdapter_TO<'static, RBox<()>>;

        /// The root module of this layout; see [`crate::PluginMod`].
        #[repr(C)]
        #[derive(StableAbi)]
        #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
        pub struct PluginMod {
            /// See [`crate::PluginMod::info`].
            pub info: extern "C" fn() -> PluginInfo,
            /// See [`crate::PluginMod::init`].
            pub init: extern "C" fn(host: HostApiBox) -> RResult<(), PluginError>,
            /// See [`crate::PluginMod::new_model`].
            pub new_model:
                extern "C" fn(settings: RStr<'_>) -> RResult<ModelAdapterBox, PluginError>,
            /// See [`crate::PluginMod::new_store`].
            #[sabi(last_prefix_field)]
            pub new_store:
                extern "C" fn(settings: RStr<'_>) -> RResult<StoreAdapterBox, PluginError>,
        }

        impl RootModule for PluginModRef {
            declare_root_module_statics! {PluginModRef}
            const BASE_NAME: &'static str = "llm_host_plugin";
            const NAME: &'static str = "llm-host plugin";
            const VERSION_STRINGS: VersionStrings = package_version_strings!();
        }
    }

    /// plugin-api 0.1.0 as last released: today's `HostApi` and
    /// `StoreAdapter`, the `ModelAdapter` of before turns in steps.
    pub mod in_process {
        use super::*;
        use crate::{HostApiBox, StoreAdapterBox};

        /// The root module of this layout; see [`crate::PluginMod`].
        #[repr(C)]
        #[derive(StableAbi)]
        #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
        pub struct PluginMod {
            /// See [`crate::PluginMod::info`].
            pub info: extern "C" fn() -> PluginInfo,
            /// See [`crate::PluginMod::init`].
            pub init: extern "C" fn(host: HostApiBox) -> RResult<(), PluginError>,
            /// See [`crate::PluginMod::new_model`].
            pub new_model:
                extern "C" fn(settings: RStr<'_>) -> RResult<ModelAdapterBox, PluginError>,
            /// See [`crate::PluginMod::new_store`].
            #[sabi(last_prefix_field)]
            pub new_store:
                extern "C" fn(settings: RStr<'_>) -> RResult<StoreAdapterBox, PluginError>,
        }

        impl RootModule for PluginModRef {
            declare_root_module_statics! {PluginModRef}
            const BASE_NAME: &'static str = "llm_host_plugin";
            const NAME: &'static str = "llm-host plugin";
            const VERSION_STRINGS: VersionStrings = package_version_strings!();
        }
    }
}

#[cfg(test)]
mod tests {
    use abi_stable::abi_stability::abi_checking::{
        check_layout_compatibility_with_globals, AbiInstabilityErrors, CheckingGlobals,
    };
    use abi_stable::{type_layout::TypeLayout, StableAbi};

    use super::v0_1_0;
    use crate::PluginModRef;

    /// What a host whose root module has the layout `host` says of a library
    /// whose root module has the layout `library`. Each check gets globals of
    /// its own: abi_stable's shared ones remember which layouts were found
    /// compatible, and pairing one type with two different root layouts
    /// (which a host never does) makes later checks depend on the order.
    fn check(host: &'static TypeLayout, library: &'static TypeLayout) -> Result<(), String> {
        let globals = CheckingGlobals::new();
        check_layout_compatibility_with_globals(host, library, &globals)
            .map_err(|err: AbiInstabilityErrors| err.to_string())
    }

    /// The root cause, in one process: a host whose layout has more fields
    /// than the library's refuses it, whatever `last_prefix_field` says; the
    /// same library passes against its own (frozen) layout; and a library
    /// built against today's contract passes on a host of 0.1.0's last layout
    /// (so the frozen copy is a faithful prefix of today's), not on one of its
    /// initial layout (whose `last_prefix_field`s were moved since).
    #[test]
    fn a_host_refuses_fewer_fields_and_takes_more() {
        let today = <PluginModRef as StableAbi>::LAYOUT;
        let in_process = <v0_1_0::in_process::PluginModRef as StableAbi>::LAYOUT;
        let ping = <v0_1_0::ping::PluginModRef as StableAbi>::LAYOUT;
        let initial = <v0_1_0::initial::PluginModRef as StableAbi>::LAYOUT;

        let report = check(today, in_process).expect_err("0.1.1 appended to ModelAdapter");
        assert!(report.contains("Error:too many fields"), "{report}");
        let report = check(today, initial).expect_err("0.1.0 moved last_prefix_field");
        assert!(
            report.contains("Error:prefix-types have a different prefix"),
            "{report}"
        );
        for old in [in_process, ping, initial] {
            check(old, old).expect("a layout is compatible with itself");
        }

        check(in_process, today).expect("a library of today's layout, a host of 0.1.0's last");
        check(ping, in_process).expect("a library of 0.1.0's last layout, a host of its second");
        check(ping, today).expect("a library of today's layout, a host of 0.1.0's second");
        let report = check(initial, today).expect_err("the prefixes were moved since");
        assert!(
            report.contains("Error:prefix-types have a different prefix"),
            "{report}"
        );
        let report = check(initial, ping).expect_err("the prefixes were moved since");
        assert!(
            report.contains("Error:prefix-types have a different prefix"),
            "{report}"
        );
    }
}
