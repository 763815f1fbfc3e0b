-- Batch control (pause, resume, cancel, schedule, recovery) and per-tenant limits.
-- generation: bumped by every resume/recovery; chunk messages carry it, so a worker whose
--   cached batch status is older than a message re-reads the batch before acting on it.
-- progress_at: the last time a recipient of the batch became final (the leader finds
--   stalled batches by it).
ALTER TABLE batches ADD COLUMN IF NOT EXISTS generation integer NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS progress_at timestamptz;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS paused_at timestamptz;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS cancelled_at timestamptz;
-- The leader's chores look only at batches that are not done yet.
CREATE INDEX IF NOT EXISTS batches_due ON batches (scheduled_at) WHERE status = 'scheduled';
CREATE INDEX IF NOT EXISTS batches_active ON batches (tenant_id)
    WHERE status IN ('scheduled', 'queued', 'processing', 'paused');
CREATE INDEX IF NOT EXISTS batches_unfinished ON batches (status)
    WHERE status IN ('queued', 'processing', 'cancelled') AND final_count < total_recipients;
-- Per-tenant limits; NULL means the server's default (TENANT_* settings).
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS max_batch_recipients integer;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS max_active_batches integer;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS send_rate text;
