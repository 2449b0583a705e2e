-- Shadow mode: for each call a legacy component served, how the engine's answer compared.
CREATE TABLE IF NOT EXISTS shadow_comparisons (
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
);

CREATE INDEX IF NOT EXISTS shadow_by_component ON shadow_comparisons (component, ts_ms);
