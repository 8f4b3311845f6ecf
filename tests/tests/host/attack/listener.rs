//! Before and around the upgrade: half-open requests, connection floods from
//! one address or one key, a key revoked while its sockets are open, and
//! WebSocket protocol violations.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use llm_host_tests::{http, Config, Ending, Host, Workdir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdef00";
const OPS: &str = "ops-key-0123456789abcdef000";

fn keys(keys: &[(&str, &str, bool)]) -> String {
    let entries: Vec<String> = keys
        .iter()
        .map(|(id, key, admin)| format!("  {{ id = \"{id}\", key = \"{key}\", admin = {admin} }},"))
        .collect();
    format!("\n[auth]\nkeys = [\n{}\n]\n", entries.join("\n"))
}

/// A TCP connection to `addr` from the loopback address `from` (any
/// 127.x.y.z reaches a host listening on 127.0.0.1).
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    socket.connect(addr).await.expect("connect")
}

/// Sends half a request: a request line and one header, never the blank line.
async fn half_request(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send half a request");
}

/// Waits for the host to close `stream` (EOF or reset) within `limit`;
/// answers whether it did.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buffer = [0u8; 512];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or the like before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

// Half-open requests cost their sender: past max_pending_per_address the
// connections of one address are closed at once, the others after
// header_read_timeout_secs, and clients from other addresses are served
// throughout.
#[tokio::test]
async fn half_open_requests_are_capped_per_address_and_timed_out() {
    let host = Host::start(&Config {
        server_extra: "header_read_timeout_secs = 2\nmax_pending_per_address = 8\n".to_owned(),
        ..Config::default()
    });
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut stream = connect_from([127, 0, 0, 2], host.addr()).await;
        half_request(&mut stream).await;
        held.push(stream);
    }
    // Accepted in order: the ninth is over the cap.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = connect_from([127, 0, 0, 2], host.addr()).await;
    assert!(
        closed_within(&mut over, Duration::from_secs(1)).await,
        "a ninth half-open connection from one address was kept"
    );
    // Another address is served while those are held.
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("still here").await;
    assert_eq!(client.read_turn().await.text(), "echo: still here");
    // The held ones are closed by the header read timeout.
    for stream in &mut held {
        assert!(
            closed_within(stream, Duration::from_secs(20)).await,
            "a half-open connection outlived server.header_read_timeout_secs"
        );
    }
    let metrics = http(host.addr(), "GET", "/metrics").await;
    assert!(
        metrics.body.contains("reason=\"too_many_pending\""),
        "{}",
        metrics.body
    );
}

// A shutdown does not wait on connections that never finish a request.
#[tokio::test]
async fn shutdown_does_not_wait_on_half_open_requests() {
    let mut host = Host::start(&Config {
        server_extra: "header_read_timeout_secs = 600\nshutdown_grace_secs = 1\n".to_owned(),
        ..Config::default()
    });
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(host.addr()).await.expect("connect");
        half_request(&mut stream).await;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.signal("TERM");
    let exit = host.wait_exit(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|status| status.success()),
        "the host did not stop with half-open connections held:\n{}",
        host.log()
    );
}

