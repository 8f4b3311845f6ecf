//! What the test files share: the server they run against, and a test's own
//! table and application_name on it.

// Each test file uses a part of this module.
#![allow(dead_code)]

use std::time::Duration;

use llm_host_conformance::support;
use llm_host_plugin_api::{Plugin, StoreAdapterBox};
use llm_plugin_postgres::{PostgresPlugin, MIGRATIONS_TABLE};

/// `LLM_HOST_TEST_POSTGRES_URL`, or the machine's server.
pub fn url() -> String {
    support::env_or(
        "LLM_HOST_TEST_POSTGRES_URL",
        "host=127.0.0.1 user=postgres dbname=test",
    )
}

/// `url` with `application_name` set, in the URL's own form.
pub fn with_application_name(url: &str, name: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let joiner = if url.contains('?') { '&' } else { '?' };
        format!("{url}{joiner}application_name={name}")
    } else {
        format!("{url} application_name={name}")
    }
}

/// A connection of the test's own, and the table and application name the
/// test's stores use; drops the table when dropped.
pub struct Server {
    pub client: postgres::Client,
    pub table: String,
    pub application_name: String,
}

impl Server {
    /// Connects, or skips (fails under CI) when nothing answers.
    pub fn connect() -> Option<Server> {
        let url = url();
        let token = support::unique_token();
        let client = support::require(
            url.parse::<postgres::Config>()
                .and_then(|mut config| {
                    config
                        .connect_timeout(Duration::from_secs(3))
                        .connect(postgres::NoTls)
                })
                .map_err(|err| {
                    // tokio-postgres puts the reason in the error's source.
                    let mut text = err.to_string();
                    let mut source = std::error::Error::source(&err);
                    while let Some(cause) = source {
                        text = format!("{text}: {cause}");
                        source = cause.source();
                    }
                    text
                }),
            &format!("no PostgreSQL server at `{url}` (set LLM_HOST_TEST_POSTGRES_URL)"),
        )?;
        Some(Server {
            client,
            table: format!("llm_host_test_{token}"),
            application_name: format!("llm-host-test-{token}"),
        })
    }

    pub fn settings(&self, extra: &str) -> String {
        self.settings_for(&url(), extra)
    }

    /// Settings for a store of this test's on `url`.
    pub fn settings_for(&self, url: &str, extra: &str) -> String {
        let url = with_application_name(url, &self.application_name);
        let mut json = format!(
            r#"{{"url": {url:?}, "table": {:?}, "pool_size": 4"#,
            self.table
        );
        if !extra.is_empty() {
            json.push_str(", ");
            json.push_str(extra);
        }
        json.push('}');
        json
    }

    /// Whether each open connection of this test's stores uses TLS, as the
    /// server sees them.
    pub fn tls_in_use(&mut self) -> Vec<bool> {
        self.client
            .query(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = $1",
                &[&self.application_name],
            )
            .expect("pg_stat_ssl")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    pub fn adapter(&self, extra: &str) -> StoreAdapterBox {
        match PostgresPlugin::new_store(&self.settings(extra)) {
            Ok(store) => store,
            Err(err) => panic!("the settings are valid: {err}"),
        }
    }

    pub fn count(&mut self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .and_then(|row| row.try_get(0))
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    /// Ends every connection of this test's stores, as an operator or a
    /// failover would.
    pub fn kill_store_connections(&mut self) -> i64 {
        self.client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND application_name = $1",
                &[&self.application_name],
            )
            .map(|rows| rows.len() as i64)
            .expect("pg_terminate_backend")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.client.batch_execute(&format!(
            "DROP TABLE IF EXISTS \"{0}\";
             DELETE FROM {MIGRATIONS_TABLE} WHERE table_name = '{0}'",
            self.table
        ));
    }
}
