//! The host's store-call and turn histograms, read from its Prometheus
//! `/metrics` endpoint, so that what a band of turns cost in the store is
//! the difference of two readings taken around it.
//!
//! The histograms' buckets double from 0.1 ms (0.1, 0.2, 0.4, ... ms), so a
//! quantile read from them is only known to within a bucket: it is reported
//! as that bucket's bounds, never as a made-up point inside it. Sums and
//! counts are exact.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// One Prometheus histogram: count, sum (seconds), cumulative buckets.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Histogram {
    pub count: f64,
    pub sum: f64,
    /// `(le, cumulative count)`, ascending by `le` (seconds).
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// `self - before`, bucket by bucket.
    pub fn minus(&self, before: &Histogram) -> Histogram {
        Histogram {
            count: self.count - before.count,
            sum: self.sum - before.sum,
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let earlier = before
                        .buckets
                        .iter()
                        .find(|(b, _)| *b == le)
                        .map_or(0.0, |(_, n)| *n);
                    (le, n - earlier)
                })
                .collect(),
        }
    }

    /// Adds `other`'s counts (same buckets) to this one's.
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            *self = other.clone();
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        for (le, n) in &mut self.buckets {
            if let Some((_, more)) = other.buckets.iter().find(|(b, _)| b == le) {
                *n += more;
            }
        }
    }

    /// The bucket holding the `q` quantile (0..1): its lower and upper
    /// bounds in seconds (the upper infinite past the last bucket).
    pub fn quantile_bucket(&self, q: f64) -> Option<(f64, f64)> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut lower = 0.0;
        for &(le, n) in &self.buckets {
            if n >= rank {
                return Some((lower, le));
            }
            lower = le;
        }
        Some((lower, f64::INFINITY))
    }
}

/// The histograms of one reading.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// `llm_host_store_operation_seconds`, by `op`.
    pub store: BTreeMap<String, Histogram>,
    /// `llm_host_turn_duration_seconds`: a turn from its start (the prompt
    /// taken from the queue) to its end frame, as the host times it.
    pub turn: Histogram,
}

impl Snapshot {
    /// `self - before`, histogram by histogram.
    pub fn minus(&self, before: &Snapshot) -> Snapshot {
        let empty = Histogram::default();
        Snapshot {
            store: self
                .store
                .iter()
                .map(|(op, h)| (op.clone(), h.minus(before.store.get(op).unwrap_or(&empty))))
                .collect(),
            turn: self.turn.minus(&before.turn),
        }
    }

    /// Adds `other`'s counts to this one's.
    pub fn add(&mut self, other: &Snapshot) {
        for (op, h) in &other.store {
            self.store.entry(op.clone()).or_default().add(h);
        }
        self.turn.add(&other.turn);
    }

    /// Seconds spent in store calls, all operations.
    pub fn store_seconds(&self) -> f64 {
        self.store.values().map(|h| h.sum).sum()
    }
}

const STORE: &str = "llm_host_store_operation_seconds";
const TURN: &str = "llm_host_turn_duration_seconds";

/// Reads the host's `/metrics` (a blocking HTTP request, on the blocking pool).
pub async fn scrape(addr: SocketAddr) -> Result<Snapshot, String> {
    let (status, body) =
        tokio::task::spawn_blocking(move || llm_host_bench::http(addr, "GET", "/metrics"))
            .await
            .map_err(|e| e.to_string())??;
    if status != 200 {
        return Err(format!("GET /metrics: {status}"));
    }
    Ok(parse(&body))
}

/// Parses the two histograms out of Prometheus text.
pub fn parse(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let histogram = if let Some(part) = name.strip_prefix(STORE) {
            let Some(op) = label(labels, "op") else {
                continue;
            };
            (part, snapshot.store.entry(op.to_owned()).or_default())
        } else if let Some(part) = name.strip_prefix(TURN) {
            (part, &mut snapshot.turn)
        } else {
            continue;
        };
        match histogram {
            ("_count", h) => h.count = value,
            ("_sum", h) => h.sum = value,
            ("_bucket", h) => {
                let le = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                h.buckets.push((le, value));
            }
            _ => {}
        }
    }
    for h in snapshot.store.values_mut().chain([&mut snapshot.turn]) {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    snapshot
}

/// The value of label `key` in `a="x",b="y"}`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels
        .match_indices(&format!("{key}=\""))
        .find(|(i, _)| *i == 0 || labels[..*i].ends_with(','))?
        .0
        + key.len()
        + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE llm_host_store_operation_seconds histogram\n\
        llm_host_store_operation_seconds_sum{op=\"save\"} 0.5\n\
        llm_host_store_operation_seconds_count{op=\"save\"} 100\n\
        llm_host_store_operation_seconds_bucket{le=\"0.0001\",op=\"save\"} 10\n\
        llm_host_store_operation_seconds_bucket{le=\"0.0002\",op=\"save\"} 98\n\
        llm_host_store_operation_seconds_bucket{le=\"0.0004\",op=\"save\"} 100\n\
        llm_host_store_operation_seconds_bucket{le=\"+Inf\",op=\"save\"} 100\n\
        llm_host_turn_duration_seconds_sum 2.0\n\
        llm_host_turn_duration_seconds_count 50\n\
        llm_host_turns_total{status=\"completed\"} 50\n";

    #[test]
    fn reads_the_store_and_turn_histograms() {
        let s = parse(TEXT);
        let save = &s.store["save"];
        assert_eq!((save.count, save.sum), (100.0, 0.5));
        assert_eq!(save.buckets.len(), 4);
        assert_eq!(save.quantile_bucket(0.5), Some((0.0001, 0.0002)));
        assert_eq!(save.quantile_bucket(0.99), Some((0.0002, 0.0004)));
        assert_eq!((s.turn.count, s.turn.sum), (50.0, 2.0));
    }

    #[test]
    fn a_difference_is_what_happened_between_readings() {
        let before = parse(TEXT);
        let after = parse(&TEXT.replace("} 100\n", "} 150\n"));
        let delta = after.minus(&before);
        let save = &delta.store["save"];
        assert_eq!(save.count, 50.0);
        assert_eq!(save.quantile_bucket(0.99), Some((0.0002, 0.0004)));
        assert_eq!(delta.turn.count, 0.0);
    }
}
