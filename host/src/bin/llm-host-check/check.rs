//! `llm-host check PATH.so`: loads a plugin library exactly as the host
//! would and runs the conformance suites against each adapter kind it
//! provides.
//!
//! Loading goes through [`Loader::load`]: the library is copied to a private,
//! temporary staging directory under its content hash, checked to be a whole
//! ELF file that exports the plugin root module, ABI-checked against this
//! host's plugin-api, and initialised with the host's logger. Then:
//!
//! - model adapters get [`model`](llm_host_conformance::model)'s suite,
//!   driven through the FFI `ModelAdapterBox` with a recording sink: through
//!   `generate`, and for a stepped adapter a second time through
//!   `start`/`step` as the host runs it (`model.steps.*`: the same checks,
//!   plus that no call blocks and that a pending step is woken);
//! - store adapters get [`store`](llm_host_conformance::store)'s suite, plus
//!   the unknown-settings check. Each check builds a fresh adapter from the
//!   settings, the `store.shared_*` checks a second one (as a second host
//!   would), the `store.process_*` checks start a second process of this
//!   executable that loads the library and builds one there
//!   ([`race`](super::race), as a second host on another machine would), and
//!   a `ttl_secs` in the settings is the TTL `store.expiry` waits out.
//!
//! Every check prints one line, `PASS name: note`, `WARN name: detail`,
//! `FAIL name: detail` or `SKIP name: why`, then a summary line. Warnings and
//! skips (a check that does not apply, such as `model.steps.*` for an adapter
//! that is not stepped, or one that needs an adapter `construct` failed to
//! build) do not fail the run; any failure does (exit status 1). Settings
//! paths that are relative resolve against the current directory (the host
//! uses the config file's directory).
//!
//! A plugin whose panic escaped the plugin-api's guard would abort this
//! process before the summary, as it would abort the host: an exit by
//! signal, with no summary line, is a failure too.

use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use llm_host_conformance::{model, store};
use llm_host_plugin_api::{Kinds, PluginError};
use serde_json::Value;

use llm_host::plugins::loader::{LoadedPlugin, Loader};

/// The usage of the subcommand.
pub const USAGE: &str = "\
usage: llm-host check PATH.so [--settings JSON] [--kind model|store] [--json]

Loads the plugin library as the host would (staged copy, ELF and ABI checks)
and runs the conformance suite against each adapter kind it provides.
  --settings JSON   the adapter settings, a JSON object (default {})
  --kind KIND       check only the model or only the store adapter
  --json            print one JSON report instead of the lines (for CI)
Prints PASS/WARN/FAIL/SKIP per check and a summary; exits 1 if a check
failed, 2 on a usage error. The plugin's own log (warnings and up, unless
RUST_LOG says otherwise) goes to stderr, apart from the report.";

/// Which adapter kinds to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindFilter {
    /// Only the model adapter.
    Model,
    /// Only the store adapter.
    Store,
}

/// What `llm-host check` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The plugin library.
    pub library: PathBuf,
    /// The adapter settings (a JSON object).
    pub settings: Value,
    /// Only this kind, if given.
    pub kind: Option<KindFilter>,
    /// One JSON report instead of lines.
    pub json: bool,
}

impl Options {
    /// Parses the arguments after `check`. `Ok(None)`: help was asked for.
    /// An error is a usage error, for the caller to print with [`USAGE`].
    pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
        let mut library = None;
        let mut settings = None;
        let mut kind = None;
        let mut json = false;
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--help" | "-h" => return Ok(None),
                "--json" => json = true,
                "--settings" => {
                    let text = args.next().ok_or("--settings needs a JSON object")?;
                    let value: Value = serde_json::from_str(&text)
                        .map_err(|err| format!("--settings `{text}` is not JSON: {err}"))?;
                    if !value.is_object() {
                        return Err(format!("--settings `{text}` is not a JSON object"));
                    }
                    settings = Some(value);
                }
                "--kind" => {
                    kind = Some(match args.next().as_deref() {
                        Some("model") => KindFilter::Model,
                        Some("store") => KindFilter::Store,
                        Some(other) => {
                            return Err(format!("--kind `{other}`: expected model or store"))
                        }
                        None => return Err("--kind needs model or store".to_owned()),
                    });
                }
                other if other.starts_with('-') => {
                    return Err(format!("unexpected option `{other}`"))
                }
                other if library.is_none() => library = Some(PathBuf::from(other)),
                other => return Err(format!("unexpected argument `{other}`")),
            }
        }
        let library = library.ok_or("check needs the path of a plugin library")?;
        if !library.is_file() {
            return Err(format!("{}: no such file", library.display()));
        }
        Ok(Some(Options {
            library,
            settings: settings.unwrap_or_else(|| Value::Object(serde_json::Map::new())),
            kind,
            json,
        }))
    }
}

