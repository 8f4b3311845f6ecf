//! The crash-isolation scenarios: `c16-isolated` (16 connections, 64 tokens a
//! turn, no delay) and `paced-isolated` (1,000 sessions at 50 tokens/s);
//! `isolated` runs both. One host serves echo twice: `bench` in its own
//! process and `isolated`, the same settings plus `isolation = { mode =
//! "process" }`, in a child process. The same clients drive each in turn
//! (`?model=`), then the floor, and the report sets the isolated path beside
//! the in-process one: events/s, time per event, first event and, paced, how
//! late each token comes. `--rounds N` repeats it on a fresh host (the two
//! backends' order swapped in even rounds) and prints the medians.

use std::time::Duration;

use llm_host_bench::{percentile, Host};

use crate::client::drive;
use crate::floor::{kill, start_floor};
use crate::measured::Measured;
use crate::{host_config, TOKENS};

/// The plugins the host is given.
const PLUGINS: &[&str] = &["libllm_plugin_echo.so", "libllm_plugin_memory.so"];

/// The isolated backend's name in the config (and in `?model=`).
const ISOLATED: &str = "isolated";

/// Turns the child may run at once: above the paced scenario's 1,000
/// connections (the default, 64, would refuse most of them).
const MAX_TURNS: usize = 1024;

/// Clock ticks a second in `/proc/PID/stat` (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

/// One of the isolated scenarios.
struct Setup {
    name: &'static str,
    connections: usize,
    tokens: usize,
    delay_ms: u64,
}

impl Setup {
    fn paced(&self) -> bool {
        self.delay_ms > 0
    }
}

/// The scenarios `name` stands for; `None` for another name.
pub fn named(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "isolated" => Some(&["c16-isolated", "paced-isolated"]),
        "c16-isolated" => Some(&["c16-isolated"]),
        "paced-isolated" => Some(&["paced-isolated"]),
        _ => None,
    }
}

/// Runs scenario `name` (`c16-isolated` or `paced-isolated`) for `rounds`
/// rounds of `duration` per side.
pub async fn run(name: &str, duration: Duration, rounds: usize) -> Result<(), String> {
    let setup = match name {
        "c16-isolated" => Setup {
            name: "c16-isolated",
            connections: 16,
            tokens: TOKENS,
            delay_ms: 0,
        },
        "paced-isolated" => Setup {
            name: "paced-isolated",
            connections: 1000,
            tokens: 50,
            delay_ms: 20,
        },
        other => return Err(format!("unknown scenario {other}")),
    };
    println!(
        "\n[{}] {} connections, {} tokens a turn, delay_ms {}, {} s a side, {rounds} round(s); \
         echo in the host's process (`bench`), in a child process (`{ISOLATED}`), the floor",
        setup.name,
        setup.connections,
        setup.tokens,
        setup.delay_ms,
        duration.as_secs()
    );
    let mut all = Vec::new();
    for round in 1..=rounds {
        let sides = one_round(&setup, duration, round).await?;
        print_round(&setup, round, &sides);
        all.push(sides);
    }
    print_medians(&setup, &all);
    Ok(())
}

/// What one side of a round measured, with the CPU it took.
struct Side {
    measured: Measured,
    /// CPU seconds of the server's process (the host, or the floor).
    server_cpu: f64,
    /// CPU seconds of the isolated backend's child.
    child_cpu: f64,
    /// CPU seconds of this generator.
    generator_cpu: f64,
    /// Peak RSS of the child, KiB (isolated side only).
    child_peak_kib: u64,
}

impl Side {
    /// CPU µs per event of the server (the host, or the floor), of the child
    /// and of the generator.
    fn cpu_per_event(&self) -> (f64, f64, f64) {
        let events = self.measured.events.max(1) as f64;
        (
            self.server_cpu * 1e6 / events,
            self.child_cpu * 1e6 / events,
            self.generator_cpu * 1e6 / events,
        )
    }
}

/// The three sides of a round: in-process, isolated, floor.
struct Round {
    in_process: Side,
    isolated: Side,
    floor: Side,
}

impl Round {
    /// In-process (0), isolated (1) or the floor (2).
    fn side(&self, index: usize) -> &Side {
        match index {
            0 => &self.in_process,
            1 => &self.isolated,
            _ => &self.floor,
        }
    }

