//! `POST /v1/chat/completions`: a request admitted as a WebSocket prompt is
//! (its key, its limits), run through the turn core on a task of its own,
//! and answered as OpenAI's API answers.
//!
//! Without `X-Session-Id` nothing is stored: the request's messages go to
//! the backend as they are ([`core::turn::run_unsaved`]). With
//! `X-Session-Id: ID` the exchange is a turn of that session
//! ([`core::turn::run`]), as if its last message (the user's) had been sent
//! on a WebSocket of the session: the session's stored history goes to the
//! backend, not the request's earlier messages; the prompt and the answer
//! are saved; another key's session is 404.
//!
//! Limits, as for a WebSocket prompt: the body over `server.max_frame_bytes`
//! or the prompt (the last user message) over `server.max_prompt_bytes` is
//! 413; `max_tokens` over the backend's `max_tokens_limit` is 400; past the
//! key's `server.turns_per_minute` 429. A request in flight holds one of
//! `server.max_connections` (503 past it) and one of its key's
//! `server.max_connections_per_key` (429 past it), so that a shutdown waits
//! for its turn as for a socket's.
//!
//! The turn runs on its own task, so that it is saved however the request
//! ends. When the client goes away (the request's future or the streamed
//! body is dropped) its [`Stop`] cancels the turn: the model stops at its
//! next event, and a session's turn is saved with what it had, as a
//! WebSocket's is when its socket closes.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::{Reply, Response};
use warp::{Buf, Filter};

use super::chunks::Chunks;
use super::request::ChatRequest;
use super::response::{Answer, Event};
use super::stream::{Channel, SseBody, Stop};
use super::{caller, model_not_found, ApiError};
use crate::core::document::valid_session_id;
use crate::core::ports::StoreError;
use crate::core::sink::TurnControl;
use crate::core::turn::{Report, Unsaved};
use crate::core::{self, Attachment, Party, Prompt, Scope};
use crate::metrics::metrics;
use crate::plugins::runtime::{Active, ModelBackend, StoreBackend};
use crate::protocol::{now_ms, Envelope, Framer};
use crate::state::HostState;
use crate::web::access::{record_turn, TurnOf};
use crate::web::auth::Caller;

/// The request header that names the session a request is a turn of.
pub const SESSION_HEADER: &str = "x-session-id";

/// `POST /v1/chat/completions`.
pub fn route(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(crate::web::listener::peer())
        .and(warp::body::stream())
        .then(move |headers: HeaderMap, peer: Option<SocketAddr>, body| {
            let host = host.clone();
            async move {
                answer(host, headers, peer, body)
                    .await
                    .unwrap_or_else(|err| err.reply())
            }
        })
}

/// Counts a refusal (`llm_host_refused_total{reason}`) and answers it.
fn refused(reason: &'static str, err: ApiError) -> ApiError {
    metrics().refuse(reason);
    err.with_code(reason)
}

async fn answer<S, B>(
    host: Arc<HostState>,
    headers: HeaderMap,
    peer: Option<SocketAddr>,
    body: S,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if host.stopping() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "the server is shutting down",
        ));
    }
    let active = host.active.load_full();
    let caller = caller(&active, &headers)?;
    let server = active.config.server.clone();
    let body = read_body(&headers, body, server.max_frame_bytes).await?;
    let request = ChatRequest::parse(&body)?;
    drop(body);
    let Some(backend) = active.models.get(&request.model).cloned() else {
        return Err(model_not_found(&request.model));
    };
    check_max_tokens(&active, &request)?;
    let session = match headers.get(SESSION_HEADER).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(id)) if valid_session_id(id) => Some(id.to_owned()),
        Some(_) => return Err(ApiError::invalid(
            "X-Session-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -, not starting `_host:`",
            None,
        )
        .with_code("bad_session_id")),
    };
    let prompt = request.last_user_message();
    if session.is_some() && prompt.is_none() {
        return Err(ApiError::invalid(
            "with X-Session-Id the last message must be the user's: it is the prompt, and the \
             session's stored history stands for the messages before it",
            Some("messages".to_owned()),
        ));
    }
    if let Some(prompt) = prompt.filter(|p| p.len() > server.max_prompt_bytes) {
        let message = format!(
            "the prompt (the last user message) has {} bytes, over server.max_prompt_bytes = {}",
            prompt.len(),
            server.max_prompt_bytes
        );
        return Err(refused(
            "prompt_too_long",
            too_large(message, Some("messages".to_owned())),
        ));
    }

    // Per key; in open mode, per client address (as for sockets).
    let limit_name = match (&caller, peer) {
        (Caller::Open, Some(peer)) => format!("address {}", peer.ip()),
        _ => format!("key {}", caller.id()),
    };
    let Some(slot) = host.connections.try_acquire(server.max_connections) else {
        return Err(refused(
            "too_many_connections",
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "",
                "the host serves as many connections as server.max_connections allows; try again \
                 later",
            ),
        ));
    };
    let per_key = server.max_connections_per_key;
    let Some(key_slot) = host
        .key_connections
        .try_take(&limit_name, per_key, usize::MAX)
    else {
        return Err(refused(
            "too_many_key_connections",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "",
                format!(
                    "this key (in open mode: this address) has server.max_connections_per_key = \
                     {per_key} connections and requests in flight"
                ),
            ),
        ));
    };
    let store = match &session {
        None => None,
        Some(id) => Some(session_store(&active, &caller, id).await?),
    };
    if !host.turn_rate.allow(&limit_name, server.turns_per_minute) {
        return Err(refused(
            "rate_limited",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "",
                format!(
                    "more than {} turns a minute for this API key (server.turns_per_minute)",
                    server.turns_per_minute
                ),
            ),
        ));
    }

    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_ms() / 1000;
    let control = Arc::new(TurnControl::default());
    let stop = Stop::new(control.clone());
    let sequence = Arc::new(AtomicU64::new(0));
    let write_timeout = Duration::from_secs(server.write_timeout_secs);
    let (frames, receiver) = Channel::new(sequence.clone(), write_timeout);
    let chunks = Chunks::new(
        id.clone(),
        created,
        request.model.clone(),
        request.include_usage,
    );
    let stream = request.stream;
    let job = Job {
        trace: crate::telemetry::parent(&headers),
        host,
        active,
        backend,
        store,
        caller,
        peer,
        session: session.clone(),
        request,
        id: id.clone(),
        frames,
        sequence,
        control,
        _held: Box::new((slot, key_slot)),
    };
    tokio::spawn(job.run());

    let mut response = respond(receiver, stream, chunks, stop).await?;
    if let Some(id) = session.and_then(|id| HeaderValue::from_str(&id).ok()) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static(SESSION_HEADER), id);
    }
    Ok(response)
}

