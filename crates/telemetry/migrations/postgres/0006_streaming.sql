-- Whether the caller streamed the answer, and for a streamed call the time to its first token.
ALTER TABLE calls ADD COLUMN IF NOT EXISTS streamed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS ttft_ms DOUBLE PRECISION;
