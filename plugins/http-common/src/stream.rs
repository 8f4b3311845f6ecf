//! One streamed generation over HTTP: the request, its retries, the stream
//! cut into frames for the provider's handler, cancel and timeouts.
//!
//! The blocking HTTP client runs on a connection thread of its own and hands
//! the response over a small bounded channel. The turn's thread waits on
//! that channel in [`CANCEL_POLL`] steps, so it sees a cancel within a step
//! whatever the upstream does (answers slowly, sends nothing, never sends
//! its headers), and enforces `timeout_ms` as the longest silence. When the
//! turn leaves the stream for any reason, the connection's agent is shut
//! down: the socket is closed at once, the blocked read on the connection
//! thread fails, and that thread ends.

use std::io::Read;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use llm_host_plugin_api::{self as api, LogLevel, PluginError, Sink};
use serde_json::{json, Value};
use ureq::Agent;

use crate::emit::{Emitter, Halt, CANCEL_POLL};
use crate::error::{self, clip, ProviderError};
use crate::framing::{Decoder, Frame, Framing};
use crate::settings::Backend;

/// Most bytes of an error response kept.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// The first retry waits this long; each next one twice as long.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest backoff between two tries.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A `retry-after` longer than this is not waited for: the error is reported.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Body pieces the connection thread may read ahead of the turn.
const READ_AHEAD: usize = 32;

/// What a [`StreamHandler`] says after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Keep reading.
    Continue,
    /// The stream is complete (its end was emitted); stop reading.
    Done,
}

/// A provider's stream format: turns frames into sink events. A fresh
/// handler is made for each try of a request.
pub trait StreamHandler {
    /// Handles one frame of the stream.
    fn frame(&mut self, frame: Frame, out: &mut Emitter<'_, '_>) -> Result<Step, Halt>;

    /// The body ended before the handler answered [`Step::Done`]: finish the
    /// generation if what came is complete, or fail with
    /// [`codes::INTERRUPTED`](llm_host_plugin_api::codes::INTERRUPTED).
    fn eof(&mut self, out: &mut Emitter<'_, '_>) -> Result<(), Halt>;
}

/// One HTTP request of a generation, ready to send.
#[derive(Clone)]
pub struct HttpRequest {
    /// The whole URL.
    pub url: String,
    /// Every header, credentials included.
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
    /// How the response streams.
    pub framing: Framing,
}

impl std::fmt::Debug for HttpRequest {
    // Header values hold credentials: only names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRequest")
            .field("url", &self.url)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("body_bytes", &self.body.len())
            .field("framing", &self.framing)
            .finish()
    }
}

