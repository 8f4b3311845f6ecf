//! The HTTP API beside the sockets: plugins, config, reload, sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};
use warp::Filter;

use super::auth::{authenticate, Caller, Refusal, ADMIN_ONLY};
use super::error_reply;
use super::redact::redact;
use crate::core::document::{valid_session_id, Loaded, RESERVED_PREFIX};
use crate::core::ports::{SessionStore, StoreError};
use crate::core::within;
use crate::metrics::metrics;
use crate::plugins::ports::{list, ping};
use crate::plugins::reload::Outcome;
use crate::plugins::runtime::StoreBackend;
use crate::protocol::now_ms;
use crate::state::{self, HostState};

/// Every admin route.
pub fn routes(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    plugins(host.clone())
        .or(config(host.clone()))
        .unify()
        .or(keys(host.clone()))
        .unify()
        .or(reload_now(host.clone()))
        .unify()
        .or(list_sessions(host.clone()))
        .unify()
        .or(get_session(host.clone()))
        .unify()
        .or(delete_session(host.clone()))
        .unify()
        .or(prometheus(host.clone()))
        .unify()
        .or(healthz())
        .unify()
        .or(readyz(host.clone()))
        .unify()
        .or(super::usage::route(host))
        .unify()
}

fn with_host(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Arc<HostState>,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || host.clone())
}

/// The host and the caller named by the request's API key (or the refusal).
pub(super) fn with_caller(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Arc<HostState>, Result<Caller, Refusal>), Error = warp::Rejection> + Clone
{
    with_caller_at(host)
        .map(|host, caller, _peer| (host, caller))
        .untuple_one()
}

/// [`with_caller`], and the client's address.
pub(super) fn with_caller_at(
    host: Arc<HostState>,
) -> impl Filter<
    Extract = (Arc<HostState>, Result<Caller, Refusal>, Option<SocketAddr>),
    Error = warp::Rejection,
> + Clone {
    with_host(host)
        .and(warp::header::headers_cloned())
        .and(warp::query::<HashMap<String, String>>())
        .and(super::listener::peer())
        .and(warp::path::full())
        .map(
            |host: Arc<HostState>,
             headers: HeaderMap,
             query,
             peer: Option<SocketAddr>,
             path: warp::path::FullPath| {
                let caller = authenticate(&host.active.load().config.auth, &headers, &query)
                    .and_then(|caller| match caller {
                        // Open mode trusts this machine only: a client on a
                        // loopback address that is not a page of another origin.
                        Caller::Open if !on_this_machine(peer, &headers) => Err(NOT_THIS_MACHINE),
                        caller => Ok(caller),
                    });
                if let Err(refused) = &caller {
                    super::audit::refused(path.as_str(), peer, refused.code);
                }
                (host, caller, peer)
            },
        )
        .untuple_one()
}

/// Refusal in open mode for a caller that is not on this machine.
const NOT_THIS_MACHINE: Refusal = Refusal {
    status: StatusCode::FORBIDDEN,
    code: "admin_only",
    message: "with no API keys configured, the HTTP API answers clients on this machine only \
              (a loopback address, no page of another origin); configure API keys to use it \
              from elsewhere",
};

/// Whether a request comes from this machine: a loopback peer, and no
/// browser page of an origin other than a loopback name.
fn on_this_machine(peer: Option<SocketAddr>, headers: &HeaderMap) -> bool {
    let loopback = peer.is_some_and(|peer| peer.ip().is_loopback());
    let page_of_this_machine = headers
        .get(warp::http::header::ORIGIN)
        .map(|origin| origin.to_str().is_ok_and(crate::origins::is_loopback_page))
        .unwrap_or(true);
    loopback && page_of_this_machine
}

/// The admin caller, or the answer that refuses the request.
fn admin(caller: Result<Caller, Refusal>) -> Result<Caller, Refusal> {
    match caller {
        Ok(caller) if caller.is_admin() => Ok(caller),
        Ok(_) => Err(ADMIN_ONLY),
        Err(refused) => Err(refused),
    }
}

pub(super) fn refusal(refused: &Refusal) -> Response {
    error_reply(refused.status, refused.code, refused.message)
}

