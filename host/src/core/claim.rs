//! Claiming a session for a turn, and keeping the claim while the turn runs.
//!
//! On a store in this process, the session as loaded is the claim: one host,
//! one turn of a session at a time (the session lock), and the answer's save
//! is conditional on the version loaded. On a shared store a turn first
//! saves, conditionally on the version it loaded, the user message and a
//! [`Lease`] naming this host. While the lease holds no other host runs a
//! turn of the session.
//!
//! Time is never compared across hosts. A host that finds another's lease
//! counts [`TurnSettings::lease`](super::TurnSettings) on its own clock from
//! when it first saw that version of the document; the holder renews every
//! `renew` and stops its turn (`lease_lost`) once `lease - renew` has passed
//! since the last renewal it sent that the store took. A lease that runs out
//! is taken over, and the new turn numbers its frames after the old turn's
//! reservation, so a number is never sent twice even if the old host lives.

use std::time::Duration;

use llm_host_plugin_api::Message;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::document::{Lease, Loaded, MessagesJson, SessionDoc};
use super::ports::{Frames, SaveOutcome, SessionStore, StoreError};
use super::sink::{Failure, TurnControl};
use super::Scope;
use crate::protocol::now_ms;

/// A session claimed for one turn: the user message appended, the turn
/// counted, and on a shared store a lease naming this host, at `version`.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The session with the user message.
    pub doc: SessionDoc,
    /// The version the claim holds.
    pub version: u64,
    /// The session's owner.
    pub owner: String,
    /// The JSON text of `doc.messages`.
    pub messages_json: MessagesJson,
    /// The lease's token, on a shared store.
    pub token: Option<String>,
    /// The last sequence number the turn may use (its end frame included).
    pub reserved: u64,
    /// When the save that last renewed the lease was sent.
    pub renewed_at: Instant,
}

impl Claimed {
    /// Whether `doc` still carries this claim's lease.
    pub fn holds(&self, doc: &SessionDoc) -> bool {
        self.token
            .as_ref()
            .is_some_and(|token| doc.lease.as_ref().is_some_and(|l| &l.token == token))
    }
}

/// Why a turn could not claim its session.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The session belongs to another key: answered as if it did not exist.
    #[error("no session `{0}`")]
    NotYours(String),
    /// The prompt would take the session's history past its limit.
    #[error("the history is {bytes} bytes; the limit is {limit}")]
    HistoryFull {
        /// The history's size with the prompt, in bytes of JSON.
        bytes: usize,
        /// `server.max_history_bytes`.
        limit: usize,
    },
    /// The turn was cancelled while another host's turn held the session.
    #[error("cancelled while waiting for the session")]
    Cancelled,
}

