//! The engine. Every call goes through [`Engine::execute`]; its stages run in one fixed order,
//! numbered in `Engine::run` and `Engine::answer` below, and each stage lives in its own
//! module:
//!
//! - `cache`: the exact and semantic caches, looked up before the upstream and filled after;
//! - `audit`: semantic hits checked against the model, which sets each step's cut;
//! - `coalesce`: identical calls in flight share one upstream request;
//! - `plan`: the route a call takes, without the candidates that cannot honour it;
//! - `route`: which candidate model a call goes to (one pure function) and each candidate's
//!   latency;
//! - `budget`: spend per workspace and step per day, against the budgets;
//! - `upstream`: the route asked, each candidate through the guards with retries, and the
//!   output contract with one repair;
//! - `stand_in`: the answers that stand in when no model could give one;
//! - `record`: the one telemetry record of every call;
//! - `spans`: the spans of a call and its stages, when traces are exported;
//! - `shared`: what the replicas share through Redis (the exact cache, the semantic feed);
//! - `served`: what a call comes to, and what it spent;
//! - `builder`: putting an engine together; `state`: what an engine shows of itself, and its
//!   shutdown;
//! - `embed`: the semantic cache's embedding model, offered on its own.

mod audit;
mod budget;
mod builder;
mod cache;
mod coalesce;
mod embed;
mod plan;
mod record;
pub mod route;
mod served;
mod shared;
mod spans;
mod stand_in;
mod state;
mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub use audit::AuditMode;
pub use builder::EngineBuilder;
pub use embed::Embeddings;
use providers::{ChatMessage, ProviderService};
use resilience::{Deadline, Guards, RetryPolicy};
use semantic_cache::{CacheKey, ExactCache, Lookup, SemanticCache};
use serde_json::Value;
use telemetry::{Recorder, SpanSink};
use tokio::time::Instant;
use tracing::Instrument;

use self::audit::AuditOf;
use self::budget::Budgets;
use self::cache::{CachedAnswer, cache_key};
use self::coalesce::{Flights, Followed, Turn, follow};
use self::route::Latencies;
use self::served::{Served, Spent};
use self::upstream::{Ask, CHARS_PER_TOKEN};
use crate::prompt::{ChatOptions, Rendered, Sampling};
use crate::{
    CallContext, CallOptions, Clock, Config, PipelineError, PipelineResult, RouteSpec, Source, StepKind, StepSpec,
    StepType, TraceId,
};

/// The engine. Cheap to clone; clones share the caches, the providers, the guards and the
/// telemetry writer.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    /// Every provider by name; `primary` answers unless a step's fallbacks name another.
    providers: HashMap<String, ProviderService>,
    primary: String,
    cache: Option<ExactCache<CachedAnswer>>,
    semantic: Option<Arc<SemanticCache<CachedAnswer>>>,
    /// Redis, when several replicas share their caches and limits.
    shared: Option<shared::Shared>,
    guards: Guards,
    retry: RetryPolicy,
    flights: Arc<Flights>,
    recorder: Recorder,
    clock: Arc<dyn Clock>,
    latencies: Latencies,
    budgets: Budgets,
    /// The random choices of routes, seeded so that tests and replays repeat them.
    rng: Mutex<rand::rngs::StdRng>,
    /// Where calls' spans go, when traces are exported.
    spans: Option<Arc<dyn SpanSink>>,
    /// Each step's semantic cut, as its audits set it.
    cuts: semantic_cache::audit::Cuts,
    /// Paid audits running now, at most `semantic.max_audits_in_flight`.
    audits_in_flight: Arc<tokio::sync::Semaphore>,
    audit_mode: AuditMode,
}

/// One call, as the stages see it.
struct Call<'a> {
    step: &'a StepType,
    input: &'a Value,
    context: &'a CallContext,
    options: &'a CallOptions,
    trace_id: &'a TraceId,
    /// For the engine's own audit of a semantic hit: the hit.
    audit: Option<&'a AuditOf>,
}

/// A call's rendered prompt and its exact-cache key.
struct Prompt {
    messages: Vec<ChatMessage>,
    sampling: Sampling,
    request: ChatOptions,
    chars: usize,
    key: CacheKey,
}

impl Engine {
    pub fn builder(config: Config) -> EngineBuilder {
        EngineBuilder::new(config)
    }

    /// Runs one AI call through the whole path. Whatever happens, the call leaves exactly one
    /// telemetry record.
    pub async fn execute(
        &self,
        step: StepType,
        input: Value,
        context: CallContext,
        options: CallOptions,
    ) -> Result<PipelineResult, PipelineError> {
        self.execute_call(step, input, context, options, None).await
    }

