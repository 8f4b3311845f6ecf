//! `llm-host chat`, the terminal client, run under a real pseudo-terminal
//! against a real host: the answer streams in, Ctrl-C cancels a turn and a
//! second one quits, `/model`, `/session` and `/new` move between backends
//! and sessions, and a dropped socket is reconnected on the same session,
//! where a turn that was streaming goes on being shown (`?since=N`).
//!
//! The pseudo-terminal is Python's (`pty.fork`, standard library): a small
//! script runs the chat on it and relays bytes both ways, so that `\x03`
//! written to it reaches the chat as SIGINT from the line discipline, as
//! Ctrl-C does. Without `python3` the pty tests say they skipped (and fail
//! under `CI=true`).

#[path = "cutting_proxy.rs"]
pub(crate) mod cutting_proxy;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use llm_host_conformance::support::skip_or_fail;
use llm_host_tests::{artifacts, Config, Host, Workdir};

use crate::common::{free_port, stored_messages};
use cutting_proxy::CuttingProxy;

/// How long the chat may take to show what a test waits for.
const EXPECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `argv[1:]` on a new pseudo-terminal (its controlling terminal):
/// bytes on stdin go to the terminal's master side, what the program
/// writes comes out on stdout; exits with the program's status.
const PTY_BRIDGE: &str = r#"
import os, pty, select, sys
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
inputs = [fd, 0]
while True:
    ready, _, _ = select.select(inputs, [], [])
    if fd in ready:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            break
        os.write(1, data)
    if 0 in ready:
        data = os.read(0, 4096)
        if data:
            os.write(fd, data)
        else:
            inputs.remove(0)
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"#;

/// `llm-host chat ARGS` on a pseudo-terminal.
struct Terminal {
    bridge: Child,
    input: ChildStdin,
    output: Arc<Mutex<Vec<u8>>>,
    /// How much of the transcript the test has read.
    seen: usize,
}

