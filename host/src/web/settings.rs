//! `session.update` on a connection (command mode): checked against the
//! config when it arrives, then applied through the turn core in the
//! connection's queue, after the running turn and the prompts queued
//! before it, and answered with an `interaction.session` event of type
//! `updated` naming every setting now in effect.

use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::connection::Connection;
use super::queue::{over_token_limit, Queue, Work};
use crate::core::claim::ClaimError;
use crate::core::settings::SettingsUpdate;
use crate::core::{self, Scope};
use crate::protocol::{protocol_diagnostic, Meta, SessionEvent, SOURCE_HOST};

/// Why `update` is refused: a backend that is not configured, a system
/// prompt over `server.max_prompt_bytes`, `maxTokens` over the limit of
/// the backend the session would use. Answers the code and the message.
pub(super) fn check(
    conn: &Connection,
    update: &SettingsUpdate,
) -> Result<(), (&'static str, String)> {
    let active = conn.host.active.load();
    if let Some(Some(name)) = &update.model {
        if !active.models.contains_key(name) {
            return Err((
                "unknown_model",
                format!("unknown model backend `{name}`; the settings were not changed"),
            ));
        }
    }
    if let Some(Some(system)) = &update.system {
        let limit = active.config.server.max_prompt_bytes;
        if system.len() > limit {
            return Err((
                "prompt_too_long",
                format!(
                    "the system prompt has {} bytes, over server.max_prompt_bytes = {limit}; \
                     the settings were not changed",
                    system.len()
                ),
            ));
        }
    }
    if let Some(Some(params)) = &update.params {
        let model = match &update.model {
            Some(Some(model)) => Some(model.clone()),
            // Cleared: the connection's backend.
            Some(None) => Some(
                conn.model()
                    .unwrap_or_else(|| active.config.default_model.clone()),
            ),
            None => None,
        };
        if let Some(message) = over_token_limit(conn, model.as_deref(), params) {
            let message =
                message.replace("the prompt was not run", "the settings were not changed");
            return Err(("max_tokens_too_large", message));
        }
    }
    Ok(())
}

/// Queues `update` behind the running turn and the prompts before it, or
/// tells the client why it was not (`queue_full`, `key_queue_full`).
pub(super) async fn enqueue(conn: &Connection, queue: &mut Queue, update: SettingsUpdate) {
    let max_per_key = conn
        .host
        .active
        .load()
        .config
        .server
        .max_queued_prompts_per_key;
    let max = queue.max;
    let refused = match queue.sender().try_reserve() {
        Err(_) => Some((
            "queue_full",
            format!(
                "too many prompts queued behind the running turn (server.max_queued_prompts = \
                 {max}); the settings were not changed"
            ),
        )),
        Ok(place) => match conn
            .host
            .key_queued
            .try_take(&conn.limit_name, max_per_key, usize::MAX)
        {
            Some(held) => {
                place.send((Work::Update(Box::new(update)), held, None));
                None
            }
            None => Some((
                "key_queue_full",
                format!(
                    "this key has server.max_queued_prompts_per_key = {max_per_key} prompts \
                     waiting over all its connections; the settings were not changed"
                ),
            )),
        },
    };
    if let Some((code, message)) = refused {
        crate::metrics::metrics().refuse(code);
        conn.send_entry(&protocol_diagnostic("error", code, &message))
            .await;
    }
}

/// Applies `update` to the session (a store write, through the turn core)
/// and answers the client with the settings now in effect, or why not.
pub(super) async fn apply(conn: &Connection, update: SettingsUpdate) {
    let active = conn.host.active.load_full();
    let Some(store) = active
        .stores
        .get(&conn.store())
        .or_else(|| active.store())
        .cloned()
    else {
        conn.diagnostic("error", "host", "no_backend", "no store is configured")
            .await;
        return;
    };
    let scope = Scope {
        host: &conn.host.instance,
        attachment: &conn.attachment,
        store: &store,
        frames: &conn.out,
        framer: conn.framer,
        settings: active.config.server.turn_settings(),
    };
    match core::settings::update(&scope, &conn.host.locks, &update).await {
        Ok(settings) => {
            tracing::info!(
                target: "llm_host::audit",
                key = conn.caller.id(),
                session = %conn.attachment.session_id,
                "session settings updated"
            );
            let event = SessionEvent::Updated {
                settings: &settings,
            };
            let framer = conn.framer;
            conn.out
                .write_stamped(|sequence| {
                    let meta = Meta::now(sequence, SOURCE_HOST, None);
                    WsMessage::text(framer.session(&event, &meta))
                })
                .await;
        }
        Err(ClaimError::NotYours(id)) => {
            let message = format!("no session `{id}`; the settings were not changed");
            conn.diagnostic("error", "host", "session_not_found", &message)
                .await;
        }
        Err(err) => {
            let public = match &err {
                ClaimError::Store(err) => err.public(),
                _ => "the session store failed",
            };
            tracing::error!(session = %conn.attachment.session_id, error = %err, "settings not saved");
            let message = format!("the settings could not be saved: {public}");
            conn.diagnostic("error", "store", "store_unavailable", &message)
                .await;
        }
    }
}
