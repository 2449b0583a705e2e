//! Routing: which of a step's candidate models a call goes to. [`route`] is one pure function
//! of the call's needs and a snapshot of each candidate's state (breaker, capacity, latency,
//! calls in flight, the budget left); the engine takes the snapshot, asks it, and asks again
//! after each failure that another candidate may not have, so that every fallback target
//! passes the same filters (a free primary with a paid fallback does not slip past a budget).
//!
//! Filters apply first, in a fixed order, and the first that leaves a candidate out is its
//! reason: capability, context window, breaker open, rate limit, cost ceiling, budget, tier.
//! The strategy then orders what is left: the first is the choice, the rest are what the call
//! falls through to.
//!
//! Public as `pipeline_core::routing` so that the decision can be measured alone
//! (`cargo xtask bench engine`) and reasoned about without an engine. The engine's side (the
//! snapshot taken, the route asked candidate by candidate, the decisions journaled for the
//! record) is in `ask.rs` and `journal.rs`, private to the crate.

mod ask;
mod journal;
mod latency;

use std::sync::Arc;

use rand::{Rng, RngCore};
use telemetry::{RouteExclusion, RouteStrategy};

pub(crate) use self::latency::Latencies;
use crate::ModelSpec;

/// What a call needs of a model.
#[derive(Debug, Clone, Copy)]
pub struct Needs<'a> {
    pub strategy: RouteStrategy,
    pub candidates: &'a [Arc<ModelSpec>],
    /// Parallel to `candidates`.
    pub weights: &'a [f64],
    pub min_tier: Option<u8>,
    /// A structured step: the model must answer in JSON.
    pub json: bool,
    pub prompt_tokens: u64,
    pub max_output_tokens: u32,
    /// After a context-length error on a window of this size: only larger ones may try.
    pub window_above: Option<u32>,
    pub max_cost_usd: Option<f64>,
}

/// The state of each candidate (parallel to the candidates) and of the budget, when the call
/// is routed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub candidates: Vec<CandidateState>,
    /// What is left of the tightest budget the call counts against; `None`: no budget.
    pub budget_left_usd: Option<f64>,
    /// Past a budget's soft share, under `on_budget = "downgrade"`.
    pub downgrade: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CandidateState {
    pub breaker_open: bool,
    /// No capacity within the call's wait bound, or a Retry-After holds it back.
    pub throttled: bool,
    /// Tried for this call, and failed in a way another candidate may not.
    pub failed: bool,
    /// Peak-EWMA latency in seconds; `None`: never measured.
    pub latency: Option<f64>,
    pub in_flight: u32,
}

/// What the route chose, as indexes into the candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    pub strategy: RouteStrategy,
    pub downgraded: bool,
    /// Candidates that passed every filter, best first.
    pub order: Vec<usize>,
    /// Every other candidate, with the first reason that applied.
    pub excluded: Vec<(usize, RouteExclusion)>,
}

impl RouteDecision {
    pub fn chosen(&self) -> Option<usize> {
        self.order.first().copied()
    }

    /// The first candidate left out only by a guard (its breaker, its rate limit). When no
    /// candidate is left, the call still goes to the guards of this one, which refuse it in
    /// their own words: when it may retry (`Retry-After`), or a stand-in's cue.
    pub fn held_by_guard(&self) -> Option<usize> {
        self.excluded
            .iter()
            .find(|(_, reason)| matches!(reason, RouteExclusion::BreakerOpen | RouteExclusion::RateLimited))
            .map(|(index, _)| *index)
    }

    /// Whether only the budget left every candidate out that nothing else did.
    pub fn stopped_by_budget(&self) -> bool {
        self.order.is_empty() && self.excluded.iter().any(|(_, reason)| *reason == RouteExclusion::Budget)
    }
}

/// Which candidates may take the call, and in what order. Pure: the same needs, snapshot and
/// random numbers give the same decision.
pub fn route(needs: &Needs<'_>, snapshot: &Snapshot, rng: &mut dyn RngCore) -> RouteDecision {
    let downgraded = snapshot.downgrade;
    let mut excluded = Vec::new();
    let mut eligible = Vec::with_capacity(needs.candidates.len());
    for (index, candidate) in needs.candidates.iter().enumerate() {
        let state = snapshot.candidates.get(index).copied().unwrap_or_default();
        match exclusion(needs, snapshot, candidate, state, downgraded) {
            Some(reason) => excluded.push((index, reason)),
            None => eligible.push(index),
        }
    }
    // Past a budget's soft share, the cheapest candidates go first, whatever the strategy.
    let strategy = if downgraded { RouteStrategy::Cheapest } else { needs.strategy };
    let order = match strategy {
        RouteStrategy::Ordered => eligible,
        RouteStrategy::Cheapest => {
            let cost =
                |index: usize| needs.candidates[index].estimated_cost(needs.prompt_tokens, needs.max_output_tokens);
            let mut order = eligible;
            order.sort_by(|a, b| cost(*a).total_cmp(&cost(*b)));
            order
        }
        RouteStrategy::Fastest => fastest(eligible, snapshot, rng),
        RouteStrategy::Weighted => weighted(eligible, needs.weights, rng),
    };
    RouteDecision { strategy: needs.strategy, downgraded, order, excluded }
}

