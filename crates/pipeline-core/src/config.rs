//! Configuration: embedded defaults, then a TOML file, then `AIPIPE_*` environment variables;
//! validated once into types that the engine uses without further checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use semantic_cache::ModelPaths;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use telemetry::{ModelPrice, PriceTable};

use crate::contract::{OutputContract, ReplyContract};
use crate::prompt::{CHAT_SEMANTIC_FIELD, Prompts};
use crate::{StepKind, StepType};

const DEFAULTS: &str = include_str!("../defaults.toml");

/// `AIPIPE_*` variables that are not config keys: the config file (`AIPIPE_CONFIG`), the model
/// home (`AIPIPE_HOME`), the evaluation data (`AIPIPE_DATA`) and the tests' PostgreSQL server
/// (`AIPIPE_TEST_POSTGRES_URL`). Any other `AIPIPE_` variable is a key, and an unknown one is an
/// error.
const PROCESS_VARIABLES: &[&str] = &["config", "home", "data", "test_postgres_url"];

/// Loading the config or building the engine from it failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("config file `{}` does not exist: pass an existing file, or none to run on the embedded defaults", path.display())]
    MissingFile { path: PathBuf },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("provider setup: {0}")]
    Provider(#[from] providers::ProviderError),
    #[error("semantic cache: {0} (or set semantic.enabled = false)")]
    Semantic(#[from] semantic_cache::CacheError),
}

impl SetupError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { key: key.into(), message: message.into() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    engine: RawEngine,
    provider: RawProvider,
    #[serde(default)]
    providers: BTreeMap<String, RawExtraProvider>,
    limits: RawLimits,
    breaker: RawBreaker,
    retry: RawRetry,
    fallback: RawFallback,
    cache: RawCache,
    semantic: RawSemantic,
    telemetry: RawTelemetry,
    alerts: RawAlerts,
    gateway: RawGateway,
    #[serde(default)]
    prices: BTreeMap<String, ModelPrice>,
    #[serde(default)]
    steps: BTreeMap<String, RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    default_model: String,
    default_deadline_ms: u64,
    max_prompt_chars: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    base_url: String,
    api_key_env: String,
    request_timeout_ms: u64,
    connect_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtraProvider {
    base_url: String,
    api_key_env: String,
    request_timeout_ms: u64,
    connect_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    enabled: bool,
    workspace_requests_per_minute: u32,
    workspace_request_burst: u32,
    workspace_tokens_per_minute: u32,
    workspace_token_burst: u32,
    model_requests_per_minute: u32,
    model_request_burst: u32,
    model_tokens_per_minute: u32,
    model_token_burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    enabled: bool,
    failures_to_open: u32,
    open_for_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: u32,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    budget_ratio: f32,
    budget_min_per_second: u32,
    pause_on_retry_after: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFallback {
    similar_min_similarity: f32,
    similar_confidence: f64,
    rule_confidence: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteTarget {
    provider: Option<String>,
    model: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    enabled: bool,
    ttl_secs: u64,
    max_entries: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSemantic {
    enabled: bool,
    threshold: f32,
    min_confidence: f32,
    ttl_secs: u64,
    max_entries: u64,
    ef_search: usize,
    max_text_chars: usize,
    model_dir: String,
    onnxruntime_path: String,
    threads: usize,
    snapshot_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    enabled: bool,
    webhook_url: String,
    z_threshold: f64,
    min_ratio: f64,
    warmup_minutes: u32,
    ewma_alpha: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    database_url: String,
    queue_capacity: usize,
    batch_size: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    default_step: String,
    default_component: String,
    max_body_bytes: usize,
    drain_timeout_ms: u64,
    #[serde(default)]
    api_keys: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    #[serde(default)]
    kind: StepKind,
    #[serde(default)]
    pub(crate) system: String,
    #[serde(default)]
    pub(crate) prompt: String,
    #[serde(default)]
    output_schema: String,
    model: Option<String>,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "default_max_output_tokens")]
    max_output_tokens: u32,
    max_prompt_chars: Option<usize>,
    semantic_field: Option<String>,
    semantic_threshold: Option<f32>,
    semantic_min_confidence: Option<f32>,
    #[serde(default)]
    fallbacks: Vec<RawRouteTarget>,
    fallback_answer: Option<String>,
}

fn default_max_output_tokens() -> u32 {
    512
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub default_model: String,
    pub default_deadline: Duration,
    pub max_prompt_chars: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    pub name: String,
    pub base_url: String,
    /// The environment variable the API key is read from.
    pub api_key_env: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct FallbackSettings {
    pub similar_min_similarity: f32,
    pub similar_confidence: f64,
    pub rule_confidence: f64,
}

/// A model to ask, on a provider (`None`: the primary one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTarget {
    pub provider: Option<String>,
    pub model: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_entries: u64,
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
}

/// `aipipe serve`: the OpenAI-compatible HTTP gateway in front of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    /// The step a request runs when it names none; always a declared step.
    pub default_step: StepType,
    pub default_component: String,
    pub max_body_bytes: usize,
    /// On shutdown, how long in-flight calls may take to finish.
    pub drain_timeout: Duration,
    /// Workspace -> the environment variable that holds its API key.
    pub api_keys: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    pub database_url: String,
    pub queue_capacity: usize,
    pub batch_size: usize,
}

/// One step type, validated: its templates compile and its output schema is a JSON schema.
#[derive(Debug, Clone)]
pub struct StepSpec {
    pub step: StepType,
    pub kind: StepKind,
    pub system: String,
    /// The user-message template; empty for a chat step.
    pub prompt: String,
    /// `Value::Null` for a chat step, whose reply is free text.
    pub output_schema: Value,
    pub model: String,
    pub temperature: f32,
    pub max_output_tokens: u32,
    pub max_prompt_chars: usize,
    /// The input field whose text the semantic cache compares; `None` keeps the step to exact
    /// matches only. Every other input field must match exactly. For a chat step it can only
    /// be `messages`: the last user message is compared, the rest of the conversation must match.
    pub semantic_field: Option<String>,
    pub semantic_threshold: f32,
    pub semantic_min_confidence: f32,
    /// Tried in order when the step's model cannot answer.
    pub fallbacks: Vec<RouteTarget>,
    /// The rule-based reply when no model can answer; valid against the output schema (a
    /// string for a chat step).
    pub fallback_answer: Option<Value>,
    pub(crate) contract: ReplyContract,
    /// Changes whenever anything that shapes the answer changes (templates, schema, sampling),
    /// so that editing a prompt retires its cached answers.
    pub(crate) fingerprint: String,
}

impl StepSpec {
    /// What a similar request must clear for this step's cached answer to serve it.
    pub fn serve_bar(&self) -> semantic_cache::ServeBar {
        semantic_cache::ServeBar { threshold: self.semantic_threshold, min_confidence: self.semantic_min_confidence }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub engine: EngineSettings,
    pub provider: ProviderSettings,
    /// Endpoints besides the primary one, by name.
    pub providers: BTreeMap<String, ProviderSettings>,
    pub resilience: ResilienceSettings,
    pub fallback: FallbackSettings,
    pub cache: CacheSettings,
    pub semantic: SemanticSettings,
    pub telemetry: TelemetrySettings,
    /// `None`: no anomaly alerts.
    pub alerts: Option<telemetry::AlertSettings>,
    pub gateway: GatewaySettings,
    pub prices: PriceTable,
    steps: BTreeMap<StepType, Arc<StepSpec>>,
    pub(crate) prompts: Prompts,
}

impl Config {
    /// Embedded defaults, then `file` if given, then `AIPIPE_*` environment variables
    /// (`AIPIPE_SECTION__KEY`; `AIPIPE_CONFIG`, `AIPIPE_HOME`, `AIPIPE_DATA` and
    /// `AIPIPE_TEST_POSTGRES_URL` are not keys).
    pub fn load(file: Option<&Path>) -> Result<Self, SetupError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SetupError::MissingFile { path: path.to_owned() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("AIPIPE_").split("__").ignore(PROCESS_VARIABLES));
        Self::from_figment(&figment)
    }

    /// The embedded defaults alone, ignoring the environment.
    pub fn defaults() -> Result<Self, SetupError> {
        Self::from_figment(&Figment::from(Toml::string(DEFAULTS)))
    }

    /// The embedded defaults with `toml` on top, ignoring the environment.
    pub fn from_toml(toml: &str) -> Result<Self, SetupError> {
        Self::from_figment(&Figment::from(Toml::string(DEFAULTS)).merge(Toml::string(toml)))
    }

    fn from_figment(figment: &Figment) -> Result<Self, SetupError> {
        let raw: RawConfig = figment.extract().map_err(|err| from_figment_error(&err))?;
        Self::validate(raw)
    }

    pub fn step(&self, step: &StepType) -> Option<&StepSpec> {
        self.steps.get(step).map(Arc::as_ref)
    }

    pub fn steps(&self) -> impl Iterator<Item = &StepSpec> {
        self.steps.values().map(Arc::as_ref)
    }

    fn validate(raw: RawConfig) -> Result<Self, SetupError> {
        let engine = EngineSettings {
            default_model: non_empty("engine.default_model", raw.engine.default_model)?,
            default_deadline: positive_millis("engine.default_deadline_ms", raw.engine.default_deadline_ms)?,
            max_prompt_chars: positive("engine.max_prompt_chars", raw.engine.max_prompt_chars)?,
        };
        let provider = ProviderSettings {
            name: non_empty("provider.name", raw.provider.name)?,
            base_url: http_url("provider.base_url", raw.provider.base_url)?,
            api_key_env: non_empty("provider.api_key_env", raw.provider.api_key_env)?,
            request_timeout: positive_millis("provider.request_timeout_ms", raw.provider.request_timeout_ms)?,
            connect_timeout: positive_millis("provider.connect_timeout_ms", raw.provider.connect_timeout_ms)?,
        };
        let mut providers = BTreeMap::new();
        for (name, extra) in raw.providers {
            let key = |field: &str| format!("providers.{name}.{field}");
            let settings = ProviderSettings {
                name: name.clone(),
                base_url: http_url(&key("base_url"), extra.base_url)?,
                api_key_env: non_empty(&key("api_key_env"), extra.api_key_env)?,
                request_timeout: positive_millis(&key("request_timeout_ms"), extra.request_timeout_ms)?,
                connect_timeout: positive_millis(&key("connect_timeout_ms"), extra.connect_timeout_ms)?,
            };
            providers.insert(name, settings);
        }
        let resilience = validate_resilience(&raw.limits, &raw.breaker, &raw.retry)?;
        let fallback = FallbackSettings {
            similar_min_similarity: similarity("fallback.similar_min_similarity", raw.fallback.similar_min_similarity)?,
            similar_confidence: confidence("fallback.similar_confidence", raw.fallback.similar_confidence)?,
            rule_confidence: confidence("fallback.rule_confidence", raw.fallback.rule_confidence)?,
        };
        let cache = CacheSettings {
            enabled: raw.cache.enabled,
            ttl: Duration::from_secs(positive("cache.ttl_secs", raw.cache.ttl_secs)?),
            max_entries: positive("cache.max_entries", raw.cache.max_entries)?,
        };
        let installed = ModelPaths::installed();
        let path_or =
            |value: String, default: PathBuf| if value.trim().is_empty() { default } else { PathBuf::from(value) };
        let semantic = SemanticSettings {
            enabled: raw.semantic.enabled,
            threshold: similarity("semantic.threshold", raw.semantic.threshold)?,
            min_confidence: similarity("semantic.min_confidence", raw.semantic.min_confidence)?,
            ttl: Duration::from_secs(positive("semantic.ttl_secs", raw.semantic.ttl_secs)?),
            max_entries: positive("semantic.max_entries", raw.semantic.max_entries)?,
            ef_search: if raw.semantic.ef_search >= semantic_cache::MIN_EF_SEARCH {
                raw.semantic.ef_search
            } else {
                return Err(SetupError::invalid(
                    "semantic.ef_search",
                    format!(
                        "{} is below the least useful breadth, {}",
                        raw.semantic.ef_search,
                        semantic_cache::MIN_EF_SEARCH
                    ),
                ));
            },
            model: ModelPaths {
                model_dir: path_or(raw.semantic.model_dir, installed.model_dir),
                onnxruntime: path_or(raw.semantic.onnxruntime_path, installed.onnxruntime),
            },
            max_text_chars: positive("semantic.max_text_chars", raw.semantic.max_text_chars)?,
            threads: raw.semantic.threads,
            snapshot: Some(raw.semantic.snapshot_path).filter(|path| !path.trim().is_empty()).map(PathBuf::from),
        };
        let telemetry = TelemetrySettings {
            database_url: non_empty("telemetry.database_url", raw.telemetry.database_url)?,
            queue_capacity: positive("telemetry.queue_capacity", raw.telemetry.queue_capacity)?,
            batch_size: positive("telemetry.batch_size", raw.telemetry.batch_size)?,
        };
        let alerts = if raw.alerts.enabled {
            let webhook_url = raw.alerts.webhook_url.trim();
            let webhook_url = if webhook_url.is_empty() {
                None
            } else {
                Some(http_url("alerts.webhook_url", webhook_url.to_owned())?)
            };
            let finite_positive = |key: &str, value: f64| {
                if value.is_finite() && value > 0.0 {
                    Ok(value)
                } else {
                    Err(SetupError::invalid(key, format!("{value} must be a number greater than zero")))
                }
            };
            let ewma_alpha = finite_positive("alerts.ewma_alpha", raw.alerts.ewma_alpha)?;
            if ewma_alpha > 1.0 {
                return Err(SetupError::invalid(
                    "alerts.ewma_alpha",
                    format!("{ewma_alpha} is not a weight in (0, 1]"),
                ));
            }
            Some(telemetry::AlertSettings {
                z_threshold: finite_positive("alerts.z_threshold", raw.alerts.z_threshold)?,
                min_ratio: finite_positive("alerts.min_ratio", raw.alerts.min_ratio)?,
                warmup_minutes: raw.alerts.warmup_minutes,
                ewma_alpha,
                webhook_url,
            })
        } else {
            None
        };
        for (model, price) in &raw.prices {
            for (field, value) in [
                ("input_per_million_usd", price.input_per_million_usd),
                ("output_per_million_usd", price.output_per_million_usd),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(SetupError::invalid(
                        format!("prices.\"{model}\".{field}"),
                        format!("{value} is not a price: use a non-negative number"),
                    ));
                }
            }
        }
        let prompts = Prompts::compile(&raw.steps)?;
        let mut steps = BTreeMap::new();
        for (name, step) in raw.steps {
            let spec = validate_step(&name, step, &engine, &semantic, &provider.name, &providers)?;
            steps.insert(spec.step.clone(), Arc::new(spec));
        }
        let gateway = validate_gateway(raw.gateway, &steps)?;
        Ok(Self {
            engine,
            provider,
            providers,
            resilience,
            fallback,
            cache,
            semantic,
            telemetry,
            alerts,
            gateway,
            prices: PriceTable::new(raw.prices),
            steps,
            prompts,
        })
    }
}

/// figment's own message leads with its profile name (`default.cache.ttl`), which means
/// nothing to our users; this says which key, what is wrong, and where it was set.
fn from_figment_error(err: &figment::Error) -> SetupError {
    let key = if err.path.is_empty() { "(top level)".to_owned() } else { err.path.join(".") };
    let origin = match &err.metadata {
        Some(metadata) => match &metadata.source {
            Some(source) => format!(" (set in {source})"),
            None => format!(" (set by {})", metadata.name),
        },
        None => String::new(),
    };
    SetupError::invalid(key, format!("{}{origin}", err.kind))
}

fn validate_resilience(
    limits: &RawLimits,
    breaker: &RawBreaker,
    retry: &RawRetry,
) -> Result<ResilienceSettings, SetupError> {
    let quota = |name: &str, per_minute: u32, burst_name: &str, burst: u32| {
        Ok::<_, SetupError>(resilience::Quota {
            per_minute: non_zero(&format!("limits.{name}"), per_minute)?,
            burst: non_zero(&format!("limits.{burst_name}"), burst)?,
        })
    };
    let limits = if limits.enabled {
        let settings = resilience::LimitSettings {
            workspace_requests: quota(
                "workspace_requests_per_minute",
                limits.workspace_requests_per_minute,
                "workspace_request_burst",
                limits.workspace_request_burst,
            )?,
            workspace_tokens: quota(
                "workspace_tokens_per_minute",
                limits.workspace_tokens_per_minute,
                "workspace_token_burst",
                limits.workspace_token_burst,
            )?,
            model_requests: quota(
                "model_requests_per_minute",
                limits.model_requests_per_minute,
                "model_request_burst",
                limits.model_request_burst,
            )?,
            model_tokens: quota(
                "model_tokens_per_minute",
                limits.model_tokens_per_minute,
                "model_token_burst",
                limits.model_token_burst,
            )?,
        };
        Some(settings)
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
    Ok(ResilienceSettings {
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
    })
}

fn validate_gateway(raw: RawGateway, steps: &BTreeMap<StepType, Arc<StepSpec>>) -> Result<GatewaySettings, SetupError> {
    let default_step =
        StepType::new(&raw.default_step).ok().filter(|step| steps.contains_key(step)).ok_or_else(|| {
            SetupError::invalid(
                "gateway.default_step",
                format!("no step `{}`: declare it under [steps.{}]", raw.default_step, raw.default_step),
            )
        })?;
    for (workspace, variable) in &raw.api_keys {
        let key = format!("gateway.api_keys.{workspace}");
        non_empty(&key, workspace.clone())?;
        non_empty(&key, variable.clone())?;
    }
    Ok(GatewaySettings {
        default_step,
        default_component: non_empty("gateway.default_component", raw.default_component)?,
        max_body_bytes: positive("gateway.max_body_bytes", raw.max_body_bytes)?,
        drain_timeout: positive_millis("gateway.drain_timeout_ms", raw.drain_timeout_ms)?,
        api_keys: raw.api_keys,
    })
}

fn validate_step(
    name: &str,
    raw: RawStep,
    engine: &EngineSettings,
    semantic: &SemanticSettings,
    primary_provider: &str,
    providers: &BTreeMap<String, ProviderSettings>,
) -> Result<StepSpec, SetupError> {
    let key = |field: &str| format!("steps.{name}.{field}");
    let step = StepType::new(name).map_err(|err| SetupError::invalid(format!("steps.{name}"), err.to_string()))?;
    let (output_schema, contract) = match raw.kind {
        StepKind::Structured => {
            if raw.prompt.trim().is_empty() {
                return Err(SetupError::invalid(key("prompt"), "a structured step needs a prompt template"));
            }
            if raw.output_schema.trim().is_empty() {
                return Err(SetupError::invalid(
                    key("output_schema"),
                    "a structured step needs the JSON schema of its reply (or `kind = \"chat\"` for free text)",
                ));
            }
            let schema: Value = serde_json::from_str(&raw.output_schema)
                .map_err(|err| SetupError::invalid(key("output_schema"), format!("not JSON: {err}")))?;
            let contract =
                OutputContract::compile(&schema).map_err(|err| SetupError::invalid(key("output_schema"), err))?;
            (schema, ReplyContract::Json(contract))
        }
        StepKind::Chat => {
            for (field, value) in [("prompt", &raw.prompt), ("output_schema", &raw.output_schema)] {
                if !value.trim().is_empty() {
                    return Err(SetupError::invalid(
                        key(field),
                        "a chat step sends the caller's messages and passes free text back: remove it",
                    ));
                }
            }
            (Value::Null, ReplyContract::Text)
        }
    };
    if !(0.0..=2.0).contains(&raw.temperature) {
        return Err(SetupError::invalid(key("temperature"), format!("{} is outside 0.0..=2.0", raw.temperature)));
    }
    let max_output_tokens = positive(&key("max_output_tokens"), raw.max_output_tokens)?;
    let max_prompt_chars = positive(&key("max_prompt_chars"), raw.max_prompt_chars.unwrap_or(engine.max_prompt_chars))?;
    let semantic_field = match raw.semantic_field {
        Some(field) if raw.kind == StepKind::Chat && field != CHAT_SEMANTIC_FIELD => {
            return Err(SetupError::invalid(
                key("semantic_field"),
                format!("a chat step compares its last user message: use `{CHAT_SEMANTIC_FIELD}` or leave it out"),
            ));
        }
        Some(field) => Some(non_empty(&key("semantic_field"), field)?),
        None => None,
    };
    let semantic_threshold = match raw.semantic_threshold {
        Some(threshold) => similarity(&key("semantic_threshold"), threshold)?,
        None => semantic.threshold,
    };
    let semantic_min_confidence = match raw.semantic_min_confidence {
        Some(min_confidence) => similarity(&key("semantic_min_confidence"), min_confidence)?,
        None => semantic.min_confidence,
    };
    let model = match raw.model {
        Some(model) => non_empty(&key("model"), model)?,
        None => engine.default_model.clone(),
    };
    let mut fallbacks = Vec::new();
    for (index, target) in raw.fallbacks.into_iter().enumerate() {
        let key = format!("steps.{name}.fallbacks[{index}]");
        if let Some(provider) = &target.provider
            && provider != primary_provider
            && !providers.contains_key(provider)
        {
            return Err(SetupError::invalid(
                format!("{key}.provider"),
                format!("no provider `{provider}`: declare it under [providers.{provider}]"),
            ));
        }
        fallbacks
            .push(RouteTarget { provider: target.provider, model: non_empty(&format!("{key}.model"), target.model)? });
    }
    let fallback_answer = match raw.fallback_answer {
        // An empty answer turns off a default one.
        Some(answer) if answer.trim().is_empty() => None,
        Some(answer) => Some(
            contract.check(&answer).map_err(|violations| SetupError::invalid(key("fallback_answer"), violations))?,
        ),
        None => None,
    };
    let fingerprint = {
        let mut hasher = Sha256::new();
        for part in [
            raw.kind.label().as_bytes(),
            raw.system.as_bytes(),
            raw.prompt.as_bytes(),
            semantic_cache::canonical_json(&output_schema).as_bytes(),
            &raw.temperature.to_le_bytes(),
            &max_output_tokens.to_le_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hex::encode(&hasher.finalize()[..8])
    };
    Ok(StepSpec {
        step,
        kind: raw.kind,
        system: raw.system,
        prompt: raw.prompt,
        output_schema,
        model,
        temperature: raw.temperature,
        max_output_tokens,
        max_prompt_chars,
        semantic_field,
        semantic_threshold,
        semantic_min_confidence,
        fallbacks,
        fallback_answer,
        contract,
        fingerprint,
    })
}

fn non_empty(key: &str, value: String) -> Result<String, SetupError> {
    if value.trim().is_empty() {
        return Err(SetupError::invalid(key, "must not be empty"));
    }
    Ok(value)
}

fn positive<T: PartialOrd + Default + std::fmt::Display>(key: &str, value: T) -> Result<T, SetupError> {
    if value <= T::default() {
        return Err(SetupError::invalid(key, format!("{value} must be greater than zero")));
    }
    Ok(value)
}

fn non_zero(key: &str, value: u32) -> Result<std::num::NonZeroU32, SetupError> {
    std::num::NonZeroU32::new(value).ok_or_else(|| SetupError::invalid(key, "must be greater than zero"))
}

fn confidence(key: &str, value: f64) -> Result<f64, SetupError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(SetupError::invalid(key, format!("{value} is not a confidence: use a number in [0, 1]")));
    }
    Ok(value)
}

fn http_url(key: &str, url: String) -> Result<String, SetupError> {
    let url = non_empty(key, url)?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(SetupError::invalid(key, format!("`{url}` is not an http(s) URL")));
    }
    Ok(url)
}

