//! Putting an engine together: its providers, caches, guards and telemetry writer, from the
//! config and whatever the caller hands in instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::SeedableRng;

use providers::{
    Anthropic, AnthropicSettings, ChatRequest, ChatResponse, OpenAiCompatible, OpenAiSettings, ProviderError,
    ProviderService,
};
use resilience::{GuardSettings, Guards, RetryPolicy, SharedGuards};
use semantic_cache::{Embedder, ExactCache, SemanticCache};
use telemetry::{Recorder, RecorderSettings, SpanSink, TelemetryStore};

use super::audit::AuditMode;
use super::budget::Budgets;
use super::route::Latencies;
use super::shared::Shared;
use super::{Engine, Inner};
use crate::{Clock, Config, ProviderKind, ProviderSettings, SetupError, SystemClock};

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
    spans: Option<Arc<dyn SpanSink>>,
    audit_mode: AuditMode,
}

impl EngineBuilder {
    pub(super) fn new(config: Config) -> Self {
        Self {
            config,
            providers: Vec::new(),
            recorder: None,
            embedder: None,
            clock: Arc::new(SystemClock),
            spans: None,
            audit_mode: AuditMode::default(),
        }
    }

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

    /// How paid audits of semantic hits run (default: in the background).
    pub fn audits(mut self, mode: AuditMode) -> Self {
        self.audit_mode = mode;
        self
    }

    /// Where each call's spans go, to be exported as a trace (none: calls keep no spans).
    pub fn spans(mut self, sink: Arc<dyn SpanSink>) -> Self {
        self.spans = Some(sink);
        self
    }

    pub async fn build(self) -> Result<Engine, SetupError> {
        let config = self.config;
        let (providers, primary) = providers(&config, self.providers)?;
        let recorder = match self.recorder {
            Some(recorder) => recorder,
            None => {
                let store = TelemetryStore::connect(&config.telemetry.database_url).await?;
                // Only the database the engine opened itself: a recorder handed in (a replay's)
                // keeps its rows at the log's times, which the wall clock would find old.
                if let Some(keep) = config.telemetry.retention {
                    store.spawn_retention(keep);
                }
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
        let semantic = match config.semantic.enabled {
            true => Some(semantic_cache(&config, self.embedder, self.clock.as_ref())?),
            false => None,
        };
        let shared = Shared::connect(&config.state, config.semantic.max_entries)?;
        if let (Some(shared), Some(semantic)) = (&shared, &semantic) {
            shared.follow(semantic);
        }
        let resilience = &config.resilience;
        let mut guards = Guards::new(GuardSettings {
            limits: resilience.limits,
            breaker: resilience.breaker,
            pause_on_retry_after: resilience.pause_on_retry_after,
            max_wait: resilience.max_wait,
        });
        if let Some(store) = shared.as_ref().and_then(Shared::redis) {
            guards = guards.shared(SharedGuards { store, replicas: config.state.replicas });
        }
        let retry = RetryPolicy::new(resilience.retry);
        let latencies = Latencies::new(config.routing.latency_half_life);
        let budgets = Budgets::new(config.budgets.clone(), config.steps().any(|spec| spec.daily_budget_usd.is_some()));
        let seed = config.routing.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos() as u64)
        });
        let rng = Mutex::new(rand::rngs::StdRng::seed_from_u64(seed));
        let cuts = semantic_cache::audit::Cuts::default();
        if let (Some(path), Some(cache)) = (&config.semantic.snapshot, &semantic) {
            restore_cuts(&config, cache.score_kind(), &cuts, &super::audit::cuts_path(path));
        }
        let audits_in_flight = config.semantic.audit.max_in_flight;
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                providers,
                primary,
                cache,
                semantic,
                shared,
                guards,
                retry,
                flights: Arc::default(),
                recorder,
                clock: self.clock,
                latencies,
                budgets,
                rng,
                spans: self.spans,
                cuts,
                audits_in_flight: Arc::new(tokio::sync::Semaphore::new(audits_in_flight)),
                audit_mode: self.audit_mode,
            }),
        };
        let shares_verdicts = engine.inner.shared.as_ref().is_some_and(|shared| shared.verdicts().is_some());
        if shares_verdicts && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(super::audit::follow_verdicts(Arc::downgrade(&engine.inner)));
        }
        Ok(engine)
    }
}

