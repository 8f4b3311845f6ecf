//! One plugin child process, seen from the host: started and handed its
//! plugin ([`Child::spawn`]), its turns (a model's) or calls (a store's) by
//! id, the thread that reads its frames, what is written to it, and what
//! happened when it ended.
//!
//! Frames to the child go through its [`Input`], which never blocks.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::input::Input;
use super::runner::ARG;
use super::stepped::TurnQueue;
use super::wire::{to_child, to_host, Encoder, Event, Frame};
use crate::core::ports::ModelError;

/// What a child is started with.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The host's executable.
    pub program: PathBuf,
    /// The backend's name in config.
    pub backend: String,
    /// The plugin's name.
    pub plugin: String,
    /// The operator's library file.
    pub file: PathBuf,
    /// The staged copy the child maps.
    pub staged: PathBuf,
    /// Its SHA-256, hex.
    pub hash: String,
    /// Where the plugin resolves relative paths.
    pub base_dir: PathBuf,
    /// The backend's settings, JSON.
    pub settings: String,
    /// Whether the child builds a store adapter (else a model adapter).
    pub store: bool,
}

/// The host's own executable, as the child is run: `/proc/self/exe`, which
/// is this very binary even once its file was replaced or removed (an
/// upgrade, a rebuild), so a child always speaks the host's framing.
pub fn own_executable() -> PathBuf {
    let this = PathBuf::from("/proc/self/exe");
    if this.exists() {
        return this;
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("llm-host"))
}

/// What a turn hears from its child.
#[derive(Debug)]
pub enum Incoming {
    /// A model event.
    Event(Event),
    /// `generate` returned; or a store call failed (`Err`).
    Done(Result<(), ModelError>),
    /// A store call's answer.
    Reply(Frame),
    /// The child is gone; why.
    Crashed(String),
}

/// Why a turn could not be opened.
pub enum Refusal {
    /// The child runs as many turns as it may.
    Busy,
    /// The child is gone; why.
    Dead(String),
}

/// Called once when the child ends: why, or `None` when the host stopped it.
pub type OnExit = Box<dyn FnOnce(u32, Option<String>) + Send>;

/// A running child.
pub struct Child {
    /// Its process id.
    pub pid: u32,
    input: Arc<Input>,
    process: Mutex<std::process::Child>,
    turns: Mutex<Turns>,
    next_turn: AtomicU64,
    /// Why the host killed it, if it did.
    killed: Mutex<Option<String>>,
    /// Set when the host stops it: its end is no crash.
    closing: AtomicBool,
    /// Its `RLIMIT_AS`, in MiB.
    memory_limit_mb: Option<u64>,
}

#[derive(Default)]
struct Turns {
    open: HashMap<u64, Route>,
    dead: Option<String>,
}

/// Where the frames of an open id go.
enum Route {
    /// A store call's: its one answer.
    Call(tokio::sync::oneshot::Sender<Incoming>),
    /// A turn run in steps: every event, then its end, queued.
    Queue(Arc<TurnQueue>),
}

impl Route {
    fn send(self, incoming: Incoming) {
        match self {
            Route::Call(to) => {
                let _ = to.send(incoming);
            }
            Route::Queue(queue) => queue.push(incoming),
        }
    }
}

