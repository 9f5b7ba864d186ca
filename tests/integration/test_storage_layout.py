"""The compact signatures layout (sql/011_compact_signatures.sql) on a real PostgreSQL.

* a dataset written in the row-per-band layout before 011 is converted in place by the migration:
  every signature and histogram row reads back the same through the views (values rounded to
  float4, the new type), one table row per (parcel, scene), and migrating again changes nothing;
* the worker's writer (delete + binary COPY) replaces a scene's rows and never duplicates them;
  what the views return is held against the numpy arrays the writer was given;
* row-per-band INSERT, UPDATE and DELETE on the views (tools, ad-hoc SQL) keep working.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from psycopg2 import sql

from cbmflow import db
from worker import pgcopy
from worker.scene import write_scene_rows

# The signature and histogram tables as cbmflow/db.py created them before sql/011.
PRE_011_DDL = (
    "CREATE TABLE {sigs} (pid integer NOT NULL, scene_id bigint NOT NULL, band text NOT NULL,"
    " count integer NOT NULL, mean double precision, std double precision, min double precision,"
    " max double precision, p25 double precision, p50 double precision, p75 double precision,"
    " PRIMARY KEY (pid, scene_id, band) INCLUDE (count, mean, std, min, max, p25, p50, p75));"
    " CREATE INDEX ON {sigs} (scene_id);"
    " CREATE TABLE {hists} (pid integer NOT NULL, scene_id bigint NOT NULL, class smallint NOT NULL,"
    " count integer NOT NULL, PRIMARY KEY (pid, scene_id, class) INCLUDE (count));"
    " CREATE INDEX ON {hists} (scene_id)"
)
STATS = ("count", "mean", "std", "min", "max", "p25", "p50", "p75")


def _f4(x: float | None) -> float | None:
    return None if x is None else float(np.float32(x))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in zip(a, b, strict=True)
    )


def _scenes(cur: db.Cursor, n: int, card: str = "s2") -> list[int]:
    ids = []
    for i in range(n):
        cur.execute(
            "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location)"
            " VALUES (%s, %s, 'sentinel', 'S2A', %s, %s, ST_Multi(ST_MakeEnvelope(9, 51, 10, 52, 4326)), '/x')"
            " RETURNING id",
            (f"{card}-{i}", f"P_{card}_{i}", card, f"2024-05-{i + 1:02d} 10:30:00+00"),
        )
        ids.append(int(cur.fetchone()[0]))
    return ids


def _dataset(cur: db.Cursor) -> db.Dataset:
    cur.execute("INSERT INTO aois (name, geom) VALUES ('ms', ST_Multi(ST_MakeEnvelope(9, 51, 10, 52, 4326)))")
    return db.ensure_dataset(cur, "ms", 2024, 3035)


def _rows(cur: db.Cursor, ds: db.Dataset) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    cur.execute(sql.SQL("SELECT pid, scene_id, band, {} FROM {} ORDER BY 1, 2, 3").format(
        sql.SQL(", ").join(sql.Identifier(s) for s in STATS), ds.sigs))  # fmt: skip
    # float4 arrives as its shortest decimal text: compare as float4, as the truth is rounded
    sigs = [(*r[:4], *(_f4(v) for v in r[4:])) for r in cur.fetchall()]
    cur.execute(sql.SQL("SELECT pid, scene_id, class, count FROM {} ORDER BY 1, 2, 3").format(ds.hists))
    return sigs, [tuple(r) for r in cur.fetchall()]


def test_migration_converts_a_row_per_band_dataset_in_place(pg_dsn: str) -> None:
    with db.transaction(pg_dsn) as cur:
        ds = _dataset(cur)
        # the database as a release before 011 left it: row-per-band tables of the dataset's names
        cur.execute(sql.SQL("DROP VIEW {}, {}").format(ds.sigs, ds.hists))
        cur.execute(sql.SQL("DROP TABLE {}, {}").format(ds.ident("sigs_2024_obs"), ds.ident("sigs_2024_bands")))
        cur.execute(sql.SQL(PRE_011_DDL).format(sigs=ds.sigs, hists=ds.hists))
        s2, s1 = _scenes(cur, 2), _scenes(cur, 1, "bs")[0]
        rng = np.random.default_rng(3)
        sigs: list[tuple[Any, ...]] = []
        for scene in s2:
            for pid in (1, 2, 3):
                for band in ("B04", "B08", "B11"):
                    if pid == 3 and band == "B11":
                        continue  # too few 20 m pixels: no row, as the worker writes it
                    m = float(rng.uniform(-1000, 9000))
                    vals = (int(rng.integers(1, 5000)), m, float("nan") if pid == 2 else m / 7, m - 3, m + 3,
                            m - 1, m + 0.5, m + 1)  # fmt: skip
                    sigs.append((pid, scene, band, *vals))
        for pid in (1, 2):
            for band in ("VHb", "VVb"):
                sigs.append((pid, s1, band, 40, 0.0123456789, None, None, None, None, None, None))
        hists = [(1, s2[0], 4, 90), (1, s2[0], 9, 8), (4, s2[0], 5, 7), (2, s2[1], 4, 50)]  # pid 4: SCL only
        for row in sigs:
            cur.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)").format(ds.sigs), row
            )
        for row in hists:
            cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s)").format(ds.hists), row)
        cur.execute("DELETE FROM schema_migrations WHERE name LIKE '011\\_%%'")

    assert db.migrate(pg_dsn) == ["011_compact_signatures.sql"]
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT relkind FROM pg_class WHERE oid = 'ms.sigs_2024'::regclass")
        assert cur.fetchone()[0] == "v"
        got_sigs, got_hists = _rows(cur, ds)
        want = sorted((r[0], r[1], r[2], r[3], *(_f4(v) for v in r[4:])) for r in sigs)
        assert len(got_sigs) == len(want)
        for g, w in zip(got_sigs, want, strict=True):
            assert _same(g, w), (g, w)
        assert got_hists == sorted(hists)
        cur.execute("SELECT count(*), count(DISTINCT (pid, scene_id)) FROM ms.sigs_2024_obs")
        assert cur.fetchone() == (3 * 2 + 2 + 1, 3 * 2 + 2 + 1)  # 3 parcels x 2 scenes, 2 S1, pid 4's SCL
        cur.execute("SELECT cbmflow_compact_signatures('ms', 'sigs_2024', 'hists_2024')")
        assert cur.fetchone()[0] is False  # already compact: nothing done
    with db.transaction(pg_dsn) as cur:
        cur.execute("DELETE FROM schema_migrations WHERE name LIKE '011\\_%%'")
    assert db.migrate(pg_dsn) == ["011_compact_signatures.sql"]  # re-running the migration is harmless
    with db.transaction(pg_dsn) as cur:
        again_sigs, again_hists = _rows(cur, ds)
    assert again_hists == got_hists and len(again_sigs) == len(got_sigs)
    assert all(_same(x, y) for x, y in zip(again_sigs, got_sigs, strict=True))


def _chunks(scene: int, seed: int) -> tuple[list[bytes], list[bytes], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """A scene's per-band COPY rows as the engine gives them, and the rows the views must show."""
    rng = np.random.default_rng(seed)
    sig_chunks, want = [], []
    for band, pids in (("B02", np.array([1, 2, 3, 7])), ("B05", np.array([2, 7]))):
        count = rng.integers(1, 900, len(pids))
        stats = {f: rng.uniform(-500, 12000, len(pids)) for f in pgcopy.STAT_FIELDS}
        sig_chunks.append(pgcopy.sig_rows(pids, scene, band, count, stats))
        for i, pid in enumerate(pids):
            want.append((int(pid), scene, band, int(count[i]), *(_f4(stats[f][i]) for f in pgcopy.STAT_FIELDS)))
    h_pid, h_cls, h_cnt = np.array([3, 1, 3, 9]), np.array([9, 4, 4, 5], dtype=np.int16), np.array([2, 30, 11, 6])
    hist_chunks = [pgcopy.hist_rows(h_pid, scene, h_cls, h_cnt)]
    hists = sorted((int(p), scene, int(c), int(n)) for p, c, n in zip(h_pid, h_cls, h_cnt, strict=True))
    return sig_chunks, hist_chunks, sorted(want), hists


