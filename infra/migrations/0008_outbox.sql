-- The transactional outbox: a message is committed with `relay_after` set, and its publish to
-- the broker clears it once the broker has confirmed it. A message still unconfirmed after
-- `relay_after` (longer than an API function runs) was committed by a process that died or
-- failed before its publish was confirmed: the sweeper publishes it then. Messages stored
-- before this migration were published when they were stored (NULL: nothing to relay).
ALTER TABLE messages ADD COLUMN relay_after timestamptz;
ALTER TABLE messages ALTER COLUMN relay_after SET DEFAULT now() + interval '60 seconds';
CREATE INDEX messages_to_relay ON messages (relay_after) WHERE relay_after IS NOT NULL;
