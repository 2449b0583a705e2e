use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow, install_default_drivers};
use sqlx::{AnyPool, Row};

use crate::{Audit, BreakerState, CallRecord, CallStatus, ErrorClass, Source, TelemetryError};

const INSERT_CALL: &str = "INSERT INTO calls (ts_ms, step, component, workspace, trace_id, model, provider, \
     input_tokens, output_tokens, latency_ms, cost_usd, saved_cost_usd, source, cache_hit, confidence, status, \
     error_class, error_message, attempts, rate_limit_wait_ms, breaker_state, saved_tokens, similarity, route, \
     streamed, ttft_ms, audit) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
     $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)";

const SELECT_CALLS: &str = "SELECT ts_ms, step, component, workspace, trace_id, model, provider, input_tokens, \
     output_tokens, latency_ms, cost_usd, saved_cost_usd, source, cache_hit, confidence, status, error_class, \
     error_message, attempts, rate_limit_wait_ms, breaker_state, saved_tokens, similarity, route, streamed, \
     ttft_ms, audit FROM calls ORDER BY id";

/// The telemetry database, through sqlx's `Any` driver so that one code path serves SQLite
/// (the default, a local file) and PostgreSQL.
#[derive(Debug, Clone)]
pub struct TelemetryStore {
    pool: AnyPool,
    postgres: bool,
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
        migrate(sqlx::migrate!("./migrations/sqlite"), &pool).await?;
        Ok(Self { pool, postgres: false })
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
        migrate(sqlx::migrate!("./migrations/postgres"), &pool).await?;
        Ok(Self { pool, postgres: true })
    }

    /// The database, for tables that other parts of aipipe keep beside the calls (the
    /// adapters' shadow comparisons): each owns its own table and its queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database is PostgreSQL (else SQLite), for DDL that differs between them.
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// The rows of `sql`, whose `$1` and `$2` bound a window `from_ms <= ts_ms < to_ms`.
    pub async fn rows_in_window(
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
                .bind(record.source.label())
                .bind(i64::from(record.cache_hit))
                .bind(record.confidence)
                .bind(record.status.label())
                .bind(record.error_class.map(ErrorClass::label))
                .bind(record.error_message.as_deref())
                .bind(record.attempts)
                .bind(record.rate_limit_wait_ms)
                .bind(record.breaker_state.map(BreakerState::label))
                .bind(record.saved_tokens);
            // sqlx 0.9's Any driver sends a NULL f64 typed as float4 (its Real and Double null
            // kinds are swapped), which PostgreSQL rejects for a DOUBLE PRECISION column; a NULL
            // f32 goes out as float8. A present value is bound as the f64 it is.
            let query = match record.similarity {
                Some(similarity) => query.bind(similarity),
                None => query.bind(None::<f32>),
            };
            let route = record.route.as_ref().map(serde_json::to_string).transpose().map_err(|err| {
                TelemetryError::Write(sqlx::Error::Encode(format!("the route decision: {err}").into()))
            })?;
            let query = query.bind(route).bind(i64::from(record.streamed));
            // As for `similarity`: a NULL goes out as f32 to fit PostgreSQL's column.
            let query = match record.ttft_ms {
                Some(ttft_ms) => query.bind(ttft_ms),
                None => query.bind(None::<f32>),
            };
            let query = query.bind(record.audit.map(Audit::label));
            query.execute(&mut *tx).await.map_err(TelemetryError::Write)?;
        }
        tx.commit().await.map_err(TelemetryError::Write)
    }

    /// Every record, oldest first.
    pub async fn records(&self) -> Result<Vec<CallRecord>, TelemetryError> {
        let rows = sqlx::query(SELECT_CALLS).fetch_all(&self.pool).await.map_err(TelemetryError::Query)?;
        rows.iter().map(record_from_row).collect::<Result<_, _>>().map_err(TelemetryError::Query)
    }

    /// Deletes the rows of these trace ids, in one transaction; returns how many went. A replay
    /// run again onto the same database replaces its earlier rows this way.
    pub async fn delete_traces(&self, trace_ids: &[String]) -> Result<u64, TelemetryError> {
        let mut tx = self.pool.begin().await.map_err(TelemetryError::Write)?;
        let mut deleted = 0;
        for trace_id in trace_ids {
            let done = sqlx::query("DELETE FROM calls WHERE trace_id = $1")
                .bind(trace_id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(TelemetryError::Write)?;
            deleted += done.rows_affected();
        }
        tx.commit().await.map_err(TelemetryError::Write)?;
        Ok(deleted)
    }

    /// Deletes the rows older than `before_ms` (Unix milliseconds), a chunk per statement so
    /// that the writer is never held back long; returns how many went.
    pub async fn delete_before(&self, before_ms: i64) -> Result<u64, TelemetryError> {
        const CHUNK: i64 = 5_000;
        let mut deleted = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2)",
            )
            .bind(before_ms)
            .bind(CHUNK)
            .execute(&self.pool)
            .await
            .map_err(TelemetryError::Write)?;
            deleted += done.rows_affected();
            if done.rows_affected() < CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Keeps the rows of the last `keep` only: deletes older ones now, then every hour, for
    /// as long as the runtime runs (a failed round is logged and tried again next time).
    pub fn spawn_retention(&self, keep: Duration) -> tokio::task::JoinHandle<()> {
        const EVERY: Duration = Duration::from_secs(3600);
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_millis() as i64);
                let before_ms = now_ms.saturating_sub(keep.as_millis() as i64);
                match store.delete_before(before_ms).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(deleted, "telemetry rows past their retention deleted"),
                    Err(err) if store.pool.is_closed() => {
                        tracing::debug!(error = %err, "telemetry store closed: retention stops");
                        return;
                    }
                    Err(err) => tracing::warn!(error = %err, "telemetry retention failed; trying again in an hour"),
                }
                tokio::time::sleep(EVERY).await;
            }
        })
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

