//! `redis`: sessions in Redis, shared by every host that points at it.
//!
//! Each session is a hash `{prefix}session:{id}` with the fields `version`,
//! `owner`, `data` and `updated_at` (Unix ms). Saves are compare-and-set in a
//! Lua script, so any number of hosts can share one server. Ids are indexed
//! in sorted sets for listing: `{prefix}index` holds every id and
//! `{prefix}owner:{owner}` those of one owner, all with score 0 so that
//! `ZRANGEBYLEX` pages through them in byte order.
//!
//! With `ttl_secs`, every load and save sets the session's expiry again
//! (`PEXPIRE`); Redis removes idle sessions by itself, and ids left behind in
//! the index sets are dropped when a listing meets them, and by sampling on
//! each create. Redis 6.2 or newer is needed (`ZRANDMEMBER`).
//!
//! Connections are opened lazily: the store can be built while Redis is
//! down, and it recovers by itself once Redis answers again. A connection
//! that breaks is closed with every idle one, and the call that met it is
//! retried once on a new connection.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_host_plugin_api::{
    self as api, abi_stable::std_types::ROption, ErrorKind, Kinds, Plugin, PluginError,
    SaveOutcome, SessionPage, Store, StoreAdapterBox, StoredSession,
};
use redis::{Connection, RedisError, Script, ServerErrorKind};
use serde::Deserialize;

use llm_plugin_pool::{Attempt, Connect, Failure, Pool};

/// The most ids one listing answers, whatever `limit` asks.
pub const MAX_PAGE: u32 = 1000;

/// The longest `ttl_secs` taken: 100 years.
pub const MAX_TTL_SECS: u64 = 100 * 365 * 24 * 3600;

/// Index entries of expired sessions a listing drops before it answers a
/// short page (with a `next` to continue), so one call stays short.
const PRUNE_BUDGET: u32 = 1000;

/// The Redis store's settings.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// The server: `redis://[user:password@]host[:port][/db]` or
    /// `redis+unix:///path/to/socket`.
    #[serde(default = "default_url")]
    pub url: String,
    /// Prepended to every key, so several deployments can share a server.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Expire sessions not saved or loaded for this many seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Connections kept open at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Limit for connecting, for each command, and for waiting for a free
    /// connection, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_url() -> String {
    "redis://127.0.0.1:6379".into()
}

fn default_prefix() -> String {
    "llm-host:".into()
}

fn default_pool_size() -> u32 {
    4
}

fn default_timeout_ms() -> u64 {
    2000
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: default_url(),
            prefix: default_prefix(),
            ttl_secs: None,
            pool_size: default_pool_size(),
            timeout_ms: default_timeout_ms(),
        }
    }
}

/// Opens connections to the server.
struct Connector {
    client: redis::Client,
    timeout: Duration,
    /// `redis 127.0.0.1:6379/0`, for messages (never the password).
    target: String,
    /// The `CLIENT SETNAME` of every connection, so operators can tell them
    /// apart in `CLIENT LIST`.
    client_name: String,
}

impl Connect for Connector {
    type Conn = Connection;

    fn connect(&self) -> Result<Connection, PluginError> {
        let cannot = |err: RedisError| {
            PluginError::unavailable(format!("{}: cannot connect: {err}", self.target))
        };
        let mut conn = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(cannot)?;
        conn.set_read_timeout(Some(self.timeout)).map_err(cannot)?;
        conn.set_write_timeout(Some(self.timeout)).map_err(cannot)?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.client_name)
            .exec(&mut conn)
            .map_err(cannot)?;
        Ok(conn)
    }

    fn target(&self) -> &str {
        &self.target
    }
}

/// One conditional write.
struct Write<'a> {
    id: &'a str,
    expected_version: u64,
    new_version: u64,
    owner: &'a str,
    data: &'a str,
    updated_at: u64,
}

/// The Redis store.
pub struct RedisStore {
    pool: Pool<Connector>,
    prefix: String,
    ttl_ms: u64,
    timeout: Duration,
    save_script: Script,
    load_script: Script,
    delete_script: Script,
    list_script: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.pool.manager().target())
            .field("prefix", &self.prefix)
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

