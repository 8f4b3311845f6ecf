//! `sqlite`: sessions in a SQLite database file.
//!
//! One file holds every session; it survives restarts of the host, and
//! several hosts on one machine may share it (SQLite's locking serialises
//! their writes; the file must be on a local disk, not a network share).
//! The database is in WAL mode, so loads and listings do not wait for saves.
//!
//! The schema is created on first use and versioned in a `schema_version`
//! table, one row per applied migration; a file written by a newer plugin is
//! refused rather than misread. Saves are compare-and-set inside one
//! `BEGIN IMMEDIATE` transaction. With `ttl_secs`, a session not loaded or
//! saved for that long is absent for every call; such rows are deleted when a
//! call meets them, and by a small sweep riding on a save, at most once per
//! `ttl_secs` (at least a minute apart, at most an hour).
//!
//! Several processes may open one new file at once: the setup of a
//! connection and the schema migration wait for each other (see `setup`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_host_plugin_api::{
    self as api, abi_stable::std_types::ROption, ErrorKind, Kinds, Plugin, PluginError,
    SaveOutcome, SessionPage, Store, StoreAdapterBox, StoredSession,
};
use rusqlite::{params, ErrorCode, OptionalExtension, TransactionBehavior};
use serde::Deserialize;

mod pool;
mod setup;

use pool::Pool;

/// The most ids one listing answers, whatever `limit` asks.
pub const MAX_PAGE: u32 = 1000;

/// The longest `ttl_secs` taken: 100 years.
pub const MAX_TTL_SECS: u64 = 100 * 365 * 24 * 3600;

/// The schema version this plugin writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Migrations, in order: entry `n` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // v1: sessions, with the owner index listings use. `touched_at_ms` is
    // the last load or save, for `ttl_secs`.
    "CREATE TABLE sessions (
         id            TEXT    NOT NULL PRIMARY KEY,
         version       INTEGER NOT NULL,
         owner         TEXT    NOT NULL,
         data          TEXT    NOT NULL,
         updated_at_ms INTEGER NOT NULL,
         touched_at_ms INTEGER NOT NULL
     );
     CREATE INDEX sessions_owner_id ON sessions (owner, id);",
];

/// How many expired rows one sweep deletes at most.
const SWEEP_BATCH: i64 = 500;

/// The SQLite store's settings.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct SqliteSettings {
    /// The database file; relative paths are taken from the directory of the
    /// host's config file. Created if missing (its directory must exist).
    pub path: String,
    /// Expire sessions not saved or loaded for this many seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// How long a call waits for another connection's write to finish (and
    /// for a free connection of the pool), in milliseconds.
    #[serde(default = "default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    /// Connections kept open at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
}

fn default_busy_timeout_ms() -> u64 {
    5000
}

fn default_pool_size() -> u32 {
    4
}

impl SqliteSettings {
    /// Settings with defaults for everything but the path.
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            ttl_secs: None,
            busy_timeout_ms: default_busy_timeout_ms(),
            pool_size: default_pool_size(),
        }
    }
}

/// The SQLite store.
pub struct SqliteStore {
    pool: Pool,
    path: PathBuf,
    ttl_ms: Option<i64>,
    /// When the next sweep of expired rows may run, Unix ms.
    next_sweep_ms: AtomicI64,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// An error of `what` on the file at `path`, of the kind the SQLite error
/// calls for.
fn sql_error(path: &Path, what: &str, err: rusqlite::Error) -> PluginError {
    use rusqlite::Error as E;
    let (kind, hint) = match &err {
        E::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => (
                ErrorKind::UNAVAILABLE,
                " (another connection held the lock longer than busy_timeout_ms)",
            ),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                (ErrorKind::CORRUPT, " (is it a SQLite database?)")
            }
            ErrorCode::CannotOpen => (
                ErrorKind::UNAVAILABLE,
                " (does its directory exist, and may the host write there?)",
            ),
            ErrorCode::PermissionDenied | ErrorCode::ReadOnly => (
                ErrorKind::UNAVAILABLE,
                " (may the host write the file and its directory?)",
            ),
            ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::NoLargeFileSupport
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::OutOfMemory => (ErrorKind::UNAVAILABLE, ""),
            ErrorCode::TooBig => (ErrorKind::INVALID_INPUT, ""),
            _ => (ErrorKind::INTERNAL, ""),
        },
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::InvalidColumnType(..)
        | E::Utf8Error(..) => (ErrorKind::CORRUPT, " (a row is not what this plugin wrote)"),
        _ => (ErrorKind::INTERNAL, ""),
    };
    PluginError::new(
        kind,
        format!("sqlite {}: {what} failed: {err}{hint}", path.display()),
    )
}

