//! The `llm-host` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use llm_host::init_logging;

const USAGE: &str = "\
usage:
  llm-host [--config PATH] [--listen ADDR]   serve (the flag overrides [server] listen)
  llm-host plugins [--config PATH]           list what the plugin directory provides
  llm-host validate [--config PATH]          do all a start does but listen: exit 1 on
                                             any problem (settings, files, stores)
  llm-host check PATH.so [--settings JSON] [--kind model|store]
                                             load a plugin as the host would and run
                                             the conformance suite against it
  llm-host new-plugin NAME --kind model|store [--dir PATH] [--api PATH]
                                             write a new plugin crate from the template
  llm-host chat [--url URL] [--session ID] [--model NAME] [--key KEY]
                                             chat with a running host in the terminal
  llm-host --help | --version

PATH defaults to ./config.toml. Logging: RUST_LOG (default `info`).";

enum Command {
    Serve {
        config: PathBuf,
        listen: Option<SocketAddr>,
    },
    Plugins {
        config: PathBuf,
    },
    Validate {
        config: PathBuf,
    },
    Help,
    Version,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut config = PathBuf::from("config.toml");
    let mut listen = None;
    let mut plugins = false;
    let mut validate = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = args.next().ok_or("--config needs a path")?.into();
            }
            "--listen" | "-l" => {
                let addr = args.next().ok_or("--listen needs an address")?;
                listen = Some(
                    addr.parse()
                        .map_err(|err| format!("--listen `{addr}`: {err}"))?,
                );
            }
            "plugins" if !plugins && !validate => plugins = true,
            "validate" if !plugins && !validate => validate = true,
            "--help" | "-h" | "help" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    if plugins {
        if listen.is_some() {
            return Err("--listen does not apply to `plugins`".to_owned());
        }
        return Ok(Command::Plugins { config });
    }
    if validate {
        if listen.is_some() {
            return Err("--listen does not apply to `validate`".to_owned());
        }
        return Ok(Command::Validate { config });
    }
    Ok(Command::Serve { config, listen })
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|arg| arg == "check") {
        return check(args);
    }
    if args.peek().is_some_and(|arg| arg == "new-plugin") {
        args.next();
        return llm_host::scaffold::main(args);
    }
    if args.peek().is_some_and(|arg| arg == "chat") {
        args.next();
        return llm_host::chat::main(args);
    }
    // Hidden: the host runs itself this way to learn what a library is
    // without loading it into its own process.
    if args
        .peek()
        .is_some_and(|arg| arg == llm_host::plugins::probe::ARG)
    {
        args.next();
        return llm_host::plugins::probe::main(args);
    }
    // Hidden: the host runs a backend configured with
    // `isolation = "process"` in a child process this way.
    if args
        .peek()
        .is_some_and(|arg| arg == llm_host::plugins::isolated::runner::ARG)
    {
        args.next();
        return llm_host::plugins::isolated::runner::main(args);
    }
    let command = match parse_args(args) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("llm-host: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let _log = init_logging();
    match command {
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!(
                "llm-host {} (plugin-api {})",
                env!("CARGO_PKG_VERSION"),
                llm_host_plugin_api::API_VERSION
            );
            ExitCode::SUCCESS
        }
        Command::Plugins { config } => llm_host::list_plugins(&config),
        Command::Validate { config } => llm_host::validate(&config),
        Command::Serve { config, listen } => llm_host::run(&config, listen),
    }
}

/// `llm-host check ...` runs `llm-host-check`, installed beside this binary
/// (`cargo build` builds both), with the same arguments.
fn check(args: impl Iterator<Item = String>) -> ExitCode {
    let checker = std::env::current_exe()
        .map(|exe| exe.with_file_name("llm-host-check"))
        .unwrap_or_else(|_| PathBuf::from("llm-host-check"));
    match std::process::Command::new(&checker).args(args).status() {
        Ok(status) => match status.code() {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            // Killed by a signal (a plugin that aborted): a failure.
            None => {
                eprintln!("llm-host check: {status}");
                ExitCode::FAILURE
            }
        },
        Err(err) => {
            eprintln!(
                "llm-host check: cannot run {}: {err} (it is built with llm-host: cargo build)",
                checker.display()
            );
            ExitCode::from(2)
        }
    }
}
