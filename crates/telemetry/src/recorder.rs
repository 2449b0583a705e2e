use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::{AlertSettings, AnomalyDetector, CallRecord, Metrics, TelemetryError, TelemetryStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecorderSettings {
    /// Records that may wait for the writer. Past this, new records are dropped and counted.
    pub queue_capacity: usize,
    /// Records written per transaction.
    pub batch_size: usize,
}

impl Default for RecorderSettings {
    fn default() -> Self {
        Self { queue_capacity: 65_536, batch_size: 512 }
    }
}

enum Command {
    Record(Box<CallRecord>),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    metrics: Metrics,
    anomalies: Option<AnomalyDetector>,
}

impl Counters {
    fn drop_records(&self, count: u64) -> u64 {
        self.metrics.count_dropped(count);
        self.dropped.fetch_add(count, Ordering::Relaxed) + count
    }
}

/// Takes call records without waiting and writes them in batches from a background task;
/// counts each in the [`Metrics`] as it comes.
#[derive(Debug, Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    store: TelemetryStore,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Record(record) => f.debug_tuple("Record").field(&record.trace_id).finish(),
            Self::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Recorder {
    /// Starts the writer task on the current Tokio runtime.
    pub fn spawn(store: TelemetryStore, settings: RecorderSettings) -> Self {
        Self::spawn_with_alerts(store, settings, None)
    }

    /// Also watches the records for anomalies and raises alerts (see [`AnomalyDetector`]).
    pub fn spawn_with_alerts(store: TelemetryStore, settings: RecorderSettings, alerts: Option<AlertSettings>) -> Self {
        let (queue, commands) = mpsc::channel(settings.queue_capacity.max(1));
        let metrics = Metrics::new();
        let anomalies = alerts.map(|alerts| AnomalyDetector::new(alerts, metrics.clone()));
        let counters = Arc::new(Counters { metrics, anomalies, ..Counters::default() });
        tokio::spawn(write_loop(store.clone(), commands, settings.batch_size.max(1), counters.clone()));
        Self { queue, counters, store }
    }

    /// Queues a record. Never waits: if the queue is full the record is dropped, counted in
    /// [`Recorder::dropped`] and logged, because a slow database must not slow the calls.
    pub fn record(&self, record: CallRecord) {
        self.counters.metrics.observe(&record);
        if let Some(anomalies) = &self.counters.anomalies {
            anomalies.observe(&record);
        }
        if let Err(err) = self.queue.try_send(Command::Record(Box::new(record))) {
            let dropped = self.counters.drop_records(1);
            let reason = match err {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "writer stopped",
            };
            tracing::warn!(reason, dropped_total = dropped, "telemetry record dropped");
        }
    }

    /// Waits until every record queued before this call has been written (or counted as lost).
    pub async fn flush(&self) -> Result<(), TelemetryError> {
        let (done, written) = oneshot::channel();
        self.queue.send(Command::Flush(done)).await.map_err(|_| TelemetryError::WriterStopped)?;
        written.await.map_err(|_| TelemetryError::WriterStopped)
    }

    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Records lost to a full queue or a failed write.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &TelemetryStore {
        &self.store
    }

    /// Raises an alert judged elsewhere (see [`AnomalyDetector::raise`]); only logged when
    /// alerts are off.
    pub fn raise_alert(&self, alert: crate::Alert) {
        match &self.counters.anomalies {
            Some(anomalies) => anomalies.raise(alert),
            None => {
                tracing::warn!(step = %alert.step, metric = alert.metric.label(), observed = alert.observed, "alert");
            }
        }
    }

    /// The latest anomaly alerts, newest first (empty when alerts are off).
    pub fn recent_alerts(&self) -> Vec<crate::Alert> {
        self.counters.anomalies.as_ref().map(AnomalyDetector::recent).unwrap_or_default()
    }

    /// The Prometheus metrics of every call recorded here.
    pub fn metrics(&self) -> &Metrics {
        &self.counters.metrics
    }
}

async fn write_loop(
    store: TelemetryStore,
    mut commands: mpsc::Receiver<Command>,
    batch_size: usize,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut waiters = Vec::new();
    while let Some(first) = commands.recv().await {
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Record(record) => batch.push(*record),
                Command::Flush(done) => waiters.push(done),
            }
            if batch.len() < batch_size {
                next = commands.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            write_batch(&store, &batch, &counters).await;
            batch.clear();
        }
        for done in waiters.drain(..) {
            // The flusher may have given up waiting; nothing to tell it then.
            let _ = done.send(());
        }
    }
}

