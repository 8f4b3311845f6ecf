//! Drives the adapter through the same trait object the host calls.
//!
//! The tests that need the real model read it from `LLM_HOST_TEST_GGUF`
//! (default: the cache path `scripts/fetch-model.sh` writes). Without the file
//! they print `skipped: ...` and pass, except under `CI=true`, where they fail.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    ErrorKind, EventSink, EventSink_TO, FinishReason, Flow, LogLevel, Message, ModelAdapterBox,
    ModelRequest, Plugin, Role, TurnParams, Usage,
};

use super::*;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The test model, or `None` (after saying so) when it is not there outside CI.
fn model_path() -> Option<PathBuf> {
    let path = match std::env::var_os("LLM_HOST_TEST_GGUF") {
        Some(path) => PathBuf::from(path),
        None => {
            let dir = match std::env::var_os("LLM_HOST_MODEL_DIR") {
                Some(dir) => PathBuf::from(dir),
                None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/llm-host/models"),
            };
            dir.join(MODEL_FILE)
        }
    };
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "the test model {} is missing; run scripts/fetch-model.sh (or set LLM_HOST_TEST_GGUF)",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{why}");
    }
    println!("skipped: {why}");
    None
}

/// An adapter on the test model with `extra` settings (JSON object members).
/// One thread unless `extra` says otherwise: the test harness runs two tests
/// at once on two cores, and oversubscribed llama.cpp threads crawl.
fn adapter(extra: &str) -> Option<ModelAdapterBox> {
    let path = model_path()?;
    let mut settings = serde_json::json!({ "model_path": path, "threads": 1 });
    if !extra.is_empty() {
        let extra: serde_json::Value =
            serde_json::from_str(&format!("{{{extra}}}")).expect("extra settings are JSON");
        settings
            .as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
    }
    Some(LlamaPlugin::new_model(&settings.to_string()).expect("the test model loads"))
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Start(String),
    Text(String),
    Usage(Usage),
    End(FinishReason),
    Error(String, String),
    Diagnostic(String),
}

/// Records events. Like the host's sink, answers stop once `cancelled` is
/// set; can also answer stop after some text events, raise `streaming` at the
/// first text event, and wait there for a rendezvous or (`hold`) for the cancel.
#[derive(Default)]
struct Recorder {
    events: Vec<(Event, Instant)>,
    stop_after_texts: Option<usize>,
    cancelled: Option<Arc<AtomicBool>>,
    streaming: Option<Arc<AtomicBool>>,
    rendezvous: Option<Rendezvous>,
    hold: bool,
}

