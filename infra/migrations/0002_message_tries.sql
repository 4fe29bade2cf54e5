-- Provider calls counted against a message's attempt budget (rate-limit 429s are not counted).
-- `attempt` stays the lease's fencing number: it grows with every claim and retry.
ALTER TABLE messages ADD COLUMN tries integer NOT NULL DEFAULT 0;
UPDATE messages SET tries = attempt WHERE status IN ('completed', 'failed');
