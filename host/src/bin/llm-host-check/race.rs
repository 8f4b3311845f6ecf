//! `llm-host-check __store-race LIBRARY SETTINGS`: the second process of the
//! store suite's `process_*` checks, which `llm-host check` starts (the
//! hidden argument [`ARG`]) to race a second host on the store it checks.
//!
//! It loads the library as `llm-host check` does (a staging directory of its
//! own, the same loader), builds store adapters from the same settings, and
//! hands them to [`store::serve_race`], which runs the job the first process
//! put into [`store::RACE_ENV`] and answers on stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use llm_host::plugins::loader::Loader;
use llm_host_conformance::store;
use serde_json::Value;

/// The hidden argument that makes `llm-host-check` a second process.
pub const ARG: &str = "__store-race";

/// How the first process starts this one on `library` with `settings`.
pub fn second_process(library: &std::path::Path, settings: &Value) -> store::SecondProcess {
    let program = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("llm-host-check"));
    store::SecondProcess::command(
        program,
        [
            ARG.to_owned(),
            library.display().to_string(),
            settings.to_string(),
        ],
    )
}

/// `__store-race LIBRARY SETTINGS` (the arguments after [`ARG`]).
pub fn main(mut args: impl Iterator<Item = String>) -> ExitCode {
    let (Some(library), Some(settings), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: llm-host-check {ARG} LIBRARY SETTINGS (used by llm-host check itself)");
        return ExitCode::from(2);
    };
    let settings: Value = match serde_json::from_str(&settings) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("llm-host-check {ARG}: the settings are not JSON: {err}");
            return ExitCode::from(2);
        }
    };
    let staging = super::check::staging_dir();
    let base_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let loader = Loader::new(staging.clone(), base_dir);
    let served = match loader.load(std::path::Path::new(&library)) {
        Ok(Some(plugin)) => store::serve_race(&|| plugin.new_store(&settings)),
        Ok(None) => Err(format!("{library} is not an llm-host plugin")),
        Err(err) => Err(format!("{library} does not load: {err}")),
    };
    // The staged copy stays mapped; unlinking it is fine on Linux.
    let _ = std::fs::remove_dir_all(&staging);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llm-host-check {ARG}: {err}");
            ExitCode::FAILURE
        }
    }
}
