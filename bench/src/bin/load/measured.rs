//! What one side (host or floor) of a time-limited scenario measured, and
//! its one-line summary.

use std::time::Duration;

use llm_host_bench::percentile;

/// What one side of a scenario measured.
#[derive(Default)]
pub struct Measured {
    pub events: u64,
    pub turns: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub turn_ms: Vec<f64>,
    pub first_ms: Vec<f64>,
    pub gap_ms: Vec<f64>,
    /// Gaps between the server's own `timestamp`s of consecutive deltas
    /// (whole milliseconds): what the server did, without the client's delays.
    pub stamped_gap_ms: Vec<f64>,
    pub peak_rss_kib: u64,
    /// Turn latencies of turns that ended while a reload was under way.
    pub swap_turn_ms: Vec<f64>,
    /// Each turn's time per event: its latency over its events, in µs.
    pub event_us: Vec<f64>,
    /// Paced runs: how late each delta came after it was due (the prompt
    /// sent plus one pacing interval per delta), in µs.
    pub late_us: Vec<f64>,
}

impl Measured {
    pub fn merge(&mut self, other: Measured) {
        self.events += other.events;
        self.turns += other.turns;
        self.errors += other.errors;
        self.turn_ms.extend(other.turn_ms);
        self.first_ms.extend(other.first_ms);
        self.gap_ms.extend(other.gap_ms);
        self.stamped_gap_ms.extend(other.stamped_gap_ms);
        self.swap_turn_ms.extend(other.swap_turn_ms);
        self.event_us.extend(other.event_us);
        self.late_us.extend(other.late_us);
    }

    pub fn finish(&mut self) {
        for v in [
            &mut self.turn_ms,
            &mut self.first_ms,
            &mut self.gap_ms,
            &mut self.stamped_gap_ms,
            &mut self.swap_turn_ms,
            &mut self.event_us,
            &mut self.late_us,
        ] {
            v.sort_by(f64::total_cmp);
        }
    }

    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub fn line(&self, who: &str) -> String {
        format!(
            "{who:<6} {:>10.0} ev/s {:>8.0} turns/s  turn p50 {:>7.2} p99 {:>7.2} ms  first p50 {:>6.2} p99 {:>6.2} ms  errors {}  peak RSS {} MiB",
            self.events_per_sec(),
            self.turns as f64 / self.elapsed.as_secs_f64(),
            percentile(&self.turn_ms, 50.0),
            percentile(&self.turn_ms, 99.0),
            percentile(&self.first_ms, 50.0),
            percentile(&self.first_ms, 99.0),
            self.errors,
            self.peak_rss_kib / 1024,
        )
    }
}
