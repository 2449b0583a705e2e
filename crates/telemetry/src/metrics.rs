use std::sync::Arc;

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::{CallRecord, CallStatus};

/// Distinct models the metrics label before the rest count as `other`: a model name can come
/// from a caller (the request's `model`), and every label value is a series Prometheus keeps.
const MAX_MODEL_LABELS: usize = 64;

/// Seconds; calls range from a microsecond cache hit to a 30 s deadline.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Prometheus metrics of the calls, fed from the same [`CallRecord`]s as the database, in
/// one registry per engine (no process-global state).
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    requests: IntCounterVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
    saved_cost: CounterVec,
    saved_tokens: IntCounterVec,
    duration: HistogramVec,
    time_to_first_token: HistogramVec,
    rate_limit_wait: HistogramVec,
    breaker_state: IntGaugeVec,
    shared_state_up: IntGaugeVec,
    cache_entries: IntGaugeVec,
    spans_dropped: IntCounter,
    dropped: IntCounter,
    unauthenticated: IntCounter,
    alerts: IntCounterVec,
    route_decisions: IntCounterVec,
    audits: IntCounterVec,
    audit_cost: CounterVec,
    wrong_rate: GaugeVec,
    semantic_cut: GaugeVec,
    models: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::build().unwrap_or_else(|err| unreachable!("metric definitions are static and valid: {err}"))
    }

    fn build() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let requests = counter(
            "aipipe_requests_total",
            "AI calls by step, model, what served them and outcome.",
            &["step", "model", "source", "status"],
        )?;
        let tokens =
            counter("aipipe_tokens_total", "Tokens sent and received upstream.", &["step", "model", "direction"])?;
        let cache_hits = counter("aipipe_cache_hits_total", "Calls answered by a cache.", &["step", "cache"])?;
        let cache_misses = counter("aipipe_cache_misses_total", "Calls that no cache could answer.", &["step"])?;
        let saved_tokens = counter(
            "aipipe_cache_saved_tokens_total",
            "Tokens not spent because a cache or an identical call in flight answered.",
            &["step"],
        )?;
        let route_decisions = counter(
            "aipipe_route_decisions_total",
            "Routing decisions per step and candidate model: `chosen`, or the reason it was left out.",
            &["step", "model", "outcome"],
        )?;
        let alerts = counter("aipipe_alerts_total", "Anomaly alerts raised, by step and metric.", &["step", "metric"])?;
        let audits = counter(
            "aipipe_semantic_audits_total",
            "Semantic hits (`paid`: asked of the model again) and near misses (`free`: the model answered them \
             anyway) whose answer was compared with the model's, by step and result (agree, disagree).",
            &["step", "result", "kind"],
        )?;
        let audit_cost = CounterVec::new(
            Opts::new("aipipe_semantic_audit_cost_usd_total", "What the paid audits of semantic hits cost."),
            &["step"],
        )?;
        registry.register(Box::new(audit_cost.clone()))?;
        let wrong_rate = GaugeVec::new(
            Opts::new(
                "aipipe_semantic_wrong_rate",
                "Share of a step's semantic hits, at its current cut, whose answer the model would not have given: \
                 the audits' estimate and the upper end of its 95% interval.",
            ),
            &["step", "bound"],
        )?;
        registry.register(Box::new(wrong_rate.clone()))?;
        let semantic_cut = GaugeVec::new(
            Opts::new(
                "aipipe_semantic_cut",
                "The score (verifier confidence, or cosine) at or above which a step serves semantic hits, as its \
                 audits set it; +Inf while it serves none.",
            ),
            &["step"],
        )?;
        registry.register(Box::new(semantic_cut.clone()))?;
        let cost =
            CounterVec::new(Opts::new("aipipe_cost_usd_total", "Estimated spend in US dollars."), &["step", "model"])?;
        registry.register(Box::new(cost.clone()))?;
        let saved_cost = CounterVec::new(
            Opts::new("aipipe_cache_saved_cost_usd_total", "What the answers served without an upstream call cost."),
            &["step"],
        )?;
        registry.register(Box::new(saved_cost.clone()))?;
        let duration = HistogramVec::new(
            HistogramOpts::new("aipipe_request_duration_seconds", "Call latency as the caller saw it.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["step", "source"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "aipipe_time_to_first_token_seconds",
                "Streamed calls: from the call's start to the first piece of the answer sent.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["step", "source"],
        )?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        let rate_limit_wait = HistogramVec::new(
            HistogramOpts::new(
                "aipipe_rate_limit_wait_seconds",
                "Time calls waited on rate limits and Retry-After pauses.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["step"],
        )?;
        registry.register(Box::new(rate_limit_wait.clone()))?;
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "aipipe_breaker_state",
                "Circuit breaker per provider and model after its latest call: 0 closed, 1 half-open, 2 open.",
            ),
            &["provider", "model"],
        )?;
        registry.register(Box::new(breaker_state.clone()))?;
        let shared_state_up = IntGaugeVec::new(
            Opts::new(
                "aipipe_shared_state_up",
                "Whether a shared part (redis, semantic_store) answers: 0 while this replica falls back on its own.",
            ),
            &["part"],
        )?;
        registry.register(Box::new(shared_state_up.clone()))?;
        let cache_entries = IntGaugeVec::new(
            Opts::new(
                "aipipe_cache_entries",
                "Answers this replica's caches hold (semantic: its own and those followed from the other replicas).",
            ),
            &["cache"],
        )?;
        registry.register(Box::new(cache_entries.clone()))?;
        let spans_dropped = IntCounter::new(
            "aipipe_trace_spans_dropped_total",
            "Finished spans not exported over OTLP: the export queue was full or the collector failed.",
        )?;
        registry.register(Box::new(spans_dropped.clone()))?;
        let dropped = IntCounter::new(
            "aipipe_telemetry_rows_dropped_total",
            "Telemetry rows lost to a full queue or a failed write.",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let unauthenticated = IntCounter::new(
            "aipipe_requests_unauthenticated_total",
            "Requests refused for a missing or unknown key: counted here, never written as rows (a flood of bad keys \
             must not crowd out the rows of real calls).",
        )?;
        registry.register(Box::new(unauthenticated.clone()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                tokens,
                cost,
                cache_hits,
                cache_misses,
                saved_cost,
                saved_tokens,
                duration,
                time_to_first_token,
                rate_limit_wait,
                breaker_state,
                shared_state_up,
                cache_entries,
                spans_dropped,
                dropped,
                unauthenticated,
                alerts,
                route_decisions,
                audits,
                audit_cost,
                wrong_rate,
                semantic_cut,
                models: std::sync::Mutex::default(),
            }),
        })
    }

    /// The label of a model: its name while fewer than [`MAX_MODEL_LABELS`] have been seen,
    /// else `other`.
    fn model_label(&self, model: &str) -> String {
        let mut models = self.inner.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if models.contains(model) || (models.len() < MAX_MODEL_LABELS && models.insert(model.to_owned())) {
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// Counts one call. The step label is the record's (the engine records configured names
    /// only); the model label is bounded by [`MAX_MODEL_LABELS`].
    pub fn observe(&self, record: &CallRecord) {
        let inner = &self.inner;
        let step = record.step.as_str();
        let model = self.model_label(&record.model);
        let model = model.as_str();
        let source = record.source.label();
        inner.requests.with_label_values(&[step, model, source, record.status.label()]).inc();
        let tokens = |direction: &str, count: i64| {
            inner.tokens.with_label_values(&[step, model, direction]).inc_by(count.max(0) as u64);
        };
        tokens("input", record.input_tokens);
        tokens("output", record.output_tokens);
        inner.cost.with_label_values(&[step, model]).inc_by(record.cost_usd.max(0.0));
        if record.audit.is_some() {
            // An audit is the engine's own call, not a caller's: no miss, and its cost is the
            // price of knowing, counted apart.
            inner.audit_cost.with_label_values(&[step]).inc_by(record.cost_usd.max(0.0));
        } else if record.source.is_cache() {
            inner.cache_hits.with_label_values(&[step, source]).inc();
        } else {
            // A call refused as invalid never asked a cache: it is no miss.
            let refused =
                record.status == CallStatus::Error && record.error_class.is_some_and(|class| class.is_invalid_call());
            if !refused {
                inner.cache_misses.with_label_values(&[step]).inc();
            }
        }
        if record.saved_cost_usd > 0.0 {
            inner.saved_cost.with_label_values(&[step]).inc_by(record.saved_cost_usd);
        }
        if record.saved_tokens > 0 {
            inner.saved_tokens.with_label_values(&[step]).inc_by(record.saved_tokens as u64);
        }
        inner.duration.with_label_values(&[step, source]).observe(record.latency_ms / 1000.0);
        if let Some(ttft_ms) = record.ttft_ms {
            inner.time_to_first_token.with_label_values(&[step, source]).observe(ttft_ms / 1000.0);
        }
        if record.rate_limit_wait_ms > 0.0 {
            inner.rate_limit_wait.with_label_values(&[step]).observe(record.rate_limit_wait_ms / 1000.0);
        }
        if let Some(state) = record.breaker_state {
            inner.breaker_state.with_label_values(&[&record.provider, model]).set(state.gauge());
        }
        if let Some(route) = &record.route {
            let chosen = route.chosen.iter().map(|name| (name, "chosen"));
            let excluded = route.excluded.iter().map(|(name, reason)| (name, reason.label()));
            for (candidate, outcome) in chosen.chain(excluded) {
                let candidate = self.model_label(candidate);
                inner.route_decisions.with_label_values(&[step, &candidate, outcome]).inc();
            }
        }
    }

    /// `part` is `redis` or `semantic_store`: a fixed set.
    pub fn set_shared_state_up(&self, part: &str, up: bool) {
        self.inner.shared_state_up.with_label_values(&[part]).set(i64::from(up));
    }

    /// `cache` is `exact` or `semantic`.
    pub fn set_cache_entries(&self, cache: &str, entries: u64) {
        self.inner.cache_entries.with_label_values(&[cache]).set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// The process's count of spans not exported so far (it only grows).
    pub fn set_trace_spans_dropped(&self, total: u64) {
        let counted = self.inner.spans_dropped.get();
        self.inner.spans_dropped.inc_by(total.saturating_sub(counted));
    }

    pub fn count_unauthenticated(&self) {
        self.inner.unauthenticated.inc();
    }

    pub fn count_dropped(&self, rows: u64) {
        self.inner.dropped.inc_by(rows);
    }

    /// `result` is an [`crate::Audit`] label; `kind` is `paid` or `free`.
    pub fn count_audit(&self, step: &str, result: crate::Audit, kind: &str) {
        self.inner.audits.with_label_values(&[step, result.label(), kind]).inc();
    }

    /// A step's cut and the wrong rate its audits estimate there.
    pub fn set_semantic_cut(&self, step: &str, cut: f64, wrong_rate: f64, upper: f64) {
        self.inner.semantic_cut.with_label_values(&[step]).set(cut);
        self.inner.wrong_rate.with_label_values(&[step, "estimate"]).set(wrong_rate);
        self.inner.wrong_rate.with_label_values(&[step, "upper"]).set(upper);
    }

    pub fn count_alert(&self, step: &str, metric: &str) {
        self.inner.alerts.with_label_values(&[step, metric]).inc();
    }

    /// Everything, in the Prometheus text exposition format (served with
    /// [`Metrics::CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut text) {
            tracing::error!(error = %err, "metrics could not be encoded");
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The media type of [`Metrics::render`]'s text.
    pub const CONTENT_TYPE: &'static str = prometheus::TEXT_FORMAT;
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
