-- Signed webhooks (Standard Webhooks): each batch with a `webhook_url` gets its own secret,
-- `whsec_` + base64 of 32 random bytes, shown once in the answer that created the batch and
-- read afterwards only by the sweeper, to sign each delivery. Batches stored before this
-- migration have none (NULL): their webhooks keep being delivered, unsigned.
ALTER TABLE batches ADD COLUMN webhook_secret text;
