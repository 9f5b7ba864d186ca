-- Object-store profiles: the named store (CBMFLOW_STORE_PROFILES) a scene's product is read from.
-- Set by the watcher from its source's `store`; NULL = the default CBMFLOW_STORE_* settings. Only
-- a name: endpoints and credentials stay in each process's settings, never in the database.
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS store_profile text;
