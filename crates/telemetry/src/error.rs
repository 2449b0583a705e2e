#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "cannot open the telemetry database `{url}`: {source} (check `telemetry.database_url` and that its folder is writable)"
    )]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot migrate the telemetry database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("telemetry database write failed: {0}")]
    Write(sqlx::Error),
    #[error("telemetry database query failed: {0}")]
    Query(sqlx::Error),
    #[error("the telemetry writer has stopped")]
    WriterStopped,
}

impl TelemetryError {
    /// A write that failed on a busy or briefly unreachable database may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Write(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Database(_)))
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Migrate(_) => "migrate",
            Self::Write(_) => "write",
            Self::Query(_) => "query",
            Self::WriterStopped => "writer_stopped",
        }
    }
}
