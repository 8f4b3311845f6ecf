//! OpenTelemetry traces (`[telemetry]`): the host posts its turns' spans as
//! OTLP/JSON to a collector stand-in run by the test (a small HTTP server on
//! 127.0.0.1 that keeps every `POST /v1/traces` it gets). What is checked:
//! the spans of a socket turn and an HTTP turn, their GenAI attributes and
//! their parent when the client sent a `traceparent`; a failed turn's error
//! status; nothing sent with telemetry off (removed by a reload); and a
//! collector that is down or hangs neither fails nor holds turns, its spans
//! counted as dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use llm_host_tests::{http, Config, Frame, Host};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderName;
use tokio_tungstenite::tungstenite::Message;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const HTTP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const HTTP_PARENT: &str = "b7ad6b7169203331";
const COLLECTOR_KEY: &str = "Bearer collector-secret-0123456789";

/// A request the collector stand-in received: its path, its headers
/// (names lower-cased) and its body.
type Request = (String, Vec<(String, String)>, Value);

/// What the collector stand-in received.
#[derive(Default)]
struct Received {
    requests: Vec<Request>,
}

/// A collector stand-in on 127.0.0.1: answers every request 200 `{}` and
/// keeps it.
struct Collector {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl Collector {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Received::default()));
        let keep = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, keep.clone()));
            }
        });
        Collector { addr, received }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, each with its resource's attributes
    /// under `"resource"`.
    fn spans(&self) -> Vec<Value> {
        let received = self.received.lock().expect("lock");
        let mut spans = Vec::new();
        for (_, _, body) in &received.requests {
            for resource in body["resourceSpans"].as_array().into_iter().flatten() {
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        let mut span = span.clone();
                        span["resource"] = resource["resource"]["attributes"].clone();
                        spans.push(span);
                    }
                }
            }
        }
        spans
    }

    /// Waits (up to 10 s) until `count` spans named `name` came.
    async fn wait_for(&self, name: &str, count: usize) -> Vec<Value> {
        for _ in 0..200 {
            let spans = self.spans();
            if spans.iter().filter(|span| span["name"] == name).count() >= count {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "fewer than {count} `{name}` spans came: {:#?}",
            self.spans()
        );
    }
}

