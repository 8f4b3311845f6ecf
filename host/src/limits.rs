//! Limits that protect the host: a cap on connections, counts by name
//! (connections not yet upgraded per address, connections and queued prompts
//! per key), and a per-key rate of turns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::metrics::metrics;

/// Counts open WebSocket connections against `server.max_connections`.
#[derive(Default)]
pub struct ConnectionSlots {
    open: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

/// One connection's place; freed when dropped.
pub struct Slot {
    open: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl ConnectionSlots {
    /// A place for one more connection, unless `max` are open.
    pub fn try_acquire(&self, max: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        metrics().connections.inc();
        metrics().connections_total.inc();
        Some(Slot {
            open: self.open.clone(),
            drained: self.drained.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Waits until no connection is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics().connections.dec();
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }
}

/// Counts held by name (an address, a key id), each name up to its own cap
/// and all of them together up to another. A count is held by a [`Held`]
/// and given back when that is dropped.
#[derive(Default)]
pub struct Tally {
    inner: Arc<TallyInner>,
}

#[derive(Default)]
struct TallyInner {
    by_name: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
}

/// One count of a [`Tally`]; given back when dropped.
pub struct Held {
    inner: Arc<TallyInner>,
    name: String,
}

impl Tally {
    /// Takes one count for `name`, unless `name` holds `per_name` already
    /// or all names together hold `total`.
    pub fn try_take(&self, name: &str, per_name: usize, total: usize) -> Option<Held> {
        let mut by_name = self.inner.lock();
        if self.inner.total.load(Ordering::Acquire) >= total {
            return None;
        }
        let count = by_name.entry(name.to_owned()).or_insert(0);
        if *count >= per_name {
            return None;
        }
        *count += 1;
        self.inner.total.fetch_add(1, Ordering::AcqRel);
        Some(Held {
            inner: self.inner.clone(),
            name: name.to_owned(),
        })
    }

    /// Counts held by `name` now.
    #[cfg(test)]
    pub fn held(&self, name: &str) -> usize {
        self.inner.lock().get(name).copied().unwrap_or(0)
    }

    /// Counts held by every name together.
    #[cfg(test)]
    pub fn total(&self) -> usize {
        self.inner.total.load(Ordering::Acquire)
    }
}

impl TallyInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Counts change whole under the lock; a poisoned map is consistent.
        self.by_name.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut by_name = self.inner.lock();
        if let Some(count) = by_name.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                by_name.remove(&self.name);
            }
        }
        self.inner.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Turns per minute per API key, as token buckets: a key may burst up to its
/// per-minute allowance, which refills continuously.
#[derive(Default)]
pub struct TurnRate {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl TurnRate {
    /// Takes one turn from `key`'s allowance of `per_minute` (0: unlimited);
    /// answers whether it was there.
    pub fn allow(&self, key: &str, per_minute: u32) -> bool {
        if per_minute == 0 {
            return true;
        }
        let capacity = f64::from(per_minute);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, updated) = buckets.entry(key.to_owned()).or_insert((capacity, now));
        let refill = now.duration_since(*updated).as_secs_f64() * capacity / 60.0;
        *tokens = (*tokens + refill).min(capacity);
        *updated = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_connections_and_come_back() {
        let slots = ConnectionSlots::default();
        let a = slots.try_acquire(2).expect("first");
        let _b = slots.try_acquire(2).expect("second");
        assert!(slots.try_acquire(2).is_none());
        drop(a);
        assert_eq!(slots.open(), 1);
        assert!(slots.try_acquire(2).is_some());
    }

    #[test]
    fn a_tally_caps_each_name_and_the_total_and_forgets_names_it_no_longer_holds() {
        let tally = Tally::default();
        let a1 = tally.try_take("a", 2, 3).expect("a1");
        let _a2 = tally.try_take("a", 2, 3).expect("a2");
        assert!(tally.try_take("a", 2, 3).is_none(), "per name");
        let b1 = tally.try_take("b", 2, 3).expect("b1");
        assert!(tally.try_take("c", 2, 3).is_none(), "total");
        drop(b1);
        assert_eq!(tally.held("b"), 0);
        assert!(tally.inner.lock().get("b").is_none());
        drop(a1);
        assert_eq!((tally.held("a"), tally.total()), (1, 1));
        assert!(tally.try_take("c", 2, 3).is_some());
    }

    #[test]
    fn each_key_has_its_own_allowance() {
        let rate = TurnRate::default();
        assert!((0..3).all(|_| rate.allow("a", 3)));
        assert!(!rate.allow("a", 3));
        assert!(rate.allow("b", 3));
        assert!(rate.allow("a", 0));
    }
}
