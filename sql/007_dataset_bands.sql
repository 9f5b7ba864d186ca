-- The Sentinel-2 bands a dataset extracts. NULL is JRC's set: B02 B03 B04 B08 (10 m), B05 B11
-- (20 m) and SCL histograms. Otherwise any L2A reflectance band, each read on its native grid
-- (B01 B09 at 60 m; B05 B06 B07 B8A B11 B12 at 20 m), so that red-edge and SWIR indices can be
-- computed; SCL histograms are written whatever the set. Set it with
--   UPDATE datasets SET s2_bands = '{B02,B04,B05,B8A,B11,B12}' WHERE aoi = 'ms' AND year = 2024;
-- it applies to scenes extracted afterwards (re-extract older ones with `cbmflow jobs retry`).
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS s2_bands text[]
    CONSTRAINT datasets_s2_bands_check CHECK (
        s2_bands IS NULL OR (
            cardinality(s2_bands) > 0
            AND s2_bands <@ ARRAY['B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B11', 'B12']::text[]
        )
    );
