"""``cbmflow db cluster``: rewrite a dataset's signatures in parcel order.

Workers append a scene's rows for every parcel at once, so one parcel's season lies on one heap
page per scene: a cold 60-scene series reads ~79 buffers as written against ~22 clustered, and
``parcelTimeSeries`` took 0.93 ms p50 at 50.4 M observations as written against 0.82 ms clustered
(docs/performance.md, "Chain rehearsal"). ``CLUSTER`` restores the order but holds an ACCESS
EXCLUSIVE lock while it copies the table (82 s per 8.4 M rows measured): workers writing the
dataset and API requests reading it wait. So it is an operator's command for a maintenance window
(a closed season, a night), never run by the system itself; new scenes append out of order again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from psycopg2 import sql

from cbmflow import db
from cbmflow.errors import InvalidInputError, NotFoundError


@dataclass(frozen=True)
class ClusterReport:
    table: str
    rows: int
    bytes_before: int
    bytes_after: int
    seconds: float


def cluster_dataset(dsn: str, aoi: str, year: int, lock_timeout_s: float = 30.0) -> ClusterReport:
    """CLUSTER ``<aoi>.<sigs>_obs`` on its (pid, scene_id) key, then ANALYZE it, in one transaction.

    ``lock_timeout_s`` bounds the wait for the exclusive lock (a worker's write or a long report
    holding the table): past it the command fails and changes nothing, rather than queueing every
    reader behind itself while it waits."""
    if lock_timeout_s <= 0:
        raise InvalidInputError("lock timeout must be positive")
    started = time.perf_counter()
    with db.transaction(dsn) as cur:
        ds = db.get_dataset(cur, aoi.lower(), year)
        if ds is None:
            raise NotFoundError(f"no dataset {aoi}/{year}")
        obs = ds.ident(f"{ds.sigs_table}_obs")
        cur.execute("SELECT to_regclass(%s)", (obs.as_string(cur),))
        row = cur.fetchone()
        if row is None or row[0] is None:
            raise NotFoundError(f"dataset {aoi}/{year} has no compact signatures table (run db migrate)")
        cur.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (obs.as_string(cur),),
        )
        key = cur.fetchone()
        if key is None:
            raise NotFoundError(f"{obs.as_string(cur)} has no primary key")
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_s * 1000)}ms",))
        cur.execute("SELECT pg_total_relation_size(%s::regclass)", (obs.as_string(cur),))
        before = int(cur.fetchone()[0])
        cur.execute(sql.SQL("CLUSTER {} USING {}").format(obs, sql.Identifier(str(key[0]))))
        cur.execute(sql.SQL("ANALYZE {}").format(obs))
        cur.execute(
            sql.SQL("SELECT pg_total_relation_size(%s::regclass), (SELECT count(*) FROM {})").format(obs),
            (obs.as_string(cur),),
        )
        after, rows = cur.fetchone()
        table = obs.as_string(cur)
    return ClusterReport(table, int(rows), before, int(after), time.perf_counter() - started)
