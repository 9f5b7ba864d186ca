"""``make bench-chain``: a national-scale rehearsal of the chain, measured (a benchmark, not a test).

The reference load is the Netherlands: ~770,000 parcels, ~4,000 Sentinel-2 granules a season.
Every stage runs on servers of its own (a PostgreSQL cluster under ``$CBMFLOW_STATE_DIR/bench-chain``;
for the chain and the watcher PostgreSQL and RabbitMQ started by ``cbmflow.dev.chaos.Run``), never on
the developer's stack, and prints each figure beside its target (issue 15). ``--scale`` sets the
parcel count of the storage and import stages (1 = the 770k of the Netherlands); the granule stage
always uses NL parcel density on a full-size tile, since that is what a VM meets. Stages
(``--stages``; ``--doc`` writes the table into docs/performance.md):

``storage``   the same observations written scene by scene by the worker's encoder and COPY in the
              row-per-band layout (before sql/011) and the compact one; bytes per observation
              (heap, indexes, histograms), the series statement on both, the in-place conversion.
``import``    ``parcels import`` of a generated BRP-like GeoParquet (EPSG:28992, median ~2 ha,
              long tail) in a process of its own: wall time and peak RSS.
``granule``   a full-size 10980² granule of tile 31UFU (tiled DEFLATE GeoTIFF, and B04 as
              JPEG2000) with NL-density parcels over 10/50/100 % of it: cold index, index from
              the disk cache, warm scene and the decode floor of the same strips, on one core.
``chain``     watch -> RabbitMQ -> 1 and 2 single-core ``cbmflow worker`` processes -> COPY ->
              PostGIS, with the API under a parcelTimeSeries load: scenes/hour, rows/s, per-scene
              overhead over the engine alone, API p50/p99 while writing (the chaos test world).
``watch``     two ``cbmflow watch --once`` cycles over a season's catalogue (4,000 items).
``project``   the granule costs fed to ``provision simulate`` for a season on 20 2-core VMs.
``series``    (not by default) parcelTimeSeries at 50.4 M observations in the compact layout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from psycopg2 import sql

from cbmflow import db

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "performance.md"
AOI, YEAR, SRID = "chain", 2024, 28992
S2_BANDS = ("B02", "B03", "B04", "B05", "B08", "B11")
BANDS_20M = frozenset({"B05", "B11"})
NL_PARCELS = 770_000
NL_S2_GRANULES = 4_000
NL_S2_DATES = 150
"""Sentinel-2 observations of one parcel in a season (two satellites, 5-day revisit, tile overlaps)."""
NL_S1_SCENES = 1_200
NL_S1_DATES = 120
"""Sentinel-1 backscatter observations of one parcel in a season (VV and VH each)."""


def _progress(msg: str) -> None:
    print(f"[bench-chain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# --- parcels ------------------------------------------------------------------------------------


def parcel_areas_ha(n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Parcel areas with the Dutch BRP's shape: lognormal, median ~2 ha, a long tail to ~100 ha.

    The BRP (gewaspercelen) holds ~770k parcels on ~1.8 M ha of farmland: a mean of ~2.3 ha
    against a median near 2, with a tail of large arable fields and small grassland strips.
    """
    return np.clip(rng.lognormal(mean=np.log(2.0), sigma=0.75, size=n), 0.05, 150.0)


RD_REGION = (20_000.0, 310_000.0, 270_000.0, 610_000.0)
"""The Netherlands' farmland spread, as an EPSG:28992 (RD New) box: x 20-270 km, y 310-610 km."""


def nl_parcels(
    n: int, seed: int, region: tuple[float, float, float, float] = RD_REGION, side: float | None = None
) -> Any:
    """``n`` parcels as a GeoDataFrame in EPSG:28992: rotated-looking quadrilaterals whose areas
    follow :func:`parcel_areas_ha`, packed in shelves (no overlaps) over ``region`` scaled to
    ``n`` (the BRP's density: ~770k parcels over the whole box at scale 1)."""
    import geopandas as gpd
    import shapely

    rng = np.random.default_rng(seed)
    area_m2 = parcel_areas_ha(n, rng) * 10_000
    aspect = rng.uniform(1.0, 4.0, n)  # long, narrow Dutch fields up to 4:1
    w = np.sqrt(area_m2 * aspect)
    h = area_m2 / w
    xmin, ymin, xmax, ymax = region
    if side is None:
        side = float(np.sqrt(n / NL_PARCELS))  # a smaller world covers a proportionally smaller box
    width = (xmax - xmin) * side
    gap = 20.0
    cum = np.cumsum(w + gap)
    row = (cum // width).astype(np.int64)
    x0 = cum - w - row * width
    ok = x0 >= 0  # a parcel straddling a shelf's end moves to the start of the next shelf
    x0 = np.where(ok, x0, 0.0)
    row_h = np.zeros(row.max() + 1)
    np.maximum.at(row_h, row, h)
    y_row = np.concatenate([[0.0], np.cumsum(row_h + gap)[:-1]])
    spread = max(1.0, ((ymax - ymin) * side) / (y_row[-1] + row_h[-1]))  # spread shelves over the box
    y0 = y_row[row] * spread
    x0 = xmin + x0
    y0 = ymin + y0
    skew = rng.uniform(-0.15, 0.15, n) * h  # parallelograms, not all axis-aligned boxes
    coords = np.stack(
        [
            np.stack([x0, y0], 1),
            np.stack([x0 + w, y0], 1),
            np.stack([x0 + w + skew, y0 + h], 1),
            np.stack([x0 + skew, y0 + h], 1),
            np.stack([x0, y0], 1),
        ],
        1,
    )
    geoms = shapely.polygons(coords)
    ids = np.char.add("NL-", np.arange(1, n + 1).astype(str))
    crops = rng.choice(
        np.array(["265", "259", "256", "233"]), n, p=[0.45, 0.25, 0.2, 0.1]
    )  # grass, maize, potato, wheat
    return gpd.GeoDataFrame({"parcel_id": ids, "crop_code": crops}, geometry=geoms, crs="EPSG:28992")


def _child_import(dsn: str, path: str, out: str) -> None:
    """In a fresh process (its peak RSS is the import's own): ``parcels import`` of ``path``."""
    import resource

    from cbmflow.parcels.ingest import import_parcels

    t = time.perf_counter()
    with db.transaction(dsn) as cur:
        report = import_parcels(cur, Path(path), "nlimport", YEAR)
    wall = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"wall_s": wall, "rss_mb": rss_mb, "accepted": report.accepted}))