impl Backend {
    /// A POST of `body` to `path` under the base URL, with JSON and stream
    /// headers, the provider's `auth` headers, and the settings' `headers`
    /// (which replace any header of the same name).
    pub fn request(
        &self,
        path: &str,
        auth: Vec<(String, String)>,
        body: &Value,
        framing: Framing,
    ) -> HttpRequest {
        let accept = match framing {
            Framing::Sse => "text/event-stream",
            Framing::Ndjson => "application/x-ndjson",
        };
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("accept".to_owned(), accept.to_owned()),
        ];
        headers.extend(auth);
        for (name, value) in &self.headers {
            headers.retain(|(have, _)| !have.eq_ignore_ascii_case(name));
            headers.push((name.clone(), value.clone()));
        }
        HttpRequest {
            url: self.url(path),
            headers,
            body: body.to_string().into_bytes(),
            framing,
        }
    }

    /// Runs one generation: sends `request`, retrying as the settings allow,
    /// and streams the answer through handlers made by `handler` into
    /// `sink`. `warnings` go to the client as diagnostics first. Failures
    /// end as the turn's error event; a cancel ends it quietly.
    pub fn stream<H: StreamHandler>(
        &self,
        request: HttpRequest,
        sink: &mut Sink<'_>,
        warnings: &[String],
        mut handler: impl FnMut() -> H,
    ) -> Result<(), PluginError> {
        let request = Arc::new(request);
        let mut out = Emitter::new(sink);
        for warning in warnings {
            if out.diagnostic(LogLevel::WARN, warning, None).is_err() {
                return Ok(());
            }
        }
        let mut retries = 0;
        loop {
            let err = match self.attempt(&request, &mut out, &mut handler()) {
                Ok(()) | Err(Halt::Cancelled) => return Ok(()),
                Err(Halt::Failed(err)) => err,
            };
            let mut message = self.redact(&err.message);
            match self.retry_delay(&err, retries, out.has_output()) {
                Retry::After(delay) => {
                    retries += 1;
                    let note = format!(
                        "{message}; retry {retries} of {} in {:.1} s",
                        self.max_retries,
                        delay.as_secs_f64()
                    );
                    api::warn!("{note}");
                    let data = json!({
                        "code": err.code,
                        "retry": retries,
                        "maxRetries": self.max_retries,
                        "delayMs": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    });
                    if out.diagnostic(LogLevel::WARN, &note, Some(&data)).is_err()
                        || !out.sleep(delay)
                    {
                        return Ok(());
                    }
                }
                Retry::TooLate(wait) => {
                    message.push_str(&format!(
                        " (the provider asks to retry after {} s)",
                        wait.as_secs()
                    ));
                    out.error(err.code, &message);
                    return Ok(());
                }
                Retry::No => {
                    out.error(err.code, &message);
                    return Ok(());
                }
            }
        }
    }

    fn retry_delay(&self, err: &ProviderError, retries: u32, has_output: bool) -> Retry {
        if !err.retryable || has_output || retries >= self.max_retries {
            return Retry::No;
        }
        match err.retry_after {
            Some(wait) if wait > MAX_RETRY_AFTER => Retry::TooLate(wait),
            Some(wait) => Retry::After(wait),
            None => Retry::After(
                BACKOFF_BASE
                    .saturating_mul(2u32.saturating_pow(retries))
                    .min(BACKOFF_MAX),
            ),
        }
    }

    /// One try: the request, then the stream until its end, a failure or a
    /// cancel. Leaving it closes the connection.
    fn attempt(
        &self,
        request: &Arc<HttpRequest>,
        out: &mut Emitter<'_, '_>,
        handler: &mut impl StreamHandler,
    ) -> Result<(), Halt> {
        let name = self.provider.name;
        let mut conn = Connection::open(self.agent(), request, self.timeout)?;
        let (status, retry_after, content_type) = match conn.next(out)? {
            Event::Head {
                status,
                retry_after,
                content_type,
            } => (status, retry_after, content_type),
            Event::ConnectFailed(err) => {
                return Err(error::from_transport(name, &self.base_url, err).into())
            }
            _ => return Err(ProviderError::bad_response("the response has no head").into()),
        };
        if !(200..300).contains(&status) {
            let body = conn.body(out)?;
            return Err(error::from_status(name, status, &body, retry_after).into());
        }
        if request.framing == Framing::Sse && content_type.starts_with("application/json") {
            let body = conn.body(out)?;
            return Err(unexpected_json(name, &body).into());
        }
        let mut decoder = Decoder::new(request.framing, name);
        let mut frames = Vec::new();
        loop {
            let ended = match conn.next(out)? {
                Event::Data(bytes) => {
                    decoder.feed(&bytes, &mut frames)?;
                    false
                }
                Event::End => {
                    decoder.finish(&mut frames)?;
                    true
                }
                Event::ReadFailed(err) => return Err(error::from_read_error(name, &err).into()),
                Event::Head { .. } | Event::ConnectFailed(_) => {
                    return Err(ProviderError::bad_response("the response began twice").into())
                }
            };
            for frame in frames.drain(..) {
                if handler.frame(frame, out)? == Step::Done {
                    return Ok(());
                }
            }
            if ended {
                return handler.eof(out);
            }
        }
    }

    /// A fresh agent for one try: shutting it down closes exactly that
    /// try's connection.
    fn agent(&self) -> Agent {
        let mut config = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(self.timeout))
            .user_agent(concat!("llm-host-plugin/", env!("CARGO_PKG_VERSION")));
        if self.is_loopback() {
            config = config.proxy(None);
        }
        Agent::new_with_config(config.build())
    }
}

enum Retry {
    No,
    After(Duration),
    TooLate(Duration),
}

fn unexpected_json(provider: &str, body: &[u8]) -> ProviderError {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) if value.get("error").is_some() => error::from_stream_error(provider, &value),
        _ => ProviderError::bad_response(format!(
            "{provider} answered with JSON instead of an event stream: {}",
            clip(String::from_utf8_lossy(body).trim())
        )),
    }
}

