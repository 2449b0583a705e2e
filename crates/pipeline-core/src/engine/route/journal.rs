//! A call's routing decisions, for its record.

use telemetry::{RouteExclusion, RouteRecord, RouteStrategy};

use super::RouteDecision;
use crate::RouteSpec;

/// A call's routing decisions so far, for its record: the strategy and downgrade of the first,
/// and every candidate any of them left out, with the first reason (a failure overrides).
#[derive(Debug, Default)]
pub(super) struct Journal {
    strategy: Option<(RouteStrategy, bool)>,
    excluded: Vec<(usize, RouteExclusion)>,
}

impl Journal {
    /// Notes a decision; whether it is the first.
    pub(super) fn note(&mut self, decision: &RouteDecision) -> bool {
        let first = self.strategy.is_none();
        self.strategy.get_or_insert((decision.strategy, decision.downgraded));
        for (index, reason) in &decision.excluded {
            if !self.excluded.iter().any(|(noted, _)| noted == index) {
                self.excluded.push((*index, *reason));
            }
        }
        first
    }

    pub(super) fn failed(&mut self, index: usize) {
        self.excluded.retain(|(noted, _)| *noted != index);
        self.excluded.push((index, RouteExclusion::Failed));
    }

    /// Whether a guard (a breaker, a rate limit) kept any candidate out.
    pub(super) fn held_any(&self) -> bool {
        self.excluded
            .iter()
            .any(|(_, reason)| matches!(reason, RouteExclusion::BreakerOpen | RouteExclusion::RateLimited))
    }

    pub(super) fn record(&self, route: &RouteSpec, chosen: Option<usize>) -> RouteRecord {
        let (strategy, downgraded) = self.strategy.unwrap_or((route.strategy, false));
        let name = |index: usize| route.candidates[index].name.clone();
        RouteRecord {
            strategy,
            downgraded,
            chosen: chosen.map(name),
            excluded: self
                .excluded
                .iter()
                .filter(|(index, _)| Some(*index) != chosen)
                .map(|(index, reason)| (name(*index), *reason))
                .collect(),
        }
    }
}
