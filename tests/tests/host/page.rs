//! The chat page on `GET /`: its headers over raw HTTP, and the page itself
//! driven in headless Chromium through chromedriver by the Python `selenium`
//! package, against a real host: backends, a streamed turn with its usage,
//! cancel, an error, resuming a past session, an API key, tool calls
//! answered in the page, and a turn followed across a dropped socket.
//!
//! The browser tests need Debian's `chromium` and `chromium-driver`
//! (`/usr/bin/chromium`, `/usr/bin/chromedriver`) and `python3` with
//! `selenium` (`.ci/run` installs them); without them they say they skipped,
//! and fail under `CI=true`. The open-mode test saves a screenshot of its
//! last finished turn as `chat-page.png` in the target directory, the tools
//! test one of a turn waiting for its tool results as `chat-page-tools.png`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_host_conformance::support::skip_or_fail;
use llm_host_tests::{http, http_with, Config, Host};
use serde_json::Value;

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-0123456789abcdef00";

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

// A plain `GET /` is the page, with its policy; it needs no key even when
// keys are configured (the socket on `/` still does), and a page of another
// origin gets no page either. An upgrade on `/` is still an upgrade (a bad
// version is still 426, as on `/v1/ws`).
#[tokio::test]
async fn get_root_serves_the_page_and_upgrades_still_work() {
    let host = Host::start(&Config {
        extra: format!("\n[auth]\nkeys = [{{ id = \"alice\", key = \"{ALICE}\" }}]\n"),
        ..Config::default()
    });
    let addr = host.addr();
    let page = http(addr, "GET", "/?session=abc").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let head = &page.headers;
    assert_eq!(
        header(head, "content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        header(head, "x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(header(head, "cache-control").as_deref(), Some("no-cache"));
    let policy = header(head, "content-security-policy").expect("a CSP header");
    for part in [
        "default-src 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        &format!("connect-src 'self' ws://{addr} wss://{addr};"),
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(part), "{part} not in {policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    assert!(page.body.starts_with("<!doctype html>"), "{}", page.body);
    assert!(page.body.contains("<title>llm-host chat</title>"));
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));

    let upgrade = host.http_upgrade("/").await;
    assert_eq!(upgrade.status, 401, "{}", upgrade.body);
    let upgrade = host.http_upgrade(&format!("/?token={ALICE}")).await;
    assert_eq!(upgrade.status, 101, "{}", upgrade.headers);
    let old = http_with(
        addr,
        "GET",
        &format!("/?token={ALICE}"),
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "8"),
        ],
    )
    .await;
    assert_eq!(old.status, 426, "{}", old.body);

    let foreign = http_with(addr, "GET", "/", &[("Origin", "http://evil.example")]).await;
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    let post = http(addr, "POST", "/").await;
    assert_eq!(post.status, 405, "{}", post.body);
}

/// Whether Chromium, its driver and `selenium` are here; says it skipped
/// (fails under CI) when not.
fn browser() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|path| !Path::new(path).exists())
        .collect();
    if !missing.is_empty() {
        skip_or_fail(&format!(
            "{} missing (apt-get install chromium chromium-driver)",
            missing.join(", ")
        ));
        return false;
    }
    let selenium = Command::new("python3")
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !selenium {
        skip_or_fail("python3 with the `selenium` package is not installed (pip install selenium)");
    }
    selenium
}

const SCRIPT: &str = r##"
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

base, scenario, shot, key = sys.argv[1:5]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1100,760"]:
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"),
                          options=options)
wait = WebDriverWait(driver, 20, poll_frequency=0.02)

def out(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)

def find(css):
    return driver.find_element(By.CSS_SELECTOR, css)

def find_all(css):
    return driver.find_elements(By.CSS_SELECTOR, css)

def connected(other=None):
    """The session id the page announces, once it has one (other than `other`)."""
    def announced(_):
        id = find("#status").get_attribute("data-session")
        return id if id and id != other else None
    return wait.until(announced)

