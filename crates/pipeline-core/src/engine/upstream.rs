//! The upstream stage: the call's route (which candidate models may take it, in which order,
//! decided by `route::route` and decided again after every failure another model may not
//! have), each candidate asked through the guards with retries, the output contract with one
//! repair, and what every attempt cost.

use std::borrow::Cow;
use std::sync::{Arc, PoisonError};

use providers::{
    Capabilities, ChatMessage, ChatRequest, ChatResponse, ErrorClass, ProviderError, ResponseFormat, StreamSink,
};
use rand::RngCore;
use resilience::{Deadline, Outcome};
use serde_json::Value;
use telemetry::{ModelPrice, PricedTokens, RouteExclusion, RouteRecord, RouteStrategy};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::Instrument;

use super::route::{self, CandidateState, Needs, RouteDecision, Snapshot};
use super::served::{Answer, Spent};
use super::{Call, Engine};
use crate::contract::OutputContract;
use crate::prompt::{ChatOptions, Sampling};
use crate::{ModelSpec, PipelineError, RouteSpec, StepKind, StepSpec};

/// Average characters per token of English text under OpenAI's tokenizers; used only to
/// estimate a call's cost and tokens before it is made.
pub(super) const CHARS_PER_TOKEN: usize = 4;

/// Retries of a malformed reply, whatever the retry policy allows.
const MALFORMED_RETRIES: u32 = 1;

/// What every upstream attempt of one call shares.
pub(super) struct Ask<'a> {
    pub(super) spec: &'a StepSpec,
    pub(super) call: &'a Call<'a>,
    pub(super) deadline: &'a Deadline,
    pub(super) sampling: Sampling,
    /// A chat caller's tools, reply format and other parameters.
    pub(super) request: &'a ChatOptions,
    /// Where the answer streams to, if the caller streams and the answer may go unchecked.
    pub(super) stream: Option<&'a StreamSink>,
    pub(super) prompt_tokens: u64,
    /// Prompt plus the call's output budget, reserved from the token limits before sending.
    pub(super) estimated_tokens: u64,
    pub(super) at: std::time::SystemTime,
}

/// The candidate that answered, and whether it is the one the route would take with every
/// candidate healthy (else its answer is a fallback's).
pub(super) struct Answered<'a> {
    pub(super) candidate: &'a ModelSpec,
    pub(super) preferred: bool,
}

impl Engine {
    /// The provider a candidate runs on. A model on the configured primary provider runs on
    /// the engine's primary, which may be one handed to the builder under another name.
    fn provider_of<'a>(&'a self, candidate: &'a ModelSpec) -> &'a str {
        if candidate.provider == self.inner.config.provider.name { &self.inner.primary } else { &candidate.provider }
    }

    /// The guards' key of a candidate: its provider and its model there.
    fn guard_key(&self, candidate: &ModelSpec) -> String {
        format!("{}/{}", self.provider_of(candidate), candidate.upstream)
    }

