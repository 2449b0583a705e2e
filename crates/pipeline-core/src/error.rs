use std::path::PathBuf;
use std::time::Duration;

use providers::ProviderError;
use resilience::Refusal;
use telemetry::ErrorClass;

use crate::StepType;

/// Loading the config or building the engine from it failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("config file `{}` does not exist: pass an existing file, or none to run on the embedded defaults", path.display())]
    MissingFile { path: PathBuf },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("provider setup: {0}")]
    Provider(#[from] providers::ProviderError),
    #[error("semantic cache: {0} (or set semantic.enabled = false)")]
    Semantic(#[from] semantic_cache::CacheError),
    #[error("shared state: {0}")]
    Shared(#[from] shared_state::SharedError),
}

impl SetupError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { key: key.into(), message: message.into() }
    }

    /// A bad config fails the same way every time; only a database that was briefly
    /// unreachable may work on a second try.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Telemetry(err) if err.is_retryable())
    }

    /// A low-cardinality label for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingFile { .. } => "missing_file",
            Self::Invalid { .. } => "invalid_config",
            Self::Telemetry(err) => err.metric_label(),
            Self::Provider(err) => err.metric_label(),
            Self::Semantic(_) => "semantic_cache",
            Self::Shared(err) => err.label(),
        }
    }
}

/// Why a call produced no answer. Each variant says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PipelineError {
    #[error("unknown step type `{step}`: declare it under [steps.{step}] in the config (known: {known})")]
    UnknownStep { step: String, known: String },
    #[error("invalid call context: {reason}")]
    InvalidContext { reason: String },
    #[error("input does not fit the `{step}` prompt template: {reason}")]
    InvalidInput { step: StepType, reason: String },
    #[error(
        "the `{step}` prompt is {chars} characters, over the limit of {limit}: shorten the input or raise \
         `steps.{step}.max_prompt_chars`"
    )]
    PromptTooLarge { step: StepType, chars: usize, limit: usize },
    #[error("{reason}")]
    CostLimitExceeded { reason: String },
    #[error("invalid call options: {reason}")]
    InvalidOptions { reason: String },
    #[error(
        "the daily budget of {scope} is spent (${spent_usd:.4} of ${limit_usd:.4}): calls that cost anything are \
         refused until 00:00 UTC; raise it under [budgets] or use a free model"
    )]
    BudgetExhausted { scope: String, limit_usd: f64, spent_usd: f64 },
    #[error("no model on the `{step}` route can take this call ({excluded}): {hint}")]
    NoRoute { step: StepType, excluded: String, hint: String },
    #[error(
        "model `{model}` is not in the model registry (listed: {known}): add [models.\"{model}\"] to the config with \
         its provider and prices (0 for a free local model), or [models.\"*\"] to price every model it does not \
         list, or leave `model` out to take the step's route"
    )]
    UnlistedModel { model: String, known: String },
    #[error("upstream call for `{step}` failed after {attempts} attempt(s): {source}")]
    Upstream {
        step: StepType,
        attempts: u32,
        #[source]
        source: ProviderError,
    },
    #[error("call for `{step}` not sent after {attempts} attempt(s): {source}")]
    Refused {
        step: StepType,
        attempts: u32,
        #[source]
        source: Refusal,
    },
    #[error("the `{step}` reply broke its output contract, also after a repair attempt: {violations}")]
    ContractViolation { step: StepType, attempts: u32, violations: String },
    #[error("the call's deadline of {budget:?} passed after {attempts} attempt(s)")]
    DeadlineExceeded { budget: Duration, attempts: u32 },
    #[error("{reason}")]
    Unsupported { param: String, reason: String },
    #[error("the embedding model failed: {reason}")]
    Embedding { reason: String },
    #[error(
        "the `{step}` answer was cut off after part of it had been streamed to the caller (attempt {attempts}): \
         {source}"
    )]
    StreamInterrupted {
        step: StepType,
        attempts: u32,
        #[source]
        source: ProviderError,
    },
}