fn similarity(key: &str, value: f32) -> Result<f32, SetupError> {
    if !(value > 0.0 && value <= 1.0) {
        return Err(SetupError::invalid(key, format!("{value} is not a similarity: use a number in (0, 1]")));
    }
    Ok(value)
}

fn positive_millis(key: &str, millis: u64) -> Result<Duration, SetupError> {
    positive(key, millis).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_declare_the_built_in_steps() {
        let config = Config::defaults().unwrap();
        for step in StepType::BUILT_IN {
            let spec = config.step(&step).unwrap_or_else(|| panic!("{step} missing"));
            assert_eq!(spec.model, "gpt-4o-mini");
        }
        assert_eq!(config.cache.ttl, Duration::from_secs(3600));
        assert!(config.prices.price("gpt-4o-mini").is_some());
    }

    #[test]
    fn the_default_min_confidence_is_the_shipped_verifiers_calibrated_cut() {
        let config = Config::defaults().unwrap();
        assert_eq!(
            config.semantic.min_confidence,
            semantic_cache::Verifier::shipped().min_confidence,
            "run `cargo xtask calibrate`: it writes both"
        );
    }

    #[test]
    fn a_file_adds_steps_and_overrides_keys() {
        let config = Config::from_toml(
            r#"
            [cache]
            ttl_secs = 60
            [steps.translator]
            system = "You translate."
            prompt = "Translate to {{ input.language }}: {{ input.text }}"
            output_schema = '{"type": "object", "required": ["translation"]}'
            model = "gpt-4o"
            "#,
        )
        .unwrap();
        assert_eq!(config.cache.ttl, Duration::from_secs(60));
        assert_eq!(config.cache.max_entries, 10_000);
        let translator = config.step(&StepType::new("translator").unwrap()).unwrap();
        assert_eq!(translator.model, "gpt-4o");
        assert_eq!(translator.max_output_tokens, 512);
    }

    fn error_of(toml: &str) -> String {
        Config::from_toml(toml).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = error_of("[cache]\nttl_second = 5");
        assert!(unknown.contains("ttl_second") && unknown.contains("cache"), "{unknown}");
        let wrong_type = error_of("[cache]\nttl_secs = \"an hour\"");
        assert!(wrong_type.contains("cache.ttl_secs"), "{wrong_type}");
        let zero = error_of("[cache]\nmax_entries = 0");
        assert!(zero.contains("cache.max_entries"), "{zero}");
        let schema = error_of("[steps.classifier]\noutput_schema = '{not json'");
        assert!(schema.contains("steps.classifier.output_schema"), "{schema}");
        let template = error_of("[steps.classifier]\nprompt = '{% if %}'");
        assert!(template.contains("steps.classifier.prompt"), "{template}");
        let url = error_of("[provider]\nbase_url = 'localhost:8080'");
        assert!(url.contains("provider.base_url"), "{url}");
        let name = error_of("[steps.Bad]\nsystem = 's'\nprompt = 'p'\noutput_schema = '{\"type\":\"object\"}'");
        assert!(name.contains("steps.Bad"), "{name}");
    }

    #[test]
    fn resilience_settings_are_checked_and_named() {
        let defaults = Config::defaults().unwrap();
        let limits = defaults.resilience.limits.unwrap();
        assert_eq!((limits.workspace_requests.per_minute.get(), limits.workspace_requests.burst.get()), (1000, 50));
        assert_eq!(defaults.resilience.breaker.unwrap().failures_to_open, 5);
        let classifier = defaults.step(&StepType::CLASSIFIER).unwrap();
        assert_eq!(classifier.fallback_answer.as_ref().unwrap()["label"], "unclassified");

        let off = Config::from_toml("[limits]\nenabled = false\n[breaker]\nenabled = false").unwrap();
        assert!(off.resilience.limits.is_none() && off.resilience.breaker.is_none());
        let no_rule = Config::from_toml("[steps.classifier]\nfallback_answer = ''").unwrap();
        assert!(no_rule.step(&StepType::CLASSIFIER).unwrap().fallback_answer.is_none());

        let burst = error_of("[limits]\nworkspace_request_burst = 0");
        assert!(burst.contains("limits.workspace_request_burst"), "{burst}");
        let backoff = error_of("[retry]\ninitial_backoff_ms = 5000\nmax_backoff_ms = 100");
        assert!(backoff.contains("retry.max_backoff_ms"), "{backoff}");
        let confidence = error_of("[fallback]\nsimilar_confidence = 1.5");
        assert!(confidence.contains("fallback.similar_confidence"), "{confidence}");
        let answer = error_of("[steps.classifier]\nfallback_answer = '{\"label\": 3}'");
        assert!(answer.contains("steps.classifier.fallback_answer"), "{answer}");
        let provider = error_of("[steps.classifier]\nfallbacks = [{ provider = 'backup', model = 'm' }]");
        assert!(provider.contains("steps.classifier.fallbacks[0].provider") && provider.contains("[providers.backup]"));
        let declared = Config::from_toml(
            "[providers.backup]\nbase_url = 'http://localhost:9/v1'\napi_key_env = 'K'\nrequest_timeout_ms = 1\n\
             connect_timeout_ms = 1\n[steps.classifier]\nfallbacks = [{ provider = 'backup', model = 'm' }]",
        )
        .unwrap();
        assert_eq!(declared.step(&StepType::CLASSIFIER).unwrap().fallbacks[0].provider.as_deref(), Some("backup"));
    }

    #[test]
    fn a_missing_file_says_so() {
        let err = Config::load(Some(Path::new("/nonexistent/aipipe.toml"))).unwrap_err();
        assert!(matches!(err, SetupError::MissingFile { .. }), "{err}");
    }

    #[test]
    fn editing_a_prompt_changes_the_fingerprint() {
        let base = Config::defaults().unwrap();
        let edited =
            Config::from_toml("[steps.classifier]\nprompt = 'Labels: {{ input.labels }} Text: {{ input.text }}'")
                .unwrap();
        let fingerprint = |config: &Config| config.step(&StepType::CLASSIFIER).unwrap().fingerprint.clone();
        assert_ne!(fingerprint(&base), fingerprint(&edited));
        assert_eq!(
            base.step(&StepType::VALIDATOR).unwrap().fingerprint,
            edited.step(&StepType::VALIDATOR).unwrap().fingerprint
        );
    }
}
