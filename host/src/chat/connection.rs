//! The chat's side of the wire: the host's address, a WebSocket in command
//! mode (subprotocol `llm-host.v1`) whose frames are read into [`Frame`]s
//! (a reconnection asks with `?since=N` for the frames after the last it
//! had), and `GET /v1/models` for the list of backends.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::frames::{parse_frame, Event, Frame};
use crate::protocol::COMMAND_SUBPROTOCOL;

/// How long one connection attempt may take: TCP, the upgrade, and the
/// host's session announcement.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a query value keeps as it is: RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Where the host is: a WebSocket URL taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `ws` or `wss`.
    scheme: &'static str,
    /// `host:port` as written.
    authority: String,
    /// The path, `/` at least.
    path: String,
    /// The query's pairs other than `session`, `model` and `since`, as
    /// written.
    query: Vec<String>,
    /// `session=` of the URL's query, if it had one.
    pub session: Option<String>,
    /// `model=` of the URL's query, if it had one.
    pub model: Option<String>,
}

impl Endpoint {
    /// Reads `url`: `ws://` or `wss://` (`http://` and `https://` stand for
    /// them; no scheme means `ws://`), a host, an optional path and query.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = match url.split_once("://") {
            Some(("ws" | "http", rest)) => ("ws", rest),
            Some(("wss" | "https", rest)) => ("wss", rest),
            Some((other, _)) => return Err(format!("`{url}`: unknown scheme `{other}` (ws://)")),
            None => ("ws", url),
        };
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match before_query.find('/') {
            Some(at) => before_query.split_at(at),
            None => (before_query, "/"),
        };
        if authority.is_empty() {
            return Err(format!("`{url}` names no host"));
        }
        let mut endpoint = Self {
            scheme,
            authority: authority.to_owned(),
            path: path.to_owned(),
            query: Vec::new(),
            session: None,
            model: None,
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("session", value)) => endpoint.session = Some(value.to_owned()),
                Some(("model", value)) => endpoint.model = Some(value.to_owned()),
                // The chat says itself where a reconnection goes on from.
                Some(("since", _)) => {}
                _ => endpoint.query.push(pair.to_owned()),
            }
        }
        Ok(endpoint)
    }

    /// The URL to connect to for `session` (none: the host makes one) on
    /// backend `model` (none: the host's default).
    pub fn url(&self, session: Option<&str>, model: Option<&str>) -> String {
        let mut query = self.query.clone();
        let encode = |value: &str| utf8_percent_encode(value, QUERY_VALUE).to_string();
        if let Some(session) = session {
            query.push(format!("session={}", encode(session)));
        }
        if let Some(model) = model {
            query.push(format!("model={}", encode(model)));
        }
        let mut url = format!("{}://{}{}", self.scheme, self.authority, self.path);
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query.join("&"));
        }
        url
    }

    /// The path of `GET /v1/models` under the same prefix as the socket's
    /// `/v1/ws` (or `/`).
    fn models_path(&self) -> String {
        let path = self.path.trim_end_matches('/');
        let prefix = path.strip_suffix("/v1/ws").unwrap_or(path);
        format!("{prefix}/v1/models")
    }

    /// `host:port` for a TCP connection (port 80 when the URL names none).
    fn socket_address(&self) -> String {
        let authority = self
            .authority
            .rsplit_once('@')
            .map_or(self.authority.as_str(), |(_, host)| host);
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
        if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The host answered and refused; asking again will not help (a bad
    /// key, an unknown backend, another key's session, a bad URL).
    Refused(String),
    /// No answer, or one that may change (the host is down, restarting,
    /// shutting down, busy).
    Unreachable(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(why) | ConnectError::Unreachable(why) => f.write_str(why),
        }
    }
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// The close frame's code, if the host sent one.
    pub code: Option<u16>,
    /// What happened, for people.
    pub reason: String,
}

