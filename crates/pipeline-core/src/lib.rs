//! The aipipe engine: one door for every AI call of an application.
//!
//! ```text
//! engine.execute(step_type, input, context, options) -> PipelineResult
//! ```
//!
//! A call is rendered into a prompt from its step's template, looked up in the caches, sent to
//! a provider through the guards under a deadline, validated against the step's output
//! contract (with one repair attempt), stored in the caches, and recorded in telemetry: in
//! that order, numbered stage by stage in the `engine` module, behind [`Engine::execute`]. The
//! concerns themselves live in their own crates; this one composes them.

mod clock;
mod config;
mod contract;
mod engine;
mod error;
mod prompt;
mod request;
mod result;
mod step;

pub use clock::{Clock, ManualClock, SystemClock, TokioSystemClock};
pub use config::{
    AnswerMatch, AuditConfig, BudgetSettings, CacheSettings, Config, ConfigSource, EngineSettings, FallbackSettings,
    ModelRegistry, ModelSpec, OnBudget, ProviderKind, ProviderSettings, ResilienceSettings, RouteSpec, RoutingSettings,
    SemanticSettings, StateSettings, StepSpec, TelemetrySettings,
};
pub use engine::route as routing;
pub use engine::{AuditMode, Embeddings, Engine, EngineBuilder};
pub use error::{PipelineError, SetupError};
pub use request::{CachePolicy, CallContext, CallOptions, RouteChoice, TraceId, TraceParent};
pub use result::{PipelineResult, SimilarRequest, Source};
pub use step::{InvalidStepName, StepKind, StepType};

/// Re-exported so that callers can build providers and recorders without naming the crates.
pub use providers;
pub use resilience;
pub use semantic_cache;
pub use telemetry;
