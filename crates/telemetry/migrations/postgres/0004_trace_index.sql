-- A call is found by its trace id (a replay run again replaces its earlier rows by them).
CREATE INDEX IF NOT EXISTS calls_by_trace ON calls (trace_id);
