//! The time-limited scenarios: throughput at 1/16/64 connections (on a
//! store, or with a reload in the middle), 1,000 paced streams, and 10,000
//! idle sessions. Each runs against the host, then the floor.

use std::time::Duration;

use llm_host_bench::{percentile, Host};

use crate::client::{drive, open_idle, GAP_WARMUP};
use crate::floor::{kill, start_floor};
use crate::{host_config, PLUGINS, TOKENS};

pub async fn throughput(
    name: &str,
    connections: usize,
    store: &str,
    duration: Duration,
    reload: bool,
) -> Result<(), String> {
    let settings = format!("{{ tokens = {TOKENS}, delay_ms = 0 }}");
    let host = Host::start(&host_config(&settings, store), PLUGINS)?;
    let mut host_side = drive(
        host.addr,
        connections,
        duration,
        false,
        reload.then_some(&host),
        None,
    )
    .await;
    host_side.peak_rss_kib = host.peak_rss_kib()?;
    drop(host);

    let (floor, addr) = start_floor(TOKENS, 0)?;
    let mut floor_side = drive(addr, connections, duration, false, None, None).await;
    floor_side.peak_rss_kib = kill(floor);

    host_side.finish();
    floor_side.finish();
    println!(
        "\n[{name}] {connections} connections, {TOKENS} tokens a turn, {}s",
        duration.as_secs()
    );
    println!("{}", host_side.line("host"));
    println!("{}", floor_side.line("floor"));
    println!(
        "ratio  events/s {:.2} of the floor; first event p50 {:.2}x, p99 {:.2}x the floor's",
        host_side.events_per_sec() / floor_side.events_per_sec(),
        percentile(&host_side.first_ms, 50.0) / percentile(&floor_side.first_ms, 50.0),
        percentile(&host_side.first_ms, 99.0) / percentile(&floor_side.first_ms, 99.0),
    );
    if reload {
        println!(
            "reload turn p99 during the swap {:.2} ms ({} turns) vs {:.2} ms overall; failed turns {}",
            percentile(&host_side.swap_turn_ms, 99.0),
            host_side.swap_turn_ms.len(),
            percentile(&host_side.turn_ms, 99.0),
            host_side.errors
        );
    }
    Ok(())
}

pub async fn paced(duration: Duration) -> Result<(), String> {
    let connections = 1000;
    let host = Host::start(&host_config("{ tokens = 50, delay_ms = 20 }", ""), PLUGINS)?;
    let mut host_side = drive(host.addr, connections, duration, true, None, None).await;
    host_side.peak_rss_kib = host.peak_rss_kib()?;
    drop(host);
    let (floor, addr) = start_floor(50, 20)?;
    let mut floor_side = drive(addr, connections, duration, true, None, None).await;
    floor_side.peak_rss_kib = kill(floor);
    host_side.finish();
    floor_side.finish();
    println!(
        "\n[paced] {connections} sessions streaming 50 tokens/s (delay 20 ms), {}s",
        duration.as_secs()
    );
    for (who, side) in [("host", &host_side), ("floor", &floor_side)] {
        println!("{}", side.line(who));
        println!(
            "{who:<6} gap between tokens p50 {:.2} ms, p99 {:.2} ms (pacing 20 ms), max {:.2} ms (after a {} s warm-up)",
            percentile(&side.gap_ms, 50.0),
            percentile(&side.gap_ms, 99.0),
            side.gap_ms.last().copied().unwrap_or(f64::NAN),
            GAP_WARMUP.as_secs()
        );
        println!(
            "{who:<6} gap between the server's timestamps (whole ms) p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(&side.stamped_gap_ms, 50.0),
            percentile(&side.stamped_gap_ms, 99.0),
            side.stamped_gap_ms.last().copied().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

pub async fn idle() -> Result<(), String> {
    let count = 10_000;
    let host = Host::start(&host_config("{ tokens = 4 }", ""), PLUGINS)?;
    let baseline = host.rss_kib()?;
    let sockets = open_idle(host.addr, count).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = host.rss_kib()?;
    let peak = host.peak_rss_kib()?;
    drop(sockets);
    drop(host);
    let (floor, addr) = start_floor(4, 0)?;
    let floor_base = llm_host_bench::rss_kib(floor.id())?;
    let sockets = open_idle(addr, count).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let floor_rss = llm_host_bench::rss_kib(floor.id())?;
    drop(sockets);
    kill(floor);
    println!("\n[idle] {count} connected sessions");
    println!(
        "host   RSS {} MiB with {count} sessions (started at {} MiB, peak {} MiB): {:.1} KiB per session",
        rss / 1024,
        baseline / 1024,
        peak / 1024,
        (rss - baseline) as f64 / count as f64
    );
    println!(
        "floor  RSS {} MiB with {count} connections (started at {} MiB): {:.1} KiB per connection",
        floor_rss / 1024,
        floor_base / 1024,
        (floor_rss.saturating_sub(floor_base)) as f64 / count as f64
    );
    Ok(())
}
