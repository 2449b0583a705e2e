//! Where shadow mode's comparisons go: a table of their own beside the calls, in the
//! telemetry database. The engine's own row of each shadow call is in `calls` with the same
//! trace id; this table is the migration's, and this crate owns it.

use std::collections::BTreeMap;

use pipeline_core::telemetry::{TelemetryError, TelemetryStore};
use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;
use tokio::sync::OnceCell;

const CREATE_SQLITE: &str = "CREATE TABLE IF NOT EXISTS shadow_comparisons (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms             INTEGER NOT NULL,
    component         TEXT    NOT NULL,
    step              TEXT    NOT NULL,
    trace_id          TEXT    NOT NULL,
    agreed            INTEGER NOT NULL,
    similarity        REAL    NOT NULL,
    legacy_ok         INTEGER NOT NULL,
    engine_ok         INTEGER NOT NULL,
    legacy_latency_ms REAL    NOT NULL,
    legacy_answer     TEXT,
    engine_answer     TEXT,
    engine_latency_ms REAL    NOT NULL
)";

/// The same table in PostgreSQL's types: sqlx's Any driver reads BIGINT as i64 and DOUBLE
/// PRECISION as f64, and booleans are 0/1 as in SQLite, so that one query path reads both.
const CREATE_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS shadow_comparisons (
    id                BIGSERIAL PRIMARY KEY,
    ts_ms             BIGINT           NOT NULL,
    component         TEXT             NOT NULL,
    step              TEXT             NOT NULL,
    trace_id          TEXT             NOT NULL,
    agreed            BIGINT           NOT NULL,
    similarity        DOUBLE PRECISION NOT NULL,
    legacy_ok         BIGINT           NOT NULL,
    engine_ok         BIGINT           NOT NULL,
    legacy_latency_ms DOUBLE PRECISION NOT NULL,
    legacy_answer     TEXT,
    engine_answer     TEXT,
    engine_latency_ms DOUBLE PRECISION NOT NULL
)";

const CREATE_INDEX: &str = "CREATE INDEX IF NOT EXISTS shadow_by_component ON shadow_comparisons (component, ts_ms)";

/// One shadow-mode call: the legacy path served it, the engine ran alongside.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowComparison {
    pub ts_ms: i64,
    pub component: String,
    pub step: String,
    /// The engine call's trace id: its own row in `calls` has the same.
    pub trace_id: String,
    /// Whether the two answers agree by the step's comparison.
    pub agreed: bool,
    /// 1.0 or 0.0 for an exact comparison; the text similarity for free text.
    pub similarity: f64,
    pub legacy_ok: bool,
    pub engine_ok: bool,
    /// What was compared of each answer (JSON), so that a person can judge a disagreement;
    /// `None` for a side that failed.
    pub legacy_answer: Option<String>,
    pub engine_answer: Option<String>,
    pub legacy_latency_ms: f64,
    pub engine_latency_ms: f64,
}

/// Shadow comparisons of one component in a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ShadowFigures {
    pub comparisons: u64,
    pub agreed: u64,
}

impl ShadowFigures {
    pub fn agreement_rate(&self) -> Option<f64> {
        (self.comparisons > 0).then(|| self.agreed as f64 / self.comparisons as f64)
    }
}

/// The shadow comparisons of one telemetry database. Cheap to clone; the table is made on
/// first use.
#[derive(Debug, Clone)]
pub struct ShadowLog {
    store: TelemetryStore,
    table: std::sync::Arc<OnceCell<()>>,
}

impl ShadowLog {
    pub fn new(store: TelemetryStore) -> Self {
        Self { store, table: std::sync::Arc::default() }
    }

    async fn pool(&self) -> Result<&sqlx::AnyPool, TelemetryError> {
        let pool = self.store.pool();
        self.table
            .get_or_try_init(|| async {
                let create = if self.store.is_postgres() { CREATE_POSTGRES } else { CREATE_SQLITE };
                sqlx::query(create).execute(pool).await?;
                sqlx::query(CREATE_INDEX).execute(pool).await.map(drop)
            })
            .await
            .map_err(TelemetryError::Write)?;
        Ok(pool)
    }

