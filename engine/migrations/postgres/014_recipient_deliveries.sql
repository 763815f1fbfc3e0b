-- A delivered event of a sent recipient is written once per block and flush, not once per
-- recipient (engine.lifecycle, bench/RESULTS.md), as its send is since 011:
--
-- `recipient_finals.stored`: the final recipients whose status is in their own row (a final
-- transition other than `sent`: failed, cancelled, a provider event that came first; and
-- every later event but a delivered of a sent recipient). A final recipient whose bit is not
-- set here is a sent one: its row says `queued`.
-- `recipient_finals.delivered`: the sent recipients a delivered event has reached. Only a
-- sent recipient (final, not stored) gets this bit, in the statement that counts it, so a
-- bit that was already set means "already delivered". `before` is now the bits the last
-- write changed (`bits` or `delivered`), as they were before it.
-- `recipient_deliveries`: when (`delivered_at`) the recipients of one block (`seqs`,
-- ascending) became delivered in one status write. A recipient is in at most one row.
ALTER TABLE recipient_finals
    ADD COLUMN IF NOT EXISTS stored bit varying(1024) NOT NULL DEFAULT B'0'::bit(1024),
    ADD COLUMN IF NOT EXISTS delivered bit varying(1024) NOT NULL DEFAULT B'0'::bit(1024);
CREATE TABLE IF NOT EXISTS recipient_deliveries (
    batch_id      uuid NOT NULL,
    block         integer NOT NULL,
    first_seq     integer NOT NULL,
    seqs          integer[] NOT NULL,
    delivered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, block, first_seq)
);
-- What is final already: a final recipient whose row says `queued` is a sent one (the view
-- shows it so); every other final recipient is stored.
UPDATE recipient_finals f
   SET stored = f.bits & ~coalesce((
       SELECT bit_or(B'1'::bit(1024) >> ((r.seq - 1) & 1023)) FROM recipients r
        WHERE r.batch_id = f.batch_id AND r.status = 'queued'
          AND r.seq > f.block * 1024 AND r.seq <= f.block * 1024 + 1024), B'0'::bit(1024));
-- As in 011, each lookup its own subquery (see there); a delivered recipient's time is its
-- delivery's.
CREATE OR REPLACE VIEW recipient_statuses AS
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
