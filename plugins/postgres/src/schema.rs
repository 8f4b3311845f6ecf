//! The session table's schema and its migrations.
//!
//! Each applied migration is a row of [`MIGRATIONS_TABLE`] (`table_name`,
//! `version`, `applied_at`), so one database can hold several session tables
//! at their own versions. [`migrate`] runs the missing ones in one
//! transaction holding `pg_advisory_xact_lock`, so hosts starting at the same
//! time migrate once; a table at a version newer than [`SCHEMA_VERSION`] is
//! refused rather than misread.

use llm_host_plugin_api::{self as api, ErrorKind, PluginError};
use postgres::{error::SqlState, Client};

use crate::{describe, quote};

/// The table that records applied migrations, per session table.
pub const MIGRATIONS_TABLE: &str = "llm_host_schema_migrations";

/// The schema version this plugin writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The key of the advisory lock migrations hold (`llmhost1` in ASCII).
const MIGRATION_LOCK: i64 = 0x6c6c_6d68_6f73_7431;

/// Migrations, in order: entry `n` takes a table from version `n` to
/// `n + 1`. `{table}` is replaced by the quoted table name, `{name}` by the
/// bare one.
const MIGRATIONS: &[&str] = &["CREATE TABLE {table} (
         id            text COLLATE \"C\" NOT NULL PRIMARY KEY,
         version       bigint NOT NULL,
         owner         text   NOT NULL,
         data          text   NOT NULL,
         updated_at_ms bigint NOT NULL,
         touched_at_ms bigint NOT NULL
     ) WITH (fillfactor = 90);
     CREATE INDEX {name}_owner_id ON {table} (owner, id);"];

/// Brings `table` to [`SCHEMA_VERSION`]; `target` names the server in
/// messages.
pub(crate) fn migrate(client: &mut Client, target: &str, table: &str) -> Result<(), PluginError> {
    let failed = |what: &str| {
        let what = what.to_owned();
        move |err: postgres::Error| {
            let kind = match err.code() {
                Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => ErrorKind::UNAVAILABLE,
                Some(_) => ErrorKind::INTERNAL,
                None => ErrorKind::UNAVAILABLE,
            };
            PluginError::new(kind, format!("{target}: {what} failed: {}", describe(&err)))
        }
    };
    let mut tx = client
        .transaction()
        .map_err(failed("starting the schema migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(failed("taking the migration lock"))?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
             table_name text        NOT NULL,
             version    integer     NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (table_name, version)
         )"
    ))
    .map_err(failed(&format!("creating {MIGRATIONS_TABLE}")))?;
    let found: i32 = tx
        .query_one(
            &format!(
                "SELECT COALESCE(MAX(version), 0) FROM {MIGRATIONS_TABLE} WHERE table_name = $1"
            ),
            &[&table],
        )
        .and_then(|row| row.try_get(0))
        .map_err(failed(&format!("reading {MIGRATIONS_TABLE}")))?;
    if found > SCHEMA_VERSION {
        return Err(PluginError::new(
            ErrorKind::UNSUPPORTED,
            format!(
                "{}: the table is at schema version {found}, newer than this plugin knows \
                 ({SCHEMA_VERSION}): upgrade the plugin",
                target
            ),
        ));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = from as i32 + 1;
        let sql = sql
            .replace("{table}", &quote(table))
            .replace("{name}", table);
        tx.batch_execute(&sql)
            .map_err(failed(&format!("migrating the table to version {to}")))?;
        tx.execute(
            &format!("INSERT INTO {MIGRATIONS_TABLE} (table_name, version) VALUES ($1, $2)"),
            &[&table, &to],
        )
        .map_err(failed(&format!(
            "recording version {to} in {MIGRATIONS_TABLE}"
        )))?;
    }
    tx.commit()
        .map_err(failed("committing the schema migration"))?;
    if found < SCHEMA_VERSION {
        api::info!(
            "{}: schema brought from version {found} to {SCHEMA_VERSION}",
            target
        );
    }
    Ok(())
}
