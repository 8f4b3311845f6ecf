//! Load benchmark: drives the real release host over real WebSockets, and a
//! minimal tokio-tungstenite server sending the same frames (no plugins, no
//! sessions) in the same run, so the host's cost shows as a ratio to that
//! floor.
//!
//! `cargo build --release && cargo run --release -p llm-host-bench --bin load [-- SCENARIO... --secs N]`
//!
//! Scenarios: `c1`, `c16`, `c64` (64 tokens a turn, no delay, on 1/16/64
//! connections), `paced` (1,000 sessions streaming 50 tokens/s), `idle`
//! (10,000 connected sessions), `reload` (c16 with a plugin reload in the
//! middle), `sqlite`, `postgres` (c16 on those stores). Default: all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use llm_host_bench::{percentile, Host};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Tokens in one benchmark turn.
const TOKENS: usize = 64;
/// Turns before a connection moves to a fresh session (and reconnects), so
/// that histories stay the size of real conversations.
const TURNS_PER_SESSION: usize = 32;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("floor-server") {
        floor_server(args.get(1).map(String::as_str).unwrap_or("127.0.0.1:0"));
        return;
    }
    let mut secs = 10u64;
    let mut scenarios = Vec::new();
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--secs" => secs = iter.next().and_then(|s| s.parse().ok()).unwrap_or(secs),
            other => scenarios.push(other.to_owned()),
        }
    }
    if scenarios.is_empty() {
        scenarios = [
            "c1", "c16", "c64", "paced", "idle", "reload", "sqlite", "postgres",
        ]
        .map(String::from)
        .to_vec();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("load: {err}");
            std::process::exit(1);
        }
    };
    let duration = Duration::from_secs(secs);
    for scenario in scenarios {
        if let Err(err) = runtime.block_on(run_scenario(&scenario, duration)) {
            eprintln!("load: {scenario}: {err}");
            std::process::exit(1);
        }
    }
}

fn host_config(model_settings: &str, store: &str) -> String {
    let (store_name, store_table) = match store {
        "sqlite" => (
            "sqlite",
            "[stores.sqlite]\nplugin = \"sqlite\"\nsettings = { path = \"sessions.db\" }\n"
                .to_owned(),
        ),
        "postgres" => {
            let url = std::env::var("LLM_HOST_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".to_owned());
            (
                "postgres",
                format!(
                    "[stores.postgres]\nplugin = \"postgres\"\nsettings = {{ url = \"{url}\", table = \"llm_host_bench_{}\" }}\n",
                    std::process::id()
                ),
            )
        }
        _ => (
            "memory",
            "[stores.memory]\nplugin = \"memory\"\n".to_owned(),
        ),
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_queued_prompts = 8\nidle_timeout_secs = 0\n\
         ping_interval_secs = 0\n\n[plugins]\ndir = \"plugins\"\ndebounce_ms = 200\n\n\
         [defaults]\nmodel = \"bench\"\nstore = \"{store_name}\"\n\n[models.bench]\nplugin = \"echo\"\n\
         settings = {model_settings}\n\n{store_table}"
    )
}

const PLUGINS: &[&str] = &[
    "libllm_plugin_echo.so",
    "libllm_plugin_memory.so",
    "libllm_plugin_sqlite.so",
    "libllm_plugin_postgres.so",
];

/// What one side of a scenario measured.
#[derive(Default)]
struct Measured {
    events: u64,
    turns: u64,
    errors: u64,
    elapsed: Duration,
    turn_ms: Vec<f64>,
    first_ms: Vec<f64>,
    gap_ms: Vec<f64>,
    /// Gaps between the server's own `timestamp`s of consecutive deltas
    /// (whole milliseconds): what the server did, without the client's delays.
    stamped_gap_ms: Vec<f64>,
    peak_rss_kib: u64,
    /// Turn latencies of turns that ended while a reload was under way.
    swap_turn_ms: Vec<f64>,
}

impl Measured {
    fn merge(&mut self, other: Measured) {
        self.events += other.events;
        self.turns += other.turns;
        self.errors += other.errors;
        self.turn_ms.extend(other.turn_ms);
        self.first_ms.extend(other.first_ms);
        self.gap_ms.extend(other.gap_ms);
        self.stamped_gap_ms.extend(other.stamped_gap_ms);
        self.swap_turn_ms.extend(other.swap_turn_ms);
    }