/// What the connection thread reports.
enum Event {
    /// The response's status and the headers that matter.
    Head {
        status: u16,
        retry_after: Option<Duration>,
        content_type: String,
    },
    /// The next bytes of the body.
    Data(Vec<u8>),
    /// The body ended where its framing says it ends.
    End,
    /// No response came.
    ConnectFailed(ureq::Error),
    /// Reading the body failed.
    ReadFailed(std::io::Error),
}

/// A request in flight on its connection thread.
struct Connection {
    /// Shut down when the connection is dropped, which closes its socket.
    agent: Option<Agent>,
    events: Receiver<Event>,
    timeout: Duration,
    /// When the last event came (or the request was sent).
    last: Instant,
    answered: bool,
}

impl Connection {
    fn open(agent: Agent, request: &Arc<HttpRequest>, timeout: Duration) -> Result<Self, Halt> {
        let (tx, events) = mpsc::sync_channel(READ_AHEAD);
        let worker_agent = agent.clone();
        let request = Arc::clone(request);
        thread::Builder::new()
            .name("llm-plugin-http".to_owned())
            .spawn(move || exchange(&worker_agent, &request, &tx))
            .map_err(|err| {
                ProviderError::new(
                    "internal",
                    format!("cannot start a connection thread: {err}"),
                )
            })?;
        Ok(Self {
            agent: Some(agent),
            events,
            timeout,
            last: Instant::now(),
            answered: false,
        })
    }

    /// The next event, waiting at most `timeout` since the last one and
    /// looking at the cancel flag every [`CANCEL_POLL`].
    fn next(&mut self, out: &Emitter<'_, '_>) -> Result<Event, Halt> {
        loop {
            if out.is_cancelled() {
                return Err(Halt::Cancelled);
            }
            let left = (self.last + self.timeout).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out().into());
            }
            match self.events.recv_timeout(left.min(CANCEL_POLL)) {
                Ok(event) => {
                    self.last = Instant::now();
                    self.answered = true;
                    return Ok(event);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ProviderError::interrupted("the connection thread ended").into())
                }
            }
        }
    }

    /// The rest of the body, at most [`ERROR_BODY_LIMIT`] bytes of it; what
    /// came before a read failure or a timeout.
    fn body(&mut self, out: &Emitter<'_, '_>) -> Result<Vec<u8>, Halt> {
        let mut body = Vec::new();
        loop {
            match self.next(out) {
                Ok(Event::Data(bytes)) => {
                    let room = ERROR_BODY_LIMIT.saturating_sub(body.len());
                    body.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    if room <= bytes.len() {
                        return Ok(body);
                    }
                }
                Err(Halt::Cancelled) => return Err(Halt::Cancelled),
                Ok(_) | Err(Halt::Failed(_)) => return Ok(body),
            }
        }
    }

    fn timed_out(&self) -> ProviderError {
        let ms = self.timeout.as_millis();
        let what = if self.answered {
            format!("the stream sent nothing for {ms} ms (timeout_ms)")
        } else {
            format!("no answer within {ms} ms (timeout_ms)")
        };
        ProviderError::new(llm_host_plugin_api::codes::TIMEOUT, what)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown();
        }
    }
}

/// The connection thread: sends the request and passes the response on
/// until it ends, fails, or the turn stops listening.
fn exchange(agent: &Agent, request: &HttpRequest, tx: &SyncSender<Event>) {
    let mut builder = agent.post(&request.url);
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let response = match builder.send(request.body.as_slice()) {
        Ok(response) => response,
        Err(err) => {
            let _ = tx.send(Event::ConnectFailed(err));
            return;
        }
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let head = Event::Head {
        status: response.status().as_u16(),
        retry_after: header("retry-after").and_then(|v| error::parse_retry_after(&v)),
        content_type: header("content-type")
            .unwrap_or_default()
            .to_ascii_lowercase(),
    };
    if tx.send(head).is_err() {
        return;
    }
    let mut reader = response.into_body().into_reader();
    let mut buf = vec![0; 16 * 1024];
    loop {
        let event = match reader.read(&mut buf) {
            Ok(0) => Event::End,
            Ok(n) => Event::Data(buf[..n].to_vec()),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => Event::ReadFailed(err),
        };
        let last = !matches!(event, Event::Data(_));
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
