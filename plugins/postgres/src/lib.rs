//! `postgres`: sessions in a PostgreSQL table, shared by every host that
//! points at it.
//!
//! One row per session: `id` (`COLLATE "C"`, so listings page in byte
//! order), `version`, `owner`, `data` (`text`, stored as given), and the Unix
//! millisecond times `updated_at_ms` and `touched_at_ms` (last load or save,
//! for `ttl_secs`), both from the server's clock so that hosts with skewed
//! clocks agree. Saves are compare-and-set in one statement:
//! `UPDATE ... WHERE id = $1 AND version = $2`, and for creates
//! `INSERT ... ON CONFLICT (id) DO NOTHING` (or replace a row that expired).
//!
//! The table is created on first use by a versioned migration recorded in
//! `llm_host_schema_migrations` (one row per table and applied version). It
//! runs in a transaction holding `pg_advisory_xact_lock`, so hosts starting
//! at the same time migrate once. A table migrated by a newer plugin is
//! refused rather than misread.
//!
//! With `ttl_secs`, a session not loaded or saved for that long is absent for
//! every call; its row is deleted when a call meets it, and by a small sweep
//! (`FOR UPDATE SKIP LOCKED`, so hosts do not queue on each other) riding on
//! a save, at most once per `ttl_secs` (at least a minute apart, at most an
//! hour).
//!
//! Connections are opened lazily: the store can be built while the server is
//! down and recovers by itself once it answers. A connection that breaks is
//! closed with every idle one, and the call that met it is retried once on a
//! new connection.
//!
//! Modules: `schema` (the table and its migrations), `queries` (the
//! statements), `tls` (libpq's `sslmode` and its files), `conninfo` (the TLS
//! keys taken out of `url`).

use std::error::Error as _;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_host_plugin_api::{
    self as api, abi_stable::std_types::ROption, ErrorKind, Kinds, Plugin, PluginError,
    SaveOutcome, SessionPage, Store, StoreAdapterBox, StoredSession,
};
use postgres::{config::Host, error::SqlState, Client, Config, Row, Statement};
use serde::Deserialize;

use llm_plugin_pool::{Attempt, Connect, Failure, Pool};

mod conninfo;
mod queries;
mod schema;
mod tls;

use queries::{queries, Query, QUERIES};

pub use schema::{MIGRATIONS_TABLE, SCHEMA_VERSION};

/// The most ids one listing answers, whatever `limit` asks.
pub const MAX_PAGE: u32 = 1000;

/// The longest `ttl_secs` taken: 100 years.
pub const MAX_TTL_SECS: u64 = 100 * 365 * 24 * 3600;

/// The PostgreSQL store's settings.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// The server: `host=... user=... dbname=...` or
    /// `postgres://user:password@host:port/dbname`.
    #[serde(default = "default_url")]
    pub url: String,
    /// The table sessions live in: lowercase letters, digits and `_`,
    /// starting with a letter or `_`, at most 48 characters.
    #[serde(default = "default_table")]
    pub table: String,
    /// Expire sessions not saved or loaded for this many seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Connections kept open at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Limit for connecting, and for waiting for a free connection, in
    /// milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// The server cancels any statement that runs longer (PostgreSQL's
    /// `statement_timeout`), in milliseconds: a lock held elsewhere or a
    /// stalled server fails the call instead of holding it.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// TLS, as libpq's `sslmode`: `disable`, `prefer` (the default; with
    /// `sslrootcert = "system"`, `verify-full`), `require`, `verify-ca` or
    /// `verify-full`. May be given in `url` instead, as may the files below.
    #[serde(default)]
    pub sslmode: Option<String>,
    /// The PEM file of the roots the server's certificate must chain to, or
    /// `system` for the Mozilla roots compiled into the plugin.
    #[serde(default)]
    pub sslrootcert: Option<String>,
    /// A client certificate (PEM, with its chain), for servers that ask.
    #[serde(default)]
    pub sslcert: Option<String>,
    /// The client certificate's unencrypted PEM private key, readable by its
    /// owner only.
    #[serde(default)]
    pub sslkey: Option<String>,
}

fn default_statement_timeout_ms() -> u64 {
    5000
}

fn default_url() -> String {
    "host=127.0.0.1 user=postgres dbname=test".into()
}

fn default_table() -> String {
    "llm_host_sessions".into()
}

fn default_pool_size() -> u32 {
    4
}

fn default_connect_timeout_ms() -> u64 {
    5000
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: default_url(),
            table: default_table(),
            ttl_secs: None,
            pool_size: default_pool_size(),
            connect_timeout_ms: default_connect_timeout_ms(),
            statement_timeout_ms: default_statement_timeout_ms(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
        }
    }
}

