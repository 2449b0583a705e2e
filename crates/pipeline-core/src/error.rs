use std::time::Duration;

use providers::{ErrorClass, ProviderError};
use resilience::Refusal;

use crate::StepType;

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
}

impl PipelineError {
    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Upstream { source, .. } => source.is_retryable(),
            Self::Refused { source, .. } => source.is_retryable(),
            Self::ContractViolation { .. } | Self::DeadlineExceeded { .. } => true,
            _ => false,
        }
    }

    /// A low-cardinality label for metrics and the telemetry row's `error_class`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::UnknownStep { .. } => "unknown_step",
            Self::InvalidContext { .. } => "invalid_context",
            Self::InvalidInput { .. } => "invalid_input",
            Self::PromptTooLarge { .. } => "prompt_too_large",
            Self::CostLimitExceeded { .. } => "cost_limit",
            Self::Upstream { source, .. } => source.metric_label(),
            Self::Refused { source, .. } => source.metric_label(),
            Self::ContractViolation { .. } => "contract_violation",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
        }
    }

    /// Upstream requests made before the call failed.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Upstream { attempts, .. }
            | Self::Refused { attempts, .. }
            | Self::ContractViolation { attempts, .. }
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
        match self {
            Self::Refused { .. } | Self::DeadlineExceeded { .. } => true,
            Self::Upstream { source, .. } => matches!(
                source.class(),
                ErrorClass::RateLimited
                    | ErrorClass::QuotaExhausted
                    | ErrorClass::ServerError
                    | ErrorClass::Timeout
                    | ErrorClass::Connection
                    | ErrorClass::MalformedReply
            ),
            _ => false,
        }
    }
}
