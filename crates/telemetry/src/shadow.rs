use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row as _;

use crate::{TelemetryError, TelemetryStore};

/// One shadow-mode call: the legacy path served it, the engine ran alongside.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowRecord {
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

impl TelemetryStore {
    pub async fn insert_shadow(&self, record: &ShadowRecord) -> Result<(), TelemetryError> {
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
        .execute(self.pool())
        .await
        .map(drop)
        .map_err(TelemetryError::Write)
    }

    /// Every comparison of the window, oldest first, for a person to go through the
    /// disagreements.
    pub async fn shadow_records(&self, from_ms: i64, to_ms: i64) -> Result<Vec<ShadowRecord>, TelemetryError> {
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
                Ok(ShadowRecord {
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
    pub async fn shadow_figures(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<BTreeMap<String, ShadowFigures>, TelemetryError> {
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
