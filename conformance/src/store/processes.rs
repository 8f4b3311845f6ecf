//! The checks that race two processes on one store: `process_cas` and
//! `process_increments`.
//!
//! Two hosts sharing a store are two processes, and a save's compare and
//! write must be one step across them. The `shared_*` checks race two
//! adapters inside one process, which a store that locks through something
//! all of the process's adapters share (a `Mutex` in a static) passes; these
//! checks start a second process ([`SecondProcess`]) that builds its own
//! adapter from the same settings and races this one.
//!
//! The second process runs [`serve_race`]: it reads its job from the
//! environment variable [`RACE_ENV`], builds the adapter, prints
//! `llm-host-conformance-race: ready VERSION` (the version at which it loads
//! the job's session) on stdout, then answers commands read from stdin, one
//! a line, each with one `llm-host-conformance-race: ...` line:
//!
//! | command | what it does | answer |
//! |---|---|---|
//! | `save R` | saves the session at expected version `R` | `saved V`, `conflict C` or `error TEXT` |
//! | `load` | loads the session | `loaded V DATA`, or `loaded 0` |
//! | `go` | runs the job's increments (workers `p0`, `p1`, ...) | `done CONFLICTS` or `error TEXT` |
//! | `quit` (or the end of stdin) | returns | nothing |
//!
//! Lines without the `llm-host-conformance-race:` tag are ignored, and the
//! tag need not start the line (a test harness may print before it).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use llm_host_plugin_api::{
    serde_json::{self, json, Value},
    SaveOutcome,
};

use super::increments::{create_counter, run_workers, tags, verify_counter, INCREMENTS_WAIT};
use super::{exactly_one_winner, Client, Found, MakeStore, Suite};

/// The environment variable that holds a second process's job (JSON). A
/// process started with it set runs no suite of its own:
/// [`check_store`](super::check_store) and the functions built on it answer
/// no results there.
pub const RACE_ENV: &str = "LLM_HOST_CONFORMANCE_RACE";

/// What tags the second process's protocol lines on its stdout.
const TAG: &str = "llm-host-conformance-race:";

/// How long the second process may take to build its adapter and answer
/// `ready` (a test run again in it first runs its setup).
const READY_WAIT: Duration = Duration::from_secs(60);

/// How long the second process may take to answer one save or load.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Rounds of two racing saves in `process_cas`.
const ROUNDS: u64 = 50;

/// Threads per process, and increments per thread, in `process_increments`.
const THREADS: usize = 2;
const INCREMENTS: usize = 10;

/// What a store that fails these checks (and passes `shared_*`) is told.
const ACROSS: &str = "the compare and the write of a save must be one step across processes (a \
                      transaction, a conditional statement, a lock the storage itself holds such \
                      as flock); a lock inside one process, even a Mutex in a static, does not \
                      exclude another host";

/// Why the `process_*` checks skip a store in process.
const IN_PROCESS: &str = "the store is in process (its in_process() answers true): no other \
                          process can reach its sessions, so there is no atomicity across \
                          processes to check";

/// How the `process_*` checks start a second process of the store: a
/// program that builds an adapter of the same store, with the same settings,
/// and hands it to [`serve_race`]. Give it in
/// [`StoreOptions::with_second_process`](super::StoreOptions::with_second_process).
///
/// [`check_plugin`](super::check_plugin) makes one that runs the calling
/// test again; `llm-host check` one that runs itself on the same library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecondProcess(How);

#[derive(Clone, Debug, PartialEq, Eq)]
enum How {
    /// `program args...`, with the job (and `call`, if any, in it) in
    /// [`RACE_ENV`].
    Run {
        program: PathBuf,
        args: Vec<String>,
        call: Option<Value>,
    },
    /// None can be started, for this reason: the checks are skipped.
    Unavailable(String),
}

impl SecondProcess {
    /// `program args...`, run with the job in [`RACE_ENV`], stdin and stdout
    /// piped: it must build an adapter of the same store, from the same
    /// settings, and call [`serve_race`] with it.
    pub fn command(
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        SecondProcess(How::Run {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            call: None,
        })
    }

