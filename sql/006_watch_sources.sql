-- Catalogue watcher: rejected items, incremental cursors and the data identity of scenes.

-- An item the watcher cannot normalise (unknown collection, no geometry, unparsable name…) is
-- recorded here and skipped, so one bad item never blocks the items after it. Keyed on where it
-- came from, so a source that keeps serving it bumps last_seen instead of growing the table.
CREATE TABLE IF NOT EXISTS rejected_items (
    source      text NOT NULL,
    collection  text NOT NULL,
    item_id     text NOT NULL,
    reason      text NOT NULL,
    seen_count  integer NOT NULL DEFAULT 1,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, collection, item_id)
);
CREATE INDEX IF NOT EXISTS rejected_items_last_seen_idx ON rejected_items (last_seen DESC);

-- Incremental polling: the highest catalogue publication time committed per (source, collection,
-- AOI). It advances in the same transaction as the scenes and outbox rows of the items read, so a
-- restart resumes exactly where the last commit left off; each poll re-reads an overlap window
-- below it for items the catalogue published late.
CREATE TABLE IF NOT EXISTS watch_cursors (
    source         text NOT NULL,
    collection     text NOT NULL,
    aoi_key        text NOT NULL,
    published_hwm  timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, collection, aoi_key)
);

-- Data identity: one acquisition (mission, product level, tile or relative orbit, sensing time)
-- is one scene, whatever catalogue, collection, id or processing baseline announced it. The row
-- points at the product currently chosen for it (highest baseline); a newer baseline re-points
-- the same row and re-queues it, so the worker's per-scene delete+insert replaces the old rows in
-- one transaction. NULL acq_key: rows not written by the watcher (tests, benchmarks).
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS acq_key text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS baseline integer;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS checksum text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS source text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS collection text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS published_at timestamptz;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS deleted_at timestamptz;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS superseded_ids text[] NOT NULL DEFAULT '{}';
UPDATE scenes SET acq_key = product_id WHERE acq_key IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS scenes_acq_key_uq ON scenes (acq_key);