/// Claims the session for a turn with the user message `user`. A live lease
/// of another host is waited for (the client is told at once); the wait ends
/// early on cancel.
pub async fn claim<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    user: &Message,
    control: &TurnControl,
) -> Result<Claimed, ClaimError> {
    let attachment = scope.attachment;
    let settings = scope.settings;
    let shared = scope.store.shared();
    let mut cached = attachment.take_cached(scope.store.name());
    let mut wait = Duration::from_millis(10);
    // The version of another host's lease first seen, and when.
    let mut seen: Option<(u64, Instant)> = None;
    let mut told = false;
    loop {
        let loaded = match cached.take() {
            // The claim's save is conditional on its version: a stale copy
            // conflicts, and the next round loads.
            Some(loaded) if shared => Some(loaded),
            // An in-process claim saves nothing that would catch a stale
            // copy: the store must still hold exactly this one.
            Some(loaded) => {
                super::refresh(
                    scope.store,
                    &attachment.session_id,
                    settings.store_timeout,
                    Some(loaded),
                )
                .await?
            }
            None => scope.load().await?,
        };
        let Loaded {
            mut doc,
            version,
            owner,
            mut messages_json,
        } = ours_or_new(attachment, loaded)?;
        let bytes = messages_json.bytes(&doc.messages) + user.content.len();
        if bytes > settings.max_history_bytes {
            return Err(ClaimError::HistoryFull {
                bytes,
                limit: settings.max_history_bytes,
            });
        }
        let foreign = doc
            .lease
            .as_ref()
            .filter(|lease| shared && lease.holder != scope.host);
        if let Some(lease) = foreign {
            let now = Instant::now();
            let first = match seen {
                Some((at_version, at)) if at_version == version => at,
                _ => {
                    seen = Some((version, now));
                    now
                }
            };
            if now.duration_since(first) < settings.lease {
                if !told {
                    told = true;
                    let message = format!(
                        "another host's turn ({}) holds this session; this prompt runs when it \
                         ends, or in at most {} ms if that host stopped renewing its lease",
                        lease.turn,
                        settings.lease.as_millis()
                    );
                    scope
                        .diagnostic("warn", "host", "session_busy", &message)
                        .await;
                }
                if control.is_cancelled() {
                    return Err(ClaimError::Cancelled);
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = control.stopped.notified() => return Err(ClaimError::Cancelled),
                }
                wait = (wait * 2).min(Duration::from_millis(200));
                continue;
            }
            tracing::warn!(
                session = %attachment.session_id,
                holder = %lease.holder,
                turn = %lease.turn,
                "taking over a lease that was not renewed"
            );
        }
        // Never reuse a number: not one this client was sent (even if a save
        // was lost), nor one a turn that held a lease may have used.
        let reserved_before = doc.lease.as_ref().map_or(0, |lease| lease.reserved);
        doc.last_sequence = doc
            .last_sequence
            .max(reserved_before)
            .max(attachment.sequence());
        doc.turns = doc
            .turns
            .max(attachment.turns.load(std::sync::atomic::Ordering::Relaxed))
            + 1;
        doc.messages.push(user.clone());
        messages_json.push(user);
        let reserved = doc.last_sequence.saturating_add(settings.max_turn_events);
        let sent = Instant::now();
        if !shared {
            doc.lease = None;
            return Ok(Claimed {
                doc,
                version,
                owner,
                messages_json,
                token: None,
                reserved,
                renewed_at: sent,
            });
        }
        let token = uuid::Uuid::new_v4().to_string();
        doc.lease = Some(Lease {
            holder: scope.host.to_owned(),
            turn: format!("turn-{}", doc.turns),
            expires_ms: now_ms() + settings.lease.as_millis() as u64,
            token: token.clone(),
            reserved,
        });
        let mut claimed = Claimed {
            doc,
            version,
            owner,
            messages_json,
            token: Some(token),
            reserved,
            renewed_at: sent,
        };
        let saved = scope
            .save(
                version,
                &claimed.owner,
                &claimed.doc,
                &mut claimed.messages_json,
            )
            .await;
        match saved {
            Ok(SaveOutcome::Saved { version }) => {
                claimed.version = version;
                return Ok(claimed);
            }
            Ok(SaveOutcome::Conflict { .. }) => continue,
            Err(err) => {
                // The save may have been applied all the same: then the claim
                // is ours, and running the prompt again would store it twice.
                match scope.load().await {
                    Ok(Some(found)) if claimed.holds(&found.doc) => {
                        claimed.version = found.version;
                        return Ok(claimed);
                    }
                    _ => return Err(err.into()),
                }
            }
        }
    }
}

