use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow, install_default_drivers};
use sqlx::{AnyPool, Row};

use crate::{CallRecord, CallStatus, TelemetryError};

const INSERT_CALL: &str = "INSERT INTO calls (ts_ms, step, component, workspace, trace_id, model, provider, \
     input_tokens, output_tokens, latency_ms, cost_usd, saved_cost_usd, source, cache_hit, confidence, status, \
     error_class, error_message, attempts, rate_limit_wait_ms, breaker_state, saved_tokens, similarity) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, \
     $23)";

const SELECT_CALLS: &str = "SELECT ts_ms, step, component, workspace, trace_id, model, provider, input_tokens, \
     output_tokens, latency_ms, cost_usd, saved_cost_usd, source, cache_hit, confidence, status, error_class, \
     error_message, attempts, rate_limit_wait_ms, breaker_state, saved_tokens, similarity FROM calls ORDER BY id";

/// The telemetry database, through sqlx's `Any` driver so that one code path serves SQLite
/// (the default, a local file) and, later, PostgreSQL.
#[derive(Debug, Clone)]
pub struct TelemetryStore {
    pool: AnyPool,
}

impl TelemetryStore {
    /// Opens (creating if needed) the database at `url` and brings its schema up to date.
    ///
    /// `url` is `postgres://...` (or `postgresql://`), `sqlite://PATH`, `sqlite::memory:`, or a
    /// plain file path, taken as SQLite.
    pub async fn connect(url: &str) -> Result<Self, TelemetryError> {
        install_default_drivers();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Self::connect_postgres(url).await;
        }
        let url = sqlite_url(url);
        let connect_error = |source| TelemetryError::Connect { url: url.clone(), source };
        let options = AnyConnectOptions::from_str(&url).map_err(connect_error)?;
        // An in-memory SQLite database lives and dies with its connection, and each
        // connection has its own: such a pool must hold exactly one, forever.
        let in_memory = url.contains(":memory:");
        let pool = AnyPoolOptions::new()
            // SQLite serialises writers anyway; a few connections let reports read while the
            // writer writes (WAL).
            .max_connections(if in_memory { 1 } else { 4 })
            .min_connections(u32::from(in_memory))
            .idle_timeout(if in_memory { None } else { Some(Duration::from_secs(600)) })
            .max_lifetime(if in_memory { None } else { Some(Duration::from_secs(1800)) })
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        // WAL lets report queries read while the batch writer writes; NORMAL sync is safe
        // with WAL and keeps each batch commit cheap. A no-op for an in-memory database.
        sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await.map_err(connect_error)?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    async fn connect_postgres(url: &str) -> Result<Self, TelemetryError> {
        // The URL may hold a password: errors name the host part only.
        let shown = url.rsplit_once('@').map_or_else(|| url.to_owned(), |(_, host)| format!("postgres://…@{host}"));
        let connect_error = |source| TelemetryError::Connect { url: shown.clone(), source };
        let options = AnyConnectOptions::from_str(url).map_err(connect_error)?;
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The rows of `sql`, whose `$1` and `$2` bound a window `from_ms <= ts_ms < to_ms`.
    pub(crate) async fn rows_in_window(
        &self,
        sql: &'static str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<AnyRow>, TelemetryError> {
        sqlx::query(sql).bind(from_ms).bind(to_ms).fetch_all(&self.pool).await.map_err(TelemetryError::Query)
    }

    /// Writes the records in one transaction: all of them or, on error, none.
    pub async fn insert_batch(&self, records: &[CallRecord]) -> Result<(), TelemetryError> {
        let mut tx = self.pool.begin().await.map_err(TelemetryError::Write)?;
        for record in records {
            let query = sqlx::query(INSERT_CALL)
                .bind(record.ts_ms)
                .bind(record.step.as_str())
                .bind(record.component.as_str())
                .bind(record.workspace.as_str())
                .bind(record.trace_id.as_str())
                .bind(record.model.as_str())
                .bind(record.provider.as_str())
                .bind(record.input_tokens)
                .bind(record.output_tokens)
                .bind(record.latency_ms)
                .bind(record.cost_usd)
                .bind(record.saved_cost_usd)
                .bind(record.source.as_str())
                .bind(i64::from(record.cache_hit))
                .bind(record.confidence)
                .bind(record.status.as_str())
                .bind(record.error_class.as_deref())
                .bind(record.error_message.as_deref())
                .bind(record.attempts)
                .bind(record.rate_limit_wait_ms)
                .bind(record.breaker_state.as_deref())
                .bind(record.saved_tokens);
            // sqlx 0.9's Any driver sends a NULL f64 typed as float4 (its Real and Double null
            // kinds are swapped), which PostgreSQL rejects for a DOUBLE PRECISION column; a NULL
            // f32 goes out as float8. A present value is bound as the f64 it is.
            let query = match record.similarity {
                Some(similarity) => query.bind(similarity),
                None => query.bind(None::<f32>),
            };
            query.execute(&mut *tx).await.map_err(TelemetryError::Write)?;
        }
        tx.commit().await.map_err(TelemetryError::Write)
    }

    /// Every record, oldest first.
    pub async fn records(&self) -> Result<Vec<CallRecord>, TelemetryError> {
        let rows = sqlx::query(SELECT_CALLS).fetch_all(&self.pool).await.map_err(TelemetryError::Query)?;
        rows.iter().map(record_from_row).collect::<Result<_, _>>().map_err(TelemetryError::Query)
    }

    pub async fn count(&self) -> Result<i64, TelemetryError> {
        sqlx::query("SELECT COUNT(*) AS n FROM calls")
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get::<i64, _>("n"))
            .map_err(TelemetryError::Query)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn record_from_row(row: &AnyRow) -> Result<CallRecord, sqlx::Error> {
    let status: String = row.try_get("status")?;
    Ok(CallRecord {
        ts_ms: row.try_get("ts_ms")?,
        step: row.try_get("step")?,
        component: row.try_get("component")?,
        workspace: row.try_get("workspace")?,
        trace_id: row.try_get("trace_id")?,
        model: row.try_get("model")?,
        provider: row.try_get("provider")?,
        input_tokens: row.try_get("input_tokens")?,
        output_tokens: row.try_get("output_tokens")?,
        latency_ms: row.try_get("latency_ms")?,
        cost_usd: row.try_get("cost_usd")?,
        saved_cost_usd: row.try_get("saved_cost_usd")?,
        source: row.try_get("source")?,
        cache_hit: row.try_get::<i64, _>("cache_hit")? != 0,
        confidence: row.try_get("confidence")?,
        status: CallStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown call status `{status}`").into()))?,
        error_class: row.try_get("error_class")?,
        error_message: row.try_get("error_message")?,
        attempts: row.try_get("attempts")?,
        rate_limit_wait_ms: row.try_get("rate_limit_wait_ms")?,
        breaker_state: row.try_get("breaker_state")?,
        saved_tokens: row.try_get("saved_tokens")?,
        similarity: row.try_get("similarity")?,
    })
}

/// A plain path is a SQLite file; SQLite URLs get `mode=rwc` so that a new file is created.
fn sqlite_url(url: &str) -> String {
    let is_sqlite = url.starts_with("sqlite:");
    if !is_sqlite && url.contains("://") {
        return url.to_owned();
    }
    let url = if is_sqlite { url.to_owned() } else { format!("sqlite://{url}") };
    if url.contains(":memory:") || url.contains("mode=") {
        url
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(sqlite_url("aipipe.db"), "sqlite://aipipe.db?mode=rwc");
        assert_eq!(sqlite_url("/tmp/x.db"), "sqlite:///tmp/x.db?mode=rwc");
        assert_eq!(sqlite_url("sqlite://a.db"), "sqlite://a.db?mode=rwc");
        assert_eq!(sqlite_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(sqlite_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
