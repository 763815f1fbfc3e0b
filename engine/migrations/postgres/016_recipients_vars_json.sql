-- A recipient's vars stored as json (the text as written) instead of jsonb. Nothing
-- queries inside them: they are written once by COPY and read back whole with the chunk's
-- recipients, so jsonb's parsed form only cost its building at COPY (2.05 -> 1.65 us of
-- PostgreSQL CPU per recipient) and its printing back to text at every read (1.0 -> 0.7
-- us), plus a version byte added and cut on the client (bench/RESULTS.md, 2026-12-04).
-- The intake writes them with orjson (no NUL, no duplicate keys), so json and jsonb hold
-- the same values. Rewrites the table once, under its lock; the view that shows the
-- column is made again as 014 made it.
DROP VIEW recipient_statuses;
ALTER TABLE recipients ALTER COLUMN vars TYPE json USING vars::json;
CREATE VIEW recipient_statuses AS
SELECT r.batch_id, r.seq, r.email, r.name, r.vars,
       CASE WHEN r.status = 'queued' THEN coalesce((
           SELECT CASE WHEN get_bit(f.bits, (r.seq - 1) & 1023) = 0 THEN NULL
                       WHEN get_bit(f.delivered, (r.seq - 1) & 1023) = 1 THEN 'delivered'
                       ELSE 'sent' END
             FROM recipient_finals f
            WHERE f.batch_id = r.batch_id AND f.block = (r.seq - 1) >> 10), 'queued')
            ELSE r.status END AS status,
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
           SELECT d.delivered_at FROM recipient_deliveries d
            WHERE d.batch_id = r.batch_id AND d.block = (r.seq - 1) >> 10
              AND r.seq = ANY(d.seqs)), (
           SELECT s.sent_at FROM recipient_sends s
            WHERE s.batch_id = r.batch_id AND s.block = (r.seq - 1) >> 10
              AND r.seq = ANY(s.seqs))) AS updated_at,
       r.status AS stored_status
  FROM recipients r;
