//! Usage by API key and backend: turns and tokens per UTC day, kept in the
//! default store so that every host sharing it agrees (`GET /v1/usage`).
//!
//! A finished turn is counted in this process's memory ([`pending`]); every
//! `server.usage_flush_secs`, and at shutdown, the counts are added to one
//! document per key and day in the store, under the id
//! `_host:usage:DAY:KEY` (ids starting `_host:` are the host's own: clients
//! cannot use them). Each addition is a conditional save, retried on a
//! conflict, so hosts adding at once never overwrite one another; a flush
//! that fails keeps its counts for the next. The documents have no owner,
//! so no key lists them as its sessions; a store's `ttl_secs` expires them
//! as it expires sessions.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::ports::{SaveOutcome, SessionStore, StoreError};
use crate::core::within;

/// The prefix of usage documents' ids.
const PREFIX: &str = "_host:usage:";

/// Turns and tokens.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Turns finished (failed and cancelled ones included).
    #[serde(default)]
    pub turns: u64,
    /// Of those, turns that failed.
    #[serde(default)]
    pub failed_turns: u64,
    /// Input tokens the backends reported.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output tokens the backends reported.
    #[serde(default)]
    pub output_tokens: u64,
}

impl Counts {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &Counts) {
        self.turns = self.turns.saturating_add(other.turns);
        self.failed_turns = self.failed_turns.saturating_add(other.failed_turns);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
    }
}

/// One key's usage on one UTC day, as stored.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct DayUsage {
    /// The API key's id.
    pub key: String,
    /// The day, `YYYY-MM-DD`.
    pub day: String,
    /// Counts by backend.
    #[serde(default)]
    pub backends: BTreeMap<String, Counts>,
}

/// Counts by day (days since 1970-01-01, UTC), key, then backend: nested,
/// so that counting a turn looks its place up by borrowed names and
/// allocates nothing once the key and backend have a place that day.
type Table = BTreeMap<i64, BTreeMap<String, BTreeMap<String, Counts>>>;

/// One (day, key)'s counts by backend, as a flush takes them.
type Entry = ((i64, String), BTreeMap<String, Counts>);

/// Counts of this process not yet added to the store.
#[derive(Default)]
pub struct Pending(Mutex<Table>);

/// This process's pending counts.
pub fn pending() -> &'static Pending {
    static PENDING: OnceLock<Pending> = OnceLock::new();
    PENDING.get_or_init(Pending::default)
}

impl Pending {
    /// Counts a turn of `key` on `backend` that ended at `now_ms`.
    pub fn record(&self, key: &str, backend: &str, counts: Counts, now_ms: u64) {
        let day = i64::try_from(now_ms / 86_400_000).unwrap_or(i64::MAX);
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let keys = table.entry(day).or_default();
        let backends = match keys.get_mut(key) {
            Some(backends) => backends,
            None => keys.entry(key.to_owned()).or_default(),
        };
        match backends.get_mut(backend) {
            Some(total) => total.add(&counts),
            None => {
                backends.insert(backend.to_owned(), counts);
            }
        }
    }

    /// Every pending count, by (day, key), in order; none stay pending.
    fn take(&self) -> impl Iterator<Item = Entry> {
        let table = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        table.into_iter().flat_map(|(day, keys)| {
            keys.into_iter()
                .map(move |(key, backends)| ((day, key), backends))
        })
    }

    /// Puts counts that could not be stored back, for the next flush.
    fn put_back(&self, entries: impl IntoIterator<Item = Entry>) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for ((day, key), backends) in entries {
            let into = table.entry(day).or_default().entry(key).or_default();
            for (backend, counts) in backends {
                into.entry(backend).or_default().add(&counts);
            }
        }
    }

    /// Adds every pending count to `store`, each store call within `limit`.
    /// What could not be added stays pending; the first error is answered.
    pub async fn flush<S: SessionStore>(
        &self,
        store: &S,
        limit: Duration,
    ) -> Result<(), StoreError> {
        let mut entries = self.take();
        while let Some(((day, key), backends)) = entries.next() {
            if let Err(err) = add(store, &format_day(day), &key, &backends, limit).await {
                self.put_back(std::iter::once(((day, key), backends)).chain(entries));
                return Err(err);
            }
        }
        Ok(())
    }
}

