//! The config as written: serde structs that mirror the TOML, every table closed to unknown
//! keys. Nothing here is checked beyond its type; `validate` turns these into settings.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::StepKind;

/// The top-level tables the engine reads, as [`RawConfig`] names them. Any other table is an
/// error, unless another part of aipipe claims it (`ConfigSource::section`): the whole config
/// is checked for unknown keys here, rather than by serde, for that reason.
pub(crate) const ENGINE_SECTIONS: &[&str] = &[
    "engine",
    "provider",
    "providers",
    "limits",
    "breaker",
    "retry",
    "fallback",
    "cache",
    "semantic",
    "state",
    "telemetry",
    "alerts",
    "models",
    "routing",
    "budgets",
    "steps",
];

#[derive(Debug, Deserialize)]
pub(crate) struct RawConfig {
    pub(crate) engine: RawEngine,
    pub(crate) provider: RawProvider,
    #[serde(default)]
    pub(crate) providers: BTreeMap<String, RawEndpoint>,
    pub(crate) limits: RawLimits,
    pub(crate) breaker: RawBreaker,
    pub(crate) retry: RawRetry,
    pub(crate) fallback: RawFallback,
    pub(crate) cache: RawCache,
    pub(crate) semantic: RawSemantic,
    pub(crate) state: RawState,
    pub(crate) telemetry: RawTelemetry,
    pub(crate) alerts: RawAlerts,
    #[serde(default)]
    pub(crate) models: BTreeMap<String, RawModel>,
    pub(crate) routing: RawRouting,
    pub(crate) budgets: RawBudgets,
    #[serde(default)]
    pub(crate) steps: BTreeMap<String, RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEngine {
    pub(crate) default_model: String,
    pub(crate) default_deadline_ms: u64,
    pub(crate) max_prompt_chars: usize,
}

/// The primary provider: an endpoint with a name (serde cannot both flatten and refuse
/// unknown keys, so the endpoint's keys are spelled out twice).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) kind: crate::ProviderKind,
    pub(crate) base_url: String,
    pub(crate) api_key_env: String,
    pub(crate) request_timeout_ms: u64,
    pub(crate) connect_timeout_ms: u64,
    pub(crate) structured_outputs: Option<bool>,
    pub(crate) json_mode: Option<bool>,
    pub(crate) tools: Option<bool>,
    pub(crate) stream_usage: Option<bool>,
    pub(crate) images: Option<bool>,
    pub(crate) sampling_controls: Option<bool>,
    #[serde(default = "default_max_tokens")]
    pub(crate) default_max_tokens: u32,
}

impl RawProvider {
    pub(crate) fn into_named(self) -> (String, RawEndpoint) {
        let endpoint = RawEndpoint {
            kind: self.kind,
            base_url: self.base_url,
            api_key_env: self.api_key_env,
            request_timeout_ms: self.request_timeout_ms,
            connect_timeout_ms: self.connect_timeout_ms,
            structured_outputs: self.structured_outputs,
            json_mode: self.json_mode,
            tools: self.tools,
            stream_usage: self.stream_usage,
            images: self.images,
            sampling_controls: self.sampling_controls,
            default_max_tokens: self.default_max_tokens,
        };
        (self.name, endpoint)
    }
}

/// `[providers.NAME]`: where a provider is and what its API can do; a capability left out
/// takes its API's default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEndpoint {
    #[serde(default)]
    pub(crate) kind: crate::ProviderKind,
    pub(crate) base_url: String,
    pub(crate) api_key_env: String,
    pub(crate) request_timeout_ms: u64,
    pub(crate) connect_timeout_ms: u64,
    pub(crate) structured_outputs: Option<bool>,
    pub(crate) json_mode: Option<bool>,
    pub(crate) tools: Option<bool>,
    pub(crate) stream_usage: Option<bool>,
    pub(crate) images: Option<bool>,
    pub(crate) sampling_controls: Option<bool>,
    /// Anthropic requires `max_tokens`: sent when a call sets no output budget.
    #[serde(default = "default_max_tokens")]
    pub(crate) default_max_tokens: u32,
}

fn default_max_tokens() -> u32 {
    4096
}

fn yes() -> bool {
    true
}

fn tier_one() -> u8 {
    1
}

/// `[models."NAME"]`: a model a route can pick, where it runs and what it costs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub(crate) provider: Option<String>,
    /// The model's name at its provider; the table's name when not given.
    pub(crate) model: Option<String>,
    pub(crate) input_per_million_usd: f64,
    pub(crate) output_per_million_usd: f64,
    pub(crate) cached_input_per_million_usd: Option<f64>,
    pub(crate) cache_write_per_million_usd: Option<f64>,
    pub(crate) context_window: Option<u32>,
    #[serde(default = "tier_one")]
    pub(crate) tier: u8,
    #[serde(default = "yes")]
    pub(crate) json: bool,
    #[serde(default = "yes")]
    pub(crate) tools: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouting {
    pub(crate) seed: u64,
    pub(crate) latency_half_life_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudgets {
    pub(crate) workspace_daily_usd: f64,
    pub(crate) soft_share: f64,
    pub(crate) on_budget: String,
    #[serde(default)]
    pub(crate) workspaces: BTreeMap<String, f64>,
}

/// `[steps.NAME.route]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    #[serde(default = "ordered")]
    pub(crate) strategy: String,
    pub(crate) candidates: Vec<String>,
    pub(crate) min_tier: Option<u8>,
    #[serde(default)]
    pub(crate) weights: BTreeMap<String, f64>,
}

