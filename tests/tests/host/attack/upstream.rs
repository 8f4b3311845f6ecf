//! A hostile upstream: a provider that streams one event (or NDJSON line)
//! without end. The provider plugins bound what one frame may hold, so the
//! turn fails with `bad_response` long before the turn timeout, the
//! upstream connection is closed, the host's memory stays bounded, and the
//! next turn is served normally.
//!
//! The provider plugins run in the real host against a local HTTP server
//! started by each test.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use llm_host_tests::{build_packages, Config, Host, Workdir, STANDARD_PLUGINS};
use serde_json::json;

/// The bound on one stream frame in the provider plugins (8 MiB).
const MAX_EVENT_BYTES: u64 = 8 * 1024 * 1024;
/// The host's turn timeout in these tests: the failure must come well
/// before it.
const TURN_TIMEOUT_SECS: u64 = 120;
/// How long the bad turn may take: generous for a debug build on a busy
/// machine, far below the turn timeout.
const FAIL_WITHIN: Duration = Duration::from_secs(30);
/// How much the host's resident memory may grow over the bad turn: the
/// frame bound, what the plugin reads ahead, and allocator slack (about
/// 11 MiB is usual). Without the bound it grows with everything the
/// upstream sends, about 10 MB a second until the turn timeout.
const MAX_RSS_GROWTH_KB: u64 = 64 * 1024;
/// Failure guard for an upstream connection the host never closes.
const CLOSE_GUARD: Duration = Duration::from_secs(60);

/// The provider plugins and how each one's API answers.
#[derive(Clone, Copy, Debug)]
enum Provider {
    OpenAi,
    Anthropic,
    Ollama,
}

