-- A message that used up its budget of tries is failed and dead-lettered: `dead_lettered_at`
-- says when, `last_error` why. The sweeper finds messages whose lease ran out with nobody to
-- take them over (their worker died, and so did every copy on the broker) by their lease.
ALTER TABLE messages ADD COLUMN dead_lettered_at timestamptz;
CREATE INDEX messages_leased ON messages (lease_until) WHERE status = 'processing';
