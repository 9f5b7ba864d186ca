"""``parcelTimeSeries`` read from the compact tables (sql/011) against the same series read through
the row-per-band views with ``one_per_acquisition``'s sort, the statement the API ran before.

The rows are written straight into ``<sigs>_obs`` and ``<sigs>_bands``, so that they hold what
the views' triggers never write but a table may: histogram pairs out of class order, more pairs
than the concatenated path covers, empty and null histograms, NaN statistics, a band with no pixels,
band lists in different orders per scene. Scenes sit on both sides of the UTM 32/33 boundary on
shared dates (same and different acquisition times, equal pixel counts, a date boundary at
midnight UTC), and a Sentinel-1 scene is mixed in. Every parcel, card and option must give the
same bytes (JSON) and the same values (rows) from both statements.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

from psycopg2 import sql

from api import queries
from cbmflow import db

S2_BANDS = ["B02", "B04", "B08", "B8A", "B11"]
# pid -> longitude: the UTM 32/33 boundary is at 12° E.
PARCELS = {1: 11.90, 2: 11.95, 3: 11.99, 4: 12.01, 5: 12.05, 6: 12.10, 7: 11.97, 8: 12.03}


def _scenes(cur: db.Cursor) -> list[tuple[int, str, list[str]]]:
    """(scene id, card, band list) of the test's scenes, inserted out of time order."""
    base = datetime(2024, 6, 3, 10, 20, 21, tzinfo=UTC)
    spec = [
        # (tile or S1, when, card, bands)
        ("T32UQU", base + timedelta(days=10), "s2", S2_BANDS),
        ("T32UQU", base, "s2", S2_BANDS),
        ("T33UUP", base, "s2", ["B8A", "B08", "B04", "B02", "B11"]),  # same time, another tile, another band order
        ("T32TPT", base, "s2", S2_BANDS),  # a third tile, zone 32 again: equal counts go to the lower id
        ("T32UQU", base + timedelta(days=5), "s2", S2_BANDS),
        ("T33UUP", base + timedelta(days=5, minutes=4), "s2", ["B02", "B04", "B08", "B8A"]),  # same date, later, no B11
        ("T33UUP", base + timedelta(days=2), "s2", S2_BANDS),
        ("T32UQU", datetime(2024, 6, 20, 23, 58, tzinfo=UTC), "s2", S2_BANDS),
        ("T33UUP", datetime(2024, 6, 21, 0, 1, tzinfo=UTC), "s2", S2_BANDS),  # next UTC date: no competition
        ("S1", base + timedelta(days=1), "bs", ["VH", "VV"]),
    ]
    out = []
    for k, (tile, when, card, bands) in enumerate(spec):
        name = (
            f"S1A_IW_GRDH_1SDV_{when:%Y%m%dT%H%M%S}_{k}"
            if tile == "S1"
            else f"S2B_MSIL2A_{when:%Y%m%dT%H%M%S}_N0510_R065_{tile}_{k}"
        )
        cur.execute(
            "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location)"
            " VALUES (%s, %s, 'S2B', 'MSIL2A', %s, %s, ST_Multi(ST_MakeEnvelope(10, 47, 14, 49, 4326)), '/nowhere')"
            " RETURNING id",
            (name, name, card, when),
        )
        out.append((int(cur.fetchone()[0]), card, bands))
    return out


def _hist(rng: random.Random) -> list[int] | None:
    kind = rng.random()
    if kind < 0.1:
        return None
    if kind < 0.15:
        return []
    classes = rng.sample(range(12), rng.choice([1, 1, 2, 2, 3, 4, 5, 6]))
    if kind < 0.75:
        classes.sort()  # as the worker writes them; the rest stay out of order
    return [v for c in classes for v in (c, rng.randint(1, 400))]


def _stats(rng: random.Random, n_bands: int, tie: int, all_tie: bool = False) -> list[float]:
    out: list[float] = []
    for _ in range(n_bands):
        count = tie if all_tie else rng.choice([0, tie, tie, rng.randint(1, 200)])
        mean = float("nan") if rng.random() < 0.05 else rng.uniform(0, 4000)
        out += [float(count), mean, rng.uniform(0, 90), rng.uniform(0, 900), rng.uniform(1000, 5000)]
        out += [round(rng.uniform(0, 4000), 1), rng.uniform(0, 4000), float(rng.randint(0, 4000))]
    return out


