-- Compact signatures: one row per (parcel, scene) instead of one per (parcel, scene, band).
--
-- Measured (docs/performance.md "Chain rehearsal", make bench-chain --stages storage): the
-- row-per-band layout took ~235 bytes per observation (heap ~104 B with a 24-byte tuple header and
-- a text band per row, its covering primary key ~131 B) plus ~90 B of SCL histogram rows; a
-- Netherlands season (~1 billion observations) would be ~300 GB. Here a scene's statistics of a
-- parcel are one float4 array (count, mean, std, min, max, p25, p50, p75 per band, in the order
-- of the scene's band list), its SCL histogram an int4 array of (class, count) pairs on the same
-- row, and the band names are stored once per scene. float4 holds 16-bit DN statistics to
-- ~7 significant digits (a relative 6e-8, far below what any comparison of ours needs) and
-- Sentinel-1 CARD rasters are float32 at the source.
--
--   <schema>.<sigs>_obs    (scene_id, pid, stats real[], scl int[])  PRIMARY KEY (pid, scene_id)
--   <schema>.<sigs>_bands  (scene_id, bands text[])                  one row per scene
--   <schema>.<sigs>        VIEW, the old row-per-band shape (pid, scene_id, band, count, mean …)
--   <schema>.<hists>       VIEW, the old (pid, scene_id, class, count) shape
--
-- Readers keep the old names and columns (JRC response shapes unchanged); the worker writes the
-- _obs and _bands tables by delete + binary COPY (worker/pgcopy.py). INSTEAD OF triggers keep
-- row-per-band INSERT, UPDATE and DELETE on the views working for tools and ad-hoc SQL (slowly: a row at
-- a time). A band absent for a parcel (fewer than min_pixels) has count 0 in its slot and is not
-- shown by the view.
--
-- cbmflow_compact_signatures(schema, sigs, hists) converts one dataset in place: a no-op when
-- <sigs> is already a view (so this migration and every later call are re-runnable); otherwise
-- the old tables' rows are copied, the old tables dropped and the views created, in the caller's
-- transaction (ACCESS EXCLUSIVE on the old tables for the copy's duration: workers and the API
-- wait, nothing is lost or seen half-converted). `ensure_dataset` calls it for new datasets.

CREATE OR REPLACE FUNCTION cbmflow_sigs_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    obs text := TG_ARGV[0];
    bands_t text := TG_ARGV[1];
    names text[];
    pos integer;
    cur real[];
BEGIN
    EXECUTE format('INSERT INTO %s AS b (scene_id, bands) VALUES ($1, ARRAY[$2]) ON CONFLICT (scene_id) DO UPDATE'
                   ' SET bands = CASE WHEN $2 = ANY (b.bands) THEN b.bands ELSE b.bands || $2 END RETURNING bands',
                   bands_t)
        INTO names USING NEW.scene_id, NEW.band;
    pos := array_position(names, NEW.band);
    EXECUTE format('SELECT stats FROM %s WHERE pid = $1 AND scene_id = $2 FOR UPDATE', obs)
        INTO cur USING NEW.pid, NEW.scene_id;
    IF cur[8 * pos - 7] > 0 THEN
        RAISE unique_violation USING MESSAGE = format('duplicate signature (pid %s, scene %s, band %s)',
                                                       NEW.pid, NEW.scene_id, NEW.band);
    END IF;
    cur := coalesce(cur, '{}'::real[]);
    cur[8 * pos - 7] := NEW.count;
    cur[8 * pos - 6] := NEW.mean;
    cur[8 * pos - 5] := NEW.std;
    cur[8 * pos - 4] := NEW.min;
    cur[8 * pos - 3] := NEW.max;
    cur[8 * pos - 2] := NEW.p25;
    cur[8 * pos - 1] := NEW.p50;
    cur[8 * pos] := NEW.p75;
    EXECUTE format('INSERT INTO %s (scene_id, pid, stats) VALUES ($1, $2, $3)'
                   ' ON CONFLICT (pid, scene_id) DO UPDATE SET stats = EXCLUDED.stats', obs)
        USING NEW.scene_id, NEW.pid, cur;
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE FUNCTION cbmflow_sigs_delete() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    obs text := TG_ARGV[0];
    bands_t text := TG_ARGV[1];
    pos integer;
BEGIN
    EXECUTE format('SELECT array_position(bands, $2) FROM %s WHERE scene_id = $1', bands_t)
        INTO pos USING OLD.scene_id, OLD.band;
    EXECUTE format('UPDATE %s SET stats[8 * $3 - 7] = 0 WHERE pid = $1 AND scene_id = $2', obs)
        USING OLD.pid, OLD.scene_id, pos;
    EXECUTE format('DELETE FROM %s o WHERE pid = $1 AND scene_id = $2 AND o.scl IS NULL'
                   ' AND NOT EXISTS (SELECT 1 FROM generate_series(1, cardinality(o.stats) / 8) i'
                   ' WHERE o.stats[8 * i - 7] > 0)', obs)
        USING OLD.pid, OLD.scene_id;
    RETURN OLD;
END
$fn$;

CREATE OR REPLACE FUNCTION cbmflow_hists_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    obs text := TG_ARGV[0];
    cur integer[];
BEGIN
    EXECUTE format('SELECT scl FROM %s WHERE pid = $1 AND scene_id = $2 FOR UPDATE', obs)
        INTO cur USING NEW.pid, NEW.scene_id;
    IF EXISTS (SELECT 1 FROM generate_series(1, coalesce(cardinality(cur), 0) / 2) k WHERE cur[2 * k - 1] = NEW.class) THEN
        RAISE unique_violation USING MESSAGE = format('duplicate histogram class (pid %s, scene %s, class %s)',
                                                       NEW.pid, NEW.scene_id, NEW.class);
    END IF;
    EXECUTE format('INSERT INTO %s (scene_id, pid, scl) VALUES ($1, $2, $3)'
                   ' ON CONFLICT (pid, scene_id) DO UPDATE SET scl = EXCLUDED.scl', obs)
        USING NEW.scene_id, NEW.pid, coalesce(cur, '{}'::integer[]) || ARRAY[NEW.class::integer, NEW.count];
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE FUNCTION cbmflow_hists_delete() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    obs text := TG_ARGV[0];
BEGIN
    EXECUTE format('UPDATE %s o SET scl = nullif(ARRAY(SELECT v FROM generate_series(1, cardinality(o.scl) / 2) k,'
                   ' LATERAL unnest(ARRAY[o.scl[2 * k - 1], o.scl[2 * k]]) v WHERE o.scl[2 * k - 1] <> $3), ''{}'')'
                   ' WHERE pid = $1 AND scene_id = $2', obs)
        USING OLD.pid, OLD.scene_id, OLD.class::integer;
    EXECUTE format('DELETE FROM %s o WHERE pid = $1 AND scene_id = $2 AND o.scl IS NULL'
                   ' AND NOT EXISTS (SELECT 1 FROM generate_series(1, coalesce(cardinality(o.stats), 0) / 8) i'
                   ' WHERE o.stats[8 * i - 7] > 0)', obs)
        USING OLD.pid, OLD.scene_id;
    RETURN OLD;
END
$fn$;

-- UPDATE of a view row = delete it and insert the new one (through the triggers above). Mostly so
-- that a role without UPDATE gets a privilege error rather than "view is not updatable".
CREATE OR REPLACE FUNCTION cbmflow_view_update() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format('DELETE FROM %I.%I WHERE pid = $1 AND scene_id = $2 AND %I::text = $3',
                   TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0])
        USING OLD.pid, OLD.scene_id, to_jsonb(OLD) ->> TG_ARGV[0];
    EXECUTE format('INSERT INTO %I.%I SELECT ($1).*', TG_TABLE_SCHEMA, TG_TABLE_NAME) USING NEW;
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE FUNCTION cbmflow_compact_signatures(p_schema text, p_sigs text, p_hists text)
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    obs text := format('%I.%I', p_schema, p_sigs || '_obs');
    bands_t text := format('%I.%I', p_schema, p_sigs || '_bands');
    sigs text := format('%I.%I', p_schema, p_sigs);
    hists text := format('%I.%I', p_schema, p_hists);
    kind "char";
    r text;
