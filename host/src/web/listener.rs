//! Accepting connections: the TCP accept loop, HTTP/1.1 served by hyper
//! with a header read timeout, the caps on connections that have not become
//! session sockets, and a shutdown that does not wait on them.
//!
//! hyper as warp builds it has no timer, so no header read timeout: a client
//! that sends half a request holds its connection forever, and a graceful
//! shutdown waits for it. Here every connection is served with
//! `server.header_read_timeout_secs` (which also ends a keep-alive
//! connection idle that long between requests), and until it is upgraded it
//! holds one of `server.max_pending_connections` places, and one of its
//! address's `server.max_pending_per_address`; a connection over either cap
//! is closed at once, before anything is read. Upgraded sockets count
//! against `server.max_connections` instead (see [`super::server`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower_service::Service;
use warp::Filter;

use crate::limits::Held;
use crate::metrics::metrics;
use crate::state::HostState;

/// What the listener knows of a connection, put in each of its requests'
/// extensions: the peer's address, and its place among connections not
/// upgraded yet.
pub struct Accepted {
    /// The client's address.
    pub peer: SocketAddr,
    pending: Mutex<Option<Held>>,
}

impl Accepted {
    /// The connection became a session socket: it gives its place among
    /// pending connections back.
    pub fn upgraded(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// The client's address, for filters.
pub fn peer() -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Clone {
    warp::ext::optional::<Arc<Accepted>>()
        .map(|accepted: Option<Arc<Accepted>>| accepted.map(|accepted| accepted.peer))
}

/// Serves `filter` on `listener` until `shutdown` resolves; then stops
/// accepting, asks every HTTP connection to close after its current request,
/// and returns once they have, or after `grace` whatever is still open.
/// Upgraded sockets are not waited for here.
pub async fn serve<F>(
    listener: TcpListener,
    host: Arc<HostState>,
    filter: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let service = warp::service(filter);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    // Every connection task holds a sender; all are gone when all ended.
    let (open_tx, mut all_closed) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (per_address, total, header_timeout) = {
            let server = &host.active.load().config.server;
            (
                server.max_pending_per_address,
                server.max_pending_connections,
                Duration::from_secs(server.header_read_timeout_secs),
            )
        };
        let Some(pending) = host
            .pending
            .try_take(&peer.ip().to_string(), per_address, total)
        else {
            metrics().refuse("too_many_pending");
            tracing::debug!(%peer, "closed: too many connections not upgraded");
            drop(stream);
            continue;
        };
        let accepted = Arc::new(Accepted {
            peer,
            pending: Mutex::new(Some(pending)),
        });
        let service = service.clone();
        let per_request = hyper::service::service_fn(move |mut request| {
            request.extensions_mut().insert(accepted.clone());
            service.clone().call(request)
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(64 * 1024);
        let mut stopping = stopping.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let _open = open;
            let connection = builder
                .serve_connection(TokioIo::new(stream), per_request)
                .with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = served {
                tracing::debug!(%peer, error = %err, "connection ended");
            }
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    drop(open_tx);
    if tokio::time::timeout(grace, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the grace period; leaving them");
    }
}

/// An accept error: a connection that failed before it was accepted is
/// skipped; anything else (out of file descriptors) pauses accepting for a
/// moment so that connections can close.
async fn accept_failed(err: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::error!(error = %err, "cannot accept connections");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
