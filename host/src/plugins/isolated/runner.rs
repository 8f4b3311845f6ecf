//! The child's side: `llm-host __run-plugin` ([`ARG`]) loads one plugin
//! through the loader's own checks, builds its model adapter (`INIT`) or its
//! store adapter (`INIT_STORE`), and runs the turns the host sends (a
//! blocking adapter's each on a thread of its own, a stepped adapter's as
//! tasks: [`super::stepped_runner`]), writing their events back as frames
//! ([`super`] describes them); a store's calls are served by
//! [`super::store_runner`].
//!
//! The frames go out on the file descriptor that was stdout when the child
//! started; stdout itself is pointed at stderr, so a plugin that prints
//! cannot corrupt them. The child ends when its stdin closes (the host
//! stopped it, or died).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    EventSink, EventSink_TO, FinishReason, Flow, LogLevel, ModelAdapterBox, Next, PluginError,
    StoreAdapterBox, TurnWaker, TurnWaker_TO, Usage,
};

use super::wire::{to_child, to_host, Encoder, Frame};

/// The hidden argument that makes the host's executable a plugin's child.
pub const ARG: &str = "__run-plugin";

/// Events a turn may send beyond those the host has acknowledged before it
/// waits: a slow client slows the model down, as in the host's process.
pub const WINDOW: u64 = 256;

/// `llm-host __run-plugin`: see the module doc.
pub fn main(mut args: impl Iterator<Item = String>) -> ExitCode {
    if args.next().is_some() {
        eprintln!("usage: llm-host {ARG} (used by the host itself)");
        return ExitCode::from(2);
    }
    // SAFETY: fcntl and dup2 on the standard descriptors, which are open.
    // The frame pipe is close-on-exec: a process the plugin starts must not
    // hold it open, or the host would not see this child's end.
    let frames = unsafe {
        let out = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if out < 0 || libc::dup2(2, 1) < 0 {
            eprintln!("llm-host {ARG}: cannot set up the frame pipe");
            return ExitCode::from(2);
        }
        File::from_raw_fd(out)
    };
    let _log = crate::init_logging();
    let out = Out::new(frames);
    let mut input = BufReader::new(std::io::stdin().lock());
    let adapter = match init(&mut input) {
        Ok((name, built)) => {
            let mut enc = Encoder::default();
            enc.begin(to_host::READY, 0).str(&name).finish();
            send(&out, &enc.buf);
            match built {
                Built::Model(adapter) => adapter,
                Built::Store(store) => super::store_runner::serve(store, out, &mut input),
            }
        }
        Err(message) => {
            let mut enc = Encoder::default();
            enc.begin(to_host::REFUSED, 0).str(&message).finish();
            send(&out, &enc.buf);
            return ExitCode::FAILURE;
        }
    };
    let adapter = Arc::new(adapter);
    let mut turns: HashMap<u64, Arc<TurnState>> = HashMap::new();
    loop {
        let mut frame = match Frame::read(&mut input) {
            Ok(Some(frame)) => frame,
            // The host closed the pipe (or wrote garbage): nothing more to do.
            Ok(None) | Err(_) => std::process::exit(0),
        };
        turns.retain(|_, state| !state.done.load(Ordering::Acquire));
        match frame.kind {
            to_child::GENERATE => {
                let Ok(request) = frame.str() else {
                    std::process::exit(3)
                };
                let state = Arc::new(TurnState::default());
                turns.insert(frame.turn, state.clone());
                let (adapter, to_host, turn) = (adapter.clone(), out.clone(), frame.turn);
                if adapter.stepped() {
                    super::stepped_runner::spawn(adapter, to_host, turn, state, request);
                    continue;
                }
                let spawned = std::thread::Builder::new()
                    .name(format!("turn-{turn}"))
                    .spawn(move || run_turn(&adapter, to_host, turn, state, &request));
                if spawned.is_err() {
                    let mut enc = Encoder::default();
                    enc.begin(to_host::FAILED, frame.turn)
                        .str("internal")
                        .str("the plugin's process cannot start a thread")
                        .finish();
                    send(&out, &enc.buf);
                }
            }
            to_child::CANCEL => {
                if let Some(state) = turns.get(&frame.turn) {
                    state.cancelled.store(true, Ordering::Release);
                    state.wake();
                }
            }
            to_child::ACK => {
                if let (Some(state), Ok(taken)) = (turns.get(&frame.turn), frame.u64()) {
                    *state.lock() = taken;
                    state.wake();
                }
            }
            _ => {}
        }
    }
}

