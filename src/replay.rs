//! `aipipe replay`: runs a call log through the engine with the recorded provider and compares
//! what happened (before) with what the engine would have done (after).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pipeline_core::providers::RecordedProvider;
use pipeline_core::telemetry::{PriceTable, Recorder, RecorderSettings, TelemetryStore};
use pipeline_core::{CallContext, CallOptions, Config, Engine, ManualClock};
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
    /// Rows this run added to the telemetry database (one per replayed call).
    pub telemetry_rows: u64,
    pub seconds: f64,
    pub bad_lines: Vec<BadLine>,
}

/// What one call came to, on one side.
struct Outcome {
    upstream_requests: u64,
    cost_usd: f64,
    latency: Duration,
    failed: bool,
    cache_hit: bool,
}

pub async fn replay(log_path: &Path, db_path: &Path, mut config: Config) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    // Rate limits, breakers, Retry-After pauses and retry backoff run on wall time, while a
    // replay runs on the log's time in a fraction of it: left on, they would judge a day of
    // traffic as one burst and sleep for real. Each logged call is replayed as one attempt.
    config.resilience.limits = None;
    config.resilience.breaker = None;
    config.resilience.pause_on_retry_after = false;
    config.resilience.retry.max_attempts = 1;
    let file = std::fs::File::open(log_path)
        .with_context(|| format!("cannot open the log `{}`: check the path", log_path.display()))?;
    let (calls, bad_lines) = read_log(std::io::BufReader::new(file))
        .with_context(|| format!("cannot read the log `{}`", log_path.display()))?;
    for bad in &bad_lines {
        eprintln!("{}:{}: skipped: {}", log_path.display(), bad.line, bad.reason);
    }

    let db = db_path.to_string_lossy().into_owned();
    let store = TelemetryStore::connect(&db).await?;
    let rows_before = store.count().await?;
    let recorder = Recorder::spawn(
        store.clone(),
        RecorderSettings { queue_capacity: config.telemetry.queue_capacity, batch_size: config.telemetry.batch_size },
    );
    let provider = RecordedProvider::new(calls.iter().map(LoggedCall::recorded));
    let clock =
        Arc::new(ManualClock::new(calls.first().map(|call| call.at).unwrap_or_else(std::time::SystemTime::now)));
    let prices = config.prices.clone();
    let engine = Engine::builder(config)
        .provider("recorded", provider.clone())
        .recorder(recorder.clone())
        .clock(clock.clone())
        .build()
        .await?;

    let mut before = Vec::with_capacity(calls.len());
    let mut after = Vec::with_capacity(calls.len());
    for call in &calls {
        clock.set(call.at);
        let logged_cost = cost(&prices, &call.model, call);
        before.push(Outcome {
            upstream_requests: 1,
            cost_usd: logged_cost,
            latency: call.latency,
            failed: call.outcome.is_err(),
            cache_hit: false,
        });
        let context =
            CallContext::new(call.workspace.clone(), call.component.clone()).with_trace_id(call.trace_id.clone());
        let result = engine.execute(call.step.clone(), call.input.clone(), context, CallOptions::default()).await;
        after.push(match result {
            Ok(result) => Outcome {
                upstream_requests: u64::from(result.attempts),
                cost_usd: result.cost_usd,
                latency: result.latency,
                failed: false,
                cache_hit: result.source.is_cache(),
            },
            // A failure that reached the upstream costs and lasts what it did in the log; one
            // stopped before it (bad input, unknown step) costs nothing.
            Err(err) => {
                let reached_upstream = err.attempts() > 0;
                Outcome {
                    upstream_requests: u64::from(err.attempts()),
                    cost_usd: if reached_upstream { logged_cost } else { 0.0 },
                    latency: if reached_upstream { call.latency } else { Duration::ZERO },
                    failed: true,
                    cache_hit: false,
                }
            }
        });
    }
    engine.flush().await?;
    let lost = recorder.dropped();
    if lost > 0 {
        anyhow::bail!("{lost} telemetry records were lost writing to `{db}`; raise telemetry.queue_capacity");
    }
    let telemetry_rows = u64::try_from(store.count().await? - rows_before).unwrap_or(0);
    debug_assert_eq!(provider.requests_served(), after.iter().map(|o| o.upstream_requests).sum::<u64>());
    store.close().await;

    Ok(ReplayReport {
        log: log_path.display().to_string(),
        db,
        replayed: calls.len(),
        skipped_lines: bad_lines.len(),
        before: figures(&before),
        after: figures(&after),
        telemetry_rows,
        seconds: started.elapsed().as_secs_f64(),
        bad_lines,
    })
}

fn cost(prices: &PriceTable, model: &str, call: &LoggedCall) -> f64 {
    prices.cost(model, u64::from(call.usage.input_tokens), u64::from(call.usage.output_tokens)).unwrap_or(0.0)
}

fn figures(outcomes: &[Outcome]) -> Figures {
    let total = outcomes.len();
    let rate = |count: usize| if total == 0 { 0.0 } else { count as f64 / total as f64 };
    let mut latencies: Vec<f64> = outcomes.iter().map(|o| o.latency.as_secs_f64() * 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    Figures {
        calls: outcomes.iter().map(|o| o.upstream_requests).sum(),
        cost_usd: outcomes.iter().map(|o| o.cost_usd).sum(),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        error_rate: rate(outcomes.iter().filter(|o| o.failed).count()),
        hit_rate: rate(outcomes.iter().filter(|o| o.cache_hit).count()),
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p` of the
/// values at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&[5.0], 0.99), 5.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.99), 5.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