/// `GET /v1/plugins`: each loaded library, reload counters and the last error.
fn plugins(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "plugins")
        .and(warp::get())
        .and(with_caller(host))
        .map(|host: Arc<HostState>, caller| {
            if let Err(refused) = admin(caller) {
                return refusal(&refused);
            }
            let active = host.active.load();
            let status = host.reloader.status();
            let plugins: Vec<Value> = status
                .plugins
                .values()
                .map(|entry| {
                    let p = &entry.plugin;
                    let used_by: Vec<&String> = active
                        .models
                        .values()
                        // By content: a backend may hold the same library
                        // as verified for a child before it was mapped here.
                        .filter(|b| b.plugin.hash == p.hash)
                        .map(|b| &b.name)
                        .chain(
                            active
                                .stores
                                .values()
                                .filter(|s| s.plugin.hash == p.hash)
                                .map(|s| &s.name),
                        )
                        .collect();
                    json!({
                        "name": p.name,
                        "version": p.version,
                        "description": p.description,
                        "kinds": p.kinds.names(),
                        "apiVersion": p.api_version,
                        "file": p.file,
                        "hash": p.hash,
                        "loadedAt": millis(p.loaded_at),
                        "reloads": entry.reloads,
                        "usedBy": used_by,
                    })
                })
                .collect();
            let load_errors: Vec<Value> = status
                .load_errors
                .iter()
                .map(|e| json!({ "file": e.file, "message": e.message }))
                .collect();
            let last_error = status
                .last_error
                .as_ref()
                .map(|(at, message)| json!({ "at": at, "message": message }));
            // Backends whose plugin runs in a child process: its state.
            let isolated: serde_json::Map<String, Value> = active
                .models
                .values()
                .filter_map(|b| match &b.engine {
                    crate::plugins::runtime::Engine::Process(model) => {
                        Some((b.name.clone(), json!(model.health())))
                    }
                    crate::plugins::runtime::Engine::InProcess(_) => None,
                })
                .collect();
            // Stores whose plugin runs in a child process: likewise.
            let isolated_stores: serde_json::Map<String, Value> = active
                .stores
                .values()
                .filter_map(|s| match &s.engine {
                    crate::plugins::runtime::StoreEngine::Process(store) => {
                        Some((s.name.clone(), json!(store.health())))
                    }
                    crate::plugins::runtime::StoreEngine::InProcess(_) => None,
                })
                .collect();
            warp::reply::json(&json!({
                "plugins": plugins,
                "isolated": isolated,
                "isolatedStores": isolated_stores,
                "reloads": status.reloads,
                "lastReloadAt": status.last_reload_ms,
                "lastError": last_error,
                "loadErrors": load_errors,
            }))
            .into_response()
        })
}

/// `GET /v1/config`: the active config, secrets redacted (see [`super::redact`]).
fn config(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "config")
        .and(warp::get())
        .and(with_caller(host))
        .map(|host: Arc<HostState>, caller| {
            if let Err(refused) = admin(caller) {
                return refusal(&refused);
            }
            let active = host.active.load();
            let mut value = serde_json::to_value(&*active.config).unwrap_or(Value::Null);
            redact(&mut value);
            warp::reply::json(&value).into_response()
        })
}

/// `GET /v1/keys`: each API key's id, admin flag and how many secrets it
/// takes (more than one while it is rotated); never a secret.
fn keys(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "keys")
        .and(warp::get())
        .and(with_caller(host))
        .map(|host: Arc<HostState>, caller| {
            if let Err(refused) = admin(caller) {
                return refusal(&refused);
            }
            let active = host.active.load();
            let keys: Vec<Value> = active
                .config
                .auth
                .keys
                .iter()
                .map(
                    |key| json!({ "id": key.id, "admin": key.admin, "secrets": key.secrets.len() }),
                )
                .collect();
            warp::reply::json(&json!({ "open": active.config.auth.keys.is_empty(), "keys": keys }))
                .into_response()
        })
}

/// `POST /v1/reload`: reload config.toml and the plugin directory now.
fn reload_now(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "reload")
        .and(warp::post())
        .and(with_caller_at(host))
        .then(
            |host: Arc<HostState>, caller, peer: Option<SocketAddr>| async move {
                let caller = match admin(caller) {
                    Ok(caller) => caller,
                    Err(refused) => {
                        super::audit::refused("POST /v1/reload", peer, refused.code);
                        return refusal(&refused);
                    }
                };
                let reloaded = state::reload(&host, "POST /v1/reload").await;
                let outcome = match &reloaded {
                    Ok(Outcome::Unchanged) => "unchanged".to_owned(),
                    Ok(Outcome::Reloaded(changes)) => format!("reloaded: {}", changes.join("; ")),
                    Err(message) => format!("refused: {message}"),
                };
                super::audit::admin("reload", caller.id(), peer, &outcome);
                match reloaded {
                    Ok(Outcome::Unchanged) => {
                        warp::reply::json(&json!({ "status": "unchanged" })).into_response()
                    }
                    Ok(Outcome::Reloaded(changes)) => {
                        warp::reply::json(&json!({ "status": "reloaded", "changes": changes }))
                            .into_response()
                    }
                    Err(message) => error_reply(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "reload_failed",
                        &format!("nothing changed; the running set keeps serving: {message}"),
                    ),
                }
            },
        )
}

