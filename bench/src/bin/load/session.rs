//! The long-session client: one connection on one session for a fixed
//! number of turns (never stopped by time), with the turns it measures in
//! bands of turn indexes. Every client stops at the start and the end of each
//! band ([`Points`]), so that all connections run a band's turns together and
//! the driver can read the host's metrics around it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Socket;

/// The bands of turn indexes (first, last; from 1) measured apart.
const BANDS: [(usize, usize); 5] = [(1, 10), (91, 100), (291, 300), (991, 1000), (9991, 10000)];

/// A turn that takes longer than this fails (and ends its connection): a
/// run is never stopped by time, but a stuck host must not hang it.
const TURN_LIMIT: Duration = Duration::from_secs(120);

/// A band of turn indexes, from 1, both ends included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    pub first: usize,
    pub last: usize,
}

/// The bands of a session of `turns` turns: those of [`BANDS`] it reaches,
/// and its last ten turns if they are not one of them.
pub fn bands_for(turns: usize) -> Vec<Band> {
    let mut bands: Vec<Band> = BANDS
        .iter()
        .filter(|(_, last)| *last <= turns)
        .map(|&(first, last)| Band { first, last })
        .collect();
    if turns > 0 && bands.last().is_none_or(|b| b.last != turns) {
        let first = turns.saturating_sub(9).max(1);
        bands.retain(|b| b.last < first);
        bands.push(Band { first, last: turns });
    }
    bands
}

/// What a band's turns measured, over every connection (and round).
#[derive(Debug, Default, Clone)]
pub struct BandStats {
    pub events: u64,
    pub turns: u64,
    pub errors: u64,
    /// From the driver's release of the band to the last client's arrival at
    /// its end, summed over rounds.
    pub elapsed: Duration,
    /// Prompt sent to `interaction.turn` end received.
    pub turn_ms: Vec<f64>,
    /// Prompt sent to the turn's first frame (the model's start).
    pub first_ms: Vec<f64>,
    /// The frame before the turn's end (the model's `end`) to the
    /// `interaction.turn` end: what the server did after the model finished.
    pub tail_ms: Vec<f64>,
}

impl BandStats {
    pub fn merge(&mut self, other: &BandStats) {
        self.events += other.events;
        self.turns += other.turns;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.turn_ms.extend(&other.turn_ms);
        self.first_ms.extend(&other.first_ms);
        self.tail_ms.extend(&other.tail_ms);
    }

    pub fn finish(&mut self) {
        for v in [&mut self.turn_ms, &mut self.first_ms, &mut self.tail_ms] {
            v.sort_by(f64::total_cmp);
        }
    }

    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// Where the clients and the driver meet: every client arrives, the driver
/// does its work (reads the metrics, notes the time), then all go on.
pub struct Points {
    arrived: Barrier,
    released: Barrier,
}

impl Points {
    /// Points for `clients` clients and the driver.
    pub fn new(clients: usize) -> Arc<Points> {
        Arc::new(Points {
            arrived: Barrier::new(clients + 1),
            released: Barrier::new(clients + 1),
        })
    }

    /// A client's stop at a point.
    async fn meet(&self) {
        self.arrived.wait().await;
        self.released.wait().await;
    }

