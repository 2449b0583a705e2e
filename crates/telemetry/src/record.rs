use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallStatus {
    Ok,
    Error,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ok" => Some(Self::Ok),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
}

impl fmt::Display for CallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One AI call as it happened. Plain data: the engine fills it, this crate stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    /// Unix milliseconds on the engine's clock (the logged time during a replay).
    pub ts_ms: i64,
    pub step: String,
    pub component: String,
    pub workspace: String,
    pub trace_id: String,
    pub model: String,
    pub provider: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub latency_ms: f64,
    pub cost_usd: f64,
    /// What the answer originally cost, when it was served without an upstream call (a cache,
    /// an identical call in flight, a similar-answer stand-in).
    pub saved_cost_usd: f64,
    /// The tokens that answer originally took.
    pub saved_tokens: i64,
    /// `upstream`, `exact_cache`, ...: what served the call.
    pub source: String,
    pub cache_hit: bool,
    pub confidence: f64,
    /// For a semantic hit or a similar-answer stand-in: the similarity of the matched request.
    pub similarity: Option<f64>,
    pub status: CallStatus,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    /// Upstream requests made for this call (0 when a cache served it).
    pub attempts: i64,
    /// Time spent waiting on rate limits and on the upstream's Retry-After pauses.
    pub rate_limit_wait_ms: f64,
    /// The provider/model's circuit breaker after the call's last attempt (`closed`, `open`,
    /// `half_open`); `None` when no attempt was made.
    pub breaker_state: Option<String>,
}
