//! Learning a plugin library's name, version and kinds without running any
//! of its code in the host process.
//!
//! config.toml names plugins by the name a library reports about itself, and
//! that name is only known by running the library: `dlopen` runs its ELF
//! constructors, and the name comes from its root module's `info` function,
//! not from a symbol or a string the file could be searched for. The host
//! loads into its own process only the plugins the config names, so for
//! every other library the question "which plugin are you?" is asked in a
//! child process: the host's own executable, run as
//! `llm-host __probe-plugin STAGED_COPY` ([`ARG`], [`main`]), loads the
//! verified staged copy with the loader's own code (the same abi_stable
//! version and layout checks, with the same messages; the plugin's `init` is
//! not called) and prints one JSON line: the plugin's facts, or why it cannot
//! be loaded. Whatever the library does while loading (a crash, a hang, a
//! panic hook, threads, changed process state) stays in that child; a probe
//! that crashes, answers nothing or runs past [`TIMEOUT`] (it is then
//! killed) is an error for that file, which is never loaded into the host.
//!
//! Answers are cached by content hash in the [`super::loader::Loader`], so
//! each distinct library is probed once per host life, also across reloads;
//! probes of several new libraries run in parallel. When a probed plugin is
//! then loaded into the host, it must report the same name again.
//!
//! The probe runs as the host's user: it is no sandbox. Which files may run
//! at all is decided before it, by the ownership and mode checks of
//! [`super::library`]; the probe decides where a library that is not
//! configured runs: not in the host.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llm_host_plugin_api::Kinds;
use serde::{Deserialize, Serialize};

/// The hidden argument that makes the host's executable a probe.
pub const ARG: &str = "__probe-plugin";

/// How long a probe may take to load a library and answer.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How much of a probe's output is kept.
const MAX_OUTPUT: u64 = 64 * 1024;

/// What a plugin library says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// The plugin's name, as config.toml names it.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// One line on what it is.
    pub description: String,
    /// Which adapters it provides ([`Kinds`] bits).
    pub kinds: u32,
    /// The plugin-api version it was built against.
    pub api_version: String,
}

impl Facts {
    /// Which adapters it provides.
    pub fn kinds(&self) -> Kinds {
        Kinds(self.kinds)
    }
}

/// The probe's one line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Plugin(Facts),
    Error(String),
}

/// `llm-host __probe-plugin PATH`: loads the library at `PATH` and prints
/// what it is, or why it cannot be loaded, as one JSON line on stdout.
pub fn main(mut args: impl Iterator<Item = String>) -> ExitCode {
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: llm-host {ARG} LIBRARY (used by the host itself)");
        return ExitCode::from(2);
    };
    let answer = match super::loader::read_root(Path::new(&path)) {
        Ok((module, api_version)) => {
            let info = (module.info())();
            Answer::Plugin(Facts {
                name: info.name.to_string(),
                version: info.version.to_string(),
                description: info.description.to_string(),
                kinds: info.kinds.0,
                api_version,
            })
        }
        Err(message) => Answer::Error(message),
    };
    match serde_json::to_string(&answer) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("cannot encode the answer: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The answer of one probe.
#[derive(Clone, Debug)]
pub struct Probed {
    /// The plugin's facts, or why the library cannot be loaded.
    pub result: Result<Facts, String>,
    /// Whether the same bytes would give the same answer again (not after a
    /// timeout, or when the probe could not be started).
    pub lasting: bool,
}

impl Probed {
    fn passing(message: String) -> Self {
        Self {
            result: Err(message),
            lasting: false,
        }
    }
}

/// Runs probes: the program (the host's executable) and the time limit.
#[derive(Clone, Debug)]
pub struct Prober {
    program: PathBuf,
    timeout: Duration,
}

impl Prober {
    /// Probes run `program ARG LIBRARY`; `program` must answer as [`main`].
    pub fn new(program: PathBuf, timeout: Duration) -> Self {
        Self { program, timeout }
    }

    /// Probes run this process's own executable.
    pub fn current_exe() -> Self {
        let program = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("llm-host"));
        Self::new(program, TIMEOUT)
    }

    /// Probes each of `libraries`, several at once; answers in their order.
    pub fn probe_all(&self, libraries: &[PathBuf]) -> Vec<Probed> {
        let width = std::thread::available_parallelism().map_or(4, |n| n.get().max(4));
        let mut answers = Vec::with_capacity(libraries.len());
        for chunk in libraries.chunks(width) {
            std::thread::scope(|scope| {
                let running: Vec<_> = chunk
                    .iter()
                    .map(|library| scope.spawn(move || self.probe(library)))
                    .collect();
                for probe in running {
                    answers.push(probe.join().unwrap_or_else(|_| {
                        Probed::passing("the thread running its probe panicked".to_owned())
                    }));
                }
            });
        }
        answers
    }

    /// Probes `library` (a staged copy) in a child process.
    pub fn probe(&self, library: &Path) -> Probed {
        let spawned = Command::new(&self.program)
            .arg(ARG)
            .arg(library)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                return Probed::passing(format!(
                    "cannot start {} to probe it: {err}",
                    self.program.display()
                ))
            }
        };
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        let Some(status) = wait(&mut child, self.timeout) else {
            return Probed::passing(format!(
                "loading it took longer than {}s in a probe process, which was killed; it \
                 is not loaded (it would have hung the host)",
                self.timeout.as_secs()
            ));
        };
        // A grandchild may hold the pipes open: do not wait for it long.
        let grace = Duration::from_secs(1);
        let stdout = stdout.recv_timeout(grace).unwrap_or_default();
        let stderr = stderr.recv_timeout(grace).unwrap_or_default();
        let answer = String::from_utf8_lossy(&stdout)
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<Answer>(line).ok());
        let result = match answer {
            Some(Answer::Plugin(facts)) if status.success() => Ok(facts),
            Some(Answer::Error(message)) if status.success() => Err(message),
            _ => Err(format!(
                "loading it crashed a probe process ({status}){}; it is not loaded into \
                 the host",
                tail(&stderr)
            )),
        };
        Probed {
            result,
            lasting: true,
        }
    }
}

