//! A session's settings (`session.update`, PROTOCOL.md section 2): a system
//! prompt, a backend and default turn parameters, kept with the session and
//! applied to its later turns.
//!
//! - `system` is sent as a system message at the head of each model request;
//!   it is not stored in the history.
//! - `model` is the backend a turn runs on when its prompt names none; it
//!   wins over the backend the connection would use (`?model=`, the last
//!   turn's, the default).
//! - `params` are default turn parameters; a prompt's own override them field
//!   by field ([`merge_params`]).
//!
//! An update is a store write like a turn's: it waits for a turn of the
//! session running on this host (the session lock), and saves conditionally
//! on the version it loaded. A turn another host runs keeps its lease; that
//! host's renewals and save take the new settings (see [`super::claim::keep`]
//! and [`super::commit`]).

use std::sync::Arc;

use llm_host_plugin_api::{Message, Role, TurnParams};
use serde::{Deserialize, Serialize};

use super::claim::ClaimError;
use super::locks::SessionLocks;
use super::ports::{Backends, Frames, Model, SaveOutcome, SessionStore, StoreError};
use super::Scope;

/// What a session's later turns use unless the prompt says otherwise.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionSettings {
    /// Sent as a system message at the head of every model request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The backend a turn runs on when its prompt names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Default turn parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<TurnParams>,
}

impl SessionSettings {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.system.is_none() && self.model.is_none() && self.params.is_none()
    }

    /// The settings with `update` applied.
    pub fn updated(&self, update: &SettingsUpdate) -> SessionSettings {
        fn pick<T: Clone>(now: &Option<T>, change: &Option<Option<T>>) -> Option<T> {
            match change {
                None => now.clone(),
                Some(new) => new.clone(),
            }
        }
        SessionSettings {
            system: pick(&self.system, &update.system),
            model: pick(&self.model, &update.model),
            params: pick(&self.params, &update.params),
        }
    }

    /// The system message requests start with, if one is set.
    pub fn system_message(&self) -> Option<Message> {
        self.system
            .as_ref()
            .map(|text| Message::new(Role::System, text.clone()))
    }
}

/// A `session.update`: for each setting, `None` leaves it, `Some(None)`
/// clears it, `Some(Some(x))` sets it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettingsUpdate {
    /// The system prompt.
    pub system: Option<Option<String>>,
    /// The backend.
    pub model: Option<Option<String>>,
    /// The default turn parameters.
    pub params: Option<Option<TurnParams>>,
}

/// `prompt`'s parameters over the session's `defaults`, field by field: a
/// field the prompt sets wins; `stop` and `tools` are the prompt's when it
/// gives any; `extra` keys are merged, the prompt's winning.
pub fn merge_params(defaults: &TurnParams, prompt: TurnParams) -> TurnParams {
    let mut extra = defaults.extra.clone();
    extra.extend(prompt.extra);
    TurnParams {
        temperature: prompt.temperature.or(defaults.temperature),
        max_tokens: prompt.max_tokens.or(defaults.max_tokens),
        top_p: prompt.top_p.or(defaults.top_p),
        top_k: prompt.top_k.or(defaults.top_k),
        seed: prompt.seed.or(defaults.seed),
        stop: list(prompt.stop, &defaults.stop),
        tools: list(prompt.tools, &defaults.tools),
        extra,
    }
}

/// The backend a turn runs on: `given` when the prompt named it, else the
/// one `settings` name while it is configured, else `given`.
pub(super) fn choose<M: Model, B: Backends<M>>(
    backends: &B,
    settings: &SessionSettings,
    given: Arc<M>,
    named: bool,
) -> Arc<M> {
    match settings.model.as_deref() {
        Some(name) if !named && name != given.name() => backends.model(name).unwrap_or(given),
        _ => given,
    }
}

/// `mine` when it has any, else a copy of `default`.
fn list<T: Clone>(mine: Vec<T>, default: &[T]) -> Vec<T> {
    if mine.is_empty() {
        default.to_vec()
    } else {
        mine
    }
}

/// How many times an update tries again after another writer's save.
const ATTEMPTS: usize = 8;

/// Applies `update` to the scope's session (created by it if it does not
/// exist and the update sets something); answers the settings now in
/// effect. Waits for a turn of the session running on this host.
pub async fn update<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    locks: &SessionLocks,
    update: &SettingsUpdate,
) -> Result<SessionSettings, ClaimError> {
    let attachment = scope.attachment;
    let lock = locks.get(&attachment.session_id);
    let _turns_of_this_session = lock.lock().await;
    let store = scope.store.name();
    let mut cached = attachment.take_cached(store);
    for _ in 0..ATTEMPTS {
        let loaded = super::refresh(
            scope.store,
            &attachment.session_id,
            scope.settings.store_timeout,
            cached.take(),
        )
        .await?;
        let mut loaded = super::claim::ours_or_new(attachment, loaded)?;
        let settings = loaded.doc.settings.updated(update);
        if settings == loaded.doc.settings {
            // Nothing changes: no write (and no session made for nothing).
            if loaded.version > 0 {
                attachment.remember(store, loaded);
            }
            return Ok(settings);
        }
        loaded.doc.settings = settings.clone();
        let saved = scope
            .save(
                loaded.version,
                &loaded.owner,
                &loaded.doc,
                &mut loaded.messages_json,
            )
            .await;
        match saved {
            Ok(SaveOutcome::Saved { version }) => {
                loaded.version = version;
                attachment.remember(store, loaded);
                return Ok(settings);
            }
            Ok(SaveOutcome::Conflict { .. }) => continue,
            Err(err) => {
                // The save may have been applied all the same.
                match scope.load().await {
                    Ok(Some(found))
                        if found.doc.settings == settings
                            && found.doc.turns == loaded.doc.turns
                            && found.doc.messages.len() == loaded.doc.messages.len() =>
                    {
                        attachment.remember(store, found);
                        return Ok(settings);
                    }
                    _ => return Err(err.into()),
                }
            }
        }
    }
    Err(StoreError::Contended(store.to_owned()).into())
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
