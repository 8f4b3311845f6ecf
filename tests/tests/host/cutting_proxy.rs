//! A TCP proxy for tests of clients that reconnect: it forwards to a
//! target on threads of its own, and the test can cut its connections (as
//! a network drop would) while the target runs on.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A TCP proxy to `target`, on threads of its own, whose connections the
/// test can cut (both sides shut down, as when the network drops them);
/// for a while after a cut it closes the connections it accepts at once.
pub(crate) struct CuttingProxy {
    pub(crate) addr: SocketAddr,
    /// Both sides of every connection forwarded so far.
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Until when accepted connections are closed at once.
    refusing_until: Arc<Mutex<Instant>>,
    stopped: Arc<AtomicBool>,
}

impl CuttingProxy {
    pub(crate) fn start(target: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let open = Arc::new(Mutex::new(Vec::new()));
        let refusing_until = Arc::new(Mutex::new(Instant::now()));
        let stopped = Arc::new(AtomicBool::new(false));
        let (conns, refusing, stop) = (open.clone(), refusing_until.clone(), stopped.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if Instant::now() < *refusing.lock().unwrap_or_else(|p| p.into_inner()) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let sides = [&client, &server].map(|side| side.try_clone().expect("clone"));
                conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(sides);
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        CuttingProxy {
            addr,
            open,
            refusing_until,
            stopped,
        }
    }

    /// Cuts every connection; those made within `refuse_for` are closed at
    /// once.
    pub(crate) fn cut(&self, refuse_for: Duration) {
        *self
            .refusing_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Instant::now() + refuse_for;
        for side in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = side.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees it is stopped.
        let _ = TcpStream::connect(self.addr);
        self.cut(Duration::ZERO);
    }
}
