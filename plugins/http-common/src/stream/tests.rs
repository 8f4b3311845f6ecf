//! Whole generations through [`Backend::stream`] against a local server
//! that streams without end: the turn fails with `bad_response` once the
//! frame being received is past its bound, and the connection is closed.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use llm_host_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use llm_host_plugin_api::{codes, EventSink_TO, FinishReason};

use super::*;
use crate::limits::MAX_EVENT_BYTES;
use crate::settings::{ProviderInfo, ProviderSettings};
use crate::testing::Recorder;

const TEST: ProviderInfo = ProviderInfo {
    name: "Test",
    default_base_url: "http://127.0.0.1:9",
    default_api_key_env: None,
    top_k: false,
    seed: false,
};

/// Failure guard for a server that is never closed on; not a timing
/// assertion.
const GUARD: Duration = Duration::from_secs(60);

/// Emits every frame's text and ends at the first one.
struct FirstFrame;

impl StreamHandler for FirstFrame {
    fn frame(&mut self, frame: Frame, out: &mut Emitter<'_, '_>) -> Result<Step, Halt> {
        let text = match frame {
            Frame::Event { data, .. } => data,
            Frame::Line(line) => line,
        };
        out.text(&format!("{} bytes", text.len()))?;
        out.end(FinishReason::STOP);
        Ok(Step::Done)
    }

    fn eof(&mut self, _out: &mut Emitter<'_, '_>) -> Result<(), Halt> {
        Err(ProviderError::interrupted("no frame").into())
    }
}

/// A server for one request: answers `head`, writes `first` and then
/// `repeat` until the client closes the connection. Reports how many body
/// bytes it wrote by then, or `None` if the client kept the connection open
/// for [`GUARD`] or read past a GiB.
fn endless_server(head: &str, first: &[u8], repeat: &[u8]) -> (String, Receiver<Option<u64>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let mut pending = [head.as_bytes(), first].concat();
    let head_len = head.len() as u64;
    let block = repeat.repeat((64 * 1024 / repeat.len()).max(1));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut request = Vec::new();
        let mut buf = [0; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        // A client that closed while its window was full shows it only to
        // reads (a FIN), never to a blocked write: look between writes.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let until = Instant::now() + GUARD;
        let mut written = 0u64;
        let closed = loop {
            if Instant::now() > until || written > 1 << 30 {
                break false;
            }
            if pending.is_empty() {
                pending.clone_from(&block);
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
        let _ = tx.send(closed.then(|| written.saturating_sub(head_len)));
    });
    (url, rx)
}

fn settings(url: &str) -> ProviderSettings {
    ProviderSettings {
        base_url: Some(url.to_owned()),
        model: "m".to_owned(),
        max_retries: Some(0),
        timeout_ms: Some(10_000),
        ..ProviderSettings::default()
    }
}

/// One generation against `url`, framed as `framing`.
fn generate(url: &str, framing: Framing) -> Recorder {
    let backend = Backend::resolve(TEST, settings(url)).expect("settings");
    let request = backend.request("/stream", Vec::new(), &json!({}), framing);
    let mut recorder = Recorder::default();
    {
        let mut sink = Sink::new(EventSink_TO::from_ptr(&mut recorder, TD_Opaque));
        backend
            .stream(request, &mut sink, &[], || FirstFrame)
            .expect("stream returns Ok");
    }
    recorder
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
const NDJSON_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n";

/// Runs one generation against an endless server and checks that it failed
/// with `bad_response` naming `what`, and that the server saw the
/// connection close after a bounded number of bytes.
fn assert_dropped(framing: Framing, head: &str, first: &[u8], repeat: &[u8], what: &str) {
    let (url, written) = endless_server(head, first, repeat);
    let rec = generate(&url, framing);
    assert_eq!(rec.error_code(), Some(codes::BAD_RESPONSE), "{rec:?}");
    assert!(
        rec.error_message().starts_with(&format!(
            "Test sent a {what} larger than 8 MiB (8388608 bytes)"
        )),
        "{}",
        rec.error_message()
    );
    assert!(rec.text.is_empty(), "{rec:?}");
    let written = written
        .recv_timeout(GUARD + Duration::from_secs(5))
        .expect("the server reports")
        .expect("the connection was closed");
    // The bound, what the connection thread reads ahead, and the sockets'
    // buffers: nowhere near what an endless stream would send.
    assert!(written < 4 * MAX_EVENT_BYTES as u64, "{written} bytes sent");
}

#[test]
fn an_endless_sse_event_fails_the_turn_and_closes_the_connection() {
    let line = b"data: {\"choices\":[{\"delta\":{\"content\":\"xxxxxxxxxxxx\"}}]}\n";
    assert_dropped(Framing::Sse, SSE_HEAD, b"", line, "stream event");
}

#[test]
fn an_endless_sse_line_fails_the_turn_and_closes_the_connection() {
    assert_dropped(Framing::Sse, SSE_HEAD, b"data: ", b"x", "stream line");
}

#[test]
fn an_endless_ndjson_line_fails_the_turn_and_closes_the_connection() {
    let first = b"{\"message\":{\"content\":\"";
    assert_dropped(Framing::Ndjson, NDJSON_HEAD, first, b"y", "stream line");
}

#[test]
fn a_large_but_legal_event_is_handed_on() {
    let data = "z".repeat(MAX_EVENT_BYTES - 64);
    let (url, _written) = endless_server(
        SSE_HEAD,
        format!("data: {data}\n\n").as_bytes(),
        b": ping\n",
    );
    let rec = generate(&url, Framing::Sse);
    assert_eq!(rec.error, None, "{rec:?}");
    assert_eq!(rec.text, format!("{} bytes", data.len()));
}

#[test]
fn an_endless_error_body_is_cut_and_the_connection_closed() {
    for content_type in ["text/html", "application/json"] {
        let (status, code) = match content_type {
            "text/html" => ("500 Internal Server Error", codes::UPSTREAM),
            _ => ("200 OK", codes::BAD_RESPONSE),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n"
        );
        let (url, written) = endless_server(&head, b"{\"error\": \"", b"oops ");
        let rec = generate(&url, Framing::Sse);
        assert_eq!(rec.error_code(), Some(code), "{content_type}: {rec:?}");
        assert!(rec.error_message().len() < 1000, "{}", rec.error_message());
        let written = written
            .recv_timeout(GUARD + Duration::from_secs(5))
            .expect("the server reports")
            .expect("the connection was closed");
        assert!(written < 4 * MAX_EVENT_BYTES as u64, "{written} bytes sent");
    }
}