    fn sides(&self) -> [(&'static str, &Side); 3] {
        [
            ("in-process", &self.in_process),
            ("isolated", &self.isolated),
            ("floor", &self.floor),
        ]
    }
}

fn config(setup: &Setup) -> String {
    let settings = format!(
        "{{ tokens = {}, delay_ms = {} }}",
        setup.tokens, setup.delay_ms
    );
    format!(
        "{}\n[models.{ISOLATED}]\nplugin = \"echo\"\nsettings = {settings}\n\
         isolation = {{ mode = \"process\", max_concurrent_turns = {MAX_TURNS} }}\n",
        host_config(&settings, "")
    )
}

async fn one_round(setup: &Setup, duration: Duration, round: usize) -> Result<Round, String> {
    let host = Host::start(&config(setup), PLUGINS)?;
    let status = llm_host_bench::get_json(host.addr, "/v1/plugins")?;
    let child = status["isolated"][ISOLATED]["pid"]
        .as_u64()
        .map(|pid| pid as u32)
        .ok_or_else(|| format!("no child pid for `{ISOLATED}` in /v1/plugins: {status}"))?;
    // In-process first in odd rounds, the isolated backend first in even ones.
    let order: [Option<&str>; 2] = if round % 2 == 1 {
        [None, Some(ISOLATED)]
    } else {
        [Some(ISOLATED), None]
    };
    let mut in_process = None;
    let mut isolated = None;
    for model in order {
        let side = measure(host.pid(), Some(child), async {
            drive(
                host.addr,
                setup.connections,
                duration,
                setup.paced(),
                None,
                model,
            )
            .await
        })
        .await?;
        match model {
            None => in_process = Some(side),
            Some(_) => isolated = Some(side),
        }
    }
    let host_peak = host.peak_rss_kib()?;
    let child_peak = llm_host_bench::peak_rss_kib(child).unwrap_or_default();
    let still = llm_host_bench::get_json(host.addr, "/v1/plugins")?;
    let (crashes, restarts) = (
        still["isolated"][ISOLATED]["crashes"].as_u64().unwrap_or(0),
        still["isolated"][ISOLATED]["restarts"]
            .as_u64()
            .unwrap_or(0),
    );
    if crashes > 0 || restarts > 0 {
        println!("round {round}: the child crashed {crashes} time(s), restarted {restarts}");
    }
    drop(host);
    let (mut in_process, mut isolated) = (
        in_process.ok_or("no in-process side")?,
        isolated.ok_or("no isolated side")?,
    );
    in_process.measured.peak_rss_kib = host_peak;
    isolated.measured.peak_rss_kib = host_peak;
    isolated.child_peak_kib = child_peak;

    let (floor, addr) = start_floor(setup.tokens, setup.delay_ms)?;
    let mut floor_side = measure(floor.id(), None, async {
        drive(addr, setup.connections, duration, setup.paced(), None, None).await
    })
    .await?;
    floor_side.measured.peak_rss_kib = kill(floor);
    for side in [&mut in_process, &mut isolated, &mut floor_side] {
        side.measured.finish();
    }
    Ok(Round {
        in_process,
        isolated,
        floor: floor_side,
    })
}

/// Runs `drive`, noting the CPU the server, the child and this process
/// took meanwhile.
async fn measure(
    server: u32,
    child: Option<u32>,
    drive: impl std::future::Future<Output = Measured>,
) -> Result<Side, String> {
    // A child that crashed and was restarted has another pid: NaN then.
    // A child that crashed and was restarted has another pid: NaN then.
    let child_cpu = || child.map_or(0.0, |pid| cpu_secs(&pid.to_string()).unwrap_or(f64::NAN));
    let before = (
        cpu_secs(&server.to_string())?,
        child_cpu(),
        cpu_secs("self")?,
    );
    let measured = drive.await;
    let after = (
        cpu_secs(&server.to_string())?,
        child_cpu(),
        cpu_secs("self")?,
    );
    Ok(Side {
        measured,
        server_cpu: after.0 - before.0,
        child_cpu: after.1 - before.1,
        generator_cpu: after.2 - before.2,
        child_peak_kib: 0,
    })
}

/// User plus system CPU seconds of process `pid` (`self` for this one), all
/// its threads.
fn cpu_secs(pid: &str) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command's closing parenthesis, from the third
    // (state): utime is the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (tick(11), tick(12)) {
        (Some(user), Some(system)) => Ok((user + system) / TICKS),
        _ => Err(format!("{path}: no utime and stime")),
    }
}

