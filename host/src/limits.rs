//! Limits that protect the host: a cap on connections and a per-key rate of
//! turns.

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
    fn each_key_has_its_own_allowance() {
        let rate = TurnRate::default();
        assert!((0..3).all(|_| rate.allow("a", 3)));
        assert!(!rate.allow("a", 3));
        assert!(rate.allow("b", 3));
        assert!(rate.allow("a", 0));
    }
}
