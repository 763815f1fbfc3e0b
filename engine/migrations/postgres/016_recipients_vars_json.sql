-- A recipient's vars stored as json (the text as written) instead of jsonb. Nothing
-- queries inside them: they are written once by COPY and read back whole with the chunk's
-- recipients, so jsonb's parsed form only cost its building at COPY (2.05 -> 1.65 us of
-- PostgreSQL CPU per recipient) and its printing back to text at every read (1.0 -> 0.7
-- us), plus a version byte added and cut on the client (bench/RESULTS.md, 2026-12-04).
-- The intake writes them with orjson (no NUL, no duplicate keys), so json and jsonb hold
-- the same values. Rewrites the table once, under its lock; the view that shows the
-- column is made again from its own definition.
DO $$
DECLARE
    definition text := pg_get_viewdef('recipient_statuses'::regclass);
BEGIN
    DROP VIEW recipient_statuses;
    ALTER TABLE recipients ALTER COLUMN vars TYPE json USING vars::json;
    EXECUTE 'CREATE VIEW recipient_statuses AS ' || definition;
END
$$;