/// 413 `request_too_large` (or another code).
fn too_large(message: String, param: Option<String>) -> ApiError {
    ApiError {
        param,
        ..ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            message,
        )
    }
}

/// The body, at most `limit` bytes (413 past it, by its `Content-Length`
/// before anything is read, or as it comes).
async fn read_body<S, B>(headers: &HeaderMap, body: S, limit: usize) -> Result<Vec<u8>, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let over = || {
        refused(
            "request_too_large",
            too_large(
                format!("the body is over server.max_frame_bytes = {limit} bytes"),
                None,
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok())
        .and_then(|length| length.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(over());
    }
    let mut bytes = Vec::with_capacity(declared.map_or(1024, |length| length as usize));
    tokio::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk
            .map_err(|err| ApiError::invalid(format!("the body could not be read: {err}"), None))?;
        if bytes.len() + chunk.remaining() > limit {
            return Err(over());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            bytes.extend_from_slice(part);
            let taken = part.len();
            chunk.advance(taken);
        }
    }
    Ok(bytes)
}

/// 400 `max_tokens_too_large` when the request asks more than the
/// backend's `max_tokens_limit`.
fn check_max_tokens(active: &Active, request: &ChatRequest) -> Result<(), ApiError> {
    let Some(asked) = request.params.max_tokens else {
        return Ok(());
    };
    let name = &request.model;
    let Some(limit) = active
        .config
        .models
        .get(name)
        .and_then(|model| model.max_tokens_limit)
    else {
        return Ok(());
    };
    if asked <= limit {
        return Ok(());
    }
    Err(refused(
        "max_tokens_too_large",
        ApiError::invalid(
            format!(
                "max_tokens {asked} is over backend `{name}`'s limit of {limit} \
                 (models.{name}.max_tokens_limit)"
            ),
            Some("max_tokens".to_owned()),
        ),
    ))
}

/// The store session `id` lives in, after checking the caller may use it:
/// another key's session is 404, as if it did not exist; a store that
/// fails is 503. (The turn's claim checks again, for a session created in
/// between.)
async fn session_store(
    active: &Active,
    caller: &Caller,
    id: &str,
) -> Result<Arc<StoreBackend>, ApiError> {
    let Some(store) = active.store().cloned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_store",
            "no store is configured",
        ));
    };
    if matches!(caller, Caller::Open) {
        return Ok(store);
    }
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "session_not_found",
            format!("no session `{id}`"),
        )
    };
    let timeout = active.config.server.turn_settings().store_timeout;
    match core::load(&store, id, timeout).await {
        Ok(Some(loaded)) if !caller.may_access(&loaded.owner) => Err(not_found()),
        Err(StoreError::Unreadable { owner, .. }) if !caller.may_access(&owner) => Err(not_found()),
        // An unreadable session of the caller's own is told by the turn.
        Ok(_) | Err(StoreError::Unreadable { .. }) => Ok(store),
        Err(err) => {
            tracing::error!(session = %id, error = %err, "cannot load session");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "store_unavailable",
                format!("the session could not be loaded: {}", err.public()),
            ))
        }
    }
}

