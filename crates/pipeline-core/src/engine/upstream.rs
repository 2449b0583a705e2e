//! The upstream stage: the route's answer held to the output contract (one repair) or to the
//! caller's strict schema, each candidate asked through the guards with retries, and what
//! every attempt cost. Which candidates, in which order, is `plan` and `route`'s.

use providers::{ChatMessage, ChatRequest, ChatResponse, ErrorClass, ProviderError, ResponseFormat, StreamSink};
use resilience::{Deadline, Outcome};
use serde_json::Value;
use telemetry::PricedTokens;
use tokio::time::Instant;
use tower::ServiceExt;

use super::served::{Answer, Spent};
use super::spans::{self, Stage, staged};
use super::{Call, Engine};
use crate::contract::OutputContract;
use crate::prompt::{ChatOptions, Sampling};
use crate::{ModelSpec, PipelineError, RouteSpec, StepSpec};

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
        let violations = match validate(ask, &reply.content) {
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
        let repaired =
            staged("contract.repair", self.ask_with_retries(ask, answered.candidate, &repair, spent)).await?;
        let output = validate(ask, &repaired.content).map_err(|violations| PipelineError::ContractViolation {
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

    /// One candidate, retried on retryable upstream failures as the retry policy allows.
    /// Guards that refuse (rate limit, breaker, pause) are not retried: they already waited as
    /// long as the call may, and another candidate is the better use of what is left.
    pub(super) async fn ask_with_retries(
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

    /// One upstream request in a span of its own, its guards' waits inside it, with the
    /// GenAI attributes of what was asked and answered.
    async fn attempt(
        &self,
        ask: &Ask<'_>,
        candidate: &ModelSpec,
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<ChatResponse, PipelineError> {
        let provider_name = self.provider_of(candidate);
        let system = self.inner.config.providers.get(provider_name).map_or_else(
            || {
                if provider_name == self.inner.config.provider.name {
                    self.inner.config.provider.kind.label()
                } else {
                    provider_name
                }
            },
            |settings| settings.kind.label(),
        );
        // A request to the model's provider: a client span, as GenAI's conventions have it.
        let mut stage = Stage::open_as("upstream.attempt", telemetry::SpanKind::Client);
        stage.annotate(|attributes| {
            attributes.extend([
                ("aipipe.attempt", (spent.attempts + 1).into()),
                ("gen_ai.system", system.to_owned().into()),
                ("gen_ai.operation.name", "chat".into()),
                ("gen_ai.request.model", candidate.upstream.clone().into()),
            ]);
        });
        let result = self.attempt_in_span(ask, candidate, messages, spent).await;
        match &result {
            Ok(reply) => stage.annotate(|attributes| {
                attributes.extend([
                    ("gen_ai.response.model", reply.model.clone().into()),
                    ("gen_ai.usage.input_tokens", reply.usage.input_tokens.into()),
                    ("gen_ai.usage.output_tokens", reply.usage.output_tokens.into()),
                    ("gen_ai.response.finish_reasons", reply.finish_reason.as_str().into()),
                ]);
            }),
            Err(err) => stage.fail(err.metric_label()),
        }
        result
    }

    /// One upstream request: admitted by the guards, sent with a timeout that ends no later
    /// than the call's deadline, and its outcome handed back to every guard.
    async fn attempt_in_span(
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
        spans::guard_waits(match &admitted {
            Ok(admission) => admission.waits(),
            Err(refused) => &refused.waits,
        });
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
        let request_timeout = inner
            .config
            .providers
            .get(provider_name)
            .map_or(inner.config.provider.request_timeout, |settings| settings.request_timeout);
        let cut_by_deadline = ask.deadline.remaining() < request_timeout;
        let timeout = request_timeout.min(ask.deadline.remaining());
        let in_flight = inner.latencies.start(&key);
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, provider.oneshot(request)).await {
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
                inner.latencies.observe(&key, reply.time_to_first_token.unwrap_or(reply.latency));
                if let Some(declared) = reply.declared_limits {
                    inner.guards.declare(&key, declared_limits(declared));
                }
                spent.upstream_reported += reply.latency;
                spent.usage = spent.usage.plus(reply.usage);
                spent.cost_usd += Self::cost_of(candidate, &reply);
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
                    inner.latencies.observe(&key, wall);
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
        let wanted = match &ask.request.response_format {
            Some(callers) => std::borrow::Cow::Borrowed(callers),
            None => ask.spec.contract.response_format_for(&ask.spec.response_format, ask.call.input),
        };
        self.capabilities(provider).format_for(&wanted)
    }

    /// What a reply cost: every kind of token at the candidate's price for it (every
    /// candidate has one: a listed model's, or the price of the entry that admitted an
    /// unlisted one).
    fn cost_of(candidate: &ModelSpec, reply: &ChatResponse) -> f64 {
        let usage = reply.usage;
        let tokens = PricedTokens {
            input: u64::from(usage.input_tokens),
            output: u64::from(usage.output_tokens),
            cached_input: u64::from(usage.cached_input_tokens),
            cache_write: u64::from(usage.cache_write_tokens),
        };
        candidate.price.cost_of(tokens)
    }
}

/// What the upstream declared, in the guards' terms.
fn declared_limits(declared: providers::DeclaredLimits) -> resilience::Declared {
    let window =
        |window: providers::LimitWindow| resilience::Window { limit: window.limit, remaining: window.remaining };
    resilience::Declared { requests: declared.requests.map(window), tokens: declared.tokens.map(window) }
}

/// No span of its own: a check takes microseconds, and one that fails shows as the
/// `contract.repair` that follows.
fn validate(ask: &Ask<'_>, reply: &str) -> Result<Value, String> {
    ask.spec.contract.check(reply, ask.call.input)
}