impl Child {
    /// Starts a child for `launch` and waits up to `timeout` for it to load
    /// the plugin and build the adapter. With `memory_limit_mb` the child
    /// limits its address space to that (`RLIMIT_AS`) before it loads it.
    pub fn spawn(
        launch: &Launch,
        memory_limit_mb: Option<u64>,
        timeout: Duration,
        on_exit: OnExit,
    ) -> Result<Arc<Child>, String> {
        use std::os::unix::process::CommandExt;
        let mut process = Command::new(&launch.program)
            .arg(ARG)
            // A group of its own: a ctrl-c at the host's terminal is the
            // host's to handle (a graceful shutdown), not the child's.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", launch.program.display()))?;
        let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
            let _ = process.kill();
            let _ = process.wait();
            return Err("the child's pipes are missing".to_owned());
        };
        let mut init = Encoder::default();
        let kind = if launch.store {
            to_child::INIT_STORE
        } else {
            to_child::INIT
        };
        init.begin(kind, 0)
            .str(&launch.plugin)
            .str(&launch.file.to_string_lossy())
            .str(&launch.staged.to_string_lossy())
            .str(&launch.hash)
            .str(&launch.base_dir.to_string_lossy())
            .str(&launch.settings)
            .u64(memory_limit_mb.map_or(0, |mb| mb << 20))
            .finish();
        let child = Arc::new(Child {
            pid: process.id(),
            input: Input::new(stdin),
            process: Mutex::new(process),
            turns: Mutex::new(Turns::default()),
            next_turn: AtomicU64::new(1),
            killed: Mutex::new(None),
            closing: AtomicBool::new(false),
            memory_limit_mb,
        });
        // The child reads its INIT first; what the pipe cannot take at once
        // (large settings) goes through the writer thread, within the start
        // timeout below. A child that died already shows as no answer.
        child.send(&init.buf);
        let (ready, answer) = mpsc::channel();
        let reader = child.clone();
        let reading = std::thread::Builder::new()
            .name(format!("plugin-{}", launch.backend))
            .spawn(move || reader.read(stdout, ready, on_exit));
        if let Err(err) = reading {
            // No thread will reap it: end it here, not as a zombie.
            child.stop();
            child.kill("had no thread to read it".to_owned());
            let _ = child
                .process
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .wait();
            return Err(format!("cannot start a thread: {err}"));
        }
        match answer.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(child),
            Ok(Err(message)) => {
                child.stop();
                Err(message)
            }
            Err(_) => {
                child.stop();
                child.kill(format!(
                    "did not load the plugin within {} s",
                    timeout.as_secs()
                ));
                Err(format!(
                    "its process did not load the plugin within {} s and was killed",
                    timeout.as_secs()
                ))
            }
        }
    }

    /// Whether it still runs.
    pub fn alive(&self) -> bool {
        self.lock_turns().dead.is_none()
    }

    /// Turns running on it now.
    pub fn running(&self) -> usize {
        self.lock_turns().open.len()
    }

    /// Opens a turn run in steps: its id; its frames go to `queue`.
    pub fn open_queue(&self, max: u32, queue: Arc<TurnQueue>) -> Result<u64, Refusal> {
        self.open(Some(max), Route::Queue(queue))
    }

    /// Opens a store call: its id and where its answer comes (a
    /// [`Incoming::Reply`], a failure as [`Incoming::Done`], or
    /// [`Incoming::Crashed`]). [`Child::close`] forgets it.
    pub fn call(&self) -> Result<(u64, tokio::sync::oneshot::Receiver<Incoming>), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.open(None, Route::Call(tx)) {
            Ok(call) => Ok((call, rx)),
            Err(Refusal::Dead(why)) => Err(why),
            Err(Refusal::Busy) => Err("the plugin's process is busy".to_owned()),
        }
    }

    /// Gives `route` a new id, unless the child is dead or already has
    /// `max` ids open.
    fn open(&self, max: Option<u32>, route: Route) -> Result<u64, Refusal> {
        let mut turns = self.lock_turns();
        if let Some(why) = &turns.dead {
            return Err(Refusal::Dead(why.clone()));
        }
        if max.is_some_and(|max| turns.open.len() >= max as usize) {
            return Err(Refusal::Busy);
        }
        let id = self.next_turn.fetch_add(1, Ordering::Relaxed);
        turns.open.insert(id, route);
        Ok(id)
    }

    /// Forgets a turn: later frames of it are dropped.
    pub fn close(&self, turn: u64) {
        self.lock_turns().open.remove(&turn);
    }

    /// Writes frames to the child, or queues what its pipe cannot take yet
    /// for the writer thread; never blocks. False if it cannot take them:
    /// it is gone, or it was killed for not reading.
    pub fn send(&self, bytes: &[u8]) -> bool {
        match self.input.send(bytes, self.pid) {
            Ok(sent) => sent,
            Err(waiting) => {
                self.kill(format!(
                    "did not read what the host sent ({} MiB waited)",
                    waiting >> 20
                ));
                false
            }
        }
    }

    /// Kills it (SIGKILL); `why` says so in place of the signal.
    pub fn kill(&self, why: String) {
        self.killed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
        let mut process = self.process.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(process.try_wait(), Ok(None)) {
            let _ = process.kill();
        }
    }

    /// Stops it: its stdin closes and it exits; no crash is reported.
    pub fn stop(&self) {
        self.closing.store(true, Ordering::Release);
        self.input.close();
    }

    /// Stops it for good (its backend is no longer used) and makes sure it
    /// ends: a child still there `grace` after its stdin closed (a plugin's
    /// exit handlers that hang) is killed. Its end is no crash either way.
    pub fn retire(self: &Arc<Self>, grace: Duration) {
        self.stop();
        let child = self.clone();
        let watching = std::thread::Builder::new()
            .name(format!("plugin-stop-{}", self.pid))
            .spawn(move || {
                let until = Instant::now() + grace;
                while child.alive() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if child.alive() {
                    tracing::warn!(
                        pid = child.pid,
                        "plugin process did not exit within {} ms of being stopped; killing it",
                        grace.as_millis()
                    );
                    child.kill(format!(
                        "did not exit within {} ms of being stopped",
                        grace.as_millis()
                    ));
                }
            });
        if watching.is_err() {
            self.kill("was stopped with no thread to watch it exit".to_owned());
        }
    }

    fn lock_turns(&self) -> std::sync::MutexGuard<'_, Turns> {
        self.turns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reading thread: the handshake, then each frame to its turn, then
    /// the child's end.
    fn read(&self, stdout: ChildStdout, ready: mpsc::Sender<Result<(), String>>, on_exit: OnExit) {
        let mut input = BufReader::with_capacity(64 * 1024, stdout);
        let mut ready = Some(ready);
        let trouble = loop {
            let mut frame = match Frame::read(&mut input) {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(err) => break Some(format!("sent a bad frame ({err})")),
            };
            if let Some(ready) = ready.take() {
                let answer = match frame.kind {
                    to_host::READY => Ok(()),
                    to_host::REFUSED => Err(frame.str().unwrap_or_default()),
                    kind => Err(format!("answered frame kind {kind} to INIT")),
                };
                let refused = answer.is_err();
                if refused {
                    // A start that failed, not a crash: the caller says so.
                    self.closing.store(true, Ordering::Release);
                }
                let _ = ready.send(answer);
                if refused {
                    break None;
                }
                continue;
            }
            let turn = frame.turn;
            let incoming = match Event::read(&mut frame) {
                Ok(Some(event)) => Incoming::Event(event),
                Ok(None) if to_host::is_store_reply(frame.kind) => Incoming::Reply(frame),
                Ok(None) if frame.kind == to_host::DONE => Incoming::Done(Ok(())),
                Ok(None) if frame.kind == to_host::FAILED => {
                    let code = frame.str().unwrap_or_default();
                    let message = frame.str().unwrap_or_default();
                    Incoming::Done(Err(ModelError { code, message }))
                }
                Ok(None) => continue,
                Err(err) => break Some(format!("sent a bad frame ({err})")),
            };
            let mut turns = self.lock_turns();
            let to = match &incoming {
                Incoming::Event(_) => match turns.open.get(&turn) {
                    Some(Route::Queue(queue)) => Some(Route::Queue(queue.clone())),
                    _ => None,
                },
                Incoming::Done(_) | Incoming::Reply(_) | Incoming::Crashed(_) => {
                    turns.open.remove(&turn)
                }
            };
            drop(turns);
            if let Some(to) = to {
                to.send(incoming);
            }
        };
        if let Some(trouble) = trouble {
            self.kill(trouble);
        }
        if ready.is_some() {
            // It ended before it was ready: a start that failed (the
            // caller reports it), not a crash.
            self.closing.store(true, Ordering::Release);
        }
        let status = self.reap();
        // Nothing more can reach it; a writer thread waiting lets go.
        self.input.close();
        let killed = self
            .killed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let why = describe(self.pid, status, killed, self.memory_limit_mb);
        // The exit is recorded (the backoff before the next start) before
        // the child shows as dead: a caller that finds it dead then waits.
        let closing = self.closing.load(Ordering::Acquire);
        on_exit(self.pid, (!closing).then(|| why.clone()));
        let mut turns = self.lock_turns();
        turns.dead = Some(why.clone());
        for (_, to) in turns.open.drain() {
            to.send(Incoming::Crashed(why.clone()));
        }
        drop(turns);
        if let Some(ready) = ready {
            let _ = ready.send(Err(why));
        }
    }

    /// Waits for the process to end (killing it if it lingers with its
    /// frame pipe closed).
    fn reap(&self) -> Option<ExitStatus> {
        let linger = Instant::now() + Duration::from_secs(2);
        loop {
            let mut process = self.process.lock().unwrap_or_else(|p| p.into_inner());
            match process.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < linger => {}
                Ok(None) => {
                    let _ = process.kill();
                    return process.wait().ok();
                }
                Err(_) => return None,
            }
            drop(process);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.input.close();
    }
}

