-- `Idempotency-Key` on POST /message/create: the first answer to a key, kept (sealed: it may
-- hold a webhook secret) with a hash of the body it answered, so that the same key and body
-- get that answer again and the same key with another body is refused. Written in the
-- submission's own transaction; a key older than IDEMPOTENCY_TTL_S is free again.
CREATE TABLE idempotency_keys (
    tenant_id  text        NOT NULL,
    key        text        NOT NULL,
    body_hash  bytea       NOT NULL,
    answer     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
