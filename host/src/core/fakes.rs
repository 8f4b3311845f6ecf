//! In-memory fakes of the core's ports, for its tests: a store that can be
//! told to fail, hang or fail after applying a save, shared by several
//! "hosts"; a paced model that records how many turns of a session stream
//! at once; a frame sink that keeps every frame.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::locks::SessionLocks;
use super::ports::{
    Frames, Model, ModelError, Next, SaveOutcome, SessionStore, Stepper, StoreError, Stored, Wake,
};
use super::sink::{Status, TurnControl, TurnSink};
use super::{turn, Attachment, Party, Prompt, Scope, TurnSettings};
use crate::protocol::{Envelope, Framer};

/// The sessions a fake store holds: id to (version, owner, data).
pub type Sessions = Arc<Mutex<HashMap<String, (u64, String, String)>>>;

/// One host's handle on a store; handles made with [`FakeStore::handle`]
/// share the sessions but fail on their own.
#[derive(Clone, Default)]
pub struct FakeStore {
    pub sessions: Sessions,
    pub shared: bool,
    /// Every call waits forever while set.
    pub hang: Arc<AtomicBool>,
    /// The next this many saves fail without writing.
    pub fail_saves: Arc<AtomicU32>,
    /// The next this many saves write, then report failure.
    pub lose_answers: Arc<AtomicU32>,
    /// The next this many loads fail.
    pub fail_loads: Arc<AtomicU32>,
}

impl FakeStore {
    pub fn new(shared: bool) -> Self {
        Self {
            shared,
            ..Self::default()
        }
    }

    /// Another host's handle on the same sessions.
    pub fn handle(&self) -> Self {
        Self {
            sessions: self.sessions.clone(),
            shared: self.shared,
            ..Self::default()
        }
    }

    /// The stored document of `id`, parsed.
    pub fn doc(&self, id: &str) -> Option<Value> {
        let sessions = self.sessions.lock().expect("lock");
        sessions
            .get(id)
            .map(|(_, _, data)| serde_json::from_str(data).expect("stored JSON"))
    }