def submit(text, backend):
    wait.until(lambda _: find_all(f'#backend option[value="{backend}"]'))
    Select(find("#backend")).select_by_value(backend)
    before = len(find_all(".msg.assistant"))
    box = find("#prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait.until(lambda _: len(find_all(".msg.assistant")) > before)
    return find_all(".msg.assistant")[-1]

def finished(message, partial=None):
    def ended(_):
        state = message.get_attribute("data-status")
        text = message.find_element(By.CSS_SELECTOR, ".text").text
        if not state and text and partial is not None and not partial:
            partial.append(text)
        return state
    state = wait.until(ended)
    return {"status": state,
            "text": message.find_element(By.CSS_SELECTOR, ".text").text,
            "meta": message.find_element(By.CSS_SELECTOR, ".meta").text,
            "errors": [e.text for e in message.find_elements(By.CSS_SELECTOR, ".error")]}

def turn(text, backend):
    partial = []
    result = finished(submit(text, backend), partial)
    return {**result, "partial": partial[0] if partial else None}

def messages():
    return [[m.get_attribute("class"), m.find_element(By.CSS_SELECTOR, ".text").text
             if "assistant" in m.get_attribute("class") else m.text]
            for m in find_all("#log .msg")]

try:
    driver.get(base + "/")
    if scenario == "open":
        first = connected()
        out("backends", options=[o.get_attribute("value") for o in find_all("#backend option")])
        out("streamed", session=first, **turn("Hello from the chat page", "slow_echo"))

        find("#new").click()
        second = connected(first)
        message = submit("go", "slow")
        wait.until(lambda _: message.find_element(By.CSS_SELECTOR, ".text").text)
        find("#cancel").click()
        out("cancelled", session=second, **finished(message))
        out("failed", **turn("one two three", "failing"))

        wait.until(lambda _: find_all(f'#sessions button[data-id="{first}"]'))
        out("listed", sessions=[b.get_attribute("data-id") for b in find_all("#sessions button")])
        find(f'#sessions button[data-id="{first}"]').click()
        connected(second)
        out("history", session=find("#status").get_attribute("data-session"),
            messages=messages())
        out("resumed", **turn("and one more", "echo"))
        driver.save_screenshot(shot)
    elif scenario == "keys":
        wait.until(lambda _: all(word in find("#log").text
                                 for word in ["could not connect", "invalid_api_key"]))
        out("no_key", log=find("#log").text)
        field = find("#key")
        field.send_keys(key)
        field.send_keys(Keys.TAB)
        session = connected()
        out("keyed", session=session, **turn("hi with a key", "echo"))
        driver.refresh()
        connected()
        wait.until(lambda _: find_all("#sessions button"))
        out("reloaded", key=find("#key").get_attribute("value"),
            sessions=[b.get_attribute("data-id") for b in find_all("#sessions button")])
    elif scenario == "tools":
        session = connected()
        wait.until(lambda _: find_all('#backend option[value="tools"]'))
        Select(find("#backend")).select_by_value("tools")
        # The same session, on a socket opened with ?model=tools.
        wait.until(lambda _: find("#status").text.endswith("· tools"))
        # Not JSON: the prompt is not sent, and stays in its box.
        field = find("#tools")
        field.send_keys('[{"name": "lookup"')
        box = find("#prompt")
        box.send_keys("will it rain?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda _: "tools:" in find("#log").text)
        out("bad_tools", log=find("#log").text, prompt=box.get_attribute("value"),
            assistants=len(find_all(".msg.assistant")))
        box.clear()
        field.clear()
        field.send_keys(json.dumps([
            {"name": "lookup", "description": "Looks a word up",
             "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
            {"name": "weather", "description": "Today's weather",
             "parameters": {"type": "object"}}]))
        field.send_keys(Keys.TAB)
        message = submit("will it rain?", "tools")
        wait.until(lambda _: len(message.find_elements(By.CSS_SELECTOR, ".answer")) == 2)
        calls = message.find_elements(By.CSS_SELECTOR, ".call")
        out("asked", session=session, status=message.get_attribute("data-status"),
            calls=[[c.get_attribute("data-call"), c.find_element(By.CSS_SELECTOR, ".tool").text]
                   for c in calls],
            buttons=[b.text for b in message.find_elements(By.CSS_SELECTOR, ".answer button")],
            focused=driver.switch_to.active_element.get_attribute("placeholder"),
            stored=driver.execute_script("return localStorage.getItem('llm-host.tools')"))
        driver.save_screenshot(shot)
        # A result by Enter in its field, an error by its button.
        first = calls[0].find_element(By.CSS_SELECTOR, ".answer input")
        first.send_keys("<b>wet</b> days")
        first.send_keys(Keys.ENTER)
        wait.until(lambda _: calls[0].find_elements(By.CSS_SELECTOR, ".result"))
        time.sleep(0.3)
        out("one_answered", status=message.get_attribute("data-status"),
            forms=len(message.find_elements(By.CSS_SELECTOR, ".answer")))
        calls[1].find_element(By.CSS_SELECTOR, ".answer input").send_keys("the service is down")
        calls[1].find_element(By.CSS_SELECTOR, ".answer .fail").click()
        out("answered", **finished(message),
            results=[r.text for r in message.find_elements(By.CSS_SELECTOR, ".result")],
            markup=len(message.find_elements(By.CSS_SELECTOR, "b")),
            forms=len(message.find_elements(By.CSS_SELECTOR, ".answer")))
        # Without tools the same backend answers at once.
        field.clear()
        field.send_keys(Keys.TAB)
        out("untooled", **turn("no tools now", "tools"))
    elif scenario == "reconnect":
        connected()
        message = submit(" ".join(f"w{n:02}" for n in range(1, 31)), "slow_echo")
        wait.until(lambda _: "w04" in message.find_element(By.CSS_SELECTOR, ".text").text)
        # The test cuts the page's connection when this file appears.
        open(key, "w").close()
        wait.until(lambda _: "connection lost" in find("#log").text)
        out("followed", **finished(message), log=find("#log").text)
    out("console", entries=[e["message"] for e in driver.get_log("browser")])
except Exception:
    # What the page said on the way, for the failure's message.
    out("console", entries=[e["message"] for e in driver.get_log("browser")])
    raise
finally:
    driver.quit()
"##;

/// Runs the browser script's `scenario` against `host`: its steps by name.
async fn drive(host: &Host, scenario: &str, shot: &Path, key: &str) -> HashMap<String, Value> {
    drive_at(
        host,
        &format!("http://{}", host.addr()),
        scenario,
        shot,
        key,
    )
    .await
}

/// [`drive`] with the page loaded from `base`.
async fn drive_at(
    host: &Host,
    base: &str,
    scenario: &str,
    shot: &Path,
    key: &str,
) -> HashMap<String, Value> {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let script = dir.path().join("page.py");
    std::fs::write(&script, SCRIPT).expect("write the script");
    let base = base.to_owned();
    let args = [
        script.display().to_string(),
        base,
        scenario.to_owned(),
        shot.display().to_string(),
        key.to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(&args)
            .output()
            .expect("run python3")
    })
    .await
    .expect("the script ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the browser script failed ({}):\n{stdout}\n{}\nhost log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        host.log()
    );
    let steps: HashMap<String, Value> = stdout
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).expect("one JSON object a line");
            (value["step"].as_str().expect("step").to_owned(), value)
        })
        .collect();
    // The page's own script and style ran under its policy: nothing refused.
    let console = steps.get("console").expect("the console step").to_string();
    assert!(
        !console.contains("Content Security Policy"),
        "the page broke its own policy: {console}"
    );
    steps
}