/// A connection and the statements prepared on it.
struct Conn {
    client: Client,
    prepared: [Option<Statement>; QUERIES],
}

/// Opens connections, and migrates the table on the first.
struct Connector {
    config: Config,
    tls: tls::Tls,
    /// `postgres 127.0.0.1:5432/test table llm_host_sessions`, for messages
    /// (never the password).
    target: String,
    /// The table's bare name.
    table: String,
    queries: [String; QUERIES],
    migrated: AtomicBool,
    migrating: Mutex<()>,
}

impl Connect for Connector {
    type Conn = Conn;

    fn connect(&self) -> Result<Conn, PluginError> {
        let mut client = self.config.connect(self.tls.clone()).map_err(|err| {
            let why = self.tls.explain(&err).unwrap_or_else(|| describe(&err));
            PluginError::unavailable(format!("{}: cannot connect: {why}", self.target))
        })?;
        if !self.migrated.load(Ordering::Acquire) {
            let _one_at_a_time = self
                .migrating
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !self.migrated.load(Ordering::Acquire) {
                schema::migrate(&mut client, &self.target, &self.table)?;
                self.migrated.store(true, Ordering::Release);
            }
        }
        Ok(Conn {
            client,
            prepared: Default::default(),
        })
    }

    fn target(&self) -> &str {
        &self.target
    }
}

/// A PostgreSQL error with its cause (the server's message for db errors).
pub(crate) fn describe(err: &postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{}: {}", db.severity(), db.message())
            + &db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            + &db
                .hint()
                .map(|h| format!(" (hint: {h})"))
                .unwrap_or_default();
    }
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `name` as a quoted identifier.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The server, for messages: hosts, port and database, never the password.
fn describe_target(config: &Config, table: &str) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(n, host)| {
            let port = config
                .get_ports()
                .get(n)
                .or_else(|| config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(",")
    };
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("postgres {hosts}/{dbname} table {table}")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool<Connector>,
    ttl_ms: Option<i64>,
    /// When this store may sweep expired rows next, Unix ms (local clock).
    next_sweep_ms: AtomicI64,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.pool.manager().target())
            .field("sslmode", &self.pool.manager().tls.mode())
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

/// A session row, before its numbers are checked.
type RawSession = (i64, String, String, i64);

impl PostgresStore {
    /// A store for `settings`; checks them, connects on first use.
    pub fn new(settings: PostgresSettings) -> Result<Self, PluginError> {
        let (url, from_url) = conninfo::split_url(&settings.url)?;
        let mut config = Config::from_str(&url).map_err(|err| {
            // The URL may hold a password: name the problem, not the URL.
            PluginError::invalid_settings(format!(
                "url: not a PostgreSQL connection string ({}): expected \
                 `host=... user=... dbname=...` or postgres://user@host:port/dbname",
                describe(&err)
            ))
        })?;
        let table = settings.table.as_str();
        let valid_table = !table.is_empty()
            && table.len() <= 48
            && table
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !table.starts_with(|c: char| c.is_ascii_digit());
        if !valid_table {
            return Err(PluginError::invalid_settings(format!(
                "table: `{table}` is not a plain table name (lowercase letters, digits and _, \
                 not starting with a digit, at most 48 characters)"
            )));
        }
        if table == MIGRATIONS_TABLE {
            return Err(PluginError::invalid_settings(format!(
                "table: `{table}` is the plugin's own migrations table"
            )));
        }
        if settings.pool_size == 0 || settings.pool_size > 1024 {
            return Err(PluginError::invalid_settings(format!(
                "pool_size: must be between 1 and 1024, got {}",
                settings.pool_size
            )));
        }
        if settings.connect_timeout_ms == 0 {
            return Err(PluginError::invalid_settings(
                "connect_timeout_ms: must be at least 1",
            ));
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
        if !(1..=3_600_000).contains(&settings.statement_timeout_ms) {
            return Err(PluginError::invalid_settings(format!(
                "statement_timeout_ms: must be between 1 and 3600000, got {}",
                settings.statement_timeout_ms
            )));
        }
        let timeout = Duration::from_millis(settings.connect_timeout_ms);
        config.connect_timeout(timeout);
        let statement_timeout = format!("-c statement_timeout={}", settings.statement_timeout_ms);
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {statement_timeout}"),
            _ => statement_timeout,
        };
        config.options(&options);
        // A connection that stops answering altogether (a frozen server or
        // network) fails once unacknowledged data waits this long.
        config.tcp_user_timeout(Duration::from_millis(settings.statement_timeout_ms) + timeout);
        if config.get_application_name().is_none() {
            config.application_name("llm-host");
        }
        let tls = tls::Tls::new(
            tls::TlsParams {
                sslmode: settings.sslmode,
                sslrootcert: settings.sslrootcert,
                sslcert: settings.sslcert,
                sslkey: settings.sslkey,
            }
            .merge(from_url)?,
        )?;
        tls.apply(&mut config)?;
        let target = describe_target(&config, table);
        let connector = Connector {
            config,
            tls,
            target,
            table: table.to_owned(),
            queries: queries(&quote(table)),
            migrated: AtomicBool::new(false),
            migrating: Mutex::new(()),
        };
        Ok(Self {
            pool: Pool::new(connector, settings.pool_size as usize, timeout),
            ttl_ms,
            next_sweep_ms: AtomicI64::new(0),
        })
    }

