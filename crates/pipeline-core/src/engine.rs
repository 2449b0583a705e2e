use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use providers::{
    ChatMessage, ChatRequest, ChatResponse, ErrorClass, FinishReason, OpenAiCompatible, OpenAiSettings, ProviderError,
    ProviderService, Role, Usage,
};
use resilience::{BreakerState, BreakerStatus, Breakers, Deadline, Outcome, Pauses, RateLimits, Refusal, RetryPolicy};
use semantic_cache::{CacheKey, Embedder, ExactCache, Lookup, Query, SemanticCache, ServeBar};
use serde_json::Value;
use telemetry::{CallRecord, CallStatus, Recorder, RecorderSettings, TelemetryError, TelemetryStore};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::Instrument;

use crate::prompt::{Rendered, Sampling, semantic_text};
use crate::{
    CachePolicy, CallContext, CallOptions, Clock, Config, PipelineError, PipelineResult, RouteTarget, SetupError,
    SimilarRequest, Source, StepSpec, StepType, SystemClock, TraceId,
};

/// Longest error text kept in a telemetry row.
const MAX_ERROR_MESSAGE_CHARS: usize = 500;

/// Average characters per token of English text under OpenAI's tokenizers; used only to
/// estimate a call's cost before it is made.
const CHARS_PER_TOKEN: usize = 4;

/// The engine. Cheap to clone; clones share the cache, the provider and the telemetry writer.
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
    limits: Option<RateLimits>,
    breakers: Option<Breakers>,
    pauses: Option<Pauses>,
    retry: RetryPolicy,
    /// Calls on their way upstream, by cache key, for identical calls to wait on.
    in_flight: Mutex<HashMap<FlightKey, watch::Receiver<Option<Flight>>>>,
    recorder: Recorder,
    clock: Arc<dyn Clock>,
    unpriced_models: Mutex<HashSet<String>>,
}

/// Identical calls share a flight only if they also agree on stand-ins: a call that refuses
/// them must not receive one through another call.
type FlightKey = (CacheKey, bool);

/// What a call in flight hands the identical calls that waited for it: its outcome and what
/// it paid.
type Flight = Result<(Served, Spend), PipelineError>;

/// What a call paid upstream.
#[derive(Debug, Clone, Copy)]
struct Spend {
    cost_usd: f64,
    tokens: u64,
}

/// What the cache keeps of an answer: enough to serve it again and to know what it saved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CachedAnswer {
    output: Value,
    model: String,
    provider: String,
    cost_usd: f64,
    /// Input plus output tokens the answer took (0 in snapshots from before it was kept).
    #[serde(default)]
    tokens: u64,
    #[serde(default)]
    finish_reason: FinishReason,
}

/// A validated reply: the step's output and why the model stopped.
struct Answer {
    output: Value,
    finish_reason: FinishReason,
}

/// Everything a call consumed, kept up to date while it runs so that a failed or cut-off call
/// still reports what it spent.
#[derive(Debug, Default)]
struct Spent {
    attempts: u32,
    usage: Usage,
    cost_usd: f64,
    model: Option<String>,
    provider: Option<String>,
    /// Wall time spent waiting for the provider.
    upstream_wall: Duration,
    /// Upstream time as the provider reports it (the logged latency, for a replay).
    upstream_reported: Duration,
    /// Waiting on rate limits and Retry-After pauses.
    rate_limit_wait: Duration,
    /// The breaker of the last provider/model asked, after the last attempt.
    breaker_state: Option<BreakerState>,
}

impl Spent {
    fn spend(&self) -> Spend {
        Spend {
            cost_usd: self.cost_usd,
            tokens: u64::from(self.usage.input_tokens) + u64::from(self.usage.output_tokens),
        }
    }
}

/// How a successful call was served, before latency and spending are attached.
#[derive(Debug, Clone)]
struct Served {
    output: Value,
    source: Source,
    confidence: f64,
    model: String,
    provider: String,
    saved_cost_usd: f64,
    saved_tokens: u64,
    /// For a semantic hit or a similar-answer stand-in: the matched request.
    similar: Option<SimilarRequest>,
    /// Why the step's model did not answer, when a fallback did.
    degraded_by: Option<&'static str>,
    finish_reason: FinishReason,
}

