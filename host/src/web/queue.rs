//! A connection's prompt queue: where a prompt is checked against the
//! limits (its size, the queue, the key's queued prompts and rate), waits
//! behind the running turn, and is run through the turn core.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::access::{record_turn, TurnOf};
use super::connection::Connection;
use crate::core::sink::{Status, TurnControl};
use crate::core::{self, Prompt, Scope};
use crate::limits::Held;
use crate::metrics::metrics;
use crate::protocol::{now_ms, protocol_diagnostic, Meta, TurnEvent, SOURCE_HOST};

/// The running turn's control, if a turn runs.
pub(super) type CurrentTurn = Arc<Mutex<Option<Arc<TurnControl>>>>;

pub(super) fn set_current(current: &CurrentTurn, control: Option<Arc<TurnControl>>) {
    *current.lock().unwrap_or_else(|p| p.into_inner()) = control;
}

pub(super) fn turn_running(current: &CurrentTurn) -> bool {
    current.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// Cancels the running turn; answers whether there was one.
pub(super) fn cancel_current(current: &CurrentTurn) -> bool {
    let guard = current.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        // A turn whose end frame went out is over for the client, even if
        // the worker has not cleared it yet: a cancel now is answered
        // `nothing_to_cancel`, not swallowed.
        Some(control) if !control.has_ended() => {
            control.cancel();
            true
        }
        _ => false,
    }
}

/// Gives the running turn the client's result of tool call `call_id`;
/// answers why not when it was not taken (see [`crate::core::tools`]).
pub(super) fn deliver_tool_result(
    current: &CurrentTurn,
    call_id: &str,
    outcome: crate::core::tools::Outcome,
) -> Result<(), crate::core::tools::Refused> {
    let guard = current.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(control) if !control.has_ended() => control.tools.deliver(call_id, outcome),
        _ => Err(crate::core::tools::Refused::NotWaiting),
    }
}

/// What a connection's queue runs in order.
pub(super) enum Work {
    /// A turn.
    Prompt(Prompt),
    /// A change of the session's settings (see [`super::settings`]); boxed,
    /// as a prompt's parameters are: the queue's slots are allocated up
    /// front for every connection.
    Update(Box<crate::core::settings::SettingsUpdate>),
}

/// Work in the queue, holding its place among its key's queued prompts and
/// counted in its backend's queue depth while it waits.
pub(super) type Queued = (Work, Held, Option<crate::metrics::Queued>);

/// The connection's prompt queue and the task that runs its turns, both
/// made on the first prompt: an idle connection pays for neither.
pub(super) struct Queue {
    pub(super) started: Option<(mpsc::Sender<Queued>, tokio::task::JoinHandle<()>)>,
    pub(super) max: usize,
    pub(super) conn: Arc<Connection>,
    pub(super) current: CurrentTurn,
    pub(super) closed: Arc<AtomicBool>,
}

impl Queue {
    pub(super) fn sender(&mut self) -> &mpsc::Sender<Queued> {
        let (conn, current, closed, max) = (&self.conn, &self.current, &self.closed, self.max);
        &self
            .started
            .get_or_insert_with(|| {
                let (prompts, receiver) = mpsc::channel(max);
                let worker = tokio::spawn(run_turns(
                    conn.clone(),
                    receiver,
                    current.clone(),
                    closed.clone(),
                ));
                (prompts, worker)
            })
            .0
    }

    /// Whether prompts wait in the queue.
    pub(super) fn waiting(&self) -> bool {
        self.started
            .as_ref()
            .is_some_and(|(prompts, _)| prompts.capacity() < prompts.max_capacity())
    }
}

/// The backend a prompt naming `model` (or none) would run on, as far as
/// the connection knows before the turn claims its session.
fn backend_of(
    conn: &Connection,
    active: &crate::plugins::runtime::Active,
    model: Option<&str>,
) -> String {
    model
        .map(str::to_owned)
        .or_else(|| conn.attachment.settings_model())
        .filter(|name| active.models.contains_key(name))
        .or_else(|| conn.model())
        .unwrap_or_else(|| active.config.default_model.clone())
}