fn print_round(setup: &Setup, round: usize, sides: &Round) {
    println!("round {round}:");
    for (who, side) in sides.sides() {
        let m = &side.measured;
        println!("{}", m.line(who));
        let (server, child, generator) = side.cpu_per_event();
        let mut line = format!(
            "{:<6} per event p50 {:.1} µs, p99 {:.1} µs (turn time / its events); CPU per event: server {server:.2} µs",
            "",
            percentile(&m.event_us, 50.0),
            percentile(&m.event_us, 99.0),
        );
        if who == "isolated" {
            line.push_str(&format!(
                " + child {child:.2} µs, child peak RSS {} MiB",
                side.child_peak_kib / 1024
            ));
        }
        line.push_str(&format!(", generator {generator:.2} µs"));
        if setup.paced() {
            line.push_str(&format!(
                "; token late after due p50 {:.0} µs, p99 {:.0} µs; gap p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                percentile(&m.late_us, 50.0),
                percentile(&m.late_us, 99.0),
                percentile(&m.gap_ms, 50.0),
                percentile(&m.gap_ms, 99.0),
                m.gap_ms.last().copied().unwrap_or(f64::NAN),
            ));
        }
        println!("{line}");
    }
    let (i, p, f) = (
        &sides.isolated.measured,
        &sides.in_process.measured,
        &sides.floor.measured,
    );
    println!(
        "ratio  isolated / in-process events/s {:.2}; in-process / floor {:.2}, isolated / floor {:.2}; \
         isolated - in-process: per event p50 {:+.1} µs, first event p50 {:+.0} µs{}",
        i.events_per_sec() / p.events_per_sec(),
        p.events_per_sec() / f.events_per_sec(),
        i.events_per_sec() / f.events_per_sec(),
        percentile(&i.event_us, 50.0) - percentile(&p.event_us, 50.0),
        (percentile(&i.first_ms, 50.0) - percentile(&p.first_ms, 50.0)) * 1000.0,
        if setup.paced() {
            format!(
                ", token late p50 {:+.0} µs",
                percentile(&i.late_us, 50.0) - percentile(&p.late_us, 50.0)
            )
        } else {
            String::new()
        }
    );
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn print_medians(setup: &Setup, rounds: &[Round]) {
    let of = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "medians of {} round(s) [{}]: events/s | turn p50 / p99 ms | first event p50 / p99 ms | per event p50 / p99 µs{} | CPU µs per event: server (+ child), generator | errors",
        rounds.len(),
        setup.name,
        if setup.paced() {
            " | token late p50 / p99 µs | gap p99 ms"
        } else {
            ""
        }
    );
    for (index, who) in ["in-process", "isolated", "floor"].iter().enumerate() {
        let pct = |v: fn(&Measured) -> &Vec<f64>, p: f64| {
            of(&|r: &Round| percentile(v(&r.side(index).measured), p))
        };
        let paced = if setup.paced() {
            format!(
                " | {:.0} / {:.0} | {:.2}",
                pct(|m| &m.late_us, 50.0),
                pct(|m| &m.late_us, 99.0),
                pct(|m| &m.gap_ms, 99.0),
            )
        } else {
            String::new()
        };
        println!(
            "{who:<10} {:>10.0} | {:.2} / {:.2} | {:.3} / {:.3} | {:.1} / {:.1}{paced} | {:.2} (+ {:.2}), {:.2} | {}",
            of(&|r: &Round| r.side(index).measured.events_per_sec()),
            pct(|m| &m.turn_ms, 50.0),
            pct(|m| &m.turn_ms, 99.0),
            pct(|m| &m.first_ms, 50.0),
            pct(|m| &m.first_ms, 99.0),
            pct(|m| &m.event_us, 50.0),
            pct(|m| &m.event_us, 99.0),
            of(&|r: &Round| r.side(index).cpu_per_event().0),
            of(&|r: &Round| r.side(index).cpu_per_event().1),
            of(&|r: &Round| r.side(index).cpu_per_event().2),
            rounds
                .iter()
                .map(|r| r.side(index).measured.errors)
                .sum::<u64>(),
        );
    }
    let ratio = of(&|r: &Round| {
        r.isolated.measured.events_per_sec() / r.in_process.measured.events_per_sec()
    });
    let diff = |v: fn(&Measured) -> &Vec<f64>, p: f64| {
        of(&|r: &Round| {
            percentile(v(&r.isolated.measured), p) - percentile(v(&r.in_process.measured), p)
        })
    };
    let per_event = diff(|m| &m.event_us, 50.0);
    // Paced, the time per event is mostly the pacing's; what a token's trip
    // adds shows in how late it comes, printed beside the goal.
    let late = if setup.paced() {
        format!(
            "; token late after due p50 {:+.1} µs",
            diff(|m| &m.late_us, 50.0)
        )
    } else {
        String::new()
    };
    let met = |ok: bool| if ok { "met" } else { "not met" };
    println!(
        "isolated / in-process: events/s {ratio:.2} (goal at least 0.5: {}); per event p50 {per_event:+.1} µs \
         (goal at most +100 µs: {}), p99 {:+.1} µs{late}; first event p50 {:+.0} µs, p99 {:+.0} µs; \
         child's CPU {:.2} µs per event; in-process / floor {:.2}, isolated / floor {:.2}",
        met(ratio >= 0.5),
        met(per_event <= 100.0),
        diff(|m| &m.event_us, 99.0),
        diff(|m| &m.first_ms, 50.0) * 1000.0,
        diff(|m| &m.first_ms, 99.0) * 1000.0,
        of(&|r: &Round| r.isolated.cpu_per_event().1),
        of(&|r: &Round| r.in_process.measured.events_per_sec() / r.floor.measured.events_per_sec()),
        of(&|r: &Round| r.isolated.measured.events_per_sec() / r.floor.measured.events_per_sec()),
    );
}