    /// The driver's stop at a point: waits for every client, runs `work`,
    /// then lets them go; answers `work`'s output and how long it took.
    pub async fn hold<T>(&self, work: impl std::future::Future<Output = T>) -> (T, Duration) {
        self.arrived.wait().await;
        let started = Instant::now();
        let out = work.await;
        let held = started.elapsed();
        self.released.wait().await;
        (out, held)
    }
}

/// What one client measured.
#[derive(Debug, Default)]
pub struct ClientResult {
    pub events: u64,
    pub turns: u64,
    pub errors: u64,
    /// One per band, in the bands' order.
    pub bands: Vec<BandStats>,
}

/// One turn as the client saw it.
struct Turn {
    events: u64,
    completed: bool,
    turn_ms: f64,
    first_ms: f64,
    tail_ms: f64,
}

/// One client: connects to session `session`, meets the others, runs
/// `turns` turns (meeting them at each band's start and end), and meets them
/// once more at the end. A client whose connection fails still meets the
/// others at every point, so the run goes on.
pub async fn session_client(
    addr: SocketAddr,
    session: String,
    turns: usize,
    bands: Arc<Vec<Band>>,
    points: Arc<Points>,
) -> ClientResult {
    let mut result = ClientResult {
        bands: vec![BandStats::default(); bands.len()],
        ..ClientResult::default()
    };
    let mut socket = connect(addr, &session).await;
    if socket.is_none() {
        result.errors += 1;
    }
    points.meet().await;
    for turn in 1..=turns {
        let band = bands.iter().position(|b| b.first <= turn && turn <= b.last);
        if bands.iter().any(|b| b.first == turn) {
            points.meet().await;
        }
        let outcome = match socket.as_mut() {
            Some(s) => one_turn(s).await,
            None => Err(()),
        };
        match outcome {
            Ok(t) => {
                result.events += t.events;
                result.turns += 1;
                let failed = u64::from(!t.completed);
                result.errors += failed;
                if let Some(stats) = band.map(|i| &mut result.bands[i]) {
                    stats.events += t.events;
                    stats.turns += 1;
                    stats.errors += failed;
                    stats.turn_ms.push(t.turn_ms);
                    stats.first_ms.push(t.first_ms);
                    stats.tail_ms.push(t.tail_ms);
                }
            }
            Err(()) => {
                if socket.take().is_some() {
                    result.errors += 1;
                }
                if let Some(stats) = band.map(|i| &mut result.bands[i]) {
                    stats.errors += 1;
                }
            }
        }
        if bands.iter().any(|b| b.last == turn) {
            points.meet().await;
        }
    }
    points.meet().await;
    if let Some(mut socket) = socket {
        let _ = socket.close(None).await;
    }
    result
}

async fn connect(addr: SocketAddr, session: &str) -> Option<Socket> {
    let url = format!("ws://{addr}/v1/ws?session={session}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.ok()?;
    match socket.next().await {
        Some(Ok(Message::Text(_))) => Some(socket),
        _ => None,
    }
}

async fn one_turn(socket: &mut Socket) -> Result<Turn, ()> {
    let sent = Instant::now();
    socket
        .send(Message::text("benchmark prompt"))
        .await
        .map_err(|_| ())?;
    let mut events = 0;
    let mut first = None;
    let mut previous = None;
    loop {
        match tokio::time::timeout(TURN_LIMIT, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let now = Instant::now();
                events += 1;
                let first = *first.get_or_insert(now);
                if text.contains("\"name\":\"interaction.turn\"") {
                    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                    return Ok(Turn {
                        events,
                        completed: text.contains("\"status\":\"completed\""),
                        turn_ms: ms(now - sent),
                        first_ms: ms(first - sent),
                        tail_ms: ms(now - previous.unwrap_or(now)),
                    });
                }
                previous = Some(now);
            }
            Ok(Some(Ok(_))) => {}
            _ => return Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(turns: usize) -> Vec<(usize, usize)> {
        bands_for(turns).iter().map(|b| (b.first, b.last)).collect()
    }

    #[test]
    fn bands_reach_as_far_as_the_session_and_end_with_its_last_turns() {
        assert_eq!(pairs(1000), [(1, 10), (91, 100), (291, 300), (991, 1000)]);
        assert_eq!(
            pairs(10_000),
            [(1, 10), (91, 100), (291, 300), (991, 1000), (9991, 10000)]
        );
        assert_eq!(pairs(300), [(1, 10), (91, 100), (291, 300)]);
        assert_eq!(pairs(500), [(1, 10), (91, 100), (291, 300), (491, 500)]);
        assert_eq!(pairs(95), [(1, 10), (86, 95)]);
        assert_eq!(pairs(5), [(1, 5)]);
    }
}