/// Why a prompt asking `params.max_tokens` of the backend it would run on
/// is refused: it asks more than that backend's `max_tokens_limit`.
pub(super) fn over_token_limit(
    conn: &Connection,
    model: Option<&str>,
    params: &llm_host_plugin_api::TurnParams,
) -> Option<String> {
    let asked = params.max_tokens?;
    let active = conn.host.active.load();
    let name = backend_of(conn, &active, model);
    let limit = active.config.models.get(&name)?.max_tokens_limit?;
    (asked > limit).then(|| {
        format!(
            "maxTokens {asked} is over backend `{name}`'s limit of {limit} \
             (models.{name}.max_tokens_limit); the prompt was not run"
        )
    })
}

/// Checks `prompt` against the limits and queues it, or tells the client
/// why it was not run.
pub(super) async fn enqueue(conn: &Connection, queue: &mut Queue, prompt: Prompt) {
    // The active set, not a copy of its [server]: this runs for every prompt.
    let active = conn.host.active.load_full();
    let server = &active.config.server;
    let id = prompt.id.as_deref();
    if prompt.text.len() > server.max_prompt_bytes {
        let message = format!(
            "the prompt has {} bytes, over server.max_prompt_bytes = {}; it was not run",
            prompt.text.len(),
            server.max_prompt_bytes
        );
        return refuse(conn, id, "prompt_too_long", &message).await;
    }
    // A place in the queue first: a prompt refused for a full queue does not
    // spend one of the key's turns.
    let prompts = queue.sender();
    let Ok(place) = prompts.try_reserve() else {
        let message = format!(
            "too many prompts queued behind the running turn (server.max_queued_prompts = {}); \
             this one was not run",
            prompts.max_capacity()
        );
        return refuse(conn, id, "queue_full", &message).await;
    };
    let Some(held) = conn.host.key_queued.try_take(
        &conn.limit_name,
        server.max_queued_prompts_per_key,
        usize::MAX,
    ) else {
        let message = format!(
            "this key has server.max_queued_prompts_per_key = {} prompts waiting over all its \
             connections; this one was not run",
            server.max_queued_prompts_per_key
        );
        return refuse(conn, id, "key_queue_full", &message).await;
    };
    if !conn
        .host
        .turn_rate
        .allow(&conn.limit_name, server.turns_per_minute)
    {
        drop(place);
        let message = format!(
            "more than {} turns a minute for this API key (server.turns_per_minute); \
             this prompt was not run",
            server.turns_per_minute
        );
        return refuse(conn, id, "rate_limited", &message).await;
    }
    let waiting = metrics().queued(&backend_of(conn, &active, prompt.model.as_deref()));
    place.send((Work::Prompt(prompt), held, Some(waiting)));
}

/// Tells the client its prompt was not run: an error diagnostic with `code`
/// (and the prompt's id in `data.promptId`), then a turn end of status
/// `refused` naming the prompt's id, so that a client waiting for its turn
/// to end is not left waiting. Counted in `llm_host_refused_total`.
///
/// Boxed: a connection's read loop awaits this only when it refuses, and
/// should not carry its state while it waits for frames.
pub(super) fn refuse<'a>(
    conn: &'a Connection,
    prompt_id: Option<&'a str>,
    code: &'static str,
    message: &'a str,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        metrics().refuse(code);
        tracing::info!(
            target: "llm_host::audit",
            key = conn.caller.id(),
            client = %conn.peer.map(|peer| peer.to_string()).unwrap_or_default(),
            session = %conn.attachment.session_id,
            code,
            prompt = prompt_id.unwrap_or(""),
            "prompt refused"
        );
        let mut entry = protocol_diagnostic("error", code, message);
        if let (Some(id), Some(data)) = (prompt_id, entry.data.as_mut()) {
            data["promptId"] = id.into();
        }
        conn.send_entry(&entry).await;
        let end = TurnEvent::End {
            status: "refused",
            interaction_id: "",
            prompt_id,
        };
        let meta = Meta::now(conn.attachment.sequence(), SOURCE_HOST, None);
        conn.send(conn.framer.turn(&end, &meta)).await;
    })
}

