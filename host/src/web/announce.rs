//! The session announcement at connect: the session loaded (after a turn
//! of it still finishing), checked against the caller, and announced with
//! the backend it goes on with; or the refusal that closes the socket.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::connection::{close, Connection};
use crate::core;
use crate::core::document::Loaded;
use crate::core::ports::StoreError;
use crate::plugins::runtime::Active;
use crate::protocol::{DiagnosticEntry, Meta, SessionEvent, SOURCE_HOST};

/// How long a new connection waits for a turn of its session that is still
/// finishing before it announces the session as stored (without a
/// reconnect grace: with one, the turn runs on and the socket follows it).
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Loads the session (after any turn of it still finishing) and announces
/// it; answers false when the connection was refused and closed instead.
pub(super) async fn announce(
    conn: &Connection,
    active: &Active,
    session_id: String,
    found: Option<Option<Loaded>>,
    model: Option<&str>,
) -> bool {
    let framer = conn.framer;
    let Some(store) = active.store().cloned() else {
        close(conn, CloseCode::Error, "no store is configured").await;
        return false;
    };
    let settings = active.config.server.turn_settings();
    // A turn of this session may be running. With a reconnect grace it runs
    // on, and the socket follows it once announced (see `hub`): announce
    // the session as stored now. Without one, a turn whose socket just
    // dropped is finishing: announce what it saved. When none runs, what
    // the upgrade loaded is current.
    let lock = conn.host.locks.get(&session_id);
    let loaded = match (found, lock.try_lock()) {
        (Some(found), Ok(_free)) => Ok(found),
        (_, busy) if active.config.server.reconnect_grace_secs > 0 => {
            drop(busy);
            core::load(&store, &session_id, settings.store_timeout).await
        }
        (_, busy) => {
            drop(busy);
            let finishing = tokio::time::timeout(CONNECT_WAIT, lock.lock()).await;
            let loaded = core::load(&store, &session_id, settings.store_timeout).await;
            drop(finishing);
            loaded
        }
    };
    let refused = match &loaded {
        Ok(Some(found)) if !conn.attachment.party.may_use(&found.owner) => Some((
            "session_not_found",
            format!("no session `{}`", session_id),
            CloseCode::Policy,
            "no such session",
        )),
        Ok(_) => None,
        Err(err @ StoreError::Unreadable { .. }) => {
            tracing::error!(session = %session_id, error = %err, "unreadable session");
            Some((
                "session_unreadable",
                "the stored session is not readable; it can be deleted \
                 (DELETE /v1/sessions/{id})"
                    .to_owned(),
                CloseCode::Error,
                "session unreadable",
            ))
        }
        Err(err) => {
            tracing::error!(session = %session_id, error = %err, "cannot load session");
            Some((
                "store_unavailable",
                format!("the session could not be loaded: {}", err.public()),
                CloseCode::Again,
                "store unavailable, try again later",
            ))
        }
    };
    if let Some((code, message, close_code, reason)) = refused {
        let kind = if code == "session_not_found" {
            "host"
        } else {
            "store"
        };
        conn.send_entry(&DiagnosticEntry {
            level: "error",
            kind,
            message: &message,
            data: Some(serde_json::json!({ "code": code })),
        })
        .await;
        close(conn, close_code, reason).await;
        conn.out.finish().await;
        return false;
    }
    let loaded = loaded.ok().flatten();
    let resumed = loaded.is_some();
    let last_sequence = loaded.as_ref().map_or(0, |found| found.doc.last_sequence);
    // A session resumed without `?model=` goes on with the backend its last
    // turn ran on, while that backend is configured.
    let mut gone = None;
    let settings = loaded
        .as_ref()
        .map(|found| found.doc.settings.clone())
        .filter(|settings| !settings.is_empty());
    // The backend the session's settings name wins over both (as it does
    // at each turn), while it is configured.
    let set_model = match settings.as_ref().and_then(|s| s.model.clone()) {
        Some(name) if active.models.contains_key(&name) => Some(name),
        Some(name) => {
            gone = Some(name);
            None
        }
        None => None,
    };
    let stored_model = match loaded.as_ref().and_then(|found| found.doc.model.clone()) {
        Some(name) if model.is_none() && active.models.contains_key(&name) => {
            *conn.model.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.clone());
            Some(name)
        }
        Some(name) if model.is_none() && name != active.config.default_model => {
            gone.get_or_insert(name);
            None
        }
        _ => None,
    };
    if let Some(found) = loaded {
        conn.attachment.remember(&store.name, found);
    }
    conn.attachment
        .last_sequence
        .store(last_sequence, Ordering::Relaxed);
    let model = set_model
        .or(model.map(str::to_owned))
        .or(stored_model)
        .unwrap_or_else(|| active.config.default_model.clone());
    tracing::debug!(session = %session_id, resumed, model = %model, "connected");
    conn.send(framer.session(
        &SessionEvent::Open {
            session_id: &session_id,
            resumed,
            model: &model,
            last_sequence,
            settings: settings.as_ref(),
        },
        &Meta::now(last_sequence, SOURCE_HOST, None),
    ))
    .await;
    if let Some(gone) = gone {
        let default = if model == active.config.default_model {
            ", the default"
        } else {
            ""
        };
        let message = format!(
            "this session's backend `{gone}` is no longer configured; it goes on with \
             `{model}`{default}"
        );
        conn.send_entry(&DiagnosticEntry {
            level: "warn",
            kind: "host",
            message: &message,
            data: Some(serde_json::json!({ "code": "model_unavailable", "model": gone })),
        })
        .await;
    }
    true
}
