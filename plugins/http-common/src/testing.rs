//! Test support for the provider plugins (feature `test-support`): a local
//! HTTP/1.1 server that answers each connection with a script of raw bytes
//! and pauses, records every request, and reports when a client closes its
//! connection; and a sink that records what a plugin emits.
//!
//! Everything here panics with a message on failure: it is test code.

use std::fmt::Display;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    EventSink, EventSink_TO, FinishReason, Flow, LogLevel, ModelAdapterBox, ModelRequest,
    PluginError, ToolCall, Usage,
};
use serde_json::Value;

/// How long the server waits for a client to close before it gives up.
const CLOSE_GUARD: Duration = Duration::from_secs(20);

fn must<T, E: Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("{what}: {err}"),
    }
}

/// One thing the server does on a connection, after reading its request.
#[derive(Debug, Clone)]
pub enum Action {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Waits this long.
    Pause(Duration),
    /// Sets this flag (to cancel a turn at a known point, say).
    Raise(Arc<AtomicBool>),
    /// Sends nothing more and waits until the client closes the connection;
    /// [`MockServer::wait_closed`] reports whether it did.
    AwaitClose,
}

/// The response head of a streamed body with chunked transfer encoding.
pub fn chunked_head(status: u16, content_type: &str) -> Action {
    Action::Send(
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n",
            reason(status)
        )
        .into_bytes(),
    )
}

/// The response head of a body that ends when the server closes.
pub fn close_delimited_head(status: u16, content_type: &str) -> Action {
    Action::Send(
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n",
            reason(status)
        )
        .into_bytes(),
    )
}

/// One chunk of a chunked body.
pub fn chunk(bytes: impl AsRef<[u8]>) -> Action {
    let bytes = bytes.as_ref();
    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    Action::Send(out)
}

/// The end of a chunked body.
pub fn last_chunk() -> Action {
    Action::Send(b"0\r\n\r\n".to_vec())
}

/// A whole streamed response: the head, each piece as one chunk, the end.
pub fn chunked<S: AsRef<[u8]>>(content_type: &str, pieces: &[S]) -> Vec<Action> {
    std::iter::once(chunked_head(200, content_type))
        .chain(pieces.iter().map(chunk))
        .chain(std::iter::once(last_chunk()))
        .collect()
}

/// A whole response with a `content-length` body.
pub fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Vec<Action> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ));
    vec![Action::Send(head.into_bytes())]
}

/// A JSON error response.
pub fn json_error(status: u16, headers: &[(&str, &str)], body: &Value) -> Vec<Action> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    response(status, &all, &body.to_string())
}

fn reason(status: u16) -> &'static str {
    ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Whatever")
}

/// A request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `POST`, ...
    pub method: String,
    /// The request target, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Headers, names in lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Recorded {
    /// The value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        must(
            serde_json::from_slice(&self.body),
            "the request body is JSON",
        )
    }
}

/// A local HTTP/1.1 server answering the `n`th connection with the `n`th
/// script (a 500 once the scripts are used up). Stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    closed: Mutex<Receiver<bool>>,
    stop: Arc<AtomicBool>,
}

