-- Sentinel-1 GRD and SLC products: inputs of CARD generation, not scenes the worker extracts.
--
-- The watcher records them here (never as rejections) with the same data identity as scenes, so
-- one acquisition seen in two collections or sources (CDSE COG-GRD and earth-search's SAFE GRD)
-- is one row. They wait in 'awaiting_card' until the CARD-generation job exists; that job will
-- claim them here and produce the 'bs'/'c6' scenes the worker extracts. No outbox row is written
-- for them, so nothing is published to the extraction queue.
CREATE TABLE IF NOT EXISTS card_inputs (
    id              bigserial PRIMARY KEY,
    acq_key         text NOT NULL UNIQUE,
    kind            text NOT NULL CHECK (kind IN ('grd', 'slc')),
    status          text NOT NULL DEFAULT 'awaiting_card' CHECK (status IN ('awaiting_card')),
    product_id      text NOT NULL,
    product_name    text NOT NULL,
    mission         text NOT NULL,
    product_type    text NOT NULL,
    relative_orbit  integer,
    acquired_at     timestamptz NOT NULL,
    footprint       geometry(MultiPolygon, 4326) NOT NULL,
    location        text NOT NULL,
    source          text,
    collection      text,
    baseline        integer NOT NULL DEFAULT 0,
    checksum        text,
    source_updated  text,
    published_at    timestamptz,
    deleted_at      timestamptz,
    superseded_ids  text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS card_inputs_product_idx ON card_inputs (product_id);
CREATE INDEX IF NOT EXISTS card_inputs_status_idx ON card_inputs (kind, status);
