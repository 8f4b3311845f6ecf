//! Libraries built against earlier layouts of the plugin contract.
//!
//! abi_stable's load-time check lets a library's prefix types (the root
//! module, each trait's vtable) have more fields than the host's, never
//! fewer ("too many fields"), and wants their `last_prefix_field` in the same
//! place ("prefix-types have a different prefix"); `llm_host_plugin_api::compat`
//! explains. So a library built before the contract last appended fails a
//! check against today's layout. [`open`] checks today's layout first (a
//! failed check leaves no trace in abi_stable's records); a library that
//! fails it and says it was built against plugin-api 0.1.0 is checked against
//! each layout 0.1.0 was published with, newest first. One that matches is
//! driven through that layout's own types, its adapters wrapped into today's
//! trait objects that call only what the layout has and answer the rest as
//! today's default bodies do:
//!
//! | 0.1.0 layout  | model adapters         | store adapters                       | host API given to `init` |
//! |---------------|------------------------|--------------------------------------|--------------------------|
//! | `in_process`  | `generate`, not stepped| today's (no wrapper)                 | today's                  |
//! | `ping`        | `generate`, not stepped| no `in_process` (shared and blocking)| today's                  |
//! | `initial`     | `generate`, not stepped| no `ping` (always ready), no `in_process` | without `base_dir`  |
//!
//! Every library is paired with exactly one layout: abi_stable remembers the
//! pairs it found compatible, and a type paired with two root layouts would
//! make later checks depend on the order libraries were loaded in.

use abi_stable::{
    library::{LibHeader, LibraryError},
    sabi_trait::TD_Opaque,
    sabi_types::VersionNumber,
    std_types::{ROk, ROption, RResult, RStr, RString},
};
use llm_host_plugin_api::compat::v0_1_0::{self, in_process, initial, ping};
use llm_host_plugin_api::{
    EventSinkRef, HostApi, HostApi_TO, ListQuery, LogLevel, ModelAdapter, ModelAdapterBox,
    ModelAdapter_TO, PluginError, PluginInfo, PluginModRef, SaveOutcome, SessionPage, StoreAdapter,
    StoreAdapterBox, StoreAdapter_TO, StoredSession,
};

use super::PluginLogger;

/// A library's root module, through the contract layout it matched.
pub(crate) enum Root {
    /// Today's layout (plugin-api 0.1.1 and later patch releases).
    Current(PluginModRef),
    /// plugin-api 0.1.0 as last published (`StoreAdapter::in_process`).
    V010InProcess(in_process::PluginModRef),
    /// plugin-api 0.1.0 with `HostApi::base_dir` and `StoreAdapter::ping`.
    V010Ping(ping::PluginModRef),
    /// plugin-api 0.1.0 as first released.
    V010Initial(initial::PluginModRef),
}

impl Root {
    /// Which contract layout the library was matched with, for logs.
    pub(crate) fn contract(&self) -> &'static str {
        match self {
            Root::Current(_) => "current",
            Root::V010InProcess(_) => "0.1.0 (last layout)",
            Root::V010Ping(_) => "0.1.0 (layout with ping)",
            Root::V010Initial(_) => "0.1.0 (initial layout)",
        }
    }

    /// The root module's `info`.
    pub(crate) fn info(&self) -> extern "C" fn() -> PluginInfo {
        match self {
            Root::Current(module) => module.info(),
            Root::V010InProcess(module) => module.info(),
            Root::V010Ping(module) => module.info(),
            Root::V010Initial(module) => module.info(),
        }
    }

    /// Calls the root module's `init` with the host API of its layout.
    pub(crate) fn init(&self, host: PluginLogger) -> RResult<(), PluginError> {
        match self {
            Root::Current(module) => (module.init())(HostApi_TO::from_value(host, TD_Opaque)),
            Root::V010InProcess(module) => (module.init())(HostApi_TO::from_value(host, TD_Opaque)),
            Root::V010Ping(module) => (module.init())(HostApi_TO::from_value(host, TD_Opaque)),
            Root::V010Initial(module) => {
                (module.init())(initial::HostApi_TO::from_value(host, TD_Opaque))
            }
        }
    }

    /// Builds a model adapter, as today's trait object.
    pub(crate) fn new_model(&self, settings: RStr<'_>) -> RResult<ModelAdapterBox, PluginError> {
        let old = match self {
            Root::Current(module) => return (module.new_model())(settings),
            Root::V010InProcess(module) => (module.new_model())(settings),
            Root::V010Ping(module) => (module.new_model())(settings),
            Root::V010Initial(module) => (module.new_model())(settings),
        };
        old.map(|adapter| ModelAdapter_TO::from_value(Model010(adapter), TD_Opaque))
    }

    /// Builds a store adapter, as today's trait object.
    pub(crate) fn new_store(&self, settings: RStr<'_>) -> RResult<StoreAdapterBox, PluginError> {
        match self {
            Root::Current(module) => (module.new_store())(settings),
            Root::V010InProcess(module) => (module.new_store())(settings),
            Root::V010Ping(module) => (module.new_store())(settings)
                .map(|adapter| StoreAdapter_TO::from_value(StorePing(adapter), TD_Opaque)),
            Root::V010Initial(module) => (module.new_store())(settings)
                .map(|adapter| StoreAdapter_TO::from_value(StoreInitial(adapter), TD_Opaque)),
        }
    }
}

