-- What the resilience layer did to a call: how long it waited on rate limits and Retry-After
-- pauses, and the state of its provider/model's circuit breaker after its last attempt. What a
-- call served without an upstream request saved in tokens, and how similar its match was.
ALTER TABLE calls ADD COLUMN rate_limit_wait_ms REAL NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN breaker_state TEXT;
ALTER TABLE calls ADD COLUMN saved_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN similarity REAL;