    /// A caller's call, or the engine's own audit of a semantic hit.
    async fn execute_call(
        &self,
        step: StepType,
        input: Value,
        context: CallContext,
        options: CallOptions,
        audit: Option<AuditOf>,
    ) -> Result<PipelineResult, PipelineError> {
        let trace_id = context.trace_id.clone().unwrap_or_else(TraceId::random);
        // The log's context for whatever the call logs; the exported trace is `spans`'.
        let span = tracing::info_span!(
            "aipipe.call",
            "aipipe.step" = %step,
            "aipipe.workspace" = %context.workspace,
            "aipipe.component" = %context.component,
            "aipipe.trace_id" = %trace_id,
        );
        let recording = self
            .inner
            .spans
            .as_deref()
            .and_then(|sink| spans::Recording::start(sink, trace_id.as_str(), context.trace_parent));
        let call = Call {
            step: &step,
            input: &input,
            context: &context,
            options: &options,
            trace_id: &trace_id,
            audit: audit.as_ref(),
        };
        let running = async {
            let started = Instant::now();
            let at = self.inner.clock.now();
            let mut spent = Spent::default();
            let outcome = self.run(&call, at, &mut spent).await;
            self.inner.budgets.charge(&call.context.workspace, call.step, at, spent.cost_usd);
            // Upstream time counts as the provider reports it: measured for a live provider,
            // as logged for a replayed one that answers at once.
            let latency = started.elapsed().saturating_sub(spent.upstream_wall) + spent.upstream_reported;
            // A streamed call's first token: when the first piece went out, or, for an answer
            // that came whole (a cache, a stand-in, a checked contract), at its end.
            let time_to_first_token = call.options.stream.as_ref().map(|sink| {
                sink.first_sent_at().map_or(latency, |first| first.saturating_duration_since(started.into_std()))
            });
            self.record(&call, at, latency, time_to_first_token, &spent, &outcome);
            outcome.map(|served| PipelineResult {
                output: served.output,
                source: served.source,
                confidence: served.confidence,
                model: served.model,
                provider: served.provider,
                input_tokens: spent.usage.input_tokens,
                output_tokens: spent.usage.output_tokens,
                answer_usage: served.answer_usage.unwrap_or(spent.usage),
                cost_usd: spent.cost_usd,
                saved_cost_usd: served.saved_cost_usd,
                latency,
                trace_id: trace_id.clone(),
                attempts: spent.attempts,
                rate_limit_wait: spent.rate_limit_wait,
                degraded_by: served.degraded_by,
                similar_to: served.similar,
                finish_reason: served.finish_reason,
                route: spent.route.clone(),
                tool_calls: served.tool_calls,
                time_to_first_token: call
                    .options
                    .stream
                    .as_ref()
                    .filter(|sink| sink.forwarded())
                    .and(time_to_first_token),
            })
        }
        .instrument(span);
        spans::Recording::scope(recording, running).await
    }

    /// The stages of a call, in their fixed order; the rest of them in `Engine::answer`.
    async fn run(&self, call: &Call<'_>, at: SystemTime, spent: &mut Spent) -> Result<Served, PipelineError> {
        // 1. The call's step, workspace, deadline and model.
        let config = &self.inner.config;
        let spec = config.step(call.step).ok_or_else(|| PipelineError::UnknownStep {
            step: call.step.to_string(),
            known: config.steps().map(|spec| spec.step.as_str()).collect::<Vec<_>>().join(", "),
        })?;
        if call.context.workspace.trim().is_empty() {
            return Err(PipelineError::InvalidContext {
                reason: "the workspace is empty: every call names its workspace, answers are isolated per workspace"
                    .into(),
            });
        }
        let deadline = Deadline::after(call.options.deadline.unwrap_or(config.engine.default_deadline));
        let route = self.plan(spec, call)?;
        spent.model = Some(route.candidates[0].upstream.clone());
        spans::annotate_call(|attributes| {
            attributes.push(("gen_ai.request.model", route.candidates[0].upstream.clone().into()));
        });

        // 2. The prompt, from the step's templates (or the caller's messages).
        let Rendered { messages, sampling, request } = config.prompts.render(spec, call.input, call.context)?;
        let chars: usize = messages.iter().map(|message| message.content.chars().count()).sum();
        if chars > spec.max_prompt_chars {
            return Err(PipelineError::PromptTooLarge { step: spec.step.clone(), chars, limit: spec.max_prompt_chars });
        }
        let route = self.honouring(route, &messages, &request)?;
        let key = cache_key(spec, &route.label, call.context, &messages, sampling, &request);
        let prompt = Prompt { messages, sampling, request, chars, key };

        // 3. The exact cache: this replica's, then the one the replicas share.
        if let Some(hit) = self.exact_lookup(&prompt.key, call.options.cache, at).await {
            return Ok(hit);
        }

        // 4. An identical call already on its way upstream answers this one too.
        let leader = loop {
            match self.inner.flights.take_turn(prompt.key, call.options) {
                Turn::Follow(receiver) => match follow(receiver, &deadline).await {
                    Followed::Outcome(outcome) => return outcome,
                    Followed::Again => {}
                },
                Turn::Lead(leader) => break Some(leader),
                Turn::Alone => break None,
            }
        };
        let outcome = self.answer(spec, &route, call, prompt, &deadline, at, spent).await;
        if let Some(leader) = leader {
            leader.publish(&outcome, spent.spend());
        }
        outcome
    }

