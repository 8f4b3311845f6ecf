//! An OpenAI-compatible HTTP API on the host's listener, so that clients
//! written for OpenAI's Chat Completions API (the `openai` packages, agent
//! frameworks, editors) use the host's backends as they are.
//!
//! - `POST /v1/chat/completions`: one answer, as a `chat.completion` object
//!   or streamed as `chat.completion.chunk` server-sent events.
//! - `GET /v1/models`, `GET /v1/models/{name}`: the `[models.*]` backends.
//!
//! The same API keys (`Authorization: Bearer KEY`), origin policy, limits
//! and metrics as the WebSocket's turns; errors in OpenAI's shape,
//! `{"error":{"message","type","param","code"}}`.
//!
//! - [`request`]: the request body read into messages and turn parameters.
//! - [`completions`]: the route: admission, the turn, the answer.
//! - [`response`]: the turn's frames read back as events; the
//!   `chat.completion` object or the error written from them.
//! - [`chunks`]: the streamed answer's `chat.completion.chunk` events.
//! - [`stream`]: the turn core's [`crate::core::ports::Frames`] for an HTTP
//!   answer, and the server-sent event body.

pub mod chunks;
pub mod completions;
pub mod request;
pub mod response;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};
use warp::Filter;

use super::auth::{authenticate, Caller};
use crate::plugins::runtime::Active;
use crate::state::HostState;

/// Every route of the OpenAI-compatible API.
pub fn routes(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    completions::route(host.clone())
        .or(list_models(host.clone()))
        .unify()
        .or(get_model(host))
        .unify()
}

/// Whether `path` is one of this API's: `/v1/chat/completions`,
/// `/v1/models` and `/v1/models/NAME`.
pub fn is_api_path(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/models" || path.starts_with("/v1/models/")
}

/// An error as OpenAI's API answers it: a status and
/// `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`,
    /// `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// A stable code: OpenAI's where there is one (`model_not_found`), else
    /// the host's (`rate_limited`, `store_unavailable`, a backend's error
    /// code).
    pub code: String,
    /// For people.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl ApiError {
    /// An error of `status`, `kind` and `code`.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            param: None,
        }
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<String>) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
                message,
            )
        }
    }

    /// The same error with another code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = code.into();
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The HTTP answer.
    pub fn reply(&self) -> Response {
        warp::reply::with_status(warp::reply::json(&self.body()), self.status).into_response()
    }
}

/// 404 `model_not_found` for backend `name`.
pub fn model_not_found(name: &str) -> ApiError {
    ApiError {
        param: Some("model".to_owned()),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{name}` does not exist (no [models.{name}] backend on this host)"),
        )
    }
}

/// The caller the request's API key names, or the 401 refusing it. In open
/// mode everyone is admitted, as for the WebSocket.
pub fn caller(active: &Active, headers: &HeaderMap) -> Result<Caller, ApiError> {
    // Only the header: OpenAI's clients send their key as a bearer token.
    authenticate(&active.config.auth, headers, &HashMap::new()).map_err(|refusal| {
        super::audit::refused("OpenAI-compatible API", None, "unauthorized");
        ApiError::new(
            refusal.status,
            "invalid_request_error",
            "invalid_api_key",
            refusal.message,
        )
    })
}

/// A backend as `/v1/models` lists it.
fn model_object(active: &Active, name: &str) -> Option<Value> {
    let backend = active.models.get(name)?;
    let created = backend
        .plugin
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    Some(json!({
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "llm-host",
    }))
}

/// `GET /v1/models`: every backend.
fn list_models(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "models")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .map(move |headers: HeaderMap| {
            let active = host.active.load();
            if let Err(err) = caller(&active, &headers) {
                return err.reply();
            }
            let data: Vec<Value> = active
                .models
                .keys()
                .filter_map(|name| model_object(&active, name))
                .collect();
            warp::reply::json(&json!({ "object": "list", "data": data })).into_response()
        })
}

/// `GET /v1/models/{name}`: one backend, or 404 `model_not_found`.
fn get_model(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "models" / String)
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .map(move |name: String, headers: HeaderMap| {
            let active = host.active.load();
            if let Err(err) = caller(&active, &headers) {
                return err.reply();
            }
            let name = percent_encoding::percent_decode_str(&name)
                .decode_utf8_lossy()
                .into_owned();
            match model_object(&active, &name) {
                Some(model) => warp::reply::json(&model).into_response(),
                None => model_not_found(&name).reply(),
            }
        })
}