/// A stored number that must fit a `u64`.
fn unsigned(path: &Path, id: &str, column: &str, value: i64) -> Result<u64, PluginError> {
    u64::try_from(value).map_err(|_| {
        PluginError::new(
            ErrorKind::CORRUPT,
            format!(
                "sqlite {}: session `{id}` has {column} {value}",
                path.display()
            ),
        )
    })
}

impl SqliteStore {
    /// Opens (or creates) the database at `settings.path` and brings its
    /// schema up to date.
    pub fn open(settings: SqliteSettings) -> Result<Self, PluginError> {
        let path = settings.path.trim();
        if path.is_empty() {
            return Err(PluginError::invalid_settings(
                "path: must name a database file",
            ));
        }
        if path == ":memory:" || path.starts_with("file:") {
            return Err(PluginError::invalid_settings(format!(
                "path: `{path}` is not a file path (an in-memory database would not be \
                 shared between connections: use the memory plugin)"
            )));
        }
        if settings.pool_size == 0 || settings.pool_size > 64 {
            return Err(PluginError::invalid_settings(format!(
                "pool_size: must be between 1 and 64, got {}",
                settings.pool_size
            )));
        }
        if settings.busy_timeout_ms > i32::MAX as u64 {
            return Err(PluginError::invalid_settings(format!(
                "busy_timeout_ms: {} is too large",
                settings.busy_timeout_ms
            )));
        }
        let ttl_ms =
            match settings.ttl_secs {
                None => None,
                Some(0) => return Err(PluginError::invalid_settings(
                    "ttl_secs: must be at least 1 (leave it out to keep sessions until deleted)",
                )),
                Some(secs) if secs > MAX_TTL_SECS => {
                    return Err(PluginError::invalid_settings(format!(
                        "ttl_secs: {secs} is more than {MAX_TTL_SECS} (100 years)"
                    )))
                }
                Some(secs) => Some(secs as i64 * 1000),
            };
        let path = api::host::resolve_path(path);
        let busy_timeout = Duration::from_millis(settings.busy_timeout_ms);
        let target = format!("sqlite {}", path.display());
        let opener_path = Arc::new(path.clone());
        let pool = Pool::new(
            move || setup::open(&opener_path, busy_timeout),
            target,
            settings.pool_size as usize,
            busy_timeout,
        );
        let found = pool.run(|conn| setup::migrate(&path, conn, busy_timeout))?;
        if found < SCHEMA_VERSION {
            api::info!(
                "sqlite {}: schema brought from version {found} to {SCHEMA_VERSION}",
                path.display()
            );
        }
        Ok(Self {
            pool,
            path,
            ttl_ms,
            next_sweep_ms: AtomicI64::new(0),
        })
    }

    fn failed<'a>(&'a self, what: &'a str) -> impl Fn(rusqlite::Error) -> PluginError + 'a {
        move |err| sql_error(&self.path, what, err)
    }

    /// Rows touched at or before this are expired (`i64::MIN`: none are).
    fn cutoff(&self, now: i64) -> i64 {
        self.ttl_ms.map_or(i64::MIN, |ttl| now.saturating_sub(ttl))
    }

