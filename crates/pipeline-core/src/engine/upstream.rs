//! The upstream stage: the route of models, each asked through the guards with retries, the
//! output contract with one repair, and what every attempt cost.

use std::sync::PoisonError;

use providers::{ChatMessage, ChatRequest, ChatResponse, ErrorClass, ProviderError, ResponseFormat};
use resilience::{Deadline, Outcome};
use serde_json::Value;
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::Instrument;

use super::served::{Answer, Spent};
use super::{Call, Engine};
use crate::prompt::Sampling;
use crate::{PipelineError, RouteTarget, StepSpec};

/// Average characters per token of English text under OpenAI's tokenizers; used only to
/// estimate a call's cost and tokens before it is made.
pub(super) const CHARS_PER_TOKEN: usize = 4;

/// Retries of a malformed reply, whatever the retry policy allows.
const MALFORMED_RETRIES: u32 = 1;

/// A model on a named provider: the unit of rate limits, breakers and Retry-After pauses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) provider: String,
    pub(super) model: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// What every upstream attempt of one call shares.
pub(super) struct Ask<'a> {
    pub(super) spec: &'a StepSpec,
    pub(super) call: &'a Call<'a>,
    pub(super) deadline: &'a Deadline,
    pub(super) sampling: Sampling,
    /// Prompt plus the call's output budget, reserved from the token limits before sending.
    pub(super) estimated_tokens: u64,
}

impl Engine {
    /// The step's model on the primary provider, then the step's fallback models.
    pub(super) fn route(&self, spec: &StepSpec, model: &str) -> Vec<Target> {
        let primary = &self.inner.primary;
        std::iter::once(Target { provider: primary.clone(), model: model.to_owned() })
            .chain(spec.fallbacks.iter().map(|RouteTarget { provider, model }| Target {
                provider: provider.clone().unwrap_or_else(|| primary.clone()),
                model: model.clone(),
            }))
            .collect()
    }

    /// Refuses a call whose worst case (the whole prompt plus the call's full output budget)
    /// would cost more than the caller allows.
    pub(super) fn check_cost(
        &self,
        model: &str,
        prompt_chars: usize,
        max_output_tokens: u32,
        max_usd: f64,
    ) -> Result<(), PipelineError> {
        let input_tokens = prompt_chars.div_ceil(CHARS_PER_TOKEN) as u64;
        let Some(estimated_usd) = self.inner.config.prices.cost(model, input_tokens, u64::from(max_output_tokens))
        else {
            return Err(PipelineError::CostLimitExceeded {
                reason: format!(
                    "the call sets max_cost_usd but model `{model}` has no price: add [prices.\"{model}\"] to the config"
                ),
            });
        };
        if estimated_usd > max_usd {
            return Err(PipelineError::CostLimitExceeded {
                reason: format!(
                    "estimated cost ${estimated_usd:.6} (about {input_tokens} prompt tokens + {max_output_tokens} \
                     output tokens on `{model}`) exceeds the call's max_cost_usd ${max_usd:.6}"
                ),
            });
        }
        Ok(())
    }

    /// One answer from the route, and if it breaks the output contract, one repair request
    /// to the same model that shows it its reply and what is wrong with it. Returns the answer
    /// and the index in the route of the model that gave it.
    pub(super) async fn ask_and_validate(
        &self,
        ask: &Ask<'_>,
        route: &[Target],
        messages: Vec<ChatMessage>,
        spent: &mut Spent,
    ) -> Result<(Answer, usize), PipelineError> {
        let (reply, answered_by) = self.ask_route(ask, route, &messages, spent).await?;
        let violations = match validate(ask.spec, &reply.content) {
            Ok(output) => return Ok((Answer { output, finish_reason: reply.finish_reason }, answered_by)),
            Err(violations) => violations,
        };
        tracing::warn!(%violations, "reply broke the output contract; asking once for a repair");
        let mut repair = messages;
        repair.push(ChatMessage::assistant(reply.content));
        repair.push(ChatMessage::user(format!(
            "That reply does not satisfy the required JSON schema: {violations}. \
             Reply again with only a JSON object that satisfies the schema."
        )));
        let repaired = self.ask_with_retries(ask, &route[answered_by], &repair, spent).await?;
        let output = validate(ask.spec, &repaired.content).map_err(|violations| PipelineError::ContractViolation {
            step: ask.spec.step.clone(),
            attempts: spent.attempts,
            violations,
        })?;
        Ok((Answer { output, finish_reason: repaired.finish_reason }, answered_by))
    }

