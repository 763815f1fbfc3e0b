-- Leave room in each page so the status writer's updates stay HOT (heap-only: no new
-- primary-key entry, no new page): each recipient is updated once or twice after COPY.
-- Measured in bench/RESULTS.md.
ALTER TABLE recipients SET (fillfactor = 50);