/// Runs queued prompts one after another until the connection closes.
async fn run_turns(
    conn: Arc<Connection>,
    mut prompts: mpsc::Receiver<Queued>,
    current: CurrentTurn,
    closed: Arc<AtomicBool>,
) {
    while let Some((work, held, waiting)) = prompts.recv().await {
        // No longer waiting: the key may queue another.
        drop((held, waiting));
        let prompt = match work {
            Work::Prompt(prompt) => prompt,
            Work::Update(update) => {
                if !closed.load(Ordering::Relaxed) {
                    super::settings::apply(&conn, *update).await;
                }
                continue;
            }
        };
        let control = Arc::new(TurnControl::default());
        set_current(&current, Some(control.clone()));
        if closed.load(Ordering::Relaxed) {
            break;
        }
        run_turn(&conn, prompt, control).await;
        set_current(&current, None);
        conn.active_at.store(now_ms(), Ordering::Relaxed);
    }
}

/// Runs one turn through the turn core, on the backend and store the
/// connection uses under the active config.
async fn run_turn(conn: &Arc<Connection>, prompt: Prompt, control: Arc<TurnControl>) -> Status {
    let active = conn.host.active.load_full();
    let backend = prompt
        .model
        .clone()
        .or_else(|| conn.model())
        .and_then(|name| active.models.get(&name))
        .or_else(|| active.default_model())
        .cloned();
    let store = active
        .stores
        .get(&conn.store())
        .or_else(|| active.store())
        .cloned();
    let (Some(backend), Some(store)) = (backend, store) else {
        conn.diagnostic(
            "error",
            "host",
            "no_backend",
            "no model backend or store is configured",
        )
        .await;
        let turn = conn.attachment.next_turn_id();
        let sequence = conn.attachment.sequence();
        let frame = conn.framer.turn(
            &TurnEvent::End {
                status: Status::Failed.as_str(),
                interaction_id: &turn,
                prompt_id: prompt.id.as_deref(),
            },
            &Meta::now(sequence, SOURCE_HOST, Some(&turn)),
        );
        conn.send(frame).await;
        return Status::Failed;
    };
    // The turn's frames go to every socket of the session on this host.
    let frames = conn.hub.turn(control.clone(), conn);
    let scope = Scope {
        host: &conn.host.instance,
        attachment: &conn.attachment,
        store: &store,
        frames: &frames,
        framer: conn.framer,
        settings: active.config.server.turn_settings(),
    };
    let backends = Configured(&active);
    let (report, ran) = core::turn::run_with(
        &scope,
        &conn.host.locks,
        &backends,
        backend,
        prompt,
        control.clone(),
    )
    .await;
    conn.hub.finished(&control).await;
    let of = TurnOf {
        api: "websocket",
        key: conn.caller.id(),
        client: conn.peer,
        session: &conn.attachment.session_id,
        request: None,
        backend: &ran.name,
        plugin: &ran.plugin.name,
        store: Some(&store.name),
        parent: conn.trace.as_ref(),
    };
    record_turn(&of, &report);
    report.status
}

/// The active set's backends and their history policies, for the turn core.
pub(super) struct Configured<'a>(pub(super) &'a crate::plugins::runtime::Active);

impl core::ports::Backends<crate::plugins::runtime::ModelBackend> for Configured<'_> {
    fn model(&self, name: &str) -> Option<Arc<crate::plugins::runtime::ModelBackend>> {
        self.0.models.get(name).cloned()
    }

    fn history(&self, name: &str) -> Option<&core::history::HistoryPolicy> {
        self.0.config.models.get(name)?.history.as_ref()
    }
}