fn ordered() -> String {
    "ordered".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawState {
    pub(crate) redis_url: String,
    pub(crate) semantic_url: String,
    pub(crate) replicas: u32,
    pub(crate) timeout_ms: u64,
    pub(crate) retry_ms: u64,
    pub(crate) key_prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub(crate) enabled: bool,
    pub(crate) max_wait_ms: u64,
    pub(crate) workspace_requests_per_minute: u32,
    pub(crate) workspace_request_burst: u32,
    pub(crate) workspace_tokens_per_minute: u32,
    pub(crate) workspace_token_burst: u32,
    pub(crate) model_requests_per_minute: u32,
    pub(crate) model_request_burst: u32,
    pub(crate) model_tokens_per_minute: u32,
    pub(crate) model_token_burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub(crate) enabled: bool,
    pub(crate) failures_to_open: u32,
    pub(crate) open_for_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff_ms: u64,
    pub(crate) max_backoff_ms: u64,
    pub(crate) budget_ratio: f32,
    pub(crate) budget_min_per_second: u32,
    pub(crate) pause_on_retry_after: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFallback {
    pub(crate) similar_min_similarity: f32,
    pub(crate) similar_confidence: f64,
    pub(crate) rule_confidence: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouteTarget {
    pub(crate) provider: Option<String>,
    pub(crate) model: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    pub(crate) enabled: bool,
    pub(crate) ttl_secs: u64,
    pub(crate) max_entries: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSemantic {
    pub(crate) enabled: bool,
    pub(crate) threshold: f32,
    pub(crate) min_confidence: f32,
    pub(crate) ttl_secs: u64,
    pub(crate) max_entries: u64,
    pub(crate) ef_search: usize,
    pub(crate) max_text_chars: usize,
    pub(crate) model_dir: String,
    pub(crate) onnxruntime_path: String,
    pub(crate) threads: usize,
    pub(crate) snapshot_path: String,
    pub(crate) max_wrong_rate: f64,
    pub(crate) audit_rate: f64,
    pub(crate) audit_floor: f32,
    pub(crate) max_audits_in_flight: usize,
    pub(crate) answer_min_cosine: f32,
    pub(crate) answer_judge_step: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlerts {
    pub(crate) enabled: bool,
    pub(crate) webhook_url: String,
    pub(crate) z_threshold: f64,
    pub(crate) min_ratio: f64,
    pub(crate) warmup_minutes: u32,
    pub(crate) ewma_alpha: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    pub(crate) database_url: String,
    pub(crate) queue_capacity: usize,
    pub(crate) batch_size: usize,
    pub(crate) otlp_endpoint: String,
    pub(crate) otlp_queue_capacity: usize,
    pub(crate) otlp_export_delay_ms: u64,
    pub(crate) retention_days: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    #[serde(default)]
    pub(crate) kind: StepKind,
    #[serde(default)]
    pub(crate) system: String,
    #[serde(default)]
    pub(crate) prompt: String,
    #[serde(default)]
    pub(crate) output_schema: String,
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) temperature: f32,
    #[serde(default = "default_max_output_tokens")]
    pub(crate) max_output_tokens: u32,
    pub(crate) max_prompt_chars: Option<usize>,
    pub(crate) semantic_field: Option<String>,
    pub(crate) semantic_threshold: Option<f32>,
    pub(crate) semantic_min_confidence: Option<f32>,
    pub(crate) semantic_max_wrong_rate: Option<f64>,
    /// How an audit compares two answers: "fields" (the default of a structured step) or
    /// "meaning" (a chat step's only way).
    pub(crate) audit_by: Option<AuditBy>,
    /// For `audit_by = "fields"`: the reply's properties that must be equal; empty: all.
    #[serde(default)]
    pub(crate) audit_fields: Vec<String>,
    #[serde(default)]
    pub(crate) fallbacks: Vec<RawRouteTarget>,
    pub(crate) route: Option<RawRoute>,
    /// Spend per workspace per day on this step, in US dollars.
    pub(crate) daily_budget_usd: Option<f64>,
    pub(crate) fallback_answer: Option<String>,
    /// Reply property -> the input field that lists its allowed values.
    #[serde(default)]
    pub(crate) output_choices: BTreeMap<String, String>,
}

fn default_max_output_tokens() -> u32 {
    512
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AuditBy {
    Fields,
    Meaning,
}
