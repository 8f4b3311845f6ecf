//! How fast a new plugin build serves after it lands, and what each reload
//! costs in memory.
//!
//! `cargo build --release && cargo run --release -p llm-host-bench --bin reload-bench [-- --reloads N --debounce-ms MS]`
//!
//! Starts the release host on the shipped echo and memory plugins, then N
//! times moves a new build of echo into the plugin directory (the operator's
//! safe drop-in: write a temporary file, then `mv`) and measures the time
//! from the rename to the new library being the active one (the reload
//! counter of `GET /v1/plugins` moving; the next turn then runs it). Each
//! build differs in its trailing bytes, so each is a distinct library that
//! the host stages and loads. RSS is read before the first and after the
//! last reload.

use std::time::{Duration, Instant};

use llm_host_bench::{get_json, percentile, Host};

fn main() {
    if let Err(err) = run() {
        eprintln!("reload bench: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut reloads = 20u32;
    let mut debounce_ms = 500u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--reloads" => reloads = value.parse().map_err(|e| format!("--reloads: {e}"))?,
            "--debounce-ms" => {
                debounce_ms = value.parse().map_err(|e| format!("--debounce-ms: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[plugins]\ndir = \"plugins\"\ndebounce_ms = {debounce_ms}\n\n\
         [defaults]\nmodel = \"echo\"\nstore = \"memory\"\n\n[models.echo]\nplugin = \"echo\"\n\n\
         [stores.memory]\nplugin = \"memory\"\n"
    );
    let echo = "libllm_plugin_echo.so";
    let host = Host::start(&config, &[echo, "libllm_plugin_memory.so"])?;
    let plugin_dir = host.dir.join("plugins");
    let original = std::fs::read(plugin_dir.join(echo)).map_err(|e| e.to_string())?;
    let rss_before = host.rss_kib()?;

    let mut latencies = Vec::new();
    for i in 1..=reloads {
        let mut build = original.clone();
        build.extend_from_slice(format!("\nllm-host reload bench build {i}\n").as_bytes());
        let tmp = plugin_dir.join(format!(".{echo}.tmp"));
        std::fs::write(&tmp, &build).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, plugin_dir.join(echo)).map_err(|e| e.to_string())?;
        let landed = Instant::now();
        loop {
            let status = get_json(host.addr, "/v1/plugins")?;
            if status["reloads"].as_u64() == Some(u64::from(i)) {
                break;
            }
            if let Some(error) = status["lastError"]["message"].as_str() {
                return Err(format!("reload {i} failed: {error}"));
            }
            if landed.elapsed() > Duration::from_secs(30) {
                return Err(format!("reload {i} did not happen within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        latencies.push(landed.elapsed().as_secs_f64() * 1000.0);
    }
    let rss_after = host.rss_kib()?;
    latencies.sort_by(f64::total_cmp);
    println!("llm-host reload bench: {reloads} reloads of echo, debounce_ms = {debounce_ms}");
    println!(
        "file landed -> new library serving: median {:.1} ms, min {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 50.0),
        latencies.first().copied().unwrap_or(f64::NAN),
        percentile(&latencies, 90.0),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "RSS: {} KiB before, {} KiB after: {:.0} KiB per reload",
        rss_before,
        rss_after,
        (rss_after as f64 - rss_before as f64) / f64::from(reloads)
    );
    Ok(())
}
