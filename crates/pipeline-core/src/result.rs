use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use providers::{FinishReason, ToolCall, Usage};
use telemetry::ErrorClass;

use crate::TraceId;

/// What served a call; a fallback never poses as an upstream answer. Its word (in rows,
/// metrics, the gateway's `x-aipipe-source` and JSON) is telemetry's [`telemetry::Source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    Upstream,
    ExactCache,
    /// The answer to an earlier request that means the same; `confidence` is the verifier's.
    SemanticCache,
    /// The upstream answer of an identical call that was in flight at the same time.
    Coalesced,
    /// An upstream answer from one of the step's fallback models, the step's own model having
    /// failed.
    FallbackModel,
    /// No model could answer: a cached answer to a similar request, below the semantic
    /// cache's bar, at the configured lower confidence.
    FallbackSimilar,
    /// No model could answer: the step's rule-based reply, at a low confidence.
    FallbackRule,
}

impl Source {
    pub fn label(self) -> &'static str {
        telemetry::Source::from(self).label()
    }

    /// Whether the answer stands in for the one the step's model would have given.
    pub fn is_fallback(self) -> bool {
        telemetry::Source::from(self).is_fallback()
    }

    pub fn is_cache(self) -> bool {
        telemetry::Source::from(self).is_cache()
    }
}

impl From<Source> for telemetry::Source {
    fn from(source: Source) -> Self {
        match source {
            Source::Upstream => Self::Upstream,
            Source::ExactCache => Self::Exact,
            Source::SemanticCache => Self::Semantic,
            Source::Coalesced => Self::Coalesced,
            Source::FallbackModel => Self::FallbackModel,
            Source::FallbackSimilar => Self::FallbackSimilar,
            Source::FallbackRule => Self::FallbackRule,
        }
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        telemetry::Source::from(*self).serialize(serializer)
    }
}

/// The answer to one call, with how it was made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineResult {
    /// The reply, parsed and valid against the step's output contract.
    pub output: Value,
    pub source: Source,
    /// 1.0 for an upstream answer or an exact cache hit; the learned verifier's probability
    /// for a semantic hit; the configured confidence for a similar-answer or rule-based
    /// fallback.
    pub confidence: f64,
    pub model: String,
    pub provider: String,
    /// Tokens spent by this call (zero when a cache served it), repair attempt included.
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// The answer's tokens as its model counted them when it wrote it: this call's own for an
    /// upstream answer, the first call's for one served from a cache or an identical call in
    /// flight (which spend none), none for a rule-based stand-in. What an OpenAI client reads
    /// as `usage`: the size of the answer and of the prompt it answered, whatever paid for it.
    pub answer_usage: Usage,
    pub cost_usd: f64,
    /// What the served answer cost when it was first made, if a cache served it.
    pub saved_cost_usd: f64,
    #[serde(serialize_with = "as_millis")]
    pub latency: Duration,
    pub trace_id: TraceId,
    /// Upstream requests made (0 for a cache hit; retries, fallback models and a repair count).
    pub attempts: u32,
    /// Time spent waiting on rate limits and Retry-After pauses.
    #[serde(serialize_with = "as_millis")]
    pub rate_limit_wait: Duration,
    /// Why the step's model did not answer, when a fallback did.
    pub degraded_by: Option<ErrorClass>,
    /// For a semantic hit or a similar-answer fallback: the earlier request whose answer was
    /// served, so that a person can judge the match.
    pub similar_to: Option<SimilarRequest>,
    /// Why the model stopped writing this answer (`Stop` for a stand-in).
    pub finish_reason: FinishReason,
    /// How the route chose the model: the strategy, the candidate chosen, and every candidate
    /// left out with its reason. `None` when no route was asked (a cache answered).
    pub route: Option<telemetry::RouteRecord>,
    /// The tools the model called, for a chat step whose caller offered tools.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a call the caller streamed: from the call's start to the first piece of the answer
    /// forwarded (`None` when nothing was forwarded: the whole answer came at once).
    #[serde(serialize_with = "as_optional_millis")]
    pub time_to_first_token: Option<Duration>,
}

/// The earlier request whose answer a semantic hit or a similar-answer fallback served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimilarRequest {
    /// Its text, as compared (the step's semantic field).
    pub text: String,
    pub similarity: f32,
}

fn as_millis<S: serde::Serializer>(latency: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(latency.as_secs_f64() * 1000.0)
}

fn as_optional_millis<S: serde::Serializer>(latency: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
    match latency {
        Some(latency) => as_millis(latency, serializer),
        None => serializer.serialize_none(),
    }
}
