//! The long-session scenarios: each connection on one session for a fixed
//! number of turns (16 × 1,000 on each store; one session of 10,000), never
//! stopped by time, with the host and the floor run alternately for a few
//! rounds. Events/s are reported over the whole sessions and per band of turn
//! indexes, beside the turn's latency and the host's store time per band.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_host_bench::Host;

use crate::floor::{kill, start_floor};
use crate::report;
use crate::session::{bands_for, session_client, Band, BandStats, Points};
use crate::store_metrics::{scrape, Snapshot};
use crate::{host_config, TOKENS};

/// What a long scenario runs.
#[derive(Debug, Clone)]
pub struct Long {
    /// The scenario's name, as given.
    pub name: String,
    /// `memory`, `sqlite`, `postgres` or `redis`.
    pub store: String,
    pub connections: usize,
    /// Turns of each session.
    pub turns: usize,
    /// Rounds of host and floor, alternately (the host first in odd rounds).
    pub rounds: usize,
    /// Runs the host only (for a profiler wrapped around it).
    pub host_only: bool,
}

impl Long {
    /// The scenario `name` (`long`, `long10k`, either with `-STORE`), with
    /// the command line's overrides; `None` for another name.
    pub fn named(name: &str, overrides: &Overrides) -> Option<Result<Long, String>> {
        let (base, store) = name.split_once('-').unwrap_or((name, "memory"));
        let (connections, turns) = match base {
            "long" => (16, 1000),
            "long10k" => (1, 10_000),
            _ => return None,
        };
        if !["memory", "sqlite", "postgres", "redis"].contains(&store) {
            return Some(Err(format!(
                "unknown store `{store}` in {name} (memory, sqlite, postgres, redis)"
            )));
        }
        Some(Ok(Long {
            name: name.to_owned(),
            store: store.to_owned(),
            connections: overrides.connections.unwrap_or(connections),
            turns: overrides.turns.unwrap_or(turns),
            rounds: overrides.rounds.unwrap_or(2).max(1),
            host_only: overrides.host_only,
        }))
    }
}

/// Command-line settings that replace a long scenario's own.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub connections: Option<usize>,
    pub turns: Option<usize>,
    pub rounds: Option<usize>,
    pub host_only: bool,
}

/// One side (host or floor) of a run, or of all rounds added up.
#[derive(Debug, Default)]
pub struct Side {
    pub events: u64,
    pub turns: u64,
    pub errors: u64,
    /// The sessions' time, from the moment every client was connected to the
    /// last turn's end, less the pauses at the band points.
    pub elapsed: Duration,
    /// One per band.
    pub bands: Vec<BandStats>,
    /// The host's metrics' difference across each band (empty for the floor).
    pub store: Vec<Snapshot>,
    pub peak_rss_kib: u64,
}

impl Side {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn add(&mut self, other: &Side) {
        self.events += other.events;
        self.turns += other.turns;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.peak_rss_kib = self.peak_rss_kib.max(other.peak_rss_kib);
        self.bands
            .resize_with(other.bands.len(), BandStats::default);
        for (band, more) in self.bands.iter_mut().zip(&other.bands) {
            band.merge(more);
        }
        self.store.resize_with(other.store.len(), Snapshot::default);
        for (store, more) in self.store.iter_mut().zip(&other.store) {
            store.add(more);
        }
    }
}

/// Runs the scenario and prints its report.
pub async fn run(long: &Long) -> Result<(), String> {
    let bands = bands_for(long.turns);
    report::header(long, &bands);
    let mut host_all = Side::default();
    let mut floor_all = Side::default();
    for round in 0..long.rounds {
        let host_first = round % 2 == 0;
        let mut host = None;
        let mut floor = None;
        for host_turn in [host_first, !host_first] {
            if host_turn {
                host = Some(host_side(long, round, &bands).await?);
            } else if !long.host_only {
                floor = Some(floor_side(long, round, &bands).await?);
            }
        }
        let host = host.unwrap_or_default();
        report::round(round + 1, &host, floor.as_ref());
        host_all.add(&host);
        if let Some(floor) = floor {
            floor_all.add(&floor);
        }
    }
    for band in host_all.bands.iter_mut().chain(&mut floor_all.bands) {
        band.finish();
    }
    let floor = (!long.host_only).then_some(&floor_all);
    report::totals(long, &bands, &host_all, floor);
    Ok(())
}

