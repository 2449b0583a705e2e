CREATE TABLE IF NOT EXISTS calls (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms          INTEGER NOT NULL,
    step           TEXT    NOT NULL,
    component      TEXT    NOT NULL,
    workspace      TEXT    NOT NULL,
    trace_id       TEXT    NOT NULL,
    model          TEXT    NOT NULL,
    provider       TEXT    NOT NULL,
    input_tokens   INTEGER NOT NULL,
    output_tokens  INTEGER NOT NULL,
    latency_ms     REAL    NOT NULL,
    cost_usd       REAL    NOT NULL,
    saved_cost_usd REAL    NOT NULL,
    source         TEXT    NOT NULL,
    cache_hit      INTEGER NOT NULL,
    confidence     REAL    NOT NULL,
    status         TEXT    NOT NULL,
    error_class    TEXT,
    error_message  TEXT,
    attempts       INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS calls_by_time ON calls (ts_ms);
CREATE INDEX IF NOT EXISTS calls_by_component ON calls (component, ts_ms);
