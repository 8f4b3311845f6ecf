//! One random client of the soak: its connection, its actions, what it saw.

use super::*;

/// The codes of a prompt refused before it ran (each followed by a turn
/// end of status `refused`).
const PROMPT_REFUSALS: [&str; 4] = [
    "prompt_too_long",
    "queue_full",
    "key_queue_full",
    "rate_limited",
];

/// Why a socket was given up.
pub(super) enum End {
    /// It ended (the host closed it, or the store was down at connect).
    Closed,
    /// The host broke a promise, or hung.
    Bug(String),
}

pub(super) struct Conn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    command: bool,
    /// Connected with `?model=slow_echo`: plain prompts run slowly.
    slow: bool,
    /// The last frame sent (its start), for a report of a stall.
    last: String,
}

impl Conn {
    /// Connects and reads the session announcement: its id and `resumed`.
    pub(super) async fn open(
        addr: SocketAddr,
        session: &str,
        command: bool,
        slow: bool,
    ) -> Result<(Conn, String, bool), End> {
        let mut url = format!("ws://{addr}/v1/ws?session={session}");
        if session.is_empty() {
            url = format!("ws://{addr}/v1/ws?");
        }
        if slow {
            url.push_str("&model=slow_echo");
        }
        let mut request = url
            .into_client_request()
            .map_err(|e| End::Bug(e.to_string()))?;
        if command {
            let protocol = HeaderValue::from_static(COMMAND_PROTOCOL);
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", protocol);
        }
        // Refused at the upgrade while the store is down (503), or not at all.
        let connect = tokio_tungstenite::connect_async(request);
        let (ws, _) = timeout(WAIT, connect)
            .await
            .map_err(|_| stall("connect"))?
            .map_err(|_| End::Closed)?;
        let mut conn = Conn {
            ws,
            command,
            slow,
            last: String::new(),
        };
        // Or the store failed to load the session: a diagnostic, close 1013.
        let open = conn.recv().await?;
        let (id, resumed) = (&open.event()["sessionId"], &open.event()["resumed"]);
        match (open.name(), id.as_str(), resumed.as_bool()) {
            ("interaction.session", Some(id), Some(resumed)) => Ok((conn, id.to_owned(), resumed)),
            _ => Err(End::Closed),
        }
    }

    pub(super) async fn send(&mut self, message: Message) -> Result<(), End> {
        self.last = match &message {
            Message::Text(text) => text.as_str().chars().take(120).collect(),
            other => format!("{other:?}").chars().take(60).collect(),
        };
        let sent = timeout(WAIT, self.ws.send(message)).await;
        sent.map_err(|_| stall("send"))?.map_err(|_| End::Closed)
    }