// One key may hold at most max_connections_per_key sockets; another key
// is unaffected.
#[tokio::test]
async fn one_key_cannot_take_every_connection() {
    let host = Host::start(&Config {
        server_extra: "max_connections_per_key = 2\n".to_owned(),
        extra: keys(&[("alice", ALICE, false), ("bob", BOB, false)]),
        ..Config::default()
    });
    let mut first = host.connect(&format!("/v1/ws?token={ALICE}")).await;
    first.next_json().await;
    let mut second = host.connect(&format!("/v1/ws?token={ALICE}")).await;
    second.next_json().await;
    let reply = host.http_upgrade(&format!("/v1/ws?token={ALICE}")).await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "too_many_key_connections");
    let mut bob = host.connect(&format!("/v1/ws?token={BOB}")).await;
    bob.next_json().await;
    // A closed socket gives its place back.
    second.close().await;
    let mut deadline = 50;
    loop {
        let reply = host.http_upgrade(&format!("/v1/ws?token={ALICE}")).await;
        if reply.status == 101 {
            break;
        }
        deadline -= 1;
        assert!(deadline > 0, "the place never came back: {}", reply.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.send_text("hi").await;
    assert_eq!(first.read_turn().await.text(), "echo: hi");
}

// A reload that removes a key, or changes its secret, closes that key's
// open sockets (1008, `key_revoked`); other keys' sockets stay.
#[tokio::test]
async fn a_revoked_key_loses_its_open_sockets() {
    let config = Config {
        extra: keys(&[
            ("alice", ALICE, false),
            ("bob", BOB, false),
            ("ops", OPS, true),
        ]),
        ..Config::default()
    };
    let workdir = Workdir::with_config(&config);
    let host = Host::start_in(workdir, &[]);
    let mut alice = host.connect(&format!("/v1/ws?token={ALICE}")).await;
    alice.next_json().await;
    let mut bob = host.connect(&format!("/v1/ws?token={BOB}")).await;
    bob.next_json().await;
    // A turn running when the key goes is stopped.
    let mut slow = host
        .connect(&format!("/v1/ws?token={BOB}&model=slow"))
        .await;
    slow.next_json().await;
    slow.send_text("long").await;

    let changed = Config {
        extra: keys(&[
            ("alice", ALICE, false),
            ("bob", "bob-has-a-new-key-0123456789", false),
            ("ops", OPS, true),
        ]),
        ..Config::default()
    };
    host.workdir().write_config(&changed.to_toml());
    crate::common::reload_as(&host, OPS).await;

    for socket in [&mut bob, &mut slow] {
        let mut codes = Vec::new();
        let ending = loop {
            match socket.next_text().await {
                Ok(text) => {
                    let frame = llm_host_tests::Frame::parse(&text);
                    if frame.is_diagnostic() {
                        codes.push(frame.diagnostic_code().to_owned());
                    }
                }
                Err(ending) => break ending,
            }
        };
        assert!(codes.contains(&"key_revoked".to_owned()), "{codes:?}");
        match ending {
            Ending::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1008),
            other => panic!("expected a close with 1008, got {other:?}"),
        }
    }
    let reply = host.http_upgrade(&format!("/v1/ws?token={BOB}")).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    // Alice's socket saw a reload and goes on.
    alice.send_text("still mine").await;
    let turn = alice.read_turn().await;
    assert_eq!(turn.text(), "echo: still mine");
}

/// Opens a session socket by hand and answers the stream after the 101.
async fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("read the 101");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A client frame: FIN, `opcode`, masked with a zero mask unless `masked`
/// is false, with `rsv` bits set in the first byte.
fn frame(opcode: u8, payload: &[u8], masked: bool, rsv: u8) -> Vec<u8> {
    let mut out = vec![0x80 | rsv | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&[0, 0, 0, 0]);
    }
    out.extend_from_slice(payload);
    out
}

/// Reads server frames until a close frame; answers its code.
async fn close_code(stream: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.ok()?;
            let mut len = u64::from(head[1] & 0x7f);
            if len == 126 {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.ok()?;
                len = u64::from(u16::from_be_bytes(ext));
            } else if len == 127 {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await.ok()?;
                len = u64::from_be_bytes(ext);
            }
            let mut payload = vec![0u8; len as usize];
            stream.read_exact(&mut payload).await.ok()?;
            if head[0] & 0x0f == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

// RFC 6455 violations are closed with their codes: 1007 for text that is
// not UTF-8, 1002 for the rest; the host serves others on.
#[tokio::test]
async fn protocol_violations_get_their_close_codes() {
    let host = Host::start(&Config::default());
    let cases: [(&str, Vec<u8>, u16); 5] = [
        (
            "invalid UTF-8 text",
            frame(0x1, &[0xff, 0xfe, 0x41], true, 0),
            1007,
        ),
        ("an unmasked frame", frame(0x1, b"hi", false, 0), 1002),
        ("RSV bits", frame(0x1, b"hi", true, 0x40), 1002),
        ("a lone continuation", frame(0x0, b"hi", true, 0), 1002),
        (
            "a ping over 125 bytes",
            frame(0x9, &[b'p'; 200], true, 0),
            1002,
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut stream = raw_upgrade(host.addr()).await;
        stream.write_all(&bytes).await.expect("send the frame");
        assert_eq!(close_code(&mut stream).await, Some(expected), "{what}");
    }
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("fine").await;
    assert_eq!(client.read_turn().await.text(), "echo: fine");
}
