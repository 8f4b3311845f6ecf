//! The turn core's ports for the FFI adapters: a store plugin is a
//! [`SessionStore`], a model plugin a [`Model`]. Everything of the plugin ABI
//! (`RStr`, trait objects, `PluginError`) stays on this side. A store in a
//! child process of its own ([`super::isolated::store`]) takes each call
//! over its pipe; timed, counted and failed the same way.

use std::sync::Arc;

use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    EventSink, EventSink_TO, FinishReason, Flow, ListQuery, LogLevel, PluginError, StoreAdapterBox,
    TurnStepperBox, TurnWaker, TurnWaker_TO, Usage,
};
use serde::Serialize;

use super::isolated::stepped::SteppedTurn;
use super::runtime::{Engine, ModelBackend, StoreBackend, StoreEngine};
use crate::core::ports::{
    Model, ModelError, Next, SaveOutcome, SessionStore, Stepper, StoreError, Stored, Wake,
};
use crate::core::sink::TurnSink;

impl SessionStore for Arc<StoreBackend> {
    fn name(&self) -> &str {
        &self.name
    }

    fn shared(&self) -> bool {
        !self.in_process
    }

    async fn load(&self, id: &str) -> Result<Option<Stored>, StoreError> {
        if let StoreEngine::Process(child) = &self.engine {
            return observe(self, "load", child.load(id)).await;
        }
        let id = id.to_owned();
        call(self, "load", move |adapter| {
            adapter
                .load(RStr::from(id.as_str()))
                .into_result()
                .map(|found| {
                    found.into_option().map(|stored| Stored {
                        version: stored.version,
                        owner: stored.owner.into_string(),
                        data: stored.data.into_string(),
                    })
                })
        })
        .await
    }

    async fn save(
        &self,
        id: &str,
        expected: u64,
        owner: &str,
        data: String,
    ) -> Result<SaveOutcome, StoreError> {
        if let StoreEngine::Process(child) = &self.engine {
            return observe(self, "save", child.save(id, expected, owner, &data)).await;
        }
        let (id, owner) = (id.to_owned(), owner.to_owned());
        call(self, "save", move |adapter| {
            adapter
                .save(
                    RStr::from(id.as_str()),
                    expected,
                    RStr::from(owner.as_str()),
                    RStr::from(data.as_str()),
                )
                .into_result()
                .map(|outcome| match outcome {
                    llm_host_plugin_api::SaveOutcome::Saved { version } => {
                        SaveOutcome::Saved { version }
                    }
                    llm_host_plugin_api::SaveOutcome::Conflict { current } => {
                        SaveOutcome::Conflict { current }
                    }
                })
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        if let StoreEngine::Process(child) = &self.engine {
            return observe(self, "delete", child.delete(id)).await;
        }
        let id = id.to_owned();
        call(self, "delete", move |adapter| {
            adapter.delete(RStr::from(id.as_str())).into_result()
        })
        .await
    }
}

/// A page of session ids.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The ids, ascending.
    pub ids: Vec<String>,
    /// Where the next page starts.
    pub next: Option<String>,
}

/// One page of the session ids of `owner` (empty: every owner).
pub async fn list(
    store: &Arc<StoreBackend>,
    owner: &str,
    after: &str,
    limit: u32,
) -> Result<Page, StoreError> {
    if let StoreEngine::Process(child) = &store.engine {
        let page = child.list(owner, after, limit);
        let (ids, next) = observe(store, "list", page).await?;
        return Ok(Page { ids, next });
    }
    let (owner, after) = (owner.to_owned(), after.to_owned());
    call(store, "list", move |adapter| {
        adapter
            .list(ListQuery {
                owner: RStr::from(owner.as_str()),
                after: RStr::from(after.as_str()),
                limit,
            })
            .into_result()
            .map(|page| Page {
                ids: page.ids.into_iter().map(|id| id.into_string()).collect(),
                next: page.next.into_option().map(|n| n.into_string()),
            })
    })
    .await
}

/// Whether the store answers.
pub async fn ping(store: &Arc<StoreBackend>) -> Result<(), StoreError> {
    if let StoreEngine::Process(child) = &store.engine {
        return observe(store, "ping", child.ping()).await;
    }
    call(store, "ping", |adapter| adapter.ping().into_result()).await
}

/// Runs one store call on the blocking pool (directly, for a store in this
/// process's memory), timed and counted by `op`.
async fn call<T: Send + 'static>(
    store: &Arc<StoreBackend>,
    op: &'static str,
    body: impl FnOnce(&StoreAdapterBox) -> Result<T, PluginError> + Send + 'static,
) -> Result<T, StoreError> {
    let StoreEngine::InProcess(adapter) = &store.engine else {
        // Never: every call takes the child's path first.
        return Err(StoreError::Lost(store.name.clone()));
    };
    let started = std::time::Instant::now();
    let result = if store.in_process {
        // The store answers from memory: a blocking thread would cost more
        // than the call.
        Ok(body(adapter))
    } else {
        let backend = store.clone();
        tokio::task::spawn_blocking(move || match &backend.engine {
            StoreEngine::InProcess(adapter) => body(adapter),
            StoreEngine::Process(_) => Err(PluginError::internal("the store moved")),
        })
        .await
    };
    let result = match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Some(error.to_string())),
        Err(_) => Err(None),
    };
    account(store, op, started, result)
}

