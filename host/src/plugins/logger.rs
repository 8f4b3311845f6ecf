//! The host API a plugin gets at init, and its log lines: each plugin logs
//! under a target of its own, `llm_host::plugin::NAME`, so that
//! `RUST_LOG=llm_host::plugin::echo=debug` picks one plugin's lines.
//!
//! tracing's macros need a target known at compile time; a plugin's name is
//! known at load. So each plugin gets callsites of its own, one per level,
//! built when it is loaded and registered with tracing like a macro's
//! (filters see them, and `RUST_LOG` directives on the target apply). A
//! callsite is never freed, as tracing requires: a few hundred bytes per
//! plugin name, made once per name for the life of the process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use abi_stable::std_types::{RStr, RString};
use llm_host_plugin_api::{HostApi, LogLevel};
use tracing::callsite::{Callsite, Identifier};
use tracing::field::{FieldSet, Value};
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};

/// The target a plugin's log lines carry.
pub fn target_of(plugin: &str) -> String {
    format!("llm_host::plugin::{plugin}")
}

/// The host API given to a plugin at init.
pub(crate) struct PluginLogger {
    base_dir: String,
    callsites: &'static Callsites,
}

impl PluginLogger {
    /// The host API for plugin `plugin`, whose relative paths resolve
    /// against `base_dir`.
    pub(crate) fn new(plugin: &str, base_dir: String) -> Self {
        Self {
            base_dir,
            callsites: Callsites::of(plugin),
        }
    }
}

impl HostApi for PluginLogger {
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
        let callsite = self.callsites.at(level);
        if !callsite.enabled() {
            return;
        }
        let meta = callsite.metadata();
        let fields = meta.fields();
        let (Some(message_field), Some(module_field)) =
            (fields.field("message"), fields.field("module"))
        else {
            return;
        };
        let message = format_args!("{message}");
        let module = target.as_str();
        let values: [(&tracing::field::Field, Option<&dyn Value>); 2] = [
            (&message_field, Some(&message as &dyn Value)),
            (&module_field, Some(&module as &dyn Value)),
        ];
        Event::dispatch(meta, &fields.value_set(&values));
    }

    fn log_enabled(&self, level: LogLevel) -> bool {
        self.callsites.at(level).enabled()
    }

    fn host_version(&self) -> RString {
        env!("CARGO_PKG_VERSION").into()
    }

    fn base_dir(&self) -> RString {
        self.base_dir.as_str().into()
    }
}

/// One plugin's callsites: error, warn, info, debug, trace.
struct Callsites([&'static PluginCallsite; 5]);

impl Callsites {
    /// Plugin `plugin`'s callsites, made and registered the first time.
    fn of(plugin: &str) -> &'static Callsites {
        static ALL: OnceLock<Mutex<HashMap<String, &'static Callsites>>> = OnceLock::new();
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(callsites) = all.get(plugin) {
            return callsites;
        }
        let target: &'static str = Box::leak(target_of(plugin).into_boxed_str());
        let callsites: &'static Callsites = Box::leak(Box::new(Callsites(
            [
                Level::ERROR,
                Level::WARN,
                Level::INFO,
                Level::DEBUG,
                Level::TRACE,
            ]
            .map(|level| PluginCallsite::make(target, level)),
        )));
        all.insert(plugin.to_owned(), callsites);
        callsites
    }

    fn at(&self, level: LogLevel) -> &'static PluginCallsite {
        let index = match level {
            LogLevel::ERROR => 0,
            LogLevel::WARN => 1,
            LogLevel::INFO => 2,
            LogLevel::DEBUG => 3,
            _ => 4,
        };
        self.0[index]
    }
}

/// A callsite for one plugin and level: what a `tracing::event!` expands to,
/// made at run time.
struct PluginCallsite {
    meta: OnceLock<Metadata<'static>>,
    /// tracing's interest in it: 0 never, 1 sometimes, 2 always.
    interest: AtomicU8,
}

impl PluginCallsite {
    /// Makes, leaks and registers the callsite of `target` at `level`.
    fn make(target: &'static str, level: Level) -> &'static PluginCallsite {
        let callsite: &'static PluginCallsite = Box::leak(Box::new(PluginCallsite {
            meta: OnceLock::new(),
            interest: AtomicU8::new(1),
        }));
        let fields = FieldSet::new(&["message", "module"], Identifier(callsite));
        let _ = callsite.meta.set(Metadata::new(
            "plugin log",
            target,
            level,
            Some(file!()),
            Some(line!()),
            Some(module_path!()),
            fields,
            Kind::EVENT,
        ));
        tracing::callsite::register(callsite);
        callsite
    }

    /// Whether an event here would be recorded now.
    fn enabled(&'static self) -> bool {
        let meta = self.metadata();
        match self.interest.load(Ordering::Relaxed) {
            0 => false,
            2 => {
                tracing::level_filters::LevelFilter::current() >= *meta.level()
                    && tracing::dispatcher::get_default(|d| d.enabled(meta))
            }
            _ => tracing::dispatcher::get_default(|d| d.enabled(meta)),
        }
    }
}

impl Callsite for PluginCallsite {
    fn set_interest(&self, interest: Interest) {
        let value = if interest.is_never() {
            0
        } else if interest.is_always() {
            2
        } else {
            1
        };
        self.interest.store(value, Ordering::Relaxed);
    }

    fn metadata(&self) -> &Metadata<'_> {
        // Set in `make` before the callsite is registered or used.
        self.meta
            .get()
            .expect("a plugin callsite's metadata is set at once")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{EnvFilter, Layer};

    use super::*;

    /// Collects "TARGET LEVEL module=MODULE message" for every event.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> Layer<S> for Lines {
        fn on_event(&self, event: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            struct Fields(String);
            impl tracing::field::Visit for Fields {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0.push_str(&format!(" {value:?}"));
                    } else {
                        self.0.push_str(&format!(" {}={value:?}", field.name()));
                    }
                }
                fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                    self.0.push_str(&format!(" {}={value}", field.name()));
                }
            }
            let meta = event.metadata();
            let mut fields = Fields(format!("{} {}", meta.target(), meta.level()));
            event.record(&mut fields);
            self.0.lock().expect("lines").push(fields.0);
        }
    }

    #[test]
    fn each_plugin_logs_under_its_own_target_and_filters_apply() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("warn,llm_host::plugin::chatty=debug"))
            .with(lines.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::callsite::rebuild_interest_cache();
            let chatty = PluginLogger::new("chatty", String::new());
            let quiet = PluginLogger::new("quiet", String::new());
            assert!(chatty.log_enabled(LogLevel::DEBUG));
            assert!(!quiet.log_enabled(LogLevel::INFO));
            chatty.log(LogLevel::DEBUG, "chatty::model".into(), "one".into());
            chatty.log(LogLevel::TRACE, "chatty::model".into(), "not this".into());
            quiet.log(LogLevel::INFO, "quiet".into(), "not this either".into());
            quiet.log(LogLevel::WARN, "quiet".into(), "two".into());
            // A second logger of the same plugin shares its callsites.
            PluginLogger::new("chatty", String::new()).log(
                LogLevel::INFO,
                "chatty".into(),
                "three".into(),
            );
        });
        assert_eq!(
            *lines.0.lock().expect("lines"),
            [
                "llm_host::plugin::chatty DEBUG one module=chatty::model",
                "llm_host::plugin::quiet WARN two module=quiet",
                "llm_host::plugin::chatty INFO three module=chatty",
            ]
        );
    }
}
