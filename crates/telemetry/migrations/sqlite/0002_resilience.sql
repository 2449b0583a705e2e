-- What the resilience layer did to a call: how long it waited on rate limits and Retry-After
-- pauses, and the state of its provider/model's circuit breaker after its last attempt.
ALTER TABLE calls ADD COLUMN rate_limit_wait_ms REAL NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN breaker_state TEXT;
