use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use providers::{
    ChatMessage, ChatRequest, ChatResponse, OpenAiCompatible, OpenAiSettings, ProviderError, ProviderService, Role,
    Usage,
};
use resilience::Deadline;
use semantic_cache::{CacheKey, Embedder, ExactCache, Lookup, Query, SemanticCache};
use serde_json::Value;
use telemetry::{CallRecord, CallStatus, Recorder, RecorderSettings, TelemetryError, TelemetryStore};
use tower::ServiceExt;
use tracing::Instrument;

use crate::{
    CachePolicy, CallContext, CallOptions, Clock, Config, PipelineError, PipelineResult, SetupError, Source, StepSpec,
    StepType, SystemClock, TraceId,
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
    provider: ProviderService,
    provider_name: String,
    cache: Option<ExactCache<CachedAnswer>>,
    semantic: Option<Arc<SemanticCache<CachedAnswer>>>,
    recorder: Recorder,
    clock: Arc<dyn Clock>,
    unpriced_models: Mutex<HashSet<String>>,
}

/// What the cache keeps of an answer: enough to serve it again and to know what it saved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CachedAnswer {
    output: Value,
    model: String,
    provider: String,
    cost_usd: f64,
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
}

/// How a successful call was served, before latency and spending are attached.
#[derive(Debug)]
struct Served {
    output: Value,
    source: Source,
    confidence: f64,
    model: String,
    provider: String,
    saved_cost_usd: f64,
}

/// A call's request as the semantic cache sees it.
struct SemanticRequest {
    namespace: String,
    query: Query,
    threshold: f32,
}

struct Call<'a> {
    step: &'a StepType,
    input: &'a Value,
    context: &'a CallContext,
    options: &'a CallOptions,
    trace_id: &'a TraceId,
}