    fn target(&self) -> &str {
        self.pool.manager().target()
    }

    /// Sorts a PostgreSQL error into a broken connection or a plain failure,
    /// with a message naming the server and what failed.
    fn failure(&self, conn: &Conn, what: &str, err: postgres::Error) -> Failure {
        let target = self.target();
        let text = describe(&err);
        let Some(code) = err.code() else {
            // Not the server's answer: the connection failed under us.
            return Failure::Broken(PluginError::unavailable(format!(
                "{target}: {what}: connection lost: {text}"
            )));
        };
        let class = code.code().get(..2).unwrap_or_default();
        if conn.client.is_closed()
            || class == "08"
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
        {
            return Failure::Broken(PluginError::unavailable(format!(
                "{target}: {what}: connection lost: {text}"
            )));
        }
        let (kind, note) = if *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE
            || *code == SqlState::UNTRANSLATABLE_CHARACTER
        {
            (
                ErrorKind::INVALID_INPUT,
                " (PostgreSQL text cannot hold a NUL character)",
            )
        } else if *code == SqlState::QUERY_CANCELED {
            (ErrorKind::TIMEOUT, "")
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            (
                ErrorKind::UNAVAILABLE,
                " (grant the user access to the table)",
            )
        } else if *code == SqlState::UNDEFINED_TABLE {
            (
                ErrorKind::UNAVAILABLE,
                " (the table was dropped while the store ran? restart the host to recreate it)",
            )
        } else if class == "53" || class == "40" || class == "57" {
            // Out of resources, serialization failure or deadlock, operator
            // intervention: worth trying again later.
            (ErrorKind::UNAVAILABLE, "")
        } else {
            (ErrorKind::INTERNAL, "")
        };
        Failure::Failed(PluginError::new(
            kind,
            format!("{target}: {what} failed: {text}{note}"),
        ))
    }

    fn corrupt(&self, id: &str, what: impl fmt::Display) -> Failure {
        Failure::Failed(PluginError::new(
            ErrorKind::CORRUPT,
            format!("{}: session `{id}` is unreadable: {what}", self.target()),
        ))
    }

    /// Runs `query` with `params` on `conn`, preparing it on first use.
    fn query(
        &self,
        conn: &mut Conn,
        query: Query,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        what: &str,
    ) -> Result<Vec<Row>, Failure> {
        let index = query as usize;
        let statement = match conn.prepared.get(index).cloned().flatten() {
            Some(statement) => statement,
            None => {
                let sql = self
                    .pool
                    .manager()
                    .queries
                    .get(index)
                    .cloned()
                    .unwrap_or_default();
                let statement = match conn.client.prepare(&sql) {
                    Ok(statement) => statement,
                    Err(err) => return Err(self.failure(conn, what, err)),
                };
                if let Some(slot) = conn.prepared.get_mut(index) {
                    *slot = Some(statement.clone());
                }
                statement
            }
        };
        match conn.client.query(&statement, params) {
            Ok(rows) => Ok(rows),
            Err(err) => Err(self.failure(conn, what, err)),
        }
    }

    fn get<'r, T: postgres::types::FromSql<'r>>(
        &self,
        row: &'r Row,
        column: usize,
        id: &str,
    ) -> Result<T, Failure> {
        row.try_get(column)
            .map_err(|err| self.corrupt(id, format!("column {column}: {}", describe(&err))))
    }

