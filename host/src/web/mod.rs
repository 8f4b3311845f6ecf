//! The network edge: HTTP routes, the WebSocket upgrade, one task per
//! socket. It turns client frames into prompts for the turn core and hands
//! the core an [`outbox::Outbox`] to write frames into.
//!
//! - [`audit`]: the audit log: refusals of who asked, admin actions.
//! - [`access`]: the access log and metrics of each finished turn, from any door.
//! - [`listener`]: accepting connections, header timeouts, pending caps.
//! - [`server`]: the routes and the WebSocket upgrade.
//! - [`page`]: the chat page on `GET /`.
//! - [`connection`]: one socket: reading frames, the prompt queue, its turns.
//! - [`hub`]: a session's sockets on this host: its running turn's frames
//!   to each, replay after a reconnect, the grace of a turn left alone.
//! - [`announce`]: the session announcement at connect (or its refusal).
//! - [`queue`]: a connection's prompt queue, its limits, its turns.
//! - [`settings`]: `session.update`: a session's settings, checked and saved.
//! - [`outbox`]: the socket's sending half, shared by a turn and the reader.
//! - [`admin`]: the HTTP API: plugins, config, reload, sessions, health.
//! - [`usage`]: `GET /v1/usage`, turns and tokens by key and backend.
//! - [`openai`]: the OpenAI-compatible HTTP API: chat completions, models.
//! - [`auth`]: API keys and who may do what.
//! - [`redact`]: what `/v1/config` shows of the config: secrets replaced.

pub mod access;
pub mod admin;
pub mod announce;
pub mod audit;
pub mod auth;
pub mod connection;
pub mod hub;
pub mod listener;
pub mod openai;
pub mod outbox;
pub mod page;
pub mod queue;
pub mod redact;
pub mod server;
pub mod settings;
pub mod usage;

use warp::http::StatusCode;
use warp::reply::{Reply, Response};

/// A JSON error body: `{"error":{"code","message"}}`.
pub fn error_reply(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}
