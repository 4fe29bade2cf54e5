-- Providers, queues, batches and messages. Every tenant-owned row carries tenant_id.

CREATE TABLE providers (
    tenant_id       text        NOT NULL DEFAULT 'default',
    id              uuid        PRIMARY KEY,
    name            text        NOT NULL,
    provider_type   text        NOT NULL CHECK (provider_type IN ('openai', 'azure', 'anthropic', 'deepseek')),
    api_key         text        NOT NULL,
    request_limit   integer     NOT NULL CHECK (request_limit > 0),
    time_window     double precision NOT NULL CHECK (time_window > 0),
    token_limit     bigint      CHECK (token_limit > 0),
    max_concurrency integer     CHECK (max_concurrency > 0),
    config          jsonb       NOT NULL DEFAULT '{}',
    status          text        NOT NULL DEFAULT 'active',
    status_detail   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX providers_tenant_created ON providers (tenant_id, created_at);

CREATE TABLE queues (
    tenant_id  text        NOT NULL DEFAULT 'default',
    queue_id   text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, queue_id)
);

CREATE TABLE queue_providers (
    tenant_id   text             NOT NULL,
    queue_id    text             NOT NULL,
    provider_id uuid             NOT NULL REFERENCES providers (id),
    position    integer          NOT NULL,
    weight      double precision NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant_id, queue_id, provider_id),
    FOREIGN KEY (tenant_id, queue_id) REFERENCES queues (tenant_id, queue_id) ON DELETE CASCADE
);
CREATE INDEX queue_providers_provider ON queue_providers (provider_id);

CREATE TABLE batches (
    tenant_id          text        NOT NULL DEFAULT 'default',
    id                 uuid        PRIMARY KEY,
    queue_id           text        NOT NULL,
    total              integer     NOT NULL,
    webhook_url        text,
    webhook_event      text,
    webhook_status     text CHECK (webhook_status IN ('pending', 'delivered', 'failed')),
    webhook_attempts   integer     NOT NULL DEFAULT 0,
    webhook_next_at    timestamptz,
    webhook_last_error text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);
CREATE INDEX batches_tenant_created ON batches (tenant_id, created_at);
CREATE INDEX batches_webhook_due ON batches (webhook_next_at) WHERE webhook_status = 'pending';

CREATE TABLE messages (
    tenant_id         text        NOT NULL DEFAULT 'default',
    id                uuid        PRIMARY KEY,
    queue_id          text        NOT NULL,
    batch_id          uuid        REFERENCES batches (id) ON DELETE CASCADE,
    seq               integer     NOT NULL DEFAULT 0,
    custom_id         text,
    request           jsonb       NOT NULL,
    metadata          jsonb,
    status            text        NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    attempt           integer     NOT NULL DEFAULT 0,
    lease_until       timestamptz,
    provider_id       uuid,
    provider_name     text,
    model             text,
    response_text     text,
    response_raw      jsonb,
    prompt_tokens     integer,
    completion_tokens integer,
    latency_ms        integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_batch_seq ON messages (batch_id, seq);
CREATE INDEX messages_batch_status ON messages (batch_id, status);
CREATE INDEX messages_queue_status ON messages (tenant_id, queue_id, status);
