//! `aipipe replay`: runs a call log through the engine with the recorded provider and compares
//! what happened (before) with what the engine would have done (after).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipeline_core::providers::RecordedProvider;
use pipeline_core::telemetry::{PriceTable, Recorder, RecorderSettings, TelemetryStore, percentile};
use pipeline_core::{CallContext, CallOptions, Config, Engine, Source, StepKind, StepType, TokioSystemClock};
use serde::Serialize;

use crate::log::{BadLine, LoggedCall, read_log};

/// The figures of one side of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// Requests that reached the upstream.
    pub calls: u64,
    pub cost_usd: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Calls that ended without an answer, over all calls.
    pub error_rate: f64,
    /// Calls served from a cache, over all calls.
    pub hit_rate: f64,
    /// Mean time from the first call of a run of failed calls to the next call that got an
    /// answer, in seconds; `None` when no call failed (or none recovered).
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
    pub semantic_pairs: Vec<SemanticPair>,
    pub timeline: Vec<TimeBucket>,
    /// Where the HTML report went.
    pub html: Option<String>,
    /// Rows this run added to the telemetry database (one per replayed call).
    pub telemetry_rows: u64,
    pub seconds: f64,
    pub bad_lines: Vec<BadLine>,
}

/// What one call came to, on one side.
struct Outcome {
    at: SystemTime,
    upstream_requests: u64,
    cost_usd: f64,
    latency: Duration,
    failed: bool,
    cache_hit: bool,
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
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<ReplayReport> {
    let engine_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(matches!(upstream, Upstream::Recorded))
        .build()
        .context("cannot start the replay's runtime")?;
    engine_runtime.block_on(replay(log_path, db_path, config, upstream, runtime.handle().clone()))
}

async fn replay(
    log_path: &Path,
    db_path: &Path,
    mut config: Config,
    upstream: Upstream,
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
    let mut builder = Engine::builder(config).recorder(recorder.clone());
    if let Some((provider, clock)) = &recorded {
        builder = builder.provider("recorded", provider.clone()).clock(clock.clone());
    }
    let engine = builder.build().await?;

    let mut before = Vec::with_capacity(calls.len());
    let mut after = Vec::with_capacity(calls.len());
    let mut semantic_pairs = Vec::new();
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
        before.push(Outcome {
            at: call.at,
            upstream_requests: 1,
            cost_usd: logged_cost,
            latency: call.latency,
            failed: call.outcome.is_err(),
            cache_hit: false,
        });
        let context =
            CallContext::new(call.workspace.clone(), call.component.clone()).with_trace_id(call.trace_id.clone());
        let call_started = Instant::now();
        let result = engine.execute(call.step.clone(), call.input.clone(), context, CallOptions::default()).await;
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
            Ok(result) => Outcome {
                at: call.at,
                upstream_requests: u64::from(result.attempts),
                cost_usd: result.cost_usd,
                latency: result.latency,
                failed: false,
                cache_hit: result.source.is_cache(),
            },
            // A recorded failure that reached the upstream costs and lasts what it did in the
            // log; one stopped before it (bad input, unknown step) costs nothing. A live failure
            // lasts what it took and costs nothing (failed requests are not billed).
            Err(err) => {
                let reached_upstream = err.attempts() > 0;
                let (cost_usd, latency) = match (&recorded, reached_upstream) {
                    (Some(_), true) => (logged_cost, call.latency),
                    (Some(_), false) => (0.0, Duration::ZERO),
                    (None, _) => (0.0, call_started.elapsed()),
                };
                Outcome {
                    at: call.at,
                    upstream_requests: u64::from(err.attempts()),
                    cost_usd,
                    latency,
                    failed: true,
                    cache_hit: false,
                }
            }
        });
    }
    progress.finish_and_clear();
    engine.flush().await?;
    let lost = recorder.dropped();
    if lost > 0 {
        anyhow::bail!("{lost} telemetry records were lost writing to `{db}`; raise telemetry.queue_capacity");
    }
    let telemetry_rows = u64::try_from(count_rows(&telemetry, &store).await? - rows_before).unwrap_or(0);
    if let Some((provider, _)) = &recorded {
        debug_assert_eq!(provider.requests_served(), after.iter().map(|o| o.upstream_requests).sum::<u64>());
    }
    telemetry.spawn(async move { store.close().await }).await?;

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
        semantic_pairs,
        timeline: timeline(&before, &after),
        html: None,
        telemetry_rows,
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

/// Mean time to recovery: from the first failure of a run of failed calls to the next call
/// that got an answer, over every such run that ended.
fn mttr<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> Option<f64> {
    let mut failing_since = None;
    let mut recoveries = Vec::new();
    for outcome in outcomes {
        match (outcome.failed, failing_since) {
            (true, None) => failing_since = Some(outcome.at),
            (false, Some(since)) => {
                recoveries.push(outcome.at.duration_since(since).unwrap_or_default().as_secs_f64());
                failing_since = None;
            }
            _ => {}
        }
    }
    (!recoveries.is_empty()).then(|| recoveries.iter().sum::<f64>() / recoveries.len() as f64)
}

fn figures<'a>(outcomes: impl Iterator<Item = &'a Outcome> + Clone) -> Figures {
    let total = outcomes.clone().count();
    let rate = |count: usize| if total == 0 { 0.0 } else { count as f64 / total as f64 };
    let mut latencies: Vec<f64> = outcomes.clone().map(|o| o.latency.as_secs_f64() * 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    Figures {
        calls: outcomes.clone().map(|o| o.upstream_requests).sum(),
        cost_usd: outcomes.clone().map(|o| o.cost_usd).sum(),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        error_rate: rate(outcomes.clone().filter(|o| o.failed).count()),
        hit_rate: rate(outcomes.clone().filter(|o| o.cache_hit).count()),
        mttr_s: mttr(outcomes),
    }
}