    /// After the exact cache, for a call that leads or goes alone.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        spec: &StepSpec,
        route: &RouteSpec,
        call: &Call<'_>,
        prompt: Prompt,
        deadline: &Deadline,
        at: SystemTime,
        spent: &mut Spent,
    ) -> Result<Served, PipelineError> {
        // 5. The semantic cache, at the cut the step's audits set; a hit may be audited
        //    after the caller has it.
        let similar = self.semantic_request(spec, &route.label, call).await;
        let mut nearest = None;
        if let Some(similar) = &similar {
            match self.semantic_lookup(similar, call.options.cache, at) {
                Lookup::Hit(hit) => {
                    self.audit_hit(spec, call, &hit).await;
                    return Ok(Served::semantic_hit(hit));
                }
                Lookup::Miss { nearest: near, .. } => nearest = near,
            }
        }

        // 6. The route: candidates left out by capability, context window, breaker, rate
        //    limit, cost ceiling, budget and tier; the strategy orders the rest. Each asked
        //    through the guards with retries until one answers; the reply checked against the
        //    output contract, with one repair.
        let max_output_tokens = prompt.sampling.max_output_tokens;
        let prompt_tokens = prompt.chars.div_ceil(CHARS_PER_TOKEN) as u64;
        let estimated_tokens = prompt_tokens + u64::from(max_output_tokens);
        // Only an answer with no contract to check may reach a streaming caller as it is
        // written; any other is checked first, and sent whole.
        let stream = call
            .options
            .stream
            .as_ref()
            .filter(|_| spec.kind == StepKind::Chat && prompt.request.strict_schema().is_none());
        let ask = Ask {
            spec,
            call,
            deadline,
            sampling: prompt.sampling,
            request: &prompt.request,
            stream,
            prompt_tokens,
            estimated_tokens,
            at,
        };
        match self.ask_and_validate(&ask, route, prompt.messages, spent).await {
            Ok((answer, answered)) => {
                let source = if answered.preferred { Source::Upstream } else { Source::FallbackModel };
                let model = spent.model.clone().unwrap_or_else(|| answered.candidate.upstream.clone());
                let provider = spent.provider.clone().unwrap_or_else(|| answered.candidate.provider.clone());
                let served = Served::upstream(answer, source, model, provider);
                // 7. What the model answered judges a hit under audit, or labels the nearest
                //    candidate of a miss. Then the answer is kept in both caches. A fallback's
                //    answer is not what the route prefers: it judges nothing, and is not
                //    cached, so the next call asks again.
                if source == Source::Upstream {
                    if let Some(audit) = call.audit {
                        spent.audit = self.judge_audit(spec, call, audit, &served.output).await;
                    } else if let Some(nearest) = nearest {
                        self.label_near_miss(spec, call.context, nearest, &served.output);
                    }
                    self.store_answer(prompt.key, similar, call.options.cache, &served, spent.spend(), at).await;
                }
                Ok(served)
            }
            // 8. No model could answer, or not in the step's shape: a stand-in, if the caller
            //    takes one.
            Err(err) if err.stand_in_may_answer() && call.options.allow_stand_in => {
                let mut stand_in = spans::Stage::open("stand_in");
                stand_in.annotate(|attributes| attributes.push(("error.type", err.metric_label().into())));
                let answered = self.stand_in(spec, similar.as_ref(), &err, at);
                drop(stand_in);
                match answered {
                    Some(served) => {
                        tracing::warn!(error = %err, source = served.source.label(), "the upstream could not answer; a fallback did");
                        Ok(served)
                    }
                    None => Err(err),
                }
            }
            Err(err) => Err(err),
        }
    }
}
