-- One word per source across rows, metric labels and the gateway's `x-aipipe-source` header:
-- the caches are `exact` and `semantic` everywhere.
UPDATE calls SET source = 'exact' WHERE source = 'exact_cache';
UPDATE calls SET source = 'semantic' WHERE source = 'semantic_cache';
