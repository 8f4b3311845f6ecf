//! `[server]`: its keys as written, their defaults, and their checks.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::Envelope;

#[derive(Deserialize, Debug)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawServer {
    listen: String,
    envelope: Envelope,
    max_frame_bytes: usize,
    max_queued_prompts: usize,
    max_prompt_bytes: usize,
    max_connections: usize,
    turns_per_minute: u32,
    idle_timeout_secs: u64,
    ping_interval_secs: u64,
    turn_timeout_secs: u64,
    shutdown_grace_secs: u64,
    write_timeout_secs: u64,
    lease_ms: u64,
    lease_renew_ms: u64,
    store_timeout_ms: u64,
    max_turn_events: u64,
    allowed_origins: Vec<String>,
    header_read_timeout_secs: u64,
    max_pending_connections: usize,
    max_pending_per_address: usize,
    max_connections_per_key: usize,
    max_queued_prompts_per_key: usize,
    max_history_bytes: usize,
    drain_secs: u64,
    usage_flush_secs: u64,
    tool_timeout_secs: u64,
    metrics_by_key: bool,
    replay_frames: usize,
    reconnect_grace_secs: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            envelope: Envelope::default(),
            max_frame_bytes: 65_536,
            max_queued_prompts: 8,
            max_prompt_bytes: 65_536,
            max_connections: 10_000,
            turns_per_minute: 0,
            idle_timeout_secs: 600,
            ping_interval_secs: 30,
            turn_timeout_secs: 600,
            shutdown_grace_secs: 30,
            write_timeout_secs: 30,
            lease_ms: 8_000,
            lease_renew_ms: 2_000,
            store_timeout_ms: 5_000,
            max_turn_events: 1_000_000,
            allowed_origins: Vec::new(),
            header_read_timeout_secs: 10,
            max_pending_connections: 4_096,
            max_pending_per_address: 512,
            max_connections_per_key: 1_000,
            max_queued_prompts_per_key: 256,
            max_history_bytes: 16 << 20,
            drain_secs: 0,
            usage_flush_secs: 10,
            tool_timeout_secs: 120,
            metrics_by_key: false,
            replay_frames: 1024,
            reconnect_grace_secs: 30,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:3000".to_owned()
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// How frames are wrapped.
    pub envelope: Envelope,
    /// Largest client frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Prompts a session may queue behind its running turn.
    pub max_queued_prompts: usize,
    /// Longest prompt accepted, in bytes of text.
    pub max_prompt_bytes: usize,
    /// Most WebSocket connections served at once.
    pub max_connections: usize,
    /// Turns each API key may start per minute; 0: no limit.
    pub turns_per_minute: u32,
    /// Close a connection with no client message and no turn for this long; 0: never.
    pub idle_timeout_secs: u64,
    /// Ping each connection this often, and close it when a ping goes
    /// unanswered for as long; 0: no pings.
    pub ping_interval_secs: u64,
    /// Longest a turn may run; 0: no limit.
    pub turn_timeout_secs: u64,
    /// On shutdown, how long running turns may go on before they are cancelled.
    pub shutdown_grace_secs: u64,
    /// Drop a connection whose client takes no frame for this long while
    /// the host has frames for it; at least 1.
    pub write_timeout_secs: u64,
    /// How long a turn's lease on a shared store holds without renewal, as
    /// another host counts it: a session whose host died is served again
    /// after at most this long.
    pub lease_ms: u64,
    /// How often a running turn renews its lease; a turn that gets no
    /// renewal taken for `lease_ms - lease_renew_ms` stops (`lease_lost`).
    pub lease_renew_ms: u64,
    /// The longest any store call may take before it fails.
    pub store_timeout_ms: u64,
    /// Sequence numbers each turn reserves: the most events a turn may send.
    pub max_turn_events: u64,
    /// Browser origins (`scheme://host[:port]`, `null`, or `*` for any)
    /// allowed besides pages served from this machine's loopback names; a
    /// request whose `Origin` is none of them is refused (see
    /// [`crate::origins`]).
    pub allowed_origins: Vec<String>,
    /// How long a client may take to send a request's headers (and an
    /// idle keep-alive connection may wait for its next request).
    pub header_read_timeout_secs: u64,
    /// Most connections accepted and not (yet) upgraded to a session socket.
    pub max_pending_connections: usize,
    /// Most such connections from one IP address.
    pub max_pending_per_address: usize,
    /// Most session sockets one API key (in open mode: one client address)
    /// may hold open.
    pub max_connections_per_key: usize,
    /// Most prompts one API key (in open mode: one client address) may have
    /// waiting behind running turns, over all its connections.
    pub max_queued_prompts_per_key: usize,
    /// Largest a session's history may grow, in bytes of its messages as
    /// JSON; a prompt that would pass it is refused (`history_full`).
    pub max_history_bytes: usize,
    /// On SIGTERM, how long the host goes on serving (new connections
    /// included) with `/readyz` answering 503, so that load balancers stop
    /// sending it clients before it stops accepting them.
    pub drain_secs: u64,
    /// How often this host adds the usage it counted to the store
    /// (`GET /v1/usage`), in seconds.
    pub usage_flush_secs: u64,
    /// How long a turn waits for the client's tool results, in seconds.
    pub tool_timeout_secs: u64,
    /// Whether `/metrics` also counts turns and tokens by API key id.
    pub metrics_by_key: bool,
    /// How many numbered frames of a session's latest turn are kept for
    /// clients that reconnect with `?since=N` (0: none).
    pub replay_frames: usize,
    /// How long a turn whose client went away runs on for a client to
    /// rejoin it before it is cancelled, in seconds (0: cancelled at once).
    pub reconnect_grace_secs: u64,
}