/// The first filter that leaves `candidate` out, in the documented order.
fn exclusion(
    needs: &Needs<'_>,
    snapshot: &Snapshot,
    candidate: &ModelSpec,
    state: CandidateState,
    downgraded: bool,
) -> Option<RouteExclusion> {
    let estimated_usd = candidate.estimated_cost(needs.prompt_tokens, needs.max_output_tokens);
    let needed_window = needs.prompt_tokens + u64::from(needs.max_output_tokens);
    let window_too_small = match (candidate.context_window, needs.window_above) {
        // After a context-length error, only a window known to be larger may try.
        (Some(window), Some(above)) => window <= above,
        (None, Some(_)) => true,
        (Some(window), None) => needed_window > u64::from(window),
        (None, None) => false,
    };
    if state.failed {
        Some(RouteExclusion::Failed)
    } else if needs.json && !candidate.json {
        Some(RouteExclusion::Capability)
    } else if window_too_small {
        Some(RouteExclusion::ContextWindow)
    } else if state.breaker_open {
        Some(RouteExclusion::BreakerOpen)
    } else if state.throttled {
        Some(RouteExclusion::RateLimited)
    } else if needs.max_cost_usd.is_some_and(|max| estimated_usd > max) {
        Some(RouteExclusion::CostCeiling)
    } else if snapshot.budget_left_usd.is_some_and(|left| estimated_usd > 0.0 && estimated_usd > left) {
        Some(RouteExclusion::Budget)
    } else if !downgraded && needs.min_tier.is_some_and(|min| candidate.tier < min) {
        Some(RouteExclusion::Tier)
    } else {
        None
    }
}

/// A candidate's load: its latency times its calls in flight (plus the one to come). One never
/// measured costs nothing, so that every candidate is measured once.
fn load(state: &CandidateState) -> f64 {
    state.latency.unwrap_or(0.0) * f64::from(state.in_flight + 1)
}

/// Power of two choices: two candidates at random, the lighter first; the rest by load.
fn fastest(mut eligible: Vec<usize>, snapshot: &Snapshot, rng: &mut dyn RngCore) -> Vec<usize> {
    let load_of = |index: usize| snapshot.candidates.get(index).map_or(0.0, load);
    if eligible.len() > 2 {
        let first = rng.random_range(0..eligible.len());
        let mut second = rng.random_range(0..eligible.len() - 1);
        if second >= first {
            second += 1;
        }
        let pick = if load_of(eligible[second]) < load_of(eligible[first]) { second } else { first };
        let chosen = eligible.remove(pick);
        eligible.sort_by(|a, b| load_of(*a).total_cmp(&load_of(*b)));
        eligible.insert(0, chosen);
        eligible
    } else {
        // Two or fewer: both are the pair. Ties go to either at random.
        if eligible.len() == 2 && load_of(eligible[0]) == load_of(eligible[1]) && rng.random::<bool>() {
            eligible.swap(0, 1);
        }
        eligible.sort_by(|a, b| load_of(*a).total_cmp(&load_of(*b)));
        eligible
    }
}

/// One candidate at random in proportion to its weight, then the rest by weight.
fn weighted(mut eligible: Vec<usize>, weights: &[f64], rng: &mut dyn RngCore) -> Vec<usize> {
    let weight = |index: usize| weights.get(index).copied().unwrap_or(1.0);
    let total: f64 = eligible.iter().map(|index| weight(*index)).sum();
    if eligible.is_empty() || total <= 0.0 {
        return eligible;
    }
    let mut point = rng.random::<f64>() * total;
    let mut pick = eligible.len() - 1;
    for (position, index) in eligible.iter().enumerate() {
        point -= weight(*index);
        if point < 0.0 {
            pick = position;
            break;
        }
    }
    let chosen = eligible.remove(pick);
    eligible.sort_by(|a, b| weight(*b).total_cmp(&weight(*a)));
    eligible.insert(0, chosen);
    eligible
}

#[cfg(test)]
mod tests;
