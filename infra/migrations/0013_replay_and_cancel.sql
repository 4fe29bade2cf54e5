-- A batch cancelled stops its queued messages and keeps what is done; its webhook says so.
-- Failed messages can be sent again, which opens a finished batch again: `finishes` counts how
-- often it has finished, so that each finish is a new webhook event with an id of its own.
ALTER TABLE batches ADD COLUMN cancelled_at timestamptz;
ALTER TABLE batches ADD COLUMN finishes integer NOT NULL DEFAULT 0;
UPDATE batches SET finishes = 1 WHERE finished_at IS NOT NULL;
