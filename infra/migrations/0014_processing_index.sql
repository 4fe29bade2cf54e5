-- The sweeper finds messages whose lease ran out among those being processed. Indexed by
-- their id rather than their lease, so that extending a lease, which changes only
-- `lease_until`, touches no index and stays a heap-only update.
DROP INDEX IF EXISTS messages_leased;
CREATE INDEX messages_processing ON messages (id) WHERE status = 'processing';