/// The store id of `key`'s usage on `day`.
pub fn doc_id(day: &str, key: &str) -> String {
    format!("{PREFIX}{day}:{key}")
}

/// Adds `backends` to the stored usage of `key` on `day`.
async fn add<S: SessionStore>(
    store: &S,
    day: &str,
    key: &str,
    backends: &BTreeMap<String, Counts>,
    limit: Duration,
) -> Result<(), StoreError> {
    let id = doc_id(day, key);
    for _ in 0..16 {
        let (mut usage, version) = match load(store, &id, limit).await? {
            Some(found) => found,
            None => (
                DayUsage {
                    key: key.to_owned(),
                    day: day.to_owned(),
                    backends: BTreeMap::new(),
                },
                0,
            ),
        };
        for (backend, counts) in backends {
            usage
                .backends
                .entry(backend.clone())
                .or_default()
                .add(counts);
        }
        let data = serde_json::to_string(&usage).unwrap_or_default();
        let saved = within(
            store.name(),
            "save",
            limit,
            store.save(&id, version, "", data),
        )
        .await?;
        if let SaveOutcome::Saved { .. } = saved {
            return Ok(());
        }
    }
    Err(StoreError::Contended(store.name().to_owned()))
}

/// The stored usage document `id` and its version, if there is one.
async fn load<S: SessionStore>(
    store: &S,
    id: &str,
    limit: Duration,
) -> Result<Option<(DayUsage, u64)>, StoreError> {
    let Some(stored) = within(store.name(), "load", limit, store.load(id)).await? else {
        return Ok(None);
    };
    let usage = serde_json::from_str(&stored.data).map_err(|err| StoreError::Unreadable {
        store: store.name().to_owned(),
        id: id.to_owned(),
        owner: stored.owner.clone(),
        error: err.to_string(),
    })?;
    Ok(Some((usage, stored.version)))
}

/// `key`'s stored usage on each day from `from` to `to` (day numbers, see
/// [`parse_day`]) that has some.
pub async fn read<S: SessionStore>(
    store: &S,
    key: &str,
    from: i64,
    to: i64,
    limit: Duration,
) -> Result<Vec<DayUsage>, StoreError> {
    let mut days = Vec::new();
    for day in from..=to {
        if let Some((usage, _)) = load(store, &doc_id(&format_day(day), key), limit).await? {
            days.push(usage);
        }
    }
    Ok(days)
}

/// The UTC day of Unix time `ms`, `YYYY-MM-DD`.
pub fn day_of(ms: u64) -> String {
    format_day(i64::try_from(ms / 86_400_000).unwrap_or(i64::MAX))
}

