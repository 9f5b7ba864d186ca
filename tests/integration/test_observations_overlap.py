"""The overlapping-granule rule on PostGIS: parcels on both sides of the UTM 32/33 boundary
(12° E), observed on one date from a zone-32 and a zone-33 tile, with pixel counts chosen so that
each branch of the rule decides one parcel. The expected winners are written out by hand."""

from __future__ import annotations

from datetime import UTC, datetime

from psycopg2 import sql

from api.observations import one_per_acquisition
from cbmflow import db

DAY1 = datetime(2024, 6, 3, 10, 20, 21, tzinfo=UTC)
DAY2 = datetime(2024, 6, 8, 10, 20, 21, tzinfo=UTC)


def _scene(cur: db.Cursor, name: str, when: datetime) -> int:
    cur.execute(
        "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location)"
        " VALUES (%s, %s, 'S2B', 'MSIL2A', 's2', %s,"
        " ST_Multi(ST_MakeEnvelope(10, 47, 14, 49, 4326)), '/nowhere') RETURNING id",
        (name, name, when),
    )
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def test_one_observation_per_parcel_date_and_band(pg_dsn: str) -> None:
    with db.transaction(pg_dsn) as cur:
        cur.execute("INSERT INTO aois (name, geom) VALUES ('overlap', ST_Multi(ST_MakeEnvelope(11, 47, 13, 49, 4326)))")
        ds = db.ensure_dataset(cur, "overlap", 2024, 3035)
        parcels = {1: 11.95, 2: 12.05, 3: 11.90, 4: 12.10}  # pid -> longitude; 1 and 3 in zone 32
        for pid, lon in parcels.items():
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (pid, parcel_id, geom) VALUES (%s, %s,"
                    " ST_Multi(ST_Transform(ST_Buffer(ST_SetSRID(ST_MakePoint(%s, 48.0), 4326), 0.0005), 3035)))"
                ).format(ds.parcels),
                (pid, f"p{pid}", lon),
            )
        t32 = _scene(cur, "S2B_MSIL2A_20240603T102021_N0510_R065_T32UQU_20240603T132211", DAY1)
        t33 = _scene(cur, "S2B_MSIL2A_20240603T102021_N0510_R065_T33UUP_20240603T132211", DAY1)
        t32_day2 = _scene(cur, "S2B_MSIL2A_20240608T102021_N0510_R065_T32UQU_20240608T132211", DAY2)
        counts = {
            # pid: (count in the zone-32 tile, count in the zone-33 tile)
            1: (100, 100),  # tie: its own zone (32) wins
            2: (100, 100),  # tie: its own zone (33) wins
            3: (50, 80),  # more pixels win, although the parcel is in zone 32
            4: (90, 0),  # only the zone-32 tile sees it
        }
        for pid, (c32, c33) in counts.items():
            for band in ("B04", "B08"):
                for scene, count in ((t32, c32), (t33, c33)):
                    if count:
                        cur.execute(
                            sql.SQL(
                                "INSERT INTO {} (pid, scene_id, band, count, mean) VALUES (%s, %s, %s, %s, %s)"
                            ).format(ds.sigs),
                            (pid, scene, band, count, float(scene)),
                        )
        cur.execute(
            sql.SQL("INSERT INTO {} (pid, scene_id, band, count, mean) VALUES (1, %s, 'B04', 100, 0)").format(ds.sigs),
            (t32_day2,),
        )
        cur.execute(
            sql.SQL(
                "SELECT g.pid, (s.acquired_at AT TIME ZONE 'UTC')::date, g.band, g.scene_id"
                " FROM {} g JOIN scenes s ON s.id = g.scene_id ORDER BY 1, 2, 3"
            ).format(one_per_acquisition(ds))
        )
        got = cur.fetchall()
        # A one-parcel read (the API's shape) gives that parcel's rows only.
        cur.execute(sql.SQL("SELECT count(*) FROM {} g WHERE g.pid = 2").format(one_per_acquisition(ds)))
        one = cur.fetchone()
    winner = {1: t32, 2: t33, 3: t33, 4: t32}
    expected = sorted(
        [(pid, DAY1.date(), band, winner[pid]) for pid in counts for band in ("B04", "B08")]
        + [(1, DAY2.date(), "B04", t32_day2)]
    )
    assert got == expected
    assert one == (2,)
