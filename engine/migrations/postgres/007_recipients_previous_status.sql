-- The status a recipient had before its last provider event (engine.lifecycle): written by
-- the same UPDATE that moves it, so the counts move from the status it really had without
-- locking the row first (one write per event instead of a lock and a write). Nullable, no
-- default: adding it rewrites nothing.
ALTER TABLE recipients ADD COLUMN IF NOT EXISTS previous_status text;