impl PipelineError {
    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Upstream { source, .. } => source.is_retryable(),
            Self::Refused { source, .. } => source.is_retryable(),
            Self::ContractViolation { .. } | Self::DeadlineExceeded { .. } | Self::StreamInterrupted { .. } => true,
            _ => false,
        }
    }

    /// What kind of failure this is, in telemetry's words: the row's `error_class`, the
    /// metric label, and a fallback's `degraded_by`.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::UnknownStep { .. } => ErrorClass::UnknownStep,
            Self::InvalidContext { .. } => ErrorClass::InvalidContext,
            Self::InvalidInput { .. } => ErrorClass::InvalidInput,
            Self::PromptTooLarge { .. } => ErrorClass::PromptTooLarge,
            Self::CostLimitExceeded { .. } => ErrorClass::CostLimit,
            Self::InvalidOptions { .. } => ErrorClass::InvalidRequest,
            Self::BudgetExhausted { .. } => ErrorClass::BudgetExhausted,
            Self::NoRoute { .. } => ErrorClass::NoRoute,
            Self::UnlistedModel { .. } => ErrorClass::InvalidRequest,
            Self::Upstream { source, .. } => upstream_class(source.class()),
            Self::Refused { source, .. } => refusal_class(source),
            Self::ContractViolation { .. } => ErrorClass::ContractViolation,
            Self::DeadlineExceeded { .. } => ErrorClass::DeadlineExceeded,
            Self::Unsupported { .. } => ErrorClass::InvalidRequest,
            Self::Embedding { .. } => ErrorClass::ServerError,
            Self::StreamInterrupted { .. } => ErrorClass::StreamInterrupted,
        }
    }

    /// A low-cardinality label for metrics and the telemetry row's `error_class`.
    pub fn metric_label(&self) -> &'static str {
        self.class().label()
    }

    /// Upstream requests made before the call failed.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Upstream { attempts, .. }
            | Self::Refused { attempts, .. }
            | Self::ContractViolation { attempts, .. }
            | Self::StreamInterrupted { attempts, .. }
            | Self::DeadlineExceeded { attempts, .. } => *attempts,
            _ => 0,
        }
    }
}

impl PipelineError {
    /// Whether the failure says the upstream cannot answer now (rate limited, breaker open,
    /// timing out, failing) rather than that the request is wrong: only then do fallbacks
    /// stand in for it.
    pub fn upstream_unavailable(&self) -> bool {
        self.class().is_upstream_unavailable()
    }

    /// Whether another candidate of the route may answer what this one could not: the
    /// upstream failed in a way another model or provider may not (connection, timeout, 429,
    /// 5xx/529, an exhausted quota, a context window too small), or a guard held this one back.
    /// Never for a request that is wrong or refused credentials.
    pub fn falls_through(&self) -> bool {
        match self {
            Self::Upstream { source, .. } => {
                source.class().falls_through() || source.class() == providers::ErrorClass::QuotaExhausted
            }
            Self::Refused { .. } => true,
            _ => false,
        }
    }

    /// Whether a stand-in may answer in its place: when no model could answer, and when the
    /// model's answer broke the step's output contract even after a repair (a small model
    /// that cannot meet a schema is as unavailable to the step as one that is down).
    /// Never after part of a streamed answer reached the caller.
    pub fn stand_in_may_answer(&self) -> bool {
        !matches!(self, Self::StreamInterrupted { .. })
            && (self.upstream_unavailable() || matches!(self, Self::ContractViolation { .. }))
    }
}

fn upstream_class(class: providers::ErrorClass) -> ErrorClass {
    use providers::ErrorClass as Class;
    match class {
        Class::RateLimited => ErrorClass::RateLimited,
        Class::QuotaExhausted => ErrorClass::QuotaExhausted,
        Class::ServerError => ErrorClass::ServerError,
        Class::Timeout => ErrorClass::Timeout,
        Class::Connection => ErrorClass::Connection,
        Class::BadRequest => ErrorClass::BadRequest,
        Class::ContextLength => ErrorClass::ContextLength,
        Class::Unauthorized => ErrorClass::Unauthorized,
        Class::MalformedReply => ErrorClass::MalformedReply,
        Class::ClientClosed => ErrorClass::ClientClosed,
    }
}

fn refusal_class(refusal: &Refusal) -> ErrorClass {
    match refusal {
        Refusal::RateLimited { .. } => ErrorClass::RateLimitedLocally,
        Refusal::CircuitOpen { .. } => ErrorClass::CircuitOpen,
        Refusal::Paused { .. } => ErrorClass::UpstreamPaused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Call logs carry the providers' words for a failure, rows and metrics telemetry's: for
    /// the same failure they are the same word.
    #[test]
    fn one_word_per_failure_across_crates() {
        for class in [
            providers::ErrorClass::RateLimited,
            providers::ErrorClass::QuotaExhausted,
            providers::ErrorClass::ServerError,
            providers::ErrorClass::Timeout,
            providers::ErrorClass::Connection,
            providers::ErrorClass::BadRequest,
            providers::ErrorClass::ContextLength,
            providers::ErrorClass::Unauthorized,
            providers::ErrorClass::MalformedReply,
            providers::ErrorClass::ClientClosed,
        ] {
            assert_eq!(upstream_class(class).label(), class.label());
        }
        let wait = Duration::from_secs(1);
        for refusal in [
            Refusal::RateLimited { scope: resilience::Scope::ModelTokens, retry_after: wait },
            Refusal::CircuitOpen { key: "p/m".into(), retry_after: wait },
            Refusal::Paused { key: "p/m".into(), retry_after: wait },
        ] {
            assert_eq!(refusal_class(&refusal).label(), refusal.metric_label());
        }
    }
}