    /// A second process that runs this test binary's test `test` again;
    /// `call` goes into the job, for [`check_plugin`](super::check_plugin)
    /// to find its own call by.
    pub(super) fn this_test(test: &str, call: Value) -> Self {
        match std::env::current_exe() {
            Ok(program) => SecondProcess(How::Run {
                program,
                args: [test, "--exact", "--include-ignored", "--test-threads", "1"]
                    .map(str::to_owned)
                    .to_vec(),
                call: Some(call),
            }),
            Err(err) => Self::unavailable(format!(
                "the test binary cannot be found to run it again as a second process: {err}"
            )),
        }
    }

    /// No second process, for `reason`: the `process_*` checks are skipped,
    /// saying it.
    pub(super) fn unavailable(reason: String) -> Self {
        SecondProcess(How::Unavailable(reason))
    }
}

/// The job of a second process, from [`RACE_ENV`]; `None` when it is not
/// set (this is not a second process).
pub(super) fn job() -> Option<Result<Value, String>> {
    let text = std::env::var(RACE_ENV).ok()?;
    Some(
        serde_json::from_str::<Value>(&text)
            .map_err(|err| format!("{RACE_ENV} is not a job (JSON): {err}")),
    )
}

/// The second process's side: builds an adapter with `make` and runs the job
/// in [`RACE_ENV`] through it, answering on stdout the commands read from
/// stdin (see the module docs), until `quit` or the end of stdin. An error
/// is also printed as the protocol's `error` answer.
///
/// # Errors
///
/// When [`RACE_ENV`] is missing or malformed, the adapter cannot be built,
/// a command is not understood, or a call the job needs fails.
pub fn serve_race(make: MakeStore<'_>) -> Result<(), String> {
    let result = job()
        .unwrap_or_else(|| Err(format!("{RACE_ENV} is not set: not a second process")))
        .and_then(|job| serve(make, &job));
    if let Err(err) = &result {
        say(&format!("error {err}"));
    }
    result
}

fn serve(make: MakeStore<'_>, job: &Value) -> Result<(), String> {
    let id = job["id"].as_str().ok_or("the job names no session")?;
    let adapter = make().map_err(|err| format!("could not build the adapter: {err}"))?;
    let store = Client(&adapter);
    let version = store.load(id)?.map_or(0, |session| session.version);
    say(&format!("ready {version}"));
    let count = |key: &str| job[key].as_u64().unwrap_or_default() as usize;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|err| format!("cannot read a command: {err}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["save", round] => {
                let round: u64 = round
                    .parse()
                    .map_err(|_| format!("unexpected command `{line}`"))?;
                say(&match store.save(id, round, "o", &round_data(round, 1)) {
                    Ok(SaveOutcome::Saved { version }) => format!("saved {version}"),
                    Ok(SaveOutcome::Conflict { current }) => format!("conflict {current}"),
                    Err(err) => format!("error {err}"),
                });
            }
            ["load"] => say(&match store.load(id)? {
                Some(session) => format!("loaded {} {}", session.version, session.data),
                None => "loaded 0".to_owned(),
            }),
            ["go"] => {
                let conflicts =
                    run_workers(&[&store], id, "p", count("threads"), count("increments"))?;
                say(&format!("done {conflicts}"));
            }
            ["quit"] => return Ok(()),
            [] => {}
            _ => return Err(format!("unexpected command `{line}`")),
        }
    }
    Ok(())
}

/// Prints one protocol line on stdout, whole, and flushes it.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{TAG} {text}\n").as_bytes());
    let _ = out.flush();
}

/// The document a racing save writes: its round and who wrote it (0: this
/// process, 1: the second).
fn round_data(round: u64, by: usize) -> String {
    format!(r#"{{"round":{round},"by":{by}}}"#)
}

/// A running second process, killed on drop if it has not exited by then.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// `the second process (PROGRAM ARGS)`, for messages.
    named: String,
}