/// What the socket gave.
pub enum Incoming {
    /// A frame.
    Frame(Frame),
    /// The connection ended.
    Closed(Closed),
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An open connection to the host, in command mode.
pub struct Link {
    /// Boxed: the stream is some hundreds of bytes, and a link is moved.
    socket: Box<Socket>,
}

impl Link {
    /// The next frame's events, or how the connection ended. Pings are
    /// answered by the WebSocket library while it reads. Cancel-safe.
    pub async fn next(&mut self) -> Incoming {
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Text(text))) => return Incoming::Frame(parse_frame(&text)),
                Some(Ok(Message::Close(frame))) => {
                    return Incoming::Closed(Closed {
                        code: frame.as_ref().map(|frame| u16::from(frame.code)),
                        reason: match frame {
                            Some(frame) if !frame.reason.is_empty() => {
                                format!("closed by the host: {} {}", frame.code, frame.reason)
                            }
                            Some(frame) => format!("closed by the host: {}", frame.code),
                            None => "closed by the host".to_owned(),
                        },
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    return Incoming::Closed(Closed {
                        code: None,
                        reason: err.to_string(),
                    })
                }
                None => {
                    return Incoming::Closed(Closed {
                        code: None,
                        reason: "the connection ended".to_owned(),
                    })
                }
            }
        }
    }

    async fn send(&mut self, command: Value) -> Result<(), String> {
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .map_err(|err| err.to_string())
    }

    /// Sends a prompt command; the turn's end repeats `id`.
    pub async fn prompt(&mut self, id: &str, text: &str) -> Result<(), String> {
        self.send(json!({ "type": "prompt", "id": id, "text": text }))
            .await
    }

    /// Sends the cancel command: the running turn ends `cancelled`.
    pub async fn cancel(&mut self) -> Result<(), String> {
        self.send(json!({ "type": "cancel" })).await
    }

    /// Closes the connection with a close handshake (for at most a second).
    pub async fn close(mut self) {
        let closing = async {
            let _ = WebSocketStream::close(&mut *self.socket, None).await;
            while let Some(Ok(_)) = self.socket.next().await {}
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
    }
}

/// Opens a command-mode connection for `session` on `model` and reads the
/// host's session announcement. With `since` (the last sequence number the
/// chat received on `session`), the host then sends the session's frames
/// numbered after it, and its running turn live (PROTOCOL.md section 4).
pub async fn connect(
    endpoint: &Endpoint,
    key: Option<&str>,
    session: Option<&str>,
    model: Option<&str>,
    since: Option<u64>,
) -> Result<(Link, Event), ConnectError> {
    let mut url = endpoint.url(session, model);
    if let (Some(since), Some(_)) = (since, session) {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("since={since}"));
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, open(&url, key)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Unreachable(format!(
            "{url}: no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

async fn open(url: &str, key: Option<&str>) -> Result<(Link, Event), ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|err| ConnectError::Refused(format!("{url}: {err}")))?;
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(COMMAND_SUBPROTOCOL),
    );
    if let Some(key) = key {
        let value = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| ConnectError::Refused("the key is not a valid header value".to_owned()))?;
        headers.insert("Authorization", value);
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|err| handshake_error(url, err))?;
    let mut link = Link {
        socket: Box::new(socket),
    };
    // The announcement comes first; a diagnostic may precede a close
    // (the store could not load the session, say).
    let mut said = None;
    loop {
        match link.next().await {
            Incoming::Frame(frame) => {
                for event in frame.events {
                    match event {
                        Event::Open { .. } => return Ok((link, event)),
                        Event::Diagnostic { message, code, .. } => {
                            said = Some(format!("{message} ({code})"));
                        }
                        _ => {}
                    }
                }
            }
            Incoming::Closed(closed) => {
                let why = format!("{url}: {}", said.unwrap_or(closed.reason));
                // 1008: the session is another key's; 1011: it does not parse.
                return Err(match closed.code {
                    Some(1008 | 1011) => ConnectError::Refused(why),
                    _ => ConnectError::Unreachable(why),
                });
            }
        }
    }
}

/// The code and message of an error body (`{"error":{"code","message"}}`).
fn error_body(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = &value["error"];
    let message = error["message"].as_str()?;
    Some(match error["code"].as_str() {
        Some(code) => format!("{message} ({code})"),
        None => message.to_owned(),
    })
}

