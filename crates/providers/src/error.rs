use std::fmt;
use std::time::Duration;

/// What kind of failure a provider call ended in. Decided once, by the classifier; read by
/// retries, circuit breakers, metrics and telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 429 because of request or token rate; goes away by waiting.
    RateLimited,
    /// 429 because the account's quota or billing is exhausted; waiting does not help.
    QuotaExhausted,
    ServerError,
    Timeout,
    Connection,
    BadRequest,
    /// The prompt and the output budget do not fit the model's context window: the same
    /// request fails again on this model, but a model with a larger window may take it.
    ContextLength,
    Unauthorized,
    /// A 2xx reply that is not a chat completion we can read.
    MalformedReply,
    /// The caller of a streamed reply went away; the upstream request was dropped. Nobody's
    /// fault but the caller's, and nobody left to answer.
    ClientClosed,
}

impl ErrorClass {
    /// Whether the same request may succeed if sent again.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::RateLimited | Self::ServerError | Self::Timeout | Self::Connection | Self::MalformedReply)
    }

    /// Whether another model may answer the same request: every retryable failure, and a
    /// context window too small for it. A bad request or refused credentials would fail on
    /// any model, or should not be hidden by one.
    pub fn falls_through(self) -> bool {
        self.is_retryable() || self == Self::ContextLength
    }

    /// Whether this failure says something about the upstream's health (what a circuit breaker
    /// counts). A bad request or a quota problem is the caller's, not the upstream's; a 200 that
    /// is not a completion is the upstream's.
    pub fn is_upstream_fault(self) -> bool {
        matches!(self, Self::RateLimited | Self::ServerError | Self::Timeout | Self::Connection | Self::MalformedReply)
    }

    /// A low-cardinality label for metrics and telemetry rows.
    pub fn label(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::QuotaExhausted => "quota_exhausted",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::BadRequest => "bad_request",
            Self::ContextLength => "context_length",
            Self::Unauthorized => "unauthorized",
            Self::MalformedReply => "malformed_reply",
            Self::ClientClosed => "client_closed",
        }
    }

    /// The inverse of [`ErrorClass::label`], for reading logs.
    pub fn from_label(label: &str) -> Option<Self> {
        [
            Self::RateLimited,
            Self::QuotaExhausted,
            Self::ServerError,
            Self::Timeout,
            Self::Connection,
            Self::BadRequest,
            Self::ContextLength,
            Self::Unauthorized,
            Self::MalformedReply,
            Self::ClientClosed,
        ]
        .into_iter()
        .find(|class| class.label() == label)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("rate limited by the upstream{}: {message}", retry_hint(*retry_after))]
    RateLimited { retry_after: Option<Duration>, message: String },
    #[error("quota exhausted at the upstream: {message} (check the account's billing or plan)")]
    QuotaExhausted { message: String },
    #[error("upstream server error {status}: {message}")]
    ServerError { status: u16, message: String, retry_after: Option<Duration> },
    #[error("upstream did not answer within {after:?}")]
    Timeout { after: Duration },
    #[error("could not reach the upstream: {message}")]
    Connection { message: String },
    #[error("upstream rejected the request ({status}): {message}")]
    BadRequest { status: u16, message: String },
    #[error("the prompt does not fit the model's context window: {message}")]
    ContextLength { message: String },
    #[error("upstream refused the credentials ({status}): {message} (set the provider's API key)")]
    Unauthorized { status: u16, message: String },
    #[error("upstream reply is not a readable chat completion: {message}")]
    MalformedReply { message: String },
    #[error("request was not sent: {message}")]
    InvalidRequest { message: String },
    #[error("no recorded answer for trace id `{trace_id}` (the replay log has no line with it)")]
    NotRecorded { trace_id: String },
    #[error("the caller closed the stream before the reply was complete; the upstream request was dropped")]
    ClientClosed,
}

fn retry_hint(retry_after: Option<Duration>) -> String {
    retry_after.map(|d| format!(" (retry after {:.1} s)", d.as_secs_f64())).unwrap_or_default()
}

impl ProviderError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::RateLimited { .. } => ErrorClass::RateLimited,
            Self::QuotaExhausted { .. } => ErrorClass::QuotaExhausted,
            Self::ServerError { .. } => ErrorClass::ServerError,
            Self::Timeout { .. } => ErrorClass::Timeout,
            Self::Connection { .. } => ErrorClass::Connection,
            Self::BadRequest { .. } | Self::InvalidRequest { .. } | Self::NotRecorded { .. } => ErrorClass::BadRequest,
            Self::ContextLength { .. } => ErrorClass::ContextLength,
            Self::Unauthorized { .. } => ErrorClass::Unauthorized,
            Self::MalformedReply { .. } => ErrorClass::MalformedReply,
            Self::ClientClosed => ErrorClass::ClientClosed,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// How long the upstream asked us to wait before sending again, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::ServerError { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        self.class().label()
    }

    /// The same failure with `secrets` (and anything shaped like a key) masked in its message.
    #[must_use]
    pub fn scrubbed(self, secrets: &[&str]) -> Self {
        let clean = |message: String| crate::scrub(&message, secrets);
        match self {
            Self::RateLimited { retry_after, message } => Self::RateLimited { retry_after, message: clean(message) },
            Self::QuotaExhausted { message } => Self::QuotaExhausted { message: clean(message) },
            Self::ServerError { status, message, retry_after } => {
                Self::ServerError { status, message: clean(message), retry_after }
            }
            Self::Connection { message } => Self::Connection { message: clean(message) },
            Self::BadRequest { status, message } => Self::BadRequest { status, message: clean(message) },
            Self::ContextLength { message } => Self::ContextLength { message: clean(message) },
            Self::Unauthorized { status, message } => Self::Unauthorized { status, message: clean(message) },
            Self::MalformedReply { message } => Self::MalformedReply { message: clean(message) },
            Self::InvalidRequest { message } => Self::InvalidRequest { message: clean(message) },
            other @ (Self::Timeout { .. } | Self::NotRecorded { .. } | Self::ClientClosed) => other,
        }
    }

    /// The HTTP status the upstream answered with, where there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::RateLimited { .. } | Self::QuotaExhausted { .. } => Some(429),
            Self::ContextLength { .. } => Some(400),
            Self::ServerError { status, .. } | Self::BadRequest { status, .. } | Self::Unauthorized { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}
