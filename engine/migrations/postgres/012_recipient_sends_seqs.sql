-- `recipient_sends` names its recipients by their seqs (`seqs`, ascending; the provider
-- message ids and attempts at the same places) instead of by bits (`mask`): building the
-- bits cost the status write one more aggregate per recipient (bench/RESULTS.md). Rows of
-- the 011 shape are converted; the view reads the new column.
ALTER TABLE recipient_sends ADD COLUMN IF NOT EXISTS seqs integer[];
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
                WHERE table_name = 'recipient_sends' AND column_name = 'mask'
                  AND table_schema = current_schema()) THEN
        UPDATE recipient_sends
           SET seqs = ARRAY(SELECT block * 1024 + i + 1 FROM generate_series(0, 1023) AS i
                             WHERE get_bit(mask, i) = 1 ORDER BY i)
         WHERE seqs IS NULL;
    END IF;
END $$;
ALTER TABLE recipient_sends ALTER COLUMN seqs SET NOT NULL;

-- As in 011, each lookup its own subquery (see there).
CREATE OR REPLACE VIEW recipient_statuses AS
SELECT r.batch_id, r.seq, r.email, r.name, r.vars,
       CASE WHEN r.status = 'queued' AND (
           SELECT get_bit(f.bits, (r.seq - 1) & 1023) FROM recipient_finals f
            WHERE f.batch_id = r.batch_id AND f.block = (r.seq - 1) >> 10) = 1
            THEN 'sent' ELSE r.status END AS status,
       coalesce((
           SELECT s.pmids[array_position(s.seqs, r.seq)]
             FROM recipient_sends s
            WHERE s.batch_id = r.batch_id AND s.block = (r.seq - 1) >> 10
              AND r.seq = ANY(s.seqs)), r.provider_message_id)
           AS provider_message_id,
       r.error,
       greatest(r.attempts, (
           SELECT s.attempts[array_position(s.seqs, r.seq)]
             FROM recipient_sends s
            WHERE s.batch_id = r.batch_id AND s.block = (r.seq - 1) >> 10
              AND r.seq = ANY(s.seqs))) AS attempts,
       coalesce(r.updated_at, (
           SELECT s.sent_at FROM recipient_sends s
            WHERE s.batch_id = r.batch_id AND s.block = (r.seq - 1) >> 10
              AND r.seq = ANY(s.seqs))) AS updated_at
  FROM recipients r;

ALTER TABLE recipient_sends DROP COLUMN IF EXISTS mask;