    /// The next frame; pings and pongs are skipped.
    pub(super) async fn recv(&mut self) -> Result<Frame, End> {
        // One deadline for the frame, however many pings come meanwhile.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| stall(&format!("read (after {})", self.last)))?
            {
                Some(Ok(Message::Text(text))) => text.as_str().to_owned(),
                Some(Ok(Message::Binary(_))) => return Err(End::Bug("a binary frame".into())),
                Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(End::Closed),
                Some(Ok(_)) => continue,
            };
            return match serde_json::from_str(&text) {
                // Every frame, as the harness checks its own, against the
                // protocol's schema.
                Ok(json) => match llm_host_tests::check_server_frame(&json) {
                    Ok(()) => Ok(Frame { text, json }),
                    Err(err) => Err(End::Bug(format!(
                        "a frame the schema refuses ({err}): {text}"
                    ))),
                },
                Err(err) => Err(End::Bug(format!(
                    "a frame that is not JSON ({err}): {text}"
                ))),
            };
        }
    }

    /// Frames up to the end of the turn of the prompt just sent;
    /// `Ok(Err(code))` when the prompt was refused before it ran.
    ///
    /// Every socket of a session receives the session's running turn, so a
    /// turn this client left running on a socket it dropped (which runs on
    /// within the reconnect grace) may stream here first. In command mode the
    /// prompt carries `id` (`prompt_id`), and a turn whose end does not repeat
    /// it is another's: its frames are skipped. Plain mode has no ids, so a
    /// session with such a turn is only used in command mode
    /// ([`Client::shared`]).
    pub(super) async fn turn(
        &mut self,
        prompt_id: Option<&str>,
    ) -> Result<Result<Turn, String>, End> {
        let mut frames: Vec<Frame> = Vec::new();
        loop {
            let frame = self.recv().await?;
            if frame.is_diagnostic() && PROMPT_REFUSALS.contains(&frame.diagnostic_code()) {
                self.refused_end().await?;
                return Ok(Err(frame.diagnostic_code().to_owned()));
            }
            if !frame.is_turn_end() {
                frames.push(frame);
                continue;
            }
            let ours = match prompt_id {
                Some(id) => frame.event()["promptId"].as_str() == Some(id),
                None => true,
            };
            if !ours {
                let other = interaction_of(&frame);
                frames.retain(|f| interaction_of(f) != other);
                continue;
            }
            let id = interaction_of(&frame);
            frames.retain(|f| interaction_of(f) == id);
            frames.push(frame);
            return Ok(Ok(Turn { frames }));
        }
    }

    /// Reads the turn end (status `refused`) that follows a prompt's refusal.
    pub(super) async fn refused_end(&mut self) -> Result<(), End> {
        let frame = self.recv().await?;
        if frame.is_turn_end() && frame.event()["status"] == "refused" {
            Ok(())
        } else {
            Err(End::Bug(format!(
                "a refusal without its end: {}",
                frame.text
            )))
        }
    }

    /// Reads up to the diagnostic refusing a frame, which must be `code`. A
    /// late `cancel`'s `nothing_to_cancel` may come first. Frames of a turn
    /// (another socket's, see [`Conn::turn`]) are skipped; an idle `cancel`
    /// stops such a turn if one runs (a cancel from any socket of a session
    /// stops its running turn), which its `cancelled` end shows.
    pub(super) async fn refusal(&mut self, code: &str) -> Result<(), End> {
        loop {
            let frame = self.recv().await?;
            if !interaction_of(&frame).is_empty() {
                let stopped = frame.is_turn_end() && frame.event()["status"] == "cancelled";
                if code == "nothing_to_cancel" && stopped {
                    return Ok(());
                }
                continue;
            }
            let got = frame.diagnostic_code();
            if frame.is_diagnostic() && got == code {
                if PROMPT_REFUSALS.contains(&code) {
                    self.refused_end().await?;
                }
                return Ok(());
            }
            if frame.is_diagnostic() && got != "nothing_to_cancel" {
                return Err(End::Bug(format!("expected `{code}`, got {}", frame.text)));
            }
        }
    }
}

/// The turn a frame belongs to (`meta.interactionId`); empty outside a turn.
fn interaction_of(frame: &Frame) -> &str {
    frame.meta()["interactionId"].as_str().unwrap_or_default()
}

pub(super) fn stall(what: &str) -> End {
    End::Bug(format!("{what}: nothing from the host for {WAIT:?}"))
}

/// Closes with a close handshake, skipping frames still on their way.
pub(super) async fn close(mut conn: Conn) {
    let closing = async {
        let _ = conn.ws.close(None).await;
        while let Some(Ok(message)) = conn.ws.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = timeout(Duration::from_secs(5), closing).await;
}

/// What a client did and saw.
#[derive(Default)]
pub(super) struct Log {
    /// Turns it saw end `completed`: session, prompt and answer.
    pub(super) completed: Vec<(String, String, String)>,
    pub(super) counts: BTreeMap<String, u64>,
    /// Broken promises: a hang, a frame that is not JSON, a wrong answer or
    /// code, a session not resumed, an unexpected HTTP status.
    pub(super) bugs: Vec<String>,
}

pub(super) struct Client {
    pub(super) id: usize,
    pub(super) addr: SocketAddr,
    pub(super) run: String,
    pub(super) rng: Rng,
    pub(super) conn: Option<Conn>,
    /// The session this client uses; empty: the host makes one.
    pub(super) session: String,
    pub(super) session_turns: usize,
    /// Sessions that hold a completed turn, so are resumed.
    pub(super) kept: HashSet<String>,
    /// The session may have a turn running that a dropped socket of this
    /// client left (it runs on within the reconnect grace, and every socket
    /// of the session receives it): its sockets use command mode, whose
    /// prompt ids tell turns apart.
    pub(super) shared: bool,
    pub(super) prompts: usize,
    pub(super) log: Log,
}

/// How a prompt's turn is left.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Read to its end.
    Complete,
    /// Cancelled a moment after it was sent (command mode).
    Cancel,
    /// The socket dropped without a close frame a moment after it was sent.
    Disconnect,
}