/// How much of the end of the second process's stderr is kept.
const STDERR_KEPT: usize = 16 * 1024;

impl Worker {
    fn start(program: &PathBuf, args: &[String], job: &Value) -> Result<Worker, String> {
        let named = format!(
            "the second process (`{} {}`)",
            program.display(),
            args.join(" ")
        );
        let mut child = Command::new(program)
            .args(args)
            .env(RACE_ENV, job.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("could not start {named}: {err}"))?;
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(at) = line.find(TAG) {
                        if tx.send(line[at + TAG.len()..].trim().to_owned()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut stream) = child.stderr.take() {
            let kept = stderr.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buffer) {
                    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                    kept.extend_from_slice(&buffer[..n]);
                    let excess = kept.len().saturating_sub(STDERR_KEPT);
                    kept.drain(..excess);
                }
            });
        }
        Ok(Worker {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            named,
        })
    }

    fn send(&mut self, command: &str) -> Result<(), String> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or("the second process's stdin is closed")?;
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|err| format!("could not send `{command}` to {}: {err}", self.named))
    }

    /// The next answer, waiting up to `wait` for it; an `error` answer, an
    /// exit or a timeout is an error that says what was awaited.
    fn next(&mut self, wait: Duration, awaited: &str) -> Result<String, String> {
        match self.lines.recv_timeout(wait) {
            Ok(line) => match line.strip_prefix("error ") {
                Some(error) => Err(format!("{}: {error}", self.named)),
                None => Ok(line),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "{} did not answer {awaited} within {} s{}",
                self.named,
                wait.as_secs(),
                self.stderr_tail()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit(Duration::from_secs(5));
                Err(format!(
                    "{} exited ({}) before it answered {awaited}{}",
                    self.named,
                    status.map_or("still running".to_owned(), |s| s.to_string()),
                    self.stderr_tail()
                ))
            }
        }
    }

    /// Waits for `ready V` and checks that the second process loads the
    /// session, which this process saved at `version`, at that version.
    fn ready(&mut self, version: u64) -> Result<(), String> {
        let line = self.next(READY_WAIT, "ready")?;
        let found = line
            .strip_prefix("ready ")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{} answered `{line}`, expected `ready VERSION`", self.named))?;
        if found != version {
            return Err(format!(
                "a session saved at version {version} by this process loads as {} in a second \
                 process whose adapter was built from the same settings: the two do not share \
                 one store, as two hosts must (a store that keeps its sessions in its process's \
                 memory answers in_process() = true)",
                if found == 0 {
                    "none".to_owned()
                } else {
                    format!("version {found}")
                }
            ));
        }
        Ok(())
    }

    /// Sends `quit` and waits for the exit (a test run again in the second
    /// process finishes first).
    fn finish(mut self) {
        let _ = self.send("quit");
        self.stdin = None;
        self.wait_exit(Duration::from_secs(30));
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return None,
            }
        }
    }

    fn stderr_tail(&self) -> String {
        let kept = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&kept);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let last = &lines[lines.len().saturating_sub(5)..];
        if last.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends: {}", last.join(" | "))
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stdin = None;
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The second process to start for a check of `store`, or why the check is
/// skipped.
fn second_process(
    suite: &Suite<'_>,
    store: &Client<'_>,
) -> Result<(PathBuf, Vec<String>, Option<Value>), String> {
    let how = match &suite.options.second_process {
        None => return Err("no second process was given (StoreOptions::second_process)".into()),
        Some(SecondProcess(How::Unavailable(why))) => return Err(why.clone()),
        Some(SecondProcess(How::Run {
            program,
            args,
            call,
        })) => (program.clone(), args.clone(), call.clone()),
    };
    if store.0.in_process() {
        return Err(IN_PROCESS.to_owned());
    }
    Ok(how)
}

