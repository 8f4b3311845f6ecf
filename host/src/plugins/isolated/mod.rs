//! Crash isolation: a model backend or a store configured with
//! `isolation = "process"` runs its plugin in a child process of its own,
//! so that a segfault, an abort, a stack overflow or a hang in the plugin
//! is that backend's (or store's) failure and not the host's.
//!
//! - [`runner`]: the child, `llm-host __run-plugin` (the host's own
//!   executable in a hidden mode, as the probe is): it loads the staged copy
//!   through the loader's own checks (hash verified, ABI checked, `init`
//!   called), builds the adapter from the backend's settings and runs the
//!   turns it is sent: a blocking adapter's each on a thread of its own.
//! - [`stepped_runner`]: in the child, a stepped adapter's turns as tasks
//!   of one small runtime instead of a thread each.
//! - [`store_runner`]: the same child for a store: its store calls, each on
//!   a thread of its own.
//! - [`child`]: one child seen from the host: its pipes, its turns (or
//!   store calls) by id, the thread that reads its frames and reports its
//!   end.
//! - [`input`]: what the host writes to a child, without ever blocking.
//! - [`supervisor`]: a child over its life, for a backend or a store: the
//!   running one, its health, a new one after a crash once the backoff has
//!   passed.
//! - [`model`]: the backend: the turn core's
//!   [`Model`](crate::core::ports::Model).
//! - [`stepped`]: one turn on a child, run in steps on the async workers
//!   (no host thread per turn), the wait for a new child after a crash, the
//!   first-event deadline.
//! - [`store`]: the store: async calls multiplexed over one child by id
//!   (the store timeout is the callers', `server.store_timeout_ms`). A
//!   store that keeps its sessions in its own memory (`in_process`, the
//!   memory plugin) refuses to start in a child: they would be lost with
//!   each restart.
//! - [`wire`]: the framing.
//!
//! # Framing
//!
//! The host writes to the child's stdin and reads the child's stdout (the
//! child points its own stdout at stderr first, so a plugin that prints
//! cannot break the stream; stderr is the host's, plugin log lines
//! included). Every frame is
//!
//! ```text
//! u32 LE  length of what follows (9 ..= 256 MiB)
//! u8      kind
//! u64 LE  turn id (0: none)
//! fields  in the kind's order: a string is u32 LE length + UTF-8 bytes,
//!         a number u64 LE, a byte u8
//! ```
//!
//! Host to child: `INIT` (plugin, file, staged copy, hash, base dir,
//! settings JSON, memory limit in bytes or 0) once, first, or `INIT_STORE`
//! (the same fields) for a store; `GENERATE` (request JSON) opens turn id;
//! `CANCEL` stops it (the sink's `is_cancelled` turns true and every later
//! event answers STOP); `ACK` (events taken so far) lets a turn that is
//! [`runner::WINDOW`] events ahead of the host go on, so a slow client slows
//! the model as in the host's process. Closing stdin stops the child.
//!
//! Child to host: `READY` (plugin name) or `REFUSED` (message) answers
//! `INIT`; a turn's events `START` (id, model id), `TEXT`, `REASONING`
//! (text), `TOOL_CALL` (id, name, arguments), `USAGE` (input, output, total),
//! `END` (finish reason byte), `ERROR` (code, message), `DIAGNOSTIC` (level,
//! message, data JSON), then `DONE` or `FAILED` (code, message): what
//! `generate` returned. Turns interleave freely; each turn's frames are in
//! order. The constants are in [`wire`].
//!
//! The request is the JSON the in-process path hands the adapter; events
//! carry their strings as they are, with no JSON per event.
//!
//! A store's child takes calls instead of turns, the frame's id being the
//! call's: `LOAD` (id), `SAVE` (id, expected version, owner, data),
//! `DELETE` (id), `LIST` (owner, after, limit), `PING`; it answers each
//! once, under its id, with `LOADED`, `SAVED`, `DELETED`, `LISTED`, `PONG`
//! or `FAILED` (code, message: the plugin's error), in any order.
//!
//! # Hot reload
//!
//! A child belongs to one [`IsolatedModel`], which belongs to one backend of
//! one active set ([`crate::plugins::runtime::Active`]). A reload whose new
//! config or library changes the backend (its library's hash, its settings
//! or its isolation) builds a new `IsolatedModel` in the build phase, and so
//! starts a new child through the same checks (the loader's in the child,
//! then the plugin's `new_model`): a child that fails to start fails the
//! reload, the new set is dropped (its children stopped) and the old one
//! keeps serving. Once the set is swapped, new turns take the new set and
//! run on the new child; a turn that started before keeps its snapshot and
//! runs to its end on the old child. The old `IsolatedModel` is dropped
//! with the last snapshot that holds it, that is when its last turn ended
//! (at once when none runs), and its drop stops the child: stdin closed, and
//! killed if it has not exited within [`supervisor::STOP_GRACE`]. Nothing of it
//! counts as a crash. A reload that leaves the backend as it is carries the
//! same `IsolatedModel` over: its child goes on, not restarted.
//! A store's child ([`IsolatedStore`]) goes the same way: a new one when
//! the store's library, settings or isolation change, the old one stopped
//! with the last snapshot holding it.
//!
//! # What is left to later work
//!
//! A library that only isolated entries name is never mapped into the host:
//! the loader verifies its staged copy and describes it from its probe's
//! answer (the probe child ran its constructors, not its `init`), and only
//! the children load it. One an in-process entry names as well is mapped
//! in the host for that entry. `GET /v1/plugins` shows the active set's
//! children only, not old ones still finishing their turns. A store's child
//! is not killed for a slow call: the call fails at the store timeout and
//! the child goes on (a child that stops reading its input altogether is
//! killed once [`input::MAX_BACKLOG`] bytes wait for it).
//!
//! # Limits and metrics
//!
//! `isolation.memory_limit_mb` reaches the child in `INIT`; the child sets
//! it as `RLIMIT_AS` (soft and hard, so the plugin cannot lift it) before it
//! loads the library. An allocation past it fails and (for a Rust plugin)
//! aborts the child: a crash like any other. The host times each turn's call
//! in the child, from its `GENERATE` to its end, into
//! `llm_host_plugin_call_seconds{backend}`.

pub mod child;
pub mod input;
pub mod model;
pub mod runner;
pub mod stepped;
pub mod stepped_runner;
pub mod store;
pub mod store_runner;
pub mod supervisor;
pub mod wire;

pub use model::IsolatedModel;
pub use store::IsolatedStore;
