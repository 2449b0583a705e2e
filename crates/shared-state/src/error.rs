use std::time::Duration;

/// A shared part could not be used. Every caller fails open on it: a cache reads it as a miss,
/// a limiter falls back to its own share of the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedError {
    #[error("state.{key}: `{url}` is not a Redis URL ({reason}); write redis://host:port/db or rediss://...")]
    BadUrl { key: &'static str, url: String, reason: String },
    #[error("{part} did not answer within {} ms", timeout.as_millis())]
    Timeout { part: &'static str, timeout: Duration },
    #[error("{part} is marked down after a failure; the next try is in {} ms", retry_in.as_millis())]
    Down { part: &'static str, retry_in: Duration },
    #[error("{part}: {reason}")]
    Redis { part: &'static str, reason: String },
    #[error("{part} sent a reply this version cannot read: {reason}")]
    Reply { part: &'static str, reason: String },
}

impl SharedError {
    /// Whether the same call could work later (everything but a bad URL).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::BadUrl { .. })
    }

    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadUrl { .. } => "bad_url",
            Self::Timeout { .. } => "timeout",
            Self::Down { .. } => "down",
            Self::Redis { .. } => "redis_error",
            Self::Reply { .. } => "bad_reply",
        }
    }
}
