//! What the host writes to a child: frames are written by whoever sends
//! them (a turn's step on the async workers, a store call), at once, to a
//! pipe that never blocks. What the pipe cannot take yet (a child that reads
//! slowly, or not at all) waits in a backlog that a writer thread of the
//! child's drains in order, so no worker of the host's runtime ever waits on
//! a child; a child whose backlog would pass [`MAX_BACKLOG`] is killed as not
//! reading.

use std::io::Write;
use std::process::ChildStdin;
use std::sync::{Arc, Condvar, Mutex};

/// Bytes waiting for a child that does not read before it is killed.
pub const MAX_BACKLOG: usize = 256 << 20;

/// The host's end of a child's stdin.
pub struct Input {
    state: Mutex<InputState>,
    /// Wakes the writer thread: bytes in the backlog, or the pipe closed.
    more: Condvar,
}

#[derive(Default)]
struct InputState {
    /// The pipe, non-blocking; `None` once stopped. The writer thread holds
    /// a clone while it writes, so the pipe closes when it lets go.
    pipe: Option<Arc<ChildStdin>>,
    /// What the pipe could not take yet, in order.
    backlog: Vec<u8>,
    /// The writer thread holds bytes taken from the backlog.
    writing: bool,
    /// The writer thread runs (started when the pipe first filled up).
    writer: bool,
}

impl Input {
    /// The host's end of a child's stdin, made non-blocking.
    pub fn new(pipe: ChildStdin) -> Arc<Self> {
        nonblocking(&pipe);
        Arc::new(Self {
            state: Mutex::new(InputState {
                pipe: Some(Arc::new(pipe)),
                ..InputState::default()
            }),
            more: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InputState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what the pipe takes now and queues the rest behind whatever
    /// waits already. `Err` with the backlog's size when it would pass
    /// [`MAX_BACKLOG`] (or no writer thread could start for it): the child
    /// must be killed.
    pub fn send(self: &Arc<Self>, bytes: &[u8], pid: u32) -> Result<bool, usize> {
        let mut state = self.lock();
        let Some(pipe) = state.pipe.clone() else {
            return Ok(false);
        };
        let mut rest = bytes;
        if state.backlog.is_empty() && !state.writing {
            match write_some(&pipe, rest) {
                Ok(written) => rest = &rest[written..],
                Err(_) => return Ok(false),
            }
            if rest.is_empty() {
                return Ok(true);
            }
        }
        if state.backlog.len() + rest.len() > MAX_BACKLOG {
            return Err(state.backlog.len() + rest.len());
        }
        state.backlog.extend_from_slice(rest);
        if state.writer {
            self.more.notify_one();
            return Ok(true);
        }
        let input = self.clone();
        let started = std::thread::Builder::new()
            .name(format!("plugin-in-{pid}"))
            .spawn(move || input.drain());
        match started {
            Ok(_) => state.writer = true,
            // Without a writer the backlog would never go, and part of a
            // frame may be in the pipe: the child is lost to the host.
            Err(_) => return Err(state.backlog.len()),
        }
        Ok(true)
    }

    /// Closes the pipe (once the writer thread, if writing, lets go of it).
    pub fn close(&self) {
        let mut state = self.lock();
        state.pipe = None;
        state.backlog = Vec::new();
        self.more.notify_one();
    }

    /// The writer thread: writes the backlog as the pipe takes it, until
    /// the pipe is closed or broken.
    fn drain(&self) {
        let mut state = self.lock();
        loop {
            while state.backlog.is_empty() && state.pipe.is_some() {
                state = self.more.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            let Some(pipe) = state.pipe.clone() else {
                state.writer = false;
                return;
            };
            let chunk = std::mem::take(&mut state.backlog);
            state.writing = true;
            drop(state);
            let written = self.write_all(&pipe, &chunk);
            drop(pipe);
            state = self.lock();
            state.writing = false;
            if !written {
                // Broken (the child is gone) or closed: nothing more goes.
                state.pipe = None;
                state.backlog = Vec::new();
            }
        }
    }

    /// Writes all of `bytes`, waiting for the pipe to take them; false when
    /// it breaks or is closed meanwhile.
    fn write_all(&self, pipe: &ChildStdin, mut bytes: &[u8]) -> bool {
        use std::os::fd::AsRawFd;
        while !bytes.is_empty() {
            match write_some(pipe, bytes) {
                Ok(0) => {}
                Ok(written) => {
                    bytes = &bytes[written..];
                    continue;
                }
                Err(_) => return false,
            }
            if self.lock().pipe.is_none() {
                return false;
            }
            let mut ready = libc::pollfd {
                fd: pipe.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // Woken when the pipe has room or breaks; every 100 ms it looks
            // whether the host closed it meanwhile.
            // SAFETY: one valid pollfd, for the count given.
            unsafe { libc::poll(&mut ready, 1, 100) };
        }
        true
    }
}

/// Writes what a non-blocking pipe takes now: how much (0 when it is full).
fn write_some(pipe: &ChildStdin, bytes: &[u8]) -> std::io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match (&mut &*pipe).write(&bytes[written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(written)
}

/// Makes the pipe's writes return at once when it is full. Where that
/// fails (it does not on Linux), writes block, and the log says so.
fn nonblocking(pipe: &ChildStdin) {
    use std::os::fd::AsRawFd;
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl on a descriptor this process owns, with no pointers.
    let set = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !set {
        tracing::warn!(
            "a plugin process's input pipe could not be made non-blocking ({}): \
             writes to it may block a worker while the child does not read",
            std::io::Error::last_os_error()
        );
    }
}