impl Client {
    pub(super) fn count(&mut self, what: &str) {
        *self.log.counts.entry(what.to_owned()).or_default() += 1;
    }

    pub(super) fn bug(&mut self, bug: String) {
        self.log.bugs.push(format!("client {}: {bug}", self.id));
    }

    /// Gives the socket up, noting why.
    pub(super) fn ended(&mut self, what: &str, end: End) {
        self.conn = None;
        match end {
            End::Closed => self.count("connection ended"),
            End::Bug(bug) => self.bug(format!("{what}: {bug}")),
        }
    }

    pub(super) fn command_mode(&self) -> bool {
        self.conn.as_ref().is_some_and(|conn| conn.command)
    }

    pub(super) async fn run(mut self, deadline: Instant) -> Log {
        while Instant::now() < deadline {
            if self.conn.is_none() {
                self.connect().await;
                continue;
            }
            match self.rng.below(100) {
                0..=29 => self.prompt(Ending::Complete, None).await,
                30..=39 => self.prompt(Ending::Cancel, None).await,
                40..=44 => self.prompt(Ending::Disconnect, None).await,
                45..=49 => self.too_long().await,
                50..=51 => {
                    let frame = Message::text("y".repeat(70_000));
                    self.refused("frame too large", frame, "frame_too_large")
                        .await;
                    self.conn = None;
                }
                52..=63 => self.bad_frame().await,
                64..=68 => {
                    let bytes: Vec<u8> = (0..=self.rng.below(64) as u8).collect();
                    self.refused("binary frame", Message::binary(bytes), "binary_frame")
                        .await;
                }
                69..=73 if self.command_mode() => {
                    let cancel = Message::text(r#"{"type":"cancel"}"#);
                    self.refused("idle cancel", cancel, "nothing_to_cancel")
                        .await;
                }
                74..=80 => self.reconnect(false).await,
                81..=83 => self.reconnect(true).await,
                _ => self.http_request().await,
            }
            if self.session_turns >= TURNS_PER_SESSION {
                self.reconnect(true).await;
            }
        }
        if let Some(conn) = self.conn.take() {
            close(conn).await;
        }
        self.log
    }

    /// Opens a socket in a random mode on the client's session.
    pub(super) async fn connect(&mut self) {
        let command = self.rng.chance(50) || self.shared;
        let slow = !command && self.rng.chance(30);
        match Conn::open(self.addr, &self.session, command, slow).await {
            Ok((conn, id, resumed)) => {
                self.count(if command {
                    "connect (command)"
                } else {
                    "connect (plain)"
                });
                if !self.session.is_empty() && id != self.session {
                    self.bug(format!("asked for session {}, got {id}", self.session));
                }
                if self.kept.contains(&id) && !resumed {
                    self.bug(format!("{id} held a completed turn, not resumed"));
                }
                self.session = id;
                self.conn = Some(conn);
            }
            Err(End::Closed) => {
                self.count("connect refused");
                sleep(Duration::from_millis(100 + self.rng.below(200) as u64)).await;
            }
            Err(end) => self.ended("connect", end),
        }
    }

    /// A unique prompt: a tag and `words` random words.
    pub(super) fn prompt_text(&mut self, words: usize) -> String {
        self.prompts += 1;
        let mut text = format!("soak-{}-c{}-n{}", self.run, self.id, self.prompts);
        for _ in 0..words {
            text = format!(
                "{text} {}",
                self.rng.pick(&WORDS.split('|').collect::<Vec<_>>())
            );
        }
        text
    }

    /// A prompt (`text`, or a random one), left as `ending` says; a
    /// completed turn must answer what echo answers.
    pub(super) async fn prompt(&mut self, ending: Ending, text: Option<String>) {
        let Some(Conn { command, slow, .. }) = self.conn else {
            return;
        };
        let slow_turn = ending != Ending::Complete || self.rng.chance(20);
        let words = if slow_turn { 3 } else { 0 } + self.rng.below(if slow_turn { 4 } else { 8 });
        let text = text.unwrap_or_else(|| self.prompt_text(words));
        let max_tokens = (command && self.rng.chance(10)).then(|| 1 + self.rng.below(6));
        let prompt_id = format!("p{}", self.prompts);
        let mut frame = json!({ "type": "prompt", "id": prompt_id, "text": text });
        if slow_turn {
            frame["model"] = json!("slow_echo");
        }
        if let Some(max) = max_tokens {
            frame["params"] = json!({ "maxTokens": max, "temperature": 0.5 });
        }
        let frame = if command {
            frame.to_string()
        } else {
            text.clone()
        };
        let pause = Duration::from_millis(self.rng.below(400) as u64);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let result = match conn.send(Message::text(frame)).await {
            Err(end) => Err(end),
            Ok(()) if ending == Ending::Disconnect => {
                sleep(pause).await;
                self.conn = None;
                self.shared = true;
                let what = if command || slow {
                    "disconnect mid-turn"
                } else {
                    "disconnect"
                };
                return self.count(what);
            }
            Ok(()) if ending == Ending::Cancel && command => {
                sleep(pause).await;
                match conn.send(Message::text(r#"{"type":"cancel"}"#)).await {
                    Ok(()) => conn.turn(Some(&prompt_id)).await,
                    Err(end) => Err(end),
                }
            }
            Ok(()) => conn.turn(command.then_some(prompt_id.as_str())).await,
        };
        let turn = match result {
            Ok(Ok(turn)) => turn,
            Ok(Err(code)) => return self.count(&format!("prompt refused: {code}")),
            Err(end) => return self.ended("prompt", end),
        };
        self.session_turns += 1;
        self.count(&format!("turn {}", turn.status()));
        for diagnostic in turn.diagnostics() {
            let code = diagnostic.diagnostic_code();
            self.count(&format!("diagnostic in a turn: {code}"));
        }
        if turn.status() == "completed" {
            let answer = turn.text();
            if answer != echo(&text, max_tokens) {
                self.bug(format!("the answer to {text:?}: {}", turn.dump()));
            }
            self.kept.insert(self.session.clone());
            let session = self.session.clone();
            self.log.completed.push((session, text, answer));
        }
    }

    /// Sends `message`, which the host must refuse with `code`.
    pub(super) async fn refused(&mut self, what: &str, message: Message, code: &str) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let result = match conn.send(message).await {
            Ok(()) => conn.refusal(code).await,
            Err(end) => Err(end),
        };
        match result {
            Ok(()) => self.count(what),
            Err(end) => self.ended(what, end),
        }
    }

    /// A prompt over `server.max_prompt_bytes`: refused, not run.
    pub(super) async fn too_long(&mut self) {
        let text = format!("{} {}", self.prompt_text(0), "x".repeat(MAX_PROMPT));
        let frame = match self.command_mode() {
            true => json!({ "type": "prompt", "text": text }).to_string(),
            false => text,
        };
        self.refused("prompt too long", Message::text(frame), "prompt_too_long")
            .await;
    }

    /// Command mode: malformed JSON, unknown commands, wrong fields. Plain
    /// mode: the same text is a prompt like any other.
    pub(super) async fn bad_frame(&mut self) {
        let tag = self.prompt_text(0);
        let prompt = format!(r#""type":"prompt","text":"{tag}""#);
        let frames = [
            (format!("{{{prompt}"), "bad_frame"),
            (format!("{{{tag}"), "bad_frame"),
            (format!("[{prompt}]"), "bad_frame"),
            (format!(r#"{{{prompt},"text":"b"}}"#), "bad_frame"),
            (format!(r#"{{{prompt},"extra":1}}"#), "bad_frame"),
            (
                format!(r#"{{{prompt},"params":{{"topK":-1}}}}"#),
                "bad_frame",
            ),
            (format!(r#"{{"type":"cancel","why":"{tag}"}}"#), "bad_frame"),
            (format!(r#"{{"type":"{tag}"}}"#), "unknown_command"),
        ];
        let (frame, code) = self.rng.pick(&frames);
        match self.command_mode() {
            true => {
                self.refused("bad command", Message::text(frame), code)
                    .await
            }
            false => self.prompt(Ending::Complete, Some(frame)).await,
        }
    }

    /// Closes the socket; the next step opens another on the same session,
    /// or on a new one (named by the client or by the host).
    pub(super) async fn reconnect(&mut self, new_session: bool) {
        if let Some(conn) = self.conn.take() {
            close(conn).await;
        }
        if new_session {
            self.session_turns = 0;
            self.shared = false;
            self.session = match self.rng.chance(50) {
                true => format!("soak-{}-c{}-s{}", self.run, self.id, self.prompts),
                false => String::new(),
            };
        }
        self.count(if new_session {
            "new session"
        } else {
            "reconnect"
        });
    }

    /// A request the host answers without upgrading: admin GETs, and
    /// upgrades it refuses (the last is not HTTP at all: any answer).
    pub(super) async fn http_request(&mut self) {
        let session = format!("/v1/sessions/{}", self.session);
        let ws = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
        let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let (upgrade, old) = (
            format!("{ws}{key}"),
            format!("{}{key}", ws.replace("13", "8")),
        );
        let requests: [(&str, &str, &[u16]); 13] = [
            ("/healthz", "", &[200]),
            ("/readyz", "", &[200, 503]),
            ("/metrics", "", &[200]),
            ("/v1/plugins", "", &[200]),
            ("/v1/config", "", &[200]),
            ("/v1/sessions?limit=5", "", &[200, 503]),
            (&session, "", &[200, 404, 503]),
            ("/v1/ws?session=bad%20id", &upgrade, &[400]),
            ("/v1/ws?model=nope", &upgrade, &[400]),
            ("/v1/ws", ws, &[400]),
            ("/", &old, &[426]),
            ("/v1/ws", "", &[426]),
            ("", "", &[]),
        ];
        let (path, headers, statuses) = self.rng.pick(&requests);
        let close = if headers.is_empty() {
            "Connection: close\r\n"
        } else {
            ""
        };
        let request = match path {
            "" => "\x16\x03\x01\x02\x00\x01 not http\r\n\r\n".to_owned(),
            _ => format!("GET {path} HTTP/1.1\r\nHost: soak\r\n{headers}{close}\r\n"),
        };
        let what = if headers.is_empty() {
            "HTTP request"
        } else {
            "refused upgrade"
        };
        self.http(what, &request, statuses).await;
    }

    /// Sends `request` on a new connection; the status of its answer must be
    /// one of `statuses` (if any are given).
    pub(super) async fn http(&mut self, what: &str, request: &str, statuses: &[u16]) {
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await.ok()?;
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut head = [0u8; 16];
            stream.read_exact(&mut head).await.ok()?;
            let head = String::from_utf8_lossy(&head).into_owned();
            head.split_whitespace().nth(1)?.parse::<u16>().ok()
        };
        let first = request.lines().next().unwrap_or_default();
        match timeout(WAIT, exchange).await {
            Ok(status) if statuses.is_empty() || status.is_some_and(|s| statuses.contains(&s)) => {
                self.count(what);
            }
            Ok(status) => self.bug(format!("`{first}`: {status:?}, not {statuses:?}")),
            Err(_) => self.bug(format!("`{first}`: no answer for {WAIT:?}")),
        }
    }
}
