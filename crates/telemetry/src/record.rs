//! What a telemetry row says, in types: the words stored in the database, printed in reports
//! and used as metric labels are defined here once, and whoever fills a record maps its own
//! types into these, so that a renamed variant elsewhere cannot silently break a report.

use std::fmt;

use serde::{Serialize, Serializer};

/// Defines a closed vocabulary: each variant with the one word that stands for it in rows,
/// labels and reports, and the parse back from that word.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($(#[$variant_meta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            pub fn label(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)+
                }
            }

            /// The inverse of [`Self::label`], for reading rows back.
            pub fn parse(label: &str) -> Option<Self> {
                match label {
                    $($label => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.label())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.label())
            }
        }
    };
}

vocabulary! {
    /// An audit's verdict: whether the model's own answer was the one a semantic hit served;
    /// `unjudged` when the audit got no answer of the route's model to compare (it failed, or
    /// a fallback answered).
    Audit {
        Agree => "agree",
        Disagree => "disagree",
        Unjudged => "unjudged",
    }
}

vocabulary! {
    CallStatus {
        Ok => "ok",
        Error => "error",
    }
}

vocabulary! {
    /// What served a call; `None` for a call that ended in an error.
    Source {
        Upstream => "upstream",
        Exact => "exact",
        Semantic => "semantic",
        /// The upstream answer of an identical call that was in flight at the same time.
        Coalesced => "coalesced",
        FallbackModel => "fallback_model",
        FallbackSimilar => "fallback_similar",
        FallbackRule => "fallback_rule",
        None => "none",
    }
}

impl Source {
    pub fn is_cache(self) -> bool {
        matches!(self, Self::Exact | Self::Semantic)
    }

    /// Answered without an upstream request of its own: a cache or an identical call in flight.
    pub fn saved_a_request(self) -> bool {
        self.is_cache() || self == Self::Coalesced
    }

    /// Answered by something other than the step's own model or a copy of its answer.
    pub fn is_fallback(self) -> bool {
        matches!(self, Self::FallbackModel | Self::FallbackSimilar | Self::FallbackRule)
    }
}

vocabulary! {
    /// A provider/model's circuit breaker after a call's last attempt.
    BreakerState {
        Closed => "closed",
        HalfOpen => "half_open",
        Open => "open",
    }
}

impl BreakerState {
    /// The value of the `aipipe_breaker_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

vocabulary! {
    /// Why a call failed, or why a fallback answered it.
    ErrorClass {
        /// The call names a step the config does not declare.
        UnknownStep => "unknown_step",
        InvalidContext => "invalid_context",
        InvalidInput => "invalid_input",
        PromptTooLarge => "prompt_too_large",
        /// The call's estimated cost is over what the caller allows.
        CostLimit => "cost_limit",
        /// The upstream answered 429 for its request or token rate.
        RateLimited => "rate_limited",
        QuotaExhausted => "quota_exhausted",
        ServerError => "server_error",
        Timeout => "timeout",
        Connection => "connection",
        BadRequest => "bad_request",
        /// The prompt did not fit the context window of any model the route could take.
        ContextLength => "context_length",
        Unauthorized => "unauthorized",
        MalformedReply => "malformed_reply",
        /// The workspace's (or the step's) spend budget for the day is spent.
        BudgetExhausted => "budget_exhausted",
        /// No model on the step's route can take the call (capabilities, context window, tier,
        /// cost ceiling), whatever the upstream's health.
        NoRoute => "no_route",
        /// The engine's own rate limits had no capacity within the deadline.
        RateLimitedLocally => "rate_limited_locally",
        CircuitOpen => "circuit_open",
        /// A Retry-After from the upstream outlasted the deadline.
        UpstreamPaused => "upstream_paused",
        ContractViolation => "contract_violation",
        DeadlineExceeded => "deadline_exceeded",
        /// The gateway refused a request before the engine: no key, or one it does not know.
        Unauthenticated => "unauthenticated",
        /// The gateway refused a request before the engine: not a request it can read (bad JSON,
        /// a parameter it cannot honour, a malformed header).
        InvalidRequest => "invalid_request",
        /// The gateway refused a request before the engine: a body over its size limit.
        RequestTooLarge => "request_too_large",
        /// The caller went away (a streaming client disconnected) before the answer was
        /// complete; the upstream request was cancelled and nothing was cached.
        ClientClosed => "client_closed",
        /// The upstream failed after part of a streamed answer had reached the caller: too late
        /// for a retry or a fallback, so the caller got an error event.
        StreamInterrupted => "stream_interrupted",
    }
}

impl ErrorClass {
    /// The call itself was wrong and was refused before any cache was asked.
    pub fn is_invalid_call(self) -> bool {
        matches!(
            self,
            Self::UnknownStep
                | Self::InvalidContext
                | Self::InvalidInput
                | Self::PromptTooLarge
                | Self::Unauthenticated
                | Self::InvalidRequest
                | Self::RequestTooLarge
        )
    }