/// Serves one connection's requests (HTTP/1.1, kept alive, bodies by
/// `Content-Length`).
async fn serve(mut stream: TcpStream, received: Arc<Mutex<Received>>) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.lines();
        let path = lines
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .unwrap_or("")
            .to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0);
        let body_start = head_end + 4;
        while buffer.len() < body_start + length {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Value =
            serde_json::from_slice(&buffer[body_start..body_start + length]).unwrap_or(Value::Null);
        buffer.drain(..body_start + length);
        received
            .lock()
            .expect("lock")
            .requests
            .push((path, headers, body));
        let answer =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn telemetry(endpoint: &str, more: &str) -> Config {
    Config {
        extra: format!(
            "\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nflush_interval_ms = 50\n{more}\n"
        ),
        ..Config::default()
    }
}

/// The value of attribute `key` of `span`: a string, an integer (as its
/// string), or a list of strings.
fn attr(span: &Value, key: &str) -> Value {
    span["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["key"] == key)
        .map(|a| {
            let value = &a["value"];
            if let Some(values) = value["arrayValue"]["values"].as_array() {
                return Value::Array(values.iter().map(|v| v["stringValue"].clone()).collect());
            }
            value
                .get("stringValue")
                .or_else(|| value.get("intValue"))
                .cloned()
                .unwrap_or(Value::Null)
        })
        .unwrap_or(Value::Null)
}

/// A socket to `path` opened with `headers`; answers it after the session's
/// opening frame.
async fn socket(
    host: &Host,
    path: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let mut request = host.url(path).into_client_request().expect("request");
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
        request
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    next_frame(&mut socket).await;
    socket
}

async fn next_frame(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> Frame {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
            .expect("the socket is open")
            .expect("a frame");
        if let Message::Text(text) = message {
            return Frame::parse(text.as_str());
        }
    }
}

/// Sends `prompt` and reads its turn; answers the turn's status.
async fn turn(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    prompt: &str,
) -> String {
    socket.send(Message::text(prompt)).await.expect("send");
    loop {
        let frame = next_frame(socket).await;
        if frame.is_turn_end() {
            return frame.event()["status"].as_str().unwrap_or("").to_owned();
        }
    }
}

/// `POST /v1/chat/completions` with `body` and `headers`; answers the status.
async fn post(addr: SocketAddr, body: &Value, headers: &[(&str, &str)]) -> u16 {
    let body = body.to_string();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

// A socket opened with a traceparent: each of its turns is a span of that
// trace, a child of the client's span, with the GenAI attributes and a child
// span per part (claim, model, save). An HTTP request's turn is a SERVER
// span of the trace its own traceparent names; one without a traceparent
// starts a trace. The collector gets the configured header; /v1/config does
// not show its value.
#[tokio::test]
async fn socket_and_http_turns_become_spans_of_the_callers_trace() {
    let collector = Collector::start().await;
    let more = format!("headers = {{ authorization = \"{COLLECTOR_KEY}\" }}");
    let host = Host::start(&telemetry(&collector.endpoint(), &more));
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let mut ws = socket(
        &host,
        "/v1/ws?session=traced",
        &[("traceparent", &traceparent), ("tracestate", "vendor=abc")],
    )
    .await;
    assert_eq!(turn(&mut ws, "hello there").await, "completed");
    assert_eq!(turn(&mut ws, "and again").await, "completed");

    let http_parent = format!("00-{HTTP_TRACE}-{HTTP_PARENT}-01");
    let chat = json!({"model": "echo", "messages": [{"role": "user", "content": "hi you"}]});
    let session = [
        ("traceparent", http_parent.as_str()),
        ("X-Session-Id", "http-traced"),
    ];
    assert_eq!(post(host.addr(), &chat, &session).await, 200);
    assert_eq!(post(host.addr(), &chat, &[]).await, 200);

    let spans = collector.wait_for("chat echo", 4).await;
    let turns: Vec<&Value> = spans.iter().filter(|s| s["name"] == "chat echo").collect();
    let mut socket_turns: Vec<&&Value> = turns
        .iter()
        .filter(|s| attr(s, "llm_host.api") == "websocket")
        .collect();
    socket_turns.sort_by_key(|s| attr(s, "llm_host.turn.id").to_string());
    assert_eq!(socket_turns.len(), 2, "{turns:#?}");
    for (span, id) in socket_turns.iter().zip(["turn-1", "turn-2"]) {
        assert_eq!(span["traceId"], TRACE);
        assert_eq!(span["parentSpanId"], PARENT);
        assert_eq!(span["traceState"], "vendor=abc");
        assert_eq!(span["kind"], 1, "INTERNAL");
        assert_eq!(attr(span, "llm_host.turn.id"), id);
        for (key, value) in [
            ("gen_ai.operation.name", json!("chat")),
            ("gen_ai.provider.name", json!("echo")),
            ("gen_ai.request.model", json!("echo")),
            ("gen_ai.conversation.id", json!("traced")),
            ("gen_ai.response.finish_reasons", json!(["stop"])),
            ("llm_host.key_id", json!("anonymous")),
            ("llm_host.turn.status", json!("completed")),
            ("llm_host.store", json!("memory")),
        ] {
            assert_eq!(attr(span, key), value, "{key} of {span:#}");
        }
        assert!(
            attr(span, "gen_ai.usage.input_tokens").is_string(),
            "{span:#}"
        );
        assert!(attr(span, "error.type").is_null(), "{span:#}");
        assert!(span.get("status").is_none(), "{span:#}");
        assert_eq!(span["events"][0]["name"], "gen_ai.first_token", "{span:#}");
        let resource = &span["resource"];
        assert!(
            resource
                .as_array()
                .expect("resource")
                .iter()
                .any(|a| a["key"] == "service.name" && a["value"]["stringValue"] == "llm-host"),
            "{resource:#}"
        );
        let children: Vec<&str> = spans
            .iter()
            .filter(|child| child["parentSpanId"] == span["spanId"])
            .map(|child| {
                assert_eq!(child["traceId"], TRACE);
                let (start, end) = (
                    nanos(child, "startTimeUnixNano"),
                    nanos(child, "endTimeUnixNano"),
                );
                assert!(nanos(span, "startTimeUnixNano") <= start && start <= end);
                assert!(
                    end <= nanos(span, "endTimeUnixNano"),
                    "{child:#} in {span:#}"
                );
                child["name"].as_str().unwrap_or("")
            })
            .collect();
        assert_eq!(children, ["claim memory", "generate echo", "commit memory"]);
    }
    // The echo backend counts the whole conversation as input.
    let input = |span: &Value| -> u64 {
        attr(span, "gen_ai.usage.input_tokens")
            .as_str()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(input(socket_turns[1]) > input(socket_turns[0]));

    let http_turns: Vec<&&Value> = turns
        .iter()
        .filter(|s| attr(s, "llm_host.api") == "openai")
        .collect();
    assert_eq!(http_turns.len(), 2, "{turns:#?}");
    let traced = http_turns
        .iter()
        .find(|s| s["traceId"] == HTTP_TRACE)
        .unwrap_or_else(|| panic!("no span of the request's trace: {http_turns:#?}"));
    assert_eq!(traced["parentSpanId"], HTTP_PARENT);
    assert_eq!(traced["kind"], 2, "SERVER");
    assert_eq!(attr(traced, "gen_ai.conversation.id"), "http-traced");
    assert!(attr(traced, "llm_host.request.id")
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    let untraced = http_turns
        .iter()
        .find(|s| s["traceId"] != HTTP_TRACE)
        .expect("the request without a traceparent");
    assert!(untraced.get("parentSpanId").is_none(), "{untraced:#}");
    assert_ne!(untraced["traceId"], TRACE);
    assert!(attr(untraced, "gen_ai.conversation.id").is_null());
    let children = spans
        .iter()
        .filter(|child| child["parentSpanId"] == untraced["spanId"])
        .map(|child| child["name"].clone())
        .collect::<Vec<_>>();
    assert_eq!(children, [json!("generate echo")], "no session, no store");

    {
        let received = collector.received.lock().expect("lock");
        let (path, headers, _) = &received.requests[0];
        assert_eq!(path, "/v1/traces");
        for (name, value) in [
            ("content-type", "application/json"),
            ("authorization", COLLECTOR_KEY),
        ] {
            assert!(
                headers.iter().any(|(n, v)| n == name && v == value),
                "{name} not sent: {headers:?}"
            );
        }
    }
    let config = http(host.addr(), "GET", "/v1/config").await;
    assert_eq!(
        config.json()["telemetry"]["headers"]["authorization"],
        "[redacted]"
    );
    assert!(!config.body.contains("collector-secret"), "{}", config.body);
    let metrics = http(host.addr(), "GET", "/metrics").await.body;
    assert!(
        metrics.contains("llm_host_spans_exported_total"),
        "{metrics}"
    );
}

fn nanos(span: &Value, key: &str) -> u128 {
    span[key]
        .as_str()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key} of {span:#}"))
}

// A turn whose model fails has status ERROR and `error.type`, on its span
// and on its model's span.
#[tokio::test]
async fn a_failed_turn_is_an_error_span() {
    let collector = Collector::start().await;
    let host = Host::start(&telemetry(&collector.endpoint(), ""));
    let mut ws = socket(&host, "/v1/ws?model=failing", &[]).await;
    assert_eq!(turn(&mut ws, "one two three").await, "failed");
    let spans = collector.wait_for("chat failing", 1).await;
    let span = spans
        .iter()
        .find(|s| s["name"] == "chat failing")
        .expect("the turn");
    assert_eq!(span["status"]["code"], 2, "{span:#}");
    assert_eq!(attr(span, "error.type"), "injected_failure");
    assert_eq!(attr(span, "llm_host.turn.status"), "failed");
    let model = spans
        .iter()
        .find(|s| s["name"] == "generate failing")
        .expect("the model's span");
    assert_eq!(model["parentSpanId"], span["spanId"]);
    assert_eq!(model["status"]["code"], 2);
    let claim = spans
        .iter()
        .find(|s| s["name"] == "claim memory" && s["parentSpanId"] == span["spanId"])
        .expect("the claim's span");
    assert!(claim.get("status").is_none(), "{claim:#}");
}

// Without [telemetry] nothing is sent: a reload that removes the table
// stops the export, and turns after it (with a traceparent) send nothing.
#[tokio::test]
async fn with_telemetry_off_nothing_is_sent() {
    let collector = Collector::start().await;
    let config = telemetry(&collector.endpoint(), "");
    let host = Host::start(&config);
    let mut ws = socket(&host, "/v1/ws", &[]).await;
    assert_eq!(turn(&mut ws, "before").await, "completed");
    collector.wait_for("chat echo", 1).await;

    host.workdir().write_config(&Config::default().to_toml());
    // The watcher may reload first; then this reload finds nothing changed.
    let reload = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert!(host.logged("[telemetry] changed").await, "{}", host.log());
    assert!(host.logged("telemetry: off").await, "{}", host.log());
    let requests = collector.received.lock().expect("lock").requests.len();
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let mut traced = socket(&host, "/v1/ws", &[("traceparent", &traceparent)]).await;
    assert_eq!(turn(&mut traced, "after").await, "completed");
    assert_eq!(turn(&mut ws, "after too").await, "completed");
    let chat = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(host.addr(), &chat, &[("traceparent", &traceparent)]).await,
        200
    );
    // Ten flush intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        collector.received.lock().expect("lock").requests.len(),
        requests,
        "{:#?}",
        collector.spans()
    );
}

// A collector that refuses connections, or accepts and never answers:
// turns complete as ever; the spans are counted as dropped, and the
// warning is logged once, not per span.
#[tokio::test]
async fn a_collector_down_or_hung_holds_no_turn() {
    let down = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let down_addr = down.local_addr().expect("address");
    drop(down);
    let hung = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hung_addr = hung.local_addr().expect("address");
    let held = Arc::new(Mutex::new(Vec::new()));
    let holding = held.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = hung.accept().await {
            holding.lock().expect("lock").push(stream);
        }
    });
    for (addr, reason) in [(down_addr, "export_failed"), (hung_addr, "queue_full")] {
        let more = "export_timeout_ms = 2000\nmax_queued_spans = 8";
        let host = Host::start(&telemetry(&format!("http://{addr}"), more));
        let mut ws = socket(&host, "/v1/ws?model=short", &[]).await;
        for i in 0..12 {
            assert_eq!(turn(&mut ws, &format!("turn {i}")).await, "completed");
        }
        let chat = json!({"model": "short", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(post(host.addr(), &chat, &[]).await, 200);
        let mut counted = false;
        for _ in 0..100 {
            let metrics = http(host.addr(), "GET", "/metrics").await.body;
            counted = metrics.lines().any(|line| {
                line.starts_with(&format!(
                    "llm_host_spans_dropped_total{{reason=\"{reason}\"}}"
                ))
            });
            if counted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(counted, "no {reason} drops counted: {}", host.log());
        let log = host.log();
        let warnings = log.matches("telemetry: cannot export spans").count()
            + log.matches("telemetry: the span queue is full").count();
        assert!((1..=2).contains(&warnings), "{log}");
    }
}
