//! What an engine shows of itself (its config, clock, telemetry, guards) and how it ends.

use std::time::SystemTime;

use resilience::{BreakerStatus, PauseStatus};
use shared_state::PartStatus;
use telemetry::{Recorder, TelemetryError};

use super::Engine;
use crate::{Config, SetupError};

impl Engine {
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The time on the engine's clock (the log's time during a replay).
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// The telemetry writer this engine records into.
    pub fn recorder(&self) -> &Recorder {
        &self.inner.recorder
    }

    /// Where calls' spans go, when traces are exported: a caller in front of the engine (the
    /// gateway) adds its own spans to the same traces.
    pub fn span_sink(&self) -> Option<&std::sync::Arc<dyn telemetry::SpanSink>> {
        self.inner.spans.as_ref()
    }

    /// The Prometheus metrics of this engine's calls.
    pub fn metrics(&self) -> &telemetry::Metrics {
        self.inner.recorder.metrics()
    }

    /// The state of every circuit breaker used so far (empty when breakers are off).
    pub fn breakers(&self) -> Vec<BreakerStatus> {
        self.inner.guards.breakers()
    }

    /// How many answers the exact and the semantic cache hold now (approximate: evictions
    /// are applied in batches); `None` for a cache that is off.
    pub fn cache_entries(&self) -> (Option<u64>, Option<u64>) {
        let exact = self.inner.cache.as_ref().map(|cache| cache.len());
        let semantic = self.inner.semantic.as_ref().map(|cache| cache.len());
        (exact, semantic)
    }

    /// Each shared part (Redis, the semantic store) and whether it answers now; empty when
    /// this process shares nothing.
    pub fn shared_state(&self) -> Vec<PartStatus> {
        self.inner.shared.as_ref().map(super::shared::Shared::status).unwrap_or_default()
    }

    /// Each rate limit's headroom now (this replica's buckets: declared by an upstream, or
    /// configured when no Redis holds them).
    pub fn headroom(&self) -> Vec<resilience::Headroom> {
        self.inner.guards.headroom()
    }

    /// Every provider/model that a Retry-After from the upstream holds back now.
    pub fn paused(&self) -> Vec<PauseStatus> {
        self.inner.guards.paused()
    }

    /// Waits until every telemetry record of the calls made so far is written.
    pub async fn flush(&self) -> Result<(), TelemetryError> {
        self.inner.recorder.flush().await
    }

    /// Before the process ends: writes the pending telemetry and saves the semantic cache to
    /// its snapshot, if one is configured.
    pub async fn shutdown(&self) -> Result<(), SetupError> {
        // Audits still running leave their rows and verdicts first (each within its deadline).
        if tokio::time::timeout(self.inner.config.engine.default_deadline, self.audits_settled()).await.is_err() {
            tracing::warn!("audits still running at shutdown: their verdicts are lost");
        }
        self.flush().await?;
        if let (Some(cache), Some(path)) = (&self.inner.semantic, &self.inner.config.semantic.snapshot) {
            let (cache, target) = (cache.clone(), path.clone());
            let saved = tokio::task::spawn_blocking(move || cache.save(&target)).await.map_err(|err| {
                semantic_cache::CacheError::Snapshot { path: path.clone(), reason: err.to_string() }
            })??;
            tracing::info!(entries = saved, "semantic cache saved");
            let cuts = super::audit::cuts_path(path);
            let saved = serde_json::to_vec(&self.inner.cuts.snapshot())
                .map_err(std::io::Error::other)
                .and_then(|bytes| std::fs::write(&cuts, bytes));
            if let Err(err) = saved {
                tracing::warn!(path = %cuts.display(), error = %err, "semantic cuts not saved: they will be learned again");
            }
        }
        Ok(())
    }
}
