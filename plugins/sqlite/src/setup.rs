//! Opening a connection and bringing the schema up to date, safely while
//! other processes do the same to the same file.
//!
//! Hosts started together on one new file race to set it up. SQLite's busy
//! handler (`busy_timeout`) does not cover every lock this needs: switching
//! a file to WAL mode takes an exclusive lock without calling it, and a
//! connection that finds another one recovering or initialising the WAL
//! index gets `SQLITE_BUSY` at once. So the WAL switch and the schema
//! migration are each retried on `SQLITE_BUSY`/`SQLITE_LOCKED` with a short
//! randomised backoff, until `busy_timeout` has passed. The migration runs
//! in one `BEGIN IMMEDIATE` transaction and reads the recorded version
//! first, so the connections that lose the race find the schema made and
//! change nothing.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use llm_host_plugin_api::{self as api, ErrorKind, PluginError};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, TransactionBehavior};

use crate::{now_ms, sql_error, MIGRATIONS, SCHEMA_VERSION};

/// The first wait after a busy answer; each next one is twice as long.
const BACKOFF_FIRST: Duration = Duration::from_millis(2);
/// The longest wait between two tries.
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// A step that failed: what it was doing, and SQLite's error.
struct Failed {
    what: String,
    err: rusqlite::Error,
}

impl Failed {
    fn at(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Self {
        let what = what.into();
        move |err| Self { what, err }
    }
}

/// Why one try of the migration failed.
enum MigrateError {
    Sql(Failed),
    /// A failure no retry mends.
    Plugin(PluginError),
}

impl From<Failed> for MigrateError {
    fn from(failed: Failed) -> Self {
        Self::Sql(failed)
    }
}

/// Whether `err` means another connection holds a lock this one needs.
fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Runs `step` until it does not fail busy or `limit` has passed since the
/// first try, waiting a randomised, growing backoff between tries.
fn retry_busy<T, E>(
    limit: Duration,
    busy: impl Fn(&E) -> bool,
    mut step: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    let mut backoff = BACKOFF_FIRST;
    loop {
        match step() {
            Err(err) if busy(&err) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(err);
                }
                // Connections in different processes must not retry in step.
                let jitter = RandomState::new().build_hasher().finish();
                let wait = backoff / 2 + backoff.mul_f64((jitter % 1000) as f64 / 2000.0);
                thread::sleep(wait.min(left));
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

/// Opens one connection and sets it up: `busy_timeout`, then WAL mode, then
/// `synchronous`.
pub(crate) fn open(path: &Path, busy_timeout: Duration) -> Result<Connection, PluginError> {
    let failed = |what: &str| {
        let what = what.to_owned();
        move |err| sql_error(path, &what, err)
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed("opening the database"))?;
    // Before anything that takes a lock.
    conn.busy_timeout(busy_timeout)
        .map_err(failed("setting busy_timeout"))?;
    let mode: String = retry_busy(busy_timeout, is_busy, || {
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
    })
    .map_err(failed("switching to WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        api::warn!(
            "sqlite {}: the file system does not allow WAL mode (journal mode is {mode}); \
             saves will block loads",
            path.display()
        );
    }
    // In WAL mode NORMAL never corrupts the file; a power cut (not a crash
    // of the host) may lose the last saves.
    retry_busy(busy_timeout, is_busy, || {
        conn.pragma_update(None, "synchronous", "NORMAL")
    })
    .map_err(failed("setting synchronous"))?;
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`], retrying while other
/// connections hold the file (for at most `busy_timeout`); answers the
/// version found.
pub(crate) fn migrate(
    path: &Path,
    conn: &mut Connection,
    busy_timeout: Duration,
) -> Result<i64, PluginError> {
    let busy =
        |err: &MigrateError| matches!(err, MigrateError::Sql(failed) if is_busy(&failed.err));
    retry_busy(busy_timeout, busy, || migrate_once(path, conn)).map_err(|err| match err {
        MigrateError::Sql(Failed { what, err }) => sql_error(path, &what, err),
        MigrateError::Plugin(err) => err,
    })
}

/// One try of [`migrate`], in one `BEGIN IMMEDIATE` transaction: nothing is
/// written unless all of it is.
fn migrate_once(path: &Path, conn: &mut Connection) -> Result<i64, MigrateError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(Failed::at("starting the schema migration"))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version       INTEGER NOT NULL PRIMARY KEY,
             applied_at_ms INTEGER NOT NULL
         )",
    )
    .map_err(Failed::at("creating schema_version"))?;
    let found: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |row| row.get(0),
        )
        .map_err(Failed::at("reading schema_version"))?;
    if found > SCHEMA_VERSION {
        return Err(MigrateError::Plugin(PluginError::new(
            ErrorKind::UNSUPPORTED,
            format!(
                "sqlite {}: the schema is at version {found}, newer than this plugin knows \
                 ({SCHEMA_VERSION}): upgrade the plugin",
                path.display()
            ),
        )));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = from as i64 + 1;
        tx.execute_batch(sql)
            .map_err(Failed::at(format!("migrating the schema to version {to}")))?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at_ms) VALUES (?1, ?2)",
            params![to, now_ms()],
        )
        .map_err(Failed::at("recording the schema version"))?;
    }
    tx.commit()
        .map_err(Failed::at("committing the schema migration"))?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn busy_steps_are_retried_until_they_pass() {
        let tries = Cell::new(0);
        let result: Result<u32, bool> = retry_busy(
            Duration::from_secs(5),
            |busy| *busy,
            || {
                tries.set(tries.get() + 1);
                if tries.get() < 4 {
                    Err(true)
                } else {
                    Ok(7)
                }
            },
        );
        assert_eq!(result, Ok(7));
        assert_eq!(tries.get(), 4);
    }

    #[test]
    fn retries_stop_at_the_limit_and_other_errors_are_not_retried() {
        let started = Instant::now();
        let tries = Cell::new(0);
        let result: Result<(), bool> = retry_busy(
            Duration::from_millis(200),
            |busy| *busy,
            || {
                tries.set(tries.get() + 1);
                Err(true)
            },
        );
        assert_eq!(result, Err(true));
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(tries.get() > 2, "{}", tries.get());

        let tries = Cell::new(0);
        let result: Result<(), bool> = retry_busy(
            Duration::from_secs(5),
            |busy| *busy,
            || {
                tries.set(tries.get() + 1);
                Err(false)
            },
        );
        assert_eq!((result, tries.get()), (Err(false), 1));
    }
}