    /// Deletes a batch of expired rows if it is time to; never fails the
    /// call it rides on.
    fn sweep(&self, now: i64) {
        let Some(ttl) = self.ttl_ms else {
            return;
        };
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        let interval = ttl.clamp(60_000, 3_600_000);
        if now < due
            || self
                .next_sweep_ms
                .compare_exchange(due, now + interval, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let cutoff = self.cutoff(now);
        let swept = self.pool.run(|conn| {
            conn.prepare_cached(
                "DELETE FROM sessions WHERE rowid IN
                     (SELECT rowid FROM sessions WHERE touched_at_ms <= ?1 LIMIT ?2)",
            )
            .and_then(|mut stmt| stmt.execute(params![cutoff, SWEEP_BATCH]))
            .map_err(self.failed("deleting expired sessions"))
        });
        match swept {
            // A full batch: more may be waiting, sweep again on the next call.
            Ok(n) if n as i64 >= SWEEP_BATCH => self.next_sweep_ms.store(now, Ordering::Relaxed),
            Ok(_) => {}
            Err(err) => api::warn!("{err}"),
        }
    }
}

impl Store for SqliteStore {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        let now = now_ms();
        let cutoff = self.cutoff(now);
        let row = self.pool.run(|conn| {
            let row = if self.ttl_ms.is_some() {
                // Loading counts as use: it renews the session's time to live.
                conn.prepare_cached(
                    "UPDATE sessions SET touched_at_ms = ?2
                     WHERE id = ?1 AND touched_at_ms > ?3
                     RETURNING version, owner, data, updated_at_ms",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![id, now, cutoff], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })
                    .optional()
                })
            } else {
                conn.prepare_cached(
                    "SELECT version, owner, data, updated_at_ms FROM sessions WHERE id = ?1",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![id], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })
                    .optional()
                })
            }
            .map_err(self.failed(&format!("loading `{id}`")))?;
            if row.is_none() && self.ttl_ms.is_some() {
                // Expired, or never there: purge the former.
                conn.prepare_cached("DELETE FROM sessions WHERE id = ?1 AND touched_at_ms <= ?2")
                    .and_then(|mut stmt| stmt.execute(params![id, cutoff]))
                    .map_err(self.failed(&format!("deleting expired `{id}`")))?;
            }
            Ok::<Option<(i64, String, String, i64)>, PluginError>(row)
        })?;
        row.map(|(version, owner, data, updated_at_ms)| {
            Ok(StoredSession {
                version: unsigned(&self.path, id, "version", version)?,
                owner: owner.into(),
                data: data.into(),
                updated_at_ms: unsigned(&self.path, id, "updated_at_ms", updated_at_ms)?,
            })
        })
        .transpose()
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        let now = now_ms();
        let cutoff = self.cutoff(now);
        let outcome = self.pool.run(|conn| {
            let what = format!("saving `{id}`");
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.failed(&what))?;
            let written = match i64::try_from(expected_version) {
                Ok(0) => tx
                    .prepare_cached(
                        // Creates, or replaces an expired row.
                        "INSERT INTO sessions
                             (id, version, owner, data, updated_at_ms, touched_at_ms)
                         VALUES (?1, 1, ?2, ?3, ?4, ?4)
                         ON CONFLICT (id) DO UPDATE SET
                             version = 1, owner = excluded.owner, data = excluded.data,
                             updated_at_ms = excluded.updated_at_ms,
                             touched_at_ms = excluded.touched_at_ms
                         WHERE sessions.touched_at_ms <= ?5",
                    )
                    .and_then(|mut stmt| stmt.execute(params![id, owner, data, now, cutoff])),
                Ok(expected) if expected < i64::MAX => tx
                    .prepare_cached(
                        "UPDATE sessions
                         SET version = ?2 + 1, owner = ?3, data = ?4,
                             updated_at_ms = ?5, touched_at_ms = ?5
                         WHERE id = ?1 AND version = ?2 AND touched_at_ms > ?6",
                    )
                    .and_then(|mut stmt| {
                        stmt.execute(params![id, expected, owner, data, now, cutoff])
                    }),
                // No stored version can be this large (or grow past it).
                _ => Ok(0),
            }
            .map_err(self.failed(&what))?;
            if written == 1 {
                tx.commit().map_err(self.failed(&what))?;
                return Ok(SaveOutcome::Saved {
                    version: expected_version + 1,
                });
            }
            let current: Option<(i64, bool)> = tx
                .prepare_cached("SELECT version, touched_at_ms > ?2 FROM sessions WHERE id = ?1")
                .and_then(|mut stmt| {
                    stmt.query_row(params![id, cutoff], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()
                })
                .map_err(self.failed(&what))?;
            let current = match current {
                Some((version, true)) => unsigned(&self.path, id, "version", version)?,
                _ => 0,
            };
            // Nothing was written: dropping `tx` rolls back.
            Ok(SaveOutcome::Conflict { current })
        })?;
        self.sweep(now);
        Ok(outcome)
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        let cutoff = self.cutoff(now_ms());
        self.pool.run(|conn| {
            conn.prepare_cached("DELETE FROM sessions WHERE id = ?1 RETURNING touched_at_ms > ?2")
                .and_then(|mut stmt| {
                    stmt.query_row(params![id, cutoff], |row| row.get::<_, bool>(0))
                        .optional()
                })
                .map(|live| live == Some(true))
                .map_err(self.failed(&format!("deleting `{id}`")))
        })
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let cutoff = self.cutoff(now_ms());
        let mut ids = self.pool.run(|conn| {
            let what = format!("listing the sessions of owner `{owner}`");
            let mut stmt = if owner.is_empty() {
                conn.prepare_cached(
                    "SELECT id FROM sessions
                     WHERE ?1 = '' AND id > ?2 AND touched_at_ms > ?3
                     ORDER BY id LIMIT ?4",
                )
            } else {
                conn.prepare_cached(
                    "SELECT id FROM sessions
                     WHERE owner = ?1 AND id > ?2 AND touched_at_ms > ?3
                     ORDER BY id LIMIT ?4",
                )
            }
            .map_err(self.failed(&what))?;
            let rows = stmt
                .query_map(params![owner, after, cutoff, limit + 1], |row| {
                    row.get::<_, String>(0)
                })
                .map_err(self.failed(&what))?;
            rows.collect::<Result<Vec<String>, _>>()
                .map_err(self.failed(&what))
        })?;
        let next = if ids.len() > limit as usize {
            ids.truncate(limit as usize);
            ids.last().cloned()
        } else {
            None
        };
        Ok(SessionPage {
            ids: ids.into_iter().map(Into::into).collect(),
            next: ROption::from(next.map(Into::into)),
        })
    }

    fn ping(&self) -> Result<(), PluginError> {
        self.pool.run(|conn| {
            conn.prepare_cached("SELECT MAX(version) FROM schema_version")
                .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, i64>(0)))
                .map(drop)
                .map_err(self.failed("reading schema_version"))
        })
    }
}

