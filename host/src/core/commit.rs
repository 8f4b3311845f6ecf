//! Saving a finished turn: the answer appended, the end sequence recorded,
//! the lease released, conditionally on the version the claim holds.
//!
//! The version is the fencing token: a save from a host whose lease another
//! host took is refused. When the store holds something else, what it holds
//! decides: the claim's own lease (a renewal that failed but was applied) is
//! saved over; a session that is gone was deleted (or expired) during the
//! turn and is not recreated; anything else means another host took the
//! session, and the answer is not saved.

use llm_host_plugin_api::Message;

use super::claim::Claimed;
use super::document::Loaded;
use super::ports::{Frames, SaveOutcome, SessionStore, StoreError};
use super::replay::StoredFrames;
use super::Scope;

/// Why a finished turn was not saved.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The store failed (the turn's sequence numbers stay reserved).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The session was deleted, or expired, while the turn ran.
    #[error("the session was deleted while this turn ran; its answer was not saved")]
    Deleted,
    /// Another host took the session after this turn's lease ran out.
    #[error(
        "another host took the session after this turn's lease ran out; its answer was not saved"
    )]
    Fenced,
}

impl CommitError {
    /// The code the client is told.
    pub fn code(&self) -> &'static str {
        match self {
            CommitError::Store(_) => "store_unavailable",
            CommitError::Deleted => "session_deleted",
            CommitError::Fenced => "lease_lost",
        }
    }
}

/// Saves the finished turn, whose frames (its end frame included) are
/// numbered through `end_sequence`, with `answers` appended (the model's
/// answer; with tool round trips, each group's answer and the tool results
/// between them) and `replay` (its frames, see [`super::replay`]) kept;
/// answers the session as saved.
pub async fn commit<S: SessionStore, F: Frames>(
    scope: &Scope<'_, S, F>,
    claimed: Claimed,
    answers: Vec<Message>,
    end_sequence: u64,
    replay: Option<StoredFrames>,
) -> Result<Loaded, CommitError> {
    let turns = claimed.doc.turns;
    let mut current = claimed;
    for _ in 0..8 {
        let Claimed {
            doc,
            version,
            messages_json,
            ..
        } = &mut current;
        for answer in &answers {
            doc.messages.push(answer.clone());
            messages_json.push(answer);
        }
        doc.last_sequence = doc.last_sequence.max(end_sequence);
        doc.turns = doc.turns.max(turns);
        doc.lease = None;
        doc.replay.clone_from(&replay);
        let saved = scope
            .save(
                *version,
                &current.owner,
                &current.doc,
                &mut current.messages_json,
            )
            .await;
        match saved {
            Ok(SaveOutcome::Saved { version }) => {
                return Ok(Loaded {
                    doc: current.doc,
                    version,
                    owner: current.owner,
                    messages_json: current.messages_json,
                })
            }
            Ok(SaveOutcome::Conflict { current: found }) => {
                tracing::warn!(
                    session = %scope.attachment.session_id,
                    version = current.version,
                    found,
                    "turn save conflict"
                );
                match scope.load().await? {
                    None => return Err(CommitError::Deleted),
                    Some(stored) if current.holds(&stored.doc) => {
                        // Our lease, renewed by a save that was reported
                        // failed, or with settings updated since: save over
                        // it (with a summary this turn made).
                        let summary = current.doc.summary.take();
                        current.version = stored.version;
                        current.doc = stored.doc;
                        current.messages_json = stored.messages_json;
                        if summary.is_some() {
                            current.doc.summary = summary;
                        }
                    }
                    Some(_) => return Err(CommitError::Fenced),
                }
            }
            Err(err) => {
                // The save may have been applied all the same.
                match scope.load().await {
                    Ok(Some(stored)) if is_this_commit(&stored, &current, end_sequence) => {
                        return Ok(stored)
                    }
                    _ => return Err(err.into()),
                }
            }
        }
    }
    Err(StoreError::Contended(scope.store.name().to_owned()).into())
}

/// Whether `stored` is the save of `ours` (a version past the claim's, no
/// lease, this turn counted, this end sequence, as many messages).
fn is_this_commit(stored: &Loaded, ours: &Claimed, end_sequence: u64) -> bool {
    stored.version > ours.version
        && stored.doc.lease.is_none()
        && stored.doc.turns == ours.doc.turns
        && stored.doc.last_sequence == end_sequence
        && stored.doc.messages.len() == ours.doc.messages.len()
}
