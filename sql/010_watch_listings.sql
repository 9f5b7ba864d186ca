-- Deleted STAC items: a STAC API has no deletion feed, so the watcher lists the whole acquisition
-- window of a (source, collection, AOI) now and then (CBMFLOW_WATCH_DELETED_SWEEP_S) and marks
-- the scenes it catalogued from there that the listing no longer holds. This is when the last
-- complete listing was taken; a listing cut short (request budget, error) is not recorded.
CREATE TABLE IF NOT EXISTS watch_listings (
    source      text NOT NULL,
    collection  text NOT NULL,
    aoi_key     text NOT NULL,
    listed_at   timestamptz NOT NULL,
    items       integer NOT NULL,
    PRIMARY KEY (source, collection, aoi_key)
);
