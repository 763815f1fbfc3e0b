-- When a key was last used (to a minute: written when a process first checks the key after
-- a minute or more), and the tenant's keys listed newest first.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS last_used_at timestamptz;
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id, id DESC);
