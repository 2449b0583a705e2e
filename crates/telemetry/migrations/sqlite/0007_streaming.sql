-- Whether the caller streamed the answer, and for a streamed call the time to its first token.
ALTER TABLE calls ADD COLUMN streamed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN ttft_ms REAL;