impl Provider {
    fn package(self) -> &'static str {
        match self {
            Provider::OpenAi => "llm-plugin-openai",
            Provider::Anthropic => "llm-plugin-anthropic",
            Provider::Ollama => "llm-plugin-ollama",
        }
    }

    fn library(self) -> String {
        format!("lib{}.so", self.package().replace('-', "_"))
    }

    fn plugin(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Ollama => "ollama",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Provider::OpenAi => "OpenAI-compatible server",
            Provider::Anthropic => "Anthropic",
            Provider::Ollama => "Ollama",
        }
    }

    /// `base_url` for a server at `url`.
    fn base_url(self, url: &str) -> String {
        match self {
            Provider::OpenAi => format!("{url}/v1"),
            Provider::Anthropic | Provider::Ollama => url.to_owned(),
        }
    }

    /// What the endless frame is called in the error.
    fn frame(self) -> &'static str {
        match self {
            Provider::OpenAi | Provider::Anthropic => "stream event",
            Provider::Ollama => "stream line",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Provider::OpenAi | Provider::Anthropic => "text/event-stream",
            Provider::Ollama => "application/x-ndjson",
        }
    }

    /// The start of the endless frame, and what repeats in it forever:
    /// `data:` lines with no blank line, or one line that never ends.
    fn endless(self) -> (String, String) {
        match self {
            Provider::OpenAi => (
                String::new(),
                format!(
                    "data: {}\n",
                    json!({"id": "c", "model": "m", "choices": [
                        {"index": 0, "delta": {"content": "x"}, "finish_reason": null}]})
                ),
            ),
            Provider::Anthropic => (
                "event: content_block_delta\n".to_owned(),
                format!(
                    "data: {}\n",
                    json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": "x"}})
                ),
            ),
            Provider::Ollama => (
                r#"{"model":"m","message":{"role":"assistant","content":""#.to_owned(),
                "x".repeat(64),
            ),
        }
    }

    /// A whole, normal answer: `hello`.
    fn hello(self) -> String {
        match self {
            Provider::OpenAi => [
                json!({"id": "c", "model": "m", "choices": [
                    {"index": 0, "delta": {"content": "hello"}, "finish_reason": null}]}),
                json!({"id": "c", "model": "m", "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            ]
            .iter()
            .map(|chunk| format!("data: {chunk}\n\n"))
            .chain(["data: [DONE]\n\n".to_owned()])
            .collect(),
            Provider::Anthropic => [
                json!({"type": "message_start", "message": {"id": "msg_1", "model": "m",
                       "usage": {"input_tokens": 1, "output_tokens": 1}}}),
                json!({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": "hello"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": {"output_tokens": 1}}),
                json!({"type": "message_stop"}),
            ]
            .iter()
            .map(|event| {
                format!(
                    "event: {}\ndata: {event}\n\n",
                    event["type"].as_str().unwrap_or("")
                )
            })
            .collect(),
            Provider::Ollama => [
                json!({"model": "m", "message": {"role": "assistant", "content": "hello"},
                       "done": false}),
                json!({"model": "m", "message": {"role": "assistant", "content": ""},
                       "done": true, "done_reason": "stop", "prompt_eval_count": 1,
                       "eval_count": 1}),
            ]
            .iter()
            .map(|line| format!("{line}\n"))
            .collect(),
        }
    }
}

/// The provider plugins' directory, where they are built once per test
/// process (the harness does not build them for every test).
fn provider_libraries() -> PathBuf {
    build_packages(&[
        Provider::OpenAi.package(),
        Provider::Anthropic.package(),
        Provider::Ollama.package(),
    ])
}

/// A local server for one provider: its first connection streams the
/// endless frame, later ones answer `hello`. For the endless connection it
/// reports how many bytes it wrote before the client closed it (`None` if
/// the client kept it open for [`CLOSE_GUARD`]).
struct Upstream {
    url: String,
    closed: Receiver<Option<u64>>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start(provider: Provider) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (tx, closed) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let served = AtomicUsize::new(0);
        {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let first = served.fetch_add(1, Ordering::SeqCst) == 0;
                            let tx = tx.clone();
                            thread::spawn(move || serve(provider, stream, first, &tx));
                        }
                        Err(err) if err.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        Self { url, closed, stop }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads a request (head and `content-length` body); false if the client
/// went away first.
fn read_request(stream: &mut TcpStream) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut data = Vec::new();
    let mut buf = [0; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while data.len() < head_end + length {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    true
}

fn serve(provider: Provider, mut stream: TcpStream, endless: bool, closed: &Sender<Option<u64>>) {
    if !read_request(&mut stream) {
        return;
    }
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\nconnection: close\r\n\r\n",
        provider.content_type()
    );
    if !endless {
        let _ = stream.write_all(format!("{head}{}", provider.hello()).as_bytes());
        return;
    }
    let (start, repeat) = provider.endless();
    let block = repeat.repeat(64 * 1024 / repeat.len());
    let mut pending = format!("{head}{start}").into_bytes();
    // A client that closed while its window was full shows it only to
    // reads (a FIN), never to a blocked write: look between writes.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let until = Instant::now() + CLOSE_GUARD;
    let mut written = 0u64;
    let mut buf = [0; 1024];
    let was_closed = loop {
        if Instant::now() > until {
            break false;
        }
        if pending.is_empty() {
            pending.extend_from_slice(block.as_bytes());
        }
        match stream.write(&pending) {
            Ok(0) => break true,
            Ok(n) => {
                written += n as u64;
                pending.drain(..n);
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let _ = stream.set_nonblocking(true);
                let read = stream.read(&mut buf);
                let _ = stream.set_nonblocking(false);
                match read {
                    Ok(0) => break true,
                    Err(err) if err.kind() != ErrorKind::WouldBlock => break true,
                    _ => {}
                }
            }
            Err(_) => break true,
        }
    };
    let _ = closed.send(was_closed.then_some(written));
}

/// The host's resident memory, in kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples the host's resident memory every 20 ms until `done` is raised;
/// answers the most seen.
fn watch_rss(pid: u32, done: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut most = 0;
        while !done.load(Ordering::Relaxed) {
            most = most.max(rss_kb(pid));
            thread::sleep(Duration::from_millis(20));
        }
        most.max(rss_kb(pid))
    })
}

/// A host with `provider`'s plugin as model `up`, pointed at `upstream`.
fn start_host(provider: Provider, upstream: &Upstream) -> Host {
    let workdir = Workdir::new(STANDARD_PLUGINS);
    let library = provider_libraries().join(provider.library());
    std::fs::copy(
        &library,
        workdir.path().join("plugins").join(provider.library()),
    )
    .unwrap_or_else(|err| panic!("copy {}: {err}", library.display()));
    let config = Config {
        server_extra: format!("turn_timeout_secs = {TURN_TIMEOUT_SECS}"),
        extra: format!(
            "\n[models.up]\nplugin = \"{}\"\nsettings = {{ model = \"m\", base_url = \"{}\", \
             max_retries = 0, timeout_ms = 60000 }}\n",
            provider.plugin(),
            provider.base_url(&upstream.url)
        ),
        ..Config::default()
    };
    workdir.write_config(&config.to_toml());
    Host::start_in(workdir, &[])
}

async fn an_endless_frame_fails_the_turn(provider: Provider) {
    let upstream = Upstream::start(provider);
    let host = start_host(provider, &upstream);
    let mut client = host.connect("/v1/ws?model=up").await;
    client.next_json().await;

    let before = rss_kb(host.pid());
    assert!(before > 0, "no VmRSS for the host");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = watch_rss(host.pid(), Arc::clone(&done));
    let started = Instant::now();
    client.send_text("stream forever").await;
    let turn = client.read_turn().await;
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let most = watcher.join().expect("the watcher");

    assert_eq!(turn.status(), "failed", "{provider:?}: {}", turn.dump());
    let error = turn
        .model_event("error")
        .unwrap_or_else(|| panic!("{provider:?}: no error: {}", turn.dump()));
    assert_eq!(error["error"]["code"], "bad_response", "{}", turn.dump());
    let message = error["error"]["message"].as_str().unwrap_or_default();
    let want = format!(
        "{} sent a {} larger than 8 MiB (8388608 bytes)",
        provider.name(),
        provider.frame()
    );
    assert!(message.contains(&want), "{provider:?}: {message}");
    assert!(took < FAIL_WITHIN, "{provider:?}: the turn took {took:?}");
    assert!(
        most.saturating_sub(before) < MAX_RSS_GROWTH_KB,
        "{provider:?}: the host grew from {before} kB to {most} kB"
    );

    // The plugin closed the upstream connection after a bounded amount.
    let written = upstream
        .closed
        .recv_timeout(CLOSE_GUARD + Duration::from_secs(5))
        .expect("the upstream reports")
        .unwrap_or_else(|| panic!("{provider:?}: the host kept the upstream connection open"));
    assert!(
        (MAX_EVENT_BYTES..8 * MAX_EVENT_BYTES).contains(&written),
        "{provider:?}: {written} bytes went out"
    );

    // The host goes on serving.
    client.send_text("hello?").await;
    let next = client.read_turn().await;
    assert_eq!(next.status(), "completed", "{provider:?}: {}", next.dump());
    assert_eq!(next.text(), "hello", "{provider:?}: {}", next.dump());
}

#[tokio::test]
async fn an_endless_sse_event_from_openai_fails_the_turn_and_the_host_stays_bounded() {
    an_endless_frame_fails_the_turn(Provider::OpenAi).await;
}

#[tokio::test]
async fn an_endless_sse_event_from_anthropic_fails_the_turn_and_the_host_stays_bounded() {
    an_endless_frame_fails_the_turn(Provider::Anthropic).await;
}

#[tokio::test]
async fn an_endless_ndjson_line_from_ollama_fails_the_turn_and_the_host_stays_bounded() {
    an_endless_frame_fails_the_turn(Provider::Ollama).await;
}
