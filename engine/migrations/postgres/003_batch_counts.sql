-- Recipients per status of each batch, kept up to date by the status writer in the same
-- transaction as the status changes, so reading a batch never counts its recipients
-- (a 1,000,000-recipient batch polled by a dashboard must not cost a core).
CREATE TABLE IF NOT EXISTS batch_counts (
    batch_id  uuid NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    status    text NOT NULL,
    n         integer NOT NULL,
    PRIMARY KEY (batch_id, status)
);
INSERT INTO batch_counts (batch_id, status, n)
SELECT batch_id, status, count(*)::int FROM recipients GROUP BY batch_id, status
ON CONFLICT (batch_id, status) DO NOTHING;
