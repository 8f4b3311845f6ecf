//! `llm-host-check`: the conformance suites against a plugin library, as
//! `llm-host check` runs them. A binary of its own, so the serving binary
//! does not carry the test suites; `llm-host check ...` runs this one.

mod check;
mod race;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    // A loader in this process probes libraries with this executable.
    if args
        .peek()
        .is_some_and(|arg| arg == llm_host::plugins::probe::ARG)
    {
        args.next();
        return llm_host::plugins::probe::main(args);
    }
    // The store suite races a second process of this executable.
    if args.peek().is_some_and(|arg| arg == race::ARG) {
        args.next();
        let _log = llm_host::init_logging_at("warn");
        return race::main(args);
    }
    // Run as `llm-host check ...` or as `llm-host-check check ...`.
    if args.peek().is_some_and(|arg| arg == "check") {
        args.next();
    }
    match check::Options::parse(args) {
        Ok(Some(options)) => {
            // The plugin's log goes to stderr, and only what matters, so
            // that it does not bury the report.
            let _log = llm_host::init_logging_at("warn");
            check::main(&options)
        }
        Ok(None) => {
            println!("{}", check::USAGE);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("llm-host check: {message}\n\n{}", check::USAGE);
            ExitCode::from(2)
        }
    }
}