/// Lua helpers shared by the scripts.
const LUA_HELPERS: &str = r#"
-- Makes `key` live at least `ttl` ms more.
local function extend(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
"#;

/// Compare-and-set.
/// KEYS: session hash, global index, owner index (the global one again when
/// the owner is empty).
/// ARGV: expected version, new version, owner, data, updated_at, ttl ms (0:
/// none), id, owner index prefix, session key prefix, "1" on a retry.
/// Answers {1, new version} or {0, current version}.
const SAVE_LUA: &str = r#"
local current = redis.call('HGET', KEYS[1], 'version') or '0'
if current ~= ARGV[1] then
  -- A retry after a broken connection: the first try may have been applied.
  if ARGV[10] == '1' and current == ARGV[2] then
    local stored = redis.call('HMGET', KEYS[1], 'owner', 'data')
    if stored[1] == ARGV[3] and stored[2] == ARGV[4] then
      return {1, current}
    end
  end
  return {0, current}
end
local old_owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'owner', ARGV[3], 'data', ARGV[4],
  'updated_at', ARGV[5])
redis.call('ZADD', KEYS[2], 0, ARGV[7])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], 0, ARGV[7])
end
if old_owner and old_owner ~= '' and old_owner ~= ARGV[3] then
  redis.call('ZREM', ARGV[8] .. old_owner, ARGV[7])
end
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  extend(KEYS[2], ttl)
  extend(KEYS[3], ttl)
  if ARGV[1] == '0' then
    -- Drop a few ids of expired sessions, so the index sets stay near the
    -- size of what is alive even if nobody lists.
    for _, index in ipairs({KEYS[2], KEYS[3]}) do
      for _, id in ipairs(redis.call('ZRANDMEMBER', index, 3)) do
        if redis.call('EXISTS', ARGV[9] .. id) == 0 then
          redis.call('ZREM', index, id)
        end
      end
    end
  end
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
end
return {1, ARGV[2]}
"#;

/// Load and refresh the expiry. KEYS: session hash, global index.
/// ARGV: ttl ms, owner index prefix.
const LOAD_LUA: &str = r#"
local fields = redis.call('HMGET', KEYS[1], 'version', 'owner', 'data', 'updated_at')
if not fields[1] then
  return false
