//! What a call comes to: how it was served, and what it spent on the way.

use std::time::Duration;

use providers::{FinishReason, ToolCall, Usage};
use resilience::BreakerState;
use semantic_cache::SemanticHit;
use serde_json::Value;
use telemetry::ErrorClass;

use super::cache::CachedAnswer;
use crate::{SimilarRequest, Source};

/// A validated reply: the step's output and why the model stopped.
pub(super) struct Answer {
    pub(super) output: Value,
    pub(super) tool_calls: Vec<ToolCall>,
    pub(super) finish_reason: FinishReason,
}

/// What a call paid upstream.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spend {
    pub(super) cost_usd: f64,
    pub(super) usage: Usage,
}

impl Spend {
    pub(super) fn tokens(&self) -> u64 {
        u64::from(self.usage.input_tokens) + u64::from(self.usage.output_tokens)
    }
}

/// Everything a call consumed, kept up to date while it runs so that a failed or cut-off call
/// still reports what it spent.
#[derive(Debug, Default)]
pub(super) struct Spent {
    pub(super) attempts: u32,
    pub(super) usage: Usage,
    pub(super) cost_usd: f64,
    pub(super) model: Option<String>,
    pub(super) provider: Option<String>,
    /// Wall time spent waiting for the provider.
    pub(super) upstream_wall: Duration,
    /// Upstream time as the provider reports it (the logged latency, for a replay).
    pub(super) upstream_reported: Duration,
    /// Waiting on rate limits and Retry-After pauses.
    pub(super) rate_limit_wait: Duration,
    /// The breaker of the last provider/model asked, after the last attempt.
    pub(super) breaker_state: Option<BreakerState>,
    /// How the route chose, once it was asked.
    pub(super) route: Option<telemetry::RouteRecord>,
    /// For an audit of a semantic hit: its verdict, once the route's model answered.
    pub(super) audit: Option<semantic_cache::audit::Verdict>,
}

impl Spent {
    pub(super) fn spend(&self) -> Spend {
        Spend { cost_usd: self.cost_usd, usage: self.usage }
    }
}

/// How a successful call was served, before latency and spending are attached. Made by one
/// constructor per way of serving a call.
#[derive(Debug, Clone)]
pub(super) struct Served {
    pub(super) output: Value,
    pub(super) source: Source,
    pub(super) confidence: f64,
    pub(super) model: String,
    pub(super) provider: String,
    pub(super) saved_cost_usd: f64,
    pub(super) saved_tokens: u64,
    /// For a semantic hit or a similar-answer stand-in: the matched request.
    pub(super) similar: Option<SimilarRequest>,
    /// Why the step's model did not answer, when a fallback did.
    pub(super) degraded_by: Option<ErrorClass>,
    pub(super) finish_reason: FinishReason,
    /// The tools the model called (a chat step's answer may be only these).
    pub(super) tool_calls: Vec<ToolCall>,
    /// The answer's tokens as its model counted them when it wrote it, for an answer this call
    /// did not pay for (a cache's, a leader's); `None`: this call's own spend says them.
    pub(super) answer_usage: Option<Usage>,
}

impl Served {
    /// A model's answer: the step's own (`Source::Upstream`) or a fallback model's.
    pub(super) fn upstream(answer: Answer, source: Source, model: String, provider: String) -> Self {
        Self {
            output: answer.output,
            source,
            confidence: 1.0,
            model,
            provider,
            saved_cost_usd: 0.0,
            saved_tokens: 0,
            similar: None,
            degraded_by: None,
            finish_reason: answer.finish_reason,
            tool_calls: answer.tool_calls,
            answer_usage: None,
        }
    }

    /// An answer kept by a cache, served again: it costs nothing and saves what it once cost.
    fn cached(answer: CachedAnswer, source: Source, confidence: f64) -> Self {
        let answer_usage = Some(answer.usage.unwrap_or_default());
        Self {
            output: answer.output,
            source,
            confidence,
            model: answer.model,
            provider: answer.provider,
            saved_cost_usd: answer.cost_usd,
            saved_tokens: answer.tokens,
            similar: None,
            degraded_by: None,
            finish_reason: answer.finish_reason,
            tool_calls: answer.tool_calls,
            answer_usage,
        }
    }

    /// An identical earlier call's answer, from the exact cache.
    pub(super) fn exact_hit(answer: CachedAnswer) -> Self {
        Self::cached(answer, Source::ExactCache, 1.0)
    }

    /// The answer to an earlier request that means the same; the verifier's confidence.
    pub(super) fn semantic_hit(hit: SemanticHit<CachedAnswer>) -> Self {
        let confidence = f64::from(hit.confidence);
        Self::matched(hit, Source::SemanticCache, confidence, None)
    }

    /// No model could answer: the answer to a similar request, below the semantic cache's
    /// bar, at the configured lower confidence.
    pub(super) fn similar_stand_in(hit: SemanticHit<CachedAnswer>, confidence: f64, cause: ErrorClass) -> Self {
        Self::matched(hit, Source::FallbackSimilar, confidence, Some(cause))
    }

    fn matched(
        hit: SemanticHit<CachedAnswer>,
        source: Source,
        confidence: f64,
        degraded_by: Option<ErrorClass>,
    ) -> Self {
        let similar = SimilarRequest { text: hit.matched_text, similarity: hit.similarity };
        Self { similar: Some(similar), degraded_by, ..Self::cached(hit.value, source, confidence) }
    }

    /// No model could answer: the step's rule-based reply.
    pub(super) fn rule_stand_in(output: Value, confidence: f64, cause: ErrorClass) -> Self {
        Self {
            output,
            source: Source::FallbackRule,
            confidence,
            model: "rule".into(),
            provider: "aipipe".into(),
            saved_cost_usd: 0.0,
            saved_tokens: 0,
            similar: None,
            degraded_by: Some(cause),
            finish_reason: FinishReason::Stop,
            tool_calls: Vec::new(),
            answer_usage: Some(Usage::default()),
        }
    }

    /// The same answer, for an identical call that waited for this one: it paid nothing and
    /// saved what this one paid.
    pub(super) fn for_follower(mut self, leader: Spend) -> Self {
        if matches!(self.source, Source::Upstream | Source::FallbackModel) {
            self.source = Source::Coalesced;
            self.saved_cost_usd = leader.cost_usd;
            self.saved_tokens = leader.tokens();
            self.answer_usage = Some(leader.usage);
        }
        self
    }
}
