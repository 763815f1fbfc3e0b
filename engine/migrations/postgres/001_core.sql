-- Tenants, hashed API keys, batches, recipients, suppressions.
CREATE TABLE IF NOT EXISTS tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS api_keys (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants(id),
    key_hash    bytea NOT NULL UNIQUE,          -- sha256 of the key; the key itself is never stored
    prefix      text NOT NULL,                  -- first characters, to recognise a key in lists
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE IF NOT EXISTS batches (
    id                uuid PRIMARY KEY,
    tenant_id         text NOT NULL REFERENCES tenants(id),
    name              text NOT NULL,
    from_email        text NOT NULL,
    from_name         text,
    subject           text NOT NULL,
    html              text,
    text              text,
    provider          text NOT NULL,
    status            text NOT NULL CHECK (status IN ('creating', 'draft', 'scheduled', 'queued',
                          'processing', 'completed', 'paused', 'cancelled', 'failed')),
    total_recipients  integer NOT NULL DEFAULT 0,
    final_count       integer NOT NULL DEFAULT 0,   -- recipients in a final status
    suppressed_count  integer NOT NULL DEFAULT 0,
    chunk_size        integer NOT NULL,
    dry_run           boolean NOT NULL DEFAULT false,
    metadata          jsonb,
    external_id       text,                         -- Nats-Msg-Id of a batch published to NATS
    idempotency_key   text,
    request_hash      bytea,
    scheduled_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    queued_at         timestamptz,
    started_at        timestamptz,
    completed_at      timestamptz
);
CREATE INDEX IF NOT EXISTS batches_tenant_created ON batches (tenant_id, created_at DESC);
CREATE UNIQUE INDEX IF NOT EXISTS batches_external_id ON batches (tenant_id, external_id)
    WHERE external_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS batches_idempotency_key ON batches (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- One row per recipient, written once by COPY at intake and updated in bulk by the
-- status writer (one statement per flush). No index on status: every status change
-- would then cost an index write; counts per status are read by the primary key range.
CREATE TABLE IF NOT EXISTS recipients (
    batch_id             uuid NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    seq                  integer NOT NULL,
    email                text NOT NULL,
    name                 text,
    vars                 jsonb,
    status               text NOT NULL,
    provider_message_id  text,
    error                text,
    attempts             smallint NOT NULL DEFAULT 0,
    updated_at           timestamptz,
    PRIMARY KEY (batch_id, seq)
);

CREATE TABLE IF NOT EXISTS suppressions (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    email       text NOT NULL,                 -- lower-cased
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, email)
);