end
local ttl = tonumber(ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
extend(KEYS[2], ttl)
if fields[2] and fields[2] ~= '' then
  extend(ARGV[2] .. fields[2], ttl)
end
return fields
"#;

/// KEYS: session hash, global index. ARGV: id, owner index prefix.
/// Answers 1 if the session existed.
const DELETE_LUA: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if owner and owner ~= '' then
  redis.call('ZREM', ARGV[2] .. owner, ARGV[1])
end
return existed
"#;

/// One page of an index, skipping (and removing) ids of sessions that are
/// gone or belong to another owner now.
/// KEYS: the index. ARGV: after ('' from the start), how many ids to find,
/// session key prefix, owner ('' any), how many stale ids to remove at most.
/// Answers {cursor, ids}: cursor is '' unless the removal budget ran out, in
/// which case the listing continues after it.
const LIST_LUA: &str = r#"
local start = '-'
if ARGV[1] ~= '' then
  start = '(' .. ARGV[1]
end
local wanted = tonumber(ARGV[2])
local budget = tonumber(ARGV[5])
local ids = {}
while #ids < wanted do
  local batch = redis.call('ZRANGEBYLEX', KEYS[1], start, '+', 'LIMIT', 0, wanted - #ids)
  if #batch == 0 then
    break
  end
  for _, id in ipairs(batch) do
    start = '(' .. id
    local owner = redis.call('HGET', ARGV[3] .. id, 'owner')
    if owner and (ARGV[4] == '' or owner == ARGV[4]) then
      ids[#ids + 1] = id
    else
      redis.call('ZREM', KEYS[1], id)
      budget = budget - 1
      if budget <= 0 then
        return {id, ids}
      end
    end
  end
end
return {'', ids}
"#;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl RedisStore {
    /// A store for `settings`; checks them, connects on first use.
    pub fn new(settings: RedisSettings) -> Result<Self, PluginError> {
        let client = redis::Client::open(settings.url.as_str()).map_err(|err| {
            // The URL may hold a password: name the problem, not the URL.
            PluginError::invalid_settings(format!(
                "url: not a usable Redis URL ({}): expected \
                 redis://[user:password@]host[:port][/db] or redis+unix:///path",
                err.detail().unwrap_or(err.category())
            ))
        })?;
        if settings.pool_size == 0 || settings.pool_size > 1024 {
            return Err(PluginError::invalid_settings(format!(
                "pool_size: must be between 1 and 1024, got {}",
                settings.pool_size
            )));
        }
        if settings.timeout_ms == 0 {
            return Err(PluginError::invalid_settings(
                "timeout_ms: must be at least 1",
            ));
        }
        let ttl_ms =
            match settings.ttl_secs {
                None => 0,
                Some(0) => return Err(PluginError::invalid_settings(
                    "ttl_secs: must be at least 1 (leave it out to keep sessions until deleted)",
                )),
                Some(secs) if secs > MAX_TTL_SECS => {
                    return Err(PluginError::invalid_settings(format!(
                        "ttl_secs: {secs} is more than {MAX_TTL_SECS} (100 years)"
                    )))
                }
                Some(secs) => secs * 1000,
            };
        let info = client.get_connection_info();
        let target = format!("redis {}/{}", info.addr(), info.redis_settings().db());
        let client_name: String = format!("llm-host@{}", settings.prefix)
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect();
        let timeout = Duration::from_millis(settings.timeout_ms);
        let connector = Connector {
            client,
            timeout,
            target,
            client_name,
        };
        Ok(Self {
            pool: Pool::new(connector, settings.pool_size as usize, timeout),
            prefix: settings.prefix,
            ttl_ms,
            timeout,
            save_script: Script::new(&format!("{LUA_HELPERS}{SAVE_LUA}")),
            load_script: Script::new(&format!("{LUA_HELPERS}{LOAD_LUA}")),
            delete_script: Script::new(DELETE_LUA),
            list_script: Script::new(LIST_LUA),
        })
    }

    /// The `CLIENT SETNAME` the store's connections carry.
    pub fn client_name(&self) -> &str {
        &self.pool.manager().client_name
    }

    fn session_key(&self, id: &str) -> String {
        format!("{}session:{id}", self.prefix)
    }

    fn session_prefix(&self) -> String {
        format!("{}session:", self.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}index", self.prefix)
    }

    fn owner_prefix(&self) -> String {
        format!("{}owner:", self.prefix)
    }

    fn owner_key(&self, owner: &str) -> String {
        if owner.is_empty() {
            self.index_key()
        } else {
            format!("{}{owner}", self.owner_prefix())
        }
    }

    fn target(&self) -> &str {
        self.pool.manager().target()
    }

    /// Sorts a Redis error into a broken connection or a plain failure,
    /// with a message naming the server and what failed.
    fn failure(&self, what: &str, err: RedisError) -> Failure {
        let target = self.target();
        if err.is_timeout() {
            // An answer may still come: the connection cannot be reused.
            return Failure::Broken(PluginError::new(
                ErrorKind::TIMEOUT,
                format!(
                    "{target}: {what}: no answer within {} ms",
                    self.timeout.as_millis()
                ),
            ));
        }
        if err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error() {
            return Failure::Broken(PluginError::unavailable(format!(
                "{target}: {what}: connection lost: {err}"
            )));
        }
        let (kind, note) = match err.kind() {
            redis::ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::ReadOnly,
            ) => (ErrorKind::UNAVAILABLE, ""),
            redis::ErrorKind::AuthenticationFailed
            | redis::ErrorKind::Server(ServerErrorKind::NoPerm) => (
                ErrorKind::UNAVAILABLE,
                " (check the user and password in url)",
            ),
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => (
                ErrorKind::CORRUPT,
                " (a key under the prefix holds something else)",
            ),
            _ if err.code() == Some("WRONGTYPE") => (
                ErrorKind::CORRUPT,
                " (a key under the prefix holds something else)",
            ),
            _ => (ErrorKind::INTERNAL, ""),
        };
        Failure::Failed(PluginError::new(
            kind,
            format!("{target}: {what} failed: {err}{note}"),
        ))
    }

    fn corrupt(&self, id: &str, what: impl fmt::Display) -> Failure {
        Failure::Failed(PluginError::new(
            ErrorKind::CORRUPT,
            format!(
                "{}: session `{id}` (key {}) is unreadable: {what}",
                self.target(),
                self.session_key(id)
            ),
        ))
    }

    /// Runs the save script once. `retry`: an earlier try of this very save
    /// broke its connection and may have been applied; if the session holds
    /// exactly what this save writes, at the version it would make, the
    /// earlier try was applied and the answer is `Saved`.
    fn save_once(
        &self,
        conn: &mut Connection,
        write: &Write<'_>,
        retry: bool,
    ) -> Result<(i64, String), Failure> {
        self.save_script
            .key(self.session_key(write.id))
            .key(self.index_key())
            .key(self.owner_key(write.owner))
            .arg(write.expected_version)
            .arg(write.new_version)
            .arg(write.owner)
            .arg(write.data)
            .arg(write.updated_at)
            .arg(self.ttl_ms)
            .arg(write.id)
            .arg(self.owner_prefix())
            .arg(self.session_prefix())
            .arg(if retry { "1" } else { "0" })
            .invoke::<(i64, String)>(conn)
            .map_err(|err| self.failure(&format!("save of `{}`", write.id), err))
    }

    fn decode_session(
        &self,
        id: &str,
        fields: Vec<Option<String>>,
    ) -> Result<StoredSession, Failure> {
        let [version, owner, data, updated_at]: [Option<String>; 4] = fields
            .try_into()
            .map_err(|fields: Vec<_>| self.corrupt(id, format!("{} fields", fields.len())))?;
        let number = |name: &str, value: Option<String>| -> Result<u64, Failure> {
            let value = value.ok_or_else(|| self.corrupt(id, format!("no `{name}` field")))?;
            value
                .parse()
                .map_err(|_| self.corrupt(id, format!("`{name}` is {value:?}, not a number")))
        };
        let version = number("version", version)?;
        let updated_at_ms = number("updated_at", updated_at)?;
        Ok(StoredSession {
            version,
            owner: owner
                .ok_or_else(|| self.corrupt(id, "no `owner` field"))?
                .into(),
            data: data
                .ok_or_else(|| self.corrupt(id, "no `data` field"))?
                .into(),
            updated_at_ms,
        })
    }
}

impl Store for RedisStore {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        let key = self.session_key(id);
        self.pool.run(|conn, _| {
            let fields: Option<Vec<Option<String>>> = if self.ttl_ms > 0 {
                self.load_script
                    .key(&key)
                    .key(self.index_key())
                    .arg(self.ttl_ms)
                    .arg(self.owner_prefix())
                    .invoke(conn)
            } else {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("version")
                    .arg("owner")
                    .arg("data")
                    .arg("updated_at")
                    .query::<Vec<Option<String>>>(conn)
                    .map(|fields| {
                        fields
                            .first()
                            .is_some_and(Option::is_some)
                            .then_some(fields)
                    })
            }
            .map_err(|err| self.failure(&format!("load of `{id}`"), err))?;
            fields
                .map(|fields| self.decode_session(id, fields))
                .transpose()
        })
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        let new_version = expected_version.checked_add(1).ok_or_else(|| {
            PluginError::invalid_input(format!("version {expected_version} cannot grow"))
        })?;
        let key = self.session_key(id);
        let updated_at = now_ms();
        let (saved, version) = self.pool.run(|conn, attempt| {
            let write = Write {
                id,
                expected_version,
                new_version,
                owner,
                data,
                updated_at,
            };
            self.save_once(conn, &write, attempt == Attempt::Retry)
        })?;
        let version: u64 = version.parse().map_err(|_| {
            PluginError::new(
                ErrorKind::CORRUPT,
                format!(
                    "{}: session `{id}` (key {key}) has version {version:?}, not a number",
                    self.target()
                ),
            )
        })?;
        Ok(if saved == 1 {
            SaveOutcome::Saved { version }
        } else {
            SaveOutcome::Conflict { current: version }
        })
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        let key = self.session_key(id);
        self.pool.run(|conn, _| {
            self.delete_script
                .key(&key)
                .key(self.index_key())
                .arg(id)
                .arg(self.owner_prefix())
                .invoke::<i64>(conn)
                .map(|existed| existed == 1)
                .map_err(|err| self.failure(&format!("delete of `{id}`"), err))
        })
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let index = self.owner_key(owner);
        let (cursor, mut ids) = self.pool.run(|conn, _| {
            self.list_script
                .key(&index)
                .arg(after)
                .arg(limit + 1)
                .arg(self.session_prefix())
                .arg(owner)
                .arg(PRUNE_BUDGET)
                .invoke::<(String, Vec<String>)>(conn)
                .map_err(|err| self.failure(&format!("listing of owner `{owner}`"), err))
        })?;
        let next = if ids.len() > limit as usize {
            ids.truncate(limit as usize);
            ids.last().cloned()
        } else if !cursor.is_empty() {
            Some(cursor)
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
            redis::cmd("PING")
                .query::<String>(conn)
                .map(drop)
                .map_err(|err| self.failure("ping", err))
        })
    }
}