    /// The stored messages of `id` as (role, content).
    pub fn messages(&self, id: &str) -> Vec<(String, String)> {
        let Some(doc) = self.doc(id) else {
            return Vec::new();
        };
        doc["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap_or_default().to_owned(),
                    m["content"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    pub fn owner(&self, id: &str) -> Option<String> {
        let sessions = self.sessions.lock().expect("lock");
        sessions.get(id).map(|(_, owner, _)| owner.clone())
    }

    pub fn remove(&self, id: &str) {
        self.sessions.lock().expect("lock").remove(id);
    }

    async fn gate(&self) {
        while self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn failed(&self) -> StoreError {
        StoreError::Failed {
            store: "fake".to_owned(),
            message: "the fake store was told to fail".to_owned(),
        }
    }
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl SessionStore for FakeStore {
    fn name(&self) -> &str {
        "fake"
    }

    fn shared(&self) -> bool {
        self.shared
    }

    async fn load(&self, id: &str) -> Result<Option<Stored>, StoreError> {
        self.gate().await;
        if take(&self.fail_loads) {
            return Err(self.failed());
        }
        let sessions = self.sessions.lock().expect("lock");
        Ok(sessions.get(id).map(|(version, owner, data)| Stored {
            version: *version,
            owner: owner.clone(),
            data: data.clone(),
        }))
    }

    async fn save(
        &self,
        id: &str,
        expected: u64,
        owner: &str,
        data: String,
    ) -> Result<SaveOutcome, StoreError> {
        self.gate().await;
        if take(&self.fail_saves) {
            return Err(self.failed());
        }
        let outcome = {
            let mut sessions = self.sessions.lock().expect("lock");
            let current = sessions.get(id).map_or(0, |(version, _, _)| *version);
            if current != expected {
                SaveOutcome::Conflict { current }
            } else {
                let kept_owner = sessions
                    .get(id)
                    .map_or_else(|| owner.to_owned(), |(_, owner, _)| owner.clone());
                sessions.insert(id.to_owned(), (expected + 1, kept_owner, data));
                SaveOutcome::Saved {
                    version: expected + 1,
                }
            }
        };
        if take(&self.lose_answers) {
            return Err(self.failed());
        }
        Ok(outcome)
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.gate().await;
        Ok(self.sessions.lock().expect("lock").remove(id).is_some())
    }
}

/// A model that answers `echo: PROMPT` a word at a time, `pace` apart,
/// in steps; it counts the turns of each session streaming at once.
#[derive(Clone)]
pub struct FakeModel {
    pub pace: Duration,
    /// Turns streaming now, by session; and the most ever seen at once.
    pub streaming: Arc<Mutex<HashMap<String, (usize, usize)>>>,
    /// Its name (`fake` unless made with [`FakeModel::named`]).
    pub name: String,
    /// Every request it was sent, parsed.
    pub requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeModel {
    pub fn new(pace: Duration) -> Self {
        Self::named("fake", pace)
    }

    pub fn named(name: &str, pace: Duration) -> Self {
        Self {
            pace,
            streaming: Arc::default(),
            name: name.to_owned(),
            requests: Arc::default(),
        }
    }

    /// The messages of every request it was sent, as `ROLE: CONTENT`.
    pub fn sent(&self) -> Vec<Vec<String>> {
        let requests = self.requests.lock().expect("lock");
        requests
            .iter()
            .map(|request| {
                request["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .map(|m| {
                        format!(
                            "{}: {}",
                            m["role"].as_str().unwrap_or_default(),
                            m["content"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// The most turns of `session` that ever streamed at once.
    pub fn most_at_once(&self, session: &str) -> usize {
        self.streaming
            .lock()
            .expect("lock")
            .get(session)
            .map_or(0, |(_, most)| *most)
    }
}

pub struct FakeStepper {
    /// Tool calls (id, name) made instead of answering.
    calls: Vec<(String, String)>,
    words: Vec<String>,
    next: usize,
    pace: Duration,
    session: String,
    streaming: Arc<Mutex<HashMap<String, (usize, usize)>>>,
}

impl Drop for FakeStepper {
    fn drop(&mut self) {
        let mut streaming = self.streaming.lock().expect("lock");
        if let Some((now, _)) = streaming.get_mut(&self.session) {
            *now -= 1;
        }
    }
}

impl Stepper for FakeStepper {
    fn step(&mut self, sink: &mut TurnSink) -> Result<Next, ModelError> {
        if self.next == 0 && !sink.start("", "fake") {
            return Ok(Next::Done);
        }
        if !self.calls.is_empty() {
            for (id, name) in &self.calls {
                if !sink.tool_call(id, name, "{}") {
                    return Ok(Next::Done);
                }
            }
            sink.end(llm_host_plugin_api::FinishReason::TOOL_CALLS);
            return Ok(Next::Done);
        }
        if self.next == self.words.len() {
            sink.end(llm_host_plugin_api::FinishReason::STOP);
            return Ok(Next::Done);
        }
        let word = &self.words[self.next];
        let text = if self.next == 0 {
            word.clone()
        } else {
            format!(" {word}")
        };
        self.next += 1;
        if !sink.text(&text) {
            return Ok(Next::Done);
        }
        Ok(if self.pace.is_zero() {
            Next::Ready
        } else {
            Next::Sleep(self.pace)
        })
    }
}

impl Model for FakeModel {
    type Stepper = FakeStepper;

    fn name(&self) -> &str {
        &self.name
    }

    fn stepped(&self) -> bool {
        true
    }

    fn generate(&self, _request: &str, _sink: &mut TurnSink) -> Result<(), ModelError> {
        Err(ModelError::internal("the fake model runs in steps"))
    }

    fn start(&self, request: &str, _wake: Wake) -> Result<FakeStepper, ModelError> {
        let request: Value =
            serde_json::from_str(request).map_err(|err| ModelError::internal(err.to_string()))?;
        self.requests.lock().expect("lock").push(request.clone());
        let session = request["sessionId"].as_str().unwrap_or_default().to_owned();
        let prompt = request["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_owned();
        {
            let mut streaming = self.streaming.lock().expect("lock");
            let (now, most) = streaming.entry(session.clone()).or_default();
            *now += 1;
            *most = (*most).max(*now);
        }
        let (calls, prompt) = tool_calls(&request, prompt);
        let words = std::iter::once("echo:".to_owned())
            .chain(prompt.split_whitespace().map(str::to_owned))
            .collect();
        Ok(FakeStepper {
            calls,
            words,
            next: 0,
            pace: self.pace,
            session,
            streaming: self.streaming.clone(),
        })
    }
}

/// With tools declared, the fake model calls each (ids `call-N-I`, N the
/// request's message count) while fewer than two rounds of calls followed
/// the last user message; then it answers with the tool results' text.
/// Without tools it answers `prompt`.
fn tool_calls(request: &Value, prompt: String) -> (Vec<(String, String)>, String) {
    let tools: Vec<String> = request["params"]["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    if tools.is_empty() {
        return (Vec::new(), prompt);
    }
    let last_user = messages
        .iter()
        .rposition(|m| m["role"] == "user")
        .unwrap_or_default();
    let since = &messages[last_user + 1..];
    let rounds = since
        .iter()
        .filter(|m| m["role"] == "assistant" && m["toolCalls"].is_array())
        .count();
    if rounds < 2 {
        let count = messages.len();
        let calls = tools
            .into_iter()
            .enumerate()
            .map(|(i, name)| (format!("call-{count}-{i}"), name))
            .collect();
        return (calls, String::new());
    }
    let results = since
        .iter()
        .filter(|m| m["role"] == "tool")
        .filter_map(|m| m["content"].as_str())
        .collect::<Vec<_>>()
        .join(" ");
    (Vec::new(), results)
}

/// What a client does on a frame the moment it is sent (a client that
/// answers at once).
pub type OnFrame = Box<dyn Fn(&Value) + Send + Sync>;

/// A client: every frame it was sent, parsed.
#[derive(Default)]
pub struct FakeFrames {
    pub frames: Mutex<Vec<Value>>,
    pub last: Arc<AtomicU64>,
    pub gone: AtomicBool,
    /// Called with each frame as it is sent.
    pub on_frame: Mutex<Option<OnFrame>>,
}

impl FakeFrames {
    pub fn all(&self) -> Vec<Value> {
        self.frames.lock().expect("lock").clone()
    }

    /// The sequence numbers of the turns' frames (model events and turn ends).
    pub fn turn_sequences(&self) -> Vec<u64> {
        self.all()
            .iter()
            .filter(|f| {
                matches!(
                    f["name"].as_str(),
                    Some("interaction.model" | "interaction.turn")
                )
            })
            .map(|f| f["data"]["meta"]["sequence"].as_u64().expect("sequence"))
            .collect()
    }

    /// The codes of the diagnostics and error events it was sent.
    pub fn codes(&self) -> Vec<String> {
        self.all()
            .iter()
            .filter_map(|f| {
                let data = &f["data"];
                data["entry"]["data"]["code"]
                    .as_str()
                    .or_else(|| data["event"]["error"]["code"].as_str())
                    .map(str::to_owned)
            })
            .collect()
    }

    /// The text the model streamed to it.
    pub fn text(&self) -> String {
        self.all()
            .iter()
            .filter_map(|f| f["data"]["event"]["text"].as_str().map(str::to_owned))
            .collect()
    }

    fn push(&self, frame: &Bytes) {
        let value: Value = serde_json::from_slice(frame).expect("frames are JSON");
        if let Some(on_frame) = self.on_frame.lock().expect("lock").as_ref() {
            on_frame(&value);
        }
        self.frames.lock().expect("lock").push(value);
    }
}

impl Frames for FakeFrames {
    async fn send_numbered(&self, frames: &mut Vec<Bytes>, through: u64) -> bool {
        let gone = self.gone.load(Ordering::SeqCst);
        for frame in frames.drain(..) {
            if !gone {
                self.push(&frame);
            }
        }
        self.last.fetch_max(through, Ordering::SeqCst);
        !gone
    }

    async fn send_stamped(&self, make: impl FnOnce(u64) -> Bytes + Send) -> bool {
        let frame = make(self.last.load(Ordering::SeqCst));
        if self.gone.load(Ordering::SeqCst) {
            return false;
        }
        self.push(&frame);
        true
    }
}

/// One client of one host: its session and what it was sent.
pub struct Client {
    pub host: String,
    pub attachment: Attachment,
    pub frames: FakeFrames,
    pub store: FakeStore,
    pub settings: TurnSettings,
}

impl Client {
    pub fn new(host: &str, store: &FakeStore, session: &str, owner: &str) -> Self {
        let frames = FakeFrames::default();
        let party = Party {
            owner: owner.to_owned(),
            sees_all: false,
        };
        Self {
            host: host.to_owned(),
            attachment: Attachment::new(session.to_owned(), party, frames.last.clone()),
            frames,
            store: store.clone(),
            settings: TurnSettings::default(),
        }
    }

    pub fn scope(&self) -> Scope<'_, FakeStore, FakeFrames> {
        Scope {
            host: &self.host,
            attachment: &self.attachment,
            store: &self.store,
            frames: &self.frames,
            framer: Framer {
                envelope: Envelope::Flat,
            },
            settings: self.settings,
        }
    }

    pub async fn prompt(&self, locks: &SessionLocks, model: &FakeModel, text: &str) -> Status {
        self.prompt_with(locks, model, text, Arc::default()).await
    }

    pub async fn prompt_with(
        &self,
        locks: &SessionLocks,
        model: &FakeModel,
        text: &str,
        control: Arc<TurnControl>,
    ) -> Status {
        let prompt = Prompt {
            id: None,
            text: text.to_owned(),
            model: None,
            params: Box::default(),
            round_trips: false,
        };
        turn::run(
            &self.scope(),
            locks,
            Arc::new(model.clone()),
            prompt,
            control,
        )
        .await
        .status
    }
}

/// Backends by name, with history policies.
#[derive(Default)]
pub struct FakeBackends {
    pub models: Vec<Arc<FakeModel>>,
    pub policies: HashMap<String, super::history::HistoryPolicy>,
}

impl super::ports::Backends<FakeModel> for FakeBackends {
    fn model(&self, name: &str) -> Option<Arc<FakeModel>> {
        self.models.iter().find(|m| m.name == name).cloned()
    }

    fn history(&self, name: &str) -> Option<&super::history::HistoryPolicy> {
        self.policies.get(name)
    }
}

impl Client {
    /// Runs prompt `text` on `model`, with `backends`; answers how it ended
    /// and the backend it ran on.
    pub async fn prompt_on(
        &self,
        locks: &SessionLocks,
        backends: &FakeBackends,
        model: &Arc<FakeModel>,
        prompt: Prompt,
    ) -> (turn::Report, Arc<FakeModel>) {
        turn::run_with(
            &self.scope(),
            locks,
            backends,
            model.clone(),
            prompt,
            Arc::default(),
        )
        .await
    }
}

/// A prompt of `text`, on no backend of its own, without round trips.
pub fn prompt(text: &str) -> Prompt {
    Prompt {
        id: None,
        text: text.to_owned(),
        model: None,
        params: Box::default(),
        round_trips: false,
    }
}