    fn finish(&mut self) {
        for v in [
            &mut self.turn_ms,
            &mut self.first_ms,
            &mut self.gap_ms,
            &mut self.stamped_gap_ms,
            &mut self.swap_turn_ms,
        ] {
            v.sort_by(f64::total_cmp);
        }
    }

    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn line(&self, who: &str) -> String {
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

async fn run_scenario(name: &str, duration: Duration) -> Result<(), String> {
    match name {
        "c1" => throughput(name, 1, "", duration, false).await,
        "c16" => throughput(name, 16, "", duration, false).await,
        "c64" => throughput(name, 64, "", duration, false).await,
        "reload" => throughput(name, 16, "", duration, true).await,
        "sqlite" | "postgres" => throughput(name, 16, name, duration, false).await,
        "paced" => paced(duration).await,
        "idle" => idle().await,
        other => Err(format!("unknown scenario {other}")),
    }
}

/// Starts the floor server as a child process; answers its address.
fn start_floor(tokens: usize, delay_ms: u64) -> Result<(std::process::Child, SocketAddr), String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args(["floor-server", "127.0.0.1:0"])
        .env("FLOOR_TOKENS", tokens.to_string())
        .env("FLOOR_DELAY_MS", delay_ms.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("floor server: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .parse()
        .map_err(|e| format!("floor address {line:?}: {e}"))?;
    Ok((child, addr))
}

fn kill(mut child: std::process::Child) -> u64 {
    let peak = llm_host_bench::peak_rss_kib(child.id()).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    peak
}

async fn throughput(
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
    )
    .await;
    host_side.peak_rss_kib = host.peak_rss_kib()?;
    drop(host);

    let (floor, addr) = start_floor(TOKENS, 0)?;
    let mut floor_side = drive(addr, connections, duration, false, None).await;
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

async fn paced(duration: Duration) -> Result<(), String> {
    let connections = 1000;
    let host = Host::start(&host_config("{ tokens = 50, delay_ms = 20 }", ""), PLUGINS)?;
    let mut host_side = drive(host.addr, connections, duration, true, None).await;
    host_side.peak_rss_kib = host.peak_rss_kib()?;
    drop(host);
    let (floor, addr) = start_floor(50, 20)?;
    let mut floor_side = drive(addr, connections, duration, true, None).await;
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

async fn idle() -> Result<(), String> {
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

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open_idle(addr: SocketAddr, count: usize) -> Result<Vec<Socket>, String> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let semaphore = semaphore.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.map_err(|e| e.to_string())?;
            let url = format!("ws://{addr}/v1/ws?session=idle-{i}");
            let (mut socket, _) = tokio_tungstenite::connect_async(url)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            match socket.next().await {
                Some(Ok(Message::Text(_))) => Ok(socket),
                other => Err(format!("no session frame: {other:?}")),
            }
        }));
    }
    let mut sockets = Vec::with_capacity(count);
    for task in tasks {
        sockets.push(task.await.map_err(|e| e.to_string())??);
    }
    Ok(sockets)
}

/// Runs `connections` clients for `duration`, each sending a prompt, reading
/// its turn to the end, and again. With `host` set, moves a new build of
/// echo into its plugin directory at half time.
async fn drive(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    gaps: bool,
    reload_host: Option<&Host>,
) -> Measured {
    let started = Instant::now();
    let deadline = started + duration;
    // Gaps count once every client is connected and streaming: the storm of
    // 1,000 handshakes at the start delays every stream alike.
    let steady = started + GAP_WARMUP;
    let swap = Arc::new(std::sync::Mutex::new(None::<(Instant, Instant)>));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let swap = swap.clone();
        tasks.push(tokio::spawn(async move {
            let gaps = gaps.then_some(steady);
            if gaps.is_some() {
                // Paced clients start spread over one token interval, as
                // people do not all press enter in the same millisecond;
                // otherwise 1,000 streams tick in lockstep for the whole run.
                let spread = PACING.as_micros() as u64 * c as u64 / connections as u64;
                tokio::time::sleep(Duration::from_micros(spread)).await;
            }
            client(addr, c, deadline, gaps, swap).await
        }));
    }
    if let Some(host) = reload_host {
        tokio::time::sleep(duration / 2).await;
        if let Ok(window) = reload_once(host).await {
            *swap.lock().unwrap_or_else(|p| p.into_inner()) = Some(window);
        }
    }
    let mut total = Measured::default();
    for task in tasks {
        match task.await {
            Ok(measured) => total.merge(measured),
            Err(_) => total.errors += 1,
        }
    }
    total.elapsed = started.elapsed().min(duration + Duration::from_secs(1));
    total
}