impl MockServer {
    /// Listens on `127.0.0.1:0` and serves `scripts` in order.
    pub fn start(scripts: Vec<Vec<Action>>) -> Self {
        let listener = must(TcpListener::bind("127.0.0.1:0"), "bind the mock server");
        must(
            listener.set_nonblocking(true),
            "make the listener nonblocking",
        );
        let addr = must(listener.local_addr(), "the mock server's address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (closed_tx, closed) = mpsc::channel();
        {
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            thread::spawn(move || serve(&listener, scripts, &requests, &closed_tx, &stop));
        }
        Self {
            addr,
            requests,
            closed: Mutex::new(closed),
            stop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        match self.requests.lock() {
            Ok(requests) => requests.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The only request received; panics if there were more or none.
    pub fn single_request(&self) -> Recorded {
        let mut requests = self.requests();
        assert_eq!(requests.len(), 1, "requests: {requests:?}");
        requests.remove(0)
    }

    /// Waits (at most `guard`) for a connection at [`Action::AwaitClose`] to
    /// see its client close it: true if it did, false if the client kept it
    /// open or nothing reached that point.
    pub fn wait_closed(&self, guard: Duration) -> bool {
        let closed = match self.closed.lock() {
            Ok(closed) => closed,
            Err(poisoned) => poisoned.into_inner(),
        };
        closed.recv_timeout(guard).unwrap_or(false)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    listener: &TcpListener,
    scripts: Vec<Vec<Action>>,
    requests: &Arc<Mutex<Vec<Recorded>>>,
    closed: &Sender<bool>,
    stop: &AtomicBool,
) {
    let mut scripts = scripts.into_iter();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let script = scripts
                    .next()
                    .unwrap_or_else(|| json_error(500, &[], &Value::from("no script left")));
                let requests = Arc::clone(requests);
                let closed = closed.clone();
                thread::spawn(move || connection(stream, script, &requests, &closed));
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
}

fn connection(
    mut stream: TcpStream,
    script: Vec<Action>,
    requests: &Mutex<Vec<Recorded>>,
    closed: &Sender<bool>,
) {
    let _ = stream.set_nonblocking(false);
    let Some(request) = read_request(&mut stream) else {
        return;
    };
    match requests.lock() {
        Ok(mut requests) => requests.push(request),
        Err(poisoned) => poisoned.into_inner().push(request),
    }
    for action in script {
        match action {
            Action::Send(bytes) => {
                if stream
                    .write_all(&bytes)
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    return;
                }
            }
            Action::Pause(delay) => thread::sleep(delay),
            Action::Raise(flag) => flag.store(true, Ordering::SeqCst),
            Action::AwaitClose => {
                let _ = closed.send(await_close(&mut stream));
                return;
            }
        }
    }
}

/// Reads until the client closes (EOF or reset): true if it did within
/// [`CLOSE_GUARD`].
fn await_close(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let until = Instant::now() + CLOSE_GUARD;
    let mut buf = [0; 1024];
    while Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true, // reset
        }
    }
    false
}

fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut data = Vec::new();
    let mut buf = [0; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.set_read_timeout(None);
    Some(Recorded {
        method,
        path,
        headers,
        body,
    })
}

/// A `http://127.0.0.1:PORT` URL where nothing listens (a port just freed).
pub fn refused_url() -> String {
    let listener = must(TcpListener::bind("127.0.0.1:0"), "bind a port");
    let addr = must(listener.local_addr(), "the port's address");
    drop(listener);
    format!("http://{addr}")
}

/// A sink that records every event, and can answer stop like the host does
/// when a turn is cancelled.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Every event in order, as short lines (`text "Hi"`, `end stop`, ...).
    pub events: Vec<String>,
    /// All text, joined.
    pub text: String,
    /// All reasoning, joined.
    pub reasoning: String,
    /// Tool calls, whole.
    pub tool_calls: Vec<ToolCall>,
    /// The last usage.
    pub usage: Option<Usage>,
    /// The finish reason, if the generation ended.
    pub end: Option<FinishReason>,
    /// The error code and message, if it failed.
    pub error: Option<(String, String)>,
    /// Diagnostics: level, message, data.
    pub diagnostics: Vec<(LogLevel, String, String)>,
    /// The `start` event's id and model.
    pub start: Option<(String, String)>,
    /// Cancel the turn (answer stop, and say cancelled from then on) at the
    /// text or reasoning event with this number (1-based).
    pub cancel_at_output: Option<usize>,
    /// The turn's cancel flag; a test or the server may raise it.
    pub cancel: Arc<AtomicBool>,
    outputs: usize,
}

impl Recorder {
    /// A recorder that cancels at the `n`th piece of text or reasoning.
    pub fn cancelling_at(n: usize) -> Self {
        Self {
            cancel_at_output: Some(n),
            ..Self::default()
        }
    }

    fn push(&mut self, event: String) -> Flow {
        self.events.push(event);
        self.flow()
    }

    fn flow(&self) -> Flow {
        if self.cancel.load(Ordering::SeqCst) {
            Flow::STOP
        } else {
            Flow::CONTINUE
        }
    }

    fn output(&mut self) {
        self.outputs += 1;
        if self.cancel_at_output == Some(self.outputs) {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// The error code, if the generation failed.
    pub fn error_code(&self) -> Option<&str> {
        self.error.as_ref().map(|(code, _)| code.as_str())
    }

    /// The error message, or an empty string.
    pub fn error_message(&self) -> &str {
        self.error.as_ref().map_or("", |(_, m)| m.as_str())
    }
}

impl EventSink for Recorder {
    fn start(&mut self, id: RStr<'_>, model_id: RStr<'_>) -> Flow {
        self.start = Some((id.to_string(), model_id.to_string()));
        self.push(format!("start {model_id}"))
    }
    fn text(&mut self, text: RStr<'_>) -> Flow {
        self.text.push_str(text.as_str());
        self.output();
        self.push(format!("text {:?}", text.as_str()))
    }
    fn reasoning(&mut self, text: RStr<'_>) -> Flow {
        self.reasoning.push_str(text.as_str());
        self.output();
        self.push(format!("reasoning {:?}", text.as_str()))
    }
    fn tool_call(&mut self, id: RStr<'_>, name: RStr<'_>, arguments: RStr<'_>) -> Flow {
        self.tool_calls.push(ToolCall {
            id: id.to_string(),
            name: name.to_string(),
            arguments: arguments.to_string(),
        });
        self.push(format!("tool {id} {name} {arguments}"))
    }
    fn usage(&mut self, usage: Usage) -> Flow {
        self.usage = Some(usage);
        self.push(format!(
            "usage {} {} {}",
            usage.input_tokens, usage.output_tokens, usage.total_tokens
        ))
    }
    fn end(&mut self, reason: FinishReason) -> Flow {
        self.end = Some(reason);
        self.events.push(format!("end {}", reason.as_str()));
        Flow::STOP
    }
    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        self.error = Some((code.to_string(), message.to_string()));
        self.events.push(format!("error {code}"));
        Flow::STOP
    }
    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, data: RStr<'_>) -> Flow {
        self.diagnostics
            .push((level, message.to_string(), data.to_string()));
        self.push(format!("diagnostic {} {message}", level.as_str()))
    }
    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Runs `adapter` on `request` through the same trait object the host
/// calls, recording into `recorder`.
pub fn run(
    adapter: &ModelAdapterBox,
    request: &ModelRequest,
    recorder: &mut Recorder,
) -> Result<(), PluginError> {
    let json = must(serde_json::to_string(request), "the request serializes");
    let sink = EventSink_TO::from_ptr(recorder, TD_Opaque);
    adapter.generate(json.as_str().into(), sink).into_result()
}