/// Awaits one call of a store in a child process, timed and counted by
/// `op` as [`call`] does.
async fn observe<T>(
    store: &StoreBackend,
    op: &'static str,
    body: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let result = body.await.map_err(Some);
    account(store, op, started, result)
}

/// Records a store call's time (and its failure) in the metrics; `Err(None)`:
/// the call was lost.
fn account<T>(
    store: &StoreBackend,
    op: &'static str,
    started: std::time::Instant,
    result: Result<T, Option<String>>,
) -> Result<T, StoreError> {
    let metrics = crate::metrics::metrics();
    metrics
        .store_seconds
        .get_or_create(&[("op", op)])
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics.store_errors.get_or_create(&[("op", op)]).inc();
    }
    result.map_err(|failure| match failure {
        Some(message) => StoreError::Failed {
            store: store.name.clone(),
            message,
        },
        None => StoreError::Lost(store.name.clone()),
    })
}

impl Model for ModelBackend {
    type Stepper = StepperPort;

    fn name(&self) -> &str {
        &self.name
    }

    fn stepped(&self) -> bool {
        self.stepped
    }

    fn generate(&self, request: &str, sink: &mut TurnSink) -> Result<(), ModelError> {
        let adapter = match &self.engine {
            Engine::InProcess(adapter) => adapter,
            // Never asked: a backend in a process of its own runs in steps.
            Engine::Process(_) => {
                return Err(ModelError::internal(
                    "a backend in a process of its own runs its turns in steps",
                ))
            }
        };
        let mut events = Events(sink);
        adapter
            .generate(
                RStr::from(request),
                EventSink_TO::from_ptr(&mut events, TD_Opaque),
            )
            .into_result()
            .map_err(model_error)
    }

    fn start(&self, request: &str, wake: Wake) -> Result<StepperPort, ModelError> {
        let adapter = match &self.engine {
            Engine::InProcess(adapter) => adapter,
            Engine::Process(child) => {
                return child.start_turn(request, wake).map(StepperPort::Child)
            }
        };
        let waker = TurnWaker_TO::from_value(StepWaker(wake), TD_Opaque);
        adapter
            .start(RStr::from(request), waker)
            .into_result()
            .map(StepperPort::Plugin)
            .map_err(model_error)
    }
}

/// A stepped model's turn: a stepped plugin's in this process, or any
/// turn of a backend in a process of its own.
pub enum StepperPort {
    /// The plugin's own stepper.
    Plugin(TurnStepperBox),
    /// A turn in the backend's child process.
    Child(SteppedTurn),
}

impl Stepper for StepperPort {
    fn step(&mut self, sink: &mut TurnSink) -> Result<Next, ModelError> {
        let stepper = match self {
            StepperPort::Plugin(stepper) => stepper,
            StepperPort::Child(turn) => return turn.step(sink),
        };
        let mut events = Events(sink);
        stepper
            .step(EventSink_TO::from_ptr(&mut events, TD_Opaque))
            .into_result()
            .map(|step| step.next())
            .map_err(model_error)
    }
}

fn model_error(err: PluginError) -> ModelError {
    ModelError {
        code: err.kind.as_str().to_owned(),
        message: err.message.into_string(),
    }
}

/// Wakes a stepped turn whose step answered pending.
struct StepWaker(Wake);

impl TurnWaker for StepWaker {
    fn wake(&self) {
        // Keeps one wake for a turn not waiting yet; never panics.
        self.0.notify_one();
    }
}

/// The plugin ABI's event sink over the core's [`TurnSink`].
struct Events<'a>(&'a mut TurnSink);

fn flow(go_on: bool) -> Flow {
    if go_on {
        Flow::CONTINUE
    } else {
        Flow::STOP
    }
}

impl EventSink for Events<'_> {
    fn start(&mut self, id: RStr<'_>, model_id: RStr<'_>) -> Flow {
        flow(self.0.start(id.as_str(), model_id.as_str()))
    }

    fn text(&mut self, text: RStr<'_>) -> Flow {
        flow(self.0.text(text.as_str()))
    }

    fn reasoning(&mut self, text: RStr<'_>) -> Flow {
        flow(self.0.reasoning(text.as_str()))
    }

    fn tool_call(&mut self, id: RStr<'_>, name: RStr<'_>, arguments: RStr<'_>) -> Flow {
        flow(
            self.0
                .tool_call(id.as_str(), name.as_str(), arguments.as_str()),
        )
    }

    fn usage(&mut self, usage: Usage) -> Flow {
        flow(self.0.usage(usage))
    }

    fn end(&mut self, reason: FinishReason) -> Flow {
        flow(self.0.end(reason))
    }

    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        flow(self.0.error(code.as_str(), message.as_str()))
    }

    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, data_json: RStr<'_>) -> Flow {
        flow(
            self.0
                .diagnostic(level.as_str(), message.as_str(), data_json.as_str()),
        )
    }

    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}
