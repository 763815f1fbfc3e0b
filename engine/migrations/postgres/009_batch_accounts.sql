-- A batch sent through one of its tenant's provider accounts (engine.accounts); NULL: the
-- server's default account for its provider (the environment's mock or SMTP settings).
-- No foreign key: an account cannot be deleted while an unfinished batch uses it
-- (engine.accounts.delete), and a finished batch keeps the id it was sent with.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS provider_account_id uuid;
CREATE INDEX IF NOT EXISTS batches_account ON batches (provider_account_id)
    WHERE provider_account_id IS NOT NULL;
-- Why a batch is paused when the engine paused it (the provider suspended the account,
-- its daily quota is used up), and when the engine resumes it by itself (the quota window
-- reopens; NULL: only an operator's resume). An operator's pause sets neither.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS pause_reason text;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS resume_at timestamptz;
CREATE INDEX IF NOT EXISTS batches_resume_due ON batches (resume_at)
    WHERE status = 'paused' AND resume_at IS NOT NULL;
