//! The HTTP routes: WebSocket upgrades on `/v1/ws` and `/` (a `GET /`
//! without `Upgrade` gets the chat page, [`super::page`]).
//!
//! The upgrade is answered here rather than with `warp::ws()`, so that each
//! socket gets a 2 KiB read buffer instead of tungstenite's 128 KiB (FACTS.md:
//! ~6 KiB per idle connection instead of ~130 KiB) and the subprotocol is
//! negotiated explicitly.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::{
    handshake::derive_accept_key,
    protocol::{Role, WebSocketConfig},
};
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::hyper::upgrade::OnUpgrade;
use warp::reply::Response;
use warp::Filter;

use super::auth::{authenticate, Caller};
use super::connection::{self, Opening};
use super::error_reply;
use super::listener::Accepted;
use crate::core::document::{new_session_id, valid_session_id};
use crate::core::ports::StoreError;
use crate::metrics::metrics;
use crate::protocol::COMMAND_SUBPROTOCOL;
use crate::state::HostState;

/// Binds `addr` with `TCP_NODELAY` (copied by Linux to accepted sockets; a
/// streamed token must not wait for Nagle) and a deep accept backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves `host` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    host: Arc<HostState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let grace = Duration::from_secs(host.active.load().config.server.shutdown_grace_secs);
    super::listener::serve(listener, host.clone(), routes(host), shutdown, grace).await;
}

/// Every route of the host.
pub fn routes(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    allowed_origin(host.clone())
        .and(
            super::page::route()
                .or(websocket(host.clone()))
                .unify()
                .or(super::admin::routes(host.clone()))
                .unify()
                .or(super::openai::routes(host))
                .unify(),
        )
        .recover(|rejection: warp::Rejection| async move {
            if let Some(OriginRefused { origin, openai }) = rejection.find::<OriginRefused>() {
                super::audit::refused(&format!("origin {origin}"), None, "origin_not_allowed");
                let message = format!(
                    "pages of origin `{origin}` may not use this host (server.allowed_origins)"
                );
                // Clients of the OpenAI-compatible API read errors in its shape.
                return Ok::<_, std::convert::Infallible>(if *openai {
                    super::openai::ApiError::new(
                        StatusCode::FORBIDDEN,
                        "permission_error",
                        "origin_not_allowed",
                        message,
                    )
                    .reply()
                } else {
                    error_reply(StatusCode::FORBIDDEN, "origin_not_allowed", &message)
                });
            }
            let (status, code, message) = if rejection.is_not_found() {
                (
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route".to_owned(),
                )
            } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "method not allowed".to_owned(),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("{rejection:?}"),
                )
            };
            Ok::<_, std::convert::Infallible>(error_reply(status, code, &message))
        })
        .unify()
}

/// A request from a browser page whose origin may not use the host.
#[derive(Debug)]
struct OriginRefused {
    origin: String,
    /// Whether it asked the OpenAI-compatible API.
    openai: bool,
}

impl warp::reject::Reject for OriginRefused {}

/// Passes requests without an `Origin` header (clients that are not
/// browsers) and those from allowed origins ([`crate::origins`]); refuses
/// the rest before any route runs.
fn allowed_origin(
    host: Arc<HostState>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("origin")
        .and(warp::path::full())
        .and_then(move |origin: Option<String>, path: warp::path::FullPath| {
            let host = host.clone();
            async move {
                match origin {
                    Some(origin)
                        if !crate::origins::allowed(
                            &origin,
                            &host.active.load().config.server.allowed_origins,
                        ) =>
                    {
                        Err(warp::reject::custom(OriginRefused {
                            origin,
                            openai: super::openai::is_api_path(path.as_str()),
                        }))
                    }
                    _ => Ok(()),
                }
            }
        })
        .untuple_one()
}

/// `GET /v1/ws` and `GET /`: upgrade to a session socket.
fn websocket(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let path = warp::path!("v1" / "ws").or(warp::path::end()).unify();
    warp::get()
        .and(path)
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<Arc<Accepted>>())
        .then(
            move |params: HashMap<String, String>, headers: HeaderMap, upgrade, accepted| {
                let host = host.clone();
                async move { upgrade_session(&host, &params, &headers, upgrade, accepted).await }
            },
        )
}

