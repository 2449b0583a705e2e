//! `aipipe replay`: runs a call log through the engine with the recorded provider and compares
//! what happened (before) with what the engine would have done (after).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipeline_core::providers::{RecordedProvider, is_same_model};
use pipeline_core::semantic_cache::Embedder;
use pipeline_core::telemetry::{
    self, Health, PriceTable, Recorder, RecorderSettings, TelemetryStore, mean_recovery_secs, percentile,
};
use pipeline_core::{
    AuditMode, CallContext, CallOptions, Config, Engine, Source, StepKind, StepType, TokioSystemClock,
};
use serde::Serialize;
use serde_json::Value;

use aipipe::log::{BadLine, LoggedCall, read_log};

/// The figures of one side of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// Requests that reached the upstream.
    pub calls: u64,
    pub cost_usd: f64,
    /// Every call's latency, failed or not, on the replay's clock: what it waited on limits,
    /// Retry-After pauses and backoff included. The engine's own computing is apart
    /// (`engine_ms_p50` in the report).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Calls that ended without an answer, over all calls.
    pub error_rate: f64,
    /// Calls a stand-in answered (a similar request's answer or the step's rule-based answer,
    /// at a low confidence) because no model could: neither an error nor a model's answer.
    pub degraded: u64,
    pub degraded_rate: f64,
    /// Calls served from a cache, over all calls.
    pub hit_rate: f64,
    pub semantic_hits: u64,
    /// Semantic hits that served the answer of a request that means something else: counted
    /// where the log says what each call means (a generated log does), else the number the hits'
    /// calibrated confidences lead to expect (`wrong_answers_estimated`).
    pub wrong_answers_served: f64,
    pub wrong_answers_estimated: bool,
    /// Right semantic hits over all of them, where the log says what each call means.
    pub semantic_precision: Option<f64>,
    /// Mean time to recovery, in seconds ([`mean_recovery_secs`]): from the first call the
    /// upstream could not answer to the next call a model answered; `None` when no outage
    /// ended.
    pub mttr_s: Option<f64>,
}

/// One component's figures, before and after.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    pub component: String,
    pub replayed: usize,
    pub before: Figures,
    pub after: Figures,
}

/// A call the semantic cache (or a similar-answer fallback) answered with the answer to
/// another text: listed so that a person can judge whether they mean the same.
#[derive(Debug, Clone, Serialize)]
pub struct SemanticPair {
    pub trace_id: String,
    pub component: String,
    pub text: String,
    pub served_answer_of: String,
    pub similarity: f64,
    pub source: Source,
}

/// Calls and cost in one slice of the log's time, for the charts.
#[derive(Debug, Clone, Serialize)]
pub struct TimeBucket {
    /// Seconds since the first call.
    pub start_s: f64,
    pub before_calls: u64,
    pub after_calls: u64,
    pub before_cost_usd: f64,
    pub after_cost_usd: f64,
}

/// One model's share of a side: the calls that reached it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelFigures {
    /// Upstream requests it answered or failed.
    pub calls: u64,
    pub cost_usd: f64,
    pub p50_ms: f64,
    pub errors: u64,
    /// Of `calls`, answered by a model the log never asked for that call: the log's answer,
    /// at this model's price and an estimated latency (docs/log-format.md).
    pub estimated: u64,
}

