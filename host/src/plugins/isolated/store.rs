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
//! backoff as a model's ([`super::model::FIRST_BACKOFF`] doubling to
//! [`super::model::MAX_BACKOFF`]; an answered call resets it).
//!
//! One is built per store per active set; a reload that changes the store
//! (its library, settings or isolation) builds another, and this one's
//! child is stopped once no snapshot holds it (as [`super`]'s "Hot reload"
//! says of models).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::child::{Child, Incoming, Launch};
use super::model::{
    lock, record_exit, Crash, Health, FIRST_BACKOFF, MAX_BACKOFF, START_TIMEOUT, STOP_GRACE,
};
use super::wire::{to_child, to_host, Encoder, Frame};
use crate::core::ports::{SaveOutcome, Stored};

/// A store's child process and its history.
pub struct IsolatedStore(Arc<Inner>);

struct Inner {
    launch: Launch,
    memory_limit_mb: Option<u64>,
    child: Mutex<Option<Arc<Child>>>,
    health: Arc<Mutex<Health>>,
    /// Held by the call that starts a new child; the others wait for it.
    restarting: tokio::sync::Mutex<()>,
}

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
        let inner = Inner {
            launch: Launch {
                store: true,
                ..launch
            },
            memory_limit_mb,
            child: Mutex::new(None),
            health: Arc::new(Mutex::new(Health {
                state: "running",
                backoff: FIRST_BACKOFF,
                ..Health::default()
            })),
            restarting: tokio::sync::Mutex::new(()),
        };
        let child = inner.spawn()?;
        *inner.lock_child() = Some(child);
        Ok(Self(Arc::new(inner)))
    }

    /// The child's state, for the admin API.
    pub fn health(&self) -> StoreHealth {
        let health = lock(&self.0.health).clone();
        StoreHealth {
            state: health.state,
            pid: health.pid,
            restarts: health.restarts,
            crashes: health.crashes,
            last_crash: health.last_crash,
            running_calls: self.0.current().map_or(0, |c| c.running()),
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
        let child = self.running().await?;
        let (call, answered) = child.call().map_err(|why| crashed(&why))?;
        let _open = Open(child.clone(), call);
        let mut enc = Encoder::default();
        enc.begin(kind, call);
        fields(&mut enc);
        enc.finish();
        // A write to a child that does not read blocks: not on the runtime's
        // workers. A child that cannot take it is gone: its crash comes below.
        let sending = child.clone();
        let _ = tokio::task::spawn_blocking(move || sending.send(&enc.buf)).await;
        match answered.await {
            Ok(Incoming::Reply(frame)) if frame.kind == answer => {
                lock(&self.0.health).backoff = FIRST_BACKOFF;
                Ok(frame)
            }
            Ok(Incoming::Reply(frame)) => Err(format!(
                "the store's process answered frame kind {} to a call of kind {kind}",
                frame.kind
            )),
            // The plugin's own error: the child works.
            Ok(Incoming::Done(Err(err))) => {
                lock(&self.0.health).backoff = FIRST_BACKOFF;
                Err(err.message)
            }
            Ok(Incoming::Done(Ok(())) | Incoming::Event(_)) => Err(format!(
                "the store's process answered a call of kind {kind} with a model's frame"
            )),
            Ok(Incoming::Crashed(why)) => Err(crashed(&why)),
            Err(_) => Err(crashed("the plugin's process is gone")),
        }
    }

    /// The running child, started (after its backoff) if it died.
    async fn running(&self) -> Result<Arc<Child>, String> {
        if let Some(child) = self.0.current() {
            return Ok(child);
        }
        let _restarting = self.0.restarting.lock().await;
        if let Some(child) = self.0.current() {
            return Ok(child);
        }
        let wait = lock(&self.0.health).not_before.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        // Started and put in place on a blocking thread: a call that gives
        // up meanwhile leaves no child behind unowned.
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || inner.restart())
            .await
            .unwrap_or_else(|_| Err("the store's process could not be restarted".to_owned()))
    }
}

impl Inner {
    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Arc<Child>>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Option<Arc<Child>> {
        self.lock_child().as_ref().filter(|c| c.alive()).cloned()
    }

    /// Starts a new child in place of the dead one; blocks.
    fn restart(&self) -> Result<Arc<Child>, String> {
        match self.spawn() {
            Ok(child) => {
                lock(&self.health).restarts += 1;
                crate::metrics::metrics().plugin_restart(&self.launch.backend);
                *self.lock_child() = Some(child.clone());
                Ok(child)
            }
            Err(why) => {
                let mut health = lock(&self.health);
                health.state = "failed";
                health.not_before = Some(Instant::now() + health.backoff);
                health.backoff = (health.backoff * 2).min(MAX_BACKOFF);
                tracing::error!(
                    store = %self.launch.backend,
                    "store plugin process could not be restarted: {why}"
                );
                Err(format!(
                    "the store's plugin process could not be restarted: {why}"
                ))
            }
        }
    }

    fn spawn(&self) -> Result<Arc<Child>, String> {
        let health = self.health.clone();
        let store = self.launch.backend.clone();
        let on_exit = Box::new(move |pid: u32, why: Option<String>| {
            let Some((why, backoff)) = record_exit(&health, pid, why) else {
                return;
            };
            crate::metrics::metrics().plugin_crash(&store);
            tracing::error!(
                store = %store,
                pid,
                restart_in_ms = backoff.as_millis() as u64,
                "store plugin process crashed: {why}; its calls in flight failed; \
                 a new one starts with the store's next call"
            );
        });
        let child = Child::spawn(&self.launch, self.memory_limit_mb, START_TIMEOUT, on_exit)?;
        let mut health = lock(&self.health);
        health.state = "running";
        health.pid = Some(child.pid);
        tracing::info!(store = %self.launch.backend, pid = child.pid, "store plugin process started");
        Ok(child)
    }
}

/// The store left the active set and no turn holds it any more: its child
/// is stopped, and killed if it does not exit within [`STOP_GRACE`].
impl Drop for Inner {
    fn drop(&mut self) {
        let Some(child) = self.lock_child().take() else {
            return;
        };
        if child.alive() {
            tracing::info!(
                store = %self.launch.backend,
                pid = child.pid,
                "store plugin process stopped: its store is no longer in use"
            );
        }
        child.retire(STOP_GRACE);
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
