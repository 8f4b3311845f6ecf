//! A fair counting semaphore: at most `max` turns generate at once, and the
//! others are let in in the order they arrived.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How often a waiting turn checks whether it was cancelled.
const POLL: Duration = Duration::from_millis(20);

/// Generation slots of one adapter.
pub struct Slots {
    max: usize,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Default)]
struct State {
    /// The ticket the next arrival gets.
    next_ticket: u64,
    /// The ticket whose turn it is to enter next.
    next_in: u64,
    /// Turns holding a slot.
    running: usize,
    /// Tickets of turns that gave up waiting, not yet reached by `next_in`.
    abandoned: BTreeSet<u64>,
}

impl State {
    /// Moves `next_in` past the current ticket and any abandoned ones after it.
    fn advance(&mut self) {
        self.next_in += 1;
        while self.abandoned.remove(&self.next_in) {
            self.next_in += 1;
        }
    }
}

/// A held slot; dropping it frees the slot.
pub struct Slot<'a> {
    slots: &'a Slots,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.running = state.running.saturating_sub(1);
        drop(state);
        self.slots.freed.notify_all();
    }
}

impl Slots {
    /// `max` slots (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state
        // is still consistent (every change is a single step).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot, in arrival order. `cancelled` is asked every few
    /// milliseconds while waiting; when it answers true, gives up and answers
    /// `None` (the turns behind move up).
    pub fn acquire(&self, cancelled: impl Fn() -> bool) -> Option<Slot<'_>> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        loop {
            if state.next_in == ticket && state.running < self.max {
                state.running += 1;
                state.advance();
                drop(state);
                // The next in line may fit too (max > 1).
                self.freed.notify_all();
                return Some(Slot { slots: self });
            }
            let (waited, _) = self
                .freed
                .wait_timeout(state, POLL)
                .unwrap_or_else(PoisonError::into_inner);
            drop(waited);
            // Ask without holding the lock: the host's answer may take a moment.
            if cancelled() {
                let mut state = self.lock();
                if state.next_in == ticket {
                    state.advance();
                } else {
                    state.abandoned.insert(ticket);
                }
                drop(state);
                self.freed.notify_all();
                return None;
            }
            state = self.lock();
        }
    }

    /// Whether a turn arriving now would have to wait (racy: for logs).
    pub fn would_wait(&self) -> bool {
        let state = self.lock();
        state.running >= self.max || state.next_in != state.next_ticket
    }

    /// Turns waiting for a slot.
    #[cfg(test)]
    pub fn waiting(&self) -> u64 {
        let state = self.lock();
        (state.next_ticket - state.next_in).saturating_sub(state.abandoned.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;
    use std::time::Instant;

    #[test]
    fn turns_enter_in_arrival_order() {
        let slots = Arc::new(Slots::new(1));
        let first = slots.acquire(|| false).expect("free slot");
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        for i in 0..5 {
            let shared = Arc::clone(&slots);
            let tx = tx.clone();
            handles.push(thread::spawn(move || {
                let _slot = shared.acquire(|| false).expect("a slot in the end");
                tx.send(i).expect("receiver alive");
                thread::sleep(Duration::from_millis(5));
            }));
            // Make the arrival order certain.
            while slots.waiting() < i + 1 {
                thread::sleep(Duration::from_millis(1));
            }
        }
        drop(first);
        for handle in handles {
            handle.join().expect("no panic");
        }
        let order: Vec<u64> = rx.try_iter().collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_cancelled_waiter_leaves_promptly_and_the_next_moves_up() {
        let slots = Arc::new(Slots::new(1));
        let first = slots.acquire(|| false).expect("free slot");
        let cancel = Arc::new(AtomicBool::new(false));
        let quitter = {
            let slots = Arc::clone(&slots);
            let cancel = Arc::clone(&cancel);
            thread::spawn(move || slots.acquire(|| cancel.load(Ordering::SeqCst)).is_some())
        };
        while slots.waiting() < 1 {
            thread::sleep(Duration::from_millis(1));
        }
        let patient = {
            let slots = Arc::clone(&slots);
            thread::spawn(move || slots.acquire(|| false).is_some())
        };
        while slots.waiting() < 2 {
            thread::sleep(Duration::from_millis(1));
        }
        let cancelled_at = Instant::now();
        cancel.store(true, Ordering::SeqCst);
        assert!(
            !quitter.join().expect("no panic"),
            "cancelled waiter got a slot"
        );
        assert!(cancelled_at.elapsed() < Duration::from_secs(1));
        assert_eq!(slots.waiting(), 1);
        drop(first);
        assert!(
            patient.join().expect("no panic"),
            "the next in line entered"
        );
        assert!(
            slots.acquire(|| false).is_some(),
            "the slot was freed again"
        );
    }

    #[test]
    fn several_slots_run_side_by_side() {
        let slots = Slots::new(2);
        let a = slots.acquire(|| false);
        let b = slots.acquire(|| false);
        assert!(a.is_some() && b.is_some());
        assert!(
            slots.acquire(|| true).is_none(),
            "a third waits (and gives up)"
        );
        drop(a);
        assert!(slots.acquire(|| true).is_some());
    }
}