    /// The route this call takes: the step's, unless the call names a model or a route.
    ///
    /// A model the call names goes first, then the step's other candidates in order, when the
    /// step has no configured route; with one, the route decides (a gateway client naming its
    /// usual model does not override the operator's routing), and a named model that is one of
    /// its candidates is merely tried first.
    pub(super) fn plan<'s>(&self, spec: &'s StepSpec, call: &Call<'_>) -> Result<Cow<'s, RouteSpec>, PipelineError> {
        let registry = &self.inner.config.models;
        if let Some(chosen) = &call.options.route {
            let candidates = match &chosen.candidates {
                Some(names) => names
                    .iter()
                    .map(|name| {
                        registry.get(name).cloned().ok_or_else(|| PipelineError::InvalidOptions {
                            reason: format!(
                                "route candidate `{name}` is not in the model registry (known: {})",
                                registry.iter().map(|model| model.name.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => spec.route.candidates.clone(),
            };
            let names: Vec<&str> = candidates.iter().map(|candidate| candidate.name.as_str()).collect();
            let label = format!("route:{}:{}", chosen.strategy.label(), names.join(","));
            let weights = vec![1.0; candidates.len()];
            return Ok(Cow::Owned(RouteSpec {
                strategy: chosen.strategy,
                weights,
                min_tier: spec.route.min_tier,
                configured: true,
                label,
                candidates,
            }));
        }
        let Some(model) = call.options.model.as_deref().filter(|model| *model != spec.route.label) else {
            return Ok(Cow::Borrowed(&spec.route));
        };
        let route = &spec.route;
        if route.configured {
            let Some(position) = route.candidates.iter().position(|candidate| candidate.name == model) else {
                tracing::debug!(model, "the step's route decides, not the model the call named");
                return Ok(Cow::Borrowed(route));
            };
            let mut candidates = route.candidates.clone();
            let named = candidates.remove(position);
            candidates.insert(0, named);
            return Ok(Cow::Owned(RouteSpec {
                label: route.label.clone(),
                ..RouteSpec::ordered(candidates, String::new())
            }));
        }
        let named = match registry.get(model) {
            Some(spec) => spec.clone(),
            None => {
                if call.options.max_cost_usd.is_some() && self.inner.config.prices.price(model).is_none() {
                    return Err(PipelineError::CostLimitExceeded {
                        reason: format!(
                            "the call sets max_cost_usd but model `{model}` has no price: add [models.\"{model}\"] \
                             to the config"
                        ),
                    });
                }
                Arc::new(self.unregistered(model))
            }
        };
        let candidates = std::iter::once(named).chain(route.candidates.iter().skip(1).cloned()).collect();
        Ok(Cow::Owned(RouteSpec::ordered(candidates, model.to_owned())))
    }

    /// The route without the candidates whose provider cannot honour what the call asks for
    /// (tools, images, sampling controls); with none left, the parameter is named.
    pub(super) fn honouring<'s>(
        &self,
        route: Cow<'s, RouteSpec>,
        messages: &[ChatMessage],
        request: &ChatOptions,
    ) -> Result<Cow<'s, RouteSpec>, PipelineError> {
        let plain = messages.iter().all(|message| message.images.is_empty() && message.tool_calls.is_empty());
        if plain && *request == ChatOptions::default() {
            return Ok(route);
        }
        let probe = ChatRequest {
            messages: messages.to_vec(),
            tools: request.tools.clone(),
            extras: request.extras.clone(),
            ..ChatRequest::default()
        };
        let mut refused = None;
        let kept: Vec<usize> = (0..route.candidates.len())
            .filter(|&index| {
                let candidate = &route.candidates[index];
                let capabilities = self.capabilities(self.provider_of(candidate));
                let param = capabilities
                    .refuses(&probe)
                    .or_else(|| (!candidate.tools && !probe.tools.is_empty()).then_some("tools"));
                if let Some(param) = param {
                    refused.get_or_insert((param, candidate.name.clone()));
                }
                param.is_none()
            })
            .collect();
        if kept.len() == route.candidates.len() {
            return Ok(route);
        }
        let Some(&first) = kept.first() else {
            let (param, model) = refused.unwrap_or(("messages", String::new()));
            return Err(PipelineError::Unsupported {
                param: param.to_owned(),
                reason: format!(
                    "`{param}` cannot be honoured by any model this call may go to (`{model}`'s provider lacks it): \
                     leave it out, or route the step to a model whose provider has it"
                ),
            });
        };
        tracing::debug!(first = %route.candidates[first].name, "candidates that cannot honour the request left out");
        let mut honoured = route.into_owned();
        honoured.candidates = kept.iter().map(|&index| honoured.candidates[index].clone()).collect();
        honoured.weights = kept.iter().map(|&index| honoured.weights.get(index).copied().unwrap_or(1.0)).collect();
        Ok(Cow::Owned(honoured))
    }

    /// What a provider's API can be asked for; one the config does not describe (handed to
    /// the builder) is taken to be like the primary one.
    fn capabilities(&self, provider: &str) -> Capabilities {
        let config = &self.inner.config;
        config.providers.get(provider).map_or(config.provider.capabilities, |p| p.capabilities)
    }

    /// A model a call names that the registry does not know: on the primary provider, priced
    /// by the longest listed prefix of its name if any (else free, with a warning when it
    /// answers), of unknown window and the lowest tier.
    fn unregistered(&self, model: &str) -> ModelSpec {
        let config = &self.inner.config;
        ModelSpec {
            name: model.to_owned(),
            provider: config.provider.name.clone(),
            upstream: model.to_owned(),
            price: config.prices.price(model).unwrap_or(ModelPrice::new(0.0, 0.0)),
            context_window: None,
            tier: 1,
            json: true,
            tools: true,
        }
    }

    /// One answer from the route, and if it breaks the output contract, one repair request
    /// to the same model that shows it its reply and what is wrong with it.
    pub(super) async fn ask_and_validate<'r>(
        &self,
        ask: &Ask<'_>,
        route: &'r RouteSpec,
        messages: Vec<ChatMessage>,
        spent: &mut Spent,
    ) -> Result<(Answer, Answered<'r>), PipelineError> {
        let (reply, answered) = self.ask_route(ask, route, &messages, spent).await?;
        if let Some(schema) = ask.request.strict_schema() {
            return self.check_strict(ask, schema, reply, answered, spent);
        }
        let violations = match validate(ask.spec, &reply.content) {
            Ok(output) => {
                let answer = Answer { output, tool_calls: reply.tool_calls, finish_reason: reply.finish_reason };
                return Ok((answer, answered));
            }
            Err(violations) => violations,
        };
        tracing::warn!(%violations, "reply broke the output contract; asking once for a repair");
        let mut repair = messages;
        repair.push(ChatMessage::assistant(reply.content));
        repair.push(ChatMessage::user(format!(
            "That reply does not satisfy the required JSON schema: {violations}. \
             Reply again with only a JSON object that satisfies the schema."
        )));
        let repaired = self.ask_with_retries(ask, answered.candidate, &repair, spent).await?;
        let output = validate(ask.spec, &repaired.content).map_err(|violations| PipelineError::ContractViolation {
            step: ask.spec.step.clone(),
            attempts: spent.attempts,
            violations,
        })?;
        let answer = Answer { output, tool_calls: repaired.tool_calls, finish_reason: repaired.finish_reason };
        Ok((answer, answered))
    }

    /// A chat caller's strict `json_schema`: the answer must meet it (a provider without
    /// structured outputs was asked in JSON mode or by the schema alone). The answer stays the
    /// text the model wrote; a tool call answers no schema.
    fn check_strict<'r>(
        &self,
        ask: &Ask<'_>,
        schema: &Value,
        reply: ChatResponse,
        answered: Answered<'r>,
        spent: &Spent,
    ) -> Result<(Answer, Answered<'r>), PipelineError> {
        let violation = |violations: String| PipelineError::ContractViolation {
            step: ask.spec.step.clone(),
            attempts: spent.attempts,
            violations,
        };
        if reply.tool_calls.is_empty() {
            let contract = OutputContract::compile(schema)
                .map_err(|reason| PipelineError::Unsupported { param: "response_format".into(), reason })?;
            contract.check(&reply.content).map_err(violation)?;
        }
        let answer = Answer {
            output: Value::String(reply.content),
            tool_calls: reply.tool_calls,
            finish_reason: reply.finish_reason,
        };
        Ok((answer, answered))
    }

    /// The route, decided now and again after each failure that another candidate may not
    /// have, until a candidate answers or none is left. The first decision, the candidates that
    /// failed and the one that answered go into the call's record.
    async fn ask_route<'r>(
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
                let outlook = inner.guards.outlook(workspace, &self.guard_key(candidate), ask.estimated_tokens);
                let (latency, in_flight) = inner.latencies.state(&candidate.name);
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
        route::route(&needs, &snapshot, &mut *rng as &mut dyn RngCore)
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
            Some(RouteExclusion::ContextWindow) => "shorten the input or add a candidate with a larger context_window",
            Some(RouteExclusion::Capability) => "add a candidate that answers in JSON (models.NAME.json = true)",
            Some(RouteExclusion::Tier) => "lower the route's min_tier or add a candidate of that tier",
            _ => "add a candidate to the step's route",
        };
        PipelineError::NoRoute { step: ask.spec.step.clone(), excluded, hint: hint.to_owned() }
    }