    /// The upstream could not answer now (rate limited, out of quota, failing, unreachable,
    /// too slow, or held back by a guard), rather than the request being wrong: what stand-ins
    /// answer for, and what an outage is made of.
    pub fn is_upstream_unavailable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::QuotaExhausted
                | Self::ServerError
                | Self::Timeout
                | Self::Connection
                | Self::MalformedReply
                | Self::RateLimitedLocally
                | Self::CircuitOpen
                | Self::UpstreamPaused
                | Self::DeadlineExceeded
                | Self::StreamInterrupted
        )
    }
}

vocabulary! {
    /// How a step's route picks among its candidate models.
    RouteStrategy {
        /// The first candidate, then the next on a failure that another model may not have.
        Ordered => "ordered",
        /// The cheapest candidate (estimated for this call) meeting the step's tier.
        Cheapest => "cheapest",
        /// Power of two choices over each candidate's peak-EWMA latency times its calls in flight.
        Fastest => "fastest",
        /// At random, in proportion to configured weights (deployments of one model).
        Weighted => "weighted",
    }
}

vocabulary! {
    /// Why a route left a candidate out, in the order the filters apply.
    RouteExclusion {
        /// It cannot give what the step needs (a JSON reply for a structured step).
        Capability => "capability",
        /// The prompt and the output budget do not fit its context window.
        ContextWindow => "context_window",
        BreakerOpen => "breaker_open",
        /// No capacity before the call's wait bound, or a Retry-After holds it back.
        RateLimited => "rate_limited",
        /// Its estimated cost is over the call's `max_cost_usd`.
        CostCeiling => "cost_ceiling",
        /// Its estimated cost is over what is left of the spend budget.
        Budget => "budget",
        /// Below the step's `min_tier`.
        Tier => "tier",
        /// It was tried for this call and failed in a way another model may not.
        Failed => "failed",
    }
}

/// A call's routing decision: what the route chose and what it left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RouteRecord {
    #[serde(serialize_with = "as_label", deserialize_with = "from_label")]
    pub strategy: RouteStrategy,
    /// Past the soft share of its budget, the route fell back to the cheapest candidates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downgraded: bool,
    /// The candidate that answered, or was tried last.
    pub chosen: Option<String>,
    /// Candidates left out, each with the first reason that applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<(String, RouteExclusion)>,
}

fn as_label<S: Serializer>(strategy: &RouteStrategy, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(strategy.label())
}

fn from_label<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<RouteStrategy, D::Error> {
    let label = <String as serde::Deserialize>::deserialize(deserializer)?;
    RouteStrategy::parse(&label).ok_or_else(|| serde::de::Error::custom(format!("unknown route strategy `{label}`")))
}

impl<'de> serde::Deserialize<'de> for RouteExclusion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let label = <String as serde::Deserialize>::deserialize(deserializer)?;
        Self::parse(&label).ok_or_else(|| serde::de::Error::custom(format!("unknown route exclusion `{label}`")))
    }
}

/// What one call says of the upstream's health, for recovery times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The upstream could not answer it: a failure of an upstream-unavailable class, or a
    /// stand-in answered instead.
    Down,
    /// A model answered it just then (upstream, a fallback model, or an identical call in
    /// flight).
    Up,
    /// It says nothing either way: a cache hit, or a request that was wrong.
    Unknown,
}

impl Health {
    /// A call's health from what its row says.
    pub fn of(source: Source, error_class: Option<ErrorClass>) -> Self {
        match source {
            Source::Upstream | Source::FallbackModel | Source::Coalesced => Self::Up,
            Source::FallbackSimilar | Source::FallbackRule => Self::Down,
            Source::None if error_class.is_some_and(ErrorClass::is_upstream_unavailable) => Self::Down,
            Source::Exact | Source::Semantic | Source::None => Self::Unknown,
        }
    }
}