BEGIN
    SELECT c.relkind INTO kind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = p_schema AND c.relname = p_sigs;
    IF kind = 'v' THEN
        RETURN false;
    END IF;
    -- Column order: the int8 first and the int4 after it leave no alignment padding before the
    -- arrays. The (pid, scene_id) key serves a parcel's series, the scene_id index the worker's
    -- per-scene delete (deduplicated: a few bytes per row).
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (scene_id bigint NOT NULL, pid integer NOT NULL, stats real[], scl integer[],'
                   ' PRIMARY KEY (pid, scene_id)) WITH (autovacuum_vacuum_insert_scale_factor = 0.01)', obs);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (scene_id)', p_sigs || '_obs_scene_idx', obs);
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (scene_id bigint PRIMARY KEY, bands text[] NOT NULL)', bands_t);
    IF kind = 'r' THEN
        EXECUTE format('LOCK TABLE %s, %s IN ACCESS EXCLUSIVE MODE', sigs, hists);
        EXECUTE format('INSERT INTO %s (scene_id, bands) SELECT scene_id, array_agg(DISTINCT band ORDER BY band)'
                       ' FROM %s GROUP BY scene_id', bands_t, sigs);
        EXECUTE format(
            'INSERT INTO %1$s (scene_id, pid, stats, scl)'
            ' SELECT coalesce(s.scene_id, h.scene_id), coalesce(s.pid, h.pid), s.stats, h.scl FROM'
            ' (SELECT g.scene_id, g.pid, array_agg(v.x ORDER BY bb.i, v.j) AS stats'
            '    FROM (SELECT DISTINCT scene_id, pid FROM %2$s) k'
            '    JOIN %3$s b ON b.scene_id = k.scene_id'
            '    CROSS JOIN LATERAL unnest(b.bands) WITH ORDINALITY bb(name, i)'
            '    LEFT JOIN %2$s g0 ON g0.pid = k.pid AND g0.scene_id = k.scene_id AND g0.band = bb.name'
            '    CROSS JOIN LATERAL (SELECT k.scene_id, k.pid) g'
            '    CROSS JOIN LATERAL unnest(ARRAY[coalesce(g0.count, 0), g0.mean, g0.std, g0.min, g0.max, g0.p25,'
            '                                    g0.p50, g0.p75]::real[]) WITH ORDINALITY v(x, j)'
            '   GROUP BY g.scene_id, g.pid) s'
            ' FULL JOIN'
            ' (SELECT scene_id, pid, array_agg(x ORDER BY class, j) AS scl'
            '    FROM %4$s CROSS JOIN LATERAL unnest(ARRAY[class::integer, count]) WITH ORDINALITY v(x, j)'
            '   GROUP BY scene_id, pid) h'
            ' ON h.scene_id = s.scene_id AND h.pid = s.pid',
            obs, sigs, bands_t, hists);
        EXECUTE format('DROP TABLE %s, %s', sigs, hists);
    END IF;
    -- One view row per band with at least one pixel. The casts give the old column types' names
    -- except the statistics, which stay float4: their JSON is the stored value's shortest text.
    EXECUTE format(
        'CREATE OR REPLACE VIEW %s AS SELECT o.pid, o.scene_id, b.bands[i] AS band, o.stats[8 * i - 7]::integer AS count,'
        ' o.stats[8 * i - 6] AS mean, o.stats[8 * i - 5] AS std, o.stats[8 * i - 4] AS min,'
        ' o.stats[8 * i - 3] AS max, o.stats[8 * i - 2] AS p25, o.stats[8 * i - 1] AS p50, o.stats[8 * i] AS p75'
        ' FROM %s o JOIN %s b ON b.scene_id = o.scene_id'
        ' CROSS JOIN LATERAL generate_series(1, cardinality(b.bands)) i WHERE o.stats[8 * i - 7] > 0',
        sigs, obs, bands_t);
    EXECUTE format(
        'CREATE OR REPLACE VIEW %s AS SELECT o.pid, o.scene_id, o.scl[2 * k - 1]::smallint AS class, o.scl[2 * k] AS count'
        ' FROM %s o CROSS JOIN LATERAL generate_series(1, cardinality(o.scl) / 2) k WHERE o.scl IS NOT NULL',
        hists, obs);
    EXECUTE format('DROP TRIGGER IF EXISTS hists_insert ON %s', hists);
    EXECUTE format('DROP TRIGGER IF EXISTS hists_delete ON %s', hists);
    EXECUTE format('DROP TRIGGER IF EXISTS hists_update ON %s', hists);
    EXECUTE format('CREATE TRIGGER sigs_insert INSTEAD OF INSERT ON %s FOR EACH ROW'
                   ' EXECUTE FUNCTION public.cbmflow_sigs_insert(%L, %L)', sigs, obs, bands_t);
    EXECUTE format('CREATE TRIGGER sigs_delete INSTEAD OF DELETE ON %s FOR EACH ROW'
                   ' EXECUTE FUNCTION public.cbmflow_sigs_delete(%L, %L)', sigs, obs, bands_t);
    EXECUTE format('CREATE TRIGGER sigs_update INSTEAD OF UPDATE ON %s FOR EACH ROW'
                   ' EXECUTE FUNCTION public.cbmflow_view_update(%L)', sigs, 'band');
    EXECUTE format('CREATE TRIGGER hists_update INSTEAD OF UPDATE ON %s FOR EACH ROW'
                   ' EXECUTE FUNCTION public.cbmflow_view_update(%L)', hists, 'class');
    EXECUTE format('CREATE TRIGGER hists_insert INSTEAD OF INSERT ON %s FOR EACH ROW'
                   ' EXECUTE FUNCTION public.cbmflow_hists_insert(%L)', hists, obs);
    EXECUTE format('CREATE TRIGGER hists_delete INSTEAD OF DELETE ON %s FOR EACH ROW'
                   ' EXECUTE FUNCTION public.cbmflow_hists_delete(%L)', hists, obs);
    -- The worker replaces a scene's rows (and, through the triggers, may write the views); the
    -- API reads. Both roles are created by 005; grants on the views come from grant_dataset.
    FOREACH r IN ARRAY ARRAY['cbmflow_worker', 'cbmflow_api'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('GRANT SELECT ON %s, %s TO %I', obs, bands_t, r);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cbmflow_worker') THEN
        EXECUTE format('GRANT INSERT, UPDATE, DELETE ON %s, %s TO cbmflow_worker', obs, bands_t);
    END IF;
    RETURN true;
END
$fn$;

SELECT cbmflow_compact_signatures(schema_name, sigs_table, hists_table) FROM datasets ORDER BY id;