impl Served {
    fn upstream(answer: Answer, source: Source, model: String, provider: String) -> Self {
        Self {
            output: answer.output,
            source,
            confidence: 1.0,
            model,
            provider,
            saved_cost_usd: 0.0,
            saved_tokens: 0,
            similar: None,
            degraded_by: None,
            finish_reason: answer.finish_reason,
        }
    }

    /// The same answer, for an identical call that waited for this one: it paid nothing and
    /// saved what this one paid.
    fn for_follower(mut self, leader: Spend) -> Self {
        if matches!(self.source, Source::Upstream | Source::FallbackModel) {
            self.source = Source::Coalesced;
            self.saved_cost_usd = leader.cost_usd;
            self.saved_tokens = leader.tokens;
        }
        self
    }
}

/// Whether this call asks the upstream itself or waits for an identical one that does.
enum Turn {
    Lead(Leader),
    Follow(watch::Receiver<Option<Flight>>),
    Alone,
}

/// The call that asks the upstream for a key; on drop (done or cancelled) it stops being
/// the one others wait for.
struct Leader {
    engine: Arc<Inner>,
    key: FlightKey,
    sender: watch::Sender<Option<Flight>>,
}

impl Leader {
    fn publish(self, outcome: &Result<Served, PipelineError>, spend: Spend) {
        let flight = outcome.as_ref().map(|served| (served.clone(), spend)).map_err(Clone::clone);
        self.sender.send_replace(Some(flight));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.engine.in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// A call's request as the semantic cache sees it.
struct SemanticRequest {
    namespace: String,
    query: Query,
    bar: ServeBar,
}

struct Call<'a> {
    step: &'a StepType,
    input: &'a Value,
    context: &'a CallContext,
    options: &'a CallOptions,
    trace_id: &'a TraceId,
}

/// A call's rendered prompt and its exact-cache key.
struct Prompt {
    messages: Vec<ChatMessage>,
    sampling: Sampling,
    chars: usize,
    key: CacheKey,
}

/// What every upstream attempt of one call shares.
struct Ask<'a> {
    spec: &'a StepSpec,
    call: &'a Call<'a>,
    deadline: &'a Deadline,
    sampling: Sampling,
    /// Prompt plus the call's output budget, reserved from the token limits before sending.
    estimated_tokens: u64,
}

/// A model on a named provider: the unit of rate limits, breakers and Retry-After pauses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    provider: String,
    model: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// Waits, within the deadline, for the identical call in flight. `None` if it was cancelled
/// before it had an outcome.
async fn follow(
    mut receiver: watch::Receiver<Option<Flight>>,
    deadline: &Deadline,
) -> Option<Result<Served, PipelineError>> {
    let waited =
        deadline.run(receiver.wait_for(Option::is_some)).instrument(tracing::info_span!("coalesce.wait")).await;
    match waited {
        Err(exceeded) => Some(Err(PipelineError::DeadlineExceeded { budget: exceeded.budget, attempts: 0 })),
        Ok(Err(_leader_gone)) => None,
        Ok(Ok(flight)) => flight.clone().map(|outcome| outcome.map(|(served, spend)| served.for_follower(spend))),
    }
}

