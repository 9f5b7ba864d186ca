-- Least privilege: one NOLOGIN group role per component, so a worker VM, the API and the watcher
-- each connect with only what they need instead of the database owner's DSN. Roles are
-- cluster-wide (one PostgreSQL cluster = one cbmflow deployment); their grants are per database
-- and are (re)applied by `cbmflow db migrate` after the migrations (cbmflow/db.py ROLE_GRANTS),
-- so a table added by a later migration and the per-dataset schemas get theirs too. Login roles
-- come from `cbmflow db role-dsn worker|api|watcher`. The owner (the role running migrations)
-- needs CREATEROLE or superuser. Two migrators in different databases of one cluster may race on
-- CREATE ROLE: the loser's duplicate is ignored.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['cbmflow_watcher', 'cbmflow_worker', 'cbmflow_api'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

-- API tokens expire: NULL = never (tokens made before this migration keep working until revoked);
-- `cbmflow users token NAME` sets it from --expires or CBMFLOW_API_TOKEN_TTL_DAYS.
ALTER TABLE api_tokens ADD COLUMN IF NOT EXISTS expires_at timestamptz;
