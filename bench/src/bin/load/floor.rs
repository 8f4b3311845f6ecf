//! The floor: a minimal tokio-tungstenite server sending the same frames as
//! the host (no plugins, no sessions, no history), run as a child process of
//! this binary (`load floor-server ADDR`).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::TOKENS;

/// Starts the floor server as a child process; answers its address.
pub fn start_floor(
    tokens: usize,
    delay_ms: u64,
) -> Result<(std::process::Child, SocketAddr), String> {
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

/// Kills the floor server; answers its peak RSS in KiB.
pub fn kill(mut child: std::process::Child) -> u64 {
    let peak = llm_host_bench::peak_rss_kib(child.id()).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    peak
}

/// The floor server's process: serves on `addr`, printing the address it
/// bound first.
pub fn floor_server(addr: &str) {
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
