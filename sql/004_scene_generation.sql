-- Scene generations: a changed product must be extracted again even while a worker is still
-- extracting its previous version. The watcher bumps `generation` (and clears the lease) when it
-- resets a changed scene; a worker claims the generation with the scene and commits its rows only
-- if the scene still has that generation, so a stale extraction is refused instead of marking
-- the new version done.
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0;

-- Fleet-wide periodic tasks of the workers (the dead-letter reconciliation): a worker runs a task
-- only when it wins the row's `last_run_at` update, so one pass per interval happens across the
-- whole fleet instead of one per worker.
CREATE TABLE IF NOT EXISTS worker_tasks (
    task         text PRIMARY KEY,
    last_run_at  timestamptz NOT NULL DEFAULT '-infinity'
);
