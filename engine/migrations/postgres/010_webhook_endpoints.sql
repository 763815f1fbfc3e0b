-- Event webhooks to the customer: a tenant's endpoints (engine.webhook_endpoints) and what
-- is to be posted to them (engine.webhook_deliveries). The signing secret is sealed (Fernet
-- under a key derived from CREDENTIALS_KEYS); only a masked hint of it is kept in the clear.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    url              text NOT NULL,
    event_types      text[] NOT NULL,
    description      text,
    secret           bytea NOT NULL,
    secret_hint      text NOT NULL,
    disabled_at      timestamptz,         -- the endpoint answered 410 Gone: nothing more is sent
    disabled_reason  text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_tenant ON webhook_endpoints (tenant_id, created_at, id);

-- The outbox and the delivery log in one: one row per POST (its id is the webhook-id
-- header), written before the results behind it are acknowledged, posted apart from that.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id                uuid PRIMARY KEY,
    endpoint_id       uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    status            text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    body              bytea NOT NULL,     -- exactly the bytes posted and signed
    event_count       integer NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),  -- while pending (also a claim's lease)
    last_attempt_at   timestamptz,
    last_status_code  integer,            -- the HTTP status of the last attempt; NULL: no answer
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    replayed_at       timestamptz
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_log
    ON webhook_deliveries (endpoint_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS webhook_deliveries_created ON webhook_deliveries (created_at);

-- Results messages already turned into deliveries, by their RESULTS stream sequence and the
-- time they were published (a stream created anew starts its sequence again): a message
-- redelivered after its deliveries were written adds none a second time.
CREATE TABLE IF NOT EXISTS webhook_results_seen (
    stream_seq  bigint NOT NULL,
    published   double precision NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_seq, published)
);
CREATE INDEX IF NOT EXISTS webhook_results_seen_at ON webhook_results_seen (seen_at);

-- batch.completed, once per (endpoint, batch): the row is written in the transaction that
-- writes the delivery carrying the event.
CREATE TABLE IF NOT EXISTS webhook_batch_completions (
    endpoint_id  uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    batch_id     uuid NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, batch_id)
);
CREATE INDEX IF NOT EXISTS webhook_batch_completions_created
    ON webhook_batch_completions (created_at);

-- The batches a tenant completed lately (the batch.completed sweep reads a few minutes).
CREATE INDEX IF NOT EXISTS batches_completed ON batches (tenant_id, completed_at)
    WHERE completed_at IS NOT NULL;