    /// The route's models in order, each with its retries, until one answers. A model that
    /// fails because the request is wrong ends the route: another model would not fix it.
    async fn ask_route(
        &self,
        ask: &Ask<'_>,
        route: &[Target],
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<(ChatResponse, usize), PipelineError> {
        let mut failure = None;
        for (index, target) in route.iter().enumerate() {
            if let Some(previous) = &failure {
                if ask.deadline.is_past() {
                    break;
                }
                tracing::warn!(error = %previous, next = %target, "trying the step's next model");
            }
            match self.ask_with_retries(ask, target, messages, spent).await {
                Ok(reply) => return Ok((reply, index)),
                Err(err) if err.upstream_unavailable() => failure = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(failure
            .unwrap_or(PipelineError::DeadlineExceeded { budget: ask.deadline.budget(), attempts: spent.attempts }))
    }

    /// One model, retried on retryable upstream failures as the retry policy allows. Guards
    /// that refuse (rate limit, breaker, pause) are not retried: they already waited as long
    /// as the deadline allowed, and the route or a fallback is the better use of what is left.
    async fn ask_with_retries(
        &self,
        ask: &Ask<'_>,
        target: &Target,
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<ChatResponse, PipelineError> {
        let mut retries = self.inner.retry.start();
        let mut malformed = 0;
        loop {
            let err = match self.attempt(ask, target, messages, spent).await {
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
        target: &Target,
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<ChatResponse, PipelineError> {
        let inner = &self.inner;
        let key = target.to_string();
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
        let provider = inner.providers.get(&target.provider).cloned().ok_or_else(|| PipelineError::Upstream {
            step: ask.spec.step.clone(),
            attempts: spent.attempts,
            source: ProviderError::InvalidRequest { message: format!("no provider named `{}`", target.provider) },
        })?;
        let request = ChatRequest {
            model: target.model.clone(),
            messages: messages.to_vec(),
            temperature: Some(ask.sampling.temperature),
            max_output_tokens: Some(ask.sampling.max_output_tokens),
            response_format: self.response_format(ask.spec, &target.provider),
            trace_id: ask.call.trace_id.to_string(),
        };
        spent.attempts += 1;
        spent.model = Some(target.model.clone());
        spent.provider = Some(target.provider.clone());
        let span = tracing::info_span!("upstream.attempt", attempt = spent.attempts, %key);
        let request_timeout = inner
            .config
            .providers
            .get(&target.provider)
            .map_or(inner.config.provider.request_timeout, |settings| settings.request_timeout);
        let cut_by_deadline = ask.deadline.remaining() < request_timeout;
        let timeout = request_timeout.min(ask.deadline.remaining());
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, provider.oneshot(request)).instrument(span).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout { after: timeout }),
        };
        let wall = started.elapsed();
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
                if let Some(declared) = reply.declared_limits {
                    inner.guards.declare(&key, declared_limits(declared));
                }
                spent.upstream_reported += reply.latency;
                spent.usage.input_tokens += reply.usage.input_tokens;
                spent.usage.output_tokens += reply.usage.output_tokens;
                spent.cost_usd += self.cost_of(&reply);
                spent.model = Some(reply.model.clone());
                spent.provider = Some(reply.provider.clone());
                Ok(reply)
            }
            Err(ProviderError::Timeout { .. }) if cut_by_deadline => {
                spent.upstream_reported += wall;
                Err(PipelineError::DeadlineExceeded { budget: ask.deadline.budget(), attempts: spent.attempts })
            }
            Err(source) => {
                spent.upstream_reported += wall;
                Err(PipelineError::Upstream { step: ask.spec.step.clone(), attempts: spent.attempts, source })
            }
        }
    }

    /// The step's reply shape as `provider` can be asked for it: the schema where it takes
    /// structured outputs, JSON mode where it does not. A provider the config does not
    /// describe (one handed to the builder) is taken to be like the primary one.
    fn response_format(&self, spec: &StepSpec, provider: &str) -> ResponseFormat {
        let config = &self.inner.config;
        let structured =
            config.providers.get(provider).map_or(config.provider.structured_outputs, |p| p.structured_outputs);
        match (&spec.response_format, structured) {
            (ResponseFormat::JsonSchema { .. }, false) => ResponseFormat::JsonObject,
            (format, _) => format.clone(),
        }
    }

    fn cost_of(&self, reply: &ChatResponse) -> f64 {
        let usage = reply.usage;
        let cost =
            self.inner.config.prices.cost(&reply.model, u64::from(usage.input_tokens), u64::from(usage.output_tokens));
        cost.unwrap_or_else(|| {
            let mut unpriced = self.inner.unpriced_models.lock().unwrap_or_else(PoisonError::into_inner);
            if unpriced.insert(reply.model.clone()) {
                tracing::warn!(
                    model = %reply.model,
                    "no price for this model: its calls count as free; add [prices.\"{}\"] to the config",
                    reply.model
                );
            }
            0.0
        })
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
