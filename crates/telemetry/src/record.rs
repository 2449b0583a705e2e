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
        Unauthorized => "unauthorized",
        MalformedReply => "malformed_reply",
        /// The engine's own rate limits had no capacity within the deadline.
        RateLimitedLocally => "rate_limited_locally",
        CircuitOpen => "circuit_open",
        /// A Retry-After from the upstream outlasted the deadline.
        UpstreamPaused => "upstream_paused",
        ContractViolation => "contract_violation",
        DeadlineExceeded => "deadline_exceeded",
    }
}

impl ErrorClass {
    /// The call itself was wrong and was refused before any cache was asked.
    pub fn is_invalid_call(self) -> bool {
        matches!(self, Self::UnknownStep | Self::InvalidContext | Self::InvalidInput | Self::PromptTooLarge)
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(CallStatus::parse("ok"), Some(CallStatus::Ok));
        assert_eq!(Source::parse("exact_cache"), None);
        assert_eq!(serde_json::to_string(&ErrorClass::RateLimitedLocally).unwrap(), "\"rate_limited_locally\"");
    }
}
