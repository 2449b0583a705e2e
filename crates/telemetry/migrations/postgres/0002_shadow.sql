-- Shadow mode: for each call a legacy component served, how the engine's answer compared.
CREATE TABLE IF NOT EXISTS shadow_comparisons (
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
);

CREATE INDEX IF NOT EXISTS shadow_by_component ON shadow_comparisons (component, ts_ms);