    pub async fn insert(&self, record: &ShadowComparison) -> Result<(), TelemetryError> {
        sqlx::query(
            "INSERT INTO shadow_comparisons (ts_ms, component, step, trace_id, agreed, similarity, legacy_ok, \
             engine_ok, legacy_answer, engine_answer, legacy_latency_ms, engine_latency_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(record.ts_ms)
        .bind(record.component.as_str())
        .bind(record.step.as_str())
        .bind(record.trace_id.as_str())
        .bind(i64::from(record.agreed))
        .bind(record.similarity)
        .bind(i64::from(record.legacy_ok))
        .bind(i64::from(record.engine_ok))
        .bind(record.legacy_answer.as_deref())
        .bind(record.engine_answer.as_deref())
        .bind(record.legacy_latency_ms)
        .bind(record.engine_latency_ms)
        .execute(self.pool().await?)
        .await
        .map(drop)
        .map_err(TelemetryError::Write)
    }

    async fn rows_in_window(&self, sql: &'static str, from_ms: i64, to_ms: i64) -> Result<Vec<AnyRow>, TelemetryError> {
        self.pool().await?;
        self.store.rows_in_window(sql, from_ms, to_ms).await
    }

    /// Every comparison of the window, oldest first, for a person to go through the
    /// disagreements.
    pub async fn comparisons(&self, from_ms: i64, to_ms: i64) -> Result<Vec<ShadowComparison>, TelemetryError> {
        let rows = self
            .rows_in_window(
                "SELECT ts_ms, component, step, trace_id, agreed, similarity, legacy_ok, engine_ok, legacy_answer, \
                 engine_answer, legacy_latency_ms, engine_latency_ms FROM shadow_comparisons \
                 WHERE ts_ms >= $1 AND ts_ms < $2 ORDER BY ts_ms, id",
                from_ms,
                to_ms,
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(ShadowComparison {
                    ts_ms: row.try_get("ts_ms")?,
                    component: row.try_get("component")?,
                    step: row.try_get("step")?,
                    trace_id: row.try_get("trace_id")?,
                    agreed: row.try_get::<i64, _>("agreed")? != 0,
                    similarity: row.try_get("similarity")?,
                    legacy_ok: row.try_get::<i64, _>("legacy_ok")? != 0,
                    engine_ok: row.try_get::<i64, _>("engine_ok")? != 0,
                    legacy_answer: row.try_get("legacy_answer")?,
                    engine_answer: row.try_get("engine_answer")?,
                    legacy_latency_ms: row.try_get("legacy_latency_ms")?,
                    engine_latency_ms: row.try_get("engine_latency_ms")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(TelemetryError::Query)
    }

    /// Comparisons and agreements per component, for `from_ms <= ts_ms < to_ms`.
    pub async fn figures(&self, from_ms: i64, to_ms: i64) -> Result<BTreeMap<String, ShadowFigures>, TelemetryError> {
        let rows = self
            .rows_in_window(
                "SELECT component, COUNT(*) AS comparisons, CAST(SUM(agreed) AS BIGINT) AS agreed \
                 FROM shadow_comparisons WHERE ts_ms >= $1 AND ts_ms < $2 GROUP BY component",
                from_ms,
                to_ms,
            )
            .await?;
        rows.iter()
            .map(|row| {
                let comparisons: i64 = row.try_get("comparisons")?;
                // PostgreSQL sums BIGINTs into NUMERIC, which the Any driver cannot read: the
                // query casts it back.
                let agreed: i64 = row.try_get("agreed")?;
                Ok((
                    row.try_get("component")?,
                    ShadowFigures { comparisons: comparisons as u64, agreed: agreed as u64 },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(TelemetryError::Query)
    }
}