def test_writer_replaces_a_scene_and_never_duplicates(pg_dsn: str) -> None:
    with db.transaction(pg_dsn) as cur:
        ds = _dataset(cur)
        a, b = _scenes(cur, 2)
        sa, ha, _, _ = _chunks(a, seed=1)
        sb, hb, want_b, hists_b = _chunks(b, seed=2)
        write_scene_rows(cur, ds, a, sa, ha)
        write_scene_rows(cur, ds, b, sb, hb)
        sa2, ha2, want_a2, hists_a2 = _chunks(a, seed=3)  # scene a re-extracted (a new baseline)
        write_scene_rows(cur, ds, a, sa2, ha2)
        got_sigs, got_hists = _rows(cur, ds)
        assert got_sigs == sorted(want_a2 + want_b)
        assert got_hists == sorted(hists_a2 + hists_b)
        cur.execute("SELECT count(*) FROM ms.sigs_2024_obs WHERE scene_id = %s", (a,))
        assert cur.fetchone()[0] == 5  # parcels 1 2 3 7 and 9 (SCL only): one row each
        write_scene_rows(cur, ds, a, [], [])  # a scene that no longer covers any parcel
        got_sigs, got_hists = _rows(cur, ds)
        assert got_sigs == want_b and got_hists == hists_b


def test_row_per_band_writes_through_the_views(pg_dsn: str) -> None:
    with db.transaction(pg_dsn) as cur:
        _dataset(cur)
        (s,) = _scenes(cur, 1)
        cur.execute("INSERT INTO ms.sigs_2024 (pid, scene_id, band, count, mean) VALUES (1, %s, 'B04', 9, 0.5)", (s,))
        cur.execute("INSERT INTO ms.sigs_2024 (pid, scene_id, band, count, mean) VALUES (1, %s, 'B08', 4, 0.25)", (s,))
        cur.execute("INSERT INTO ms.hists_2024 (pid, scene_id, class, count) VALUES (1, %s, 4, 9)", (s,))
        cur.execute("SAVEPOINT dup")
        with pytest.raises(Exception, match="duplicate signature"):
            cur.execute("INSERT INTO ms.sigs_2024 (pid, scene_id, band, count) VALUES (1, %s, 'B04', 1)", (s,))
        cur.execute("ROLLBACK TO SAVEPOINT dup")
        cur.execute("UPDATE ms.sigs_2024 SET mean = mean + 1000 WHERE band = 'B08'")
        cur.execute("DELETE FROM ms.sigs_2024 WHERE band = 'B04'")
        cur.execute("SELECT band, count, mean FROM ms.sigs_2024")
        assert cur.fetchall() == [("B08", 4, 1000.25)]
        cur.execute("DELETE FROM ms.sigs_2024")
        cur.execute("SELECT count(*) FROM ms.sigs_2024_obs")
        assert cur.fetchone()[0] == 1  # the histogram keeps the row
        cur.execute("DELETE FROM ms.hists_2024")
        cur.execute("SELECT count(*) FROM ms.sigs_2024_obs")
        assert cur.fetchone()[0] == 0