/// Mean time to recovery, in seconds, over calls in time order (Unix milliseconds and their
/// [`Health`]): an outage starts at the first call the upstream could not answer, whatever its
/// component, and ends at the next call a model answered; `None` if no outage ended. The one
/// definition the telemetry report and the replay share (docs/benchmarks.md).
pub fn mean_recovery_secs(calls: impl IntoIterator<Item = (i64, Health)>) -> Option<f64> {
    let mut down_since = None;
    let mut recoveries = Vec::new();
    for (ts_ms, health) in calls {
        match (health, down_since) {
            (Health::Down, None) => down_since = Some(ts_ms),
            (Health::Up, Some(since)) => {
                recoveries.push((ts_ms - since) as f64 / 1000.0);
                down_since = None;
            }
            _ => {}
        }
    }
    (!recoveries.is_empty()).then(|| recoveries.iter().sum::<f64>() / recoveries.len() as f64)
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
    pub source: Source,
    pub cache_hit: bool,
    pub confidence: f64,
    /// For a semantic hit or a similar-answer stand-in: the similarity of the matched request.
    pub similarity: Option<f64>,
    pub status: CallStatus,
    /// Why the call failed, or for an answered call, why a fallback answered it.
    pub error_class: Option<ErrorClass>,
    pub error_message: Option<String>,
    /// Upstream requests made for this call (0 when a cache served it).
    pub attempts: i64,
    /// Time spent waiting on rate limits and on the upstream's Retry-After pauses.
    pub rate_limit_wait_ms: f64,
    /// The provider/model's circuit breaker after the call's last attempt; `None` when no
    /// attempt was made.
    pub breaker_state: Option<BreakerState>,
    /// How the route chose the model; `None` when no route was asked (a cache answered, the
    /// call was refused before).
    pub route: Option<RouteRecord>,
    /// The caller asked for the answer as a stream.
    pub streamed: bool,
    /// For a streamed call: from the call's start to the first piece of the answer sent.
    pub ttft_ms: Option<f64>,
    /// For an audit of a semantic hit (the model asked again after the caller had the cached
    /// answer): whether the answers agreed. Its `confidence` and `similarity` are then the
    /// audited hit's, and its cost is the audit's, never a saving.
    pub audit: Option<Audit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_lasts_from_the_first_unanswered_call_to_the_next_answer() {
        use Health::{Down, Unknown, Up};
        assert_eq!(mean_recovery_secs([(0, Up), (1_000, Unknown)]), None);
        // Down at 1 s (a second Down does not restart it; a cache hit says nothing), up at 4 s;
        // down at 10 s, up at 12 s; down at 20 s and never up again.
        let calls = [(0, Up), (1_000, Down), (2_000, Down), (3_000, Unknown), (4_000, Up), (10_000, Down)];
        let calls = calls.into_iter().chain([(12_000, Up), (20_000, Down)]);
        assert_eq!(mean_recovery_secs(calls), Some(2.5));
        assert_eq!(Health::of(Source::FallbackRule, Some(ErrorClass::ServerError)), Down);
        assert_eq!(Health::of(Source::None, Some(ErrorClass::BadRequest)), Unknown);
        assert_eq!(Health::of(Source::None, Some(ErrorClass::CircuitOpen)), Down);
        assert_eq!(Health::of(Source::Coalesced, None), Up);
    }

    #[test]
    fn every_word_parses_back() {
        for source in Source::ALL {
            assert_eq!(Source::parse(source.label()), Some(*source));
        }
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(class.label()), Some(*class));
        }
        for state in BreakerState::ALL {
            assert_eq!(BreakerState::parse(state.label()), Some(*state));
        }
        for strategy in RouteStrategy::ALL {
            assert_eq!(RouteStrategy::parse(strategy.label()), Some(*strategy));
        }
        let route = RouteRecord {
            strategy: RouteStrategy::Cheapest,
            downgraded: true,
            chosen: Some("gpt-4o-mini".into()),
            excluded: vec![("gpt-4o".into(), RouteExclusion::Budget)],
        };
        let text = serde_json::to_string(&route).unwrap();
        assert_eq!(
            text,
            r#"{"strategy":"cheapest","downgraded":true,"chosen":"gpt-4o-mini","excluded":[["gpt-4o","budget"]]}"#
        );
        assert_eq!(serde_json::from_str::<RouteRecord>(&text).unwrap(), route);
        assert_eq!(CallStatus::parse("ok"), Some(CallStatus::Ok));
        assert_eq!(Source::parse("exact_cache"), None);
        assert_eq!(serde_json::to_string(&ErrorClass::RateLimitedLocally).unwrap(), "\"rate_limited_locally\"");
    }
}
