use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row as _;

use crate::store::{optional_word, word};
use crate::{Audit, CallStatus, ErrorClass, Health, Source, TelemetryError, TelemetryStore, mean_recovery_secs};

const REPORT_ROWS: &str = "SELECT ts_ms, component, latency_ms, status, source, error_class, attempts, cost_usd, \
     saved_cost_usd, breaker_state, audit FROM calls WHERE ts_ms >= $1 AND ts_ms < $2 ORDER BY ts_ms, id";

/// The figures of a time window, overall and per component.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub from_ms: i64,
    pub to_ms: i64,
    pub overall: Figures,
    pub components: BTreeMap<String, Figures>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// Calls made to the engine.
    pub calls: u64,
    /// Requests that reached a provider (retries and repairs included).
    pub upstream_requests: u64,
    /// Calls answered by a cache or by an identical call in flight: the calls saved.
    pub saved_calls: u64,
    pub cost_usd: f64,
    pub saved_cost_usd: f64,
    pub p50_latency_ms: f64,
    pub p99_latency_ms: f64,
    /// Calls that ended in an error, over all calls.
    pub error_rate: f64,
    /// Calls answered by the exact or semantic cache, over all calls.
    pub cache_hit_rate: f64,
    /// Calls answered by a fallback (another model, a similar answer, a rule), over all calls.
    pub fallback_rate: f64,
    /// Mean time from the first call the upstream could not answer to the next call a model
    /// answered, over the outages that ended in the window ([`mean_recovery_secs`]); `None` if
    /// none did.
    pub mttr_secs: Option<f64>,
    /// The engine's own audits of semantic hits: not among `calls` (no caller made them), but
    /// their requests and cost are in `upstream_requests` and `cost_usd`.
    pub audits: u64,
    /// Audits whose model answer was not the one the hit served.
    pub audit_disagreements: u64,
    pub audit_cost_usd: f64,
}

struct Call {
    audit: Option<Audit>,
    ts_ms: i64,
    component: String,
    latency_ms: f64,
    failed: bool,
    source: Source,
    health: Health,
    attempts: i64,
    cost_usd: f64,
    saved_cost_usd: f64,
}

/// Calls per minute by what served them, for a status page's chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Minute {
    /// The minute's start, Unix milliseconds.
    pub minute_ms: i64,
    pub by_source: BTreeMap<Source, u64>,
}

const MINUTE_MS: i64 = 60_000;

/// Calls per minute and source (the engine's own audits aside), counted by the database: a
/// handful of rows out, whatever the traffic. (`ts_ms` is never negative, so integer division floors.)
const CALLS_PER_MINUTE: &str = "SELECT ts_ms / 60000 AS minute, source, COUNT(*) AS calls FROM calls \
     WHERE ts_ms >= $1 AND ts_ms < $2 AND audit IS NULL GROUP BY ts_ms / 60000, source";

/// The window's figures by source and status, summed by the database. PostgreSQL sums a
/// BIGINT column as NUMERIC, which the Any driver cannot read: the casts keep it an integer.
const OVERVIEW: &str = "SELECT source, status, audit, COUNT(*) AS calls, CAST(SUM(attempts) AS BIGINT) AS attempts, \
     SUM(cost_usd) AS cost_usd, SUM(saved_cost_usd) AS saved_cost_usd FROM calls \
     WHERE ts_ms >= $1 AND ts_ms < $2 GROUP BY source, status, audit";

/// The latency at one rank of the window's calls (audits aside), ordered by the database.
const LATENCY_AT_RANK: &str = "SELECT latency_ms FROM calls WHERE ts_ms >= $1 AND ts_ms < $2 AND audit IS NULL \
     ORDER BY latency_ms LIMIT 1 OFFSET $3";