/// `GET /v1/sessions/{id}`: the stored messages, version and last sequence;
/// the session's settings (`session.update`) and its history summary when
/// it has them.
fn get_session(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "sessions" / String)
        .and(warp::get())
        .and(with_caller(host))
        .then(|id: String, host: Arc<HostState>, caller| async move {
            let id = decoded(&id);
            let caller = match caller {
                Ok(caller) => caller,
                Err(refused) => return refusal(&refused),
            };
            let route = "GET /v1/sessions/{id}";
            let (store, loaded) = match owned_session(&host, &caller, route, &id).await {
                Ok((store, Some(loaded))) => (store, loaded),
                Ok((_, None)) => {
                    return error_reply(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "session_unreadable",
                        &format!(
                            "the stored session `{id}` is not readable; DELETE it to start over"
                        ),
                    )
                }
                Err(answer) => return answer,
            };
            let doc = &loaded.doc;
            let mut answer = json!({
                "id": id,
                "store": store.name,
                "version": loaded.version,
                "lastSequence": doc.last_sequence,
                "turns": doc.turns,
                "messages": doc.messages,
            });
            // Both only when the session has them, as the store keeps them.
            if !doc.settings.is_empty() {
                answer["settings"] = json!(doc.settings);
            }
            if let Some(summary) = &doc.summary {
                answer["summary"] = json!(summary);
            }
            warp::reply::json(&answer).into_response()
        })
}

/// `DELETE /v1/sessions/{id}`: removes the session from the store.
fn delete_session(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "sessions" / String)
        .and(warp::delete())
        .and(with_caller_at(host))
        .then(
            |id: String, host: Arc<HostState>, caller, peer: Option<SocketAddr>| async move {
                let id = decoded(&id);
                let caller = match caller {
                    Ok(caller) => caller,
                    Err(refused) => return refusal(&refused),
                };
                let route = "DELETE /v1/sessions/{id}";
                let store = match owned_session(&host, &caller, route, &id).await {
                    Ok((store, _)) => store,
                    Err(answer) => return answer,
                };
                let timeout = host.turn_settings().store_timeout;
                let deleted = within(&store.name, "delete", timeout, store.delete(&id)).await;
                let outcome = match &deleted {
                    Ok(true) => format!("session {id} deleted"),
                    Ok(false) => format!("session {id} was gone"),
                    Err(_) => format!("session {id}: the store failed"),
                };
                super::audit::admin("delete session", caller.id(), peer, &outcome);
                match deleted {
                    Ok(true) => StatusCode::NO_CONTENT.into_response(),
                    Ok(false) => not_found(&id),
                    Err(err) => unavailable(&caller, route, Some(&id), &err),
                }
            },
        )
}

/// A path segment percent-decoded (`del%2Drace` is `del-race`); as it is
/// when it does not decode to UTF-8 (then it is no valid id either).
fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_or_else(|_| segment.to_owned(), |id| id.into_owned())
}

/// Session `id` from the default store, if the caller may see it (none: its
/// document is not readable); otherwise the answer to give (another key's
/// session is 404, as if absent).
async fn owned_session(
    host: &HostState,
    caller: &Caller,
    route: &str,
    id: &str,
) -> Result<(Arc<StoreBackend>, Option<Loaded>), Response> {
    if !valid_session_id(id) {
        return Err(bad_id());
    }
    let store = host.active.load().store().cloned().ok_or_else(no_store)?;
    let timeout = host.turn_settings().store_timeout;
    match crate::core::load(&store, id, timeout).await {
        Ok(Some(loaded)) if caller.may_access(&loaded.owner) => Ok((store, Some(loaded))),
        Ok(_) => Err(not_found(id)),
        Err(StoreError::Unreadable { owner, .. }) if caller.may_access(&owner) => Ok((store, None)),
        Err(StoreError::Unreadable { .. }) => Err(not_found(id)),
        Err(err) => Err(unavailable(caller, route, Some(id), &err)),
    }
}