    fn session(&self, id: &str, raw: RawSession) -> Result<StoredSession, PluginError> {
        let (version, owner, data, updated_at_ms) = raw;
        let unsigned = |name: &str, value: i64| {
            u64::try_from(value)
                .map_err(|_| PluginError::from(self.corrupt(id, format!("{name} is {value}"))))
        };
        Ok(StoredSession {
            version: unsigned("version", version)?,
            owner: owner.into(),
            data: data.into(),
            updated_at_ms: unsigned("updated_at_ms", updated_at_ms)?,
        })
    }

    /// Deletes a batch of expired rows if it is time to; never fails the
    /// call it rides on.
    fn sweep(&self) {
        let Some(ttl) = self.ttl_ms else {
            return;
        };
        let now = now_ms();
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
        let swept = self.pool.run(|conn, _| {
            self.query(conn, Query::Sweep, &[&ttl], "deleting expired sessions")
                .map(|rows| rows.len())
        });
        if let Err(err) = swept {
            api::warn!("{err}");
        }
    }

    /// One try of a save; see [`Store::save`].
    fn save_once(
        &self,
        conn: &mut Conn,
        id: &str,
        expected: i64,
        owner: &str,
        data: &str,
        attempt: Attempt,
    ) -> Result<SaveOutcome, Failure> {
        let what = format!("save of `{id}`");
        let ttl = self.ttl_ms;
        let written = if expected == 0 {
            self.query(conn, Query::Create, &[&id, &owner, &data, &ttl], &what)?
        } else {
            self.query(
                conn,
                Query::Update,
                &[&id, &expected, &owner, &data, &ttl],
                &what,
            )?
        };
        if let Some(row) = written.first() {
            let version: i64 = self.get(row, 0, id)?;
            return Ok(SaveOutcome::Saved {
                version: u64::try_from(version)
                    .map_err(|_| self.corrupt(id, format!("version {version}")))?,
            });
        }
        let current = self.query(conn, Query::Current, &[&id, &ttl], &what)?;
        let current: i64 = match current.first() {
            Some(row) if self.get::<bool>(row, 1, id)? => self.get(row, 0, id)?,
            _ => 0,
        };
        if attempt == Attempt::Retry && current == expected + 1 {
            // The first try broke its connection after the server may have
            // applied it: if the row holds exactly this save, it was.
            let same = self.query(conn, Query::Same, &[&id, &current, &owner, &data], &what)?;
            if let Some(row) = same.first() {
                if self.get::<bool>(row, 0, id)? {
                    return Ok(SaveOutcome::Saved {
                        version: current as u64,
                    });
                }
            }
        }
        Ok(SaveOutcome::Conflict {
            current: u64::try_from(current)
                .map_err(|_| self.corrupt(id, format!("version {current}")))?,
        })
    }
}

impl Store for PostgresStore {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        let what = format!("load of `{id}`");
        let raw: Option<RawSession> = self.pool.run(|conn, _| {
            let rows = match self.ttl_ms {
                // Loading counts as use: it renews the session's time to live.
                Some(ttl) => {
                    let rows = self.query(conn, Query::LoadTouching, &[&id, &ttl], &what)?;
                    if rows.is_empty() {
                        // Expired, or never there: purge the former.
                        self.query(conn, Query::PurgeOne, &[&id, &ttl], &what)?;
                    }
                    rows
                }
                None => self.query(conn, Query::Load, &[&id], &what)?,
            };
            rows.first()
                .map(|row| {
                    Ok((
                        self.get(row, 0, id)?,
                        self.get(row, 1, id)?,
                        self.get(row, 2, id)?,
                        self.get(row, 3, id)?,
                    ))
                })
                .transpose()
        })?;
        raw.map(|raw| self.session(id, raw)).transpose()
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        // No stored version is this large, nor can one grow past it.
        let Some(expected) = i64::try_from(expected_version)
            .ok()
            .filter(|v| *v < i64::MAX)
        else {
            let current = self.load(id)?.map_or(0, |s| s.version);
            return Ok(SaveOutcome::Conflict { current });
        };
        let outcome = self
            .pool
            .run(|conn, attempt| self.save_once(conn, id, expected, owner, data, attempt))?;
        self.sweep();
        Ok(outcome)
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        let what = format!("delete of `{id}`");
        self.pool.run(|conn, _| {
            let rows = self.query(conn, Query::Delete, &[&id, &self.ttl_ms], &what)?;
            match rows.first() {
                Some(row) => self.get::<bool>(row, 0, id),
                None => Ok(false),
            }
        })
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let fetch = i64::from(limit) + 1;
        let what = format!("listing of owner `{owner}`");
        let mut ids: Vec<String> = self.pool.run(|conn, _| {
            let rows = if owner.is_empty() {
                self.query(conn, Query::ListAll, &[&after, &self.ttl_ms, &fetch], &what)?
            } else {
                self.query(
                    conn,
                    Query::ListOwner,
                    &[&owner, &after, &self.ttl_ms, &fetch],
                    &what,
                )?
            };
            rows.iter().map(|row| self.get(row, 0, "?")).collect()
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
        self.pool.run(|conn, _| {
            conn.client
                .simple_query("SELECT 1")
                .map(drop)
                .map_err(|err| self.failure(conn, "ping", err))
        })
    }
}

/// The plugin.
pub struct PostgresPlugin;

impl Plugin for PostgresPlugin {
    const NAME: &'static str = "postgres";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "sessions in PostgreSQL, shared by any number of hosts";
    const KINDS: Kinds = Kinds::STORE;

    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        let settings: PostgresSettings = api::parse_settings(settings)?;
        Ok(api::store_adapter(PostgresStore::new(settings)?))
    }
}

