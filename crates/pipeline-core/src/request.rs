use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Correlates one call across the engine's spans, the upstream request (`x-request-id`) and
/// the telemetry row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TraceId(String);

impl TraceId {
    /// A fresh random id: 32 lowercase hex digits, the shape of a W3C trace id.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for TraceId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl From<&str> for TraceId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a call sits in a trace that began before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace's id as exported: the caller's W3C trace when it sent one, which a
    /// `x-aipipe-trace-id` of its own (the row's) does not replace.
    pub trace_id: telemetry::W3cTraceId,
    pub span: telemetry::ParentSpan,
    pub sampled: bool,
}

/// Who is calling, for isolation (workspace), attribution (component) and tracing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallContext {
    /// Answers are never shared between workspaces.
    pub workspace: String,
    /// The calling component, e.g. `lead-validator`; telemetry and reports group by it.
    pub component: String,
    /// A new one is made when absent.
    pub trace_id: Option<TraceId>,
    /// The span the call's span continues (the gateway's request span), and whether the
    /// trace is exported; none: the call's span starts its trace, sampled as the engine's
    /// span sink decides.
    pub trace_parent: Option<TraceParent>,
    /// Free data the prompt templates can read as `context.metadata`.
    pub metadata: BTreeMap<String, Value>,
}

impl CallContext {
    pub fn new(workspace: impl Into<String>, component: impl Into<String>) -> Self {
        Self { workspace: workspace.into(), component: component.into(), ..Self::default() }
    }

    pub fn with_trace_id(mut self, trace_id: impl Into<TraceId>) -> Self {
        self.trace_id = Some(trace_id.into());
        self
    }

    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// A call's own route: a strategy, over the step's candidates or the models named (each
/// from the registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChoice {
    pub strategy: telemetry::RouteStrategy,
    pub candidates: Option<Vec<String>>,
}

impl std::str::FromStr for RouteChoice {
    type Err = String;

    /// `STRATEGY` or `STRATEGY: MODEL, MODEL, ...`, as the gateway's `x-aipipe-route` header
    /// carries it.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (strategy, candidates) = match text.split_once(':') {
            Some((strategy, candidates)) => (strategy, Some(candidates)),
            None => (text, None),
        };
        let strategy = telemetry::RouteStrategy::parse(strategy.trim()).ok_or_else(|| {
            format!("`{}` is not a strategy: use ordered, cheapest, fastest or weighted", strategy.trim())
        })?;
        let candidates = candidates
            .map(|names| {
                let names: Vec<String> =
                    names.split(',').map(str::trim).filter(|name| !name.is_empty()).map(str::to_owned).collect();
                if names.is_empty() { Err("name at least one model after `:`".to_owned()) } else { Ok(names) }
            })
            .transpose()?;
        Ok(Self { strategy, candidates })
    }
}

/// How a call may use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// Serve a fresh cached answer if there is one; store the new answer.
    #[default]
    Use,
    /// Neither read nor write the cache.
    Skip,
    /// Ask the upstream even if an answer is cached, and store the new one.
    Refresh,
    /// Like `Use`, but only serve answers younger than this.
    MaxAge(Duration),
}

impl CachePolicy {
    /// `None` when the policy does not read the cache; otherwise the oldest answer it accepts
    /// (`None` inside: any answer still within the TTL).
    pub(crate) fn readable_age(self) -> Option<Option<Duration>> {
        match self {
            Self::Use => Some(None),
            Self::MaxAge(max_age) => Some(Some(max_age)),
            Self::Skip | Self::Refresh => None,
        }
    }

    pub(crate) fn writes(self) -> bool {
        self != Self::Skip
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallOptions {
    pub cache: CachePolicy,
    /// The whole call's time budget; the engine's default when absent.
    pub deadline: Option<Duration>,
    /// The model to ask first. Overrides the step's model when the step has no configured
    /// route; with one, the route decides, and a model among its candidates is tried first.
    pub model: Option<String>,
    /// Another route than the step's for this call (the gateway's `x-aipipe-route`).
    pub route: Option<RouteChoice>,
    /// Refuse the call if its estimated cost (prompt + the step's output budget) is higher.
    pub max_cost_usd: Option<f64>,
    /// Whether a stand-in (a similar cached answer, the step's rule-based answer) may answer
    /// when no model can; `false`: the caller gets the error instead. The step's fallback
    /// models are always allowed: theirs are real answers.
    pub allow_stand_in: bool,
    /// Where the answer goes piece by piece as the upstream writes it, for a caller that
    /// streams (the gateway's `stream: true`). Only a chat step's answer with no contract to
    /// check streams from the upstream; any other answer arrives whole, at the end, and the
    /// caller sends it as it likes. A call that streams does not wait for an identical call
    /// in flight to finish first, nor makes others wait for it.
    pub stream: Option<providers::StreamSink>,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            cache: CachePolicy::default(),
            deadline: None,
            model: None,
            route: None,
            max_cost_usd: None,
            allow_stand_in: true,
            stream: None,
        }
    }
}

#[cfg(test)]
mod route_choice_tests {
    use super::RouteChoice;
    use telemetry::RouteStrategy;

    #[test]
    fn a_route_header_reads_a_strategy_and_maybe_candidates() {
        let plain: RouteChoice = "cheapest".parse().unwrap();
        assert_eq!(plain, RouteChoice { strategy: RouteStrategy::Cheapest, candidates: None });
        let named: RouteChoice = " fastest : gpt-4o-mini, claude-haiku-4-5 ,".parse().unwrap();
        assert_eq!(named.strategy, RouteStrategy::Fastest);
        assert_eq!(named.candidates.unwrap(), ["gpt-4o-mini", "claude-haiku-4-5"]);
        assert!("random".parse::<RouteChoice>().unwrap_err().contains("not a strategy"));
        assert!("ordered:".parse::<RouteChoice>().unwrap_err().contains("at least one model"));
    }
}