fn handshake_error(url: &str, err: WsError) -> ConnectError {
    match err {
        WsError::Http(response) => {
            let status = response.status();
            let said = response
                .body()
                .as_deref()
                .and_then(error_body)
                .unwrap_or_else(|| status.to_string());
            let why = format!("{url}: HTTP {}: {said}", status.as_u16());
            // 429 (too many sockets for the key) passes; other 4xx do not.
            if status.is_client_error() && status.as_u16() != 429 {
                ConnectError::Refused(why)
            } else {
                ConnectError::Unreachable(why)
            }
        }
        WsError::Url(err) => ConnectError::Refused(format!("{url}: {err}")),
        WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(_)) => {
            ConnectError::Refused(format!(
                "{url}: the server does not speak llm-host's command mode \
                 (subprotocol {COMMAND_SUBPROTOCOL})"
            ))
        }
        other => ConnectError::Unreachable(format!("{url}: {other}")),
    }
}

/// The backends `GET /v1/models` lists, in its order.
pub async fn models(endpoint: &Endpoint, key: Option<&str>) -> Result<Vec<String>, String> {
    if endpoint.scheme == "wss" {
        return Err("listing the backends needs http; this build has no TLS".to_owned());
    }
    let path = endpoint.models_path();
    let authorization = key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n{authorization}\
         Connection: close\r\n\r\n",
        endpoint.authority
    );
    let address = endpoint.socket_address();
    let exchange = async {
        let mut stream = TcpStream::connect(&address).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!(
                "GET {path}: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|err| format!("GET {path} from {address}: {err}"))?;
    models_of(&answer).map_err(|why| format!("GET {path}: {why}"))
}

/// The model ids of a whole `GET /v1/models` answer (the host's JSON
/// replies carry `Content-Length`, and the request asked to close).
fn models_of(answer: &[u8]) -> Result<Vec<String>, String> {
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("the answer has no end of headers")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let body = &answer[split + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or("the answer has no status")?;
    if status != 200 {
        let said = error_body(body).unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        return Err(format!("HTTP {status}: {said}"));
    }
    let list: Value =
        serde_json::from_slice(body).map_err(|err| format!("the list is not JSON: {err}"))?;
    Ok(list["data"]
        .as_array()
        .map(|models| {
            models
                .iter()
                .filter_map(|model| model["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_urls() {
        let endpoint = Endpoint::parse("ws://127.0.0.1:3000/v1/ws").expect("parses");
        assert_eq!(endpoint.url(None, None), "ws://127.0.0.1:3000/v1/ws");
        assert_eq!(
            endpoint.url(Some("s-1"), Some("my model")),
            "ws://127.0.0.1:3000/v1/ws?session=s-1&model=my%20model"
        );
        assert_eq!(endpoint.models_path(), "/v1/models");
        assert_eq!(endpoint.socket_address(), "127.0.0.1:3000");

        let endpoint = Endpoint::parse("localhost:8080").expect("parses");
        assert_eq!(endpoint.url(None, None), "ws://localhost:8080/");
        assert_eq!(endpoint.models_path(), "/v1/models");

        let endpoint =
            Endpoint::parse("https://chat.example/llm/v1/ws?token=t&session=a&model=m&since=4")
                .expect("parses");
        assert_eq!(endpoint.session.as_deref(), Some("a"));
        assert_eq!(endpoint.model.as_deref(), Some("m"));
        assert_eq!(
            endpoint.url(Some("b"), None),
            "wss://chat.example/llm/v1/ws?token=t&session=b"
        );
        assert_eq!(endpoint.models_path(), "/llm/v1/models");
        assert_eq!(endpoint.socket_address(), "chat.example:80");
        assert_eq!(
            Endpoint::parse("ws://[::1]")
                .expect("parses")
                .socket_address(),
            "[::1]:80"
        );

        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("ws:///v1/ws").is_err());
    }

    #[test]
    fn reads_the_model_list() {
        let answer = b"HTTP/1.1 200 OK\r\n\r\n{\"object\":\"list\",\"data\":[{\"id\":\"echo\"},{\"id\":\"fast\"}]}";
        assert_eq!(
            models_of(answer),
            Ok(vec!["echo".to_owned(), "fast".to_owned()])
        );
        let refused = b"HTTP/1.1 401 Unauthorized\r\n\r\n{\"error\":{\"message\":\"no key\",\"code\":\"invalid_api_key\"}}";
        assert_eq!(
            models_of(refused),
            Err("HTTP 401: no key (invalid_api_key)".to_owned())
        );
    }
}
