-- For an audit of a semantic hit: whether the model's own answer agreed with the cached one.
ALTER TABLE calls ADD COLUMN audit TEXT;