/// Cost, latency and errors per model, before and after.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub before: ModelFigures,
    pub after: ModelFigures,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub log: String,
    pub db: String,
    /// Calls in the log that were replayed.
    pub replayed: usize,
    pub skipped_lines: usize,
    pub before: Figures,
    pub after: Figures,
    pub components: Vec<ComponentReport>,
    /// Per model: what a routing policy changed (`aipipe replay LOG --config ROUTES.toml`).
    pub models: Vec<ModelReport>,
    pub semantic_pairs: Vec<SemanticPair>,
    pub timeline: Vec<TimeBucket>,
    /// Where the HTML report went.
    pub html: Option<String>,
    /// Rows this run added to the telemetry database (one per replayed call, and one per
    /// audit with `--audits`).
    pub telemetry_rows: u64,
    /// With `--audits`: what the audits of semantic hits found and cost, and the cuts they
    /// left each step at.
    pub audits: Option<AuditReport>,
    /// The engine's own computing per call on this machine (the wall time of each call, which
    /// the replay's clock does not count), p50 and p99 in milliseconds.
    pub engine_ms_p50: f64,
    pub engine_ms_p99: f64,
    /// What embedding one text took on one core, over the texts this replay embedded (ahead
    /// of their calls or in them): what a call that embeds its own text waits for it.
    pub embedding_ms_per_text: Option<f64>,
    pub seconds: f64,
    pub bad_lines: Vec<BadLine>,
}

/// The audits of a replay: semantic hits asked again, answered by the call's logged answer.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub audits: u64,
    pub disagreements: u64,
    pub cost_usd: f64,
    /// Each step's (and workspace's) cut at the end, with what its audits say.
    pub cuts: Vec<pipeline_core::semantic_cache::audit::ScopeView>,
}

/// What one call came to, on one side.
struct Outcome {
    at: SystemTime,
    upstream_requests: u64,
    cost_usd: f64,
    latency: Duration,
    failed: bool,
    degraded: bool,
    cache_hit: bool,
    health: Health,
    /// For a semantic hit: whether it served the answer of a request that means the same.
    semantic: Option<Verdict>,
    /// The model its upstream requests went to, when it made any.
    model: Option<String>,
    /// Answered by a model the log never asked for this call.
    estimated: bool,
}

impl Outcome {
    /// The call as the log says it went.
    fn logged(call: &LoggedCall, cost_usd: f64) -> Self {
        let health = match call.failure_class() {
            None => Health::Up,
            Some(class) => Health::of(telemetry::Source::None, Some(class)),
        };
        Self {
            at: call.at,
            upstream_requests: 1,
            cost_usd,
            latency: call.latency,
            failed: call.outcome.is_err(),
            degraded: false,
            cache_hit: false,
            health,
            semantic: None,
            model: Some(call.model.clone()),
            estimated: false,
        }
    }
}

/// Whether a semantic hit served the answer of a request that means the same.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Right,
    Wrong,
    /// The log does not say what the two requests mean: the verifier's calibrated confidence
    /// is the probability that it is right.
    Unknown {
        confidence: f64,
    },
}

/// What each call's text means, where the log says: the text the semantic cache compares ->
/// its meaning.
struct Meanings(HashMap<String, String>);

impl Meanings {
    fn of(config: &Config, calls: &[LoggedCall]) -> Self {
        let mut meanings = HashMap::new();
        for call in calls {
            if let (Some(meaning), Some(text)) = (&call.meaning, semantic_text(config, call)) {
                meanings.entry(text).or_insert_with(|| meaning.clone());
            }
        }
        Self(meanings)
    }

    /// By the log's meanings where it has them; else, for a step whose answers compare by
    /// their fields, by the call's own logged answer (what the model did answer it: the truth
    /// an audit would have found); else unknown.
    fn verdict(
        &self,
        config: &Config,
        call: &LoggedCall,
        matched: Option<&str>,
        served: &Value,
        confidence: f64,
    ) -> Verdict {
        let known = |text: Option<String>| text.and_then(|text| self.0.get(&text));
        match (known(semantic_text(config, call)), known(matched.map(str::to_owned))) {
            (Some(asked), Some(served)) if asked == served => Verdict::Right,
            (Some(_), Some(_)) => Verdict::Wrong,
            _ => logged_truth(config, call, served).unwrap_or(Verdict::Unknown { confidence }),
        }
    }
}