def test_compact_series_matches_the_view_series(pg_dsn: str) -> None:
    rng = random.Random(15)
    with db.transaction(pg_dsn) as cur:
        cur.execute("INSERT INTO aois (name, geom) VALUES ('cmp', ST_Multi(ST_MakeEnvelope(11, 47, 13, 49, 4326)))")
        ds = db.ensure_dataset(cur, "cmp", 2024, 3035)
        for pid, lon in PARCELS.items():
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (pid, parcel_id, geom) VALUES (%s, %s,"
                    " ST_Multi(ST_Transform(ST_Buffer(ST_SetSRID(ST_MakePoint(%s, 48.0), 4326), 0.0005), 3035)))"
                ).format(ds.parcels),
                (pid, f"p{pid}", lon),
            )
        # an empty geometry has no UTM zone: the rule's zone test is null for all of its scenes
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (pid, parcel_id, geom) VALUES (9, 'p9', ST_GeomFromText('MULTIPOLYGON EMPTY', 3035))"
            ).format(ds.parcels)
        )
        obs = ds.ident(f"{ds.sigs_table}_obs")
        for scene_id, _card, bands in _scenes(cur):
            cur.execute(
                sql.SQL("INSERT INTO {} (scene_id, bands) VALUES (%s, %s)").format(ds.ident(f"{ds.sigs_table}_bands")),
                (scene_id, bands),
            )
            for pid in [*PARCELS, 9, 99]:  # 99: signatures of a parcel no longer in the parcel table
                if pid != 9 and rng.random() < 0.15:
                    continue
                cur.execute(
                    sql.SQL("INSERT INTO {} (scene_id, pid, stats, scl) VALUES (%s, %s, %s::real[], %s)").format(obs),
                    (scene_id, pid, _stats(rng, len(bands), tie=100, all_tie=pid == 9), _hist(rng)),
                )
        cur.execute("INSERT INTO users (name, password_hash, is_admin) VALUES ('cmp', 'x', true)")

        bodies = 0
        dropped = 0
        for pid in [*PARCELS, 9, 99, 12345]:
            for card in ("s2", "bs"):
                for scl in (True, False):
                    for ref in (False, True):
                        for only in (None, ["B8A", "B04", "VV"]):
                            params = {"pk": pid, "card": card, "bands": only or []}
                            got: list[object] = []
                            for compact in (True, False):
                                cur.execute(
                                    queries.series_json_sql(
                                        ds, bands=only, scl=scl, ref=ref, pk=sql.SQL("%(pk)s"), compact=compact
                                    ),
                                    params,
                                )
                                got.append(cur.fetchone()[0])
                                cur.execute(
                                    queries._series_sql(ds, bands=only, scl=scl, ref=ref, compact=compact), params
                                )
                                got.append(queries.fetch_columns(cur))
                            assert got[0] == got[2], (pid, card, scl, ref, only)
                            assert got[1] == got[3], (pid, card, scl, ref, only)
                            assert json.loads(str(got[0])) == got[1]
                            bodies += 1
            # the overlap rule must have had work to do: fewer s2 rows than (scene, band) rows with pixels
            cur.execute(
                sql.SQL(
                    "SELECT count(*) FROM {} g JOIN scenes s ON s.id = g.scene_id WHERE g.pid = %s AND s.card = 's2'"
                ).format(ds.sigs),
                (pid,),
            )
            raw = int(cur.fetchone()[0])
            cur.execute(queries._series_sql(ds, bands=None, scl=False, ref=False), {"pk": pid, "card": "s2"})
            dropped += raw - len(cur.fetchall())

        # the route's statement (user row, grants, key, body) in both forms
        for pid in PARCELS:
            rows = []
            for compact in (True, False):
                cur.execute(
                    queries.series_for_user_sql(ds, bands=None, scl=True, ref=False, compact=compact),
                    {"user": "cmp", "aoi": "cmp", "pid": f"p{pid}", "card": "s2", "bands": []},
                )
                rows.append(cur.fetchone())
            assert rows[0] == rows[1]
            assert rows[0][5].startswith('{"date_part" : [')

        # the histograms took both paths: concatenated and json_object_agg (out of order, > 4 pairs)
        cur.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE cardinality(scl) > 8),"
                " count(*) FILTER (WHERE cardinality(scl) BETWEEN 4 AND 8 AND scl[1] > scl[3]) FROM {}"
            ).format(obs)
        )
        many, unordered = cur.fetchone()
    assert bodies == 11 * 2 * 2 * 2 * 2
    assert dropped > 20 and many > 0 and unordered > 0, (dropped, many, unordered)