impl Terminal {
    /// Starts the chat with `args` and more environment `env`; None (the
    /// test skipped) without `python3`.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Option<Self> {
        let python = Command::new("python3").arg("-c").arg("import pty").output();
        if !python.is_ok_and(|output| output.status.success()) {
            skip_or_fail("python3 (for its pty module) is not installed");
            return None;
        }
        let mut bridge = Command::new("python3")
            .arg("-c")
            .arg(PTY_BRIDGE)
            .arg(&artifacts().host)
            .arg("chat")
            .args(args)
            .env_remove("NO_COLOR")
            .env_remove("LLM_HOST_KEY")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let input = bridge.stdin.take().expect("stdin is piped");
        let mut stdout = bridge.stdout.take().expect("stdout is piped");
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut chunk) {
                sink.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Some(Self {
            bridge,
            input,
            output,
            seen: 0,
        })
    }

    /// Types `text` (`\x03` is Ctrl-C, `\x04` Ctrl-D).
    fn send(&mut self, text: &str) {
        self.input
            .write_all(text.as_bytes())
            .and_then(|()| self.input.flush())
            .expect("write to the terminal");
    }

    /// Everything the terminal showed so far, carriage returns dropped.
    fn transcript(&self) -> String {
        let bytes = self
            .output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// Waits for `needle` past what was read so far; answers the text up
    /// to its end, and reads past it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + EXPECT_TIMEOUT;
        loop {
            let transcript = self.transcript();
            if let Some(at) = transcript.get(self.seen..).and_then(|new| new.find(needle)) {
                let end = self.seen + at + needle.len();
                let read = transcript[self.seen..end].to_owned();
                self.seen = end;
                return read;
            }
            assert!(
                Instant::now() < deadline,
                "the chat did not show {needle:?} within {EXPECT_TIMEOUT:?}; it showed:\n{}",
                transcript
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the chat to exit.
    fn exit_status(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXPECT_TIMEOUT;
        loop {
            if let Some(status) = self.bridge.try_wait().expect("wait for the chat") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the chat did not exit within {EXPECT_TIMEOUT:?}; it showed:\n{}",
                self.transcript()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // The chat gets SIGHUP when the terminal's master side closes.
        let _ = self.bridge.kill();
        let _ = self.bridge.wait();
    }
}

/// The session id of the chat's `session ID (new|resumed), model NAME`
/// line at the end of `read`.
fn session_of(read: &str) -> String {
    let line = read.lines().last().unwrap_or_default();
    let after = line.rsplit("session ").next().unwrap_or_default();
    after.split(" (").next().unwrap_or_default().to_owned()
}

// A prompt streams its answer and the usage (dimmed on a terminal); /model
// lists and switches backends on the same session and refuses an unknown
// one; Ctrl-C cancels a slow turn and the chat serves the next prompt; a
// second Ctrl-C while a turn is cancelling quits with status 0.
#[tokio::test]
async fn the_chat_streams_cancels_switches_backends_and_quits() {
    let host = Host::start_default();
    let url = host.url("/v1/ws");
    let Some(mut chat) = Terminal::start(&["--url", &url], &[]) else {
        return;
    };
    let id = session_of(&chat.expect("(new), model echo"));
    assert!(id.starts_with("session-"), "{id:?}");
    chat.expect("> ");
    chat.send("hello there\n");
    chat.expect("echo: hello there\n");
    chat.expect("\x1b[2musage: 2 in, 3 out, 5 total\x1b[0m\n");

    chat.send("/model\n/session\n");
    let listed = chat.expect(&format!("{id}\n"));
    for line in ["* echo\n", "  slow\n", "  slow_echo\n"] {
        assert!(listed.contains(line), "{line:?} in:\n{listed}");
    }
    chat.send("/model nope\n");
    chat.expect("(unknown_model)");
    chat.send("/model slow\n");
    chat.expect(&format!("session {id} (resumed), model slow"));
    chat.send("go\n");
    chat.expect("token1");
    chat.send("\x03");
    chat.expect("cancelling the turn");
    chat.expect("[cancelled]");

    chat.send("/model echo\n");
    chat.expect(&format!("session {id} (resumed), model echo"));
    chat.send("still here\n");
    chat.expect("echo: still here\n");
    chat.expect("usage: ");
    let messages = stored_messages(&host, &id).await;
    assert_eq!(messages.len(), 6, "{messages:?}");
    assert_eq!(
        messages[..3],
        [
            "user: hello there",
            "assistant: echo: hello there",
            "user: go"
        ],
        "{messages:?}"
    );
    assert!(
        messages[3].starts_with("assistant: token0 token1"),
        "{messages:?}"
    );
    assert_eq!(
        messages[4..],
        ["user: still here", "assistant: echo: still here"]
    );

    chat.send("/model slow\n");
    chat.expect("model slow");
    chat.send("more\n");
    chat.expect("token1");
    chat.send("\x03");
    chat.expect("cancelling the turn");
    // The turn may end before the second Ctrl-C arrives: idle, it quits too.
    chat.send("\x03");
    let status = chat.exit_status();
    assert!(status.success(), "{status}:\n{}", chat.transcript());
}

// --session names the session; /session prints it; /new starts another
// (the host's id, no history); /session ID goes back to the first, whose
// history reaches the model again (echo counts it in the input tokens).
// NO_COLOR: no escapes at all. Ctrl-D quits with status 0.
#[tokio::test]
async fn the_chat_moves_between_sessions() {
    let host = Host::start_default();
    let url = host.url("/v1/ws");
    let Some(mut chat) = Terminal::start(
        &["--url", &url, "--session", "chat-a"],
        &[("NO_COLOR", "1")],
    ) else {
        return;
    };
    chat.expect("session chat-a (new), model echo\n");
    chat.send("one two three\n");
    chat.expect("usage: 3 in, 4 out, 7 total\n");
    chat.send("/session\n");
    chat.expect("/session\nchat-a\n");

    chat.send("/new\n");
    let other = session_of(&chat.expect("(new), model echo"));
    assert!(other.starts_with("session-"), "{other:?}");
    chat.send("four\n");
    chat.expect("usage: 1 in, 2 out, 3 total\n");

    chat.send("/session chat-a\n");
    chat.expect("session chat-a (resumed), model echo\n");
    chat.send("five\n");
    chat.expect("echo: five\n");
    chat.expect("usage: 8 in, 2 out, 10 total\n");

    chat.send("\x04");
    let status = chat.exit_status();
    assert!(status.success(), "{status}:\n{}", chat.transcript());
    assert!(
        !chat.transcript().contains('\x1b'),
        "no escapes under NO_COLOR:\n{:?}",
        chat.transcript()
    );
    assert_eq!(
        stored_messages(&host, "chat-a").await,
        [
            "user: one two three",
            "assistant: echo: one two three",
            "user: five",
            "assistant: echo: five"
        ]
    );
    assert_eq!(
        stored_messages(&host, &other).await,
        ["user: four", "assistant: echo: four"]
    );
}

/// A host on `port` keeping its sessions in a SQLite file in `dir`.
fn sqlite_host(port: u16, dir: &std::path::Path) -> Host {
    let config = Config {
        listen: format!("127.0.0.1:{port}"),
        store: "shared".to_owned(),
        extra: format!(
            "\n[stores.shared]\nplugin = \"sqlite\"\nsettings = {{ path = \"{}\" }}\n",
            dir.join("sessions.db").display()
        ),
        ..Config::default()
    };
    let workdir = Workdir::with_config(&config);
    let library = artifacts().host.with_file_name("libllm_plugin_sqlite.so");
    std::fs::copy(
        &library,
        workdir.path().join("plugins/libllm_plugin_sqlite.so"),
    )
    .unwrap_or_else(|err| panic!("copy {}: {err}", library.display()));
    Host::start_in(workdir, &[])
}

// The host is killed and started again on its port: the chat says the
// connection was lost, keeps a prompt typed meanwhile, reconnects to the
// same session (kept in SQLite) and sends it; its history is all there.
#[tokio::test]
async fn the_chat_reconnects_to_its_session_when_the_host_comes_back() {
    let dir = tempfile::tempdir().expect("a directory for the sqlite file");
    let port = free_port();
    let host = sqlite_host(port, dir.path());
    let url = host.url("/v1/ws");
    let Some(mut chat) = Terminal::start(&["--url", &url], &[]) else {
        return;
    };
    let id = session_of(&chat.expect("(new), model echo"));
    chat.send("remember me\n");
    chat.expect("usage: 2 in, 3 out, 5 total");

    drop(host);
    chat.expect("connection lost");
    chat.send("still there\n");
    chat.expect("the prompt is sent once the chat reconnects");

    let host = sqlite_host(port, dir.path());
    chat.expect(&format!("reconnected: session {id} (resumed), model echo"));
    chat.expect("echo: still there\n");
    chat.expect("usage: 7 in, 3 out, 10 total");
    assert_eq!(
        stored_messages(&host, &id).await,
        [
            "user: remember me",
            "assistant: echo: remember me",
            "user: still there",
            "assistant: echo: still there"
        ]
    );
    chat.send("/quit\n");
    let status = chat.exit_status();
    assert!(status.success(), "{status}:\n{}", chat.transcript());
}

const ALICE: &str = "alice-key-0123456789abcdef";

// Without a terminal: prompts piped in are answered in order, the chat
// waits for their turns at the end of input and exits 0, with no escapes
// and no `> ` prompt. The key comes from LLM_HOST_KEY; without it the
// host's refusal is shown and the exit status is 1.
#[test]
fn the_chat_answers_piped_prompts_with_the_key_of_its_environment() {
    let host = Host::start(&Config {
        extra: format!("\n[auth]\nkeys = [{{ id = \"alice\", key = \"{ALICE}\" }}]\n"),
        ..Config::default()
    });
    let url = host.url("/v1/ws");
    let run = |key: Option<&str>| {
        let mut command = Command::new(&artifacts().host);
        command
            .args(["chat", "--url", &url])
            .env_remove("NO_COLOR")
            .env_remove("LLM_HOST_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(key) = key {
            command.env("LLM_HOST_KEY", key);
        }
        let mut child = command.spawn().expect("spawn llm-host chat");
        // Refused, the chat may be gone before it reads them.
        let _ = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(b"first prompt\n/model slow_echo\nsecond one\n");
        let deadline = Instant::now() + EXPECT_TIMEOUT;
        while child.try_wait().expect("wait for the chat").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the chat did not exit at the end of its input");
            }
            thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("the chat's output")
    };

    let refused = run(None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("HTTP 401"), "{stderr}");

    let output = run(Some(ALICE));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout,
        "echo: first prompt\nusage: 2 in, 3 out, 5 total\n\
         echo: second one\nusage: 7 in, 3 out, 10 total\n",
        "{stderr}"
    );
    assert!(stderr.contains("model slow_echo"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

// The host closes an idle connection (server.idle_timeout_secs): the chat
// says so, does not reconnect by itself, and reopens the session at the
// next prompt, which it sends there.
#[tokio::test]
async fn the_chat_reopens_a_connection_closed_for_idleness_at_the_next_prompt() {
    let host = Host::start(&Config {
        server_extra: "idle_timeout_secs = 1".to_owned(),
        ..Config::default()
    });
    let url = host.url("/v1/ws");
    let Some(mut chat) = Terminal::start(&["--url", &url, "--session", "chat-idle"], &[]) else {
        return;
    };
    chat.expect("session chat-idle (new), model echo");
    chat.send("hello\n");
    chat.expect("echo: hello\n");
    chat.expect("the host closed the idle connection; the next prompt reopens it");
    chat.send("after a nap\n");
    chat.expect("reconnected: session chat-idle (resumed), model echo");
    chat.expect("echo: after a nap\n");
    chat.expect("usage: 6 in, 4 out, 10 total");
    assert_eq!(
        stored_messages(&host, "chat-idle").await,
        [
            "user: hello",
            "assistant: echo: hello",
            "user: after a nap",
            "assistant: echo: after a nap"
        ]
    );
}

/// `text` without ANSI escapes (`ESC [ ... m`).
fn without_escapes(text: &str) -> String {
    let mut plain = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('\x1b') {
        plain.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
    }
    plain.push_str(rest);
    plain
}

// The connection between the chat and the host is cut in the middle of a
// slow turn, and new connections are refused for a while (the host keeps
// running, and so does the turn, within server.reconnect_grace_secs). The
// chat reconnects with ?since= the last number it had: the words sent
// while it was away are replayed and the rest streamed, so the answer is
// shown whole and once, with its end and usage; the next prompt is served.
#[tokio::test]
async fn the_chat_goes_on_showing_a_turn_across_a_dropped_connection() {
    let host = Host::start_default();
    let proxy = CuttingProxy::start(host.addr());
    let url = format!("ws://{}/v1/ws", proxy.addr);
    let Some(mut chat) = Terminal::start(&["--url", &url, "--model", "slow_echo"], &[]) else {
        return;
    };
    let id = session_of(&chat.expect("(new), model slow_echo"));
    let words: Vec<String> = (1..=30).map(|n| format!("w{n:02}")).collect();
    let prompt = words.join(" ");
    chat.send(&format!("{prompt}\n"));
    chat.expect(&format!("{prompt}\n"));
    let mut shown = chat.expect(" w04");
    proxy.cut(Duration::from_millis(700));
    shown.push_str(&chat.expect("connection lost"));
    // (new: the memory store has the session once its first turn ended)
    shown.push_str(&chat.expect(&format!("reconnected: session {id} (")));
    shown.push_str(&chat.expect("usage: 30 in, 31 out, 61 total"));

    // The answer's lines, the chat's notes left out, make the whole answer.
    let shown = without_escapes(&shown);
    let answer: String = shown
        .lines()
        .filter(|line| !line.contains("connection lost") && !line.contains("reconnected: "))
        .filter(|line| !line.starts_with("usage: "))
        .collect();
    assert_eq!(
        answer,
        format!("echo: {prompt}"),
        "the chat showed:\n{shown}"
    );
    // The cut came in the middle of the turn, and nothing was lost.
    let before = shown
        .split_once("connection lost")
        .map_or("", |(before, _)| before);
    assert!(!before.contains(" w30"), "{shown}");
    for lost in ["no complete answer", "were not run", "no longer kept"] {
        assert!(!shown.contains(lost), "{lost:?} in:\n{shown}");
    }

    chat.send("and after\n");
    chat.expect("echo: and after\n");
    chat.expect("usage: ");
    assert_eq!(
        stored_messages(&host, &id).await,
        [
            format!("user: {prompt}"),
            format!("assistant: echo: {prompt}"),
            "user: and after".to_owned(),
            "assistant: echo: and after".to_owned(),
        ]
    );
    chat.send("/quit\n");
    let status = chat.exit_status();
    assert!(status.success(), "{status}:\n{}", chat.transcript());
}