impl Engine {
    pub fn builder(config: Config) -> EngineBuilder {
        EngineBuilder { config, provider: None, recorder: None, embedder: None, clock: Arc::new(SystemClock) }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
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
            })
        }
        .instrument(span)
        .await
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
        let model = call.options.model.clone().unwrap_or_else(|| spec.model.clone());
        spent.model = Some(model.clone());

        // 1. The prompt, from the step's templates.
        let messages = config.prompts.render(spec, call.input, call.context)?;
        let prompt_chars: usize = messages.iter().map(|message| message.content.chars().count()).sum();
        if prompt_chars > spec.max_prompt_chars {
            return Err(PipelineError::PromptTooLarge {
                step: spec.step.clone(),
                chars: prompt_chars,
                limit: spec.max_prompt_chars,
            });
        }

        // 2. The caches: the exact one, then the semantic one.
        let key = cache_key(spec, &model, call.context, &messages);
        if let Some(hit) = self.cache_lookup(&key, call.options.cache, at) {
            return Ok(hit);
        }
        let similar = self.semantic_request(spec, &model, call).await;
        if let Some(hit) = similar.as_ref().and_then(|similar| self.semantic_lookup(similar, call.options.cache, at)) {
            return Ok(hit);
        }

        // 3. The cost guard.
        if let Some(max_usd) = call.options.max_cost_usd {
            self.check_cost(spec, &model, prompt_chars, max_usd)?;
        }

        // 4. The provider, under the call's deadline, and 5. the output contract.
        let deadline = Deadline::after(call.options.deadline.unwrap_or(config.engine.default_deadline));
        let output = match deadline.run(self.ask_and_validate(spec, &model, messages, call.trace_id, spent)).await {
            Ok(output) => output?,
            Err(exceeded) => {
                return Err(PipelineError::DeadlineExceeded { budget: exceeded.budget, attempts: spent.attempts });
            }
        };

        // 6. Store the answer for the next identical call.
        let served = Served {
            output,
            source: Source::Upstream,
            confidence: 1.0,
            model: spent.model.clone().unwrap_or(model),
            provider: spent.provider.clone().unwrap_or_else(|| self.inner.provider_name.clone()),
            saved_cost_usd: 0.0,
        };
        self.cache_store(key, similar, call.options.cache, &served, spent.cost_usd, at);
        Ok(served)
    }

    /// The semantic side of a call: the step's free-text field, embedded, in a namespace made
    /// of everything else that must match exactly. `None` when the step or call has no such
    /// field, or embedding fails (logged: the call then goes on without the semantic cache).
    async fn semantic_request(&self, spec: &StepSpec, model: &str, call: &Call<'_>) -> Option<SemanticRequest> {
        let cache = self.inner.semantic.as_ref()?;
        if !call.options.cache.writes() {
            return None;
        }
        let field = spec.semantic_field.as_deref()?;
        let text = call.input.get(field)?.as_str()?.to_owned();
        let mut rest = call.input.clone();
        if let Some(fields) = rest.as_object_mut() {
            fields.remove(field);
        }
        let namespace = CacheKey::builder()
            .text("workspace", &call.context.workspace)
            .text("step", spec.step.as_str())
            .text("contract", &spec.fingerprint)
            .text("model", model)
            .json("other_fields", &rest)
            .build()
            .to_string();
        let cache = cache.clone();
        let span = tracing::info_span!("cache.embed");
        // Embedding is a few milliseconds of CPU: off the async workers.
        let prepared = tokio::task::spawn_blocking(move || span.in_scope(|| cache.prepare(&text)))
            .await
            .map_err(|err| err.to_string())
            .and_then(|prepared| prepared.map_err(|err| err.to_string()));
        match prepared {
            Ok(query) => Some(SemanticRequest { namespace, query, threshold: spec.semantic_threshold }),
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
        match cache.lookup(&similar.namespace, &similar.query, Some(similar.threshold), max_age, at) {
            Lookup::Hit(hit) => {
                tracing::debug!(similarity = hit.similarity, matched = %hit.matched_text, "semantic hit");
                Some(Served {
                    output: hit.value.output,
                    source: Source::SemanticCache,
                    confidence: f64::from(hit.similarity),
                    model: hit.value.model,
                    provider: hit.value.provider,
                    saved_cost_usd: hit.value.cost_usd,
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
        })
    }

    /// Keeps a fresh upstream answer in both caches, as the call's policy allows.
    fn cache_store(
        &self,
        key: CacheKey,
        similar: Option<SemanticRequest>,
        policy: CachePolicy,
        served: &Served,
        cost_usd: f64,
        at: SystemTime,
    ) {
        if !policy.writes() {
            return;
        }
        let answer = CachedAnswer {
            output: served.output.clone(),
            model: served.model.clone(),
            provider: served.provider.clone(),
            cost_usd,
        };
        if let (Some(cache), Some(similar)) = (&self.inner.semantic, similar) {
            cache.insert(&similar.namespace, similar.query, answer.clone(), at);
        }
        if let Some(cache) = &self.inner.cache {
            cache.insert(key, answer, at);
        }
    }

    /// Refuses a call whose worst case (the whole prompt plus the step's full output budget)
    /// would cost more than the caller allows.
    fn check_cost(&self, spec: &StepSpec, model: &str, prompt_chars: usize, max_usd: f64) -> Result<(), PipelineError> {
        let input_tokens = prompt_chars.div_ceil(CHARS_PER_TOKEN) as u64;
        let Some(estimated_usd) = self.inner.config.prices.cost(model, input_tokens, u64::from(spec.max_output_tokens))
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
                    "estimated cost ${estimated_usd:.6} (about {input_tokens} prompt tokens + {} output tokens on \
                     `{model}`) exceeds the call's max_cost_usd ${max_usd:.6}",
                    spec.max_output_tokens
                ),
            });
        }
        Ok(())
    }

    /// One upstream request, and if its reply breaks the output contract, one repair request
    /// that shows the model its reply and what is wrong with it.
    async fn ask_and_validate(
        &self,
        spec: &StepSpec,
        model: &str,
        messages: Vec<ChatMessage>,
        trace_id: &TraceId,
        spent: &mut Spent,
    ) -> Result<Value, PipelineError> {
        let reply = self.ask(spec, model, messages.clone(), trace_id, spent).await?;
        let violations = match validate(spec, &reply.content) {
            Ok(output) => return Ok(output),
            Err(violations) => violations,
        };
        tracing::warn!(%violations, "reply broke the output contract; asking once for a repair");
        let mut repair = messages;
        repair.push(ChatMessage::assistant(reply.content));
        repair.push(ChatMessage::user(format!(
            "That reply does not satisfy the required JSON schema: {violations}. \
             Reply again with only a JSON object that satisfies the schema."
        )));
        let repaired = self.ask(spec, model, repair, trace_id, spent).await?;
        validate(spec, &repaired.content).map_err(|violations| PipelineError::ContractViolation {
            step: spec.step.clone(),
            attempts: spent.attempts,
            violations,
        })
    }

    async fn ask(
        &self,
        spec: &StepSpec,
        model: &str,
        messages: Vec<ChatMessage>,
        trace_id: &TraceId,
        spent: &mut Spent,
    ) -> Result<ChatResponse, PipelineError> {
        let request = ChatRequest {
            model: model.to_owned(),
            messages,
            temperature: Some(spec.temperature),
            max_output_tokens: Some(spec.max_output_tokens),
            json_mode: true,
            trace_id: trace_id.to_string(),
        };
        spent.attempts += 1;
        let span = tracing::info_span!("upstream.attempt", attempt = spent.attempts, model);
        let started = Instant::now();
        let result = self.inner.provider.clone().oneshot(request).instrument(span).await;
        let wall = started.elapsed();
        spent.upstream_wall += wall;
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
            Err(source) => {
                spent.upstream_reported += wall;
                Err(upstream_error(spec, spent.attempts, source))
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
        let (model, provider, source, confidence, saved_cost_usd) = match outcome {
            Ok(served) => (
                served.model.clone(),
                served.provider.clone(),
                served.source.label(),
                served.confidence,
                served.saved_cost_usd,
            ),
            Err(_) => (
                spent.model.clone().unwrap_or_default(),
                spent.provider.clone().unwrap_or_else(|| self.inner.provider_name.clone()),
                "none",
                0.0,
                0.0,
            ),
        };
        span.record("source", source);
        let (status, error_class, error_message) = match outcome {
            Ok(_) => (CallStatus::Ok, None, None),
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
            saved_cost_usd,
            source: source.to_owned(),
            cache_hit: outcome.as_ref().is_ok_and(|served| served.source.is_cache()),
            confidence,
            status,
            error_class,
            error_message,
            attempts: i64::from(spent.attempts),
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
fn cache_key(spec: &StepSpec, model: &str, context: &CallContext, messages: &[ChatMessage]) -> CacheKey {
    let mut key = CacheKey::builder()
        .text("workspace", &context.workspace)
        .text("step", spec.step.as_str())
        .text("contract", &spec.fingerprint)
        .text("model", model);
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
    provider: Option<(String, ProviderService)>,
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
    /// results and telemetry.
    pub fn provider<S>(mut self, name: impl Into<String>, provider: S) -> Self
    where
        S: tower::Service<ChatRequest, Response = ChatResponse, Error = ProviderError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.provider = Some((name.into(), ProviderService::new(provider)));
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
        let (provider_name, provider) = match self.provider {
            Some(provider) => provider,
            None => {
                let settings = &config.provider;
                let api_key = std::env::var(&settings.api_key_env).unwrap_or_default();
                if api_key.is_empty() {
                    tracing::warn!(
                        "{} is not set: the upstream will likely refuse calls; set it to the provider's API key",
                        settings.api_key_env
                    );
                }
                let provider = OpenAiCompatible::new(OpenAiSettings {
                    name: settings.name.clone(),
                    base_url: settings.base_url.clone(),
                    api_key,
                    request_timeout: settings.request_timeout,
                    connect_timeout: settings.connect_timeout,
                })?;
                (settings.name.clone(), ProviderService::new(provider))
            }
        };
        let recorder = match self.recorder {
            Some(recorder) => recorder,
            None => {
                let store = TelemetryStore::connect(&config.telemetry.database_url).await?;
                Recorder::spawn(
                    store,
                    RecorderSettings {
                        queue_capacity: config.telemetry.queue_capacity,
                        batch_size: config.telemetry.batch_size,
                    },
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
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                provider,
                provider_name,
                cache,
                semantic,
                recorder,
                clock: self.clock,
                unpriced_models: Mutex::default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_normalisation_keeps_inner_spacing() {
        assert_eq!(normalise_prompt("\n  a  b   \n\tc \n\n"), "a  b\n\tc");
    }
}
