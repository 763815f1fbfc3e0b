-- A sent recipient's status is written once per provider call, not once per recipient
-- (engine.lifecycle, bench/RESULTS.md): its row in `recipients` keeps `queued`, and the
-- call's results are one row of arrays. Two tables, both without foreign keys (like
-- `recipients`: written only for batches that exist, and batches are never deleted):
--
-- `recipient_finals`: per block of 1024 recipients of a batch (block k holds seqs
-- k*1024+1 .. k*1024+1024; bit i of `bits`, counted from the left, is seq k*1024+i+1) the
-- recipients that have had their final transition, whatever it was. Every final transition
-- sets its bit in the same statement, so a bit that was already set means "already final":
-- the exactly-once guard for each recipient, and the row lock that orders two writers of one
-- block. `before` is the bits as they were before the last write (RETURNING reads it).
CREATE TABLE IF NOT EXISTS recipient_finals (
    batch_id  uuid NOT NULL,
    block     integer NOT NULL,
    bits      bit varying(1024) NOT NULL,
    before    bit varying(1024) NOT NULL,
    PRIMARY KEY (batch_id, block)
);

-- `recipient_sends`: the recipients of one block that one status write made `sent`: `mask`
-- (the block's bits, as above) and their provider message ids and attempts, in seq order
-- (the n-th set bit is the n-th element). A recipient is in at most one row.
CREATE TABLE IF NOT EXISTS recipient_sends (
    batch_id   uuid NOT NULL,
    block      integer NOT NULL,
    first_seq  integer NOT NULL,
    mask       bit varying(1024) NOT NULL,
    pmids      text[] NOT NULL,
    attempts   smallint[] NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, block, first_seq)
);

-- What was already final before this schema: every recipient past `queued`.
INSERT INTO recipient_finals (batch_id, block, bits, before)
SELECT batch_id, (seq - 1) >> 10, bit_or(B'1'::bit(1024) >> ((seq - 1) & 1023)),
       B'0'::bit(1024)
  FROM recipients WHERE status NOT IN ('pending', 'queued')
 GROUP BY 1, 2
ON CONFLICT (batch_id, block) DO NOTHING;

-- A recipient as the API shows it: `sent` when its row says `queued` and its final bit is
-- set (its send is in `recipient_sends`); the provider message id, attempts and time of a
-- send written there. Each lookup is its own subquery (one primary-key probe per recipient,
-- whatever the tables' statistics), so a query that reads only the status never looks in
-- `recipient_sends`. The sender reads the recipients still to send of a chunk without the
-- view, its few blocks once (engine.lifecycle.TO_SEND).
CREATE OR REPLACE VIEW recipient_statuses AS
SELECT r.batch_id, r.seq, r.email, r.name, r.vars,
       CASE WHEN r.status = 'queued' AND (
           SELECT get_bit(f.bits, (r.seq - 1) & 1023) FROM recipient_finals f
            WHERE f.batch_id = r.batch_id AND f.block = (r.seq - 1) >> 10) = 1
            THEN 'sent' ELSE r.status END AS status,
       coalesce((
           SELECT s.pmids[bit_count(substring(s.mask FROM 1 FOR (r.seq - 1) & 1023)) + 1]
             FROM recipient_sends s
            WHERE s.batch_id = r.batch_id AND s.block = (r.seq - 1) >> 10
              AND get_bit(s.mask, (r.seq - 1) & 1023) = 1), r.provider_message_id)
           AS provider_message_id,
       r.error,
       greatest(r.attempts, (
           SELECT s.attempts[bit_count(substring(s.mask FROM 1 FOR (r.seq - 1) & 1023)) + 1]
             FROM recipient_sends s
            WHERE s.batch_id = r.batch_id AND s.block = (r.seq - 1) >> 10
              AND get_bit(s.mask, (r.seq - 1) & 1023) = 1)) AS attempts,
       coalesce(r.updated_at, (
           SELECT s.sent_at FROM recipient_sends s
            WHERE s.batch_id = r.batch_id AND s.block = (r.seq - 1) >> 10
              AND get_bit(s.mask, (r.seq - 1) & 1023) = 1)) AS updated_at
  FROM recipients r;