/// Starts the second process on `job` (with its call, if any) and waits for
/// it to be ready.
fn start(
    (program, args, call): (PathBuf, Vec<String>, Option<Value>),
    mut job: Value,
    version: u64,
) -> Result<Worker, String> {
    if let Some(call) = call {
        job["call"] = call;
    }
    let mut worker = Worker::start(&program, &args, &job)?;
    worker.ready(version)?;
    Ok(worker)
}

fn parse_outcome(line: &str) -> Result<SaveOutcome, String> {
    let number = |text: &str| text.parse::<u64>().ok();
    match line.split_once(' ') {
        Some(("saved", v)) => number(v).map(|version| SaveOutcome::Saved { version }),
        Some(("conflict", c)) => number(c).map(|current| SaveOutcome::Conflict { current }),
        _ => None,
    }
    .ok_or_else(|| format!("the second process answered `{line}` to a save"))
}

pub(super) fn process_cas(suite: &Suite<'_>, a: &Client<'_>) -> Result<Found, String> {
    let second = match second_process(suite, a) {
        Ok(second) => second,
        Err(why) => return Ok(Found::Skip(why)),
    };
    let id = suite.run.id("process_cas", "s");
    a.save_ok(&id, 0, "o", &round_data(0, 0))?;
    let mut worker = start(second, json!({ "check": "cas", "id": id }), 1)?;
    let mut last = round_data(0, 0);
    for round in 1..=ROUNDS {
        worker.send(&format!("save {round}"))?;
        let mine = a.save(&id, round, "o", &round_data(round, 0))?;
        let theirs = parse_outcome(&worker.next(ANSWER_WAIT, "a save")?)?;
        let winner = exactly_one_winner(&[mine, theirs], round).map_err(|problem| {
            format!(
                "round {round} of two saves at one version racing, one from this process and \
                 one from a second process with an adapter built from the same settings: \
                 {problem}; {ACROSS}"
            )
        })?;
        last = round_data(round, winner);
        a.expect(&id, round + 1, "o", &last)?;
    }
    worker.send("load")?;
    let loaded = worker.next(ANSWER_WAIT, "a load")?;
    let wanted = format!("loaded {} {last}", ROUNDS + 1);
    if loaded != wanted {
        return Err(format!(
            "after the last round the second process answered `{loaded}`, expected `{wanted}`"
        ));
    }
    worker.finish();
    Ok(Found::Pass(format!(
        "two processes with adapters built from the same settings share one store; in {ROUNDS} \
         rounds of two saves at one version racing, one from each process, exactly one won \
         each round"
    )))
}

pub(super) fn process_increments(suite: &Suite<'_>, a: &Client<'_>) -> Result<Found, String> {
    let second = match second_process(suite, a) {
        Ok(second) => second,
        Err(why) => return Ok(Found::Skip(why)),
    };
    let id = suite.run.id("process_increments", "s");
    create_counter(a, &id)?;
    let job = json!({
        "check": "increments",
        "id": id,
        "threads": THREADS,
        "increments": INCREMENTS,
    });
    let mut worker = start(second, job, 1)?;
    worker.send("go")?;
    let mine = run_workers(&[a], &id, "t", THREADS, INCREMENTS);
    let theirs = worker.next(INCREMENTS_WAIT + ANSWER_WAIT, "the end of its increments");
    let raced = mine.and_then(|mine| {
        let theirs = theirs?;
        let theirs = theirs
            .strip_prefix("done ")
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| format!("the second process answered `{theirs}` to go"))?;
        let mut wanted = tags("t", THREADS, INCREMENTS);
        wanted.extend(tags("p", THREADS, INCREMENTS));
        verify_counter(a, &id, &wanted)?;
        Ok(mine + theirs)
    });
    let conflicts = raced.map_err(|problem| {
        format!(
            "{THREADS} threads in this process and {THREADS} in a second one, {INCREMENTS} \
             increments each: {problem}; {ACROSS}"
        )
    })?;
    worker.finish();
    Ok(Found::Pass(format!(
        "2 processes x {THREADS} threads x {INCREMENTS} increments all applied once \
         ({conflicts} conflicts retried)"
    )))
}
