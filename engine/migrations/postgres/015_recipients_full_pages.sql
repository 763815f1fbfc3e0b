-- Pages of recipients filled again (002 left half of each page free so that the status
-- writer's one or two updates per recipient stayed HOT). Since 011 and 014 a sent or
-- delivered recipient's row is never updated: only a failure, a cancel or a later provider
-- event writes a row, and those are few. Full pages halve the table (and its WAL, and
-- what reading a chunk's recipients touches): COPY 2.5 -> 2.0 us and the chunk's read
-- 1.0 -> 0.9 us of PostgreSQL CPU per recipient (bench/RESULTS.md, 2026-12-04). Pages
-- written before keep their room.
ALTER TABLE recipients SET (fillfactor = 100);
