//! The statements the store runs, written for one table. Times come from
//! the server's clock (`now()`), so hosts with skewed clocks agree on when a
//! session was last used. `ttl` parameters are milliseconds, `NULL` when the
//! store has no `ttl_secs`.

/// The server's clock in Unix milliseconds, fixed for one statement.
const NOW_MS: &str = "(extract(epoch FROM now()) * 1000)::bigint";

/// How many expired rows one sweep deletes at most.
const SWEEP_BATCH: i64 = 500;

/// The statements the store runs, prepared once per connection.
#[derive(Clone, Copy)]
pub(crate) enum Query {
    Load,
    LoadTouching,
    PurgeOne,
    Create,
    Update,
    Current,
    Same,
    Delete,
    ListAll,
    ListOwner,
    Sweep,
}

pub(crate) const QUERIES: usize = 11;

/// The text of every [`Query`] for one table.
pub(crate) fn queries(table: &str) -> [String; QUERIES] {
    let live = |ttl: &str| format!("({ttl}::bigint IS NULL OR touched_at_ms > {NOW_MS} - {ttl})");
    let sql = |query: Query| -> String {
        match query {
            Query::Load => {
                format!("SELECT version, owner, data, updated_at_ms FROM {table} WHERE id = $1")
            }
            Query::LoadTouching => format!(
                "UPDATE {table} SET touched_at_ms = {NOW_MS}
                 WHERE id = $1 AND touched_at_ms > {NOW_MS} - $2::bigint
                 RETURNING version, owner, data, updated_at_ms"
            ),
            Query::PurgeOne => format!(
                "DELETE FROM {table} WHERE id = $1 AND touched_at_ms <= {NOW_MS} - $2::bigint"
            ),
            Query::Create => format!(
                "INSERT INTO {table} AS s (id, version, owner, data, updated_at_ms, touched_at_ms)
                 VALUES ($1, 1, $2, $3, {NOW_MS}, {NOW_MS})
                 ON CONFLICT (id) DO UPDATE SET
                     version = 1, owner = EXCLUDED.owner, data = EXCLUDED.data,
                     updated_at_ms = EXCLUDED.updated_at_ms,
                     touched_at_ms = EXCLUDED.touched_at_ms
                 WHERE s.touched_at_ms <= EXCLUDED.touched_at_ms - $4::bigint
                 RETURNING s.version"
            ),
            Query::Update => format!(
                "UPDATE {table}
                 SET version = version + 1, owner = $3, data = $4,
                     updated_at_ms = {NOW_MS}, touched_at_ms = {NOW_MS}
                 WHERE id = $1 AND version = $2 AND {}
                 RETURNING version",
                live("$5")
            ),
            Query::Current => format!("SELECT version, {} FROM {table} WHERE id = $1", live("$2")),
            Query::Same => format!(
                "SELECT owner = $3 AND data = $4 FROM {table} WHERE id = $1 AND version = $2"
            ),
            Query::Delete => format!("DELETE FROM {table} WHERE id = $1 RETURNING {}", live("$2")),
            Query::ListAll => format!(
                "SELECT id FROM {table} WHERE id > $1 AND {} ORDER BY id LIMIT $3",
                live("$2")
            ),
            Query::ListOwner => format!(
                "SELECT id FROM {table} WHERE owner = $1 AND id > $2 AND {} ORDER BY id LIMIT $4",
                live("$3")
            ),
            Query::Sweep => format!(
                "DELETE FROM {table} WHERE id IN (
                     SELECT id FROM {table} WHERE touched_at_ms <= {NOW_MS} - $1::bigint
                     LIMIT {SWEEP_BATCH} FOR UPDATE SKIP LOCKED)"
            ),
        }
    };
    [
        Query::Load,
        Query::LoadTouching,
        Query::PurgeOne,
        Query::Create,
        Query::Update,
        Query::Current,
        Query::Same,
        Query::Delete,
        Query::ListAll,
        Query::ListOwner,
        Query::Sweep,
    ]
    .map(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_is_written_for_the_table() {
        let all = queries("\"t\"");
        assert!(all.iter().all(|sql| sql.contains("\"t\"")));
        assert!(all[Query::Sweep as usize].contains("SKIP LOCKED"));
    }
}