    /// One candidate, retried on retryable upstream failures as the retry policy allows.
    /// Guards that refuse (rate limit, breaker, pause) are not retried: they already waited as
    /// long as the call may, and another candidate is the better use of what is left.
    async fn ask_with_retries(
        &self,
        ask: &Ask<'_>,
        candidate: &ModelSpec,
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<ChatResponse, PipelineError> {
        let mut retries = self.inner.retry.start();
        let mut malformed = 0;
        loop {
            let err = match self.attempt(ask, candidate, messages, spent).await {
                Ok(reply) => return Ok(reply),
                Err(err) => err,
            };
            let PipelineError::Upstream { source, .. } = &err else { return Err(err) };
            if !source.is_retryable() {
                return Err(err);
            }
            // A reply that is not a completion is the upstream's fault, and one that repeats is
            // likely to: once more, not as often as the policy would.
            if source.class() == ErrorClass::MalformedReply {
                malformed += 1;
                if malformed > MALFORMED_RETRIES {
                    return Err(err);
                }
            }
            match retries.next_delay(source.retry_after(), ask.deadline) {
                // Waiting out a rate limit is waiting for capacity: no longer than a caller may.
                Ok(delay) if source.class() == ErrorClass::RateLimited && delay > self.inner.guards.max_wait() => {
                    tracing::debug!(delay_ms = delay.as_millis() as u64, "the rate limit outlasts max_wait");
                    return Err(err);
                }
                Ok(delay) => {
                    tracing::info!(error = %source, delay_ms = delay.as_millis() as u64, "retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(give_up) => {
                    tracing::debug!(?give_up, "not retrying");
                    return Err(err);
                }
            }
        }
    }

    /// One upstream request: admitted by the guards, sent with a timeout that ends no later
    /// than the call's deadline, and its outcome handed back to every guard.
    async fn attempt(
        &self,
        ask: &Ask<'_>,
        candidate: &ModelSpec,
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<ChatResponse, PipelineError> {
        let inner = &self.inner;
        let key = self.guard_key(candidate);
        let provider_name = self.provider_of(candidate);
        let admitted = inner.guards.admit(&ask.call.context.workspace, &key, ask.estimated_tokens, ask.deadline).await;
        let admission = match admitted {
            Ok(admission) => admission,
            Err(refused) => {
                spent.rate_limit_wait += refused.waited;
                spent.breaker_state = refused.breaker_state.or(spent.breaker_state);
                return Err(PipelineError::Refused {
                    step: ask.spec.step.clone(),
                    attempts: spent.attempts,
                    source: refused.refusal,
                });
            }
        };
        spent.rate_limit_wait += admission.waited();
        let provider = inner.providers.get(provider_name).cloned().ok_or_else(|| PipelineError::Upstream {
            step: ask.spec.step.clone(),
            attempts: spent.attempts,
            source: ProviderError::InvalidRequest { message: format!("no provider named `{provider_name}`") },
        })?;
        let request = ChatRequest {
            model: candidate.upstream.clone(),
            messages: messages.to_vec(),
            temperature: Some(ask.sampling.temperature),
            max_output_tokens: Some(ask.sampling.max_output_tokens),
            response_format: self.response_format(ask, provider_name),
            tools: ask.request.tools.clone(),
            tool_choice: ask.request.tool_choice.clone(),
            parallel_tool_calls: ask.request.parallel_tool_calls,
            extras: ask.request.extras.clone(),
            trace_id: ask.call.trace_id.to_string(),
            stream: ask.stream.cloned(),
        };
        spent.attempts += 1;
        spent.model = Some(candidate.upstream.clone());
        spent.provider = Some(provider_name.to_owned());
        let span = tracing::info_span!("upstream.attempt", attempt = spent.attempts, %key);
        let request_timeout = inner
            .config
            .providers
            .get(provider_name)
            .map_or(inner.config.provider.request_timeout, |settings| settings.request_timeout);
        let cut_by_deadline = ask.deadline.remaining() < request_timeout;
        let timeout = request_timeout.min(ask.deadline.remaining());
        let in_flight = inner.latencies.start(&candidate.name);
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, provider.oneshot(request)).instrument(span).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout { after: timeout }),
        };
        let wall = started.elapsed();
        drop(in_flight);
        spent.upstream_wall += wall;
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(err) if err.class() == ErrorClass::RateLimited => Outcome::Throttled { retry_after: err.retry_after() },
            Err(err) if err.class().is_upstream_fault() => Outcome::Fault { retry_after: err.retry_after() },
            Err(_) => Outcome::NotCounted,
        };
        let used_tokens = match &result {
            Ok(reply) => Some(u64::from(reply.usage.input_tokens) + u64::from(reply.usage.output_tokens)),
            // A request cut off may still have been billed.
            Err(ProviderError::Timeout { .. }) => None,
            Err(_) => Some(0),
        };
        spent.breaker_state = admission.finish(outcome, used_tokens).or(spent.breaker_state);
        match result {
            Ok(reply) => {
                // As the provider reports it: logged for a replay, measured for a live one. A
                // streamed reply is as fast as its first token, which is what its caller waits
                // for.
                inner.latencies.observe(&candidate.name, reply.time_to_first_token.unwrap_or(reply.latency));
                if let Some(declared) = reply.declared_limits {
                    inner.guards.declare(&key, declared_limits(declared));
                }
                spent.upstream_reported += reply.latency;
                spent.usage = spent.usage.plus(reply.usage);
                spent.cost_usd += self.cost_of(candidate, &reply);
                spent.model = Some(reply.model.clone());
                spent.provider = Some(reply.provider.clone());
                Ok(reply)
            }
            Err(ProviderError::Timeout { .. }) if cut_by_deadline => {
                spent.upstream_reported += wall;
                Err(PipelineError::DeadlineExceeded { budget: ask.deadline.budget(), attempts: spent.attempts })
            }
            Err(source) => {
                if source.class() == ErrorClass::Timeout {
                    // A candidate that times out is slow, as far as `fastest` can tell.
                    inner.latencies.observe(&candidate.name, wall);
                }
                spent.upstream_reported += wall;
                // Part of the answer is with the caller: another attempt's answer would not
                // continue it.
                if source.class() != ErrorClass::ClientClosed && ask.stream.is_some_and(StreamSink::forwarded) {
                    return Err(PipelineError::StreamInterrupted {
                        step: ask.spec.step.clone(),
                        attempts: spent.attempts,
                        source,
                    });
                }
                Err(PipelineError::Upstream { step: ask.spec.step.clone(), attempts: spent.attempts, source })
            }
        }
    }

    /// The reply shape (the caller's, else the step's) as `provider` can be asked for it (see
    /// [`providers::Capabilities::format_for`]).
    fn response_format(&self, ask: &Ask<'_>, provider: &str) -> ResponseFormat {
        let wanted = ask.request.response_format.as_ref().unwrap_or(&ask.spec.response_format);
        self.capabilities(provider).format_for(wanted)
    }

    /// What a reply cost: every kind of token at the candidate's price for it. A model the
    /// registry does not know, with no listed price, counts as free, with one warning.
    fn cost_of(&self, candidate: &ModelSpec, reply: &ChatResponse) -> f64 {
        let usage = reply.usage;
        let tokens = PricedTokens {
            input: u64::from(usage.input_tokens),
            output: u64::from(usage.output_tokens),
            cached_input: u64::from(usage.cached_input_tokens),
            cache_write: u64::from(usage.cache_write_tokens),
        };
        let config = &self.inner.config;
        let price = match config.models.get(&candidate.name) {
            Some(_) => Some(candidate.price),
            None => config.prices.price(&reply.model).or_else(|| config.prices.price(&candidate.upstream)),
        };
        match price {
            Some(price) => price.cost_of(tokens),
            None => {
                let mut unpriced = self.inner.unpriced_models.lock().unwrap_or_else(PoisonError::into_inner);
                if unpriced.insert(reply.model.clone()) {
                    tracing::warn!(
                        model = %reply.model,
                        "no price for this model: its calls count as free; add [models.\"{}\"] to the config",
                        reply.model
                    );
                }
                0.0
            }
        }
    }
}