/// One verdict line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// What was checked: `load`, `model.cancel`, `store.create`, ...
    pub name: String,
    /// The verdict.
    pub verdict: model::Verdict,
    /// What was found.
    pub detail: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.verdict, self.name, self.detail)
    }
}

/// The counts of a whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Checks passed.
    pub passed: usize,
    /// Checks failed.
    pub failed: usize,
    /// Warnings.
    pub warnings: usize,
    /// Checks not run.
    pub skipped: usize,
}

impl Summary {
    fn count(&mut self, verdict: model::Verdict) {
        match verdict {
            model::Verdict::Pass => self.passed += 1,
            model::Verdict::Fail => self.failed += 1,
            model::Verdict::Warn => self.warnings += 1,
            model::Verdict::Skip => self.skipped += 1,
        }
    }

    /// Whether the library conforms: nothing failed. A skipped check does
    /// not apply to the adapter, or needs one that failed to build (and then
    /// `construct` failed).
    pub fn conforms(&self) -> bool {
        self.failed == 0
    }

    /// 0 if the library conforms, 1 otherwise.
    pub fn exit_code(&self) -> ExitCode {
        if self.conforms() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Runs the checks `options` asks for, writing each verdict line and the
/// summary to `out` as it goes.
pub fn run(options: &Options, out: &mut dyn Write) -> io::Result<Summary> {
    let mut report = Report {
        out,
        summary: Summary::default(),
        json: options.json.then(Vec::new),
    };
    report.text(&format!("checking {}", options.library.display()))?;
    let staging = staging_dir();
    let base_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let loader = Loader::new(staging.clone(), base_dir);
    let loaded = loader.load(&options.library);
    let result = match loaded {
        Err(message) => report.line("load", model::Verdict::Fail, message),
        Ok(None) => report.line(
            "load",
            model::Verdict::Fail,
            "not an llm-host plugin: the library does not export the plugin root module \
             (use llm_host_plugin_api::export_plugin!)"
                .to_owned(),
        ),
        Ok(Some(plugin)) => check_plugin(&plugin, options, &mut report),
    };
    // The staged copy stays mapped; unlinking it is fine on Linux.
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    let summary = report.summary;
    if let Some(lines) = report.json.take() {
        let checks: Vec<Value> = lines
            .iter()
            .map(|line| {
                serde_json::json!({
                    "name": line.name,
                    "verdict": line.verdict.to_string(),
                    "detail": line.detail,
                })
            })
            .collect();
        let document = serde_json::json!({
            "library": options.library.display().to_string(),
            "conforms": summary.conforms(),
            "summary": {
                "passed": summary.passed,
                "failed": summary.failed,
                "warnings": summary.warnings,
                "skipped": summary.skipped,
            },
            "checks": checks,
        });
        writeln!(report.out, "{document}")?;
        report.out.flush()?;
        return Ok(summary);
    }
    report.text(&format!(
        "summary: {} passed, {} failed, {}, {} skipped: {} {}",
        summary.passed,
        summary.failed,
        model::plural(summary.warnings, "warning"),
        summary.skipped,
        options.library.display(),
        if summary.conforms() {
            "conforms"
        } else {
            "does NOT conform"
        }
    ))?;
    Ok(summary)
}

/// The subcommand: runs the checks and prints to stdout.
pub fn main(options: &Options) -> ExitCode {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(options, &mut out) {
        Ok(summary) => summary.exit_code(),
        Err(err) => {
            eprintln!("llm-host check: cannot write the report: {err}");
            ExitCode::FAILURE
        }
    }
}

struct Report<'a> {
    out: &'a mut dyn Write,
    summary: Summary,
    /// With `--json`: the lines, written as one document at the end.
    json: Option<Vec<Line>>,
}

impl Report<'_> {
    fn text(&mut self, text: &str) -> io::Result<()> {
        if self.json.is_some() {
            return Ok(());
        }
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }

    fn line(&mut self, name: &str, verdict: model::Verdict, detail: String) -> io::Result<()> {
        self.summary.count(verdict);
        let line = Line {
            name: name.to_owned(),
            verdict,
            detail,
        };
        if let Some(lines) = &mut self.json {
            lines.push(line);
            return Ok(());
        }
        self.text(&line.to_string())
    }
}

