-- A batch's messages are relayed as one: the batch carries `relay_after`, cleared once every
-- shard's publish is confirmed, so that a 10,000-prompt submission marks one row, not 10,000.
-- A message alone (and one handed back by a deferral) keeps its own `relay_after`, now set
-- where it is needed rather than by default.
ALTER TABLE batches ADD COLUMN relay_after timestamptz;
ALTER TABLE batches ALTER COLUMN relay_after SET DEFAULT now() + interval '60 seconds';
CREATE INDEX batches_to_relay ON batches (relay_after) WHERE relay_after IS NOT NULL;
ALTER TABLE messages ALTER COLUMN relay_after DROP DEFAULT;