/// Day number `days` (days since 1970-01-01) as `YYYY-MM-DD`: the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub fn format_day(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The day number of `YYYY-MM-DD` (days since 1970-01-01), if it is a
/// real date of years 1970-9999.
pub fn parse_day(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    if year < 1970 || !(1..=12).contains(&month) || day < 1 {
        return None;
    }
    // Hinnant's `days_from_civil`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // A day past the month's end (`02-30`) comes back as another date.
    (format_day(days) == text).then_some(days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fakes::FakeStore;

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(86_399_999), "1970-01-01");
        assert_eq!(day_of(86_400_000), "1970-01-02");
        // 2024-02-29 12:00 UTC.
        assert_eq!(day_of(1_709_208_000_000), "2024-02-29");
        assert_eq!(day_of(1_798_675_200_000), "2026-12-31");
        assert_eq!(day_of(1_798_761_600_000), "2027-01-01");
        for days in [0, 59, 60, 365, 11_016, 19_782, 20_423, 2_932_896] {
            assert_eq!(parse_day(&format_day(days)), Some(days), "{days}");
        }
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "2026-1-01",
            "1969-12-31",
            "2026-01-0x",
            "",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    fn counts(turns: u64, failed: u64, input: u64, output: u64) -> Counts {
        Counts {
            turns,
            failed_turns: failed,
            input_tokens: input,
            output_tokens: output,
        }
    }

    #[tokio::test]
    async fn counts_add_up_in_the_store_across_flushes_and_processes() {
        let store = FakeStore::default();
        let limit = Duration::from_secs(1);
        let day = 20_000 * 86_400_000;
        let (one, two) = (Pending::default(), Pending::default());
        one.record("alice", "echo", counts(1, 0, 5, 3), day);
        one.record("alice", "echo", counts(1, 1, 2, 0), day + 1);
        one.record("alice", "llama", counts(1, 0, 7, 9), day + 2);
        two.record("alice", "echo", counts(1, 0, 1, 1), day + 3);
        two.record("bob", "echo", counts(1, 0, 1, 1), day + 86_400_000);
        one.flush(&store, limit).await.expect("flush");
        two.flush(&store, limit).await.expect("flush");
        // Nothing pending: a flush adds nothing twice.
        one.flush(&store, limit).await.expect("flush");

        let alice = read(&store, "alice", 20_000, 20_001, limit)
            .await
            .expect("read");
        assert_eq!(alice.len(), 1);
        assert_eq!(alice[0].day, format_day(20_000));
        assert_eq!(alice[0].backends["echo"], counts(3, 1, 8, 4));
        assert_eq!(alice[0].backends["llama"], counts(1, 0, 7, 9));
        let bob = read(&store, "bob", 20_000, 20_001, limit)
            .await
            .expect("read");
        assert_eq!(bob.len(), 1);
        assert_eq!(bob[0].day, format_day(20_001));
    }

    /// A store whose saves fail after the first `n`.
    struct FailingAfter(FakeStore, u32);

    impl SessionStore for FailingAfter {
        fn name(&self) -> &str {
            "failing"
        }
        fn shared(&self) -> bool {
            true
        }
        async fn load(&self, id: &str) -> Result<Option<crate::core::ports::Stored>, StoreError> {
            self.0.load(id).await
        }
        async fn save(
            &self,
            id: &str,
            expected: u64,
            owner: &str,
            data: String,
        ) -> Result<SaveOutcome, StoreError> {
            let saved = self.0.sessions.lock().expect("lock").len() as u32;
            if saved >= self.1 {
                self.0
                    .fail_saves
                    .store(1, std::sync::atomic::Ordering::SeqCst);
            }
            self.0.save(id, expected, owner, data).await
        }
        async fn delete(&self, id: &str) -> Result<bool, StoreError> {
            self.0.delete(id).await
        }
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_its_counts_for_the_next() {
        let store = FakeStore::default();
        let limit = Duration::from_secs(1);
        let pending = Pending::default();
        pending.record("alice", "echo", counts(2, 0, 4, 4), 0);
        pending.record("bob", "echo", counts(1, 0, 1, 1), 0);
        // bob's save fails (entries flush in order: alice, then bob).
        let alice_first = pending.flush(&FailingAfter(store.clone(), 1), limit).await;
        assert!(alice_first.is_err());
        pending.record("alice", "echo", counts(1, 0, 1, 1), 0);
        pending.flush(&store, limit).await.expect("flush");
        let alice = read(&store, "alice", 0, 0, limit).await.expect("read");
        assert_eq!(alice[0].backends["echo"], counts(3, 0, 5, 5));
        assert_eq!(alice[0].key, "alice");
        let bob = read(&store, "bob", 0, 0, limit).await.expect("read");
        assert_eq!(bob[0].backends["echo"], counts(1, 0, 1, 1));
    }
}
