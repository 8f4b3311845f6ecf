//! A small blocking connection pool for a network server.
//!
//! Connections are opened lazily, in the caller's thread, up to the pool's
//! size; a caller that finds them all busy waits for one. A connection that
//! breaks is closed, and so is every idle one: a server restart or a network
//! cut breaks them all, and finding that out one failed call at a time would
//! fail as many calls as the pool holds. The call that found a broken
//! connection it had reused is retried once on a fresh connection, so a
//! server that restarted between two calls costs no failed call at all.
//!
//! Shared by the redis and postgres store plugins; linked statically into
//! each, so a plugin library still depends on nothing but plugin-api at run time.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use llm_host_plugin_api::{ErrorKind, PluginError};

/// Opens connections for a [`Pool`].
pub trait Connect: Send + Sync + 'static {
    /// A connection.
    type Conn: Send;

    /// Opens one; errors are ready for the operator (they name the server).
    fn connect(&self) -> Result<Self::Conn, PluginError>;

    /// The server, for messages: `redis 127.0.0.1:6379`.
    fn target(&self) -> &str;
}

/// How an operation on a connection failed.
#[derive(Debug)]
pub enum Failure {
    /// The connection is unusable (closed, reset, timed out mid-answer): it is
    /// closed, and the operation may be retried on a fresh one.
    Broken(PluginError),
    /// The operation failed but the connection is fine.
    Failed(PluginError),
}

impl Failure {
    fn into_error(self) -> PluginError {
        match self {
            Failure::Broken(err) | Failure::Failed(err) => err,
        }
    }
}

/// Which try of an operation this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The first.
    First,
    /// The second, after the first broke its connection: whatever the first
    /// sent may or may not have been applied.
    Retry,
}

struct State<C> {
    idle: Vec<C>,
    /// Connections that exist: idle ones and those handed out.
    open: usize,
    /// Bumped whenever the idle connections are thrown away; connections of
    /// an older epoch are closed when they come back.
    epoch: u64,
}

/// The pool.
pub struct Pool<M: Connect> {
    manager: M,
    size: usize,
    wait: Duration,
    state: Mutex<State<M::Conn>>,
    freed: Condvar,
}

/// A connection taken from the pool; goes back (or is closed) when dropped,
/// also when the operation panicked.
struct Taken<'p, M: Connect> {
    pool: &'p Pool<M>,
    conn: Option<M::Conn>,
    epoch: u64,
    reused: bool,
    healthy: bool,
}

impl<M: Connect> Drop for Taken<'_, M> {
    fn drop(&mut self) {
        let conn = self.conn.take();
        let mut state = self.pool.lock();
        let closed = match conn {
            Some(conn) if self.healthy && self.epoch == state.epoch => {
                state.idle.push(conn);
                None
            }
            other => {
                state.open = state.open.saturating_sub(1);
                other
            }
        };
        drop(state);
        self.pool.freed.notify_one();
        // Closing may talk to the server: not under the lock.
        drop(closed);
    }
}