impl Engine {
    pub fn builder(config: Config) -> EngineBuilder {
        EngineBuilder { config, providers: Vec::new(), recorder: None, embedder: None, clock: Arc::new(SystemClock) }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The time on the engine's clock (the log's time during a replay).
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// The telemetry writer this engine records into.
    pub fn recorder(&self) -> &Recorder {
        &self.inner.recorder
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
        let trace_id = context.trace_id.clone().unwrap_or_else(TraceId::random);
        let span = tracing::info_span!(
            "aipipe.call",
            step = %step,
            workspace = %context.workspace,
            component = %context.component,
            trace_id = %trace_id,
            source = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        let call = Call { step: &step, input: &input, context: &context, options: &options, trace_id: &trace_id };
        async {
            let started = Instant::now();
            let at = self.inner.clock.now();
            let mut spent = Spent::default();
            let outcome = self.run(&call, at, &mut spent).await;
            // Upstream time counts as the provider reports it: measured for a live provider,
            // as logged for a replayed one that answers at once.
            let latency = started.elapsed().saturating_sub(spent.upstream_wall) + spent.upstream_reported;
            self.record(&call, at, latency, &spent, &outcome);
            outcome.map(|served| PipelineResult {
                output: served.output,
                source: served.source,
                confidence: served.confidence,
                model: served.model,
                provider: served.provider,
                input_tokens: spent.usage.input_tokens,
                output_tokens: spent.usage.output_tokens,
                cost_usd: spent.cost_usd,
                saved_cost_usd: served.saved_cost_usd,
                latency,
                trace_id: trace_id.clone(),
                attempts: spent.attempts,
                rate_limit_wait: spent.rate_limit_wait,
                degraded_by: served.degraded_by,
                similar_to: served.similar,
                finish_reason: served.finish_reason,
            })
        }
        .instrument(span)
        .await
    }

    /// The Prometheus metrics of this engine's calls (`Metrics::router` serves `/metrics`).
    pub fn metrics(&self) -> &telemetry::Metrics {
        self.inner.recorder.metrics()
    }

    /// The state of every circuit breaker used so far (empty when breakers are off).
    pub fn breakers(&self) -> Vec<BreakerStatus> {
        self.inner.breakers.as_ref().map(Breakers::statuses).unwrap_or_default()
    }

    /// Waits until every telemetry record of the calls made so far is written.
    pub async fn flush(&self) -> Result<(), TelemetryError> {
        self.inner.recorder.flush().await
    }

    /// Before the process ends: writes the pending telemetry and saves the semantic cache to
    /// its snapshot, if one is configured.
    pub async fn shutdown(&self) -> Result<(), SetupError> {
        self.flush().await?;
        if let (Some(cache), Some(path)) = (&self.inner.semantic, &self.inner.config.semantic.snapshot) {
            let (cache, target) = (cache.clone(), path.clone());
            let saved = tokio::task::spawn_blocking(move || cache.save(&target)).await.map_err(|err| {
                semantic_cache::CacheError::Snapshot { path: path.clone(), reason: err.to_string() }
            })??;
            tracing::info!(entries = saved, "semantic cache saved");
        }
        Ok(())
    }

    /// The stages of a call, in their fixed order.
    async fn run(&self, call: &Call<'_>, at: SystemTime, spent: &mut Spent) -> Result<Served, PipelineError> {
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
        let model = call.options.model.clone().unwrap_or_else(|| spec.model.clone());
        spent.model = Some(model.clone());

        // 1. The prompt, from the step's templates.
        let Rendered { messages, sampling } = config.prompts.render(spec, call.input, call.context)?;
        let prompt_chars: usize = messages.iter().map(|message| message.content.chars().count()).sum();
        if prompt_chars > spec.max_prompt_chars {
            return Err(PipelineError::PromptTooLarge {
                step: spec.step.clone(),
                chars: prompt_chars,
                limit: spec.max_prompt_chars,
            });
        }

        // 2. The exact cache.
        let key = cache_key(spec, &model, call.context, &messages, sampling);
        if let Some(hit) = self.cache_lookup(&key, call.options.cache, at) {
            return Ok(hit);
        }

        // 3. An identical call already on its way upstream answers this one too.
        let leader = match self.take_turn(key, call.options) {
            Turn::Follow(receiver) => match follow(receiver, &deadline).await {
                Some(outcome) => return outcome,
                // The leader was cancelled: this call goes on its own.
                None => None,
            },
            Turn::Lead(leader) => Some(leader),
            Turn::Alone => None,
        };
        let prompt = Prompt { messages, sampling, chars: prompt_chars, key };
        let outcome = self.answer(spec, &model, call, prompt, &deadline, at, spent).await;
        if let Some(leader) = leader {
            leader.publish(&outcome, spent.spend());
        }
        outcome
    }

    fn take_turn(&self, key: CacheKey, options: &CallOptions) -> Turn {
        // A call that refuses cached answers wants its own.
        if options.cache.readable_age().is_none() {
            return Turn::Alone;
        }
        let key = (key, options.allow_stand_in);
        let mut in_flight = self.inner.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(receiver) = in_flight.get(&key) {
            return Turn::Follow(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(key, receiver);
        Turn::Lead(Leader { engine: self.inner.clone(), key, sender })
    }

    /// After the exact cache: the semantic cache, the cost guard, the route of models, the
    /// output contract, and when no model can answer, the fallbacks.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        spec: &StepSpec,
        model: &str,
        call: &Call<'_>,
        prompt: Prompt,
        deadline: &Deadline,
        at: SystemTime,
        spent: &mut Spent,
    ) -> Result<Served, PipelineError> {
        let similar = self.semantic_request(spec, model, call).await;
        if let Some(hit) = similar.as_ref().and_then(|similar| self.semantic_lookup(similar, call.options.cache, at)) {
            return Ok(hit);
        }
        if let Some(max_usd) = call.options.max_cost_usd {
            self.check_cost(model, prompt.chars, prompt.sampling.max_output_tokens, max_usd)?;
        }
        let route = self.route(spec, model);
        let max_output_tokens = prompt.sampling.max_output_tokens;
        let estimated_tokens = prompt.chars.div_ceil(CHARS_PER_TOKEN) as u64 + u64::from(max_output_tokens);
        let ask = Ask { spec, call, deadline, sampling: prompt.sampling, estimated_tokens };
        match self.ask_and_validate(&ask, &route, prompt.messages, spent).await {
            Ok((answer, answered_by)) => {
                let target = &route[answered_by];
                let source = if answered_by == 0 { Source::Upstream } else { Source::FallbackModel };
                let served = Served::upstream(
                    answer,
                    source,
                    spent.model.clone().unwrap_or_else(|| target.model.clone()),
                    spent.provider.clone().unwrap_or_else(|| target.provider.clone()),
                );
                // A fallback model's answer is not what this model would say: not cached under
                // its key, so that the next call asks the step's own model again.
                if source == Source::Upstream {
                    self.cache_store(prompt.key, similar, call.options.cache, &served, spent.spend(), at);
                }
                Ok(served)
            }
            Err(err) if err.upstream_unavailable() && call.options.allow_stand_in => {
                match self.stand_in(spec, similar.as_ref(), &err, at) {
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

    /// The step's model on the primary provider, then the step's fallback models.
    fn route(&self, spec: &StepSpec, model: &str) -> Vec<Target> {
        let primary = &self.inner.primary;
        std::iter::once(Target { provider: primary.clone(), model: model.to_owned() })
            .chain(spec.fallbacks.iter().map(|RouteTarget { provider, model }| Target {
                provider: provider.clone().unwrap_or_else(|| primary.clone()),
                model: model.clone(),
            }))
            .collect()
    }

    /// A stand-in answer when no model could give one: a cached answer to a similar request,
    /// then the step's rule-based answer. Never cached, never labelled as an upstream answer.
    fn stand_in(
        &self,
        spec: &StepSpec,
        similar: Option<&SemanticRequest>,
        cause: &PipelineError,
        at: SystemTime,
    ) -> Option<Served> {
        let settings = &self.inner.config.fallback;
        let degraded_by = Some(cause.metric_label());
        if let (Some(cache), Some(similar)) = (&self.inner.semantic, similar)
            && let Some(hit) =
                cache.find_similar(&similar.namespace, &similar.query, settings.similar_min_similarity, at)
        {
            tracing::info!(similarity = hit.similarity, matched = %hit.matched_text, "similar answer stands in");
            return Some(Served {
                output: hit.value.output,
                source: Source::FallbackSimilar,
                confidence: settings.similar_confidence,
                model: hit.value.model,
                provider: hit.value.provider,
                saved_cost_usd: hit.value.cost_usd,
                saved_tokens: hit.value.tokens,
                similar: Some(SimilarRequest { text: hit.matched_text, similarity: hit.similarity }),
                degraded_by,
                finish_reason: hit.value.finish_reason,
            });
        }
        let output = spec.fallback_answer.clone()?;
        Some(Served {
            output,
            source: Source::FallbackRule,
            confidence: settings.rule_confidence,
            model: "rule".into(),
            provider: "aipipe".into(),
            saved_cost_usd: 0.0,
            saved_tokens: 0,
            similar: None,
            degraded_by,
            finish_reason: FinishReason::Stop,
        })
    }

    /// The step's free-text field and the rest of the input, if the semantic cache may
    /// compare this text.
    fn semantic_text(&self, spec: &StepSpec, input: &Value) -> Option<(String, Value)> {
        let (text, rest) = semantic_text(spec, input)?;
        if text.chars().count() > self.inner.config.semantic.max_text_chars {
            tracing::debug!("text longer than semantic.max_text_chars: exact cache only");
            return None;
        }
        Some((text, rest))
    }

    /// Embeds the texts that these calls will look up in the semantic cache, over all of the
    /// embedder's sessions, so that the calls find their vectors ready. It blocks: run it on a
    /// thread of its own, ahead of the calls (a replay does). Returns how many texts it saw.
    pub fn embed_ahead<'a>(
        &self,
        calls: impl IntoIterator<Item = (&'a StepType, &'a Value)>,
    ) -> Result<usize, semantic_cache::CacheError> {
        let Some(cache) = &self.inner.semantic else { return Ok(0) };
        let texts: Vec<String> = calls
            .into_iter()
            .filter_map(|(step, input)| self.inner.config.step(step).and_then(|spec| self.semantic_text(spec, input)))
            .map(|(text, _)| text)
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        cache.warm(&texts)?;
        Ok(texts.len())
    }

    /// The semantic side of a call: the step's free-text field, embedded, in a namespace made
    /// of everything else that must match exactly. `None` when the step or call has no such
    /// field, or embedding fails (logged: the call then goes on without the semantic cache).
    async fn semantic_request(&self, spec: &StepSpec, model: &str, call: &Call<'_>) -> Option<SemanticRequest> {
        let cache = self.inner.semantic.as_ref()?;
        if !call.options.cache.writes() {
            return None;
        }
        let (text, rest) = self.semantic_text(spec, call.input)?;
        let namespace = CacheKey::builder()
            .text("workspace", &call.context.workspace)
            .text("step", spec.step.as_str())
            .text("contract", &spec.fingerprint)
            .text("model", model)
            .json("other_fields", &rest)
            .build()
            .to_string();
        if let Some(query) = cache.prepare_remembered(&text) {
            return Some(SemanticRequest { namespace, query, bar: spec.serve_bar() });
        }
        let cache = cache.clone();
        let span = tracing::info_span!("cache.embed");
        // Embedding is a few milliseconds of CPU: off the async workers.
        let prepared = tokio::task::spawn_blocking(move || span.in_scope(|| cache.prepare(&text)))
            .await
            .map_err(|err| err.to_string())
            .and_then(|prepared| prepared.map_err(|err| err.to_string()));
        match prepared {
            Ok(query) => Some(SemanticRequest { namespace, query, bar: spec.serve_bar() }),
            Err(error) => {
                tracing::warn!(%error, "semantic cache skipped for this call");
                None
            }
        }
    }

    fn semantic_lookup(&self, similar: &SemanticRequest, policy: CachePolicy, at: SystemTime) -> Option<Served> {
        let cache = self.inner.semantic.as_ref()?;
        let max_age = policy.readable_age()?;
        let _span = tracing::info_span!("cache.semantic").entered();
        match cache.lookup(&similar.namespace, &similar.query, Some(similar.bar), max_age, at) {
            Lookup::Hit(hit) => {
                tracing::debug!(
                    similarity = hit.similarity,
                    confidence = hit.confidence,
                    matched = %hit.matched_text,
                    "semantic hit"
                );
                Some(Served {
                    output: hit.value.output,
                    source: Source::SemanticCache,
                    confidence: f64::from(hit.confidence),
                    model: hit.value.model,
                    provider: hit.value.provider,
                    saved_cost_usd: hit.value.cost_usd,
                    saved_tokens: hit.value.tokens,
                    similar: Some(SimilarRequest { text: hit.matched_text, similarity: hit.similarity }),
                    degraded_by: None,
                    finish_reason: hit.value.finish_reason,
                })
            }
            Lookup::Miss { best } => {
                if let Some((similarity, rejection)) = best {
                    tracing::debug!(similarity, rejected_by = rejection.label(), "semantic miss");
                }
                None
            }
        }
    }

    fn cache_lookup(&self, key: &CacheKey, policy: CachePolicy, at: SystemTime) -> Option<Served> {
        let cache = self.inner.cache.as_ref()?;
        let max_age = policy.readable_age()?;
        let _span = tracing::info_span!("cache.lookup").entered();
        let entry = cache.get(key, at)?;
        if max_age.is_some_and(|max_age| entry.age(at) > max_age) {
            return None;
        }
        let answer = &entry.value;
        Some(Served {
            output: answer.output.clone(),
            source: Source::ExactCache,
            confidence: 1.0,
            model: answer.model.clone(),
            provider: answer.provider.clone(),
            saved_cost_usd: answer.cost_usd,
            saved_tokens: answer.tokens,
            similar: None,
            degraded_by: None,
            finish_reason: answer.finish_reason,
        })
    }

    /// Keeps a fresh upstream answer in both caches, as the call's policy allows.
    fn cache_store(
        &self,
        key: CacheKey,
        similar: Option<SemanticRequest>,
        policy: CachePolicy,
        served: &Served,
        spend: Spend,
        at: SystemTime,
    ) {
        if !policy.writes() {
            return;
        }
        let answer = CachedAnswer {
            output: served.output.clone(),
            model: served.model.clone(),
            provider: served.provider.clone(),
            cost_usd: spend.cost_usd,
            tokens: spend.tokens,
            finish_reason: served.finish_reason,
        };
        if let (Some(cache), Some(similar)) = (&self.inner.semantic, similar) {
            cache.insert(&similar.namespace, similar.query, answer.clone(), at);
        }
        if let Some(cache) = &self.inner.cache {
            cache.insert(key, answer, at);
        }
    }

    /// Refuses a call whose worst case (the whole prompt plus the call's full output budget)
    /// would cost more than the caller allows.
    fn check_cost(
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
    async fn ask_and_validate(
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
        loop {
            let err = match self.attempt(ask, target, messages, spent).await {
                Ok(reply) => return Ok(reply),
                Err(err) => err,
            };
            let PipelineError::Upstream { source, .. } = &err else { return Err(err) };
            if !source.is_retryable() {
                return Err(err);
            }
            match retries.next_delay(source.retry_after(), ask.deadline) {
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

    /// One upstream request, through the guards: the Retry-After pause, the rate limits, the
    /// circuit breaker, and a timeout that ends no later than the call's deadline. Its outcome
    /// goes back to each guard.
    async fn attempt(
        &self,
        ask: &Ask<'_>,
        target: &Target,
        messages: &[ChatMessage],
        spent: &mut Spent,
    ) -> Result<ChatResponse, PipelineError> {
        let inner = &self.inner;
        let key = target.to_string();
        let refused = |source: Refusal, spent: &Spent| PipelineError::Refused {
            step: ask.spec.step.clone(),
            attempts: spent.attempts,
            source,
        };
        let pause = match &inner.pauses {
            Some(pauses) => {
                let admitted = pauses.admit(&key, ask.deadline).instrument(tracing::info_span!("limit.pause")).await;
                let (permit, waited) = admitted.map_err(|err| refused(err, spent))?;
                spent.rate_limit_wait += waited;
                Some(permit)
            }
            None => None,
        };
        let reservation = match &inner.limits {
            Some(limits) => {
                let acquired = limits
                    .acquire(&ask.call.context.workspace, &key, ask.estimated_tokens, ask.deadline)
                    .instrument(tracing::info_span!("limit.acquire"))
                    .await;
                let (waited, reservation) = acquired.map_err(|err| refused(err, spent))?;
                spent.rate_limit_wait += waited;
                Some(reservation)
            }
            None => None,
        };
        let breaker = match &inner.breakers {
            Some(breakers) => match breakers.admit(&key) {
                Ok(permit) => Some(permit),
                Err(err) => {
                    spent.breaker_state = Some(breakers.state(&key));
                    return Err(refused(err, spent));
                }
            },
            None => None,
        };
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
            json_mode: ask.spec.contract.json_mode(),
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
        if let Some(permit) = breaker {
            spent.breaker_state = Some(permit.record(outcome));
        }
        if let Some(permit) = pause {
            permit.record(outcome);
        }
        if let Some(reservation) = reservation {
            reservation.settle(match &result {
                Ok(reply) => Some(u64::from(reply.usage.input_tokens) + u64::from(reply.usage.output_tokens)),
                // A request cut off may still have been billed.
                Err(ProviderError::Timeout { .. }) => None,
                Err(_) => Some(0),
            });
        }
        match result {
            Ok(reply) => {
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
                Err(upstream_error(ask.spec, spent.attempts, source))
            }
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

    fn record(
        &self,
        call: &Call<'_>,
        at: SystemTime,
        latency: Duration,
        spent: &Spent,
        outcome: &Result<Served, PipelineError>,
    ) {
        let span = tracing::Span::current();
        let (model, provider, source, confidence) = match outcome {
            Ok(served) => (served.model.clone(), served.provider.clone(), served.source.label(), served.confidence),
            Err(_) => (
                spent.model.clone().unwrap_or_default(),
                spent.provider.clone().unwrap_or_else(|| self.inner.primary.clone()),
                "none",
                0.0,
            ),
        };
        let served = outcome.as_ref().ok();
        span.record("source", source);
        let (status, error_class, error_message) = match outcome {
            Ok(served) => (CallStatus::Ok, served.degraded_by.map(str::to_owned), None),
            Err(err) => {
                tracing::info!(error = %err, class = err.metric_label(), "call failed");
                let message: String = err.to_string().chars().take(MAX_ERROR_MESSAGE_CHARS).collect();
                (CallStatus::Error, Some(err.metric_label().to_owned()), Some(message))
            }
        };
        span.record("status", status.as_str());
        let component = if call.context.component.is_empty() { "unspecified" } else { &call.context.component };
        self.inner.recorder.record(CallRecord {
            ts_ms: at.duration_since(UNIX_EPOCH).map(|since| since.as_millis() as i64).unwrap_or(0),
            step: call.step.to_string(),
            component: component.to_owned(),
            workspace: call.context.workspace.clone(),
            trace_id: call.trace_id.to_string(),
            model,
            provider,
            input_tokens: i64::from(spent.usage.input_tokens),
            output_tokens: i64::from(spent.usage.output_tokens),
            latency_ms: latency.as_secs_f64() * 1000.0,
            cost_usd: spent.cost_usd,
            saved_cost_usd: served.map_or(0.0, |served| served.saved_cost_usd),
            saved_tokens: served.map_or(0, |served| served.saved_tokens as i64),
            source: source.to_owned(),
            cache_hit: outcome.as_ref().is_ok_and(|served| served.source.is_cache()),
            confidence,
            similarity: served.and_then(|served| served.similar.as_ref()).map(|similar| f64::from(similar.similarity)),
            status,
            error_class,
            error_message,
            attempts: i64::from(spent.attempts),
            rate_limit_wait_ms: spent.rate_limit_wait.as_secs_f64() * 1000.0,
            breaker_state: spent.breaker_state.map(|state| state.label().to_owned()),
        });
    }
}

fn upstream_error(spec: &StepSpec, attempts: u32, source: ProviderError) -> PipelineError {
    PipelineError::Upstream { step: spec.step.clone(), attempts, source }
}

fn validate(spec: &StepSpec, reply: &str) -> Result<Value, String> {
    let _span = tracing::info_span!("validate").entered();
    spec.contract.check(reply)
}

/// Two calls share an answer only if everything the model sees and everything that shapes
/// its reply are the same: workspace, step contract, model and the rendered prompt (which
/// stands for the input, the template and any metadata the template reads).
fn cache_key(
    spec: &StepSpec,
    model: &str,
    context: &CallContext,
    messages: &[ChatMessage],
    sampling: Sampling,
) -> CacheKey {
    let mut key = CacheKey::builder()
        .text("workspace", &context.workspace)
        .text("step", spec.step.as_str())
        .text("contract", &spec.fingerprint)
        .text("model", model)
        .text("sampling", &format!("{}/{}", sampling.temperature, sampling.max_output_tokens));
    for message in messages {
        let role = match message.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        key = key.text(role, &normalise_prompt(&message.content));
    }
    key.build()
}

/// Trailing spaces and surrounding blank lines carry no meaning for a model; inner spacing
/// and case may (code, names), so they are kept.
fn normalise_prompt(text: &str) -> String {
    text.trim().lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

/// Builds an [`Engine`]. Without a provider it talks to the configured OpenAI-compatible
/// endpoint; without a recorder it opens the configured telemetry database.
#[derive(Debug)]
pub struct EngineBuilder {
    config: Config,
    /// In the order given; the first is the primary.
    providers: Vec<(String, ProviderService)>,
    recorder: Option<Recorder>,
    embedder: Option<Arc<Embedder>>,
    clock: Arc<dyn Clock>,
}

impl EngineBuilder {
    /// Shares an already loaded embedding model (tests, several engines in one process).
    pub fn embedder(mut self, embedder: Arc<Embedder>) -> Self {
        self.embedder = Some(embedder);
        self
    }

    /// Any [`tower::Service`] from chat requests to chat responses; `name` labels it in
    /// results and telemetry, and is what steps' `fallbacks` call it. The first provider given
    /// is the primary one; without any, the engine talks to the configured endpoints.
    pub fn provider<S>(mut self, name: impl Into<String>, provider: S) -> Self
    where
        S: tower::Service<ChatRequest, Response = ChatResponse, Error = ProviderError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.providers.push((name.into(), ProviderService::new(provider)));
        self
    }

    pub fn recorder(mut self, recorder: Recorder) -> Self {
        self.recorder = Some(recorder);
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub async fn build(self) -> Result<Engine, SetupError> {
        let config = self.config;
        let mut providers: HashMap<String, ProviderService> = HashMap::new();
        let primary = match self.providers.first() {
            Some((name, _)) => name.clone(),
            None => {
                providers.insert(config.provider.name.clone(), openai_compatible(&config.provider)?);
                config.provider.name.clone()
            }
        };
        for (name, provider) in self.providers {
            providers.entry(name).or_insert(provider);
        }
        for (name, settings) in &config.providers {
            if !providers.contains_key(name) {
                providers.insert(name.clone(), openai_compatible(settings)?);
            }
        }
        for spec in config.steps() {
            for target in &spec.fallbacks {
                if let Some(name) = &target.provider
                    && !providers.contains_key(name)
                {
                    return Err(SetupError::invalid(
                        format!("steps.{}.fallbacks", spec.step),
                        format!("no provider `{name}`: declare it under [providers.{name}]"),
                    ));
                }
            }
        }
        let recorder = match self.recorder {
            Some(recorder) => recorder,
            None => {
                let store = TelemetryStore::connect(&config.telemetry.database_url).await?;
                Recorder::spawn_with_alerts(
                    store,
                    RecorderSettings {
                        queue_capacity: config.telemetry.queue_capacity,
                        batch_size: config.telemetry.batch_size,
                    },
                    config.alerts.clone(),
                )
            }
        };
        let cache = config.cache.enabled.then(|| ExactCache::new(config.cache.max_entries, config.cache.ttl));
        let semantic = if config.semantic.enabled {
            let embedder = match self.embedder {
                Some(embedder) => embedder,
                None => Arc::new(Embedder::load(&config.semantic.model, config.semantic.threads)?),
            };
            let settings = semantic_cache::SemanticSettings {
                ttl: config.semantic.ttl,
                max_entries: config.semantic.max_entries,
                threshold: config.semantic.threshold,
                min_confidence: config.semantic.min_confidence,
                ef_search: config.semantic.ef_search,
            };
            let cache = SemanticCache::new(embedder, semantic_cache::ConceptNormalizer::default(), settings);
            if let Some(path) = &config.semantic.snapshot {
                match cache.load(path, self.clock.now()) {
                    Ok(loaded) => tracing::info!(entries = loaded, path = %path.display(), "semantic cache loaded"),
                    Err(err) => tracing::warn!(error = %err, "semantic cache starts empty"),
                }
            }
            Some(Arc::new(cache))
        } else {
            None
        };
        let resilience = &config.resilience;
        let limits = resilience.limits.map(RateLimits::new);
        let breakers = resilience.breaker.map(Breakers::new);
        let pauses = resilience.pause_on_retry_after.then(Pauses::new);
        let retry = RetryPolicy::new(resilience.retry);
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                providers,
                primary,
                cache,
                semantic,
                limits,
                breakers,
                pauses,
                retry,
                in_flight: Mutex::default(),
                recorder,
                clock: self.clock,
                unpriced_models: Mutex::default(),
            }),
        })
    }
}

/// An OpenAI-compatible endpoint from config; its API key from the environment variable the
/// config names.
fn openai_compatible(settings: &crate::ProviderSettings) -> Result<ProviderService, SetupError> {
    let api_key = std::env::var(&settings.api_key_env).unwrap_or_default();
    if api_key.is_empty() {
        tracing::warn!(
            "{} is not set: the `{}` upstream will likely refuse calls; set it to the provider's API key",
            settings.api_key_env,
            settings.name
        );
    }
    let provider = OpenAiCompatible::new(OpenAiSettings {
        name: settings.name.clone(),
        base_url: settings.base_url.clone(),
        api_key,
        request_timeout: settings.request_timeout,
        connect_timeout: settings.connect_timeout,
    })?;
    Ok(ProviderService::new(provider))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_normalisation_keeps_inner_spacing() {
        assert_eq!(normalise_prompt("\n  a  b   \n\tc \n\n"), "a  b\n\tc");
    }
}
