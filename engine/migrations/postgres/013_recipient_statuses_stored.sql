-- The view also gives the status a recipient's own row holds (`stored_status`): a filter by
-- status can test it first (engine.lifecycle.stored_as) and read the final bits only of
-- rows that may be `sent`, instead of one probe per row for a status nobody has now.
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
              AND r.seq = ANY(s.seqs))) AS updated_at,
       r.status AS stored_status
  FROM recipients r;
