-- The same table as the SQLite set, in PostgreSQL's types: sqlx's Any driver reads BIGINT as
-- i64 and DOUBLE PRECISION as f64 (REAL would be f32), and booleans are stored as 0/1 BIGINT
-- as in SQLite, so that one query path reads both.
CREATE TABLE IF NOT EXISTS calls (
    id                 BIGSERIAL PRIMARY KEY,
    ts_ms              BIGINT           NOT NULL,
    step               TEXT             NOT NULL,
    component          TEXT             NOT NULL,
    workspace          TEXT             NOT NULL,
    trace_id           TEXT             NOT NULL,
    model              TEXT             NOT NULL,
    provider           TEXT             NOT NULL,
    input_tokens       BIGINT           NOT NULL,
    output_tokens      BIGINT           NOT NULL,
    latency_ms         DOUBLE PRECISION NOT NULL,
    cost_usd           DOUBLE PRECISION NOT NULL,
    saved_cost_usd     DOUBLE PRECISION NOT NULL,
    source             TEXT             NOT NULL,
    cache_hit          BIGINT           NOT NULL,
    confidence         DOUBLE PRECISION NOT NULL,
    status             TEXT             NOT NULL,
    error_class        TEXT,
    error_message      TEXT,
    attempts           BIGINT           NOT NULL,
    rate_limit_wait_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    breaker_state      TEXT,
    saved_tokens       BIGINT           NOT NULL DEFAULT 0,
    similarity         DOUBLE PRECISION
);

CREATE INDEX IF NOT EXISTS calls_by_time ON calls (ts_ms);
CREATE INDEX IF NOT EXISTS calls_by_component ON calls (component, ts_ms);
