-- Tenants and their API keys. A key is shown once, when it is made, and stored only as its
-- SHA-256 (keys are 256 random bits, so a fast hash is enough: there is nothing to guess);
-- `prefix` is its first characters, to tell keys apart in a listing. A revoked key stays, with
-- `revoked_at`, so that a listing shows what was revoked and when.
CREATE TABLE tenants (
    id         text        PRIMARY KEY,
    name       text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id         uuid        PRIMARY KEY,
    tenant_id  text        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_hash   bytea       NOT NULL UNIQUE,
    prefix     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);

-- Every tenant that already owns something (before this, all of it was the default tenant's).
INSERT INTO tenants (id)
SELECT tenant_id FROM providers UNION SELECT tenant_id FROM queues
UNION SELECT tenant_id FROM batches UNION SELECT tenant_id FROM messages
ON CONFLICT DO NOTHING;