/// A structured step's semantic hit judged against the call's own logged answer, by the step's
/// `audit_fields` (the rule an audit applies). `None` when the step compares by meaning or the
/// log holds no answer in the step's shape.
fn logged_truth(config: &Config, call: &LoggedCall, served: &Value) -> Option<Verdict> {
    let spec = config.step(&call.step)?;
    let logged: Value = serde_json::from_str(call.outcome.as_ref().ok()?).ok()?;
    let agree = spec.answer_match.fields_agree(served, &logged)?;
    Some(if agree { Verdict::Right } else { Verdict::Wrong })
}

/// What answers the replayed calls.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// The log: its answers, errors and latencies, on the log's clock.
    Recorded,
    /// A live OpenAI-compatible endpoint (key from `provider.api_key_env`), on the wall clock.
    Live { base_url: String },
}

/// Replays a log. A recorded replay runs the engine on a runtime of its own whose clock is
/// paused and moved to each call's logged time (`tokio::time::pause`): rate limits, breakers,
/// Retry-After pauses and deadlines, which all read tokio's clock, see the log's times, and a
/// wait costs no real time. Telemetry is written on `runtime`, whose clock is real: the
/// database's own timeouts and retries must not jump ahead with the log.
pub fn run(
    log_path: &Path,
    db_path: &Path,
    config: Config,
    upstream: Upstream,
    audits: bool,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<ReplayReport> {
    let engine_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(matches!(upstream, Upstream::Recorded))
        .build()
        .context("cannot start the replay's runtime")?;
    engine_runtime.block_on(replay(log_path, db_path, config, upstream, audits, runtime.handle().clone()))
}

async fn replay(
    log_path: &Path,
    db_path: &Path,
    mut config: Config,
    upstream: Upstream,
    audits: bool,
    telemetry: tokio::runtime::Handle,
) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    match &upstream {
        Upstream::Recorded => {
            // The log holds one answer per call: what a retry would have got is unknown, so
            // each logged call is replayed as one attempt.
            config.resilience.retry.max_attempts = 1;
        }
        // Live calls take real time: every guard works as in production.
        Upstream::Live { base_url } => config.provider.base_url = base_url.clone(),
    }
    let file = std::fs::File::open(log_path)
        .with_context(|| format!("cannot open the log `{}`: check the path", log_path.display()))?;
    let (calls, bad_lines) = read_log(std::io::BufReader::new(file))
        .with_context(|| format!("cannot read the log `{}`", log_path.display()))?;
    for bad in &bad_lines {
        eprintln!("{}:{}: skipped: {}", log_path.display(), bad.line, bad.reason);
    }

    let db = db_path.to_string_lossy().into_owned();
    let store = {
        let db = db.clone();
        telemetry.spawn(async move { TelemetryStore::connect(&db).await }).await??
    };
    // Run again onto the same database (after an interruption, or to compare configs), a
    // replay replaces the rows of its calls rather than adding a second copy.
    let replaced = {
        let (store, trace_ids) = (store.clone(), calls.iter().map(|call| call.trace_id.clone()).collect::<Vec<_>>());
        telemetry.spawn(async move { store.delete_traces(&trace_ids).await }).await??
    };
    if replaced > 0 {
        eprintln!("{}: replaced {replaced} rows of an earlier replay of these calls", db_path.display());
    }
    let rows_before = count_rows(&telemetry, &store).await?;
    let recorder = {
        let _on_telemetry_runtime = telemetry.enter();
        Recorder::spawn(
            store.clone(),
            RecorderSettings {
                queue_capacity: config.telemetry.queue_capacity,
                batch_size: config.telemetry.batch_size,
            },
        )
    };
    let recorded = matches!(upstream, Upstream::Recorded).then(|| {
        let provider = RecordedProvider::new(calls.iter().map(LoggedCall::recorded));
        let clock = Arc::new(TokioSystemClock::starting_at(calls.first().map_or_else(SystemTime::now, |call| call.at)));
        (provider, clock)
    });
    let prices = config.prices.clone();
    // The replay holds the model itself, to say what embedding cost.
    let embedder = match config.semantic.enabled {
        true => Some(Arc::new(Embedder::load(&config.semantic.model, config.semantic.threads)?)),
        false => None,
    };
    let provider_names: Vec<String> = config.providers.keys().cloned().collect();
    // Paid audits only when asked for, each in line (the replay's calls stay in the log's
    // order) under the audited call's trace id, which the recorded provider answers with that
    // call's logged answer: what the model said is the truth the hit is held to. The free
    // ones (a miss's logged answer against its nearest candidate's) move the cuts either way.
    let mode = if audits { AuditMode::Inline } else { AuditMode::Off };
    let mut builder = Engine::builder(config).recorder(recorder.clone()).audits(mode);
    if let Some(embedder) = &embedder {
        builder = builder.embedder(embedder.clone());
    }
    if let Some((provider, clock)) = &recorded {
        // Every provider a route can pick answers from the log too: a replay reaches no network.
        builder = builder.provider("recorded", provider.clone()).clock(clock.clone());
        for name in provider_names {
            builder = builder.provider(name, provider.clone());
        }
    }
    let engine = builder.build().await?;

    let mut before = Vec::with_capacity(calls.len());
    let mut after = Vec::with_capacity(calls.len());
    let mut engine_ms = Vec::with_capacity(calls.len());
    let mut semantic_pairs = Vec::new();
    let meanings = Meanings::of(engine.config(), &calls);
    let progress = progress_bar(calls.len());
    let embed_ahead = EmbedAhead::start(&engine, &calls);
    for (index, call) in calls.iter().enumerate() {
        progress.inc(1);
        embed_ahead.reached(index);
        if let Some((_, clock)) = &recorded {
            // The paused clock auto-advances to this call's time at once. A call that waited
            // (a limit, a pause) may have taken the clock past the next one's time: that call
            // then starts late, as it would have queued behind the wait.
            tokio::time::sleep_until(clock.instant_at(call.at)).await;
        }
        let logged_cost = cost(&prices, &call.model, call);
        before.push(Outcome::logged(call, logged_cost));
        let context =
            CallContext::new(call.workspace.clone(), call.component.clone()).with_trace_id(call.trace_id.clone());
        // The replay's clock (waits) and the machine's (the engine's own computing) apart.
        let (replay_started, computing_started) = (tokio::time::Instant::now(), Instant::now());
        let result = engine.execute(call.step.clone(), call.input.clone(), context, CallOptions::default()).await;
        engine_ms.push(computing_started.elapsed().as_secs_f64() * 1000.0);
        // A recorded provider answers at once: what each attempt took upstream is the logged
        // latency, added to what the call waited. A live call took what the clock says.
        let upstream_time = |attempts: u32| match &recorded {
            Some(_) => call.latency * attempts,
            None => Duration::ZERO,
        };
        if let Ok(result) = &result
            && let Some(matched) = &result.similar_to
        {
            semantic_pairs.push(SemanticPair {
                trace_id: call.trace_id.clone(),
                component: call.component.clone(),
                text: semantic_text(engine.config(), call).unwrap_or_default(),
                served_answer_of: matched.text.clone(),
                similarity: f64::from(matched.similarity),
                source: result.source,
            });
        }
        after.push(match result {
            Ok(result) => {
                let stand_in = matches!(result.source, Source::FallbackSimilar | Source::FallbackRule);
                let semantic = (result.source == Source::SemanticCache).then(|| {
                    let matched = result.similar_to.as_ref().map(|matched| matched.text.as_str());
                    meanings.verdict(engine.config(), call, matched, &result.output, result.confidence)
                });
                Outcome {
                    at: call.at,
                    upstream_requests: u64::from(result.attempts),
                    cost_usd: result.cost_usd,
                    // A stand-in's attempts failed: their upstream time is not in its latency.
                    latency: result.latency + if stand_in { upstream_time(result.attempts) } else { Duration::ZERO },
                    failed: false,
                    degraded: stand_in,
                    cache_hit: result.source.is_cache(),
                    health: Health::of(result.source.into(), result.degraded_by),
                    semantic,
                    // A stand-in's attempts went to the model the route asked.
                    model: match (&recorded, stand_in) {
                        (Some((provider, _)), true) => provider.model_asked(&call.trace_id),
                        _ => (result.attempts > 0).then(|| result.model.clone()),
                    },
                    estimated: recorded.is_some()
                        && result.attempts > 0
                        && !stand_in
                        && !is_same_model(&result.model, &call.model),
                }
            }
            // A recorded failure that reached the upstream costs what it did in the log; one
            // stopped before it (bad input, unknown step) costs nothing; a live failure costs
            // nothing (failed requests are not billed).
            Err(err) => Outcome {
                at: call.at,
                upstream_requests: u64::from(err.attempts()),
                cost_usd: if recorded.is_some() && err.attempts() > 0 { logged_cost } else { 0.0 },
                latency: replay_started.elapsed() + upstream_time(err.attempts()),
                failed: true,
                degraded: false,
                cache_hit: false,
                health: Health::of(telemetry::Source::None, Some(err.class())),
                semantic: None,
                model: recorded.as_ref().and_then(|(provider, _)| provider.model_asked(&call.trace_id)),
                estimated: false,
            },
        });
    }
    progress.finish_and_clear();
    engine.flush().await?;
    let lost = recorder.dropped();
    if lost > 0 {
        anyhow::bail!("{lost} telemetry records were lost writing to `{db}`; raise telemetry.queue_capacity");
    }
    let telemetry_rows = u64::try_from(count_rows(&telemetry, &store).await? - rows_before).unwrap_or(0);
    let audit_report = match audits {
        true => {
            let window = (
                calls.iter().map(|call| unix_ms(call.at)).min().unwrap_or(0),
                calls.iter().map(|call| unix_ms(call.at)).max().unwrap_or(0) + 3_600_000,
            );
            let store = store.clone();
            let figures = telemetry.spawn(async move { store.report(window.0, window.1).await }).await??.overall;
            Some(AuditReport {
                audits: figures.audits,
                disagreements: figures.audit_disagreements,
                cost_usd: figures.audit_cost_usd,
                cuts: engine.semantic_cuts(),
            })
        }
        false => None,
    };
    if let Some((provider, _)) = recorded.as_ref().filter(|_| !audits) {
        debug_assert_eq!(provider.requests_served(), after.iter().map(|o| o.upstream_requests).sum::<u64>());
    }
    telemetry.spawn(async move { store.close().await }).await?;
    engine_ms.sort_by(f64::total_cmp);

    let mut by_component: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, call) in calls.iter().enumerate() {
        by_component.entry(&call.component).or_default().push(index);
    }
    let components = by_component
        .into_iter()
        .map(|(component, indexes)| ComponentReport {
            component: component.to_owned(),
            replayed: indexes.len(),
            before: figures(indexes.iter().map(|&index| &before[index])),
            after: figures(indexes.iter().map(|&index| &after[index])),
        })
        .collect();
    Ok(ReplayReport {
        log: log_path.display().to_string(),
        db,
        replayed: calls.len(),
        skipped_lines: bad_lines.len(),
        before: figures(before.iter()),
        after: figures(after.iter()),
        components,
        models: by_model(&before, &after),
        semantic_pairs,
        timeline: timeline(&before, &after),
        html: None,
        telemetry_rows,
        audits: audit_report,
        engine_ms_p50: percentile(&engine_ms, 0.50),
        engine_ms_p99: percentile(&engine_ms, 0.99),
        embedding_ms_per_text: embedder
            .and_then(|embedder| embedder.work().per_text())
            .map(|per_text| per_text.as_secs_f64() * 1000.0),
        seconds: started.elapsed().as_secs_f64(),
        bad_lines,
    })
}

