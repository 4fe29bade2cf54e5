-- A tenant's own webhook endpoints: each is sent every batch event of the tenant, signed with
-- its own secret (made when the endpoint is, shown once, stored sealed). A 410 from the receiver
-- turns the endpoint off (`disabled_reason` says so) until it is turned on again.
CREATE TABLE webhook_endpoints (
    tenant_id       text        NOT NULL,
    id              uuid        PRIMARY KEY,
    url             text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    secret          text        NOT NULL,
    enabled         boolean     NOT NULL DEFAULT true,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id, created_at);

-- One event's delivery to one endpoint, with the same lease-and-attempt fencing as a batch's
-- own webhook: each take is a new attempt, and only the latest attempt may record its result.
CREATE TABLE webhook_deliveries (
    endpoint_id uuid        NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    batch_id    uuid        NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    event       text        NOT NULL,
    status      text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts    integer     NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL DEFAULT now(),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, batch_id, event)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_batch ON webhook_deliveries (batch_id);