/// What the child runs.
enum Built {
    Model(ModelAdapterBox),
    Store(StoreAdapterBox),
}

/// Reads the INIT (or INIT_STORE) frame, loads the plugin and builds its
/// adapter.
fn init(input: &mut impl std::io::Read) -> Result<(String, Built), String> {
    let mut frame = match Frame::read(input) {
        Ok(Some(frame)) if matches!(frame.kind, to_child::INIT | to_child::INIT_STORE) => frame,
        _ => return Err("the host sent no INIT frame".to_owned()),
    };
    let store = frame.kind == to_child::INIT_STORE;
    let fields = (|| {
        Ok::<_, std::io::Error>((
            frame.str()?,
            frame.str()?,
            frame.str()?,
            frame.str()?,
            frame.str()?,
            frame.str()?,
            frame.u64()?,
        ))
    })();
    let (name, file, staged, hash, base_dir, settings, memory_limit) =
        fields.map_err(|err| format!("INIT frame: {err}"))?;
    if memory_limit > 0 {
        limit_memory(memory_limit)?;
    }
    let settings: serde_json::Value =
        serde_json::from_str(&settings).map_err(|err| format!("settings: {err}"))?;
    // Under a memory limit, a failure to map or build may be the limit's.
    let limited = |why: String| match memory_limit {
        0 => why,
        bytes => format!(
            "{why} (under its memory limit of {} MiB, isolation.memory_limit_mb)",
            bytes >> 20
        ),
    };
    let plugin = super::super::loader::load_isolated(
        Path::new(&file),
        Path::new(&staged),
        &hash,
        Path::new(&base_dir),
        &name,
    )
    .map_err(limited)?;
    let refused = |err| limited(format!("plugin `{name}` refused its settings: {err}"));
    let built = if store {
        let adapter = plugin.new_store(&settings).map_err(refused)?;
        if adapter.in_process() {
            return Err(format!(
                "plugin `{name}`'s store keeps its sessions in its own process's memory: \
                 in a process of its own they would be lost with each restart \
                 (isolation = \"process\" is for stores that keep them elsewhere)"
            ));
        }
        Built::Store(adapter)
    } else {
        Built::Model(plugin.new_model(&settings).map_err(refused)?)
    };
    // The library stays mapped for the child's life.
    std::mem::forget(plugin);
    Ok((name, built))
}

/// Sets `RLIMIT_AS` to `bytes`, soft and hard: the plugin cannot lift it.
/// What is mapped already stays; later mappings past it fail.
fn limit_memory(bytes: u64) -> Result<(), String> {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct it is given, which lives on.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        return Err(format!(
            "cannot set the memory limit (RLIMIT_AS to {} MiB): {}",
            bytes >> 20,
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The frame pipe to the host, written by every turn's thread. Frames sent
/// while one thread writes are gathered and go out in that thread's next
/// write: one system call for many frames when turns stream at once (one
/// per frame cost about as much CPU as the rest of the child's work).
pub(super) struct Out {
    state: Mutex<Gathered>,
}

struct Gathered {
    file: Option<File>,
    /// Whole frames waiting for the writing thread.
    waiting: Vec<u8>,
}

impl Out {
    pub(super) fn new(file: File) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Gathered {
                file: Some(file),
                waiting: Vec::new(),
            }),
        })
    }
}