/// The plugins a long scenario's host needs.
fn plugins(store: &str) -> Vec<String> {
    let mut plugins = vec!["libllm_plugin_echo.so".to_owned()];
    plugins.push(format!("libllm_plugin_{store}.so"));
    plugins
}

async fn host_side(long: &Long, round: usize, bands: &[Band]) -> Result<Side, String> {
    let settings = format!("{{ tokens = {TOKENS}, delay_ms = 0 }}");
    let plugins = plugins(&long.store);
    let plugins: Vec<&str> = plugins.iter().map(String::as_str).collect();
    let host = Host::start(&host_config(&settings, &long.store), &plugins)?;
    let ids = session_ids(long, round);
    let mut side = drive(host.addr, &ids, long.turns, bands, true).await;
    side.peak_rss_kib = host.peak_rss_kib()?;
    if matches!(long.store.as_str(), "postgres" | "redis") {
        // Sessions of a store outside the host's directory are removed, so
        // that runs leave no megabytes of history behind.
        let addr = host.addr;
        tokio::task::spawn_blocking(move || {
            for id in ids {
                let _ = llm_host_bench::http(addr, "DELETE", &format!("/v1/sessions/{id}"));
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    host.stop();
    Ok(side)
}

async fn floor_side(long: &Long, round: usize, bands: &[Band]) -> Result<Side, String> {
    let (floor, addr) = start_floor(TOKENS, 0)?;
    let mut side = drive(addr, &session_ids(long, round), long.turns, bands, false).await;
    side.peak_rss_kib = kill(floor);
    Ok(side)
}

/// The sessions of one round: new ones in every round and every run.
fn session_ids(long: &Long, round: usize) -> Vec<String> {
    (0..long.connections)
        .map(|c| format!("long-{}-{round}-{c}", std::process::id()))
        .collect()
}

/// Runs one client per session for `turns` turns, holding them at every
/// band's start and end; with `metrics`, reads the server's `/metrics` there.
async fn drive(
    addr: SocketAddr,
    sessions: &[String],
    turns: usize,
    bands: &[Band],
    metrics: bool,
) -> Side {
    let points = Points::new(sessions.len());
    let shared_bands = Arc::new(bands.to_vec());
    let tasks: Vec<_> = sessions
        .iter()
        .map(|session| {
            tokio::spawn(session_client(
                addr,
                session.clone(),
                turns,
                shared_bands.clone(),
                points.clone(),
            ))
        })
        .collect();
    let read = || async move {
        if metrics {
            scrape(addr).await.ok()
        } else {
            None
        }
    };
    let mut side = Side::default();
    // Every client connected: the clock starts.
    points.hold(async {}).await;
    let started = Instant::now();
    let mut paused = Duration::ZERO;
    for _ in bands {
        let ((before, from), held) = points.hold(async { (read().await, Instant::now()) }).await;
        paused += held;
        let ((band_time, after), held) =
            points.hold(async { (from.elapsed(), read().await) }).await;
        paused += held;
        side.bands.push(BandStats {
            elapsed: band_time,
            ..BandStats::default()
        });
        if metrics {
            // An empty reading keeps the bands' places when one failed.
            side.store.push(match (before, after) {
                (Some(before), Some(after)) => after.minus(&before),
                _ => {
                    eprintln!("load: /metrics could not be read around a band");
                    Snapshot::default()
                }
            });
        }
    }
    points.hold(async {}).await;
    side.elapsed = started.elapsed().saturating_sub(paused);
    for task in tasks {
        match task.await {
            Ok(client) => {
                side.events += client.events;
                side.turns += client.turns;
                side.errors += client.errors;
                for (band, measured) in side.bands.iter_mut().zip(client.bands) {
                    let elapsed = band.elapsed;
                    band.merge(&measured);
                    band.elapsed = elapsed;
                }
            }
            Err(_) => side.errors += 1,
        }
    }
    side
}