/// Reads all of `stream` on a thread (keeping the first [`MAX_OUTPUT`]
/// bytes, so the child never blocks on a full pipe); the bytes arrive on the
/// returned channel.
fn collect(stream: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut stream) = stream {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut stream).take(MAX_OUTPUT).read_to_end(&mut kept);
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
            let _ = tx.send(kept);
        });
    }
    rx
}

/// Waits up to `limit` for `child` to exit; kills it (and reaps it) after.
fn wait(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {}
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// The last lines of a probe's stderr, for the error message.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let last = &lines[lines.len().saturating_sub(3)..];
    if last.is_empty() {
        return String::new();
    }
    let joined: String = last.join(" | ").chars().take(600).collect();
    format!(": {joined}")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Held by each test here: a script being written while another test
    /// forks could not be executed (ETXTBSY).
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn script(body: &str) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("llm-host-probe-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).expect("mkdir");
        let path = dir.join("probe.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        (dir, path)
    }

    #[test]
    fn an_answer_is_read_from_the_last_json_line() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, program) = script(
            r#"echo "noise"; echo '{"plugin":{"name":"echo","version":"1","description":"d","kinds":1,"api_version":"0.1.1"}}'"#,
        );
        let probed = Prober::new(program, TIMEOUT).probe(Path::new("libx.so"));
        let facts = probed.result.expect("facts");
        assert_eq!(facts.name, "echo");
        assert_eq!(facts.kinds(), Kinds::MODEL);
        assert!(probed.lasting);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_crash_a_silence_and_a_hang_are_errors() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, program) = script("echo 'it went wrong' >&2; kill -SEGV $$");
        let probed = Prober::new(program, TIMEOUT).probe(Path::new("libx.so"));
        let err = probed.result.expect_err("crash");
        assert!(
            err.contains("SIGSEGV") && err.contains("it went wrong"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();

        let (dir, program) = script("exit 0");
        let err = Prober::new(program, TIMEOUT)
            .probe(Path::new("libx.so"))
            .result
            .expect_err("no answer");
        assert!(err.contains("probe"), "{err}");
        std::fs::remove_dir_all(dir).ok();

        let (dir, program) = script("exec sleep 30");
        let started = Instant::now();
        let probed = Prober::new(program, Duration::from_millis(200)).probe(Path::new("libx.so"));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(probed.result.expect_err("hang").contains("took longer"));
        assert!(!probed.lasting, "a timeout is not cached");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn probes_answer_in_order() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, program) = script(r#"echo "{\"error\":\"$2\"}""#);
        let libraries: Vec<PathBuf> = (0..9)
            .map(|i| PathBuf::from(format!("lib{i}.so")))
            .collect();
        let answers = Prober::new(program, TIMEOUT).probe_all(&libraries);
        let errors: Vec<String> = answers
            .into_iter()
            .map(|a| a.result.expect_err("an error answer"))
            .collect();
        let expected: Vec<String> = (0..9).map(|i| format!("lib{i}.so")).collect();
        assert_eq!(errors, expected);
        std::fs::remove_dir_all(dir).ok();
    }
}