/// The plugin.
pub struct SqlitePlugin;

impl Plugin for SqlitePlugin {
    const NAME: &'static str = "sqlite";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "sessions in a SQLite database file";
    const KINDS: Kinds = Kinds::STORE;

    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        let settings: SqliteSettings = api::parse_settings(settings)?;
        Ok(api::store_adapter(SqliteStore::open(settings)?))
    }
}

api::export_plugin!(SqlitePlugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(dir: &tempfile::TempDir) -> SqliteStore {
        let path = dir.path().join("sessions.db");
        SqliteStore::open(SqliteSettings::new(path.to_string_lossy())).expect("open")
    }

    #[test]
    fn the_schema_is_versioned_and_migrated_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = temp_store(&dir);
        store.save("a", 0, "k", "{}").expect("save");
        drop(store);
        // Opening again finds version 1 and keeps the data.
        let store = temp_store(&dir);
        assert_eq!(store.load("a").expect("load").map(|s| s.version), Some(1));
        let versions: Vec<i64> = store
            .pool
            .run(|conn| {
                let mut stmt = conn
                    .prepare("SELECT version FROM schema_version ORDER BY version")
                    .map_err(store.failed("test"))?;
                let rows = stmt
                    .query_map([], |row| row.get(0))
                    .map_err(store.failed("test"))?;
                rows.collect::<Result<_, _>>().map_err(store.failed("test"))
            })
            .expect("versions");
        assert_eq!(versions, [1]);
        let mode: String = store
            .pool
            .run(|conn| {
                conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))
                    .map_err(store.failed("test"))
            })
            .expect("journal mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = temp_store(&dir);
        store
            .pool
            .run(|conn| {
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at_ms) VALUES (2, 0)",
                    [],
                )
                .map_err(store.failed("test"))
            })
            .expect("insert");
        drop(store);
        let path = dir.path().join("sessions.db");
        let err = SqliteStore::open(SqliteSettings::new(path.to_string_lossy()))
            .expect_err("version 2 is unknown");
        assert_eq!(err.kind, ErrorKind::UNSUPPORTED);
        assert!(err.message.contains("version 2"), "{err}");
    }

    #[test]
    fn connections_are_opened_on_demand_up_to_the_pool_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = temp_store(&dir);
        assert_eq!(store.pool.connections(), 1, "the one that migrated");
        std::thread::scope(|scope| {
            for n in 0..8 {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..20 {
                        store.save(&format!("t{n}-{i}"), 0, "", "{}").expect("save");
                    }
                });
            }
        });
        assert!(store.pool.connections() <= 4);
        assert_eq!(store.list("", "", 1000).expect("list").ids.len(), 160);
    }

    #[test]
    fn the_sweep_deletes_expired_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings =
            SqliteSettings::new(dir.path().join("s.db").to_string_lossy().into_owned());
        settings.ttl_secs = Some(1);
        let store = SqliteStore::open(settings).expect("open");
        store.save("old", 0, "", "{}").expect("save");
        let count = |store: &SqliteStore| -> i64 {
            store
                .pool
                .run(|conn| {
                    conn.query_row("SELECT COUNT(*) FROM sessions", [], |row| row.get(0))
                        .map_err(store.failed("test"))
                })
                .expect("count")
        };
        assert_eq!(count(&store), 1);
        // Pretend a minute went by: the next sweep is due, the row expired.
        store.sweep(now_ms() + 61_000);
        assert_eq!(count(&store), 0);
    }
}