/// Moves a new build of echo in and waits for the reload; answers the
/// window (from the move to one debounce after the swap) in which turns count
/// as "during the swap".
async fn reload_once(host: &Host) -> Result<(Instant, Instant), String> {
    let dir = host.dir.join("plugins");
    let live = dir.join("libllm_plugin_echo.so");
    let mut bytes = std::fs::read(&live).map_err(|e| e.to_string())?;
    bytes.extend_from_slice(b"\nllm-host load bench reload\n");
    let tmp = dir.join(".echo.tmp");
    std::fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &live).map_err(|e| e.to_string())?;
    let moved = Instant::now();
    let addr = host.addr;
    loop {
        let status =
            tokio::task::spawn_blocking(move || llm_host_bench::get_json(addr, "/v1/plugins"))
                .await
                .map_err(|e| e.to_string())??;
        if status["reloads"].as_u64() == Some(1) {
            return Ok((moved, Instant::now() + Duration::from_millis(200)));
        }
        if moved.elapsed() > Duration::from_secs(10) {
            return Err("the reload did not happen".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The paced scenario's pause between tokens (`delay_ms = 20`).
const PACING: Duration = Duration::from_millis(20);

/// Gaps between tokens are measured from this long after the start.
const GAP_WARMUP: Duration = Duration::from_secs(1);

/// One client. With `gaps`, it measures the gaps between deltas from that
/// instant on.
async fn client(
    addr: SocketAddr,
    index: usize,
    deadline: Instant,
    gaps: Option<Instant>,
    swap: Arc<std::sync::Mutex<Option<(Instant, Instant)>>>,
) -> Measured {
    let mut measured = Measured::default();
    let mut session = 0usize;
    'sessions: while Instant::now() < deadline {
        session += 1;
        let url = format!(
            "ws://{addr}/v1/ws?session=bench-{}-{index}-{session}",
            std::process::id()
        );
        let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url).await else {
            measured.errors += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !matches!(socket.next().await, Some(Ok(Message::Text(_)))) {
            measured.errors += 1;
            continue;
        }
        for _ in 0..TURNS_PER_SESSION {
            if Instant::now() >= deadline {
                break 'sessions;
            }
            let sent = Instant::now();
            if socket
                .send(Message::text("benchmark prompt"))
                .await
                .is_err()
            {
                measured.errors += 1;
                continue 'sessions;
            }
            let mut first = None;
            let mut last_delta: Option<Instant> = None;
            let mut last_stamp: Option<u64> = None;
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let now = Instant::now();
                        measured.events += 1;
                        if first.is_none() {
                            first = Some(now);
                            measured.first_ms.push((now - sent).as_secs_f64() * 1000.0);
                        }
                        let steady = gaps.is_some_and(|from| now >= from);
                        if steady && text.contains("\"type\":\"delta\"") {
                            let stamp = timestamp(&text);
                            if let (Some(previous), Some(previous_stamp)) = (last_delta, last_stamp)
                            {
                                measured
                                    .gap_ms
                                    .push((now - previous).as_secs_f64() * 1000.0);
                                if let Some(stamp) = stamp {
                                    measured
                                        .stamped_gap_ms
                                        .push(stamp.saturating_sub(previous_stamp) as f64);
                                }
                            }
                            last_delta = Some(now);
                            last_stamp = stamp;
                        }
                        if text.contains("\"name\":\"interaction.turn\"") {
                            if !text.contains("\"status\":\"completed\"") {
                                measured.errors += 1;
                            }
                            let ms = (now - sent).as_secs_f64() * 1000.0;
                            measured.turn_ms.push(ms);
                            measured.turns += 1;
                            let window = *swap.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some((from, to)) = window {
                                if now >= from && now <= to {
                                    measured.swap_turn_ms.push(ms);
                                }
                            }
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => {
                        measured.errors += 1;
                        continue 'sessions;
                    }
                }
            }
        }
        let _ = socket.close(None).await;
    }
    measured
}

/// The `"timestamp":` number of a frame.
fn timestamp(frame: &str) -> Option<u64> {
    let key = "\"timestamp\":";
    let rest = &frame[frame.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

// ---------------------------------------------------------------------------
// The floor: a minimal tokio-tungstenite server sending the same frames.
// ---------------------------------------------------------------------------

fn floor_server(addr: &str) {
    let tokens: usize = std::env::var("FLOOR_TOKENS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(TOKENS);
    let delay = Duration::from_millis(
        std::env::var("FLOOR_DELAY_MS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
    );
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async move {
        let Ok(listener) = TcpListener::bind(addr).await else {
            return;
        };
        if let Ok(local) = listener.local_addr() {
            println!("{local}");
        }
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(floor_connection(stream, tokens, delay));
        }
    });
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn model_frame(event: &str, sequence: u64, turn: u64) -> String {
    format!(
        r#"{{"name":"interaction.model","data":{{"kind":"model","event":{event},"meta":{{"sequence":{sequence},"timestamp":{},"sourceId":"model.primary","interactionId":"turn-{turn}"}}}}}}"#,
        now_ms()
    )
}

async fn floor_connection(stream: TcpStream, tokens: usize, delay: Duration) {
    let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let open = format!(
        r#"{{"name":"interaction.session","data":{{"kind":"session","event":{{"type":"open","sessionId":"floor","resumed":false,"model":"floor","lastSequence":0}},"meta":{{"sequence":0,"timestamp":{},"sourceId":"host"}}}}}}"#,
        now_ms()
    );
    if socket.send(Message::text(open)).await.is_err() {
        return;
    }
    let mut sequence = 0u64;
    let mut turn = 0u64;
    while let Some(Ok(message)) = socket.next().await {
        if !message.is_text() {
            continue;
        }
        // Paced tokens are due `delay` apart by the clock, as the host's echo
        // paces them, so that timer rounding does not add up.
        let mut due = tokio::time::Instant::now();
        turn += 1;
        sequence += 1;
        let _ = socket
            .feed(Message::text(model_frame(
                r#"{"type":"start","modelId":"echo"}"#,
                sequence,
                turn,
            )))
            .await;
        for i in 0..tokens {
            sequence += 1;
            let token = if i == 0 {
                "token0".to_owned()
            } else {
                format!(" token{i}")
            };
            let frame = model_frame(
                &format!(r#"{{"type":"delta","text":"{token}"}}"#),
                sequence,
                turn,
            );
            if delay.is_zero() {
                let _ = socket.feed(Message::text(frame)).await;
            } else {
                due += delay;
                tokio::time::sleep_until(due).await;
                let _ = socket.send(Message::text(frame)).await;
            }
        }
        sequence += 1;
        let usage = format!(
            r#"{{"type":"usage","usage":{{"inputTokens":2,"outputTokens":{tokens},"totalTokens":{}}}}}"#,
            tokens + 2
        );
        let _ = socket
            .feed(Message::text(model_frame(&usage, sequence, turn)))
            .await;
        sequence += 1;
        let _ = socket
            .feed(Message::text(model_frame(
                r#"{"type":"end","finishReason":"stop"}"#,
                sequence,
                turn,
            )))
            .await;
        sequence += 1;
        let end = format!(
            r#"{{"name":"interaction.turn","data":{{"kind":"turn","event":{{"type":"end","status":"completed","interactionId":"turn-{turn}"}},"meta":{{"sequence":{sequence},"timestamp":{},"sourceId":"host","interactionId":"turn-{turn}"}}}}}}"#,
            now_ms()
        );
        if socket.send(Message::text(end)).await.is_err() {
            return;
        }
    }
}