/// `chat-page.png` in the target directory.
fn screenshot_path() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("chat-page.png")
}

// The page on the shipped setup (open mode, loopback): it lists the backends,
// streams a turn and shows its usage, cancels a slow turn with its button,
// shows a backend's error, and resumes a past session from the list, whose
// next turn continues it.
#[tokio::test]
async fn the_chat_page_streams_cancels_and_resumes_in_chromium() {
    if !browser() {
        return;
    }
    let host = Host::start_default();
    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    let steps = drive(&host, "open", &shot, "").await;
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
    };

    let options = step("backends")["options"].to_string();
    for name in [
        "\"\"",
        "\"echo\"",
        "\"slow\"",
        "\"slow_echo\"",
        "\"failing\"",
    ] {
        assert!(options.contains(name), "{name} not in {options}");
    }

    let streamed = step("streamed");
    assert_eq!(streamed["status"], "completed", "{streamed}");
    assert_eq!(streamed["text"], "echo: Hello from the chat page");
    // Seen before the turn ended, and not yet whole.
    let partial = streamed["partial"].as_str().unwrap_or_default();
    assert!(
        partial.starts_with("echo:") && partial.len() < "echo: Hello from the chat page".len(),
        "no text was seen while it streamed: {streamed}"
    );
    let meta = streamed["meta"].as_str().unwrap_or_default();
    assert!(
        meta.contains("slow_echo") && meta.contains("5 in, 6 out, 11 tokens"),
        "{meta}"
    );

    let cancelled = step("cancelled");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(
        cancelled["meta"]
            .as_str()
            .is_some_and(|meta| meta.starts_with("cancelled")),
        "{cancelled}"
    );
    let text = cancelled["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("token0") && !text.contains("token99"),
        "{cancelled}"
    );

    let failed = step("failed");
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["errors"].to_string().contains("injected_failure"),
        "{failed}"
    );

    let first = step("streamed")["session"].as_str().expect("a session id");
    let second = step("cancelled")["session"].as_str().expect("a session id");
    let listed = step("listed")["sessions"].to_string();
    assert!(
        listed.contains(first) && listed.contains(second),
        "{listed}"
    );

    let history = step("history");
    assert_eq!(history["session"], first);
    let messages = history["messages"].as_array().expect("messages");
    let texts: Vec<&str> = messages.iter().filter_map(|m| m[1].as_str()).collect();
    assert_eq!(
        texts,
        ["Hello from the chat page", "echo: Hello from the chat page"],
        "{history}"
    );
    assert!(messages[0][0].as_str().is_some_and(|c| c.contains("user")));
    assert!(messages[1][0]
        .as_str()
        .is_some_and(|c| c.contains("assistant")));

    // The history reached the backend: 5 + 6 words before, 3 now.
    let resumed = step("resumed");
    assert_eq!(resumed["status"], "completed", "{resumed}");
    assert_eq!(resumed["text"], "echo: and one more");
    assert!(
        resumed["meta"]
            .as_str()
            .is_some_and(|meta| meta.contains("14 in, 4 out, 18 tokens")),
        "{resumed}"
    );
    let stored = http(host.addr(), "GET", &format!("/v1/sessions/{first}")).await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    let stored = stored.json();
    assert_eq!(
        stored["messages"].as_array().map(Vec::len),
        Some(4),
        "{stored}"
    );
    assert_eq!(stored["turns"], 2, "{stored}");

    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
}