/// Checks the version and the layout of the library's root module and
/// initialises it: against today's layout, and for a library that says it
/// was built against plugin-api 0.1.0 and fails that, against each layout
/// 0.1.0 was published with. The error is today's check's, unless an older
/// layout matched and the root module then failed.
pub(crate) fn open(header: &'static LibHeader) -> Result<Root, LibraryError> {
    let today = match header.init_root_module::<PluginModRef>() {
        Ok(module) => return Ok(Root::Current(module)),
        Err(err @ LibraryError::AbiInstability(_)) => err,
        Err(other) => return Err(other),
    };
    if !built_against_0_1_0(header) {
        return Err(today);
    }
    macro_rules! try_layout {
        ($module:ty, $variant:ident) => {
            match header.init_root_module::<$module>() {
                Ok(module) => return Ok(Root::$variant(module)),
                Err(LibraryError::AbiInstability(report)) => tracing::debug!(
                    layout = stringify!($variant),
                    report = %report,
                    "not this 0.1.0 layout"
                ),
                Err(other) => return Err(other),
            }
        };
    }
    try_layout!(in_process::PluginModRef, V010InProcess);
    try_layout!(ping::PluginModRef, V010Ping);
    try_layout!(initial::PluginModRef, V010Initial);
    Err(today)
}

/// Whether the library says it was built against plugin-api 0.1.0.
fn built_against_0_1_0(header: &LibHeader) -> bool {
    VersionNumber::new(header.version_strings())
        .is_ok_and(|version| (version.major, version.minor, version.patch) == (0, 1, 0))
}

impl initial::HostApi for PluginLogger {
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
        HostApi::log(self, level, target, message);
    }

    fn log_enabled(&self, level: LogLevel) -> bool {
        HostApi::log_enabled(self, level)
    }

    fn host_version(&self) -> RString {
        HostApi::host_version(self)
    }
}

/// A model adapter of plugin-api 0.1.0 as today's: its own `generate`; not
/// stepped (today's default body), so the host runs its turns on a thread
/// each and never calls `start`.
struct Model010(v0_1_0::ModelAdapterBox);

impl ModelAdapter for Model010 {
    fn generate(&self, request: RStr<'_>, sink: EventSinkRef<'_>) -> RResult<(), PluginError> {
        self.0.generate(request, sink)
    }
}

/// A store adapter of the 0.1.0 layout with `ping`: its own methods; not
/// in process (today's default body; a library of commit 43e095b has a
/// `blocks` there, which is never called).
struct StorePing(ping::StoreAdapterBox);

impl StoreAdapter for StorePing {
    fn load(&self, id: RStr<'_>) -> RResult<ROption<StoredSession>, PluginError> {
        self.0.load(id)
    }

    fn save(
        &self,
        id: RStr<'_>,
        expected_version: u64,
        owner: RStr<'_>,
        data: RStr<'_>,
    ) -> RResult<SaveOutcome, PluginError> {
        self.0.save(id, expected_version, owner, data)
    }

    fn delete(&self, id: RStr<'_>) -> RResult<bool, PluginError> {
        self.0.delete(id)
    }

    fn list(&self, query: ListQuery<'_>) -> RResult<SessionPage, PluginError> {
        self.0.list(query)
    }

    fn ping(&self) -> RResult<(), PluginError> {
        self.0.ping()
    }
}

/// A store adapter of the initial 0.1.0 layout: its own methods; always
/// ready (it cannot be asked), not in process.
struct StoreInitial(initial::StoreAdapterBox);

impl StoreAdapter for StoreInitial {
    fn load(&self, id: RStr<'_>) -> RResult<ROption<StoredSession>, PluginError> {
        self.0.load(id)
    }

    fn save(
        &self,
        id: RStr<'_>,
        expected_version: u64,
        owner: RStr<'_>,
        data: RStr<'_>,
    ) -> RResult<SaveOutcome, PluginError> {
        self.0.save(id, expected_version, owner, data)
    }

    fn delete(&self, id: RStr<'_>) -> RResult<bool, PluginError> {
        self.0.delete(id)
    }

    fn list(&self, query: ListQuery<'_>) -> RResult<SessionPage, PluginError> {
        self.0.list(query)
    }

    fn ping(&self) -> RResult<(), PluginError> {
        ROk(())
    }
}
