//! Model adapters: one generation, streamed event by event into a host sink.
//!
//! The host calls [`ModelAdapter::generate`] on a blocking thread with the
//! turn's request (JSON of [`ModelRequest`]) and a sink. The adapter reports
//! what the model produces through the sink, in this order:
//!
//! ```text
//! start, (text | reasoning | tool_call | usage | diagnostic)*, (end | error)
//! ```
//!
//! Every sink call answers a [`Flow`]: on [`Flow::STOP`] (the client cancelled,
//! or went away) the adapter stops generating and returns promptly. The host
//! fills in what an adapter leaves out (a missing `start` or `end`) and drops
//! what comes after `end` or `error`.

use std::fmt;

use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    sabi_types::RMut,
    std_types::{RBox, RResult, RStr},
    StableAbi,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::steps::{TurnStepperBox, TurnWakerBox};
use crate::{guard, LogLevel, PluginError};

/// The host's answer to each event: go on, or stop generating.
///
/// A `u8` newtype: `0` continue, anything else stop.
/// Evolution rule: never extended; any non-zero value means stop.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Flow(pub u8);

impl Flow {
    /// Keep generating.
    pub const CONTINUE: Flow = Flow(0);
    /// Stop at once and return: the turn was cancelled or the client is gone.
    pub const STOP: Flow = Flow(1);

    /// Whether the adapter must stop.
    pub fn is_stop(self) -> bool {
        self.0 != 0
    }
}

/// Why a generation ended.
///
/// A `u8` newtype so that values from a newer peer are harmless (shown as `stop`).
/// Evolution rule: constants are only added, never renumbered.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FinishReason(pub u8);

impl FinishReason {
    /// The model finished its answer.
    pub const STOP: FinishReason = FinishReason(0);
    /// The token limit was reached.
    pub const LENGTH: FinishReason = FinishReason(1);
    /// The model stopped to have tools called.
    pub const TOOL_CALLS: FinishReason = FinishReason(2);
    /// The generation was cancelled.
    pub const CANCELLED: FinishReason = FinishReason(3);

    /// The protocol's name: `stop`, `length`, `tool-calls`, `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LENGTH => "length",
            Self::TOOL_CALLS => "tool-calls",
            Self::CANCELLED => "cancelled",
            _ => "stop",
        }
    }
}

impl fmt::Debug for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token counts of one generation.
///
/// Evolution rule: this struct never changes layout; more detail would come
/// through a new sink method.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Usage {
    /// Tokens of the prompt (the whole conversation sent to the model).
    pub input_tokens: u64,
    /// Tokens generated.
    pub output_tokens: u64,
    /// Usually `input_tokens + output_tokens`; some providers count more.
    pub total_tokens: u64,
}

/// Where a model adapter sends its events. The host implements it.
///
/// Text arguments are borrowed for the call only; the host copies what it keeps.
/// An empty string stands for an absent optional value.
///
/// Evolution rule: methods are only appended at the end, each with a default
/// body, so a plugin built against a newer plugin-api still runs on an older
/// host (the default answers in place of the missing method);
/// `#[sabi(last_prefix_field)]` stays on `is_cancelled`; the release that
/// appends freezes the layout it replaces in [`compat`](crate::compat) (the
/// crate's evolution rule).
#[sabi_trait]
pub trait EventSink: Send {
    /// The generation started. `id`: the provider's id for it; `model_id`: the
    /// model that answers. Both may be empty.
    fn start(&mut self, id: RStr<'_>, model_id: RStr<'_>) -> Flow;

    /// A piece of answer text.
    fn text(&mut self, text: RStr<'_>) -> Flow;

    /// A piece of reasoning ("thinking") text.
    fn reasoning(&mut self, text: RStr<'_>) -> Flow;

    /// One whole tool call; `arguments` is its JSON text. Adapters assemble
    /// streamed fragments before calling this.
    fn tool_call(&mut self, id: RStr<'_>, name: RStr<'_>, arguments: RStr<'_>) -> Flow;

    /// Token counts; may come more than once, the last one counts.
    fn usage(&mut self, usage: Usage) -> Flow;

    /// The generation ended normally.
    fn end(&mut self, reason: FinishReason) -> Flow;

    /// The generation failed. `code` is stable and machine-readable (see
    /// [`codes`](crate::codes)); `message` is the provider's own words.
    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow;

    /// Something the client should know that is not model output (a retried
    /// request, a setting ignored). `data_json` is a JSON object or empty.
    fn diagnostic(&mut self, level: LogLevel, message: RStr<'_>, data_json: RStr<'_>) -> Flow;

    /// Whether the turn was cancelled, for adapters that wait on something
    /// other than the sink (a slow upstream) and want to give up early.
    #[sabi(last_prefix_field)]
    fn is_cancelled(&self) -> bool;
}

/// A sink trait object as adapters receive it.
pub type EventSinkRef<'a> = EventSink_TO<'a, RMut<'a, ()>>;

/// A model backend built from its settings. The host may call `generate` from
/// several threads at once, one call per running turn.
///
/// Evolution rule: methods are only appended at the end, each with a default
/// body (the host calls it on adapters built before the method existed);
/// `#[sabi(last_prefix_field)]` stays on `generate`; the release that appends
/// freezes the layout it replaces in [`compat`](crate::compat), as 0.1.2 did
/// for the 0.1.0 layouts, from before `stepped` and `start` (the crate's
/// evolution rule).
#[sabi_trait]
pub trait ModelAdapter: Send + Sync {
    /// Streams one generation. `request` is the JSON of a [`ModelRequest`].
    /// Returning an error is the same as calling `sink.error` with the
    /// error's kind as code.
    #[sabi(last_prefix_field)]
    fn generate(&self, request: RStr<'_>, sink: EventSinkRef<'_>) -> RResult<(), PluginError>;

    /// Whether this adapter runs its turns in steps ([`ModelAdapter::start`])
    /// on the host's own workers rather than each on a thread of its own in
    /// `generate`. The host asks once, when it builds the adapter. Added
    /// after `generate`, so it has a default: not stepped.
    fn stepped(&self) -> bool {
        false
    }

    /// Starts a turn to be run in steps (see [`steps`](crate::steps)), for
    /// adapters whose `stepped` answers true. `request` is the JSON of a
    /// [`ModelRequest`]; `waker` is how a step that answered
    /// [`Step::PENDING`](crate::Step::PENDING) asks to be called again. An
    /// error here is the turn's error. Added after `generate`, with a default
    /// that refuses.
    fn start(
        &self,
        request: RStr<'_>,
        waker: TurnWakerBox,
    ) -> RResult<TurnStepperBox, PluginError> {
        let _ = (request, waker);
        RResult::RErr(PluginError::internal(
            "this adapter does not run turns in steps",
        ))
    }
}

/// A model adapter trait object as the host holds it.
pub type ModelAdapterBox = ModelAdapter_TO<'static, RBox<()>>;

/// Who wrote a message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The person at the client.
    #[default]
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
    /// A role this plugin-api does not know yet.
    #[serde(other)]
    Other,
}

/// A tool call made by the model, whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ToolCall {
    /// The call's id, to match its result.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, as JSON text.
    pub arguments: String,
}

/// One message of a conversation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    #[serde(default)]
    pub content: String,
    /// The model's reasoning, for assistant messages that had some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Tool calls the assistant made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `tool` messages: the call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message of `role` with `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            ..Self::default()
        }
    }
}