/// Renews the claim's lease every `renew` until `done` fires, and answers
/// the claim at its latest version. When the lease cannot be kept (another
/// host took the session, it was deleted, or no renewal was taken for
/// `lease - renew`) the turn is stopped through `control`.
pub async fn keep<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    mut claimed: Claimed,
    control: &TurnControl,
    mut done: oneshot::Receiver<()>,
) -> Claimed {
    let settings = scope.settings;
    let id = &scope.attachment.session_id;
    let margin = settings.lease.saturating_sub(settings.renew);
    // After a round that failed, the next waits a little: a store that
    // refuses at once is not asked in a tight loop.
    let mut retry_at: Option<Instant> = None;
    loop {
        let next =
            (claimed.renewed_at + settings.renew).max(retry_at.unwrap_or(claimed.renewed_at));
        tokio::select! {
            _ = &mut done => return claimed,
            () = tokio::time::sleep_until(next) => {}
        }
        retry_at = Some(Instant::now() + settings.renew / 8);
        let valid_until = claimed.renewed_at + margin;
        let sent = Instant::now();
        if let Some(lease) = claimed.doc.lease.as_mut() {
            lease.expires_ms = now_ms() + settings.lease.as_millis() as u64;
        }
        // The frames sent so far, for clients following the turn from
        // other hosts (see [`super::replay`]).
        if let Some(sent) = control.frames(|log| log.stored(None, settings.replay_frames)) {
            claimed.doc.replay = Some(sent);
        }
        let mut messages_json = std::mem::take(&mut claimed.messages_json);
        let outcome = tokio::select! {
            _ = &mut done => Round::Done,
            () = tokio::time::sleep_until(valid_until) => Round::Late,
            saved = scope.save(claimed.version, &claimed.owner, &claimed.doc, &mut messages_json) => Round::Answered(saved),
        };
        claimed.messages_json = messages_json;
        match outcome {
            Round::Done => return claimed,
            Round::Late => {}
            Round::Answered(Ok(SaveOutcome::Saved { version })) => {
                claimed.version = version;
                claimed.renewed_at = sent;
                continue;
            }
            Round::Answered(Ok(SaveOutcome::Conflict { current })) => match scope.load().await {
                // A renewal that failed was applied, or the session's
                // settings were updated (`session.update` keeps the lease):
                // go on from it, with its settings.
                Ok(Some(found)) if claimed.holds(&found.doc) => {
                    claimed.version = found.version;
                    claimed.doc.settings = found.doc.settings;
                    continue;
                }
                Ok(None) => {
                    tracing::warn!(session = %id, "the session was deleted during its turn");
                    control.fail(Failure {
                        code: "session_deleted",
                        message: "the session was deleted while this turn ran; the turn was \
                                  stopped and its answer is not saved"
                            .to_owned(),
                    });
                    return claimed;
                }
                Ok(Some(_)) => {
                    tracing::warn!(session = %id, version = claimed.version, current, "turn lease lost");
                    lose(control, "another host took the session");
                    return claimed;
                }
                Err(err) => {
                    tracing::warn!(session = %id, error = %err, "cannot check the turn lease")
                }
            },
            Round::Answered(Err(err)) => {
                tracing::warn!(session = %id, error = %err, "cannot renew the turn lease")
            }
        }
        if Instant::now() >= valid_until {
            tracing::warn!(session = %id, "turn lease not renewed in time; stopping the turn");
            lose(
                control,
                "the store took no renewal of this turn's lease in time",
            );
            return claimed;
        }
    }
}

/// How a renewal round ended.
enum Round {
    /// The turn is over.
    Done,
    /// The lease ran out before the store answered.
    Late,
    /// The store answered.
    Answered(Result<SaveOutcome, StoreError>),
}

/// The session `loaded` as the attachment's party may use it, or, when the
/// store has none, a new one owned by the party; another key's session is
/// [`ClaimError::NotYours`].
pub(super) fn ours_or_new(
    attachment: &super::Attachment,
    loaded: Option<Loaded>,
) -> Result<Loaded, ClaimError> {
    match loaded {
        Some(found) if !attachment.party.may_use(&found.owner) => {
            Err(ClaimError::NotYours(attachment.session_id.clone()))
        }
        Some(found) => Ok(found),
        None => Ok(Loaded {
            owner: attachment.party.owner.clone(),
            messages_json: MessagesJson::new(&[]).unwrap_or_default(),
            ..Loaded::default()
        }),
    }
}

fn lose(control: &TurnControl, why: &str) {
    control.fail(Failure {
        code: "lease_lost",
        message: format!(
            "{why}; the turn was stopped so that no other host streams on the session at \
             the same time"
        ),
    });
}
