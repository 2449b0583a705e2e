use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::{CallRecord, CallStatus, Metrics};

#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    /// How far above its baseline, in standard deviations, a minute must be.
    pub z_threshold: f64,
    /// ... and by what factor of the baseline, so that a quiet metric's noise is no alert.
    pub min_ratio: f64,
    /// Minutes of history before a step's baselines are trusted.
    pub warmup_minutes: u32,
    /// Weight of the newest minute in the moving baselines.
    pub ewma_alpha: f64,
    /// Where alerts are POSTed as JSON, besides the log; `None`: the log only.
    pub webhook_url: Option<String>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self { z_threshold: 4.0, min_ratio: 2.0, warmup_minutes: 5, ewma_alpha: 0.2, webhook_url: None }
    }
}

/// What is watched, per step type and minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Watched {
    /// Mean call latency in milliseconds.
    LatencyMs,
    /// Share of calls that failed.
    ErrorRate,
    /// Spend in US dollars.
    CostUsd,
    /// The share of a step's semantic hits whose answer the model would not have given, as
    /// its audits measure it: raised when they prove the step's cut wrong (not watched per
    /// minute: `baseline` is the bound, `observed` the lower end of the measured rate's
    /// interval).
    SemanticWrongRate,
}

impl Watched {
    const ALL: [Self; 3] = [Self::LatencyMs, Self::ErrorRate, Self::CostUsd];

    pub fn label(self) -> &'static str {
        match self {
            Self::LatencyMs => "latency_ms",
            Self::ErrorRate => "error_rate",
            Self::CostUsd => "cost_usd",
            Self::SemanticWrongRate => "semantic_wrong_rate",
        }
    }

    /// The smallest rise worth waking someone for, whatever the statistics say.
    fn floor(self) -> f64 {
        match self {
            Self::LatencyMs => 50.0,
            Self::ErrorRate => 0.05,
            Self::CostUsd => 0.01,
            Self::SemanticWrongRate => 0.0,
        }
    }
}

/// One anomaly: a step's minute far above its baseline. Sent once per episode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub step: String,
    pub metric: Watched,
    pub baseline: f64,
    pub observed: f64,
    /// Standard deviations above the baseline.
    pub z_score: f64,
    /// Start of the minute, Unix milliseconds on the engine's clock.
    pub minute_ts_ms: i64,
}

/// Rolling baselines (EWMA of the mean and variance) of latency, error rate and cost per minute
/// and step type. A minute is judged when the step's first call of a later minute arrives;
/// an episode raises one alert, and the next can only come after a normal minute.
#[derive(Debug, Clone)]
pub struct AnomalyDetector {
    inner: Arc<Mutex<Detector>>,
}

#[derive(Debug)]
struct Detector {
    settings: AlertSettings,
    steps: HashMap<String, StepWatch>,
    metrics: Metrics,
    client: Option<reqwest::Client>,
    /// The latest alerts, newest last, for a status page.
    recent: std::collections::VecDeque<Alert>,
}

/// Alerts a status page shows.
const RECENT_ALERTS: usize = 20;

#[derive(Debug, Default)]
struct StepWatch {
    minute: i64,
    calls: u64,
    errors: u64,
    latency_ms: f64,
    cost_usd: f64,
    minutes_seen: u32,
    baselines: HashMap<Watched, Baseline>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Baseline {
    mean: f64,
    variance: f64,
    alerting: bool,
}

const MINUTE_MS: i64 = 60_000;

impl AnomalyDetector {
    pub fn new(settings: AlertSettings, metrics: Metrics) -> Self {
        let client = settings.webhook_url.as_ref().map(|_| reqwest::Client::new());
        let detector = Detector { settings, steps: HashMap::new(), metrics, client, recent: Default::default() };
        Self { inner: Arc::new(Mutex::new(detector)) }
    }

    /// The latest alerts raised (at most 20), newest first.
    pub fn recent(&self) -> Vec<Alert> {
        let detector = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        detector.recent.iter().rev().cloned().collect()
    }

    /// Takes one call into its step's current minute; returns the alerts raised by a minute
    /// that this call closed (already logged and sent).
    pub fn observe(&self, record: &CallRecord) -> Vec<Alert> {
        let mut detector = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let minute = record.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let settings = detector.settings.clone();
        let watch =
            detector.steps.entry(record.step.clone()).or_insert_with(|| StepWatch { minute, ..StepWatch::default() });
        let alerts =
            if minute > watch.minute && watch.calls > 0 { watch.close(&record.step, &settings) } else { Vec::new() };
        if minute > watch.minute {
            watch.start(minute);
        }
        watch.calls += 1;
        watch.errors += u64::from(record.status == CallStatus::Error);
        watch.latency_ms += record.latency_ms;
        watch.cost_usd += record.cost_usd;
        for alert in &alerts {
            detector.raise(alert.clone());
        }
        alerts
    }

    /// Raises an alert that another part of the engine judged (the semantic cache's audits):
    /// logged, counted, sent and listed as the detector's own are.
    pub fn raise(&self, alert: Alert) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).raise(alert);
    }
}

impl Detector {
    fn raise(&mut self, alert: Alert) {
        self.send(&alert);
        if self.recent.len() == RECENT_ALERTS {
            self.recent.pop_front();
        }
        self.recent.push_back(alert);
    }