/// 503 `store_unavailable` for a failed store call on `route` (for session
/// `id`). The store's own words (file paths, database hosts) go to the log,
/// and to an admin caller; any other caller is told the kind of failure only.
pub(super) fn unavailable(
    caller: &Caller,
    route: &str,
    id: Option<&str>,
    err: &StoreError,
) -> Response {
    tracing::warn!(
        route,
        session = id.unwrap_or_default(),
        caller = caller.id(),
        error = %err,
        "a session store call failed"
    );
    let message = if caller.is_admin() {
        err.to_string()
    } else {
        err.public().to_owned()
    };
    error_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        &message,
    )
}

/// `GET /v1/sessions?after=ID&limit=N`: the caller's session ids, a page at a time.
fn list_sessions(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "sessions")
        .and(warp::get())
        .and(with_caller(host))
        .and(warp::query::<HashMap<String, String>>())
        .then(
            |host: Arc<HostState>, caller, query: HashMap<String, String>| async move {
                let caller: Caller = match caller {
                    Ok(caller) => caller,
                    Err(refused) => return refusal(&refused),
                };
                let Some(store) = host.active.load().store().cloned() else {
                    return no_store();
                };
                let limit = match query.get("limit").map(|l| l.parse::<u32>()) {
                    None => 100,
                    Some(Ok(limit @ 1..=1000)) => limit,
                    Some(_) => {
                        return error_reply(
                            StatusCode::BAD_REQUEST,
                            "bad_limit",
                            "limit must be a whole number from 1 to 1000 (default 100)",
                        )
                    }
                };
                let after = query.get("after").cloned().unwrap_or_default();
                // Admins see every session; other keys their own.
                let owner = match &caller {
                    Caller::Key { admin: false, id } => id.clone(),
                    _ => String::new(),
                };
                let timeout = host.turn_settings().store_timeout;
                match within(
                    &store.name,
                    "list",
                    timeout,
                    list(&store, &owner, &after, limit),
                )
                .await
                {
                    // The host's own records (usage) are not sessions.
                    Ok(page) => warp::reply::json(&json!({
                        "sessions": page.ids.iter()
                            .filter(|id| !id.starts_with(RESERVED_PREFIX))
                            .collect::<Vec<_>>(),
                        "next": page.next,
                    }))
                    .into_response(),
                    Err(err) => unavailable(&caller, "GET /v1/sessions", None, &err),
                }
            },
        )
}

/// `GET /metrics`: Prometheus text format (an admin key when keys are set).
fn prometheus(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_caller(host))
        .map(|_host: Arc<HostState>, caller| {
            if let Err(refused) = admin(caller) {
                return refusal(&refused);
            }
            warp::reply::with_header(
                metrics().render(),
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .into_response()
        })
}

/// `GET /healthz`: the process serves HTTP.
fn healthz() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({ "status": "ok" })).into_response())
}

/// `GET /readyz`: plugins are loaded and the default store answers. The
/// route is open, so a failure says only its code; the store's own words go
/// to the log when readiness changes (see [`state::Readiness`]).
fn readyz(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("readyz")
        .and(warp::get())
        .and(with_host(host))
        .then(|host: Arc<HostState>| async move {
            if host.draining() {
                return error_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the host is shutting down",
                );
            }
            let active = host.active.load_full();
            let (Some(store), Some(_)) = (active.store().cloned(), active.default_model()) else {
                return error_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    "no default backend or store",
                );
            };
            let ready = host
                .readiness
                .check(&store.name, || {
                    let timeout = host.turn_settings().store_timeout;
                    let store = store.clone();
                    async move { within(&store.name, "ping", timeout, ping(&store)).await }
                })
                .await;
            if ready {
                warp::reply::json(&json!({
                    "status": "ready",
                    "store": active.config.default_store,
                    "models": active.models.keys().collect::<Vec<_>>(),
                }))
                .into_response()
            } else {
                error_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the session store does not answer",
                )
            }
        })
}

fn bad_id() -> Response {
    error_reply(
        StatusCode::BAD_REQUEST,
        "bad_session_id",
        "session ids are 1-128 characters of A-Z a-z 0-9 . _ : -, not starting `_host:`",
    )
}

pub(super) fn no_store() -> Response {
    error_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_store",
        "no store is configured",
    )
}

fn not_found(id: &str) -> Response {
    error_reply(
        StatusCode::NOT_FOUND,
        "session_not_found",
        &format!("no session `{id}`"),
    )
}

fn millis(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_else(|_| now_ms())
}
