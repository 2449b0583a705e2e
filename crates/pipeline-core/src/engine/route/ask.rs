//! The route asked: decided now, and again after each failure another candidate may not
//! have, until a candidate answers or none is left.

use std::sync::PoisonError;

use providers::{ChatMessage, ChatResponse, StreamSink};
use rand::RngCore;
use telemetry::{RouteExclusion, RouteStrategy};

use super::journal::Journal;
use super::{CandidateState, Needs, RouteDecision, Snapshot};
use crate::engine::Engine;
use crate::engine::served::Spent;
use crate::engine::upstream::{Answered, Ask};
use crate::{PipelineError, RouteSpec, StepKind};

impl Engine {
    /// The route, decided now and again after each failure that another candidate may not
    /// have, until a candidate answers or none is left. The first decision, the candidates that
    /// failed and the one that answered go into the call's record.
    pub(in crate::engine) async fn ask_route<'r>(
        &self,
        ask: &Ask<'_>,
        route: &'r RouteSpec,
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<(ChatResponse, Answered<'r>), PipelineError> {
        let mut failed = vec![false; route.candidates.len()];
        let mut window_above = None;
        let mut failure: Option<PipelineError> = None;
        // Every candidate left out on the way, with the first reason that applied to it.
        let mut journal = Journal::default();
        loop {
            if failure.is_some() && ask.deadline.is_past() {
                break;
            }
            let decision = self.decide(ask, route, &failed, window_above);
            let first_decision = journal.note(&decision);
            let held = decision.held_by_guard().filter(|index| !failed[*index]);
            // With no candidate left but one a guard holds, the guard refuses it in its own words.
            let Some(index) = decision.chosen().or(if failure.is_none() { held } else { None }) else {
                spent.route = Some(journal.record(route, None));
                return Err(failure.unwrap_or_else(|| self.no_route(ask, route, &decision)));
            };
            let candidate = &route.candidates[index];
            if let Some(previous) = &failure {
                tracing::warn!(error = %previous, next = %candidate.name, "trying the route's next candidate");
            }
            spent.route = Some(journal.record(route, Some(index)));
            match self.ask_with_retries(ask, candidate, messages, spent).await {
                Ok(reply) => {
                    // An answer is the route's own when it came from the candidate the route
                    // prefers with every candidate healthy; else it is a fallback's.
                    let preferred = if route.strategy == RouteStrategy::Ordered && !decision.downgraded {
                        index == 0
                    } else {
                        first_decision && decision.chosen() == Some(index) && !journal.held_any()
                    };
                    return Ok((reply, Answered { candidate, preferred }));
                }
                Err(err) if err.falls_through() && !ask.stream.is_some_and(StreamSink::forwarded) => {
                    failed[index] = true;
                    journal.failed(index);
                    if err.class() == telemetry::ErrorClass::ContextLength {
                        let needed = ask.prompt_tokens + u64::from(ask.sampling.max_output_tokens);
                        let size = candidate.context_window.unwrap_or(u32::try_from(needed).unwrap_or(u32::MAX));
                        window_above = Some(window_above.map_or(size, |above: u32| above.max(size)));
                    }
                    spent.route = Some(journal.record(route, Some(index)));
                    failure = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(failure
            .unwrap_or(PipelineError::DeadlineExceeded { budget: ask.deadline.budget(), attempts: spent.attempts }))
    }

    /// One routing decision, on a snapshot of the candidates and the budget taken now.
    fn decide(&self, ask: &Ask<'_>, route: &RouteSpec, failed: &[bool], window_above: Option<u32>) -> RouteDecision {
        let inner = &self.inner;
        let workspace = &ask.call.context.workspace;
        let wait_bound = inner.guards.max_wait().min(ask.deadline.remaining());
        let candidates = route
            .candidates
            .iter()
            .zip(failed)
            .map(|(candidate, failed)| {
                let key = self.guard_key(candidate);
                let outlook = inner.guards.outlook(workspace, &key, ask.estimated_tokens);
                let (latency, in_flight) = inner.latencies.state(&key);
                CandidateState {
                    breaker_open: outlook.breaker_open,
                    throttled: outlook.wait > wait_bound,
                    failed: *failed,
                    latency,
                    in_flight,
                }
            })
            .collect();
        let budget = inner.budgets.view(workspace, ask.spec, ask.at);
        let snapshot = Snapshot { candidates, budget_left_usd: budget.left_usd, downgrade: budget.downgrade };
        let needs = Needs {
            strategy: route.strategy,
            candidates: &route.candidates,
            weights: &route.weights,
            min_tier: route.min_tier,
            json: ask.spec.kind == StepKind::Structured,
            prompt_tokens: ask.prompt_tokens,
            max_output_tokens: ask.sampling.max_output_tokens,
            window_above,
            max_cost_usd: ask.call.options.max_cost_usd,
        };
        let mut rng = inner.rng.lock().unwrap_or_else(PoisonError::into_inner);
        super::route(&needs, &snapshot, &mut *rng as &mut dyn RngCore)
    }

    /// Why no candidate could take the call, in the words of the filter that stopped them.
    fn no_route(&self, ask: &Ask<'_>, route: &RouteSpec, decision: &RouteDecision) -> PipelineError {
        if decision.stopped_by_budget() {
            return self.inner.budgets.exhausted(&ask.call.context.workspace, ask.spec, ask.at);
        }
        if let Some(max_usd) = ask.call.options.max_cost_usd
            && decision.excluded.iter().all(|(_, reason)| *reason == RouteExclusion::CostCeiling)
        {
            let cheapest = route
                .candidates
                .iter()
                .map(|candidate| {
                    (candidate, candidate.estimated_cost(ask.prompt_tokens, ask.sampling.max_output_tokens))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((candidate, estimated_usd)) = cheapest {
                return PipelineError::CostLimitExceeded {
                    reason: format!(
                        "estimated cost ${estimated_usd:.6} (about {} prompt tokens + {} output tokens on `{}`) \
                         exceeds the call's max_cost_usd ${max_usd:.6}",
                        ask.prompt_tokens, ask.sampling.max_output_tokens, candidate.name
                    ),
                };
            }
        }
        let excluded = decision
            .excluded
            .iter()
            .map(|(index, reason)| format!("{}: {}", route.candidates[*index].name, reason.label()))
            .collect::<Vec<_>>()
            .join(", ");
        let hint = match decision.excluded.first().map(|(_, reason)| *reason) {
            Some(RouteExclusion::ContextWindow) => window_hint(ask, route),
            Some(RouteExclusion::Capability) => "add a candidate that answers in JSON (models.NAME.json = true)".into(),
            Some(RouteExclusion::Tier) => "lower the route's min_tier or add a candidate of that tier".into(),
            _ => "add a candidate to the step's route".into(),
        };
        PipelineError::NoRoute { step: ask.spec.step.clone(), excluded, hint }
    }
}

/// What to change when no candidate's context window holds the call: the prompt, or the
/// output budget that a window must hold beside it (a caller that sets no `max_tokens` gets
/// the step's whole `max_output_tokens`).
fn window_hint(ask: &Ask<'_>, route: &RouteSpec) -> String {
    let largest = route
        .candidates
        .iter()
        .filter_map(|candidate| candidate.context_window.map(|window| (candidate, u64::from(window))))
        .max_by_key(|(_, window)| *window);
    let prompt = ask.prompt_tokens;
    let output = ask.sampling.max_output_tokens;
    match largest {
        Some((candidate, window)) if prompt < window => format!(
            "the prompt (about {prompt} tokens) fits `{}`'s context window of {window} tokens, but not with an output \
             budget of {output} tokens (the call's max_tokens, or steps.{}.max_output_tokens when it sets none): ask \
             for max_tokens of at most {}",
            candidate.name,
            ask.spec.step,
            window - prompt
        ),
        Some((candidate, window)) => format!(
            "the prompt (about {prompt} tokens) is over the largest context window, `{}`'s {window} tokens: shorten \
             the input or add a candidate with a larger context_window",
            candidate.name
        ),
        None => "shorten the input or add a candidate with a larger context_window".into(),
    }
}