def stage_import(dsn: str, work: Path, parcels: int, seed: int) -> dict[str, Any]:
    """Parcel import of a generated national parcel file (GeoParquet), timed in its own process."""
    import multiprocessing as mp

    path = work / f"nl-parcels-{parcels}-{seed}.parquet"
    if not path.exists():
        t = time.perf_counter()
        nl_parcels(parcels, seed).to_parquet(path)
        _progress(f"import: {parcels:,} parcels generated in {time.perf_counter() - t:.1f} s -> {path.name}")
    conn = db.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS nlimport CASCADE")
            cur.execute("DELETE FROM datasets WHERE aoi = 'nlimport'")
    finally:
        conn.close()
    out = work / "import.json"
    proc = mp.get_context("spawn").Process(target=_child_import, args=(dsn, str(path), str(out)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"parcel import failed (exit {proc.exitcode})")
    res: dict[str, Any] = json.loads(out.read_text())
    res.update(parcels=parcels, file_mb=path.stat().st_size / 1e6)
    return res


# --- granules: per-granule cost by source format and parcel coverage ----------------------------

TILE = "31UFU"
"""An MGRS tile over the Netherlands (Amsterdam-Utrecht-Flevoland): UTM 31N, its 10 m grid's
upper-left corner at (600000, 5900040) as in Sentinel-2's tiling grid."""
TILE_EPSG, TILE_X0, TILE_Y0, TILE_SIZE = 32631, 600_000.0, 5_900_040.0, 10980
NL_DENSITY_PER_KM2 = NL_PARCELS / ((RD_REGION[2] - RD_REGION[0]) * (RD_REGION[3] - RD_REGION[1]) / 1e6)
S2_10M, S2_20M = ("B02", "B03", "B04", "B08"), ("B05", "B11", "SCL")


def _write_tile_band(path: Path, res: int, seed: int, classes: bool = False) -> None:
    """One band of the tile as a tiled DEFLATE GeoTIFF (512-px tiles, predictor 2: the layout of
    earth-search's COGs, without overviews, which extraction never reads): field-like levels per
    100 m plus pixel noise, so it compresses and decodes like real L2A."""
    import rasterio
    import rasterio.windows
    from affine import Affine

    if path.exists():
        return
    size = TILE_SIZE * 10 // res
    rng = np.random.default_rng(seed)
    cell = 100 // res
    coarse = (
        rng.integers(1, 12, (size // cell + 2,) * 2) if classes else rng.integers(800, 5000, (size // cell + 2,) * 2)
    )
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(
        tmp, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8" if classes else "uint16",
        crs=f"EPSG:{TILE_EPSG}", transform=Affine(res, 0, TILE_X0, 0, -res, TILE_Y0), nodata=0, tiled=True,
        blockxsize=512, blockysize=512, compress="deflate", predictor=2, bigtiff="if_safer",
    ) as dst:  # fmt: skip
        for r0 in range(0, size, 512):
            h = min(512, size - r0)
            base = np.repeat(coarse[np.arange(r0, r0 + h) // cell][:, : size // cell + 1], cell, axis=1)[:, :size]
            if classes:
                block = base.astype(np.uint8)
            else:
                block = (base + rng.normal(0, 60, (h, size))).clip(1, 65535).astype(np.uint16)
            dst.write(block, 1, window=rasterio.windows.Window(0, r0, size, h))
    tmp.rename(path)


def _write_jp2(tif: Path, jp2: Path) -> None:
    """The band as Sentinel-2 L2A JPEG2000 (lossless, 1024-px tiles, 6 resolutions: CDSE's layout)."""
    import rasterio

    if jp2.exists():
        return
    with rasterio.open(tif) as src:
        profile = src.profile | {
            "driver": "JP2OpenJPEG", "QUALITY": "100", "REVERSIBLE": "YES",
            "BLOCKXSIZE": "1024", "BLOCKYSIZE": "1024", "RESOLUTIONS": "6",
        }  # fmt: skip
        for key in ("tiled", "blockxsize", "blockysize", "compress", "predictor", "interleave"):
            profile.pop(key, None)
        tmp = jp2.with_suffix(".tmp.jp2")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(src.read(1), 1)
    tmp.rename(jp2)


def tile_box_rd() -> tuple[float, float, float, float]:
    """The largest RD New box inside the tile's footprint (parcels there lie on both grids)."""
    from pyproj import Transformer

    to_rd = Transformer.from_crs(TILE_EPSG, 28992, always_xy=True)
    w = TILE_SIZE * 10.0
    xs = [TILE_X0, TILE_X0 + w, TILE_X0 + w, TILE_X0]
    ys = [TILE_Y0, TILE_Y0, TILE_Y0 - w, TILE_Y0 - w]
    rx, ry = to_rd.transform(xs, ys)
    margin = 200.0
    return (
        max(rx[0], rx[3]) + margin,
        max(ry[2], ry[3]) + margin,
        min(rx[1], rx[2]) - margin,
        min(ry[0], ry[1]) - margin,
    )


def _granule_child(dsn: str, files: dict[str, str], coverages: list[float], jp2: dict[str, str]) -> dict[str, Any]:
    """Per-granule cost on one core (one worker per core is the most scenes per hour): for each
    coverage, the cold index (PostGIS query, reprojection, rasterisation) per grid, its disk-cache
    load, the warm scene (6 bands + SCL) and the decode floor of the same strips; JPEG2000 for B04."""
    import os

    os.environ["NUMBA_NUM_THREADS"] = os.environ["GDAL_NUM_THREADS"] = "1"
    import rasterio
    import rasterio.windows

    from card.geobox import GeoBox
    from worker import engine
    from worker.index_cache import IndexCache
    from worker.scene import parcel_index

    def grid_of(path: str) -> GeoBox:
        with rasterio.open(path) as src:
            return GeoBox.from_dataset(src)

    def extract(plan: Any, path: str, classes: bool) -> None:
        with rasterio.open(path) as src:
            read = engine.window_reader(src, plan.index)
            if classes:
                engine.class_histograms_strips(plan, read, nodata=0)
            else:
                engine.band_stats_strips(plan, read, nodata=0, offset=-1000.0)

    def decode(plan: Any, path: str) -> None:
        with rasterio.open(path) as src:
            _, col_off, _, width = plan.index.window
            for r0, r1 in plan.reads():
                src.read(1, window=rasterio.windows.Window(col_off, r0, width, r1 - r0))

    def timed(fn: Any) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def touched_share(plan: Any, path: str) -> float:
        """Share of the file's compressed bytes in the blocks the extraction's windows touch: what
        range requests fetch from a COG (the reads are the index window's columns, strip by strip)."""
        with rasterio.open(path) as src:
            bh, bw = src.block_shapes[0]
            _, col_off, _, width = plan.index.window
            cols = range(col_off // bw, (col_off + width - 1) // bw + 1)
            rows = {i for r0, r1 in plan.reads() for i in range(r0 // bh, (r1 - 1) // bh + 1)}
            nby, nbx = -(-src.height // bh), -(-src.width // bw)
            total = sum(src.block_size(1, i, j) for i in range(nby) for j in range(nbx))
            return float(sum(src.block_size(1, i, j) for i in rows for j in cols) / total)

    out: dict[str, Any] = {}
    conn = db.connect(dsn)
    conn.autocommit = True
    grids = {"10m": grid_of(files["B04"]), "20m": grid_of(files["B05"])}
    with conn.cursor() as cur:
        for cov in coverages:
            ds = db.get_dataset(cur, f"granule{round(cov * 100)}", YEAR)
            assert ds is not None
            res: dict[str, float] = {}
            plans = {}
            for name, grid in grids.items():
                t = time.perf_counter()
                index = parcel_index(cur, IndexCache(entries=2, cache_dir=None), ds, grid, TILE_EPSG)
                res[f"index_{name}_s"] = time.perf_counter() - t
                plans[name] = engine.plan_strips(index)
                tmp = Path(files["B04"]).parent / f"index-{name}-{cov}.npz"
                index.save(tmp)
                res[f"index_{name}_disk_s"] = timed(lambda t=tmp: engine.ParcelIndex.load(t))
                tmp.unlink()
                res["parcels"] = float(len(index.pids))
            extract(plans["20m"], files["SCL"], True)  # numba compiled/loaded before timing

            def scene(p: dict[str, Any] = plans) -> None:
                for b in S2_10M:
                    extract(p["10m"], files[b], False)
                for b in S2_20M:
                    extract(p["20m"], files[b], b == "SCL")

            def floor(p: dict[str, Any] = plans) -> None:
                for b in S2_10M:
                    decode(p["10m"], files[b])
                for b in S2_20M:
                    decode(p["20m"], files[b])

            res["scene_s"] = min(timed(scene) for _ in range(2))
            res["floor_s"] = min(timed(floor) for _ in range(2))
            res["strip_rows_10m"] = float(plans["10m"].rows_read)
            res["cog_share_10m"] = float(np.mean([touched_share(plans["10m"], files[b]) for b in S2_10M]))
            res["cog_share_20m"] = float(np.mean([touched_share(plans["20m"], files[b]) for b in S2_20M]))
            if jp2:
                res["jp2_b04_s"] = timed(lambda p=plans: extract(p["10m"], jp2["B04"], False))
                res["jp2_b04_floor_s"] = timed(lambda p=plans: decode(p["10m"], jp2["B04"]))
                res["cog_b04_s"] = timed(lambda p=plans: extract(p["10m"], files["B04"], False))
            out[str(cov)] = res
            _progress(f"granule: coverage {cov:.0%}: {res['parcels']:,.0f} parcels, scene {res['scene_s']:.1f} s")
    conn.close()
    return out


def stage_granule(dsn: str, work: Path, coverages: list[float], jp2: bool, seed: int) -> dict[str, Any]:
    """A full-size granule of tile 31UFU (7 bands) and NL-density parcels covering ``coverages``
    of it, each coverage its own dataset imported by ``parcels import``."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from cbmflow.parcels.ingest import import_parcels

    tile_dir = work / f"tile-{TILE}"
    tile_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    t = time.perf_counter()
    for k, band in enumerate((*S2_10M, *S2_20M)):
        files[band] = str(tile_dir / f"{band}.tif")
        _write_tile_band(Path(files[band]), 10 if band in S2_10M else 20, seed + k, classes=band == "SCL")
    jp2_files: dict[str, str] = {}
    if jp2:
        jp2_files["B04"] = str(tile_dir / "B04.jp2")
        _write_jp2(Path(files["B04"]), Path(jp2_files["B04"]))
    _progress(f"granule: tile {TILE} bands ready ({time.perf_counter() - t:.0f} s)")
    box = tile_box_rd()
    box_km2 = (box[2] - box[0]) * (box[3] - box[1]) / 1e6
    for cov in coverages:
        aoi = f"granule{round(cov * 100)}"
        sub = (box[0], box[1], box[0] + (box[2] - box[0]) * cov, box[3])
        n = round(NL_DENSITY_PER_KM2 * box_km2 * cov)
        path = work / f"{aoi}.parquet"
        nl_parcels(n, seed, region=sub, side=1.0).to_parquet(path)
        with db.transaction(dsn) as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(aoi)))
            cur.execute("DELETE FROM datasets WHERE aoi = %s", (aoi,))
            import_parcels(cur, path, aoi, YEAR)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        res: dict[str, Any] = pool.submit(_granule_child, dsn, files, coverages, jp2_files).result()
    return res


# --- the chain: watch -> RabbitMQ -> workers -> COPY -> PostGIS -> API ---------------------------


def _engine_scene_cost(world: str, products: list[str]) -> dict[str, Any]:
    """The same scenes reduced in-process by the engine alone (bench-extract's measurement: warm
    index, one core), the reference of the chain's per-scene overhead."""
    import os

    os.environ["NUMBA_NUM_THREADS"] = os.environ["GDAL_NUM_THREADS"] = "1"
    import geopandas as gpd
    import rasterio

    from card.geobox import GeoBox
    from card.s2 import open_s2_product
    from worker import engine

    times: list[float] = []
    cpu: dict[str, float] = {}
    plans: dict[Any, Any] = {}
    gdf = gpd.read_file(Path(world) / "parcels.gpkg")
    gdf = gdf[gdf.geometry.is_valid]
    for k, safe in enumerate([products[0], *products]):  # the first pass compiles and warms caches
        product = open_s2_product(Path(safe))
        t = time.perf_counter()
        c = time.process_time()
        for band in (*S2_10M, *S2_20M):
            path = product.band_path(band)
            with rasterio.open(path) as src:
                grid = GeoBox.from_dataset(src)
                if grid not in plans:
                    geoms = np.asarray(gdf.to_crs(src.crs).geometry.values, dtype=object)
                    plans[grid] = engine.plan_strips(engine.build_index(geoms, np.arange(len(geoms)), grid))
                    t = time.perf_counter()  # the index is warm in the chain too (cached per grid)
                    c = time.process_time()
                read = engine.window_reader(src, plans[grid].index)
                if band == "SCL":
                    engine.class_histograms_strips(plans[grid], read, nodata=0)
                else:
                    engine.band_stats_strips(
                        plans[grid], read, nodata=0, offset=float(product.reflectance_offset(band))
                    )
        if k:
            times.append(time.perf_counter() - t)
            cpu[Path(safe).name.removesuffix(".SAFE")] = time.process_time() - c
    return {
        "scene_s": float(np.median(times)),
        "cpu_s": float(np.median(list(cpu.values()))),
        "scenes": float(len(times)),
        "cpu_by_product": cpu,
    }


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chain_catalogue(world: Path, out: Path, scenes: int) -> Path:
    """The world's STAC catalogue with its first ``scenes`` items (hrefs made absolute)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(world / "stac", out)
    coll_path = out / "sentinel-2-l2a" / "collection.json"
    coll = json.loads(coll_path.read_text())
    items = [link for link in coll["links"] if link["rel"] == "item"]
    coll["links"] = [link for link in coll["links"] if link["rel"] != "item"] + items[:scenes]
    coll_path.write_text(json.dumps(coll))
    for item_path in out.glob("sentinel-2-l2a/*/*.json"):
        item = json.loads(item_path.read_text())
        for asset in item.get("assets", {}).values():
            href = asset.get("href", "")
            if href and "://" not in href and not href.startswith("/"):
                asset["href"] = str((world / "stac" / item_path.relative_to(out).parent / href).resolve())
        item_path.write_text(json.dumps(item))
    return out / "catalog.json"


def _jobs_done(log: Path) -> list[dict[str, Any]]:
    """A worker log's extracted jobs in order: product, wall and CPU seconds (``job.done``)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"job.done"' in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("status") == "extracted" and "duration_s" in rec:
                out.append(rec)
    return out


def job_overhead(jobs_by_worker: list[list[dict[str, Any]]], engine_cpu: dict[str, float]) -> tuple[float, int]:
    """CPU of the workers' jobs over the engine's on the same products: (ratio - 1, jobs compared).
    Each worker's first job per grid builds the parcel index (amortised over a season's thousands
    of scenes, and measured on its own in the granule stage), so every worker's first job is left out."""
    ours = theirs = 0.0
    n = 0
    for jobs in jobs_by_worker:
        for rec in jobs[1:]:
            product = str(rec.get("product_id", ""))
            if product in engine_cpu and "cpu_s" in rec:
                ours += float(rec["cpu_s"])
                theirs += engine_cpu[product]
                n += 1
    return (ours / theirs - 1 if theirs else float("nan")), n


def _api_load(url: str, auth: tuple[str, str], pids: list[str], stop: Any, out: list[tuple[float, float]]) -> None:
    """parcelTimeSeries for random parcels, back to back: (when, latency ms) of each 200."""
    import requests

    rng = random.Random(7)
    session = requests.Session()
    while not stop.is_set():
        pid = rng.choice(pids)
        t = time.perf_counter()
        try:
            params: dict[str, str | int] = {"aoi": "ms", "year": YEAR, "pid": pid}
            r = session.get(f"{url}/query/parcelTimeSeries", params=params, auth=auth, timeout=30)
        except requests.RequestException:
            continue
        if r.status_code == 200:
            out.append((time.monotonic(), (time.perf_counter() - t) * 1000))
        time.sleep(0.02)


def chain_run(world: Path, catalog: Path, workers: int, work: Path) -> dict[str, Any]:
    """The production chain on servers of its own (chaos's Run, no faults): watch once over the
    world's catalogue, ``workers`` worker processes of one core each, the API under a steady
    parcelTimeSeries load while they write."""
    import subprocess
    import threading

    from api.users import upsert_user
    from cbmflow.dev.chaos import ChaosConfig, Run
    from cbmflow.parcels.ingest import add_aoi, import_parcels

    base = work / f"chain-w{workers}"
    shutil.rmtree(base, ignore_errors=True)
    logs = base / "logs"
    logs.mkdir(parents=True)
    run = Run(ChaosConfig(workers=workers), base, logs)
    out: dict[str, Any] = {"workers": workers}
    stop = threading.Event()
    lat: list[tuple[float, float]] = []
    try:
        run.start_servers()
        db.migrate(run.dsn)
        with db.transaction(run.dsn) as cur:
            add_aoi(cur, "ms", world / "aoi.geojson")
            import_parcels(cur, world / "parcels.gpkg", "ms", YEAR)
            upsert_user(cur, "chain", "chain-password-1", datasets=["ms"])
            cur.execute("SELECT parcel_id FROM ms.parcels_2024")
            pids = [str(r[0]) for r in cur.fetchall()]
        run.start_api()
        cbmflow = str(Path(sys.executable).parent / "cbmflow")
        t = time.perf_counter()
        res = subprocess.run(
            [cbmflow, "watch", "--once", "--catalog", str(catalog), "--lookback-days", "0"],
            env=run.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        out["watch_s"] = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"watch failed: {res.stderr[-2000:]}")
        with db.transaction(run.dsn) as cur:
            cur.execute("SELECT count(*) FROM scenes")
            out["scenes"] = int(cur.fetchone()[0])
        loader = threading.Thread(target=_api_load, args=(run.api_url, ("chain", "chain-password-1"), pids, stop, lat))
        loader.start()
        t_idle = time.monotonic()
        time.sleep(10)  # a baseline: the same requests before any worker writes
        t0 = time.monotonic()
        os.environ["CBMFLOW_WORKER_THREADS"] = "1"  # one core per worker: the most scenes per hour
        try:
            for _ in range(workers):
                run.start_worker()
        finally:
            os.environ.pop("CBMFLOW_WORKER_THREADS", None)
        while True:
            with db.transaction(run.dsn) as cur:
                cur.execute("SELECT count(*) FROM scenes WHERE status IN ('extracted', 'no_parcels', 'failed')")
                done = int(cur.fetchone()[0])
            if done >= out["scenes"] or time.monotonic() - t0 > 3600:
                break
            time.sleep(0.5)
        t1 = time.monotonic()
        time.sleep(2)
        stop.set()
        loader.join(60)
        out["wall_s"] = t1 - t0
        with db.transaction(run.dsn) as cur:
            cur.execute("SELECT status, count(*) FROM scenes GROUP BY status")
            out["status"] = dict(cur.fetchall())
            cur.execute("SELECT count(*) FROM ms.sigs_2024")
            out["rows"] = int(cur.fetchone()[0])
        idle = [ms for when, ms in lat if t_idle + 2 <= when < t0]
        out["api_idle_p50"] = _pct(idle, 50) if idle else float("nan")
        during = [ms for when, ms in lat if t0 + 5 <= when <= t1]
        out["api_n"] = len(during)
        out["api_p50"] = _pct(during, 50) if during else float("nan")
        out["api_p99"] = _pct(during, 99) if during else float("nan")
        out["worker_cpu_s"] = sum(_proc_cpu_s(p.pid) for p in run.workers.values())
        out["jobs"] = [_jobs_done(w) for w in sorted(logs.glob("chaos-worker-*.log"))]
        durations = [float(j["duration_s"]) for jobs in out["jobs"] for j in jobs]
        out["job_median_s"] = float(np.median(durations)) if durations else float("nan")
    finally:
        stop.set()
        run.stop_processes()
        run.stop_servers()
    return out


def stage_chain(work: Path, scenes: int, parcels: int, worker_counts: list[int], seed: int) -> dict[str, Any]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from cbmflow.dev.chaos import ChaosConfig, _world

    t = time.perf_counter()
    from cbmflow.settings import state_dir

    # chaos's folder: `make chaos` and this share the generated world (deterministic per size and seed)
    world = _world(ChaosConfig(scenes=50, parcels=parcels, seed=seed), state_dir() / "chaos")
    _progress(f"chain: world of {parcels:,} parcels x {scenes} scenes ready ({time.perf_counter() - t:.0f} s)")
    catalog = chain_catalogue(world, work / "chain-stac", scenes)
    coll = json.loads((catalog.parent / "sentinel-2-l2a" / "collection.json").read_text())
    names = [Path(link["href"]).stem for link in coll["links"] if link["rel"] == "item"]
    products = [str(world / "products" / f"{name}.SAFE") for name in names]  # the chain's own scenes
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        engine_cost = pool.submit(_engine_scene_cost, str(world), products).result()
    out: dict[str, Any] = {"engine": engine_cost, "runs": [], "parcels": parcels}
    for w in worker_counts:
        _progress(f"chain: {scenes} scenes with {w} worker(s)")
        out["runs"].append(chain_run(world, catalog, w, work))
    return out


# --- the watcher over a season's catalogue --------------------------------------------------------

NL_TILES = ("31UES", "31UET", "31UEU", "31UEV", "31UFS", "31UFT", "31UFU", "31UFV", "31UGS", "31UGT", "31UGU",
            "31UGV", "32ULC", "32ULD", "32ULE")  # fmt: skip
"""The MGRS tiles whose granules cover the Netherlands."""


def season_catalogue(template_item: Path, out: Path, items: int) -> Path:
    """A static STAC catalogue of ``items`` Sentinel-2 L2A items over the NL tiles from March to
    October, cloned from a generated item (names, tiles, times and ids consistent)."""
    from datetime import UTC, datetime, timedelta

    text = template_item.read_text()
    item = json.loads(text)
    old_id = item["id"]
    old_tile = item["properties"]["s2:mgrs_tile"]
    old_dt = item["properties"]["datetime"]
    shutil.rmtree(out, ignore_errors=True)
    coll_dir = out / "sentinel-2-l2a"
    coll_dir.mkdir(parents=True)
    links = []
    start = datetime(2024, 3, 1, 10, 30, tzinfo=UTC)
    for i in range(items):
        tile = NL_TILES[i % len(NL_TILES)]
        when = start + timedelta(days=(i // len(NL_TILES)) * 240 / max(1, items // len(NL_TILES)), seconds=i % 60)
        stamp = when.strftime("%Y%m%dT%H%M%S")
        new_id = f"S2{'AB'[i % 2]}_MSIL2A_{stamp}_N0510_R{8 + i % 3 * 43:03d}_T{tile}_{stamp[:8]}T130000"
        body = (
            text.replace(old_id, new_id)
            .replace(old_tile, tile)
            .replace(old_dt, when.isoformat().replace("+00:00", "Z"))
        )
        d = coll_dir / new_id
        d.mkdir()
        (d / f"{new_id}.json").write_text(body)
        links.append({"rel": "item", "href": f"./{new_id}/{new_id}.json", "type": "application/geo+json"})
    coll = json.loads((template_item.parents[1] / "collection.json").read_text())
    coll["links"] = [link for link in coll["links"] if link["rel"] != "item"] + links
    (coll_dir / "collection.json").write_text(json.dumps(coll))
    shutil.copy(template_item.parents[2] / "catalog.json", out / "catalog.json")
    return out / "catalog.json"


def stage_watch(work: Path, world: Path, items: int) -> dict[str, Any]:
    """Two ``cbmflow watch --once`` cycles over a season's catalogue: the first finds every item
    (scene rows, outbox, publishing to RabbitMQ), the second finds nothing new."""
    import subprocess

    from cbmflow.dev.chaos import ChaosConfig, Run
    from cbmflow.parcels.ingest import add_aoi

    template = next((world / "stac" / "sentinel-2-l2a").glob("*/*.json"))
    catalog = season_catalogue(template, work / "season-stac", items)
    base = work / "watch"
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    run = Run(ChaosConfig(), base, base / "logs")
    out: dict[str, Any] = {"items": items}
    try:
        run.start_servers()
        db.migrate(run.dsn)
        with db.transaction(run.dsn) as cur:
            add_aoi(cur, "ms", world / "aoi.geojson")
        cbmflow = str(Path(sys.executable).parent / "cbmflow")
        for k in (1, 2):
            t = time.perf_counter()
            res = subprocess.run(
                [cbmflow, "watch", "--once", "--catalog", str(catalog), "--lookback-days", "0"],
                env=run.env, capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            out[f"cycle{k}_s"] = time.perf_counter() - t
            if res.returncode != 0:
                raise RuntimeError(f"watch failed: {res.stderr[-2000:]}")
        with db.transaction(run.dsn) as cur:
            cur.execute("SELECT count(*) FROM scenes")
            out["scenes"] = int(cur.fetchone()[0])
            cur.execute("SELECT count(*) FROM rejected_items")
            out["rejected"] = int(cur.fetchone()[0])
            cur.execute("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            out["published"] = int(cur.fetchone()[0])
    finally:
        run.stop_processes()
        run.stop_servers()
    return out


# --- the projection: a season on 20 transient VMs -------------------------------------------------

GRANULE_COG_MB_10M = 4 * 170
GRANULE_MB = {"cog": GRANULE_COG_MB_10M + 2 * 45 + 3, "jp2": 4 * 120 + 2 * 32 + 2}
"""Bytes a full granule's 6 bands + SCL take at the source (MB): Sentinel-2 L2A COGs on S3
(earth-search: ~170 MB per 10 m band, ~45 MB per 20 m band) and the SAFE's JPEG2000 (CDSE: ~120
and ~32 MB). From a COG only the blocks under the read windows are fetched (GDAL range requests;
their byte share is measured in the generated files); JPEG2000 is counted by whole strip rows,
since whether a reader can seek to a JP2 tile depends on the codestream's TLM markers."""
VM_MB_S = 125.0
"""Assumed network bandwidth of one 2-core VM to its object store (1 Gbit/s)."""
CDSE_MB_S = 4 * 20.0
"""CDSE's per-user quota: 4 concurrent connections x 20 MB/s, shared by the whole fleet."""


def project(
    granule: dict[str, Any], vms: int = 20, cores: int = 2, seed: int = 1, cpu_s: dict[str, float] | None = None
) -> dict[str, Any]:
    """Feed the measured per-granule cost into the provisioner's simulator (``provision simulate``:
    the real controller and control law against a fleet that boots in minutes): a season backfill of
    4,000 granules, and the daily trickle (~16 granules a day in two passes), on ``vms`` VMs of
    ``cores`` cores with one single-core worker per core. Job time = the larger of CPU (measured)
    and transfer (assumed bandwidth); the CDSE quota bounds the whole fleet's JPEG2000 reads.
    ``cpu_s`` replaces the measured CPU seconds per granule (by source) with figures from elsewhere
    (a quiet machine's), the rest unchanged."""
    from provisioner.policy import Policy
    from provisioner.simulate import Scenario, custom, overpasses, simulate

    # NL tiles are partly sea and border: use the measured coverage nearest half a tile
    cov = min(granule, key=lambda c: abs(float(c) - 0.5))
    r = granule[cov]
    rows_share = r["strip_rows_10m"] / TILE_SIZE
    index_s = r["index_10m_disk_s"] + r["index_20m_disk_s"]  # a VM's workers share a disk cache of indexes
    slots = vms * cores
    policy = Policy(per_worker=2, min_workers=0, max_workers=slots, max_surge=slots, scale_down_window_s=900,
                    cooldown_s=300)  # fmt: skip
    out: dict[str, Any] = {"coverage": float(cov), "parcels": r["parcels"], "rows_share": rows_share}
    out.update({k: r[k] for k in ("cog_share_10m", "cog_share_20m") if k in r})
    jp2_ratio = r.get("jp2_b04_s", float("nan")) / max(r.get("cog_b04_s", float("nan")), 1e-9)
    for source in ("cog", "jp2"):
        if cpu_s is not None and source in cpu_s:
            cpu = cpu_s[source] + index_s
        elif source == "cog":
            cpu = r["scene_s"] + index_s
        else:  # every band decoded as JPEG2000: the B04 ratio measured, applied to the scene
            cpu = r["scene_s"] * jp2_ratio + index_s if "jp2_b04_s" in r else float("nan")
        if source == "cog" and "cog_share_10m" in r:  # the blocks the windows touch, by bytes
            mb = GRANULE_COG_MB_10M * r["cog_share_10m"] + (GRANULE_MB["cog"] - GRANULE_COG_MB_10M) * r["cog_share_20m"]
        else:  # JPEG2000 (and granule figures from before the block count): whole strip rows
            mb = GRANULE_MB[source] * rows_share
        # per worker: its share of the VM's link, and from CDSE its share of the account's quota
        per_slot_mb_s = VM_MB_S / cores if source == "cog" else min(VM_MB_S / cores, CDSE_MB_S / slots)
        transfer_s = mb / per_slot_mb_s
        job_s = max(cpu, transfer_s)
        if not math.isfinite(job_s):
            continue
        backfill = simulate(
            custom(burst_jobs=NL_S2_GRANULES, hours=0.1, name="nl-backfill", job_median_s=job_s, job_sigma=0.25,
                   boot_delay_s=180.0, boot_jitter_s=60.0),
            policy, seed=seed,
        )  # fmt: skip
        daily = simulate(
            Scenario(name="nl-daily", description="NL in season: 2 passes a day, 5-12 granules each",
                     arrivals=overpasses(2, (5, 12), 1800.0, 300.0, 7.0), horizon_s=7 * 86400.0, job_median_s=job_s,
                     job_sigma=0.25, boot_delay_s=180.0, boot_jitter_s=60.0),
            policy, seed=seed,
        )  # fmt: skip
        out[source] = {
            "cpu_s": cpu,
            "mb": mb,
            "transfer_s": transfer_s,
            "job_s": job_s,
            # the burst arrives at 0: done when the last job ends; extracting from the first job's start
            "backfill_h": backfill.last_job_end_s / 3600,
            "extraction_h": (backfill.last_job_end_s - backfill.first_job_start_s) / 3600,
            "fleet_h": backfill.makespan_s / 3600,
            "cpu_only_h": NL_S2_GRANULES * cpu / slots / 3600,
            "vm_h": backfill.vm_minutes / 60 / cores,
            "backfill_wait_p95_min": backfill.wait_p95_s / 60,
            "daily_wait_p95_min": daily.wait_p95_s / 60,
            "daily_vm_h_per_day": daily.vm_minutes / 60 / cores / 7,
            "binds": (
                "CPU (decode + reduce)"
                if cpu >= transfer_s
                else ("CDSE quota (4 x 20 MB/s per user)" if source == "jp2" else "VM bandwidth")
            ),
        }
    return out


# --- storage: bytes per observation ---------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """On-disk bytes of one layout (``pg_relation_size`` of every fork, per relation kind)."""

    observations: int
    heap: int
    indexes: int
    hist_heap: int
    hist_indexes: int

    @property
    def total(self) -> int:
        return self.heap + self.indexes + self.hist_heap + self.hist_indexes

    def per_obs(self, part: int) -> float:
        return part / max(1, self.observations)


def _rel_size(cur: db.Cursor, rel: str) -> tuple[int, int]:
    """(table incl. toast, fsm and vm; all its indexes) of ``rel``, in bytes."""
    cur.execute("SELECT pg_table_size(%s::regclass), pg_indexes_size(%s::regclass)", (rel, rel))
    heap, idx = cur.fetchone()
    return int(heap), int(idx)


def _synthetic_stats(
    rng: np.random.Generator, counts: npt.NDArray[np.int64], base: npt.NDArray[np.float64]
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-parcel statistics of 16-bit reflectance DN as the engine returns them: means and
    standard deviations with fractional parts, extremes and percentiles whole (or halves)."""
    n = len(counts)
    mean = base + rng.normal(0, 40, n)
    std = np.abs(rng.normal(60, 25, n)) + 1.0 / np.sqrt(counts)
    return {
        "mean": mean,
        "std": std,
        "min": np.floor(mean - 2.5 * std),
        "max": np.ceil(mean + 2.5 * std),
        "p25": np.round(mean - 0.67 * std),
        "p50": np.round(mean * 2) / 2,
        "p75": np.round(mean + 0.67 * std),
    }


ROW_PER_BAND_DDL = (
    "CREATE TABLE {sigs} (pid integer NOT NULL, scene_id bigint NOT NULL, band text NOT NULL,"
    " count integer NOT NULL, mean double precision, std double precision, min double precision,"
    " max double precision, p25 double precision, p50 double precision, p75 double precision,"
    " PRIMARY KEY (pid, scene_id, band) INCLUDE (count, mean, std, min, max, p25, p50, p75))"
    " WITH (autovacuum_vacuum_insert_scale_factor = 0.01);"
    " CREATE INDEX ON {sigs} (scene_id);"
    " CREATE TABLE {hists} (pid integer NOT NULL, scene_id bigint NOT NULL, class smallint NOT NULL,"
    " count integer NOT NULL, PRIMARY KEY (pid, scene_id, class) INCLUDE (count))"
    " WITH (autovacuum_vacuum_insert_scale_factor = 0.01);"
    " CREATE INDEX ON {hists} (scene_id)"
)
"""The row-per-band layout before sql/011 (cbmflow/db.py until then), kept to measure against."""


def _row_per_band_dataset(cur: db.Cursor, aoi: str) -> db.Dataset:
    """A dataset in the old layout: the datasets row and parcels by ``ensure_dataset``, then its
    signature and histogram tables replaced by the pre-011 tables (as an upgraded database has)."""
    ds = db.ensure_dataset(cur, aoi, YEAR, SRID)
    cur.execute(sql.SQL("DROP VIEW {}, {}").format(ds.sigs, ds.hists))
    cur.execute(
        sql.SQL("DROP TABLE {}, {}").format(ds.ident(f"{ds.sigs_table}_obs"), ds.ident(f"{ds.sigs_table}_bands"))
    )
    cur.execute(sql.SQL(ROW_PER_BAND_DDL).format(sigs=ds.sigs, hists=ds.hists))
    return ds


def _write_row_per_band(cur: db.Cursor, ds: db.Dataset, scene_id: int, sigs: list[bytes], hists: list[bytes]) -> None:
    from worker import pgcopy

    cur.execute(sql.SQL("DELETE FROM {} WHERE scene_id = %s").format(ds.sigs), (scene_id,))
    cur.execute(sql.SQL("DELETE FROM {} WHERE scene_id = %s").format(ds.hists), (scene_id,))
    cols = "(pid, scene_id, band, count, mean, std, min, max, p25, p50, p75)"
    cur.copy_expert(
        sql.SQL("COPY {} " + cols + " FROM STDIN WITH (FORMAT binary)").format(ds.sigs).as_string(cur),
        pgcopy.stream(sigs),
    )
    cur.copy_expert(
        sql.SQL("COPY {} (pid, scene_id, class, count) FROM STDIN WITH (FORMAT binary)")
        .format(ds.hists)
        .as_string(cur),
        pgcopy.stream(hists),
    )


def layout_sizes(cur: db.Cursor, ds: db.Dataset) -> Sizes:
    """Heap and index bytes of a dataset's signatures and histograms, whichever layout it has."""
    cur.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (ds.sigs.as_string(cur),))
    compact = cur.fetchone()[0] == "v"
    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(ds.sigs))
    observations = int(cur.fetchone()[0])
    if compact:
        heap, idx = _rel_size(cur, ds.ident(f"{ds.sigs_table}_obs").as_string(cur))
        b_heap, b_idx = _rel_size(cur, ds.ident(f"{ds.sigs_table}_bands").as_string(cur))
        # the histogram pairs share the row: their bytes are the scl column's
        cur.execute(
            sql.SQL("SELECT coalesce(sum(pg_column_size(scl)), 0) FROM {}").format(ds.ident(f"{ds.sigs_table}_obs"))
        )
        scl = int(cur.fetchone()[0])
        return Sizes(observations, heap + b_heap - scl, idx + b_idx, scl, 0)
    heap, idx = _rel_size(cur, ds.sigs.as_string(cur))
    h_heap, h_idx = _rel_size(cur, ds.hists.as_string(cur))
    return Sizes(observations, heap, idx, h_heap, h_idx)


def _scenes(cur: db.Cursor, n: int, first_day: int = 0) -> list[int]:
    cur.execute(
        "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location, status)"
        " SELECT 'chain-' || i, 'S2A_MSIL2A_2024_N0510_R008_T31UFU_' || i, 'sentinel-2', 'S2A', 's2',"
        " timestamptz '2024-03-01 10:30:00+00' + i * interval '2 days',"
        " ST_Multi(ST_MakeEnvelope(3, 50, 8, 54, 4326)), '/nowhere', 'extracted'"
        " FROM generate_series(%s, %s) i ON CONFLICT (product_id) DO UPDATE SET status = 'extracted' RETURNING id",
        (first_day, first_day + n - 1),
    )
    return sorted(int(r[0]) for r in cur.fetchall())


def _parcel_rows(cur: db.Cursor, ds: db.Dataset, n: int) -> None:
    """``n`` square parcels in EPSG:28992 (the series query reads their key and zone only)."""
    side = int(n**0.5) + 1
    cur.execute(
        sql.SQL(
            "INSERT INTO {t} (pid, parcel_id, geom) SELECT i, 'NL-' || i,"
            " ST_Multi(ST_MakeEnvelope(100000 + (i %% %(side)s) * 150, 400000 + (i / %(side)s) * 150,"
            " 100000 + (i %% %(side)s) * 150 + 140, 400000 + (i / %(side)s) * 150 + 140, 28992))"
            " FROM generate_series(1, %(n)s) i ON CONFLICT (pid) DO NOTHING"
        ).format(t=ds.parcels),
        {"side": side, "n": n},
    )


def series_latency(
    dsn: str, ds: db.Dataset, parcels: int, samples: int, seed: int, *, compact: bool | None = None
) -> dict[str, float]:
    """p50/p99 of ``parcelTimeSeries``' own statement (user row, grants, key, JSON body in one),
    prepared as the route runs it: server execution (EXPLAIN ANALYZE) and client round trip.
    ``compact``: the statement on sql/011's tables (True) or through the row-per-band views or
    tables (False, the statement before the compact one); None picks the one the layout needs."""
    if compact is None:
        with db.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (ds.sigs.as_string(cur),))
            compact = cur.fetchone()[0] == "v"
        conn.close()
    return series_latencies(dsn, ds, parcels, samples, seed, [compact])[compact]


def series_latencies(
    dsn: str, ds: db.Dataset, parcels: int, samples: int, seed: int, variants: list[bool]
) -> dict[bool, dict[str, float]]:
    """:func:`series_latency` of several statements (``compact`` values) on the same random
    parcels, taking turns parcel by parcel (the order alternating), so that the page cache one
    warms serves the others equally; each statement's body must be the same bytes."""
    from api import prepared, queries
    from api.auth import hash_password

    conn = db.connect(dsn)
    conn.autocommit = True
    rng = random.Random(seed)
    client_ms: dict[bool, list[float]] = {v: [] for v in variants}
    server_ms: dict[bool, list[float]] = {v: [] for v in variants}
    body = "{}"
    try:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO users (name, password_hash, is_admin) VALUES ('chain', %s, true)"
                " ON CONFLICT (name) DO NOTHING",
                (hash_password("chain-password-1"),),
            )
            cur.execute("DEALLOCATE ALL")
            stmts = {}
            for v in variants:
                text = queries.series_for_user_sql(ds, bands=None, scl=True, ref=False, compact=v).as_string(cur)
                stmts[v] = prepared._compile(text)
                cur.execute(stmts[v].prepare)
            params = {"user": "chain", "aoi": ds.aoi, "pid": "", "card": "s2", "bands": []}
            pids = [f"NL-{rng.randint(1, parcels)}" for _ in range(samples)]
            for i, pid in enumerate([*pids[:50], *pids]):  # the first 50: warm-up and the generic plan
                bodies = set()
                for v in variants if i % 2 else variants[::-1]:
                    t = time.perf_counter()
                    cur.execute(stmts[v].execute, {**params, "pid": pid})
                    body = str(cur.fetchone()[5])
                    if i >= 50:
                        client_ms[v].append((time.perf_counter() - t) * 1000)
                    bodies.add(body)
                if len(bodies) != 1:
                    raise AssertionError(f"the series statements disagree on {pid}")
            for i, pid in enumerate(pids[: max(50, samples // 4)]):
                for v in variants if i % 2 else variants[::-1]:
                    cur.execute(
                        "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + stmts[v].execute, {**params, "pid": pid}
                    )
                    server_ms[v].append(float(cur.fetchone()[0][0]["Execution Time"]))
    finally:
        conn.close()
    return {
        v: {
            "rows": float(len(json.loads(body)["band"])),
            "server_p50": _pct(server_ms[v], 50),
            "server_p99": _pct(server_ms[v], 99),
            "client_p50": _pct(client_ms[v], 50),
            "client_p99": _pct(client_ms[v], 99),
        }
        for v in variants
    }


def scene_chunks(
    rng: np.random.Generator,
    scene_id: int,
    pids: npt.NDArray[np.int64],
    pixels: npt.NDArray[np.int64],
    base: npt.NDArray[np.float64],
) -> tuple[list[bytes], list[bytes]]:
    """One S2 scene's COPY rows for every parcel, as the engine hands them to the writer: six
    bands (20 m bands with a quarter of the pixels) and one to three SCL classes per parcel."""
    from worker import pgcopy

    sig_chunks: list[bytes] = []
    for b, band in enumerate(S2_BANDS):
        count = pixels // 4 if band in BANDS_20M else pixels
        keep = count >= 1
        stats = _synthetic_stats(rng, count[keep], base[b][keep])
        sig_chunks.append(pgcopy.sig_rows(pids[keep], scene_id, band, count[keep], stats))
    n_cls = rng.integers(1, 4, len(pids))  # SCL: vegetation, then bare soil, then cloud
    h_pid = np.repeat(pids, n_cls)
    rank = np.arange(len(h_pid)) - np.repeat(np.cumsum(n_cls) - n_cls, n_cls)
    cls = np.array([4, 5, 9], dtype=np.int16)[rank]
    cnt = np.maximum(1, np.repeat(pixels // 4, n_cls) // (rank + 1))
    return sig_chunks, [pgcopy.hist_rows(h_pid, scene_id, cls, cnt)]


def stage_storage(dsn: str, parcels: int, scenes: int, samples: int, seed: int) -> dict[str, Any]:
    """The same observations in the row-per-band layout and the compact one (sql/011), written
    scene by scene by the same encoder; sizes after VACUUM ANALYZE; the series statement on both;
    then the old dataset converted in place by the migration's function (its time and result)."""
    from worker.scene import write_scene_rows

    rng = np.random.default_rng(seed)
    pixels = np.maximum(1, np.round(parcel_areas_ha(parcels, rng) * 100 * 0.8)).astype(np.int64)  # 10 m, -5 m buffer
    conn = db.connect(dsn)
    conn.autocommit = True
    out: dict[str, Any] = {"parcels": parcels, "scenes": scenes}
    try:
        with conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS chain CASCADE; DROP SCHEMA IF EXISTS chainold CASCADE")
            cur.execute("DELETE FROM datasets WHERE aoi IN ('chain', 'chainold')")
            for aoi in ("chain", "chainold"):
                cur.execute(
                    "INSERT INTO aois (name, geom) VALUES (%s, ST_Multi(ST_MakeEnvelope(3, 50, 8, 54, 4326)))"
                    " ON CONFLICT (name) DO NOTHING",
                    (aoi,),
                )
            new = db.ensure_dataset(cur, "chain", YEAR, SRID)
            old = _row_per_band_dataset(cur, "chainold")
            for ds in (new, old):
                _parcel_rows(cur, ds, parcels)
            scene_ids = _scenes(cur, scenes)
        pids = np.arange(1, parcels + 1, dtype=np.int64)
        base = rng.uniform(300, 3500, size=(len(S2_BANDS), parcels))
        t_new = t_old = 0.0
        for k, scene_id in enumerate(scene_ids):
            sig_chunks, hist_chunks = scene_chunks(rng, scene_id, pids, pixels, base)
            t = time.perf_counter()
            with conn.cursor() as cur:
                cur.execute("BEGIN")
                write_scene_rows(cur, new, scene_id, sig_chunks, hist_chunks)
                cur.execute("COMMIT")
            t_new += time.perf_counter() - t
            t = time.perf_counter()
            with conn.cursor() as cur:
                cur.execute("BEGIN")
                _write_row_per_band(cur, old, scene_id, sig_chunks, hist_chunks)
                cur.execute("COMMIT")
            t_old += time.perf_counter() - t
            if (k + 1) % max(1, scenes // 4) == 0:
                _progress(f"storage: scene {k + 1}/{scenes} written in both layouts")
        with conn.cursor() as cur:
            for ds in (new, old):
                for rel in (ds.sigs, ds.hists, ds.ident(f"{ds.sigs_table}_obs"), ds.ident(f"{ds.sigs_table}_bands")):
                    cur.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (rel.as_string(cur),))
                    row = cur.fetchone()
                    if row and row[0] == "r":
                        cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(rel))
            cur.execute("ANALYZE scenes")
            out["compact"] = layout_sizes(cur, new)
            out["row_per_band"] = layout_sizes(cur, old)
        out["write_s"] = {"compact": t_new, "row_per_band": t_old}
        _progress("storage: series statement on both layouts")
        out["series"] = {
            "compact": series_latency(dsn, new, parcels, samples, seed),
            "row_per_band": series_latency(dsn, old, parcels, samples, seed),
        }
        with conn.cursor() as cur:
            t = time.perf_counter()
            cur.execute("BEGIN")
            cur.execute(
                "SELECT cbmflow_compact_signatures(%s, %s, %s)", (old.schema_name, old.sigs_table, old.hists_table)
            )
            cur.execute("COMMIT")
            out["migrate_s"] = time.perf_counter() - t
            cur.execute(
                sql.SQL("SELECT count(*) FROM (SELECT * FROM {a} EXCEPT SELECT * FROM {b}) d").format(
                    a=old.sigs, b=new.sigs
                )
            )
            out["migrate_diff"] = int(cur.fetchone()[0])
            cur.execute(
                sql.SQL("SELECT count(*) FROM (SELECT * FROM {a} EXCEPT SELECT * FROM {b}) d").format(
                    a=old.hists, b=new.hists
                )
            )
            out["migrate_diff"] += int(cur.fetchone()[0])
    finally:
        conn.close()
    return out


def stage_series(dsn: str, parcels: int, scenes: int, samples: int, seed: int) -> dict[str, Any]:
    """``parcelTimeSeries``' statement on a compact dataset of ``parcels x scenes x 6`` observations
    (50.4 M by default, bench-api's size), written scene by scene by the worker's writer. The data is
    kept between runs (``--stages series`` again reuses it)."""
    from worker.scene import write_scene_rows

    conn = db.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS chain_series_meta (parcels int, scenes int)")
            cur.execute("SELECT parcels, scenes FROM chain_series_meta")
            loaded = cur.fetchone() == (parcels, scenes)
            if not loaded:
                cur.execute("DROP SCHEMA IF EXISTS big CASCADE")
                cur.execute("DELETE FROM datasets WHERE aoi = 'big'")
                cur.execute(
                    "INSERT INTO aois (name, geom) VALUES ('big', ST_Multi(ST_MakeEnvelope(3, 50, 8, 54, 4326)))"
                    " ON CONFLICT (name) DO NOTHING"
                )
            ds = db.ensure_dataset(cur, "big", YEAR, SRID)
            if not loaded:
                _parcel_rows(cur, ds, parcels)
                scene_ids = _scenes(cur, scenes, first_day=1000)
        if not loaded:
            rng = np.random.default_rng(seed)
            pixels = np.maximum(1, np.round(parcel_areas_ha(parcels, rng) * 80)).astype(np.int64)
            pids = np.arange(1, parcels + 1, dtype=np.int64)
            base = rng.uniform(300, 3500, size=(len(S2_BANDS), parcels))
            t0 = time.perf_counter()
            for k, scene_id in enumerate(scene_ids):
                sig_chunks, hist_chunks = scene_chunks(rng, scene_id, pids, pixels, base)
                with conn.cursor() as cur:
                    cur.execute("BEGIN")
                    write_scene_rows(cur, ds, scene_id, sig_chunks, hist_chunks)
                    cur.execute("COMMIT")
                if (k + 1) % max(1, scenes // 10) == 0:
                    rate = (k + 1) * parcels * 6 / (time.perf_counter() - t0)
                    _progress(f"series: scene {k + 1}/{scenes}, {rate:,.0f} observations/s")
            with conn.cursor() as cur:
                cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(ds.ident(f"{ds.sigs_table}_obs")))
                cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(ds.ident(f"{ds.sigs_table}_bands")))
                cur.execute("ANALYZE scenes")
                cur.execute("DELETE FROM chain_series_meta")
                cur.execute("INSERT INTO chain_series_meta VALUES (%s, %s)", (parcels, scenes))
        with conn.cursor() as cur:
            sizes = layout_sizes(cur, ds)
    finally:
        conn.close()
    lat = series_latencies(dsn, ds, parcels, samples, seed, [True, False])
    return {"sizes": sizes, "series": lat[True], "series_views": lat[False]}


def render_chain(res: dict[str, Any]) -> list[str]:
    eng, eng_cpu = res["engine"]["scene_s"], res["engine"]["cpu_s"]
    by_product = res["engine"].get("cpu_by_product", {})
    lines = [
        f"The chain (catalogue watcher → RabbitMQ → `cbmflow worker` processes, one core each → COPY → PostGIS,"
        f" API under a parcelTimeSeries load meanwhile), on servers of its own; the test world of"
        f" {res['parcels']:,} parcels (JPEG2000 SAFE products on local disk). Engine alone, same scenes, warm"
        f" index, one core: {eng:.2f} s per scene (median), {eng_cpu:.2f} s of CPU. Overheads compare CPU"
        " seconds, which a shared machine disturbs far less than wall time: per job, each job's CPU (claim,"
        " lease, reduction, encoding, COPY, the heartbeats meanwhile) against the engine's on the same product,"
        " each worker's first job (its index builds) left out; per process, the workers' whole CPU (start-up,"
        " imports, index builds, idle polling) per scene, which a season's thousands of scenes per worker"
        " amortise and these 24 do not.",
        "",
        "| workers | scenes | watch cycle s | wall s | scenes/hour | signature rows/s | job median s |"
        " overhead per job (CPU) | worker process CPU s/scene | overhead per process | API p50 idle → p50 / p99 ms"
        " while writing | target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["runs"]:
        per_job, n_jobs = job_overhead(r.get("jobs", []), by_product)
        lines.append(
            f"| {r['workers']} | {r['scenes']} | {r['watch_s']:.1f} | {r['wall_s']:.1f} |"
            f" {r['scenes'] / r['wall_s'] * 3600:,.0f} | {r['rows'] / r['wall_s']:,.0f} | {r['job_median_s']:.2f} |"
            f" {per_job:+.1%} ({n_jobs} jobs) | {r['worker_cpu_s'] / r['scenes']:.2f} |"
            f" {r['worker_cpu_s'] / r['scenes'] / eng_cpu - 1:+.0%} |"
            f" {r.get('api_idle_p50', float('nan')):.1f} → {r['api_p50']:.1f} / {r['api_p99']:.1f} ({r['api_n']} req) |"
            " overhead ≤ 10 %; API p50 ≤ 5 ms |"
        )
    return [*lines, ""]


def _cached(path: Path) -> dict[str, Any] | None:
    return dict(json.loads(path.read_text())) if path.exists() else None


def _block_share_text(p: dict[str, Any]) -> str:
    if "cog_share_10m" not in p:
        return ""
    return (
        f"; COG blocks under the windows {p['cog_share_10m']:.0%} of a 10 m band's bytes,"
        f" {p['cog_share_20m']:.0%} at 20 m"
    )


def render_projection(p: dict[str, Any]) -> list[str]:
    lines = [
        f"Projection (`provision simulate`'s controller and fleet model): a season of {NL_S2_GRANULES:,} S2"
        f" granules on 20 transient 2-core VMs (one single-core worker per core, 40 workers; boot 180 ± 60 s;"
        " the burst arrives at 0: done when its last job ends, extracting from the first job's start),"
        f" per-granule cost measured at {p['coverage']:.0%} coverage ({p['parcels']:,.0f} parcels, strips"
        f" {p['rows_share']:.0%} of the rows{_block_share_text(p)}), index from a shared disk cache. Transfer"
        f" assumptions: a VM's link {VM_MB_S:.0f} MB/s; a granule's 6 bands + SCL {GRANULE_MB['cog']} MB as COG,"
        f" of which only the blocks under the read windows are fetched, {GRANULE_MB['jp2']} MB as JPEG2000, read"
        " in proportion to the strip rows needed; CDSE's per-user quota"
        f" {CDSE_MB_S:.0f} MB/s (4 connections x 20 MB/s) shared by the fleet for JPEG2000.",
        "",
        "| source | CPU s/granule | MB read | transfer s/worker | backfill done min | of which extracting min |"
        " CPU-only h | fleet back to 0 h | VM-hours | backfill p95 wait min | daily p95 wait min | VM-h/day | binds |"
        " target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for source, target in (("cog", "extraction ≤ 15 min"), ("jp2", "as measured")):
        if source not in p:
            continue
        r = p[source]
        extracting = r.get("extraction_h", float("nan")) * 60
        lines.append(
            f"| {source.upper()} | {r['cpu_s']:.1f} | {r['mb']:.0f} | {r['transfer_s']:.1f} |"
            f" {r['backfill_h'] * 60:.1f} | {extracting:.1f} |"
            f" {r['cpu_only_h']:.2f} | {r['fleet_h']:.2f} | {r['vm_h']:.1f} | {r['backfill_wait_p95_min']:.0f} |"
            f" {r['daily_wait_p95_min']:.1f} | {r['daily_vm_h_per_day']:.1f} | {r['binds']} | {target} |"
        )
    return [*lines, ""]


def render_granule(res: dict[str, Any]) -> list[str]:
    lines = [
        f"Per-granule cost, one core (NUMBA/GDAL threads 1), tile {TILE} at full size (10980² at 10 m; 4 bands at"
        " 10 m, B05 B11 SCL at 20 m; 512-px DEFLATE tiles), parcels at NL density"
        f" ({NL_DENSITY_PER_KM2:.1f}/km²) over a share of the tile:",
        "",
        "| coverage | parcels | index cold 10 m + 20 m s | index from disk cache s | scene, warm index s |"
        " decode floor s | scene / floor | JP2 B04 s | JP2 B04 floor s | JP2 / floor | target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for cov, r in res.items():
        jp2 = (
            f"{r['jp2_b04_s']:.1f} | {r['jp2_b04_floor_s']:.1f} | {r['jp2_b04_s'] / r['jp2_b04_floor_s']:.2f}"
            if "jp2_b04_s" in r
            else "– | – | –"
        )
        lines.append(
            f"| {float(cov):.0%} | {r['parcels']:,.0f} | {r['index_10m_s'] + r['index_20m_s']:.1f} |"
            f" {r['index_10m_disk_s'] + r['index_20m_disk_s']:.2f} | {r['scene_s']:.1f} | {r['floor_s']:.1f} |"
            f" {r['scene_s'] / r['floor_s']:.2f} | {jp2} | JP2 ≤ 1.15× floor |"
        )
    return [*lines, ""]


def render_storage(res: dict[str, Any], season_obs: float) -> list[str]:
    lines = [
        f"Storage: {res['parcels']:,} parcels x {res['scenes']} S2 scenes x 6 bands (+ SCL histograms), written"
        " scene by scene by the worker's encoder; VACUUM ANALYZE; bytes per observation (parcel x scene x band).",
        "",
        "| layout | observations | heap B/obs | indexes B/obs | histograms B/obs | total B/obs | NL season |"
        " series p50 / p99 ms (server) | client p50 ms | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, label in (("row_per_band", "row per band (before 011)"), ("compact", "row per (parcel, scene), 011")):
        s: Sizes = res[key]
        q = res["series"][key]
        lines.append(
            f"| {label} | {s.observations:,} | {s.per_obs(s.heap):.1f} | {s.per_obs(s.indexes):.1f} |"
            f" {s.per_obs(s.hist_heap + s.hist_indexes):.1f} | **{s.per_obs(s.total):.1f}** |"
            f" {s.per_obs(s.total) * season_obs / 1e9:,.0f} GB | {q['server_p50']:.3f} / {q['server_p99']:.3f} |"
            f" {q['client_p50']:.3f} | ≤ 80 B/obs |"
        )
    w = res["write_s"]
    lines += [
        "",
        f"Writing (delete + COPY, one transaction per scene): compact {w['compact']:.1f} s, row per band"
        f" {w['row_per_band']:.1f} s. Converting the row-per-band dataset in place (the migration's"
        f" function): {res['migrate_s']:.1f} s, {res['migrate_diff']} rows differing from the compact one.",
    ]
    return lines


BEGIN, END = "<!-- bench-chain:begin -->", "<!-- bench-chain:end -->"


def write_doc(table: str) -> None:
    """The figures between the markers of docs/performance.md's "Chain rehearsal" section (added
    at the end of the file when missing); the reading around them is written by hand."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + f"\n\n## Chain rehearsal\n\n{block}\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cbmflow.dev.bench.chain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.02, help="parcels imported, as a share of NL's 770k")
    ap.add_argument(
        "--stages",
        default="storage,import,granule,chain,watch,project",
        help="comma-separated: storage, import, granule, chain, watch, project (needs granule's figures), series",
    )
    ap.add_argument("--storage-parcels", type=int, default=15_400, help="parcels of the storage stage")
    ap.add_argument("--storage-scenes", type=int, default=12, help="S2 scenes written in the storage stage")
    ap.add_argument("--coverages", default="0.1,0.5,1.0", help="shares of the granule covered by parcels")
    ap.add_argument("--no-jp2", action="store_true", help="skip the JPEG2000 band (its encoding takes minutes)")
    ap.add_argument(
        "--chain-scenes", type=int, default=24, help="S2 scenes through the chain (of the chaos world's 50)"
    )
    ap.add_argument("--chain-parcels", type=int, default=5000, help="parcels of the chain's world")
    ap.add_argument("--cpu-cog", type=float, default=0.0, help="project also with this CPU s per COG granule")
    ap.add_argument("--cpu-jp2", type=float, default=0.0, help="project also with this CPU s per JP2 granule")
    ap.add_argument("--watch-items", type=int, default=NL_S2_GRANULES, help="items of the season's catalogue")
    ap.add_argument("--series-parcels", type=int, default=140_000, help="parcels of the series stage")
    ap.add_argument("--series-scenes", type=int, default=60, help="scenes of the series stage (x 6 bands)")
    ap.add_argument("--samples", type=int, default=500, help="random parcels per latency figure")
    ap.add_argument(
        "--state", type=Path, default=None, help="cluster directory (default $CBMFLOW_STATE_DIR/bench-chain)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--doc", action="store_true", help="write the figures into docs/performance.md")
    args = ap.parse_args(argv)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}

    from cbmflow.dev.api_process import free_port
    from cbmflow.dev.stack import start_postgres, stop_postgres
    from cbmflow.settings import StackSettings, state_dir

    base_dir = args.state or (state_dir() / "bench-chain")
    parcels = max(100, round(NL_PARCELS * args.scale))
    season_obs = NL_PARCELS * (NL_S2_DATES * 6 + NL_S1_DATES * 2)
    lines: list[str] = []
    results: dict[str, Any] = {}
    pg = start_postgres(base_dir / "postgres", free_port(), StackSettings().run_as, "cbmflow_chain", "cbmflow")
    try:
        db.migrate(pg.dsn)
        work = base_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        if "import" in stages:
            res = stage_import(pg.dsn, work, parcels, args.seed)
            per_770k = res["wall_s"] * NL_PARCELS / res["parcels"]
            lines += [
                f"Parcel import: {res['parcels']:,} parcels (GeoParquet, {res['file_mb']:.0f} MB, EPSG:28992, median"
                f" ~2 ha): {res['wall_s']:.1f} s, peak RSS {res['rss_mb']:,.0f} MB"
                + (
                    f"; linear to 770k: {per_770k:.0f} s (target ≤ 120 s), RSS ≈"
                    f" {res['rss_mb'] * NL_PARCELS / res['parcels']:,.0f} MB (target ≤ 2,048 MB; linear is an upper"
                    " bound: part of the RSS is the interpreter)"
                    if res["parcels"] < NL_PARCELS
                    else " (targets ≤ 120 s, ≤ 2,048 MB)"
                )
                + ".",
                "",
            ]
        if "granule" in stages:
            coverages = [float(c) for c in args.coverages.split(",")]
            res = stage_granule(pg.dsn, work, coverages, not args.no_jp2, args.seed)
            results["granule"] = res
            (work / "granule.json").write_text(json.dumps(res))
            lines += render_granule(res)
        if "chain" in stages:
            res = stage_chain(work, args.chain_scenes, args.chain_parcels, [1, 2], 2026)
            results["chain"] = res
            lines += render_chain(res)
        if "watch" in stages:
            from cbmflow.dev.chaos import ChaosConfig, _world

            world = _world(
                ChaosConfig(scenes=args.chain_scenes, parcels=args.chain_parcels, seed=2026), state_dir() / "chaos"
            )
            res = stage_watch(work, world, args.watch_items)
            lines += [
                f"Watcher over a season's catalogue ({res['items']:,} S2 L2A items on the 15 NL tiles, static STAC,"
                f" `cbmflow watch --once`): first cycle {res['cycle1_s']:.1f} s ({res['scenes']:,} scenes,"
                f" {res['published']:,} jobs published, {res['rejected']} rejected), second cycle (nothing new)"
                f" {res['cycle2_s']:.1f} s.",
                "",
            ]
        if "project" in stages:
            granule = results.get("granule") or _cached(work / "granule.json")
            if granule is None:
                lines += ["Projection: needs the granule stage's figures (run --stages granule first).", ""]
            else:
                lines += render_projection(project(granule))
                if args.cpu_cog or args.cpu_jp2:
                    given = {k: v for k, v in (("cog", args.cpu_cog), ("jp2", args.cpu_jp2)) if v}
                    lines += [
                        "The same projection with the CPU seconds per granule given on the command line"
                        f" ({', '.join(f'{k.upper()} {v:g} s' for k, v in given.items())}):",
                        "",
                        *render_projection(project(granule, cpu_s=given))[2:],
                    ]
        if "series" in stages:
            res = stage_series(pg.dsn, args.series_parcels, args.series_scenes, args.samples, args.seed)
            s, q, v = res["sizes"], res["series"], res["series_views"]
            lines += [
                f"parcelTimeSeries on {s.observations:,} observations in the compact layout ({args.series_parcels:,}"
                f" parcels x {args.series_scenes} scenes x 6 bands; {s.per_obs(s.total):.1f} B/obs; one series ="
                f" {q['rows']:.0f} rows with SCL histograms): server p50 {q['server_p50']:.3f} ms (target ≤ 1 ms),"
                f" p99 {q['server_p99']:.3f} ms; client round trip p50 {q['client_p50']:.3f} ms,"
                f" p99 {q['client_p99']:.3f} ms. The statement it replaced (through the row-per-band views),"
                f" same run: server p50 {v['server_p50']:.3f} ms, p99 {v['server_p99']:.3f} ms; client p50"
                f" {v['client_p50']:.3f} ms, p99 {v['client_p99']:.3f} ms.",
                "",
            ]
        if "storage" in stages:
            res = stage_storage(pg.dsn, args.storage_parcels, args.storage_scenes, args.samples, args.seed)
            lines += render_storage(res, season_obs)
    finally:
        stop_postgres(base_dir / "postgres")
    table = "\n".join(lines).rstrip("\n")
    print(table)
    if args.doc:
        write_doc(f"`make bench-chain BENCH_ARGS='{' '.join(argv if argv is not None else sys.argv[1:])}'`"
                  f" ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores):\n\n{table}")  # fmt: skip
        _progress(f"figures written to {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