/// A tool the model may call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of its arguments.
    #[serde(default)]
    pub parameters: Value,
}

/// Per-turn parameters from the client (`params` of a command-mode prompt).
/// They override the backend's defaults from its settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TurnParams {
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Every other parameter the client sent, for adapters that know it.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What the host asks of a model for one turn.
///
/// Crosses the boundary as JSON. Evolution rule: fields are only added, each
/// optional with a default, so older plugins ignore them and newer plugins get
/// the default from an older host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelRequest {
    /// The session this turn belongs to.
    #[serde(default)]
    pub session_id: String,
    /// The turn's id (`interactionId` on the wire).
    #[serde(default)]
    pub interaction_id: String,
    /// The backend's name in the host's config.
    #[serde(default)]
    pub backend: String,
    /// The conversation so far, ending with the new user message.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Per-turn parameters.
    #[serde(default)]
    pub params: TurnParams,
}

/// A model backend, the Rust way. Implement it and wrap the value with
/// [`model_adapter`] in your plugin's `new_model`.
pub trait Model: Send + Sync + 'static {
    /// Streams one generation into `sink`. See the module docs for the order
    /// of events. A returned error becomes the turn's error event.
    fn generate(&self, request: ModelRequest, sink: &mut Sink<'_>) -> Result<(), PluginError>;
}

/// The host's sink as a [`Model`] sees it.
pub struct Sink<'a> {
    inner: EventSinkRef<'a>,
}

impl<'a> Sink<'a> {
    /// Wraps a raw sink trait object.
    pub fn new(inner: EventSinkRef<'a>) -> Self {
        Self { inner }
    }

    /// See [`EventSink::start`].
    pub fn start(&mut self, id: &str, model_id: &str) -> Flow {
        self.inner.start(id.into(), model_id.into())
    }

    /// See [`EventSink::text`].
    pub fn text(&mut self, text: &str) -> Flow {
        self.inner.text(text.into())
    }

    /// See [`EventSink::reasoning`].
    pub fn reasoning(&mut self, text: &str) -> Flow {
        self.inner.reasoning(text.into())
    }

    /// See [`EventSink::tool_call`].
    pub fn tool_call(&mut self, call: &ToolCall) -> Flow {
        self.inner.tool_call(
            call.id.as_str().into(),
            call.name.as_str().into(),
            call.arguments.as_str().into(),
        )
    }

    /// See [`EventSink::usage`].
    pub fn usage(&mut self, usage: Usage) -> Flow {
        self.inner.usage(usage)
    }

    /// See [`EventSink::end`].
    pub fn end(&mut self, reason: FinishReason) -> Flow {
        self.inner.end(reason)
    }

    /// See [`EventSink::error`].
    pub fn error(&mut self, code: &str, message: &str) -> Flow {
        self.inner.error(code.into(), message.into())
    }

    /// See [`EventSink::diagnostic`].
    pub fn diagnostic(&mut self, level: LogLevel, message: &str, data: Option<&Value>) -> Flow {
        let data = data.map(Value::to_string).unwrap_or_default();
        self.inner
            .diagnostic(level, message.into(), data.as_str().into())
    }

    /// See [`EventSink::is_cancelled`].
    pub fn is_cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }
}

struct ModelShim<M>(M);

impl<M: Model> ModelAdapter for ModelShim<M> {
    fn generate(&self, request: RStr<'_>, sink: EventSinkRef<'_>) -> RResult<(), PluginError> {
        guard(|| {
            let request: ModelRequest = serde_json::from_str(request.as_str())?;
            self.0.generate(request, &mut Sink::new(sink))
        })
    }
}

/// Wraps a [`Model`] into the trait object the host takes. Every call into
/// it runs under [`guard`](fn@crate::guard).
pub fn model_adapter(model: impl Model) -> ModelAdapterBox {
    ModelAdapter_TO::from_value(ModelShim(model), TD_Opaque)
}