/// Why a child ended, for the turns that failed, the log and the admin API.
/// An abort or a segfault under a memory limit names the limit: an
/// allocation past it ends a child so.
fn describe(
    pid: u32,
    status: Option<ExitStatus>,
    killed: Option<String>,
    memory_limit_mb: Option<u64>,
) -> String {
    let how = match status {
        None => "ended (its status could not be read)".to_owned(),
        Some(status) => match (status.signal(), status.code()) {
            (Some(signal), _) => format!(
                "was killed by {}{}",
                signal_name(signal),
                if status.core_dumped() {
                    " (core dumped)"
                } else {
                    ""
                }
            ),
            (None, Some(code)) => format!("exited with status {code}"),
            (None, None) => format!("ended ({status})"),
        },
    };
    let signal = status.and_then(|status| status.signal());
    let how = match memory_limit_mb {
        Some(mb) if killed.is_none() && matches!(signal, Some(libc::SIGABRT | libc::SIGSEGV)) => {
            format!("{how}; its memory limit is {mb} MiB (isolation.memory_limit_mb)")
        }
        _ => how,
    };
    match killed {
        Some(why) => format!("the plugin's process (pid {pid}) {why}; it {how}"),
        None => format!("the plugin's process (pid {pid}) {how}"),
    }
}

/// `SIGSEGV` for 11, and so on.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}
