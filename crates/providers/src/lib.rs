//! Model providers behind one request/response shape.
//!
//! Every provider is a [`tower::Service`] from [`ChatRequest`] to [`ChatResponse`], so that any
//! such service (a live endpoint, a recorded log, a test double) can answer the engine, which
//! never knows which one it is.
//! Every failure, from any provider, is a [`ProviderError`] whose [`ErrorClass`] is decided by
//! one classifier ([`classify_http_failure`]); retries, breakers and metrics all read that class.

mod anthropic;
mod classify;
mod error;
mod openai;
mod recorded;
mod scrub;
mod stream;
mod types;

pub use anthropic::{API_VERSION as ANTHROPIC_VERSION, Anthropic, AnthropicSettings, events as anthropic_events};
pub use classify::{classify_http_failure, declared_limits, parse_retry_after};
pub use error::{ErrorClass, ProviderError};
pub use openai::events as openai_events;
pub use openai::{OpenAiCompatible, OpenAiSettings};
pub use recorded::{RecordedCall, RecordedProvider, RecordedReply, is_same_model};
pub use scrub::{MASK, scrub};
pub use stream::{Delta, StreamEvent, StreamSink, StreamedReply};
pub use types::{
    Capabilities, ChatMessage, ChatRequest, ChatResponse, DeclaredLimits, Extras, FinishReason, Image, LimitWindow,
    ResponseFormat, Role, Tool, ToolCall, ToolChoice, Usage,
};

/// The shape the engine holds a provider in: cloneable per call, type-erased, `Sync` so that
/// an engine can be shared across tasks.
pub type ProviderService = tower::util::BoxCloneSyncService<ChatRequest, ChatResponse, ProviderError>;
