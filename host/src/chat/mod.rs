//! `llm-host chat [--url URL] [--session ID] [--model NAME] [--key KEY]`:
//! a terminal chat with a running host.
//!
//! It connects in command mode, prints the session's id, reads stdin line
//! by line ([`input`]) and streams each answer to stdout ([`render`]); a
//! line typed while a turn runs is taken once the turn has ended. Ctrl-C
//! sends `cancel` while a turn runs; a second Ctrl-C in a turn already
//! cancelling, or one while no turn runs, quits. `/model`, `/session` and
//! `/new` reconnect on another backend or session; `/quit` and the end of
//! input (Ctrl-D) quit, the latter after the running turns. A dropped
//! socket is reconnected with backoff on the same session
//! ([`connection`]), asking for the frames after the last numbered one the
//! chat received (`?since=N`): a turn running at the drop goes on being
//! shown where it stopped, and ends as it would have. Prompts typed
//! meanwhile are sent once the chat is back.

mod connection;
mod frames;
mod input;
mod reconnect;
mod render;

use std::collections::VecDeque;
use std::future::Future;
use std::io::{BufRead, IsTerminal};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Instant;

use tokio::sync::mpsc;

use connection::{connect, ConnectError, Endpoint, Incoming, Link};
use frames::{Event, Frame};
use input::{parse_args, parse_input, Command, Input, Options};
use render::{Screen, Style};

/// The usage text of `llm-host chat`.
pub const USAGE: &str = "\
usage: llm-host chat [--url URL] [--session ID] [--model NAME] [--key KEY]