impl TelemetryStore {
    /// Calls of each minute from `from_ms` to `to_ms` by source, every minute present (empty
    /// ones too), oldest first.
    pub async fn calls_per_minute(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Minute>, TelemetryError> {
        let first = from_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let mut minutes: Vec<Minute> = (first..to_ms)
            .step_by(MINUTE_MS as usize)
            .map(|minute_ms| Minute { minute_ms, by_source: BTreeMap::new() })
            .collect();
        for row in self.rows_in_window(CALLS_PER_MINUTE, from_ms, to_ms).await? {
            let minute: i64 = row.try_get("minute").map_err(TelemetryError::Query)?;
            let calls: i64 = row.try_get("calls").map_err(TelemetryError::Query)?;
            let source = word(&row, "source", Source::parse).map_err(TelemetryError::Query)?;
            let index = usize::try_from((minute * MINUTE_MS - first).div_euclid(MINUTE_MS)).unwrap_or(usize::MAX);
            if let Some(minute) = minutes.get_mut(index) {
                *minute.by_source.entry(source).or_default() += calls.max(0) as u64;
            }
        }
        Ok(minutes)
    }

    /// The overall figures of [`TelemetryStore::report`] for the calls with `from_ms <= ts_ms <
    /// to_ms`, from aggregates the database computes (a live page asks for it every few
    /// seconds: it must not read an hour of rows), MTTR aside (`None`: it needs the rows in
    /// order).
    pub async fn overview(&self, from_ms: i64, to_ms: i64) -> Result<Figures, TelemetryError> {
        let mut figures = Figures {
            calls: 0,
            upstream_requests: 0,
            saved_calls: 0,
            cost_usd: 0.0,
            saved_cost_usd: 0.0,
            p50_latency_ms: 0.0,
            p99_latency_ms: 0.0,
            error_rate: 0.0,
            cache_hit_rate: 0.0,
            fallback_rate: 0.0,
            mttr_secs: None,
            audits: 0,
            audit_disagreements: 0,
            audit_cost_usd: 0.0,
        };
        let (mut errors, mut hits, mut fallbacks) = (0_u64, 0_u64, 0_u64);
        for row in self.rows_in_window(OVERVIEW, from_ms, to_ms).await? {
            let audit = optional_word(&row, "audit", Audit::parse).map_err(TelemetryError::Query)?;
            let read = || -> Result<(Source, CallStatus, u64, i64, f64, f64), sqlx::Error> {
                Ok((
                    word(&row, "source", Source::parse)?,
                    word(&row, "status", CallStatus::parse)?,
                    row.try_get::<i64, _>("calls")?.max(0) as u64,
                    row.try_get::<Option<i64>, _>("attempts")?.unwrap_or(0),
                    row.try_get::<Option<f64>, _>("cost_usd")?.unwrap_or(0.0),
                    row.try_get::<Option<f64>, _>("saved_cost_usd")?.unwrap_or(0.0),
                ))
            };
            let (source, status, calls, attempts, cost_usd, saved_cost_usd) = read().map_err(TelemetryError::Query)?;
            figures.upstream_requests += attempts.max(0) as u64;
            figures.cost_usd += cost_usd;
            if let Some(audit) = audit {
                figures.audits += calls;
                figures.audit_cost_usd += cost_usd;
                if audit == Audit::Disagree {
                    figures.audit_disagreements += calls;
                }
                continue;
            }
            figures.calls += calls;
            figures.saved_cost_usd += saved_cost_usd;
            if source.saved_a_request() {
                figures.saved_calls += calls;
            }
            if status == CallStatus::Error {
                errors += calls;
            }
            if source.is_cache() {
                hits += calls;
            }
            if source.is_fallback() {
                fallbacks += calls;
            }
        }
        if figures.calls == 0 {
            return Ok(figures);
        }
        let share = |count: u64| count as f64 / figures.calls as f64;
        figures.error_rate = share(errors);
        figures.cache_hit_rate = share(hits);
        figures.fallback_rate = share(fallbacks);
        // The nearest rank, as `percentile` takes it.
        for (p, slot) in [(0.50, &mut figures.p50_latency_ms), (0.99, &mut figures.p99_latency_ms)] {
            let rank = ((p * figures.calls as f64).ceil() as i64).clamp(1, figures.calls as i64);
            let row = sqlx::query(LATENCY_AT_RANK)
                .bind(from_ms)
                .bind(to_ms)
                .bind(rank - 1)
                .fetch_one(self.pool())
                .await
                .map_err(TelemetryError::Query)?;
            *slot = row.try_get("latency_ms").map_err(TelemetryError::Query)?;
        }
        Ok(figures)
    }

    /// The figures of the calls with `from_ms <= ts_ms < to_ms` (Unix milliseconds).
    pub async fn report(&self, from_ms: i64, to_ms: i64) -> Result<Report, TelemetryError> {
        let rows = self.rows_in_window(REPORT_ROWS, from_ms, to_ms).await?;
        let rows = rows
            .iter()
            .map(|row| {
                let source = word(row, "source", Source::parse)?;
                let error_class = optional_word(row, "error_class", ErrorClass::parse)?;
                Ok(Call {
                    audit: optional_word(row, "audit", Audit::parse)?,
                    ts_ms: row.try_get("ts_ms")?,
                    component: row.try_get("component")?,
                    latency_ms: row.try_get("latency_ms")?,
                    failed: word(row, "status", CallStatus::parse)? == CallStatus::Error,
                    source,
                    health: Health::of(source, error_class),
                    attempts: row.try_get("attempts")?,
                    cost_usd: row.try_get("cost_usd")?,
                    saved_cost_usd: row.try_get("saved_cost_usd")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(TelemetryError::Query)?;
        let mut by_component: BTreeMap<String, Vec<&Call>> = BTreeMap::new();
        for row in &rows {
            by_component.entry(row.component.clone()).or_default().push(row);
        }
        Ok(Report {
            from_ms,
            to_ms,
            overall: figures(&rows.iter().collect::<Vec<_>>()),
            components: by_component.into_iter().map(|(component, rows)| (component, figures(&rows))).collect(),
        })
    }
}

fn figures(all: &[&Call]) -> Figures {
    let (audits, rows): (Vec<&Call>, Vec<&Call>) = all.iter().partition(|row| row.audit.is_some());
    let calls = rows.len() as u64;
    let share = |count: usize| if calls == 0 { 0.0 } else { count as f64 / calls as f64 };
    let mut latencies: Vec<f64> = rows.iter().map(|row| row.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    Figures {
        calls,
        upstream_requests: all.iter().map(|row| row.attempts.max(0) as u64).sum(),
        saved_calls: rows.iter().filter(|row| row.source.saved_a_request()).count() as u64,
        cost_usd: all.iter().map(|row| row.cost_usd).sum(),
        saved_cost_usd: rows.iter().map(|row| row.saved_cost_usd).sum(),
        p50_latency_ms: percentile(&latencies, 0.50),
        p99_latency_ms: percentile(&latencies, 0.99),
        error_rate: share(rows.iter().filter(|row| row.failed).count()),
        cache_hit_rate: share(rows.iter().filter(|row| row.source.is_cache()).count()),
        fallback_rate: share(rows.iter().filter(|row| row.source.is_fallback()).count()),
        mttr_secs: mean_recovery_secs(rows.iter().map(|row| (row.ts_ms, row.health))),
        audits: audits.len() as u64,
        audit_disagreements: audits.iter().filter(|row| row.audit == Some(Audit::Disagree)).count() as u64,
        audit_cost_usd: audits.iter().map(|row| row.cost_usd).sum(),
    }
}

/// The nearest-rank percentile `p` (0 to 1) of sorted values: the smallest value with at
/// least `p` of the values at or below it; 0 for none. Every figure aipipe quotes as p50 or
/// p99 (reports, the replay, benchmarks) is this one.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

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