async fn count_rows(telemetry: &tokio::runtime::Handle, store: &TelemetryStore) -> anyhow::Result<i64> {
    let store = store.clone();
    Ok(telemetry.spawn(async move { store.count().await }).await??)
}

fn cost(prices: &PriceTable, model: &str, call: &LoggedCall) -> f64 {
    prices.cost(model, u64::from(call.usage.input_tokens), u64::from(call.usage.output_tokens)).unwrap_or(0.0)
}

/// Embeds the semantic texts of the calls a little ahead of the replay, on every embedding
/// session, while the replay runs the calls in order: embedding is most of a replay's work, and
/// the calls themselves must stay sequential to keep the log's order and clock.
struct EmbedAhead {
    /// The index of the call the replay has reached; `usize::MAX` tells the thread to stop.
    reached: Arc<AtomicUsize>,
}

impl EmbedAhead {
    /// Calls per batch handed to the embedder.
    const CHUNK: usize = 256;
    /// How far ahead it may run: the vectors wait among the embedder's recent ones, which
    /// must not forget them before their calls come.
    const MAX_AHEAD: usize = 4 * Self::CHUNK;

    fn start(engine: &Engine, calls: &[LoggedCall]) -> Self {
        let reached = Arc::new(AtomicUsize::new(0));
        if !engine.config().semantic.enabled {
            return Self { reached };
        }
        let requests: Vec<(StepType, serde_json::Value)> =
            calls.iter().map(|call| (call.step.clone(), call.input.clone())).collect();
        let (engine, position) = (engine.clone(), reached.clone());
        std::thread::spawn(move || {
            for (index, chunk) in requests.chunks(Self::CHUNK).enumerate() {
                loop {
                    match position.load(Ordering::Relaxed) {
                        usize::MAX => return,
                        at if index * Self::CHUNK <= at + Self::MAX_AHEAD => break,
                        _ => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                if let Err(error) = engine.embed_ahead(chunk.iter().map(|(step, input)| (step, input))) {
                    tracing::warn!(%error, "embedding ahead stopped; calls embed their own texts");
                    return;
                }
            }
        });
        Self { reached }
    }

    fn reached(&self, index: usize) {
        self.reached.store(index, Ordering::Relaxed);
    }
}

impl Drop for EmbedAhead {
    fn drop(&mut self) {
        self.reached.store(usize::MAX, Ordering::Relaxed);
    }
}

/// A bar on stderr for replays long enough to wait for; nothing when stderr is not a terminal.
fn progress_bar(calls: usize) -> ProgressBar {
    if calls < 1_000 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(calls as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("replaying {bar:40} {pos}/{len} calls, {per_sec}, eta {eta}") {
        bar.set_style(style);
    }
    bar
}

/// The text the semantic cache compared for this call: the step's semantic field, or a chat
/// step's last user message.
fn semantic_text(config: &Config, call: &LoggedCall) -> Option<String> {
    let spec = config.step(&call.step)?;
    let text = match spec.kind {
        StepKind::Chat => call.input["messages"]
            .as_array()?
            .iter()
            .rev()
            .find(|message| message["role"] == "user")
            .map(|message| &message["content"])?,
        StepKind::Structured => call.input.get(spec.semantic_field.as_deref()?)?,
    };
    text.as_str().map(str::to_owned)
}

/// At most this many buckets in the charts.
const MAX_BUCKETS: u64 = 60;

fn timeline(before: &[Outcome], after: &[Outcome]) -> Vec<TimeBucket> {
    let (Some(first), Some(last)) = (before.first(), before.last()) else { return Vec::new() };
    let span = last.at.duration_since(first.at).unwrap_or_default().as_secs_f64();
    // Round bucket widths (a minute, five, a quarter hour, an hour, ...) keep the axis readable.
    let width = [1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 86_400.0]
        .into_iter()
        .find(|width| span / width < MAX_BUCKETS as f64)
        .unwrap_or(span / MAX_BUCKETS as f64)
        .max(1.0);
    let count = (span / width).floor() as usize + 1;
    let mut buckets: Vec<TimeBucket> = (0..count)
        .map(|index| TimeBucket {
            start_s: index as f64 * width,
            before_calls: 0,
            after_calls: 0,
            before_cost_usd: 0.0,
            after_cost_usd: 0.0,
        })
        .collect();
    for (old, new) in before.iter().zip(after) {
        let offset = old.at.duration_since(first.at).unwrap_or_default().as_secs_f64();
        if let Some(bucket) = buckets.get_mut(((offset / width).floor() as usize).min(count - 1)) {
            bucket.before_calls += old.upstream_requests;
            bucket.after_calls += new.upstream_requests;
            bucket.before_cost_usd += old.cost_usd;
            bucket.after_cost_usd += new.cost_usd;
        }
    }
    buckets
}

fn by_model(before: &[Outcome], after: &[Outcome]) -> Vec<ModelReport> {
    let mut models: BTreeMap<String, (Vec<&Outcome>, Vec<&Outcome>)> = BTreeMap::new();
    for (side, outcomes) in [(0, before), (1, after)] {
        for outcome in outcomes {
            if let Some(model) = &outcome.model {
                let entry = models.entry(model.clone()).or_default();
                if side == 0 { entry.0.push(outcome) } else { entry.1.push(outcome) }
            }
        }
    }
    let figures = |outcomes: &[&Outcome]| {
        let mut latencies: Vec<f64> = outcomes.iter().map(|o| o.latency.as_secs_f64() * 1000.0).collect();
        latencies.sort_by(f64::total_cmp);
        ModelFigures {
            calls: outcomes.iter().map(|o| o.upstream_requests).sum(),
            // Not `sum`: an empty float sum is -0.0, which would print as such.
            cost_usd: outcomes.iter().map(|o| o.cost_usd).fold(0.0, |total, cost| total + cost),
            p50_ms: percentile(&latencies, 0.50),
            errors: outcomes.iter().filter(|o| o.failed).count() as u64,
            estimated: outcomes.iter().filter(|o| o.estimated).map(|o| o.upstream_requests).sum(),
        }
    };
    models
        .into_iter()
        .map(|(model, (before, after))| ModelReport { model, before: figures(&before), after: figures(&after) })
        .collect()
}

fn figures<'a>(outcomes: impl Iterator<Item = &'a Outcome> + Clone) -> Figures {
    let total = outcomes.clone().count();
    let rate = |count: usize| if total == 0 { 0.0 } else { count as f64 / total as f64 };
    let mut latencies: Vec<f64> = outcomes.clone().map(|o| o.latency.as_secs_f64() * 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    let verdicts: Vec<Verdict> = outcomes.clone().filter_map(|o| o.semantic).collect();
    let known = verdicts.iter().all(|verdict| !matches!(verdict, Verdict::Unknown { .. }));
    let wrong = verdicts
        .iter()
        .map(|verdict| match verdict {
            Verdict::Right => 0.0,
            Verdict::Wrong => 1.0,
            Verdict::Unknown { confidence } => 1.0 - confidence,
        })
        // Not `sum`: an empty float sum is -0.0, which would print as such.
        .fold(0.0, |total, wrong| total + wrong);
    let degraded = outcomes.clone().filter(|o| o.degraded).count();
    Figures {
        calls: outcomes.clone().map(|o| o.upstream_requests).sum(),
        cost_usd: outcomes.clone().map(|o| o.cost_usd).sum(),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        error_rate: rate(outcomes.clone().filter(|o| o.failed).count()),
        degraded: degraded as u64,
        degraded_rate: rate(degraded),
        hit_rate: rate(outcomes.clone().filter(|o| o.cache_hit).count()),
        semantic_hits: verdicts.len() as u64,
        wrong_answers_served: wrong,
        wrong_answers_estimated: !known,
        semantic_precision: (known && !verdicts.is_empty()).then(|| 1.0 - wrong / verdicts.len() as f64),
        mttr_s: mean_recovery_secs(outcomes.map(|o| (unix_ms(o.at), o.health))),
    }
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}