/// Reads the turn's frames and answers: a `chat.completion` when the turn
/// has ended; a stream once its first output came (until then a failure
/// is still an HTTP status).
async fn respond(
    mut receiver: mpsc::Receiver<bytes::Bytes>,
    stream: bool,
    chunks: Chunks,
    stop: Stop,
) -> Result<Response, ApiError> {
    let mut answer = Answer::default();
    let mut seen = Vec::new();
    let mut streaming = false;
    while !answer.ended() {
        let Some(frame) = receiver.recv().await else {
            break;
        };
        let Some(event) = Event::parse(&frame) else {
            continue;
        };
        answer.add(&event);
        if stream {
            streaming = event.is_output();
            seen.push(event);
            if streaming {
                break;
            }
        }
    }
    if !streaming {
        // The turn ended (or its task did).
        stop.ended();
        if let Some(err) = answer.failure() {
            return Err(err);
        }
    }
    if !stream {
        return Ok(warp::reply::json(&answer.completion(
            &chunks.id,
            chunks.created,
            &chunks.model,
        ))
        .into_response());
    }
    let body = SseBody::new(receiver, chunks, &seen, stop);
    let mut response = warp::reply::stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies that buffer answers (nginx) pass this one on as it comes.
    headers.insert(
        header::HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// One request's turn, run on a task of its own.
struct Job {
    host: Arc<HostState>,
    active: Arc<Active>,
    backend: Arc<ModelBackend>,
    /// The session's store, for a turn of a session.
    store: Option<Arc<StoreBackend>>,
    caller: Caller,
    peer: Option<SocketAddr>,
    session: Option<String>,
    request: ChatRequest,
    id: String,
    frames: Channel,
    sequence: Arc<AtomicU64>,
    control: Arc<TurnControl>,
    /// The request's places among connections, given back when the turn
    /// is over (when the job is dropped).
    _held: Box<dyn Send + Sync>,
    /// The trace the request named (`traceparent`), when telemetry is on.
    trace: Option<crate::telemetry::Parent>,
}

impl Job {
    async fn run(self) {
        let grace = Duration::from_secs(self.active.config.server.shutdown_grace_secs);
        let mut shutdown = self.host.shutdown.subscribe();
        let turn = self.turn();
        tokio::pin!(turn);
        // On shutdown the turn may finish within the grace period, as a
        // socket's may; then it is cancelled (and a session's saved).
        let report = tokio::select! {
            report = &mut turn => report,
            () = async {
                if shutdown.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(grace).await;
            } => {
                self.control.cancel();
                turn.await
            }
        };
        let of = TurnOf {
            api: "openai",
            key: self.caller.id(),
            client: self.peer,
            session: self.session.as_deref().unwrap_or(""),
            request: Some(&self.id),
            backend: &self.backend.name,
            plugin: &self.backend.plugin.name,
            store: self.store.as_ref().map(|store| store.name.as_str()),
            parent: self.trace.as_ref(),
        };
        record_turn(&of, &report);
    }

    async fn turn(&self) -> Report {
        let settings = self.active.config.server.turn_settings();
        let framer = Framer {
            envelope: Envelope::Flat,
        };
        let params = self.request.params.clone();
        match (&self.session, &self.store) {
            (Some(session), Some(store)) => {
                let party = Party {
                    owner: self.caller.owner().to_owned(),
                    sees_all: self.caller.sees_all(),
                };
                let attachment = Attachment::new(session.clone(), party, self.sequence.clone());
                let scope = Scope {
                    host: &self.host.instance,
                    attachment: &attachment,
                    store,
                    frames: &self.frames,
                    framer,
                    settings,
                };
                let prompt = Prompt {
                    id: None,
                    text: self
                        .request
                        .last_user_message()
                        .unwrap_or_default()
                        .to_owned(),
                    model: Some(self.request.model.clone()),
                    params: Box::new(params),
                    // The API's clients answer tool calls with a new request.
                    round_trips: false,
                };
                // The backend's history policy applies; the request names
                // its backend, so the session's does not.
                let backends = crate::web::queue::Configured(&self.active);
                core::turn::run_with(
                    &scope,
                    &self.host.locks,
                    &backends,
                    self.backend.clone(),
                    prompt,
                    self.control.clone(),
                )
                .await
                .0
            }
            _ => {
                let unsaved = Unsaved {
                    interaction_id: &self.id,
                    messages: &self.request.messages,
                    params: &params,
                };
                core::turn::run_unsaved(
                    &self.frames,
                    framer,
                    settings,
                    self.backend.clone(),
                    unsaved,
                    self.control.clone(),
                )
                .await
            }
        }
    }
}
