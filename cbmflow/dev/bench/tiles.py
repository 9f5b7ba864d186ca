"""``python -m cbmflow.dev.bench.tiles``: parcel vector-tile latency at national scale.

A throwaway PostgreSQL cluster (under ``$CBMFLOW_STATE_DIR/bench-tiles``, reused by a re-run)
receives ``--parcels`` synthetic parcels (default 770,000, about a national LPIS) written by one
SQL statement: a grid of 1 ha plots of jittered size in EPSG:3035 with twelve crops, in the table
``ensure_dataset`` creates (so the GiST index is the production one). The API then serves
``/api/v1/datasets/bench/2024/tiles/{z}/{x}/{y}.mvt`` over HTTP on 127.0.0.1 (one uvicorn worker,
keep-alive, Basic credentials as a client sends them) and random tiles over the data are timed
per zoom: p50/p95 of the whole request, features and bytes per tile. A benchmark, not a test:
nothing asserts a target; docs/explorer.md quotes the table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

import requests
from psycopg2 import sql

from api.auth import hash_password
from cbmflow import db
from cbmflow.dev.api_process import api_server, free_port
from cbmflow.settings import StackSettings, state_dir

AOI, YEAR, SRID = "bench", 2024, 3035
USER, PASSWORD = "bench", "bench-password-1"
ORIGIN = (4_300_000.0, 2_800_000.0)  # EPSG:3035 metres, southern Germany
CELL_M = 100.0
CROPS = (
    "winter wheat",
    "maize",
    "grassland",
    "winter barley",
    "winter rapeseed",
    "sugar beet",
    "potato",
    "spring barley",
    "oats",
    "sunflower",
    "soy",
    "fallow",
)
HALF = 20037508.342789244


def _progress(msg: str) -> None:
    print(f"[bench-tiles {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def load(dsn: str, parcels: int) -> tuple[float, float, float, float]:
    """The synthetic dataset (once per size); returns its bounds in EPSG:4326."""
    side = int(parcels**0.5) + 1
    with db.transaction(dsn) as cur:
        cur.execute(
            "INSERT INTO aois (name, geom) VALUES (%s, ST_Multi(ST_MakeEnvelope(0, 0, 1, 1, 4326)))"
            " ON CONFLICT (name) DO NOTHING",
            (AOI,),
        )
        ds = db.ensure_dataset(cur, AOI, YEAR, SRID)
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(ds.parcels))
        if int(cur.fetchone()[0]) != parcels:
            _progress(f"writing {parcels:,} parcels ({side} x {side} grid of {CELL_M:.0f} m cells)")
            cur.execute(sql.SQL("TRUNCATE {}").format(ds.parcels))
            cur.execute("SELECT setseed(0.42)")
            cur.execute(
                sql.SQL(
                    "INSERT INTO {t} (pid, parcel_id, crop_code, crop_name, geom)"
                    " SELECT n, 'B-' || lpad(n::text, 7, '0'), (c %% 12 + 1)::text, (%(crops)s::text[])[c %% 12 + 1],"
                    "  ST_Multi(ST_MakeEnvelope(%(x0)s + i * %(cell)s + 4 + random() * 6,"
                    "   %(y0)s + j * %(cell)s + 4 + random() * 6, %(x0)s + (i + 1) * %(cell)s - 4 - random() * 6,"
                    "   %(y0)s + (j + 1) * %(cell)s - 4 - random() * 6, %(srid)s))"
                    " FROM (SELECT i, j, i * %(side)s + j + 1 AS n, (i * 7 + j * 3 + (random() * 3)::int) AS c"
                    "  FROM generate_series(0, %(side)s - 1) i, generate_series(0, %(side)s - 1) j) g"
                    " WHERE n <= %(n)s"
                ).format(t=ds.parcels),
                {
                    "crops": list(CROPS),
                    "x0": ORIGIN[0],
                    "y0": ORIGIN[1],
                    "cell": CELL_M,
                    "side": side,
                    "n": parcels,
                    "srid": SRID,
                },
            )
            cur.execute("UPDATE datasets SET parcels_version = parcels_version + 1 WHERE id = %s", (ds.id,))
        cur.execute(
            sql.SQL(
                "SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM"
                " (SELECT ST_Transform(ST_SetSRID(ST_Extent(geom)::geometry, %s), 4326) AS e FROM {t}) x"
            ).format(t=ds.parcels),
            (SRID,),
        )
        w, s, e, n = (float(v) for v in cur.fetchone())
        cur.execute(
            "UPDATE aois SET geom = ST_Multi(ST_MakeEnvelope(%s, %s, %s, %s, 4326)) WHERE name = %s", (w, s, e, n, AOI)
        )
        cur.execute("DELETE FROM users WHERE name = %s", (USER,))
        cur.execute("INSERT INTO users (name, password_hash) VALUES (%s, %s)", (USER, hash_password(PASSWORD)))
        cur.execute("INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s)", (USER, AOI))
    conn = db.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("VACUUM ANALYZE {}").format(ds.parcels))
    finally:
        conn.close()
    return w, s, e, n


def _tile_of(lon: float, lat: float, z: int) -> tuple[int, int]:
    import math

    x = (lon + 180.0) / 360.0 * 2**z
    y = (1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * 2**z
    return int(x), int(y)


def measure(base: str, bounds: tuple[float, float, float, float], zooms: list[int], samples: int, seed: int) -> Any:
    rng = random.Random(seed)
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    session.get(f"{base}/api/v1/datasets", timeout=30).raise_for_status()  # the password is verified once
    out = {}
    for z in zooms:
        x0, y1 = _tile_of(bounds[0], bounds[1], z)
        x1, y0 = _tile_of(bounds[2], bounds[3], z)
        times, sizes = [], []
        for _ in range(samples):
            x, y = rng.randint(x0, x1), rng.randint(y0, y1)
            started = time.perf_counter()
            resp = session.get(f"{base}/api/v1/datasets/{AOI}/{YEAR}/tiles/{z}/{x}/{y}.mvt", timeout=60)
            elapsed = time.perf_counter() - started
            resp.raise_for_status()
            times.append(elapsed * 1000)
            sizes.append(len(resp.content))
        out[z] = {
            "p50": _pct(times, 50),
            "p95": _pct(times, 95),
            "mean_kb": statistics.fmean(sizes) / 1024,
            "max_kb": max(sizes) / 1024,
            "tiles": samples,
        }
        _progress(f"z{z}: p50 {out[z]['p50']:.1f} ms, p95 {out[z]['p95']:.1f} ms, {out[z]['mean_kb']:.0f} KiB")
    return out


def features_per_tile(dsn: str, z: int, bounds: tuple[float, float, float, float]) -> int:
    """Parcels in a tile in the middle of the data, counted by PostGIS (for the table's context)."""
    x, y = _tile_of((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2, z)
    with db.transaction(dsn) as cur:
        ds = db.get_dataset(cur, AOI, YEAR)
        assert ds is not None
        cur.execute(
            sql.SQL("SELECT count(*) FROM {t} WHERE geom && ST_Transform(ST_TileEnvelope(%s, %s, %s), %s)").format(
                t=ds.parcels
            ),
            (z, x, y, SRID),
        )
        return int(cur.fetchone()[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cbmflow.dev.bench.tiles", description=__doc__.split("\n\n")[0])
    ap.add_argument("--parcels", type=int, default=770_000)
    ap.add_argument("--zooms", default="12,13,14,15,16")
    ap.add_argument("--samples", type=int, default=200, help="random tiles per zoom")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    from cbmflow.dev.stack import start_postgres, stop_postgres

    base_dir = state_dir() / "bench-tiles"
    pg = start_postgres(base_dir, free_port(), StackSettings().run_as, "cbmflow_bench", "cbmflow")
    try:
        db.migrate(pg.dsn)
        t0 = time.monotonic()
        bounds = load(pg.dsn, args.parcels)
        _progress(f"data ready in {time.monotonic() - t0:.1f} s; bounds {[round(b, 3) for b in bounds]}")
        zooms = [int(z) for z in args.zooms.split(",")]
        with api_server(pg.dsn, 1) as base:
            res = measure(base, bounds, zooms, args.samples, args.seed)
        print(f"\nParcel MVT tiles, {args.parcels:,} parcels, 1 API worker, {args.samples} random tiles per zoom")
        print("| zoom | parcels in a tile | p50 ms | p95 ms | mean KiB | max KiB |")
        print("|---:|---:|---:|---:|---:|---:|")
        for z in zooms:
            r = res[z]
            count = features_per_tile(pg.dsn, z, bounds)
            print(f"| {z} | {count:,} | {r['p50']:.1f} | {r['p95']:.1f} | {r['mean_kb']:.0f} | {r['max_kb']:.0f} |")
    finally:
        stop_postgres(base_dir)


if __name__ == "__main__":
    main()