/// A call's routing decisions so far, for its record: the strategy and downgrade of the first,
/// and every candidate any of them left out, with the first reason (a failure overrides).
#[derive(Debug, Default)]
struct Journal {
    strategy: Option<(RouteStrategy, bool)>,
    excluded: Vec<(usize, RouteExclusion)>,
}

impl Journal {
    /// Notes a decision; whether it is the first.
    fn note(&mut self, decision: &RouteDecision) -> bool {
        let first = self.strategy.is_none();
        self.strategy.get_or_insert((decision.strategy, decision.downgraded));
        for (index, reason) in &decision.excluded {
            if !self.excluded.iter().any(|(noted, _)| noted == index) {
                self.excluded.push((*index, *reason));
            }
        }
        first
    }

    fn failed(&mut self, index: usize) {
        self.excluded.retain(|(noted, _)| *noted != index);
        self.excluded.push((index, RouteExclusion::Failed));
    }

    /// Whether a guard (a breaker, a rate limit) kept any candidate out.
    fn held_any(&self) -> bool {
        self.excluded
            .iter()
            .any(|(_, reason)| matches!(reason, RouteExclusion::BreakerOpen | RouteExclusion::RateLimited))
    }

    fn record(&self, route: &RouteSpec, chosen: Option<usize>) -> RouteRecord {
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

/// What the upstream declared, in the guards' terms.
fn declared_limits(declared: providers::DeclaredLimits) -> resilience::Declared {
    let window =
        |window: providers::LimitWindow| resilience::Window { limit: window.limit, remaining: window.remaining };
    resilience::Declared { requests: declared.requests.map(window), tokens: declared.tokens.map(window) }
}

fn validate(spec: &StepSpec, reply: &str) -> Result<Value, String> {
    let _span = tracing::info_span!("validate").entered();
    spec.contract.check(reply)
}