impl<M: Connect> Pool<M> {
    /// A pool of at most `size` connections; a caller waits at most `wait`
    /// for one to be free.
    pub fn new(manager: M, size: usize, wait: Duration) -> Self {
        Self {
            manager,
            size: size.max(1),
            wait,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                epoch: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// What opens the connections.
    pub fn manager(&self) -> &M {
        &self.manager
    }

    fn lock(&self) -> MutexGuard<'_, State<M::Conn>> {
        // The state is consistent at every unlock; a panic elsewhere while
        // holding the lock cannot leave it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Result<Taken<'_, M>, PluginError> {
        let deadline = Instant::now() + self.wait;
        let mut state = self.lock();
        loop {
            let epoch = state.epoch;
            if let Some(conn) = state.idle.pop() {
                return Ok(Taken {
                    pool: self,
                    conn: Some(conn),
                    epoch,
                    reused: true,
                    healthy: false,
                });
            }
            if state.open < self.size {
                state.open += 1;
                drop(state);
                // The slot is ours: it is given back by the drop of `taken`
                // if connecting fails.
                let mut taken = Taken {
                    pool: self,
                    conn: None,
                    epoch,
                    reused: false,
                    healthy: false,
                };
                taken.conn = Some(self.manager.connect()?);
                return Ok(taken);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PluginError::new(
                    ErrorKind::TIMEOUT,
                    format!(
                        "{}: all {} connections stayed busy for {} ms (raise pool_size?)",
                        self.manager.target(),
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

    /// Closes every idle connection.
    fn discard_idle(&self) {
        let idle = {
            let mut state = self.lock();
            state.epoch += 1;
            let idle = std::mem::take(&mut state.idle);
            state.open = state.open.saturating_sub(idle.len());
            idle
        };
        self.freed.notify_all();
        drop(idle);
    }

    /// Runs `op` on a connection. If the connection breaks, it and every idle
    /// connection are closed; if it was a reused one, `op` runs once more on a
    /// fresh connection with [`Attempt::Retry`].
    pub fn run<T>(
        &self,
        mut op: impl FnMut(&mut M::Conn, Attempt) -> Result<T, Failure>,
    ) -> Result<T, PluginError> {
        let mut attempt = Attempt::First;
        loop {
            let mut taken = self.take()?;
            let outcome = match taken.conn.as_mut() {
                Some(conn) => op(conn, attempt),
                None => Err(Failure::Broken(PluginError::internal(format!(
                    "{}: the pool handed out no connection",
                    self.manager.target()
                )))),
            };
            match outcome {
                Ok(value) => {
                    taken.healthy = true;
                    return Ok(value);
                }
                Err(Failure::Failed(err)) => {
                    taken.healthy = true;
                    return Err(err);
                }
                Err(Failure::Broken(err)) => {
                    let reused = taken.reused;
                    drop(taken);
                    self.discard_idle();
                    if !reused || attempt == Attempt::Retry {
                        return Err(err);
                    }
                    llm_host_plugin_api::info!(
                        "{}: a pooled connection broke ({err}); retrying on a new one",
                        self.manager.target()
                    );
                    attempt = Attempt::Retry;
                }
            }
        }
    }

    /// How many connections exist, idle or handed out.
    #[cfg(test)]
    pub fn open_connections(&self) -> usize {
        self.lock().open
    }
}

impl From<Failure> for PluginError {
    fn from(failure: Failure) -> Self {
        failure.into_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Connections are numbers; "the server" breaks every connection made
    /// before `broken_before`.
    struct Fake {
        made: AtomicUsize,
        broken_before: AtomicUsize,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl Connect for Arc<Fake> {
        type Conn = usize;
        fn connect(&self) -> Result<usize, PluginError> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(PluginError::unavailable("fake: connection refused"));
            }
            Ok(self.made.fetch_add(1, Ordering::SeqCst))
        }
        fn target(&self) -> &str {
            "fake"
        }
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            made: AtomicUsize::new(0),
            broken_before: AtomicUsize::new(0),
            refuse: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn use_conn(server: &Fake, conn: usize) -> Result<usize, Failure> {
        if conn < server.broken_before.load(Ordering::SeqCst) {
            Err(Failure::Broken(PluginError::unavailable("fake: reset")))
        } else {
            Ok(conn)
        }
    }

    #[test]
    fn connections_are_reused_and_capped() {
        let server = fake();
        let pool = Pool::new(server.clone(), 2, Duration::from_millis(50));
        assert_eq!(pool.run(|c, _| use_conn(&server, *c)), Ok(0));
        assert_eq!(pool.run(|c, _| use_conn(&server, *c)), Ok(0));
        assert_eq!(pool.open_connections(), 1);
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let pool = &pool;
            let holders: Vec<_> = (0..2)
                .map(|_| {
                    let rx_done = tx.clone();
                    scope.spawn(move || {
                        pool.run(|c, _| {
                            let _ = rx_done.send(());
                            std::thread::sleep(Duration::from_millis(300));
                            Ok::<_, Failure>(*c)
                        })
                    })
                })
                .collect();
            rx.recv().ok();
            rx.recv().ok();
            let err = pool.run(|c, _| Ok::<_, Failure>(*c)).expect_err("all busy");
            assert_eq!(err.kind, ErrorKind::TIMEOUT);
            assert!(err.message.contains("fake: all 2 connections"), "{err}");
            for holder in holders {
                assert!(holder.join().expect("no panic").is_ok());
            }
        });
        assert_eq!(pool.open_connections(), 2);
    }

    #[test]
    fn a_broken_reused_connection_is_retried_once_on_a_fresh_one() {
        let server = fake();
        let pool = Pool::new(server.clone(), 4, Duration::from_millis(50));
        // Three idle connections, all broken by a "restart".
        let barrier = std::sync::Barrier::new(3);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                let (pool, barrier, server) = (&pool, &barrier, &server);
                scope.spawn(move || {
                    pool.run(|c, _| {
                        barrier.wait();
                        use_conn(server, *c)
                    })
                });
            }
        });
        assert_eq!(pool.open_connections(), 3);
        server.broken_before.store(3, Ordering::SeqCst);
        let mut attempts = Vec::new();
        let answer = pool.run(|c, attempt| {
            attempts.push(attempt);
            use_conn(&server, *c)
        });
        assert_eq!(answer, Ok(3), "a fresh connection serves the retry");
        assert_eq!(attempts, [Attempt::First, Attempt::Retry]);
        assert_eq!(pool.open_connections(), 1, "the broken idle ones are gone");
    }

    #[test]
    fn a_fresh_connection_that_breaks_is_not_retried() {
        let server = fake();
        let pool = Pool::new(server.clone(), 4, Duration::from_millis(50));
        server.broken_before.store(usize::MAX, Ordering::SeqCst);
        let mut attempts = 0;
        let err = pool
            .run(|c, _| {
                attempts += 1;
                use_conn(&server, *c)
            })
            .expect_err("broken");
        assert_eq!((attempts, err.kind), (1, ErrorKind::UNAVAILABLE));
        assert_eq!(pool.open_connections(), 0);
    }

    #[test]
    fn connect_errors_give_the_slot_back() {
        let server = fake();
        let pool = Pool::new(server.clone(), 1, Duration::from_millis(10));
        server.refuse.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let err = pool.run(|c, _| use_conn(&server, *c)).expect_err("refused");
            assert!(err.message.contains("refused"), "{err}");
        }
        server.refuse.store(false, Ordering::SeqCst);
        assert!(pool.run(|c, _| use_conn(&server, *c)).is_ok());
    }

    #[test]
    fn a_panic_closes_the_connection_and_frees_the_slot() {
        let server = fake();
        let pool = Pool::new(server.clone(), 1, Duration::from_millis(10));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(|_, _| -> Result<(), Failure> { panic!("boom") })
        }));
        assert!(panicked.is_err());
        assert_eq!(pool.open_connections(), 0);
        assert_eq!(pool.run(|c, _| use_conn(&server, *c)), Ok(1));
    }

    #[test]
    fn plain_failures_keep_the_connection() {
        let server = fake();
        let pool = Pool::new(server.clone(), 1, Duration::from_millis(10));
        let err = pool
            .run(|_, _| -> Result<(), Failure> {
                Err(Failure::Failed(PluginError::invalid_input("bad")))
            })
            .expect_err("failed");
        assert_eq!(err.kind, ErrorKind::INVALID_INPUT);
        assert_eq!(pool.run(|c, _| use_conn(&server, *c)), Ok(0));
    }
}
