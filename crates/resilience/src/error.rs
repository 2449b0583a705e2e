use std::fmt;
use std::time::Duration;

/// Which limit ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    WorkspaceRequests,
    WorkspaceTokens,
    ModelRequests,
    ModelTokens,
}

impl Scope {
    /// Whether it counts requests (else tokens).
    pub fn is_requests(self) -> bool {
        matches!(self, Self::WorkspaceRequests | Self::ModelRequests)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::WorkspaceRequests => "workspace_requests",
            Self::WorkspaceTokens => "workspace_tokens",
            Self::ModelRequests => "model_requests",
            Self::ModelTokens => "model_tokens",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::WorkspaceRequests => "the workspace's requests-per-minute",
            Self::WorkspaceTokens => "the workspace's tokens-per-minute",
            Self::ModelRequests => "the model's requests-per-minute",
            Self::ModelTokens => "the model's tokens-per-minute",
        })
    }
}

/// A guard kept an attempt from being sent. Each says when trying again could work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("{scope} limit has no capacity within the call's deadline (capacity in {:.2} s)", retry_after.as_secs_f64())]
    RateLimited { scope: Scope, retry_after: Duration },
    #[error("the circuit breaker for `{key}` is open after repeated upstream faults (next probe in {:.2} s)", retry_after.as_secs_f64())]
    CircuitOpen { key: String, retry_after: Duration },
    #[error("the upstream asked for a pause on `{key}` that outlasts the call's deadline (resumes in {:.2} s)", retry_after.as_secs_f64())]
    Paused { key: String, retry_after: Duration },
}

impl Refusal {
    /// When the refused call could go through.
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::CircuitOpen { retry_after, .. }
            | Self::Paused { retry_after, .. } => *retry_after,
        }
    }

    /// Every refusal is about time: the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        true
    }

    /// A low-cardinality label for metrics and telemetry.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited_locally",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Paused { .. } => "upstream_paused",
        }
    }
}