// With API keys configured, the page without a key says why it cannot
// connect; with one typed in, it lists backends, runs a turn (the socket
// took the key as `?token=`) and lists its sessions (HTTP with a Bearer
// header); the key stays in the browser across a reload.
#[tokio::test]
async fn the_chat_page_uses_the_api_key_it_keeps() {
    if !browser() {
        return;
    }
    let host = Host::start(&Config {
        extra: format!(
            "\n[auth]\nkeys = [\n  {{ id = \"alice\", key = \"{ALICE}\" }},\n  \
             {{ id = \"bob\", key = \"{BOB}\" }},\n]\n"
        ),
        ..Config::default()
    });
    let dir = tempfile::tempdir().expect("a scratch directory");
    let steps = drive(&host, "keys", &dir.path().join("unused.png"), ALICE).await;
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
    };

    let log = step("no_key")["log"].as_str().unwrap_or_default();
    assert!(
        log.contains("could not connect: unauthorized") && log.contains("invalid_api_key"),
        "{log}"
    );

    let keyed = step("keyed");
    assert_eq!(keyed["status"], "completed", "{keyed}");
    assert_eq!(keyed["text"], "echo: hi with a key");
    let session = keyed["session"].as_str().expect("a session id");

    let reloaded = step("reloaded");
    assert_eq!(reloaded["key"], ALICE);
    assert_eq!(
        reloaded["sessions"],
        serde_json::json!([session]),
        "{reloaded}"
    );

    // The session is alice's: the socket was hers.
    let alice = format!("Bearer {ALICE}");
    let bob = format!("Bearer {BOB}");
    let path = format!("/v1/sessions/{session}");
    let mine = http_with(host.addr(), "GET", &path, &[("Authorization", &alice)]).await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(mine.json()["messages"][1]["content"], "echo: hi with a key");
    let theirs = http_with(host.addr(), "GET", &path, &[("Authorization", &bob)]).await;
    assert_eq!(theirs.status, 404, "{}", theirs.body);
}