api::export_plugin!(PostgresPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> PostgresSettings {
        api::parse_settings(json).expect(json)
    }

    #[test]
    fn both_url_forms_are_taken_and_described_without_the_password() {
        for (url, target) in [
            (
                "host=127.0.0.1 user=postgres dbname=test password=s3cret",
                "postgres 127.0.0.1:5432/test table llm_host_sessions",
            ),
            (
                "postgres://app:s3cret@db.example:6543/sessions",
                "postgres db.example:6543/sessions table llm_host_sessions",
            ),
            (
                "postgresql:///test?host=/run/postgresql",
                "postgres /run/postgresql/.s.PGSQL.5432/test table llm_host_sessions",
            ),
        ] {
            let store = PostgresStore::new(PostgresSettings {
                url: url.into(),
                ..PostgresSettings::default()
            })
            .expect(url);
            assert_eq!(store.target(), target);
            assert!(!format!("{store:?}").contains("s3cret"));
        }
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (json, key) in [
            (r#"{"url": "host=x port=notanumber"}"#, "url"),
            (r#"{"url": "postgres://a:b@c:d/e"}"#, "url"),
            (r#"{"table": "Sessions"}"#, "table"),
            (r#"{"table": "a; DROP TABLE b"}"#, "table"),
            (r#"{"table": "1abc"}"#, "table"),
            (r#"{"table": ""}"#, "table"),
            (r#"{"table": "llm_host_schema_migrations"}"#, "table"),
            (r#"{"pool_size": 0}"#, "pool_size"),
            (r#"{"connect_timeout_ms": 0}"#, "connect_timeout_ms"),
            (r#"{"ttl_secs": 0}"#, "ttl_secs"),
        ] {
            let err = PostgresStore::new(settings(json)).expect_err(json);
            assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{json}");
            assert!(err.message.starts_with(key), "{json}: {err}");
        }
    }

    #[test]
    fn a_retried_save_that_was_applied_answers_saved() {
        use llm_host_conformance::support;
        let url = support::env_or(
            "LLM_HOST_TEST_POSTGRES_URL",
            "host=127.0.0.1 user=postgres dbname=test",
        );
        let table = format!("llm_host_test_{}", support::unique_token());
        let store = PostgresStore::new(PostgresSettings {
            url: url.clone(),
            table: table.clone(),
            ..PostgresSettings::default()
        })
        .expect("store");
        let Some(()) = support::require(store.ping(), &format!("no PostgreSQL server at `{url}`"))
        else {
            return;
        };
        let save = |data: &str, attempt: Attempt| {
            store
                .pool
                .run(|conn, _| store.save_once(conn, "s", 0, "k", data, attempt))
                .expect("save")
        };
        assert_eq!(
            save("{}", Attempt::First),
            SaveOutcome::Saved { version: 1 }
        );
        // The first try went through; the retry of the same write sees it.
        assert_eq!(
            save("{}", Attempt::Retry),
            SaveOutcome::Saved { version: 1 }
        );
        // Not a retry, or a retry of another write: a conflict.
        assert_eq!(
            save("{}", Attempt::First),
            SaveOutcome::Conflict { current: 1 }
        );
        assert_eq!(
            save("[]", Attempt::Retry),
            SaveOutcome::Conflict { current: 1 }
        );
        let dropped = store.pool.run(|conn, _| {
            conn.client
                .batch_execute(&format!(
                    "DROP TABLE \"{table}\";
                     DELETE FROM {MIGRATIONS_TABLE} WHERE table_name = '{table}'"
                ))
                .map_err(|err| Failure::Failed(PluginError::internal(describe(&err))))
        });
        assert_eq!(dropped, Ok(()));
    }
}
