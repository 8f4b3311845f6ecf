//! The clients of the time-limited scenarios: each sends a prompt, reads its
//! turn to the `interaction.turn` end, and repeats, moving to a fresh session
//! every [`TURNS_PER_SESSION`] turns; and the idle connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use llm_host_bench::Host;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::measured::Measured;

/// Turns before a connection moves to a fresh session (and reconnects), so
/// that histories stay the size of real conversations.
const TURNS_PER_SESSION: usize = 32;

/// The paced scenario's pause between tokens (`delay_ms = 20`).
const PACING: Duration = Duration::from_millis(20);

/// Gaps between tokens are measured from this long after the start.
pub const GAP_WARMUP: Duration = Duration::from_secs(1);

/// A client's WebSocket.
pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens `count` sessions that stay idle, 256 handshakes at a time.
pub async fn open_idle(addr: SocketAddr, count: usize) -> Result<Vec<Socket>, String> {
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
/// echo into its plugin directory at half time. With `model`, the clients
/// connect with `?model=MODEL` (and their session ids name it, so that two
/// runs on one host do not resume each other's sessions).
pub async fn drive(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    gaps: bool,
    reload_host: Option<&Host>,
    model: Option<&str>,
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
        let model = model.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let gaps = gaps.then_some(steady);
            if gaps.is_some() {
                // Paced clients start spread over one token interval, as
                // people do not all press enter in the same millisecond;
                // otherwise 1,000 streams tick in lockstep for the whole run.
                let spread = PACING.as_micros() as u64 * c as u64 / connections as u64;
                tokio::time::sleep(Duration::from_micros(spread)).await;
            }
            client(addr, c, model.as_deref(), deadline, gaps, swap).await
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

/// One client. With `gaps`, it measures the gaps between deltas from that
/// instant on, and how late each delta comes after it was due (the prompt
/// sent plus one [`PACING`] per delta).
async fn client(
    addr: SocketAddr,
    index: usize,
    model: Option<&str>,
    deadline: Instant,
    gaps: Option<Instant>,
    swap: Arc<std::sync::Mutex<Option<(Instant, Instant)>>>,
) -> Measured {
    let mut measured = Measured::default();
    let mut session = 0usize;
    'sessions: while Instant::now() < deadline {
        session += 1;
        let url = match model {
            Some(model) => format!(
                "ws://{addr}/v1/ws?session=bench-{}-{model}-{index}-{session}&model={model}",
                std::process::id()
            ),
            None => format!(
                "ws://{addr}/v1/ws?session=bench-{}-{index}-{session}",
                std::process::id()
            ),
        };
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
            let mut turn_events = 0u32;
            let mut deltas = 0u32;
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let now = Instant::now();
                        measured.events += 1;
                        turn_events += 1;
                        if first.is_none() {
                            first = Some(now);
                            measured.first_ms.push((now - sent).as_secs_f64() * 1000.0);
                        }
                        let steady = gaps.is_some_and(|from| now >= from);
                        let delta = gaps.is_some() && text.contains("\"type\":\"delta\"");
                        if delta {
                            deltas += 1;
                        }
                        if steady && delta {
                            let due = sent + PACING * deltas;
                            measured.late_us.push(signed_us(now, due));
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
                            measured.event_us.push(ms * 1000.0 / f64::from(turn_events));
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

/// `at - from` in microseconds, negative if `at` is earlier.
fn signed_us(at: Instant, from: Instant) -> f64 {
    match at.checked_duration_since(from) {
        Some(after) => after.as_secs_f64() * 1e6,
        None => -(from - at).as_secs_f64() * 1e6,
    }
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
