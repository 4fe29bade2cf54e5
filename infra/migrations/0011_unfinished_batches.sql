-- The sweep finishes every batch that is done in one statement: it looks only at unfinished ones.
CREATE INDEX batches_unfinished ON batches (created_at) WHERE finished_at IS NULL;