/// The plugin.
pub struct RedisPlugin;

impl Plugin for RedisPlugin {
    const NAME: &'static str = "redis";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "sessions in Redis, shared by any number of hosts";
    const KINDS: Kinds = Kinds::STORE;

    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        let settings: RedisSettings = api::parse_settings(settings)?;
        Ok(api::store_adapter(RedisStore::new(settings)?))
    }
}

api::export_plugin!(RedisPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Result<RedisSettings, PluginError> {
        api::parse_settings(json)
    }

    #[test]
    fn defaults_need_no_settings() {
        let store = RedisStore::new(settings("{}").expect("empty settings")).expect("store");
        assert_eq!(store.target(), "redis 127.0.0.1:6379/0");
        assert_eq!(store.session_key("a:b"), "llm-host:session:a:b");
        assert_eq!(store.owner_key(""), "llm-host:index");
        assert_eq!(store.owner_key("k1"), "llm-host:owner:k1");
        assert_eq!(store.client_name(), "llm-host@llm-host:");
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (json, key) in [
            (r#"{"url": "http://example.com"}"#, "url"),
            (r#"{"url": "not a url"}"#, "url"),
            (r#"{"url": "rediss://127.0.0.1"}"#, "url"),
            (r#"{"pool_size": 0}"#, "pool_size"),
            (r#"{"timeout_ms": 0}"#, "timeout_ms"),
            (r#"{"ttl_secs": 0}"#, "ttl_secs"),
            (r#"{"ttl_secs": 18446744073709551615}"#, "ttl_secs"),
        ] {
            let err = RedisStore::new(settings(json).expect(json)).expect_err(json);
            assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{json}");
            assert!(err.message.starts_with(key), "{json}: {err}");
        }
        let err = settings(r#"{"prefx": "x"}"#).expect_err("typo");
        assert!(err.message.contains("prefx"), "{err}");
    }

    #[test]
    fn a_retried_save_that_was_applied_answers_saved() {
        let url = llm_host_conformance::support::env_or(
            "LLM_HOST_TEST_REDIS_URL",
            "redis://127.0.0.1:6379",
        );
        let prefix = format!(
            "llm-host-test:{}:",
            llm_host_conformance::support::unique_token()
        );
        let store = RedisStore::new(RedisSettings {
            url: url.clone(),
            prefix,
            ..RedisSettings::default()
        })
        .expect("store");
        let Some(()) = llm_host_conformance::support::require(
            store.ping(),
            &format!("no Redis server at {url}"),
        ) else {
            return;
        };
        let write = Write {
            id: "s",
            expected_version: 0,
            new_version: 1,
            owner: "k",
            data: "{}",
            updated_at: now_ms(),
        };
        let run = |write: &Write<'_>, retry: bool| {
            store
                .pool
                .run(|conn, _| store.save_once(conn, write, retry))
                .expect("save")
        };
        assert_eq!(run(&write, false), (1, "1".to_owned()));
        // The first try went through; the retry of the same write sees it.
        assert_eq!(run(&write, true), (1, "1".to_owned()));
        // Not a retry, or a retry of another write: a conflict.
        assert_eq!(run(&write, false), (0, "1".to_owned()));
        let other = Write {
            data: "[]",
            ..write
        };
        assert_eq!(run(&other, true), (0, "1".to_owned()));
        assert_eq!(store.delete("s"), Ok(true));
    }

    #[test]
    fn a_url_password_stays_out_of_messages() {
        let store = RedisStore::new(
            settings(r#"{"url": "redis://user:s3cret@127.0.0.1:1/2"}"#).expect("settings"),
        )
        .expect("store");
        assert!(!format!("{store:?}").contains("s3cret"));
        let err = store.ping().expect_err("nothing listens on port 1");
        assert_eq!(err.kind, ErrorKind::UNAVAILABLE, "{err}");
        assert!(err.message.contains("redis 127.0.0.1:1/2"), "{err}");
        assert!(!err.message.contains("s3cret"), "{err}");
    }
}
