//! A store whose plugin runs in a child process: the calls of the turn
//! core's [`SessionStore`](crate::core::ports::SessionStore) port (and the
//! admin API's `list`, the readiness `ping`) over [`Child`], with restarts.
//!
//! Each call opens an id on the current child, sends its frame (`LOAD`,
//! `SAVE`, `DELETE`, `LIST`, `PING`) and waits, without holding a thread,
//! for the answer under that id; calls of many turns are in flight at once
//! and the child runs each on a thread of its own. A call the host gives up
//! on (the store timeout, `server.store_timeout_ms`, which the callers apply
//! as for any store) forgets its id; a late answer is dropped. When the
//! child dies, every call in flight fails with a store error naming the
//! crash (the signal), and the next call starts a new child after the same
//! backoff as a model's ([`Supervisor`]; an answered call resets it).
//!
//! One is built per store per active set; a reload that changes the store
//! (its library, settings or isolation) builds another, and this one's
//! child is stopped once no snapshot holds it (as [`super`]'s "Hot reload"
//! says of models).

use std::sync::Arc;

use serde::Serialize;

use super::child::{Child, Incoming, Launch};
use super::supervisor::{Crash, Role, Supervisor};
use super::wire::{to_child, to_host, Encoder, Frame};
use crate::core::ports::{SaveOutcome, Stored};

/// A store's child process and its history.
pub struct IsolatedStore(Arc<Supervisor>);

/// What `GET /v1/plugins` shows of a store's child (`isolatedStores`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreHealth {
    /// `running`, `crashed` (a new child starts with the next call) or
    /// `failed` (the last start failed).
    pub state: &'static str,
    /// The running child's process id.
    pub pid: Option<u32>,
    /// Children started after the first.
    pub restarts: u64,
    /// Children that died.
    pub crashes: u64,
    /// The last crash: when (Unix ms) and what happened.
    pub last_crash: Option<Crash>,
    /// Calls waiting for the child's answer now.
    pub running_calls: usize,
}

impl IsolatedStore {
    /// Starts the store's first child; fails if it cannot load the plugin or
    /// the plugin refuses the settings. Blocks.
    pub fn start(launch: Launch, memory_limit_mb: Option<u64>) -> Result<Self, String> {
        Supervisor::start(launch, memory_limit_mb, Role::Store).map(Self)
    }

    /// The child's state, for the admin API.
    pub fn health(&self) -> StoreHealth {
        let health = self.0.health();
        StoreHealth {
            state: health.state,
            pid: health.pid,
            restarts: health.restarts,
            crashes: health.crashes,
            last_crash: health.last_crash,
            running_calls: health.running_turns,
        }
    }

    /// `load`: the session, or none.
    pub async fn load(&self, id: &str) -> Result<Option<Stored>, String> {
        let mut frame = self
            .request(to_child::LOAD, to_host::LOADED, |e| {
                e.str(id);
            })
            .await?;
        let read = (|| {
            if frame.u8()? == 0 {
                return Ok(None);
            }
            Ok::<_, std::io::Error>(Some(Stored {
                version: frame.u64()?,
                owner: frame.str()?,
                data: frame.str()?,
            }))
        })();
        read.map_err(bad_answer)
    }

    /// `save`: writes if the store holds `expected`.
    pub async fn save(
        &self,
        id: &str,
        expected: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, String> {
        let mut frame = self
            .request(to_child::SAVE, to_host::SAVED, |e| {
                e.str(id).u64(expected).str(owner).str(data);
            })
            .await?;
        let read = (|| {
            let conflict = frame.u8()? != 0;
            let version = frame.u64()?;
            Ok::<_, std::io::Error>(if conflict {
                SaveOutcome::Conflict { current: version }
            } else {
                SaveOutcome::Saved { version }
            })
        })();
        read.map_err(bad_answer)
    }

    /// `delete`: whether the session existed.
    pub async fn delete(&self, id: &str) -> Result<bool, String> {
        let mut frame = self
            .request(to_child::DELETE, to_host::DELETED, |e| {
                e.str(id);
            })
            .await?;
        frame.u8().map(|existed| existed != 0).map_err(bad_answer)
    }

    /// `list`: one page of ids, and where the next starts.
    pub async fn list(
        &self,
        owner: &str,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<String>, Option<String>), String> {
        let mut frame = self
            .request(to_child::LIST, to_host::LISTED, |e| {
                e.str(owner).str(after).u64(u64::from(limit));
            })
            .await?;
        let read = (|| {
            let count = frame.u64()?;
            // Each id takes 4 bytes at least: a bad count fails below.
            let mut ids = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                ids.push(frame.str()?);
            }
            let next = match frame.u8()? {
                0 => None,
                _ => Some(frame.str()?),
            };
            Ok::<_, std::io::Error>((ids, next))
        })();
        read.map_err(bad_answer)
    }

    /// `ping`: whether the store answers.
    pub async fn ping(&self) -> Result<(), String> {
        self.request(to_child::PING, to_host::PONG, |_| {})
            .await
            .map(|_| ())
    }

    /// Sends one call of `kind` (its fields written by `fields`) and waits
    /// for its answer, of kind `answer`.
    async fn request(
        &self,
        kind: u8,
        answer: u8,
        fields: impl FnOnce(&mut Encoder),
    ) -> Result<Frame, String> {
        let child = self.0.running().await?;
        let (call, answered) = child.call().map_err(|why| crashed(&why))?;
        let _open = Open(child.clone(), call);
        let mut enc = Encoder::default();
        enc.begin(kind, call);
        fields(&mut enc);
        enc.finish();
        // A child that cannot take it is gone: its crash comes below.
        child.send(&enc.buf);
        match answered.await {
            Ok(Incoming::Reply(frame)) if frame.kind == answer => {
                self.0.answered();
                Ok(frame)
            }
            Ok(Incoming::Reply(frame)) => Err(format!(
                "the store's process answered frame kind {} to a call of kind {kind}",
                frame.kind
            )),
            // The plugin's own error: the child works.
            Ok(Incoming::Done(Err(err))) => {
                self.0.answered();
                Err(err.message)
            }
            Ok(Incoming::Done(Ok(())) | Incoming::Event(_)) => Err(format!(
                "the store's process answered a call of kind {kind} with a model's frame"
            )),
            Ok(Incoming::Crashed(why)) => Err(crashed(&why)),
            Err(_) => Err(crashed("the plugin's process is gone")),
        }
    }
}

/// Forgets the call on the child when it ends, answered or given up.
struct Open(Arc<Child>, u64);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}

fn crashed(why: &str) -> String {
    format!("{why}; a new one starts with the store's next call")
}

fn bad_answer(err: std::io::Error) -> String {
    format!("the store's process sent a bad answer ({err})")
}