/// Brings the schema up to date. Migrations that a database applied but this build no longer
/// has are ignored: the shadow-comparison table moved to the adapters, which create it
/// themselves, and databases made before that still list its migration.
async fn migrate(mut migrator: sqlx::migrate::Migrator, pool: &AnyPool) -> Result<(), TelemetryError> {
    migrator.set_ignore_missing(true);
    migrator.run(pool).await.map_err(TelemetryError::from)
}

fn record_from_row(row: &AnyRow) -> Result<CallRecord, sqlx::Error> {
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
        source: word(row, "source", Source::parse)?,
        cache_hit: row.try_get::<i64, _>("cache_hit")? != 0,
        confidence: row.try_get("confidence")?,
        status: word(row, "status", CallStatus::parse)?,
        error_class: optional_word(row, "error_class", ErrorClass::parse)?,
        error_message: row.try_get("error_message")?,
        attempts: row.try_get("attempts")?,
        rate_limit_wait_ms: row.try_get("rate_limit_wait_ms")?,
        breaker_state: optional_word(row, "breaker_state", BreakerState::parse)?,
        saved_tokens: row.try_get("saved_tokens")?,
        similarity: row.try_get("similarity")?,
        route: row
            .try_get::<Option<String>, _>("route")?
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|err| sqlx::Error::Decode(format!("column `route`: {err}").into()))?,
        streamed: row.try_get::<i64, _>("streamed")? != 0,
        ttft_ms: row.try_get("ttft_ms")?,
        audit: optional_word(row, "audit", Audit::parse)?,
    })
}

/// A column that holds one of telemetry's words ([`Source`], [`CallStatus`], ...), read back
/// into its type; an unknown word is a decoding error that names the column.
pub(crate) fn word<T>(row: &AnyRow, column: &str, parse: fn(&str) -> Option<T>) -> Result<T, sqlx::Error> {
    known(column, &row.try_get::<String, _>(column)?, parse)
}

pub(crate) fn optional_word<T>(
    row: &AnyRow,
    column: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>, sqlx::Error> {
    row.try_get::<Option<String>, _>(column)?.map(|text| known(column, &text, parse)).transpose()
}

fn known<T>(column: &str, text: &str, parse: fn(&str) -> Option<T>) -> Result<T, sqlx::Error> {
    parse(text).ok_or_else(|| sqlx::Error::Decode(format!("column `{column}` holds an unknown value `{text}`").into()))
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
