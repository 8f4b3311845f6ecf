//! What the provider plugins (`openai`, `anthropic`, `ollama`) share: their
//! settings, one streamed HTTP request with retries, cancel and timeouts,
//! the framing of event streams, and the mapping of provider failures onto
//! the stable error codes of [`llm_host_plugin_api::codes`].
//!
//! A provider plugin resolves its settings into a [`Backend`], builds the
//! provider's JSON body from the turn's request, and hands it with a
//! [`StreamHandler`] (which turns the provider's stream frames into sink
//! events) to [`Backend::stream`].
//!
//! Layout:
//! - [`settings`]: [`ProviderSettings`] as written in `config.toml`, checked
//!   into a [`Backend`]; [`Params`] merged per turn; [`Secret`] keys.
//! - [`stream`]: the request, its retries, the connection thread, cancel and
//!   `timeout_ms`.
//! - [`framing`]: server-sent events and NDJSON, cut into [`Frame`]s.
//! - [`limits`]: the bounds on what an upstream can make a plugin hold.
//! - [`emit`]: the sink as handlers see it ([`Emitter`], [`Halt`]).
//! - [`conversation`]: pieces of request bodies the providers share.
//! - [`error`]: [`ProviderError`] and the mapping of statuses, error bodies
//!   and transport failures to codes.
//! - `testing` (feature `test-support`): a scripted HTTP/1.1 server and a
//!   recording sink for the plugins' tests.

#![warn(missing_docs)]

pub mod conversation;
pub mod emit;
pub mod error;
pub mod framing;
pub mod limits;
pub mod settings;
pub mod stream;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use emit::{Emitter, Halt};
pub use error::ProviderError;
pub use framing::{Frame, Framing};
pub use settings::{Backend, Params, ProviderInfo, ProviderSettings, Secret};
pub use stream::{HttpRequest, Step, StreamHandler};