thread_local! {
    /// Whether this thread holds its frames until [`release`]: the worker
    /// of the stepped turns' runtime ([`super::stepped_runner`]).
    static HOLDS: Cell<bool> = const { Cell::new(false) };
    /// The frames it holds.
    static HELD: RefCell<Option<(Arc<Out>, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Frames a holding thread gathers at most before it writes them anyway.
const HOLD_MAX: usize = 64 * 1024;

/// From now on this thread holds the frames it sends until [`release`]
/// (or until [`HOLD_MAX`] bytes wait), in order.
pub(super) fn hold_frames() {
    HOLDS.set(true);
}

/// Writes the frames this thread held. The stepped turns' worker calls it
/// before it parks: the events of every turn its timers woke at one tick go
/// out in one write, and the host reads them in one.
pub(super) fn release() {
    let held = HELD.with_borrow_mut(|held| {
        held.as_mut()
            .filter(|(_, bytes)| !bytes.is_empty())
            .map(|(out, bytes)| (out.clone(), std::mem::take(bytes)))
    });
    if let Some((out, bytes)) = held {
        write_frames(&out, &bytes);
    }
}

/// Sends `bytes` (whole frames), in order with the frames this thread sent
/// before: at once, or, on a thread that holds its frames, with the next
/// [`release`].
pub(super) fn send(out: &Arc<Out>, bytes: &[u8]) {
    if !HOLDS.get() {
        return write_frames(out, bytes);
    }
    let full = HELD.with_borrow_mut(|held| {
        let (_, waiting) = held.get_or_insert_with(|| (out.clone(), Vec::new()));
        waiting.extend_from_slice(bytes);
        waiting.len() >= HOLD_MAX
    });
    if full {
        release();
    }
}

/// Writes `bytes` (whole frames), in order with the frames this thread sent
/// before; a host that is gone ends the child. A thread that finds another
/// writing leaves its frames to it; the writer takes the file out of the
/// lock while it writes and goes on until nothing waits.
fn write_frames(out: &Out, bytes: &[u8]) {
    let lock = || out.state.lock().unwrap_or_else(|p| p.into_inner());
    let mut state = lock();
    state.waiting.extend_from_slice(bytes);
    let Some(mut file) = state.file.take() else {
        // Another thread writes, and will write these too.
        return;
    };
    let mut batch = Vec::new();
    loop {
        std::mem::swap(&mut batch, &mut state.waiting);
        drop(state);
        if file.write_all(&batch).is_err() {
            std::process::exit(0);
        }
        batch.clear();
        state = lock();
        if state.waiting.is_empty() {
            state.file = Some(file);
            return;
        }
    }
}

/// What the reading thread tells a turn's thread.
#[derive(Default)]
pub(super) struct TurnState {
    cancelled: AtomicBool,
    done: AtomicBool,
    /// Events the host has taken.
    taken: Mutex<u64>,
    /// A stepped turn's waker was called.
    pub(super) woken: AtomicBool,
    changed: Condvar,
    /// Wakes a turn run in steps on the child's runtime (a wake, an ACK, a
    /// cancel), as `changed` does a turn on a thread.
    pub(super) notify: tokio::sync::Notify,
}

impl TurnState {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.taken.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn wake(&self) {
        let _taken = self.lock();
        self.changed.notify_all();
        self.notify.notify_one();
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Waits up to `limit` for a change (a wake, an ACK, a cancel).
    /// `until` is given the events taken.
    fn wait(&self, limit: Duration, until: impl Fn(u64) -> bool) {
        let taken = self.lock();
        let _ = self
            .changed
            .wait_timeout_while(taken, limit, |taken| !until(*taken) && !self.cancelled());
    }
}

fn run_turn(
    adapter: &ModelAdapterBox,
    out: Arc<Out>,
    turn: u64,
    state: Arc<TurnState>,
    request: &str,
) {
    let mut sink = ChildSink::new(out, turn, state.clone(), true);
    let result = if adapter.stepped() {
        stepped(adapter, &mut sink, request)
    } else {
        adapter
            .generate(
                RStr::from(request),
                EventSink_TO::from_ptr(&mut sink, TD_Opaque),
            )
            .into_result()
    };
    finish(sink, result);
}

/// Sends a turn's DONE (or FAILED, with `result`'s error) and marks it done.
pub(super) fn finish(mut sink: ChildSink, result: Result<(), PluginError>) {
    let (turn, state) = (sink.turn, sink.state.clone());
    sink.enc.buf.clear();
    match result {
        Ok(()) => sink.enc.begin(to_host::DONE, turn).finish(),
        Err(err) => sink
            .enc
            .begin(to_host::FAILED, turn)
            .str(err.kind.as_str())
            .str(err.message.as_str())
            .finish(),
    }
    send(&sink.out, &sink.enc.buf);
    state.done.store(true, Ordering::Release);
}

/// Runs a stepped adapter's turn on this thread: pauses and pending waits
/// end early on a cancel.
fn stepped(
    adapter: &ModelAdapterBox,
    sink: &mut ChildSink,
    request: &str,
) -> Result<(), PluginError> {
    let waker = TurnWaker_TO::from_value(Woken(sink.state.clone()), TD_Opaque);
    let mut stepper = adapter.start(RStr::from(request), waker).into_result()?;
    loop {
        if sink.state.cancelled() {
            return Ok(());
        }
        let step = stepper
            .step(EventSink_TO::from_ptr(&mut *sink, TD_Opaque))
            .into_result()?;
        match step.next() {
            Next::Done => return Ok(()),
            Next::Ready => {}
            Next::Sleep(pause) => sink.state.wait(pause, |_| false),
            Next::Pending => {
                let state = sink.state.clone();
                state.wait(Duration::from_secs(3600), |_| {
                    state.woken.load(Ordering::Acquire)
                });
                sink.state.woken.store(false, Ordering::Release);
            }
            Next::Unknown(kind) => {
                return Err(PluginError::internal(format!(
                    "the model's step answered kind {kind}, which this host does not know"
                )))
            }
        }
    }
}

pub(super) struct Woken(pub(super) Arc<TurnState>);

impl TurnWaker for Woken {
    fn wake(&self) {
        self.0.woken.store(true, Ordering::Release);
        self.0.wake();
    }
}

/// The plugin ABI's event sink in the child: each event is a frame to the
/// host.
pub(super) struct ChildSink {
    out: Arc<Out>,
    turn: u64,
    state: Arc<TurnState>,
    enc: Encoder,
    /// Events sent.
    pub(super) sent: u64,
    /// Whether an event past the window waits for the host in the sink (a
    /// turn on a thread of its own); a turn run in steps waits between
    /// steps instead.
    waits: bool,
}

impl ChildSink {
    pub(super) fn new(out: Arc<Out>, turn: u64, state: Arc<TurnState>, waits: bool) -> Self {
        Self {
            out,
            turn,
            state,
            enc: Encoder::default(),
            sent: 0,
            waits,
        }
    }

    fn emit(&mut self, kind: u8, fields: impl FnOnce(&mut Encoder)) -> Flow {
        if self.state.cancelled() {
            return Flow::STOP;
        }
        self.enc.buf.clear();
        self.enc.begin(kind, self.turn);
        fields(&mut self.enc);
        self.enc.finish();
        send(&self.out, &self.enc.buf);
        self.sent += 1;
        let sent = self.sent;
        if self.waits && sent > *self.state.lock() + WINDOW {
            // The host is behind (a slow client): wait for it.
            self.state
                .wait(Duration::from_secs(3600), |taken| sent <= taken + WINDOW);
        }
        if self.state.cancelled() {
            Flow::STOP
        } else {
            Flow::CONTINUE
        }
    }
}

impl EventSink for ChildSink {
    fn start(&mut self, id: RStr<'_>, model_id: RStr<'_>) -> Flow {
        self.emit(to_host::START, |e| {
            e.str(id.as_str()).str(model_id.as_str());
        })
    }

    fn text(&mut self, text: RStr<'_>) -> Flow {
        self.emit(to_host::TEXT, |e| {
            e.str(text.as_str());
        })
    }

    fn reasoning(&mut self, text: RStr<'_>) -> Flow {
        self.emit(to_host::REASONING, |e| {
            e.str(text.as_str());
        })
    }

    fn tool_call(&mut self, id: RStr<'_>, name: RStr<'_>, arguments: RStr<'_>) -> Flow {
        self.emit(to_host::TOOL_CALL, |e| {
            e.str(id.as_str())
                .str(name.as_str())
                .str(arguments.as_str());
        })
    }

    fn usage(&mut self, usage: Usage) -> Flow {
        self.emit(to_host::USAGE, |e| {
            e.u64(usage.input_tokens)
                .u64(usage.output_tokens)
                .u64(usage.total_tokens);
        })
    }

    fn end(&mut self, reason: FinishReason) -> Flow {
        self.emit(to_host::END, |e| {
            e.u8(reason.0);
        })
    }

    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        self.emit(to_host::ERROR, |e| {
            e.str(code.as_str()).str(message.as_str());
        })
    }

    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, data_json: RStr<'_>) -> Flow {
        self.emit(to_host::DIAGNOSTIC, |e| {
            e.str(level.as_str())
                .str(message.as_str())
                .str(data_json.as_str());
        })
    }

    fn is_cancelled(&self) -> bool {
        self.state.cancelled()
    }
}