/// A staging directory of this run's own, under the system's temporary one,
/// at a random name (the loader creates it with mode 0700).
pub fn staging_dir() -> PathBuf {
    std::env::temp_dir().join(format!("llm-host-check-{}", uuid::Uuid::new_v4().simple()))
}

fn check_plugin(
    plugin: &LoadedPlugin,
    options: &Options,
    report: &mut Report<'_>,
) -> io::Result<()> {
    report.line(
        "load",
        model::Verdict::Pass,
        format!(
            "plugin `{}` {} ({}), built against plugin-api {}, sha256 {}",
            plugin.name,
            plugin.version,
            kind_names(plugin.kinds),
            plugin.api_version,
            plugin.short_hash()
        ),
    )?;
    let wanted: Vec<KindFilter> = match options.kind {
        Some(kind) => vec![kind],
        None => [KindFilter::Model, KindFilter::Store]
            .into_iter()
            .filter(|kind| plugin.kinds.contains(kind.flag()))
            .collect(),
    };
    if wanted.is_empty() {
        return report.line(
            "kinds",
            model::Verdict::Fail,
            "the plugin provides neither a model nor a store adapter".to_owned(),
        );
    }
    for kind in wanted {
        if !plugin.kinds.contains(kind.flag()) {
            report.line(
                kind.name(),
                model::Verdict::Fail,
                format!(
                    "plugin `{}` provides {}, not {}",
                    plugin.name,
                    kind_names(plugin.kinds),
                    kind.name()
                ),
            )?;
            continue;
        }
        match kind {
            KindFilter::Model => check_model(plugin, &options.settings, report)?,
            KindFilter::Store => check_store(plugin, options, report)?,
        }
    }
    Ok(())
}

impl KindFilter {
    fn flag(self) -> Kinds {
        match self {
            KindFilter::Model => Kinds::MODEL,
            KindFilter::Store => Kinds::STORE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KindFilter::Model => "model",
            KindFilter::Store => "store",
        }
    }
}

fn kind_names(kinds: Kinds) -> String {
    let names = kinds.names();
    if names.is_empty() {
        "no adapters".to_owned()
    } else {
        names.join("+")
    }
}

/// Settings text as the adapter constructors take it, back as the JSON value
/// [`LoadedPlugin`] wants.
fn parse(settings: &str) -> Result<Value, PluginError> {
    serde_json::from_str(settings)
        .map_err(|err| PluginError::invalid_settings(format!("not JSON: {err}")))
}

fn check_model(plugin: &LoadedPlugin, settings: &Value, report: &mut Report<'_>) -> io::Result<()> {
    let options = model::ModelOptions {
        settings: settings.to_string(),
        ..model::ModelOptions::default()
    };
    let make = |settings: &str| plugin.new_model(&parse(settings)?);
    for result in model::check_model(&make, &options) {
        report.line(
            &format!("model.{}", result.name),
            result.verdict,
            result.detail,
        )?;
    }
    Ok(())
}

fn check_store(
    plugin: &LoadedPlugin,
    options: &Options,
    report: &mut Report<'_>,
) -> io::Result<()> {
    let settings = &options.settings;
    let built = match plugin.new_store(settings) {
        Err(err) => {
            report.line(
                "store.construct",
                model::Verdict::Fail,
                format!("the plugin refused the settings {settings}: {err}"),
            )?;
            report.line(
                "store.suite",
                model::Verdict::Skip,
                "no adapter to check (see store.construct)".to_owned(),
            )?;
            false
        }
        Ok(_) => {
            report.line(
                "store.construct",
                model::Verdict::Pass,
                format!("built with the settings {settings}"),
            )?;
            report.text(
                "note: the store suite builds a fresh adapter with these settings for each check",
            )?;
            let make = || plugin.new_store(settings);
            // The TTL the settings give (`ttl_secs`), for the expiry check,
            // and a second process on the same library and settings.
            let second = super::race::second_process(&options.library, settings);
            let options = store::StoreOptions::from_settings(&settings.to_string())
                .with_second_process(second);
            for result in store::check_store_with(&make, &options) {
                report.line(
                    &format!("store.{}", result.name),
                    result.verdict,
                    result.detail,
                )?;
            }
            true
        }
    };
    if !built {
        return report.line(
            "store.unknown_settings",
            model::Verdict::Skip,
            model::UNKNOWN_SETTINGS_UNTESTABLE.to_owned(),
        );
    }
    let make = |settings: &str| plugin.new_store(&parse(settings)?).map(|_| ());
    let (verdict, detail) = model::unknown_settings_verdict(&make, &settings.to_string());
    report.line("store.unknown_settings", verdict, detail)
}