A terminal chat with a running llm-host.

  --url URL       the host's WebSocket (default ws://127.0.0.1:3000/v1/ws,
                  the address of the shipped config.toml)
  --session ID    resume session ID (default: a new session; its id is printed)
  --model NAME    use backend NAME (default: the host's default backend)
  --key KEY       API key (default: $LLM_HOST_KEY)

Type a prompt and press Enter; the answer streams in. Ctrl-C cancels the
running turn (a second Ctrl-C quits); Ctrl-D or /quit quits.";

/// What `/help` prints.
const COMMANDS: &str = "\
  /model NAME     switch to backend NAME, same session
  /model          list the host's backends
  /session ID     resume session ID
  /session        print this session's id
  /new            start a new session
  /quit           quit
  //TEXT          send /TEXT as a prompt";

/// `llm-host chat ARGS`.
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let options = match parse_args(args) {
        Ok(Command::Chat(options)) => *options,
        Ok(Command::Help) => {
            println!("{USAGE}\n\n{COMMANDS}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("llm-host chat: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let key = options
        .key
        .clone()
        .or_else(|| std::env::var("LLM_HOST_KEY").ok())
        .filter(|key| !key.is_empty());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llm-host chat: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(options, key));
    // The thread reading stdin may be blocked in a read: do not wait for it.
    runtime.shutdown_background();
    code
}

async fn run(options: Options, key: Option<String>) -> ExitCode {
    let mut screen = Screen::new(std::io::stdout(), std::io::stderr(), Style::detect());
    let Options {
        endpoint,
        session,
        model,
        ..
    } = options;
    // Ctrl-C keeps its default (quit) until the chat is connected.
    let (link, open) = match connect(
        &endpoint,
        key.as_deref(),
        session.as_deref(),
        model.as_deref(),
        None,
    )
    .await
    {
        Ok(connected) => connected,
        Err(err) => {
            screen.error(&format!("cannot connect: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let mut interrupts = match Interrupts::new() {
        Ok(interrupts) => interrupts,
        Err(err) => {
            screen.error(&format!("cannot handle Ctrl-C: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let mut chat = Chat {
        endpoint,
        key,
        session: None,
        model,
        backend: String::new(),
        state: State::Up(link),
        screen,
        interactive: std::io::stdin().is_terminal() && std::io::stdout().is_terminal(),
        pending: VecDeque::new(),
        outbox: VecDeque::new(),
        cancelling: false,
        idle_closed: false,
        stored: false,
        prompts: 0,
        last_sequence: 0,
        in_turn: false,
    };
    chat.opened(&open, "", true);
    chat.run(read_lines(), &mut interrupts).await
}

/// Lines of stdin, read on a thread of their own; the channel ends with
/// the input.
fn read_lines() -> mpsc::UnboundedReceiver<String> {
    let (lines, receiver) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if lines
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    receiver
}

/// Ctrl-C (SIGINT), each press once.
struct Interrupts {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        let interrupts = Self {
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        };
        #[cfg(not(unix))]
        let interrupts = Self {};
        Ok(interrupts)
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if self.signal.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<(Link, Event), ConnectError>> + Send>>;

/// The connection.
enum State {
    /// Connected.
    Up(Link),
    /// Dropped; an attempt to reconnect is under way.
    Reconnecting {
        /// When the connection dropped.
        since: Instant,
        /// Attempts made so far.
        attempt: u32,
        /// This attempt (a pause, then a connection).
        connecting: Connecting,
    },
    /// Closed by the host for idleness; reopened at the next prompt.
    Dormant,
}

/// What woke the chat.
enum Step {
    Line(Option<String>),
    Interrupt,
    Socket(Incoming),
    Connected(Result<(Link, Event), ConnectError>),
}

async fn next_on(state: &mut State) -> Step {
    match state {
        State::Up(link) => Step::Socket(link.next().await),
        State::Reconnecting { connecting, .. } => Step::Connected(connecting.await),
        State::Dormant => std::future::pending().await,
    }
}

struct Chat {
    endpoint: Endpoint,
    key: Option<String>,
    /// The session's id, once the host announced it.
    session: Option<String>,
    /// The backend asked for (none: the host's default).
    model: Option<String>,
    /// The backend the host announced.
    backend: String,
    state: State,
    screen: Screen<std::io::Stdout, std::io::Stderr>,
    /// Whether to show a `> ` prompt (stdin and stdout are terminals).
    interactive: bool,
    /// Ids of the prompts sent whose turn has not ended.
    pending: VecDeque<String>,
    /// Prompts typed while the chat was not connected.
    outbox: VecDeque<String>,
    /// A cancel was sent for the running turn.
    cancelling: bool,
    /// The host said it closes the connection for idleness.
    idle_closed: bool,
    /// The session is in the host's store: it was resumed, or a turn ran.
    stored: bool,
    /// Prompts sent so far (their ids count them).
    prompts: u64,
    /// The last sequence number the chat has of the session: the
    /// announcement's, then that of each numbered frame received. A
    /// reconnection asks for the frames after it.
    last_sequence: u64,
    /// Numbered frames of a turn came and its end did not yet: a turn runs
    /// (it goes on at the host when the socket drops).
    in_turn: bool,
}

impl Chat {
    async fn run(
        &mut self,
        mut lines: mpsc::UnboundedReceiver<String>,
        interrupts: &mut Interrupts,
    ) -> ExitCode {
        let mut input_ended = false;
        // Lines typed while a turn runs, taken in order once it has ended.
        let mut held: VecDeque<String> = VecDeque::new();
        loop {
            while self.pending.is_empty() {
                let Some(line) = held.pop_front() else {
                    break;
                };
                if let Some(code) = self.typed(&line).await {
                    self.screen.end_line();
                    return code;
                }
            }
            if !self.pending.is_empty() {
                // A turn runs: Ctrl-C cancels it.
            } else if !self.outbox.is_empty() {
                // Prompts wait for a connection: the next `> ` follows them.
            } else if input_ended {
                return ExitCode::SUCCESS;
            } else if self.interactive {
                self.screen.prompt();
            }
            let step = tokio::select! {
                line = lines.recv(), if !input_ended => Step::Line(line),
                () = interrupts.next() => Step::Interrupt,
                step = next_on(&mut self.state) => step,
            };
            let done = match step {
                Step::Line(Some(line)) => {
                    self.screen.entered();
                    if self.pending.is_empty() {
                        self.typed(&line).await
                    } else {
                        held.push_back(line);
                        None
                    }
                }
                Step::Line(None) => {
                    input_ended = true;
                    self.screen.end_line();
                    None
                }
                Step::Interrupt => self.interrupted().await,
                Step::Socket(Incoming::Frame(frame)) => {
                    self.received(frame);
                    None
                }
                Step::Socket(Incoming::Closed(closed)) => self.lost(&closed.reason, closed.code),
                Step::Connected(result) => self.reconnected(result).await,
            };
            if let Some(code) = done {
                self.screen.end_line();
                return code;
            }
        }
    }

    /// Says which session and backend a new connection has. `fresh`: not
    /// a reconnection asking for what it missed, whose number the chat
    /// keeps (the host sends on from it).
    fn opened(&mut self, open: &Event, prefix: &str, fresh: bool) {
        if let Event::Open {
            session,
            model,
            resumed,
            last_sequence,
        } = open
        {
            let how = if *resumed { "resumed" } else { "new" };
            self.screen
                .note(&format!("{prefix}session {session} ({how}), model {model}"));
            self.session = Some(session.clone());
            self.backend.clone_from(model);
            self.stored = *resumed;
            if fresh {
                self.last_sequence = *last_sequence;
                self.in_turn = false;
            }
        }
    }

    async fn typed(&mut self, line: &str) -> Option<ExitCode> {
        match parse_input(line) {
            Input::Nothing => {}
            Input::Quit => return Some(ExitCode::SUCCESS),
            Input::Help => self.screen.line(COMMANDS),
            Input::Bad(why) => self.screen.error(&why),
            Input::Prompt(text) => {
                self.outbox.push_back(text);
                match self.state {
                    State::Up(_) => return self.flush().await,
                    State::Reconnecting { .. } => self
                        .screen
                        .note("not connected: the prompt is sent once the chat reconnects"),
                    State::Dormant => self.reconnect(Instant::now(), 0),
                }
            }
            Input::Model(None) => {
                match connection::models(&self.endpoint, self.key.as_deref()).await {
                    Ok(models) => {
                        for model in models {
                            let mark = if model == self.backend { '*' } else { ' ' };
                            self.screen.line(&format!("{mark} {model}"));
                        }
                    }
                    Err(err) => self
                        .screen
                        .error(&format!("cannot list the backends: {err}")),
                }
            }
            Input::Model(Some(model)) => {
                let session = self.session.clone();
                self.switch(session, Some(model)).await;
            }
            Input::Session(None) => match self.session.clone() {
                Some(session) => self.screen.line(&session),
                None => self.screen.note("no session yet"),
            },
            Input::Session(Some(session)) => {
                let model = self.model.clone();
                self.switch(Some(session), model).await;
            }
            Input::New => {
                let model = self.model.clone();
                self.switch(None, model).await;
            }
        }
        None
    }

    /// Sends the prompts waiting in the outbox, if connected.
    async fn flush(&mut self) -> Option<ExitCode> {
        while let Some(text) = self.outbox.front() {
            let State::Up(link) = &mut self.state else {
                return None;
            };
            let id = format!("chat-{}", self.prompts + 1);
            match link.prompt(&id, text).await {
                Ok(()) => {
                    self.prompts += 1;
                    self.pending.push_back(id);
                    self.outbox.pop_front();
                }
                Err(err) => return self.lost(&format!("sending failed: {err}"), None),
            }
        }
        None
    }

    /// Ctrl-C: cancel the running turn, or quit.
    async fn interrupted(&mut self) -> Option<ExitCode> {
        if let (State::Up(link), false, false) =
            (&mut self.state, self.pending.is_empty(), self.cancelling)
        {
            match link.cancel().await {
                Ok(()) => {
                    self.cancelling = true;
                    self.screen
                        .note("cancelling the turn (press Ctrl-C again to quit)");
                    return None;
                }
                Err(err) => return self.lost(&format!("sending failed: {err}"), None),
            }
        }
        Some(ExitCode::SUCCESS)
    }

    /// A frame of the host: its number is kept, its events shown.
    fn received(&mut self, frame: Frame) {
        // The host sends each numbered frame once, in order.
        if let Some(sequence) = frame.sequence {
            self.last_sequence = sequence;
            self.in_turn = true;
        }
        for event in &frame.events {
            self.shown(event);
        }
    }

    fn shown(&mut self, event: &Event) {
        match event {
            Event::TurnEnd { prompt_id, status } => {
                self.in_turn = false;
                self.stored |= status != "refused";
                match prompt_id {
                    Some(id) => self.pending.retain(|pending| pending != id),
                    None => {
                        self.pending.pop_front();
                    }
                }
                self.cancelling = false;
            }
            // A cancel that crossed its turn's end on the wire.
            Event::Diagnostic { code, .. } if code == "nothing_to_cancel" => return,
            Event::Diagnostic { code, .. } if code == "idle_timeout" => {
                self.idle_closed = true;
                return;
            }
            // Sent at a reconnection: what the chat missed is no longer all
            // kept (a turn longer than server.replay_frames, or an older one).
            Event::Diagnostic { code, .. } if code == "replay_gap" => {
                self.screen
                    .note("[part of what was sent while disconnected is no longer kept: it is missing here]");
                return;
            }
            _ => {}
        }
        self.screen.show(event);
    }

    /// Moves to another session or backend: a new connection, which
    /// replaces the current one only once the host accepted it. No turn
    /// runs: lines typed during a turn wait for its end.
    async fn switch(&mut self, session: Option<String>, model: Option<String>) {
        match connect(
            &self.endpoint,
            self.key.as_deref(),
            session.as_deref(),
            model.as_deref(),
            None,
        )
        .await
        {
            Ok((link, open)) => {
                if let State::Up(old) = std::mem::replace(&mut self.state, State::Up(link)) {
                    old.close().await;
                }
                self.model = model;
                self.idle_closed = false;
                self.opened(&open, "", true);
                // Prompts typed while disconnected go to the new session.
                let _ = self.flush().await;
            }
            Err(err) => self.screen.error(&err.to_string()),
        }
    }
}
