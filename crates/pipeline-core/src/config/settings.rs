//! The engine's settings, section by section, each validated from its raw table; errors name
//! the key.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use providers::Capabilities;
use semantic_cache::ModelPaths;
use serde::Deserialize;
use shared_state::StoreSettings;

use super::raw::{
    RawAlerts, RawBreaker, RawCache, RawEndpoint, RawEngine, RawFallback, RawLimits, RawProvider, RawRetry,
    RawSemantic, RawState, RawTelemetry,
};
use super::validate::{
    cosine, finite_positive, http_url, non_empty, positive, positive_millis, probability, wrong_rate,
};
use crate::SetupError;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub default_model: String,
    pub default_deadline: Duration,
    pub max_prompt_chars: usize,
}

impl EngineSettings {
    pub(super) fn validate(raw: RawEngine) -> Result<Self, SetupError> {
        Ok(Self {
            default_model: non_empty("engine.default_model", raw.default_model)?,
            default_deadline: positive_millis("engine.default_deadline_ms", raw.default_deadline_ms)?,
            max_prompt_chars: positive("engine.max_prompt_chars", raw.max_prompt_chars)?,
        })
    }
}

/// Which API a provider speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI's chat completions: OpenAI itself, vLLM, Ollama, llama.cpp's server, and the
    /// many proxies that speak it.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

