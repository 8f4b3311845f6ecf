//! A small blocking pool of SQLite connections to one file.
//!
//! In WAL mode readers do not block each other or the writer, so a few
//! connections let loads and listings of several sessions run at once;
//! writers queue on SQLite's own lock (`busy_timeout`). Connections are
//! opened on demand up to the pool's size; a caller that finds them all busy
//! waits for one.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use llm_host_plugin_api::{ErrorKind, PluginError};
use rusqlite::Connection;

/// The pool.
pub(crate) struct Pool {
    open: Box<dyn Fn() -> Result<Connection, PluginError> + Send + Sync>,
    /// The file, for messages.
    target: String,
    size: usize,
    wait: Duration,
    state: Mutex<State>,
    freed: Condvar,
}

struct State {
    idle: Vec<Connection>,
    /// Connections that exist: idle ones and those handed out.
    count: usize,
}

/// A connection taken from the pool: goes back when dropped, or is closed if
/// the call using it panicked.
struct Taken<'p> {
    pool: &'p Pool,
    conn: Option<Connection>,
    finished: bool,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let conn = self.conn.take();
        let mut state = self.pool.lock();
        let closed = match conn {
            Some(conn) if self.finished => {
                state.idle.push(conn);
                None
            }
            other => {
                state.count = state.count.saturating_sub(1);
                other
            }
        };
        drop(state);
        self.pool.freed.notify_one();
        drop(closed);
    }
}

impl Pool {
    /// A pool of at most `size` connections made by `open`; a caller waits at
    /// most `wait` for a free one.
    pub(crate) fn new(
        open: impl Fn() -> Result<Connection, PluginError> + Send + Sync + 'static,
        target: String,
        size: usize,
        wait: Duration,
    ) -> Self {
        Self {
            open: Box::new(open),
            target,
            size: size.max(1),
            wait,
            state: Mutex::new(State {
                idle: Vec::new(),
                count: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent at every unlock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Result<Taken<'_>, PluginError> {
        let deadline = Instant::now() + self.wait;
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(Taken {
                    pool: self,
                    conn: Some(conn),
                    finished: false,
                });
            }
            if state.count < self.size {
                state.count += 1;
                drop(state);
                // Dropping `taken` gives the slot back if opening fails.
                let mut taken = Taken {
                    pool: self,
                    conn: None,
                    finished: false,
                };
                taken.conn = Some((self.open)()?);
                return Ok(taken);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PluginError::new(
                    ErrorKind::TIMEOUT,
                    format!(
                        "{}: all {} connections stayed busy for {} ms (raise pool_size?)",
                        self.target,
                        self.size,
                        self.wait.as_millis()
                    ),
                ));
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs `op` on a connection.
    pub(crate) fn run<T>(
        &self,
        op: impl FnOnce(&mut Connection) -> Result<T, PluginError>,
    ) -> Result<T, PluginError> {
        let mut taken = self.take()?;
        let result = match taken.conn.as_mut() {
            Some(conn) => op(conn),
            None => Err(PluginError::internal(format!(
                "{}: the pool handed out no connection",
                self.target
            ))),
        };
        taken.finished = true;
        result
    }

    /// How many connections exist, idle or handed out.
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.lock().count
    }
}