async fn upgrade_session(
    host: &Arc<HostState>,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    upgrade: Option<OnUpgrade>,
    accepted: Option<Arc<Accepted>>,
) -> Response {
    if host.stopping() {
        return error_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        );
    }
    let active = host.active.load_full();
    let caller = match authenticate(&active.config.auth, headers, params) {
        Ok(caller) => caller,
        Err(refusal) => {
            let client = accepted.as_ref().map(|accepted| accepted.peer);
            super::audit::refused("GET /v1/ws", client, "unauthorized");
            return error_reply(refusal.status, refusal.code, refusal.message);
        }
    };
    let session_id =
        match params.get("session") {
            Some(id) if valid_session_id(id) => id.clone(),
            Some(_) => return error_reply(
                StatusCode::BAD_REQUEST,
                "bad_session_id",
                "session ids are 1-128 characters of A-Z a-z 0-9 . _ : -, not starting `_host:`",
            ),
            None => new_session_id(),
        };
    let model = match params.get("model") {
        Some(name) if active.models.contains_key(name) => Some(name.clone()),
        Some(name) => {
            let known: Vec<&str> = active.models.keys().map(String::as_str).collect();
            return error_reply(
                StatusCode::BAD_REQUEST,
                "unknown_model",
                &format!(
                    "unknown model backend `{name}` (configured: {})",
                    known.join(", ")
                ),
            );
        }
        None => None,
    };

    // `since`: the last sequence number the client has; it is sent what
    // follows (see `hub`).
    let since = match params.get("since").map(|since| since.parse::<u64>()) {
        Some(Ok(since)) => Some(since),
        Some(Err(_)) => {
            return error_reply(
                StatusCode::BAD_REQUEST,
                "bad_since",
                "since is the last sequence number the client has: a whole number",
            )
        }
        None => None,
    };
    let key = match websocket_key(headers) {
        Ok(key) => key,
        Err((status, message)) => {
            let code = if status == StatusCode::UPGRADE_REQUIRED {
                "upgrade_required"
            } else {
                "bad_handshake"
            };
            let mut reply = error_reply(status, code, message);
            // RFC 6455 4.4: the version this server speaks.
            reply.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return reply;
        }
    };
    let Some(upgrade) = upgrade else {
        return error_reply(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this connection cannot be upgraded",
        );
    };
    let mut found = None;
    if !matches!(caller, Caller::Open) && params.contains_key("session") {
        // Another key's session is answered as if it did not exist.
        if let Some(store) = active.store() {
            let timeout = active.config.server.turn_settings().store_timeout;
            match crate::core::load(store, &session_id, timeout).await {
                Ok(Some(loaded)) if !caller.may_access(&loaded.owner) => {
                    return not_found(&session_id);
                }
                Ok(loaded) => found = Some(loaded),
                Err(StoreError::Unreadable { owner, .. }) if !caller.may_access(&owner) => {
                    return not_found(&session_id);
                }
                // Told on the socket, which then closes.
                Err(StoreError::Unreadable { .. }) => {}
                Err(err) => {
                    tracing::error!(session = %session_id, error = %err, "cannot load session");
                    return error_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        "the session store is unavailable; try again later",
                    );
                }
            }
        }
    }
    let Some(slot) = host
        .connections
        .try_acquire(active.config.server.max_connections)
    else {
        metrics().refuse("too_many_connections");
        return error_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the host serves as many connections as server.max_connections allows; try again later",
        );
    };
    // Per key; in open mode, per client address.
    let limit_name = match (&caller, &accepted) {
        (Caller::Open, Some(accepted)) => format!("address {}", accepted.peer.ip()),
        _ => format!("key {}", caller.id()),
    };
    // Open mode trusts this machine (as it does for the HTTP API): its
    // own processes all come from loopback, and are not one client.
    let per_key = match (&caller, &accepted) {
        (Caller::Open, Some(accepted)) if accepted.peer.ip().is_loopback() => usize::MAX,
        _ => active.config.server.max_connections_per_key,
    };
    let Some(key_slot) = host
        .key_connections
        .try_take(&limit_name, per_key, usize::MAX)
    else {
        metrics().refuse("too_many_key_connections");
        return error_reply(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_key_connections",
            &format!(
                "this key (in open mode: this address) has server.max_connections_per_key = \
                 {per_key} sockets open; close one first"
            ),
        );
    };
    let credential = super::auth::credential(headers, params);
    let command_mode = requested_protocols(headers).any(|p| p == COMMAND_SUBPROTOCOL);
    let opening = Opening {
        session_id,
        model,
        command_mode,
        caller,
        found,
        limit_name,
        credential,
        peer: accepted.as_ref().map(|accepted| accepted.peer),
        trace: crate::telemetry::parent(headers),
        since,
    };
    let max_frame = active.config.server.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(2048)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let host = host.clone();
    tokio::spawn(async move {
        let _slots = (slot, key_slot);
        match upgrade.await {
            Ok(upgraded) => {
                let io = TokioIo::new(upgraded);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                connection::connected(ws, host, opening).await;
            }
            Err(err) => tracing::debug!(error = %err, "upgrade failed"),
        }
    });

    if let Some(accepted) = &accepted {
        accepted.upgraded();
    }
    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if command_mode {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(COMMAND_SUBPROTOCOL),
        );
    }
    response
}

/// The client's `Sec-WebSocket-Key`, after checking the upgrade headers: the
/// status and message to refuse it with otherwise (426 for a request that is
/// no upgrade or another protocol version, 400 for a malformed key).
fn websocket_key(headers: &HeaderMap) -> Result<String, (StatusCode, &'static str)> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket only (Upgrade: websocket)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .ok_or((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing"))?;
    if !is_handshake_key(key) {
        return Err((
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455)",
        ));
    }
    Ok(key.to_owned())
}

/// Whether `key` is the base64 of 16 bytes: 22 characters of the alphabet,
/// the last of which carries 2 bits (so one of `AQgw`), then `==`.
fn is_handshake_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    bytes.len() == 24
        && key.ends_with("==")
        && bytes[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        && matches!(bytes[21], b'A' | b'Q' | b'g' | b'w')
}

fn requested_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn not_found(id: &str) -> Response {
    error_reply(
        StatusCode::NOT_FOUND,
        "session_not_found",
        &format!("no session `{id}`"),
    )
}

#[cfg(test)]
mod tests {
    use super::is_handshake_key;

    #[test]
    fn handshake_keys_are_16_bytes_of_base64() {
        // RFC 6455's example key, and one of every last character allowed.
        for good in [
            "dGhlIHNhbXBsZSBub25jZQ==",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "/////////////////////w==",
            "+++++++++++++++++++++g==",
        ] {
            assert!(is_handshake_key(good), "{good}");
        }
        for bad in [
            "!",
            "",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNhbXBsZSBub25jZQ==x",
            "dGhlIHNhbXBsZSBub25j!Q==",
        ] {
            assert!(!is_handshake_key(bad), "{bad}");
        }
    }
}