impl ProviderKind {
    /// As the config writes it, and as OpenTelemetry's `gen_ai.system` names it.
    pub fn label(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    /// What the API can do, unless the provider's config says otherwise.
    pub fn default_capabilities(self) -> Capabilities {
        match self {
            Self::OpenAi => Capabilities::OPENAI,
            Self::Anthropic => Capabilities::ANTHROPIC,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    /// The environment variable the API key is read from.
    pub api_key_env: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// What its server can be asked for (structured outputs, JSON mode, tools, streamed usage):
    /// the API's defaults, each overridable, since OpenAI-compatible servers differ.
    pub capabilities: Capabilities,
    /// `max_tokens` for a call that sets no output budget, where the API requires one.
    pub default_max_tokens: u32,
}

impl ProviderSettings {
    pub(super) fn primary(raw: RawProvider) -> Result<Self, SetupError> {
        let (name, endpoint) = raw.into_named();
        Self::validate("provider", non_empty("provider.name", name)?, endpoint)
    }

    /// `[providers.NAME]`: an endpoint besides the primary one.
    pub(super) fn named(name: &str, raw: RawEndpoint) -> Result<Self, SetupError> {
        Self::validate(&format!("providers.{name}"), name.to_owned(), raw)
    }

    fn validate(table: &str, name: String, raw: RawEndpoint) -> Result<Self, SetupError> {
        let key = |field: &str| format!("{table}.{field}");
        let defaults = raw.kind.default_capabilities();
        Ok(Self {
            name,
            kind: raw.kind,
            base_url: http_url(&key("base_url"), raw.base_url)?,
            api_key_env: non_empty(&key("api_key_env"), raw.api_key_env)?,
            request_timeout: positive_millis(&key("request_timeout_ms"), raw.request_timeout_ms)?,
            connect_timeout: positive_millis(&key("connect_timeout_ms"), raw.connect_timeout_ms)?,
            capabilities: Capabilities {
                structured_outputs: raw.structured_outputs.unwrap_or(defaults.structured_outputs),
                json_mode: raw.json_mode.unwrap_or(defaults.json_mode),
                tools: raw.tools.unwrap_or(defaults.tools),
                stream_usage: raw.stream_usage.unwrap_or(defaults.stream_usage),
                images: raw.images.unwrap_or(defaults.images),
                sampling_controls: raw.sampling_controls.unwrap_or(defaults.sampling_controls),
            },
            default_max_tokens: positive(&key("default_max_tokens"), raw.default_max_tokens)?,
        })
    }
}

/// How calls are kept within limits and alive when the upstream is not.
#[derive(Debug, Clone, PartialEq)]
pub struct ResilienceSettings {
    /// `None`: no rate limits.
    pub limits: Option<resilience::LimitSettings>,
    /// `None`: no circuit breakers.
    pub breaker: Option<resilience::BreakerSettings>,
    pub retry: resilience::RetrySettings,
    pub pause_on_retry_after: bool,
    /// The longest a call waits for capacity or for a Retry-After pause to end; past that it
    /// is refused at once, with the time it could go.
    pub max_wait: Duration,
}

impl ResilienceSettings {
    pub(super) fn validate(limits: &RawLimits, breaker: &RawBreaker, retry: &RawRetry) -> Result<Self, SetupError> {
        let max_wait = Duration::from_millis(limits.max_wait_ms);
        // 0 turns a limit off; a burst of 0 is three seconds' worth.
        let quota = |per_minute: u32, burst: u32| {
            let per_minute = NonZeroU32::new(per_minute)?;
            let burst = NonZeroU32::new(burst).or(NonZeroU32::new(per_minute.get() / 20)).unwrap_or(NonZeroU32::MIN);
            Some(resilience::Quota { per_minute, burst })
        };
        let limits = if limits.enabled {
            Some(resilience::LimitSettings {
                workspace_requests: quota(limits.workspace_requests_per_minute, limits.workspace_request_burst),
                workspace_tokens: quota(limits.workspace_tokens_per_minute, limits.workspace_token_burst),
                model_requests: quota(limits.model_requests_per_minute, limits.model_request_burst),
                model_tokens: quota(limits.model_tokens_per_minute, limits.model_token_burst),
            })
        } else {
            None
        };
        let breaker = if breaker.enabled {
            Some(resilience::BreakerSettings {
                failures_to_open: positive("breaker.failures_to_open", breaker.failures_to_open)?,
                open_for: positive_millis("breaker.open_for_ms", breaker.open_for_ms)?,
            })
        } else {
            None
        };
        if !(retry.budget_ratio.is_finite() && (0.0..=1000.0).contains(&retry.budget_ratio)) {
            return Err(SetupError::invalid(
                "retry.budget_ratio",
                format!(
                    "{} is not a share of traffic: use a number from 0 (no retries beyond the minimum) up",
                    retry.budget_ratio
                ),
            ));
        }
        let initial_backoff = positive_millis("retry.initial_backoff_ms", retry.initial_backoff_ms)?;
        let max_backoff = positive_millis("retry.max_backoff_ms", retry.max_backoff_ms)?;
        if max_backoff < initial_backoff {
            return Err(SetupError::invalid("retry.max_backoff_ms", "must not be below retry.initial_backoff_ms"));
        }
        Ok(Self {
            limits,
            breaker,
            retry: resilience::RetrySettings {
                max_attempts: positive("retry.max_attempts", retry.max_attempts)?,
                initial_backoff,
                max_backoff,
                budget_ratio: retry.budget_ratio,
                budget_min_per_second: retry.budget_min_per_second,
            },
            pause_on_retry_after: retry.pause_on_retry_after,
            max_wait,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FallbackSettings {
    /// The cosine a similar cached answer needs to stand in.
    pub similar_min_similarity: f32,
    /// The confidence a similar-answer stand-in is served at.
    pub similar_confidence: f64,
    /// The confidence a rule-based stand-in is served at.
    pub rule_confidence: f64,
}

impl FallbackSettings {
    pub(super) fn validate(raw: &RawFallback) -> Result<Self, SetupError> {
        Ok(Self {
            similar_min_similarity: cosine("fallback.similar_min_similarity", raw.similar_min_similarity)?,
            similar_confidence: probability("fallback.similar_confidence", raw.similar_confidence)?,
            rule_confidence: probability("fallback.rule_confidence", raw.rule_confidence)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_entries: u64,
}

impl CacheSettings {
    pub(super) fn validate(raw: &RawCache) -> Result<Self, SetupError> {
        Ok(Self {
            enabled: raw.enabled,
            ttl: Duration::from_secs(positive("cache.ttl_secs", raw.ttl_secs)?),
            max_entries: positive("cache.max_entries", raw.max_entries)?,
        })
    }
}

/// The semantic cache: where the model is, and when a similar request's answer may be served.
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticSettings {
    pub enabled: bool,
    /// Cosine at or above which the plain decision serves (a model the learned verifier was
    /// not trained for).
    pub threshold: f32,
    /// The learned verifier's probability at or above which it serves.
    pub min_confidence: f32,
    pub ttl: Duration,
    pub max_entries: u64,
    /// HNSW search breadth (recall versus latency).
    pub ef_search: usize,
    /// Longer texts are matched exactly or not at all: the model would see only their start.
    pub max_text_chars: usize,
    pub model: ModelPaths,
    /// Embedding sessions, one ONNX Runtime thread each; 0 = one per core.
    pub threads: usize,
    /// Where the cache is saved on shutdown and loaded on start; `None`: it lives in memory only.
    pub snapshot: Option<PathBuf>,
    /// How hits are audited against the model, and the bound their cuts keep.
    pub audit: AuditConfig,
}

/// `semantic.max_wrong_rate` and the audits that keep it (`semantic_cache::audit`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// The bound on the share of semantic hits whose answer the model would not have given;
    /// a step may set its own. 0 turns audits off: the offline cut serves, unverified.
    pub max_wrong_rate: f64,
    /// The share of hits asked of the model again once a step has audits enough.
    pub audit_rate: f64,
    /// No cut goes below this score, and near misses below it are not labelled.
    pub floor: f32,
    /// Paid audits running at once; more are skipped (and counted).
    pub max_in_flight: usize,
    /// Two free-text answers agree when their embeddings' cosine is at least this, unless a
    /// judge is named.
    pub answer_min_cosine: f32,
    /// A structured step asked whether two answers agree (input `first`, `second`; reply
    /// `same`, a boolean), with its own model and budget; `None`: the embeddings decide.
    pub answer_judge: Option<crate::StepType>,
}

impl SemanticSettings {
    pub(super) fn validate(raw: RawSemantic) -> Result<Self, SetupError> {
        if raw.ef_search < semantic_cache::MIN_EF_SEARCH {
            return Err(SetupError::invalid(
                "semantic.ef_search",
                format!("{} is below the least useful breadth, {}", raw.ef_search, semantic_cache::MIN_EF_SEARCH),
            ));
        }
        let installed = ModelPaths::installed();
        let path_or =
            |value: String, default: PathBuf| if value.trim().is_empty() { default } else { PathBuf::from(value) };
        Ok(Self {
            enabled: raw.enabled,
            threshold: cosine("semantic.threshold", raw.threshold)?,
            min_confidence: probability("semantic.min_confidence", f64::from(raw.min_confidence))? as f32,
            ttl: Duration::from_secs(positive("semantic.ttl_secs", raw.ttl_secs)?),
            max_entries: positive("semantic.max_entries", raw.max_entries)?,
            ef_search: raw.ef_search,
            model: ModelPaths {
                model_dir: path_or(raw.model_dir, installed.model_dir),
                onnxruntime: path_or(raw.onnxruntime_path, installed.onnxruntime),
            },
            max_text_chars: positive("semantic.max_text_chars", raw.max_text_chars)?,
            threads: raw.threads,
            snapshot: Some(raw.snapshot_path).filter(|path| !path.trim().is_empty()).map(PathBuf::from),
            audit: AuditConfig {
                max_wrong_rate: wrong_rate("semantic.max_wrong_rate", raw.max_wrong_rate)?,
                audit_rate: probability("semantic.audit_rate", raw.audit_rate)?,
                floor: probability("semantic.audit_floor", f64::from(raw.audit_floor))? as f32,
                max_in_flight: raw.max_audits_in_flight,
                answer_min_cosine: cosine("semantic.answer_min_cosine", raw.answer_min_cosine)?,
                answer_judge: match raw.answer_judge_step.trim() {
                    "" => None,
                    step => Some(
                        crate::StepType::new(step)
                            .map_err(|err| SetupError::invalid("semantic.answer_judge_step", err.to_string()))?,
                    ),
                },
            },
        })
    }
}

/// What several replicas share, and how they reach it. `None` URLs: this process alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSettings {
    /// The exact cache, the rate limits and the open breakers.
    pub redis: Option<StoreSettings>,
    /// The semantic cache's entries (the same Redis unless `semantic_url` names another).
    pub semantic: Option<StoreSettings>,
    pub replicas: NonZeroU32,
}

impl StateSettings {
    pub(super) fn validate(raw: &RawState) -> Result<Self, SetupError> {
        let replicas = NonZeroU32::new(raw.replicas).ok_or_else(|| {
            SetupError::invalid("state.replicas", "must be at least 1 (the replicas sharing the limits)")
        })?;
        let timeout = Duration::from_millis(positive("state.timeout_ms", raw.timeout_ms)?);
        let retry_after = Duration::from_millis(positive("state.retry_ms", raw.retry_ms)?);
        if raw.key_prefix.trim().is_empty() {
            return Err(SetupError::invalid(
                "state.key_prefix",
                "must not be empty: every key aipipe writes starts with it",
            ));
        }
        let store = |url: &str, url_key: &'static str| -> Result<Option<StoreSettings>, SetupError> {
            let url = url.trim();
            if url.is_empty() {
                return Ok(None);
            }
            if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://")) {
                return Err(SetupError::invalid(
                    format!("state.{url_key}"),
                    "must be a Redis URL (redis://host:port/db, rediss:// with TLS); the semantic store is a \
                     Redis stream that every replica follows (docs/ARCHITECTURE.md)",
                ));
            }
            Ok(Some(StoreSettings {
                url: url.to_owned(),
                url_key,
                timeout,
                retry_after,
                key_prefix: raw.key_prefix.clone(),
            }))
        };
        let redis = store(&raw.redis_url, "redis_url")?;
        let semantic = match store(&raw.semantic_url, "semantic_url")? {
            Some(semantic) => Some(semantic),
            None => redis.clone(),
        };
        if replicas.get() > 1 && redis.is_none() {
            tracing::warn!(
                "state.replicas is {replicas} but state.redis_url is empty: each replica holds the whole limit"
            );
        }
        Ok(Self { redis, semantic, replicas })
    }

    pub fn is_shared(&self) -> bool {
        self.redis.is_some() || self.semantic.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    pub database_url: String,
    pub queue_capacity: usize,
    pub batch_size: usize,
    /// Where traces go over OTLP/HTTP (the collector's base URL: `/v1/traces` is added);
    /// `None`: only if the standard `OTEL_EXPORTER_OTLP_*ENDPOINT` variables name one.
    pub otlp_endpoint: Option<String>,
    /// Spans waiting for export; past it they are dropped and counted, never waited for.
    pub otlp_queue_capacity: usize,
    /// The longest a finished span waits to be exported: spans go out in batches, when a batch
    /// is full or this long after the last export.
    pub otlp_export_delay: Duration,
    /// Rows older than this are deleted (hourly) from a database the engine opened itself;
    /// `None`: kept for ever.
    pub retention: Option<Duration>,
}

impl TelemetrySettings {
    pub(super) fn validate(raw: RawTelemetry) -> Result<Self, SetupError> {
        let otlp_endpoint = raw.otlp_endpoint.trim();
        let otlp_endpoint = if otlp_endpoint.is_empty() {
            None
        } else {
            Some(http_url("telemetry.otlp_endpoint", otlp_endpoint.to_owned())?)
        };
        Ok(Self {
            database_url: non_empty("telemetry.database_url", raw.database_url)?,
            queue_capacity: positive("telemetry.queue_capacity", raw.queue_capacity)?,
            batch_size: positive("telemetry.batch_size", raw.batch_size)?,
            otlp_endpoint,
            otlp_queue_capacity: positive("telemetry.otlp_queue_capacity", raw.otlp_queue_capacity)?,
            otlp_export_delay: positive_millis("telemetry.otlp_export_delay_ms", raw.otlp_export_delay_ms)?,
            retention: match raw.retention_days {
                0 => None,
                days if days > 100 * 365 => {
                    return Err(SetupError::invalid(
                        "telemetry.retention_days",
                        format!("{days} days is not a retention: use at most 36500, or 0 to keep rows for ever"),
                    ));
                }
                days => Some(Duration::from_secs(days * 86_400)),
            },
        })
    }
}

/// `[alerts]`: `None` when they are off.
pub(super) fn alerts(raw: &RawAlerts) -> Result<Option<telemetry::AlertSettings>, SetupError> {
    if !raw.enabled {
        return Ok(None);
    }
    let webhook_url = raw.webhook_url.trim();
    let webhook_url =
        if webhook_url.is_empty() { None } else { Some(http_url("alerts.webhook_url", webhook_url.to_owned())?) };
    let ewma_alpha = finite_positive("alerts.ewma_alpha", raw.ewma_alpha)?;
    if ewma_alpha > 1.0 {
        return Err(SetupError::invalid("alerts.ewma_alpha", format!("{ewma_alpha} is not a weight in (0, 1]")));
    }
    Ok(Some(telemetry::AlertSettings {
        z_threshold: finite_positive("alerts.z_threshold", raw.z_threshold)?,
        min_ratio: finite_positive("alerts.min_ratio", raw.min_ratio)?,
        warmup_minutes: raw.warmup_minutes,
        ewma_alpha,
        webhook_url,
    }))
}