/// How long a batch is retried on a busy or unreachable database before it is counted as
/// lost. Meanwhile new records wait in the queue (and past its capacity, are dropped and
/// counted): the database being slow never slows the calls.
const WRITE_PATIENCE: Duration = Duration::from_secs(120);

async fn write_batch(store: &TelemetryStore, batch: &[CallRecord], counters: &Counters) {
    let count = batch.len() as u64;
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut result = store.insert_batch(batch).await;
    while let Err(err) = &result
        && err.is_retryable()
        && started.elapsed() + pause < WRITE_PATIENCE
    {
        tracing::warn!(error = %err, records = count, "telemetry write failed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
        result = store.insert_batch(batch).await;
    }
    match result {
        Ok(()) => {
            counters.written.fetch_add(count, Ordering::Relaxed);
        }
        Err(err) => {
            let dropped = counters.drop_records(count);
            tracing::error!(error = %err, records = count, dropped_total = dropped, "telemetry records lost");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{BreakerState, CallStatus, ErrorClass, Source};

    pub(crate) fn record(n: i64) -> CallRecord {
        CallRecord {
            ts_ms: 1_700_000_000_000 + n,
            step: "classifier".into(),
            component: "ticket-classifier".into(),
            workspace: "ws-1".into(),
            trace_id: format!("t-{n}"),
            model: "gpt-4o-mini".into(),
            provider: "openai".into(),
            input_tokens: 100,
            output_tokens: 20,
            latency_ms: 812.5,
            cost_usd: 0.000027,
            saved_cost_usd: 0.0,
            source: Source::Upstream,
            cache_hit: false,
            confidence: 1.0,
            status: CallStatus::Ok,
            error_class: None,
            error_message: None,
            attempts: 1,
            rate_limit_wait_ms: 0.0,
            breaker_state: Some(BreakerState::Closed),
            route: None,
            streamed: false,
            ttft_ms: None,
            audit: None,
            saved_tokens: 0,
            similarity: None,
        }
    }

    #[tokio::test]
    async fn records_reach_the_file_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = TelemetryStore::connect(path.to_str().unwrap()).await.unwrap();
        let recorder = Recorder::spawn(store.clone(), RecorderSettings { queue_capacity: 10_000, batch_size: 64 });
        for n in 0..1_000 {
            recorder.record(record(n));
        }
        let mut failed = record(1_000);
        failed.status = CallStatus::Error;
        failed.error_class = Some(ErrorClass::RateLimited);
        failed.error_message = Some("slow down".into());
        recorder.record(failed.clone());
        recorder.flush().await.unwrap();
        assert_eq!(recorder.written(), 1_001);
        assert_eq!(recorder.dropped(), 0);
        let rows = store.records().await.unwrap();
        assert_eq!(rows.len(), 1_001);
        assert_eq!(rows[0], record(0));
        assert_eq!(rows[1_000], failed);
        // Reopening the file finds the rows and re-running migrations is harmless.
        let reopened = TelemetryStore::connect(path.to_str().unwrap()).await.unwrap();
        assert_eq!(reopened.count().await.unwrap(), 1_001);
    }

    #[tokio::test]
    async fn an_in_memory_store_keeps_its_rows_across_uses() {
        let store = TelemetryStore::connect("sqlite::memory:").await.unwrap();
        store.insert_batch(&[record(1), record(2)]).await.unwrap();
        for _ in 0..10 {
            assert_eq!(store.count().await.unwrap(), 2);
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let store = TelemetryStore::connect("sqlite::memory:").await.unwrap();
        let (queue, _commands_never_read) = mpsc::channel(3);
        let recorder = Recorder { queue, counters: Arc::default(), store };
        for n in 0..10 {
            recorder.record(record(n));
        }
        assert_eq!(recorder.dropped(), 7);
    }
}