impl Recorder {
    fn push(&mut self, event: Event) -> Flow {
        let is_text = matches!(event, Event::Text(_));
        self.events.push((event, Instant::now()));
        if is_text && self.texts().len() == 1 {
            if let Some(streaming) = &self.streaming {
                streaming.store(true, Ordering::SeqCst);
            }
            if let Some(rendezvous) = &self.rendezvous {
                rendezvous.arrive();
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.hold && !self.is_cancelled() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
        }
        if self.is_cancelled() {
            return Flow::STOP;
        }
        match self.stop_after_texts {
            Some(n) if self.texts().len() >= n => Flow::STOP,
            _ => Flow::CONTINUE,
        }
    }

    fn texts(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|(event, _)| match event {
                Event::Text(text) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn text(&self) -> String {
        self.texts().concat()
    }

    fn text_times(&self) -> Vec<Instant> {
        self.events
            .iter()
            .filter(|(event, _)| matches!(event, Event::Text(_)))
            .map(|(_, at)| *at)
            .collect()
    }

    fn usage(&self) -> Usage {
        self.events
            .iter()
            .rev()
            .find_map(|(event, _)| match event {
                Event::Usage(usage) => Some(*usage),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no usage in {:?}", self.kinds()))
    }

    fn end(&self) -> FinishReason {
        match self.events.last() {
            Some((Event::End(reason), _)) => *reason,
            other => panic!(
                "the last event is not an end: {other:?} in {:?}",
                self.kinds()
            ),
        }
    }

    fn kinds(&self) -> Vec<&Event> {
        self.events.iter().map(|(event, _)| event).collect()
    }
}

impl EventSink for Recorder {
    fn start(&mut self, _id: RStr<'_>, model_id: RStr<'_>) -> Flow {
        self.push(Event::Start(model_id.to_string()))
    }
    fn text(&mut self, text: RStr<'_>) -> Flow {
        self.push(Event::Text(text.to_string()))
    }
    fn reasoning(&mut self, _text: RStr<'_>) -> Flow {
        panic!("no reasoning from this backend")
    }
    fn tool_call(&mut self, _id: RStr<'_>, _name: RStr<'_>, _arguments: RStr<'_>) -> Flow {
        panic!("no tool calls from this backend")
    }
    fn usage(&mut self, usage: Usage) -> Flow {
        self.push(Event::Usage(usage))
    }
    fn end(&mut self, reason: FinishReason) -> Flow {
        self.push(Event::End(reason))
    }
    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        self.push(Event::Error(code.to_string(), message.to_string()))
    }
    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, data: RStr<'_>) -> Flow {
        self.push(Event::Diagnostic(format!(
            "{} {message} {data}",
            level.as_str()
        )))
    }
    fn is_cancelled(&self) -> bool {
        self.cancelled
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }
}

/// Two recorders meet at their first text event: both go on only once both
/// have arrived (or after a timeout, which the test then reports).
#[derive(Clone)]
struct Rendezvous {
    arrived: Arc<(Mutex<usize>, Condvar)>,
    met: Arc<AtomicBool>,
}

impl Rendezvous {
    fn new() -> Self {
        Self {
            arrived: Arc::new((Mutex::new(0), Condvar::new())),
            met: Arc::new(AtomicBool::new(false)),
        }
    }

    fn arrive(&self) {
        let (count, cv) = &*self.arrived;
        let mut count = count.lock().expect("lock");
        *count += 1;
        cv.notify_all();
        let (count, timeout) = cv
            .wait_timeout_while(count, Duration::from_secs(60), |count| *count < 2)
            .expect("lock");
        if !timeout.timed_out() && *count >= 2 {
            self.met.store(true, Ordering::SeqCst);
        }
    }
}

fn user(text: &str) -> Message {
    Message::new(Role::User, text)
}

fn greedy(max_tokens: u64) -> TurnParams {
    TurnParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..TurnParams::default()
    }
}

fn turn(
    adapter: &ModelAdapterBox,
    messages: Vec<Message>,
    params: TurnParams,
    recorder: &mut Recorder,
) -> Result<(), PluginError> {
    let request = ModelRequest {
        session_id: "test".into(),
        interaction_id: "turn-1".into(),
        messages,
        params,
        ..ModelRequest::default()
    };
    let json = serde_json::to_string(&request).expect("request serializes");
    let sink = EventSink_TO::from_ptr(recorder, TD_Opaque);
    adapter.generate(json.as_str().into(), sink).into_result()
}

/// Whether `text` reads like words: mostly letters, spaces and punctuation,
/// with at least `words` alphabetic words.
fn looks_like_words(text: &str, words: usize) -> bool {
    let total = text.chars().count().max(1);
    let printable = text
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace() || c.is_ascii_punctuation())
        .count();
    let alphabetic_words = text
        .split_whitespace()
        .filter(|word| word.chars().any(char::is_alphabetic))
        .count();
    printable * 10 >= total * 9 && alphabetic_words >= words
}

#[test]
fn a_turn_streams_words_and_reports_usage() {
    let Some(adapter) = adapter("") else { return };
    let mut rec = Recorder::default();
    turn(
        &adapter,
        vec![user(
            "What is the capital of France? Answer in one sentence.",
        )],
        greedy(48),
        &mut rec,
    )
    .expect("generates");
    let text = rec.text();
    println!("answer: {text:?}");
    assert_eq!(
        rec.events[0].0,
        Event::Start("SmolLM2-135M-Instruct.Q4_1".into())
    );
    assert!(
        rec.texts().len() >= 2,
        "streamed in pieces: {:?}",
        rec.texts()
    );
    assert!(looks_like_words(&text, 3), "not words: {text:?}");
    let reason = rec.end();
    assert!(
        reason == FinishReason::STOP || reason == FinishReason::LENGTH,
        "{reason:?}"
    );
    let usage = rec.usage();
    assert!(usage.input_tokens > 10, "{usage:?}");
    assert!(
        usage.output_tokens > 0 && usage.output_tokens <= 48,
        "{usage:?}"
    );
    assert_eq!(usage.total_tokens, usage.input_tokens + usage.output_tokens);
    if reason == FinishReason::LENGTH {
        assert_eq!(usage.output_tokens, 48);
    }
}

#[test]
fn history_reaches_the_model() {
    let Some(adapter) = adapter("") else { return };
    let first = user("My name is Zorblat and I live on the moon. Say hello to me.");
    let mut one = Recorder::default();
    turn(&adapter, vec![first.clone()], greedy(24), &mut one).expect("turn 1");
    let answer = one.text();
    let usage_one = one.usage();

    let mut two = Recorder::default();
    let history = vec![
        first,
        Message::new(Role::Assistant, answer.clone()),
        user("What is my name?"),
    ];
    turn(&adapter, history, greedy(24), &mut two).expect("turn 2");
    let usage_two = two.usage();
    println!(
        "turn 1: {answer:?} {usage_one:?}\nturn 2: {:?} {usage_two:?}",
        two.text()
    );
    // Turn 2's prompt holds turn 1's prompt, its answer and the new question.
    assert!(
        usage_two.input_tokens >= usage_one.input_tokens + usage_one.output_tokens,
        "turn 2's prompt ({}) lacks turn 1's prompt ({}) and answer ({})",
        usage_two.input_tokens,
        usage_one.input_tokens,
        usage_one.output_tokens
    );
    // And the system message reaches it too.
    let mut three = Recorder::default();
    let with_system = vec![
        Message::new(
            Role::System,
            "You are a terse assistant who answers in French.",
        ),
        user("What is my name?"),
    ];
    turn(&adapter, with_system, greedy(4), &mut three).expect("turn 3");
    let mut four = Recorder::default();
    turn(
        &adapter,
        vec![user("What is my name?")],
        greedy(4),
        &mut four,
    )
    .expect("turn 4");
    assert!(three.usage().input_tokens > four.usage().input_tokens + 8);
}

#[test]
fn per_turn_params_override_the_settings() {
    let Some(adapter) = adapter(r#""max_tokens": 7, "temperature": 0.0"#) else {
        return;
    };
    let story = || {
        vec![user(
            "Tell me a long story about a brave knight and a dragon.",
        )]
    };
    let mut rec = Recorder::default();
    turn(&adapter, story(), TurnParams::default(), &mut rec).expect("generates");
    assert_eq!(rec.end(), FinishReason::LENGTH);
    assert_eq!(rec.usage().output_tokens, 7, "max_tokens from the settings");

    let mut rec = Recorder::default();
    turn(&adapter, story(), greedy(3), &mut rec).expect("generates");
    assert_eq!(rec.end(), FinishReason::LENGTH);
    assert_eq!(rec.usage().output_tokens, 3, "maxTokens of the turn");

    // Sampling with a fixed seed repeats itself.
    let sampled = |seed| {
        let mut rec = Recorder::default();
        let params = TurnParams {
            temperature: Some(1.2),
            top_k: Some(0),
            top_p: Some(1.0),
            seed: Some(seed),
            max_tokens: Some(24),
            ..TurnParams::default()
        };
        turn(&adapter, story(), params, &mut rec).expect("generates");
        rec.text()
    };
    let a = sampled(7);
    assert_eq!(a, sampled(7), "the same seed gives the same text");
    println!("seed 7: {a:?}\nseed 8: {:?}", sampled(8));

    let mut rec = Recorder::default();
    let bad = TurnParams {
        top_p: Some(0.0),
        ..TurnParams::default()
    };
    let err = turn(&adapter, story(), bad, &mut rec).expect_err("topP 0 refused");
    assert_eq!(err.kind, ErrorKind::INVALID_INPUT);
    assert!(err.message.contains("topP"), "{}", err.message);
}

#[test]
fn a_stop_sequence_ends_the_answer_before_it() {
    let Some(adapter) = adapter("") else { return };
    let question = || vec![user("List three fruits, one per line.")];
    let mut free = Recorder::default();
    turn(&adapter, question(), greedy(40), &mut free).expect("generates");
    let full = free.text();
    // A word from the middle of the greedy answer; the same prompt, greedily,
    // gives the same tokens, so the answer must stop right before it.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 4, "answer too short to test with: {full:?}");
    let stop = words[words.len() / 2].to_owned();
    let expected = &full[..full.find(&stop).expect("the word is in the answer")];

    let mut stopped = Recorder::default();
    let params = TurnParams {
        stop: vec!["never appears 12345".into(), stop.clone()],
        ..greedy(40)
    };
    turn(&adapter, question(), params, &mut stopped).expect("generates");
    println!("full: {full:?}\nstop at {stop:?}: {:?}", stopped.text());
    assert_eq!(stopped.text(), expected);
    assert_eq!(stopped.end(), FinishReason::STOP);
    assert!(stopped.texts().iter().all(|piece| !piece.contains(&stop)));
}

#[test]
fn cancel_stops_generation_at_the_next_token() {
    let Some(adapter) = adapter("") else { return };
    let mut rec = Recorder {
        stop_after_texts: Some(3),
        ..Recorder::default()
    };
    let started = Instant::now();
    turn(
        &adapter,
        vec![user("Write a long essay about the history of bread.")],
        greedy(200),
        &mut rec,
    )
    .expect("a cancelled turn is not an error");
    let elapsed = started.elapsed();
    let kinds = rec.kinds();
    assert_eq!(rec.texts().len(), 3, "{kinds:?}");
    assert!(
        matches!(kinds.last(), Some(Event::Text(_))),
        "nothing after the text that answered stop: {kinds:?}"
    );
    // 200 tokens would take seconds; 3 take a fraction of one.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[test]
fn a_cancelled_waiting_turn_leaves_promptly() {
    let Some(adapter) = adapter(r#""max_parallel": 1"#) else {
        return;
    };
    let running = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    thread::scope(|scope| {
        // A turn that holds the only slot (its sink blocks at the first text)
        // until it is cancelled.
        let long = scope.spawn(|| {
            let mut rec = Recorder {
                cancelled: Some(Arc::clone(&release)),
                streaming: Some(Arc::clone(&running)),
                hold: true,
                ..Recorder::default()
            };
            let essay = vec![user("Write a long essay about the history of bread.")];
            turn(&adapter, essay, greedy(200), &mut rec).expect("generates");
            rec
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !running.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the first turn never streamed");
            thread::sleep(Duration::from_millis(5));
        }
        // This one waits for the slot; cancel it while it waits.
        let cancel = Arc::new(AtomicBool::new(false));
        let waiting = {
            let cancel = Arc::clone(&cancel);
            let adapter = &adapter;
            scope.spawn(move || {
                let mut rec = Recorder {
                    cancelled: Some(cancel),
                    ..Recorder::default()
                };
                turn(adapter, vec![user("Hello")], greedy(8), &mut rec).expect("no error");
                rec
            })
        };
        thread::sleep(Duration::from_millis(200));
        let cancelled_at = Instant::now();
        cancel.store(true, Ordering::SeqCst);
        let rec = waiting.join().expect("no panic");
        let left_after = cancelled_at.elapsed();
        release.store(true, Ordering::SeqCst);
        let long = long.join().expect("no panic");
        assert_eq!(long.texts().len(), 1, "{:?}", long.kinds());
        assert!(left_after < Duration::from_secs(1), "{left_after:?}");
        assert_eq!(
            rec.kinds(),
            [&Event::Start("SmolLM2-135M-Instruct.Q4_1".into())],
            "it never generated"
        );
    });
}

#[test]
fn two_turns_with_max_parallel_1_both_finish_one_after_the_other() {
    let Some(adapter) = adapter(r#""max_parallel": 1"#) else {
        return;
    };
    let run = |prompt: &str| {
        let mut rec = Recorder::default();
        turn(&adapter, vec![user(prompt)], greedy(24), &mut rec).expect("generates");
        rec
    };
    let (a, b) = thread::scope(|scope| {
        let a = scope.spawn(|| run("Name a color."));
        let b = scope.spawn(|| run("Name an animal."));
        (a.join().expect("no panic"), b.join().expect("no panic"))
    });
    for rec in [&a, &b] {
        assert!(!rec.text().is_empty(), "{:?}", rec.kinds());
        let reason = rec.end();
        assert!(reason == FinishReason::STOP || reason == FinishReason::LENGTH);
    }
    let (a_times, b_times) = (a.text_times(), b.text_times());
    let serial = a_times.last() < b_times.first() || b_times.last() < a_times.first();
    assert!(serial, "the two turns generated at the same time");
}

#[test]
fn with_max_parallel_2_two_turns_generate_at_once() {
    let Some(adapter) = adapter(r#""max_parallel": 2"#) else {
        return;
    };
    let rendezvous = Rendezvous::new();
    let run = |prompt: &str| {
        let mut rec = Recorder {
            rendezvous: Some(rendezvous.clone()),
            ..Recorder::default()
        };
        turn(&adapter, vec![user(prompt)], greedy(12), &mut rec).expect("generates");
        rec
    };
    let (a, b) = thread::scope(|scope| {
        let a = scope.spawn(|| run("Name a color."));
        let b = scope.spawn(|| run("Name an animal."));
        (a.join().expect("no panic"), b.join().expect("no panic"))
    });
    assert!(
        rendezvous.met.load(Ordering::SeqCst),
        "both turns were streaming at the same time"
    );
    for rec in [&a, &b] {
        let reason = rec.end();
        assert!(reason == FinishReason::STOP || reason == FinishReason::LENGTH);
    }
}

#[test]
fn a_long_conversation_loses_its_oldest_messages() {
    let Some(adapter) = adapter(r#""n_ctx": 96"#) else {
        return;
    };
    let mut messages = vec![Message::new(Role::System, "Be brief.")];
    for i in 0..12 {
        messages.push(user(&format!("Remember the number {i}, please.")));
        messages.push(Message::new(
            Role::Assistant,
            format!("I will remember {i}."),
        ));
    }
    messages.push(user("Say hi."));
    // How many messages a turn left out, from its diagnostic (0 if none).
    let left_out = |messages: &[Message]| {
        let mut rec = Recorder::default();
        turn(&adapter, messages.to_vec(), greedy(8), &mut rec).expect("generates");
        let usage = rec.usage();
        assert!(usage.input_tokens < 96, "{usage:?}");
        assert!(rec.end() == FinishReason::STOP || rec.end() == FinishReason::LENGTH);
        rec.kinds()
            .iter()
            .find_map(|event| match event {
                Event::Diagnostic(text) if text.contains("history_truncated") => {
                    let data = text.split_once('{').map(|(_, data)| format!("{{{data}"));
                    let data: serde_json::Value =
                        serde_json::from_str(&data.expect("data")).expect("JSON data");
                    Some(data["dropped"].as_u64().expect("a count") as usize)
                }
                _ => None,
            })
            .unwrap_or(0)
    };
    let dropped = left_out(&messages);
    assert!(dropped > 0 && dropped < messages.len() - 2, "{dropped}");
    // The fewest: without those messages it fits as is; keeping one more of
    // them, exactly that one is left out again.
    let mut fewer = messages.clone();
    fewer.drain(1..1 + dropped);
    assert_eq!(left_out(&fewer), 0);
    let mut one_more = messages.clone();
    one_more.drain(1..dropped);
    assert_eq!(left_out(&one_more), 1);

    let mut rec = Recorder::default();
    let huge = "word ".repeat(200);
    let err = turn(&adapter, vec![user(&huge)], greedy(8), &mut rec).expect_err("too long");
    assert_eq!(err.kind, ErrorKind::INVALID_INPUT);
    assert!(err.message.contains("n_ctx"), "{}", err.message);
}

#[test]
fn conforms_to_the_host_contract() {
    use llm_host_conformance::model::{assert_model_conforms, ModelOptions};
    let Some(path) = model_path() else { return };
    let options = ModelOptions {
        settings: serde_json::json!({ "model_path": path, "threads": 1, "max_tokens": 32 })
            .to_string(),
        ..ModelOptions::default()
    };
    assert_model_conforms(&|settings: &str| LlamaPlugin::new_model(settings), &options);
}

#[test]
fn a_missing_model_file_is_refused_naming_the_path() {
    let path = "/nonexistent/llm-host/no-such-model.gguf";
    let err = LlamaPlugin::new_model(&format!(r#"{{"model_path": "{path}"}}"#))
        .err()
        .expect("refused");
    assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS);
    assert!(err.message.contains(path), "{}", err.message);
    assert!(err.message.contains("no such file"), "{}", err.message);
}

#[test]
fn files_that_are_not_models_are_refused_naming_the_path() {
    let dir = std::env::temp_dir().join(format!("llm-plugin-llama-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let text = dir.join("notes.gguf");
    std::fs::write(&text, "not a model at all").expect("write");
    let garbage = dir.join("garbage.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend([0xff; 60]);
    std::fs::write(&garbage, bytes).expect("write");
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, "").expect("write");
    for path in [&text, &garbage, &empty, &dir] {
        let settings = serde_json::json!({ "model_path": path }).to_string();
        let err = LlamaPlugin::new_model(&settings)
            .err()
            .unwrap_or_else(|| panic!("{} accepted", path.display()));
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{err}");
        assert!(
            err.message.contains(&*path.to_string_lossy()),
            "{}",
            err.message
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_settings_are_refused_by_name() {
    let cases = [
        (r#"{"model_path": "m.gguf", "n_tread": 2}"#, "n_tread"),
        (r#"{"n_ctx": 512}"#, "model_path"),
        (
            r#"{"model_path": "m.gguf", "max_parallel": 0}"#,
            "max_parallel",
        ),
        (r#"{"model_path": "m.gguf", "top_p": 1.5}"#, "top_p"),
        (
            r#"{"model_path": "m.gguf", "temperature": -1}"#,
            "temperature",
        ),
        (r#"{"model_path": "m.gguf", "n_ctx": 8}"#, "n_ctx"),
        (r#"{"model_path": "m.gguf", "threads": 0}"#, "threads"),
        (r#"{"model_path": "m.gguf", "max_tokens": 0}"#, "max_tokens"),
    ];
    for (settings, key) in cases {
        let err = LlamaPlugin::new_model(settings)
            .err()
            .unwrap_or_else(|| panic!("{settings} accepted"));
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{settings}");
        assert!(err.message.contains(key), "{settings}: {}", err.message);
    }
}

#[test]
fn settings_defaults() {
    let settings: LlamaSettings =
        llm_host_plugin_api::parse_settings(r#"{"model_path": "m.gguf"}"#).expect("parses");
    assert_eq!(settings, LlamaSettings::new("m.gguf"));
    assert_eq!(
        (settings.n_ctx, settings.threads, settings.max_tokens),
        (2048, 2, 256)
    );
    assert_eq!(
        (settings.temperature, settings.top_p, settings.top_k),
        (0.8, 0.95, 40)
    );
    assert_eq!((settings.seed, settings.max_parallel), (None, 1));
    let resolved = Resolved::new(
        &settings,
        &TurnParams {
            seed: Some((1 << 32) + 5),
            stop: vec!["".into(), "END".into()],
            top_k: Some(u64::MAX),
            ..TurnParams::default()
        },
    )
    .expect("valid");
    assert_eq!(resolved.seed, Some(5));
    assert_eq!(resolved.stop, ["END"]);
    assert_eq!(resolved.top_k, i32::MAX);
    assert_eq!(resolved.max_tokens, 256);
}
