-- A tenant's accounts at its providers (engine.accounts). The credentials and the webhook
-- secret are sealed (Fernet under a key derived from CREDENTIALS_KEYS); only a masked hint
-- of each credential is kept in the clear, for the API to show.
CREATE TABLE IF NOT EXISTS provider_accounts (
    id              uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    name            text NOT NULL,
    provider        text NOT NULL,
    credentials     bytea NOT NULL,
    hints           jsonb NOT NULL,
    webhook_secret  bytea,
    base_url        text,
    region          text,
    domain          text,
    rate_per_second double precision NOT NULL,
    burst           integer NOT NULL,
    daily_quota     integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE INDEX IF NOT EXISTS provider_accounts_tenant ON provider_accounts (tenant_id, created_at, id);
