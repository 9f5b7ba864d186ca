-- Core catalogue, datasets, jobs and users. Per-dataset parcel, signature and histogram tables
-- live in the dataset's own schema and are created by `cbmflow parcels import` (see
-- cbmflow/datasets.py), with names taken from the datasets table, never from user input.
CREATE EXTENSION IF NOT EXISTS postgis;

CREATE TABLE IF NOT EXISTS aois (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,30}$'),
    geom        geometry(MultiPolygon, 4326) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS aois_geom_gix ON aois USING gist (geom);

CREATE TABLE IF NOT EXISTS datasets (
    id            serial PRIMARY KEY,
    aoi           text NOT NULL REFERENCES aois (name),
    year          integer NOT NULL CHECK (year BETWEEN 1990 AND 2100),
    schema_name   text NOT NULL CHECK (schema_name ~ '^[a-z][a-z0-9_]{0,62}$'),
    parcel_table  text NOT NULL CHECK (parcel_table ~ '^[a-z][a-z0-9_]{0,62}$'),
    sigs_table    text NOT NULL CHECK (sigs_table ~ '^[a-z][a-z0-9_]{0,62}$'),
    hists_table   text NOT NULL CHECK (hists_table ~ '^[a-z][a-z0-9_]{0,62}$'),
    srid          integer NOT NULL,
    description   text NOT NULL DEFAULT '',
    buffer_m      double precision NOT NULL DEFAULT 0 CHECK (buffer_m <= 0),
    min_pixels    integer NOT NULL DEFAULT 1 CHECK (min_pixels >= 1),
    parcels_version bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (aoi, year)
);

CREATE TABLE IF NOT EXISTS scenes (
    id            bigserial PRIMARY KEY,
    product_id    text NOT NULL UNIQUE,
    product_name  text NOT NULL,
    mission       text NOT NULL,
    sensor        text NOT NULL,
    card          text NOT NULL CHECK (card IN ('s2', 'bs', 'c6')),
    acquired_at   timestamptz NOT NULL,
    footprint     geometry(MultiPolygon, 4326) NOT NULL,
    location      text NOT NULL,
    status        text NOT NULL DEFAULT 'discovered'
                  CHECK (status IN ('discovered', 'queued', 'processing', 'extracted', 'failed', 'no_parcels')),
    reason        text,
    attempts      integer NOT NULL DEFAULT 0,
    lease_owner   text,
    lease_until   timestamptz,
    rows_written  bigint,
    source_updated text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS scenes_footprint_gix ON scenes USING gist (footprint);
CREATE INDEX IF NOT EXISTS scenes_status_idx ON scenes (status);
CREATE INDEX IF NOT EXISTS scenes_acquired_idx ON scenes (acquired_at);

-- Transactional outbox: a row is written in the same transaction as the scene it announces and
-- marked published only after the broker confirmed it, so a crash between the
-- two re-sends (harmless: message ids are scene ids) instead of losing the job.
CREATE TABLE IF NOT EXISTS outbox (
    id            bigserial PRIMARY KEY,
    message_id    text NOT NULL,
    kind          text NOT NULL,
    body          jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE IF NOT EXISTS workers (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    state         text NOT NULL CHECK (state IN ('starting', 'idle', 'busy', 'draining', 'stopped')),
    current_scene bigint,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    name          text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    password_hash text NOT NULL,
    is_admin      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS user_grants (
    user_name     text NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    aoi           text NOT NULL,
    PRIMARY KEY (user_name, aoi)
);