impl ServerConfig {
    /// How the turn core runs turns under this config.
    pub fn turn_settings(&self) -> crate::core::TurnSettings {
        use std::time::Duration;
        crate::core::TurnSettings {
            lease: Duration::from_millis(self.lease_ms),
            renew: Duration::from_millis(self.lease_renew_ms),
            store_timeout: Duration::from_millis(self.store_timeout_ms),
            turn_timeout: (self.turn_timeout_secs > 0)
                .then(|| Duration::from_secs(self.turn_timeout_secs)),
            max_turn_events: self.max_turn_events,
            max_history_bytes: self.max_history_bytes,
            tool_timeout: Duration::from_secs(self.tool_timeout_secs),
            replay_frames: self.replay_frames,
        }
    }
}

/// Checks `[server]` as written, adding each problem to `problems`.
pub(super) fn server(raw: RawServer, problems: &mut Vec<String>) -> ServerConfig {
    let listen = raw.listen.parse::<SocketAddr>().unwrap_or_else(|err| {
        problems.push(format!(
            "server.listen: `{}` is not an address like 127.0.0.1:3000 ({err})",
            raw.listen
        ));
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    // Sizes and counts: a frame up to 64 MiB, a queue and a connection
    // count that fit in memory.
    for (key, value, range) in [
        ("max_frame_bytes", raw.max_frame_bytes, 16..=64 << 20),
        ("max_queued_prompts", raw.max_queued_prompts, 1..=1024),
        ("max_prompt_bytes", raw.max_prompt_bytes, 1..=64 << 20),
        ("max_connections", raw.max_connections, 1..=1_000_000),
        (
            "max_pending_connections",
            raw.max_pending_connections,
            1..=1_000_000,
        ),
        (
            "max_pending_per_address",
            raw.max_pending_per_address,
            1..=1_000_000,
        ),
        (
            "max_connections_per_key",
            raw.max_connections_per_key,
            1..=1_000_000,
        ),
        (
            "max_queued_prompts_per_key",
            raw.max_queued_prompts_per_key,
            1..=1_000_000,
        ),
        ("max_history_bytes", raw.max_history_bytes, 1024..=1 << 30),
        ("replay_frames", raw.replay_frames, 0..=1_000_000),
    ] {
        if !range.contains(&value) {
            problems.push(format!(
                "server.{key}: {value} is out of range ({}-{})",
                range.start(),
                range.end()
            ));
        }
    }
    for (key, value) in [
        ("idle_timeout_secs", raw.idle_timeout_secs),
        ("ping_interval_secs", raw.ping_interval_secs),
        ("turn_timeout_secs", raw.turn_timeout_secs),
        ("shutdown_grace_secs", raw.shutdown_grace_secs),
        ("write_timeout_secs", raw.write_timeout_secs),
        ("header_read_timeout_secs", raw.header_read_timeout_secs),
        ("drain_secs", raw.drain_secs),
        ("reconnect_grace_secs", raw.reconnect_grace_secs),
    ] {
        if value > super::YEAR_SECS {
            problems.push(format!(
                "server.{key}: {value} is more than a year ({} s)",
                super::YEAR_SECS
            ));
        }
    }
    for (key, value, range) in [
        ("lease_ms", raw.lease_ms, 100..=600_000),
        ("lease_renew_ms", raw.lease_renew_ms, 50..=300_000),
        ("store_timeout_ms", raw.store_timeout_ms, 10..=600_000),
        ("usage_flush_secs", raw.usage_flush_secs, 1..=86_400),
        ("tool_timeout_secs", raw.tool_timeout_secs, 1..=86_400),
        ("max_turn_events", raw.max_turn_events, 16..=1_000_000_000),
    ] {
        if !range.contains(&value) {
            problems.push(format!(
                "server.{key}: {value} is out of range ({}-{})",
                range.start(),
                range.end()
            ));
        }
    }
    if raw.header_read_timeout_secs == 0 {
        problems.push(
            "server.header_read_timeout_secs: must be at least 1 (a client that never \
             finishes its headers would hold its connection forever)"
                .to_owned(),
        );
    }
    if raw.lease_renew_ms * 2 > raw.lease_ms {
        problems.push(format!(
            "server.lease_renew_ms: {} must be at most half of server.lease_ms ({}), so a \
             turn renews its lease at least twice before it could run out",
            raw.lease_renew_ms, raw.lease_ms
        ));
    }
    for origin in &raw.allowed_origins {
        if let Err(why) = crate::origins::check_entry(origin) {
            problems.push(format!("server.allowed_origins: `{origin}` {why}"));
        }
    }
    ServerConfig {
        listen,
        envelope: raw.envelope,
        max_frame_bytes: raw.max_frame_bytes,
        max_queued_prompts: raw.max_queued_prompts,
        max_prompt_bytes: raw.max_prompt_bytes,
        max_connections: raw.max_connections,
        turns_per_minute: raw.turns_per_minute,
        idle_timeout_secs: raw.idle_timeout_secs,
        ping_interval_secs: raw.ping_interval_secs,
        turn_timeout_secs: raw.turn_timeout_secs,
        shutdown_grace_secs: raw.shutdown_grace_secs,
        write_timeout_secs: raw.write_timeout_secs.max(1),
        lease_ms: raw.lease_ms,
        lease_renew_ms: raw.lease_renew_ms,
        store_timeout_ms: raw.store_timeout_ms,
        max_turn_events: raw.max_turn_events,
        allowed_origins: raw.allowed_origins,
        header_read_timeout_secs: raw.header_read_timeout_secs,
        max_pending_connections: raw.max_pending_connections,
        max_pending_per_address: raw.max_pending_per_address,
        max_connections_per_key: raw.max_connections_per_key,
        max_queued_prompts_per_key: raw.max_queued_prompts_per_key,
        max_history_bytes: raw.max_history_bytes,
        drain_secs: raw.drain_secs,
        usage_flush_secs: raw.usage_flush_secs,
        tool_timeout_secs: raw.tool_timeout_secs,
        metrics_by_key: raw.metrics_by_key,
        replay_frames: raw.replay_frames,
        reconnect_grace_secs: raw.reconnect_grace_secs,
    }
}