/// Every provider by name, and the primary one's name: the first given, else the configured
/// endpoint. Every provider a step's fallbacks name must exist.
fn providers(
    config: &Config,
    given: Vec<(String, ProviderService)>,
) -> Result<(HashMap<String, ProviderService>, String), SetupError> {
    let mut providers: HashMap<String, ProviderService> = HashMap::new();
    let primary = match given.first() {
        Some((name, _)) => name.clone(),
        None => {
            providers.insert(config.provider.name.clone(), endpoint(&config.provider)?);
            config.provider.name.clone()
        }
    };
    for (name, provider) in given {
        providers.entry(name).or_insert(provider);
    }
    for (name, settings) in &config.providers {
        if !providers.contains_key(name) {
            providers.insert(name.clone(), endpoint(settings)?);
        }
    }
    for spec in config.steps() {
        for candidate in &spec.route.candidates {
            // Models on the configured primary run on whatever the primary is.
            if candidate.provider != config.provider.name && !providers.contains_key(&candidate.provider) {
                return Err(SetupError::invalid(
                    format!("steps.{}", spec.step),
                    format!(
                        "model `{}` runs on provider `{}`, which is neither configured nor given",
                        candidate.name, candidate.provider
                    ),
                ));
            }
        }
    }
    Ok((providers, primary))
}

fn semantic_cache(
    config: &Config,
    embedder: Option<Arc<Embedder>>,
    clock: &dyn Clock,
) -> Result<Arc<SemanticCache<super::cache::CachedAnswer>>, SetupError> {
    let embedder = match embedder {
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
        match cache.load(path, clock.now()) {
            Ok(loaded) => tracing::info!(entries = loaded, path = %path.display(), "semantic cache loaded"),
            Err(err) => tracing::warn!(error = %err, "semantic cache starts empty"),
        }
    }
    Ok(Arc::new(cache))
}

/// A configured endpoint, speaking its API; its API key from the environment variable the
/// config names.
fn endpoint(settings: &ProviderSettings) -> Result<ProviderService, SetupError> {
    let api_key = std::env::var(&settings.api_key_env).unwrap_or_default();
    if api_key.is_empty() {
        tracing::warn!(
            "{} is not set: the `{}` upstream will likely refuse calls; set it to the provider's API key",
            settings.api_key_env,
            settings.name
        );
    }
    Ok(match settings.kind {
        ProviderKind::OpenAi => ProviderService::new(OpenAiCompatible::new(OpenAiSettings {
            name: settings.name.clone(),
            base_url: settings.base_url.clone(),
            api_key,
            request_timeout: settings.request_timeout,
            connect_timeout: settings.connect_timeout,
            stream_usage: settings.capabilities.stream_usage,
        })?),
        ProviderKind::Anthropic => ProviderService::new(Anthropic::new(AnthropicSettings {
            name: settings.name.clone(),
            base_url: settings.base_url.clone(),
            api_key,
            default_max_tokens: settings.default_max_tokens,
            request_timeout: settings.request_timeout,
            connect_timeout: settings.connect_timeout,
        })?),
    })
}

/// Takes back the cuts saved beside the semantic cache's snapshot, for the steps whose
/// configured cut is still the one they were learned from. A missing file is a first start; a
/// corrupt one, a warning and cuts learned again.
fn restore_cuts(
    config: &Config,
    kind: semantic_cache::ScoreKind,
    cuts: &semantic_cache::audit::Cuts,
    path: &std::path::Path,
) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "semantic cuts not read: learned again");
            return;
        }
    };
    match serde_json::from_str(&text) {
        Ok(saved) => {
            let prior = |step: &str| {
                let spec = config.step(&crate::StepType::new(step).ok()?)?;
                Some(semantic_cache::audit::Cut::At(kind.cut_of(spec.serve_bar())))
            };
            let restored = cuts.restore(saved, prior);
            tracing::info!(scopes = restored, path = %path.display(), "semantic cuts loaded");
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "semantic cuts file unreadable: learned again");
        }
    }
}