// Tools typed into the page's Tools field are declared with its prompts; when
// the model calls them, the page shows each call with a form that answers it
// (a result, or an error), and once every call has its answer the turn goes
// on to the model's next group, whose text the page shows. Nothing a tool
// answered is read as markup.
#[tokio::test]
async fn the_chat_page_answers_tool_calls_in_chromium() {
    if !browser() {
        return;
    }
    let mut config = Config::default();
    config
        .models
        .push(("tools".to_owned(), "{ call_tools = true }".to_owned()));
    let host = Host::start(&config);
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shot = tmp.parent().unwrap_or(tmp).join("chat-page-tools.png");
    let steps = drive(&host, "tools", &shot, "").await;
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
    };

    let bad = step("bad_tools");
    assert!(
        bad["log"]
            .as_str()
            .is_some_and(|log| log.contains("tools: not JSON")),
        "{bad}"
    );
    assert_eq!(bad["prompt"], "will it rain?", "{bad}");
    assert_eq!(bad["assistants"], 0, "{bad}");

    // The group ended calling both tools; the turn waits for their results.
    let asked = step("asked");
    assert_eq!(asked["status"], Value::Null, "{asked}");
    let arguments = r#"{"prompt":"will it rain?"}"#;
    assert_eq!(
        asked["calls"],
        serde_json::json!([
            ["call_1_0", format!("lookup({arguments})")],
            ["call_1_1", format!("weather({arguments})")],
        ]),
        "{asked}"
    );
    assert_eq!(
        asked["buttons"],
        serde_json::json!(["Send result", "Send error", "Send result", "Send error"]),
        "{asked}"
    );
    assert_eq!(asked["focused"], "result of lookup", "{asked}");
    assert!(
        asked["stored"]
            .as_str()
            .is_some_and(|tools| tools.contains("\"weather\"")),
        "the page keeps its tools: {asked}"
    );

    let one = step("one_answered");
    assert_eq!(one["status"], Value::Null, "one result is not all: {one}");
    assert_eq!(one["forms"], 1, "{one}");

    let answered = step("answered");
    assert_eq!(answered["status"], "completed", "{answered}");
    assert_eq!(
        answered["text"], "echo: will it rain? <b>wet</b> days error: the service is down",
        "{answered}"
    );
    assert_eq!(
        answered["results"],
        serde_json::json!(["→ <b>wet</b> days", "error: the service is down"]),
        "{answered}"
    );
    assert_eq!(answered["markup"], 0, "{answered}");
    assert_eq!(answered["forms"], 0, "{answered}");
    assert_eq!(answered["errors"], serde_json::json!([]), "{answered}");
    assert!(
        answered["meta"]
            .as_str()
            .is_some_and(|meta| meta.starts_with("completed · tools (echo) · stop")),
        "{answered}"
    );

    let untooled = step("untooled");
    assert_eq!(untooled["status"], "completed", "{untooled}");
    assert_eq!(untooled["text"], "echo: no tools now", "{untooled}");

    // The host stored the calls and the page's answers in order.
    let session = asked["session"].as_str().expect("a session id");
    let stored = http(host.addr(), "GET", &format!("/v1/sessions/{session}")).await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    let stored = stored.json();
    let messages: Vec<String> = stored["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let calls = m["toolCalls"].as_array().map_or(0, Vec::len);
            format!(
                "{} {}{}: {}",
                m["role"].as_str().unwrap_or("?"),
                m["toolCallId"].as_str().unwrap_or(""),
                if calls > 0 {
                    format!("{calls} calls")
                } else {
                    String::new()
                },
                m["content"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(
        messages,
        [
            "user : will it rain?",
            "assistant 2 calls: ",
            "tool call_1_0: <b>wet</b> days",
            "tool call_1_1: error: the service is down",
            "assistant : echo: will it rain? <b>wet</b> days error: the service is down",
            "user : no tools now",
            "assistant : echo: no tools now",
        ],
        "{stored}"
    );
}

// The page's connection to the host is cut in the middle of a slow turn
// (through a proxy the page was loaded from), and new connections are
// refused for a while; the host and the turn run on. The page reconnects
// with ?since= the last number it had and shows the whole answer once,
// ending as it would have.
#[tokio::test]
async fn the_chat_page_follows_a_turn_across_a_dropped_socket_in_chromium() {
    if !browser() {
        return;
    }
    let host = Host::start_default();
    let proxy = crate::chat::cutting_proxy::CuttingProxy::start(host.addr());
    let base = format!("http://{}", proxy.addr);
    let dir = tempfile::tempdir().expect("a scratch directory");
    let trigger = dir.path().join("cut");
    let done = Arc::new(AtomicBool::new(false));
    let (watched, finished) = (trigger.clone(), done.clone());
    let cutter = std::thread::spawn(move || {
        while !finished.load(Ordering::SeqCst) {
            if watched.exists() {
                proxy.cut(Duration::from_millis(700));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        proxy
    });
    let key = trigger.display().to_string();
    let steps = drive_at(
        &host,
        &base,
        "reconnect",
        &dir.path().join("unused.png"),
        &key,
    )
    .await;
    done.store(true, Ordering::SeqCst);
    drop(cutter.join().expect("the cutting thread"));

    let followed = &steps["followed"];
    let words: Vec<String> = (1..=30).map(|n| format!("w{n:02}")).collect();
    assert_eq!(followed["status"], "completed", "{followed}");
    assert_eq!(
        followed["text"].as_str(),
        Some(format!("echo: {}", words.join(" ")).as_str()),
        "{followed}"
    );
    let meta = followed["meta"].as_str().unwrap_or_default();
    assert!(meta.contains("30 in, 31 out, 61 tokens"), "{followed}");
    let log = followed["log"].as_str().unwrap_or_default();
    assert!(log.contains("reconnected"), "{followed}");
    assert!(!log.contains("disconnected"), "{followed}");
}