    fn send(&self, alert: &Alert) {
        tracing::warn!(
            step = %alert.step,
            metric = alert.metric.label(),
            baseline = alert.baseline,
            observed = alert.observed,
            z_score = alert.z_score,
            "anomaly"
        );
        self.metrics.count_alert(&alert.step, alert.metric.label());
        if let (Some(client), Some(url)) = (&self.client, &self.settings.webhook_url) {
            let request = client.post(url).header("content-type", "application/json");
            let body = serde_json::to_vec(alert).unwrap_or_default();
            let url = url.clone();
            // Off the call path: a slow or failing receiver must not hold calls up.
            tokio::spawn(async move {
                match request.body(body).send().await {
                    Ok(response) if response.status().is_success() => {}
                    Ok(response) => {
                        tracing::error!(%url, status = %response.status(), "alert webhook refused the alert");
                    }
                    Err(err) => tracing::error!(%url, error = %err, "alert webhook unreachable"),
                }
            });
        }
    }
}

impl StepWatch {
    fn start(&mut self, minute: i64) {
        self.minute = minute;
        self.calls = 0;
        self.errors = 0;
        self.latency_ms = 0.0;
        self.cost_usd = 0.0;
    }

    fn value(&self, metric: Watched) -> f64 {
        let calls = self.calls.max(1) as f64;
        match metric {
            Watched::LatencyMs => self.latency_ms / calls,
            Watched::ErrorRate => self.errors as f64 / calls,
            Watched::CostUsd => self.cost_usd,
            Watched::SemanticWrongRate => 0.0,
        }
    }

    /// Judges the finished minute against the baselines, then folds it into them. An
    /// anomalous minute is kept out of the baseline, so that a long incident does not become
    /// the new normal.
    fn close(&mut self, step: &str, settings: &AlertSettings) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let trusted = self.minutes_seen >= settings.warmup_minutes;
        for metric in Watched::ALL {
            let observed = self.value(metric);
            let first = self.minutes_seen == 0;
            let baseline = self.baselines.entry(metric).or_default();
            if first {
                baseline.mean = observed;
                continue;
            }
            // A floor on the deviation: a metric that never moved would flag any wobble.
            let deviation = baseline.variance.sqrt().max(0.1 * baseline.mean.abs()).max(metric.floor() / 10.0);
            let z_score = (observed - baseline.mean) / deviation;
            let anomalous = trusted
                && z_score >= settings.z_threshold
                && observed >= baseline.mean * settings.min_ratio
                && observed - baseline.mean >= metric.floor();
            if anomalous {
                if !baseline.alerting {
                    alerts.push(Alert {
                        step: step.to_owned(),
                        metric,
                        baseline: baseline.mean,
                        observed,
                        z_score,
                        minute_ts_ms: self.minute,
                    });
                }
                baseline.alerting = true;
                continue;
            }
            baseline.alerting = false;
            let difference = observed - baseline.mean;
            baseline.mean += settings.ewma_alpha * difference;
            baseline.variance =
                (1.0 - settings.ewma_alpha) * (baseline.variance + settings.ewma_alpha * difference * difference);
        }
        self.minutes_seen += 1;
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(minute: i64, latency_ms: f64, failed: bool) -> CallRecord {
        let mut record = crate::recorder::tests::record(0);
        record.ts_ms = 1_780_000_000_000 + minute * MINUTE_MS;
        record.latency_ms = latency_ms;
        record.status = if failed { CallStatus::Error } else { CallStatus::Ok };
        record
    }

    #[test]
    fn one_alert_per_episode_and_none_in_the_steady_state() {
        let detector = AnomalyDetector::new(AlertSettings::default(), Metrics::new());
        let mut raised = Vec::new();
        // Ten steady minutes: 20 calls each, latency wobbling between 600 and 1,000 ms, 5% errors.
        for minute in 0..10 {
            for n in 0..20 {
                raised.extend(detector.observe(&call(
                    minute,
                    600.0 + f64::from((n * 37 + minute as i32 * 11) % 400),
                    n == 0,
                )));
            }
        }
        assert!(raised.is_empty(), "{raised:?}");
        // Two slow minutes: one alert.
        for minute in 10..12 {
            for _ in 0..20 {
                raised.extend(detector.observe(&call(minute, 5_000.0, false)));
            }
        }
        // Back to normal, then an error spike.
        for minute in 12..14 {
            for n in 0..20 {
                raised.extend(detector.observe(&call(minute, 800.0, n == 0)));
            }
        }
        for n in 0..20 {
            raised.extend(detector.observe(&call(14, 800.0, n % 2 == 0)));
        }
        raised.extend(detector.observe(&call(15, 800.0, false)));
        let summary: Vec<_> = raised.iter().map(|alert| (alert.metric, alert.minute_ts_ms)).collect();
        let minute = |m: i64| 1_780_000_000_000 / MINUTE_MS * MINUTE_MS + m * MINUTE_MS;
        assert_eq!(summary, [(Watched::LatencyMs, minute(10)), (Watched::ErrorRate, minute(14))]);
        assert!(raised[0].baseline < 1_000.0 && raised[0].observed == 5_000.0);
    }
}
