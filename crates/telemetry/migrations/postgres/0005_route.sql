-- How the route chose a call's model (JSON: strategy, chosen, excluded with reasons).
ALTER TABLE calls ADD COLUMN IF NOT EXISTS route TEXT;
