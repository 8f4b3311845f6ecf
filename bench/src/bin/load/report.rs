//! The long scenarios' printed report: a line per round, then the totals and
//! one table per band of turns (rates, latencies, the host's store time).

use llm_host_bench::percentile;

use crate::long::{Long, Side};
use crate::session::{Band, BandStats};
use crate::store_metrics::Histogram;
use crate::TOKENS;

pub fn header(long: &Long, bands: &[Band]) {
    let bands: Vec<String> = bands.iter().map(band_name).collect();
    println!(
        "\n[{}] {} connection(s), each on one session of {} turns, {TOKENS} tokens a turn (echo, no delay), {} store; {} round(s){}; bands of turns {}",
        long.name,
        long.connections,
        long.turns,
        long.store,
        long.rounds,
        if long.host_only {
            ", the host only"
        } else {
            ", host and floor alternately"
        },
        bands.join(", ")
    );
}

/// A share of the floor: two decimals, three below 0.1.
fn share(ratio: f64) -> String {
    if ratio < 0.1 {
        format!("{ratio:.3}")
    } else {
        format!("{ratio:.2}")
    }
}

fn band_name(band: &Band) -> String {
    format!("{}-{}", band.first, band.last)
}

pub fn round(round: usize, host: &Side, floor: Option<&Side>) {
    let side = |side: &Side| {
        format!(
            "{:>9.0} ev/s in {:>6.2} s, errors {}, peak RSS {} MiB",
            side.events_per_sec(),
            side.elapsed.as_secs_f64(),
            side.errors,
            side.peak_rss_kib / 1024
        )
    };
    match floor {
        Some(floor) => println!(
            "round {round}: host {} | floor {} | ratio {}",
            side(host),
            side(floor),
            share(host.events_per_sec() / floor.events_per_sec())
        ),
        None => println!("round {round}: host {}", side(host)),
    }
}

pub fn totals(long: &Long, bands: &[Band], host: &Side, floor: Option<&Side>) {
    let ratio = |h: f64, f: Option<f64>| f.map_or("-".to_owned(), |f| share(h / f));
    println!(
        "all rounds: host {:.0} ev/s ({} turns, {} errors, peak RSS {} MiB); floor {}; ratio {}",
        host.events_per_sec(),
        host.turns,
        host.errors,
        host.peak_rss_kib / 1024,
        floor.map_or("-".to_owned(), |f| format!(
            "{:.0} ev/s ({} turns, {} errors, peak RSS {} MiB)",
            f.events_per_sec(),
            f.turns,
            f.errors,
            f.peak_rss_kib / 1024
        )),
        ratio(host.events_per_sec(), floor.map(Side::events_per_sec)),
    );
    println!("turns         host ev/s  floor ev/s  ratio  | ms, p50 / p99 (the floor's):  turn (prompt to turn end)  |  first frame  |  model's end to turn end");
    let empty = BandStats::default();
    for (i, band) in bands.iter().enumerate() {
        let h = host.bands.get(i).unwrap_or(&empty);
        let f = floor.and_then(|f| f.bands.get(i));
        let pair = |h: &[f64], f: Option<&[f64]>| {
            format!(
                "{:.2} / {:.2} ({})",
                percentile(h, 50.0),
                percentile(h, 99.0),
                f.map_or("-".to_owned(), |f| format!(
                    "{:.2} / {:.2}",
                    percentile(f, 50.0),
                    percentile(f, 99.0)
                ))
            )
        };
        println!(
            "{:<12} {:>10.0} {:>11} {:>6}  | {}  |  {}  |  {}{}",
            band_name(band),
            h.events_per_sec(),
            f.map_or("-".to_owned(), |f| format!("{:.0}", f.events_per_sec())),
            ratio(h.events_per_sec(), f.map(BandStats::events_per_sec)),
            pair(&h.turn_ms, f.map(|f| f.turn_ms.as_slice())),
            pair(&h.first_ms, f.map(|f| f.first_ms.as_slice())),
            pair(&h.tail_ms, f.map(|f| f.tail_ms.as_slice())),
            if h.errors > 0 {
                format!("  errors {}", h.errors)
            } else {
                String::new()
            }
        );
    }
    store_table(bands, host);
    println!(
        "(long: {} round(s) pooled; ev/s of a band: its events over the time from its release to its last turn's end)",
        long.rounds
    );
}

/// The host's store calls per band, from its `/metrics` read around each band.
fn store_table(bands: &[Band], host: &Side) {
    if host.store.is_empty() {
        println!("(no store metrics: /metrics could not be read)");
        return;
    }
    let ops: Vec<&String> = host
        .store
        .iter()
        .flat_map(|s| s.store.iter())
        .filter(|(_, h)| h.count > 0.0)
        .map(|(op, _)| op)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!(
        "host's store calls per turn, from /metrics around each band: op: calls a turn, ms a turn (exact, from sums), p50 / p99 of a call in ms (histogram buckets, bounds only); host turn mean ms"
    );
    for (i, band) in bands.iter().enumerate() {
        let Some(snapshot) = host.store.get(i) else {
            continue;
        };
        let turns = host.bands.get(i).map_or(0, |b| b.turns).max(1) as f64;
        let mut line = format!("{:<12}", band_name(band));
        for op in &ops {
            let h = snapshot.store.get(*op).cloned().unwrap_or_default();
            line.push_str(&format!(
                "  {op}: {:.2}, {:.3} ms, {} / {}",
                h.count / turns,
                h.sum * 1000.0 / turns,
                bucket(&h, 0.5),
                bucket(&h, 0.99)
            ));
        }
        line.push_str(&format!(
            "  | all ops {:.3} ms a turn | host turn mean {:.3} ms",
            snapshot.store_seconds() * 1000.0 / turns,
            if snapshot.turn.count > 0.0 {
                snapshot.turn.sum * 1000.0 / snapshot.turn.count
            } else {
                f64::NAN
            }
        ));
        println!("{line}");
    }
}

/// The bucket of quantile `q` in milliseconds, as `<0.1`, `0.8-1.6` or `>X`.
fn bucket(h: &Histogram, q: f64) -> String {
    match h.quantile_bucket(q) {
        None => "-".to_owned(),
        Some((0.0, upper)) => format!("<{}", ms(upper)),
        Some((lower, upper)) if upper.is_infinite() => format!(">{}", ms(lower)),
        Some((lower, upper)) => format!("{}-{}", ms(lower), ms(upper)),
    }
}

/// Seconds as milliseconds, without trailing zeros (bucket bounds: 0.1, 0.2,
/// 0.4, ..., 1.6, 3.2).
fn ms(seconds: f64) -> String {
    let text = format!("{:.4}", seconds * 1000.0);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}
