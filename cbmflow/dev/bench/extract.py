"""``make bench-extract``: the extraction engine on full Sentinel-2-sized inputs (a benchmark, not a test).

Inputs are generated once and cached under ``$CBMFLOW_STATE_DIR/bench`` (DEFLATE tiled GeoTIFFs
on the real 10980 x 10980 grid of tile 32UPU, and grid-jittered parcels in the raster CRS).
Every figure comes from this one run; each measured case runs in a fresh process so that its
peak RSS is its own. rasterstats and exactextract are timed on a parcel subsample and scaled
per parcel (stated in the table), because rasterstats on 100k parcels takes tens of minutes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.windows
import shapely
from affine import Affine

from card.geobox import GeoBox

SIZE = 10980
EPSG = 32632
T10 = Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 5400020.0)
T20 = Affine(20.0, 0.0, 600000.0, 0.0, -20.0, 5400020.0)
BANDS_10M = ("B02", "B03", "B04", "B08")
BANDS_20M = ("B05", "B11", "SCL")
SUBSAMPLE = 2000
BEGIN, END = "<!-- bench-extract:begin -->", "<!-- bench-extract:end -->"


def _state_dir() -> Path:
    return Path(os.environ.get("CBMFLOW_STATE_DIR", ".cbmflow"))


# --- inputs -------------------------------------------------------------------------------------


def _write_band(path: Path, size: int, transform: Affine, seed: int, classes: bool = False) -> None:
    """Field-like imagery: a smooth per-100 m level plus pixel noise (compresses like real L2A)."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp.tif")
    dtype = "uint8" if classes else "uint16"
    coarse = (
        rng.integers(1, 12, (size // 10 + 2, size // 10 + 2))
        if classes
        else rng.integers(800, 5000, (size // 10 + 2, size // 10 + 2))
    )
    with rasterio.open(
        tmp, "w", driver="GTiff", width=size, height=size, count=1, dtype=dtype, crs=f"EPSG:{EPSG}",
        transform=transform, nodata=0, tiled=True, blockxsize=512, blockysize=512, compress="deflate",
        predictor=2, bigtiff="if_safer",
    ) as dst:  # fmt: skip
        for r0 in range(0, size, 512):
            h = min(512, size - r0)
            rows = np.arange(r0, r0 + h) // 10
            base = np.repeat(coarse[rows][:, : size // 10 + 1], 10, axis=1)[:, :size]
            if classes:
                block = base.astype(np.uint8)
            else:
                block = (base + rng.normal(0, 60, (h, size))).clip(1, 65535).astype(np.uint16)
                block[:, : size // 20] = 0  # a swath-edge nodata strip
            dst.write(block, 1, window=rasterio.windows.Window(0, r0, size, h))
    tmp.rename(path)


def _parcels(path: Path, n: int, seed: int) -> None:
    """``n`` jittered, rotated quadrilaterals on a regular grid of cells over the whole tile."""
    if path.exists():
        return
    import geopandas as gpd

    rng = np.random.default_rng(seed)
    k = int(np.ceil(np.sqrt(n)))
    cell = SIZE * 10.0 / k
    idx = np.arange(n)
    cx = 600000.0 + (idx % k + 0.5) * cell
    cy = 5400020.0 - (idx // k + 0.5) * cell
    half = cell * rng.uniform(0.25, 0.45, (n, 2))
    theta = rng.uniform(-0.3, 0.3, n)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    local = corners[None] * half[:, None, :] * rng.uniform(0.85, 1.0, (n, 4, 1))
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    x = local[..., 0] * c - local[..., 1] * s + cx[:, None]
    y = local[..., 0] * s + local[..., 1] * c + cy[:, None]
    geoms = shapely.polygons(np.stack([x, y], axis=-1))
    tmp = path.with_suffix(".tmp")
    gpd.GeoDataFrame({"pid": idx + 1}, geometry=geoms, crs=f"EPSG:{EPSG}").to_parquet(tmp)
    tmp.rename(path)


def prepare(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for i, b in enumerate(BANDS_10M):
        files[b] = root / f"{b}_10m.tif"
        _write_band(files[b], SIZE, T10, seed=i)
    for i, b in enumerate(BANDS_20M):
        files[b] = root / f"{b}_20m.tif"
        _write_band(files[b], SIZE // 2, T20, seed=10 + i, classes=b == "SCL")
    for n in (20_000, 100_000):
        files[f"parcels{n}"] = root / f"parcels_{n}.parquet"
        _parcels(files[f"parcels{n}"], n, seed=n)
    return files


# --- measured cases (each in a fresh process) ---------------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_parcels(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    import geopandas as gpd

    gdf = gpd.read_parquet(path)
    return np.asarray(gdf.geometry.values, dtype=object), gdf["pid"].to_numpy(np.int64)


def _grid(path: Path) -> GeoBox:
    with rasterio.open(path) as src:
        return GeoBox.from_dataset(src)


def _index(parcels: Path, band: Path, cache: Path) -> tuple[Any, float]:
    """The index for (parcels, band grid), from the disk cache when present; build seconds."""
    from worker import engine

    if cache.exists():
        return engine.ParcelIndex.load(cache), 0.0
    geoms, pids = _load_parcels(parcels)
    t = time.perf_counter()
    index = engine.build_index(geoms, pids, _grid(band))
    dt = time.perf_counter() - t
    index.save(cache)
    return index, dt


def _decode(plan: Any, path: Path) -> float:
    """The floor: the same strips read with rasterio alone, nothing computed."""
    t = time.perf_counter()
    with rasterio.open(path) as src:
        _, col_off, _, width = plan.index.window
        for r0, r1 in plan.reads():
            src.read(1, window=rasterio.windows.Window(col_off, r0, width, r1 - r0))
    return time.perf_counter() - t


def _extract(plan: Any, path: Path, classes: bool) -> int:
    from worker import engine

    with rasterio.open(path) as src:
        read = engine.window_reader(src, plan.index)
        if classes:
            return len(engine.class_histograms_strips(plan, read, nodata=0).pid)
        return len(engine.band_stats_strips(plan, read, nodata=0))


def case_band(parcels: Path, band: Path, cache: Path) -> dict[str, float]:
    """One 10 m band: cold (index build + extraction), warm extraction, decode floor."""
    from worker import engine

    t0 = time.perf_counter()
    index, build_s = _index(parcels, band, cache)
    plan = engine.plan_strips(index)
    _extract(plan, band, False)  # cold: the first scene on this grid (includes numba cache load)
    cold = time.perf_counter() - t0
    warm = min(_timed(lambda: _extract(plan, band, False)) for _ in range(2))
    floor = min(_decode(plan, band) for _ in range(2))
    return {
        "build_s": build_s,
        "cold_s": cold,
        "warm_s": warm,
        "floor_s": floor,
        "rows": float(_extract(plan, band, False)),
        "parcels": float(len(index)),
        "pixels": float(plan.rows_read * index.window[3]),
        "buffer_mb": plan.buffer_rows * index.window[3] * 2 / 1e6,
        "rss_mb": _rss_mb(),
    }


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def case_image(files: dict[str, str], parcels: str, cache_dir: str, repeat: int = 2) -> dict[str, float]:
    """A full S2 image (4 x 10 m, 3 x 20 m) with warm indexes; its decode floor over the same strips."""
    from worker import engine

    plans = {}
    for grid_band in ("B04", "B05"):
        index, _ = _index(
            Path(parcels), Path(files[grid_band]), Path(cache_dir) / f"{Path(parcels).stem}_{grid_band}.npz"
        )
        plans[grid_band] = engine.plan_strips(index)

    def scene() -> None:
        for b in BANDS_10M:
            _extract(plans["B04"], Path(files[b]), False)
        for b in BANDS_20M:
            _extract(plans["B05"], Path(files[b]), b == "SCL")

    scene()  # warm numba and the page cache
    warm = min(_timed(scene) for _ in range(repeat))
    floor = min(
        sum(_decode(plans["B04"], Path(files[b])) for b in BANDS_10M)
        + sum(_decode(plans["B05"], Path(files[b])) for b in BANDS_20M)
        for _ in range(repeat)
    )
    return {"warm_s": warm, "floor_s": floor, "rss_mb": _rss_mb(), "start": time.time()}


def case_worker(
    files: dict[str, str], parcels: str, cache_dir: str, barrier: Any, threads: int = 0
) -> dict[str, float]:
    if threads:  # as `cbmflow worker` does for CBMFLOW_WORKER_THREADS: before numba loads
        os.environ["NUMBA_NUM_THREADS"] = os.environ["GDAL_NUM_THREADS"] = str(threads)
    from worker import engine

    plans = {}
    for grid_band in ("B04", "B05"):
        index, _ = _index(
            Path(parcels), Path(files[grid_band]), Path(cache_dir) / f"{Path(parcels).stem}_{grid_band}.npz"
        )
        plans[grid_band] = engine.plan_strips(index)
    _extract(plans["B05"], Path(files["SCL"]), True)  # numba warm
    barrier.wait()
    t = time.perf_counter()
    for b in BANDS_10M:
        _extract(plans["B04"], Path(files[b]), False)
    for b in BANDS_20M:
        _extract(plans["B05"], Path(files[b]), b == "SCL")
    return {"scene_s": time.perf_counter() - t}


def case_reference(parcels: Path, band: Path, n: int) -> dict[str, float]:
    """rasterstats and exactextract on the first ``n`` parcels, same stats, per-parcel seconds."""
    from rasterstats import zonal_stats

    geoms, _ = _load_parcels(parcels)
    sub = list(geoms[:: max(1, len(geoms) // n)][:n])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        zonal_stats(sub, str(band), all_touched=False, nodata=0,
                    stats="count mean std min max percentile_25 percentile_50 percentile_75")  # fmt: skip
        rs = (time.perf_counter() - t) / len(sub)
    out: dict[str, float] = {"rasterstats_s_per_parcel": rs, "n": float(len(sub))}
    try:
        import geopandas as gpd
        from exactextract import exact_extract

        gdf = gpd.GeoDataFrame({"pid": np.arange(len(sub))}, geometry=sub, crs=f"EPSG:{EPSG}")
        ops = ["count", "mean", "stdev", "min", "max", "quantile(q=0.25)", "quantile(q=0.50)", "quantile(q=0.75)"]
        exact_extract(str(band), gdf.iloc[:10], ops, output="pandas")
        t = time.perf_counter()
        exact_extract(str(band), gdf, ops, output="pandas")
        out["exactextract_s_per_parcel"] = (time.perf_counter() - t) / len(sub)
    except ImportError:
        out["exactextract_s_per_parcel"] = float("nan")
    return out


def case_copy(rows: int) -> dict[str, float]:
    """Binary COPY of ``rows`` signature rows into an unindexed UNLOGGED staging table."""
    import psycopg2

    from cbmflow.dev.stack import start_postgres, stop_postgres
    from cbmflow.settings import StackSettings
    from worker import pgcopy

    base = Path(tempfile.mkdtemp(prefix="cbmflow-bench-pg-"))
    base.chmod(0o755)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = start_postgres(base / "postgres", port, StackSettings().run_as, "bench", "bench")
    try:
        conn = psycopg2.connect(pg.dsn_for("bench"))
        rng = np.random.default_rng(0)
        n_parcels = rows // 7
        chunks = [
            pgcopy.sig_rows(
                np.arange(1, n_parcels + 1),
                1,
                b,
                rng.integers(1, 500, n_parcels),
                {f: rng.uniform(0, 1e4, n_parcels) for f in pgcopy.STAT_FIELDS},
            )  # fmt: skip
            for b in (*BANDS_10M, "B05", "B11", "B8A")
        ]
        with conn, conn.cursor() as cur:
            cur.execute(
                "CREATE UNLOGGED TABLE staging (pid int4, scene_id int8, band text, count int4, mean float8,"
                " std float8, min float8, max float8, p25 float8, p50 float8, p75 float8)"
            )
        best = float("inf")
        for _ in range(3):
            with conn, conn.cursor() as cur:
                cur.execute("TRUNCATE staging")
            t = time.perf_counter()
            with conn, conn.cursor() as cur:
                cur.copy_expert("COPY staging FROM STDIN WITH (FORMAT binary)", pgcopy.stream(chunks))
            best = min(best, time.perf_counter() - t)
        conn.close()
        return {"rows": float(n_parcels * 7), "copy_s": best}
    finally:
        stop_postgres(base / "postgres")
        shutil.rmtree(base, ignore_errors=True)


def case_jp2_window(root: str) -> dict[str, float]:
    """On the test world: decoding only the index's strips of B04 (JP2) vs the whole file."""
    from card.s2 import open_s2_product
    from card.testworld import generate
    from worker import engine

    world = Path(root) / "world"
    summary = generate(world, parcels=300, scenes=1, seed=0)
    geoms, pids = _world_parcels(summary.parcels_path)
    product = open_s2_product(summary.product_paths[0])
    path = product.band_path("B04")
    index = engine.build_index(geoms, pids, _grid(path))
    plan = engine.plan_strips(index)
    window = min(_decode(plan, path) for _ in range(3))
    full = min(_timed(lambda: _read_all(path)) for _ in range(3))
    with rasterio.open(path) as src:
        shape = (src.height, src.width)
    return {
        "window_s": window,
        "full_s": full,
        "window_px": float(plan.rows_read * index.window[3]),
        "full_px": float(shape[0] * shape[1]),
    }


def case_jp2_tile(root: str, b04_tif: str, parcels: str) -> dict[str, float]:
    """A full 10980 x 10980 JP2 band (1024 x 1024 tiles, lossless: Sentinel-2's layout) decoded
    whole vs only the index strips of parcels covering part of the tile, on one core.

    The parts: the north-west quarter of the tile (a tile on an AOI border), and a 10 x 10 km
    block (a small AOI, like the test world's).
    """
    os.environ["GDAL_NUM_THREADS"] = "1"  # per-core figures
    from worker import engine

    jp2 = Path(root) / "B04_10m.jp2"
    if not jp2.exists():
        with rasterio.open(b04_tif) as src:
            profile = src.profile | {
                "driver": "JP2OpenJPEG",
                "QUALITY": "100",
                "REVERSIBLE": "YES",
                "BLOCKXSIZE": "1024",
                "BLOCKYSIZE": "1024",
                "RESOLUTIONS": "6",
            }
            for key in ("tiled", "blockxsize", "blockysize", "compress", "predictor", "interleave"):
                profile.pop(key, None)
            tmp = jp2.with_suffix(".tmp.jp2")
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(src.read(1), 1)
        tmp.rename(jp2)
    geoms, pids = _load_parcels(Path(parcels))
    cx = shapely.get_x(shapely.centroid(geoms))
    cy = shapely.get_y(shapely.centroid(geoms))
    x0, y0 = T10.c, T10.f
    parts = {
        "quarter": (cx < x0 + SIZE * 5) & (cy > y0 - SIZE * 5),
        "block10km": (cx > x0 + 30_000) & (cx < x0 + 40_000) & (cy < y0 - 30_000) & (cy > y0 - 40_000),
    }
    out: dict[str, float] = {"full_s": _timed(lambda: _read_all(jp2)), "full_px": float(SIZE * SIZE)}
    grid = _grid(jp2)
    for name, keep in parts.items():
        index = engine.build_index(geoms[keep], pids[keep], grid)
        plan = engine.plan_strips(index)
        out[f"{name}_parcels"] = float(keep.sum())
        out[f"{name}_s"] = _decode(plan, jp2)
        out[f"{name}_px"] = float(plan.rows_read * index.window[3])
    return out


def _read_all(path: Path) -> None:
    with rasterio.open(path) as src:  # a fresh dataset: nothing from GDAL's block cache
        src.read(1)


def _world_parcels(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    import geopandas as gpd

    gdf = gpd.read_file(path).to_crs(EPSG)
    gdf = gdf[gdf.geometry.is_valid]
    return np.asarray(gdf.geometry.values, dtype=object), np.arange(len(gdf), dtype=np.int64)


def _in_process(fn: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --- report -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path, default=_state_dir() / "bench")
    ap.add_argument("--subsample", type=int, default=SUBSAMPLE)
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/performance.md")
    args = ap.parse_args()
    t0 = time.time()
    print(f"inputs under {args.root} (generated once) ...", flush=True)
    files = prepare(args.root)
    cache = args.root / "indexes"
    if cache.exists():
        shutil.rmtree(cache)  # the cold figures must include the index build
    cache.mkdir()
    lines = [f"{os.cpu_count()} CPU cores; one 10980 x 10980 uint16 band, DEFLATE (predictor 2), 512 x 512 tiles."]
    table = ["| measurement | 20k parcels | 100k parcels | target |", "|---|---:|---:|---|"]
    res: dict[int, dict[str, float]] = {}
    ref: dict[int, dict[str, float]] = {}
    for n in (20_000, 100_000):
        res[n] = _in_process(case_band, files[f"parcels{n}"], files["B04"], cache / f"parcels_{n}_B04.npz")
        ref[n] = _in_process(case_reference, files[f"parcels{n}"], files["B04"], args.subsample)
        print(f"{n} parcels: {res[n]} {ref[n]}", flush=True)

    def row(name: str, fmt: Callable[[int], str], target: str = "") -> None:
        table.append(f"| {name} | {fmt(20_000)} | {fmt(100_000)} | {target} |")

    row("index build (rasterize, once per grid)", lambda n: f"{res[n]['build_s']:.2f} s")
    row("cold: index + first band", lambda n: f"{res[n]['cold_s']:.2f} s")
    row("warm: one band (wall)", lambda n: f"{res[n]['warm_s']:.3f} s")
    row("decode-only floor, same strips", lambda n: f"{res[n]['floor_s']:.3f} s")
    row("warm / floor", lambda n: f"{res[n]['warm_s'] / res[n]['floor_s']:.2f}x")
    row("pixels/s (warm, pixels decoded)", lambda n: f"{res[n]['pixels'] / res[n]['warm_s'] / 1e6:.0f} M")
    row("parcels/s (warm)", lambda n: f"{res[n]['parcels'] / res[n]['warm_s']:,.0f}")
    row("peak RSS (process, incl. index build)", lambda n: f"{res[n]['rss_mb']:.0f} MB")
    row("strip buffer", lambda n: f"{res[n]['buffer_mb']:.0f} MB")
    for name, target in (("rasterstats", "≥ 50x"), ("exactextract", "≥ 10x")):
        key = f"{name}_s_per_parcel"
        ref_s = {n: ref[n][key] * n for n in ref}
        a, b = ref_s[20_000], ref_s[100_000]
        table.append(f"| {name} (per parcel on {int(ref[20_000]['n'])} parcels, x n) | {a:.1f} s | {b:.1f} s | |")
        for kind in ("warm", "cold"):
            x, y = a / res[20_000][f"{kind}_s"], b / res[100_000][f"{kind}_s"]
            table.append(f"| speed-up vs {name}, {kind} | {x:.0f}x | {y:.0f}x | {target if kind == 'warm' else ''} |")

    sfiles = {k: str(v) for k, v in files.items()}
    img = _in_process(case_image, sfiles, str(files["parcels100000"]), str(cache))
    print(f"image: {img}", flush=True)
    table.append(
        f"| full S2 image (4 x 10 m + B05, B11, SCL at 20 m), warm, 100k parcels | | {img['warm_s']:.2f} s | |"
    )
    table.append(f"| its decode-only floor | | {img['floor_s']:.2f} s | |")
    table.append(f"| image warm / floor | | {img['warm_s'] / img['floor_s']:.2f}x | ≤ 1.15x |")
    table.append(f"| image peak RSS | | {img['rss_mb']:.0f} MB | |")

    ctx = mp.get_context("spawn")
    for threads, label in ((0, "every core (default)"), (1, "one core (CBMFLOW_WORKER_THREADS=1)")):
        scene: dict[int, float] = {}
        for workers in (1, 2):
            barrier = ctx.Manager().Barrier(workers + 1)
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futs = [
                    pool.submit(case_worker, sfiles, str(files["parcels100000"]), str(cache), barrier, threads)
                    for _ in range(workers)
                ]
                barrier.wait()
                t = time.perf_counter()
                per = [f.result()["scene_s"] for f in futs]
                scene[workers] = time.perf_counter() - t
            print(f"threads {threads}, {workers} worker(s): {per}", flush=True)
        table.append(f"| workers using {label}: per-scene time, warm index, 1 worker | | {scene[1]:.2f} s | |")
        table.append(f"| … 2 workers, one scene each (wall) | | {scene[2]:.2f} s | |")
        table.append(
            f"| … throughput 2 workers / 1 | | {2 * scene[1] / scene[2]:.2f}x | {'≥ 1.8x' if threads == 1 else ''} |"
        )

    cp = _in_process(case_copy, 700_000)
    rate = cp["rows"] / cp["copy_s"] / 1e6
    table.append(f"| binary COPY into UNLOGGED unindexed staging | | {rate:.2f} M rows/s | ≥ 1M rows/s |")

    jp = _in_process(case_jp2_window, str(args.root))
    lines.append(
        f"Test world (300 parcels, B04 JP2 {int(jp['full_px'])} px): index strips {jp['window_s']:.3f} s"
        f" ({jp['window_px'] / jp['full_px']:.0%} of the pixels) vs whole file {jp['full_s']:.3f} s."
    )
    tile = _in_process(case_jp2_tile, str(args.root), str(files["B04"]), str(files["parcels100000"]))
    print(f"jp2 tile: {tile}", flush=True)
    table.append(
        f"| full-tile JP2 B04 (1024² tiles, lossless), whole band decoded, 1 core | | {tile['full_s']:.1f} s | |"
    )
    for name, what in (("quarter", "north-west quarter"), ("block10km", "10 x 10 km block")):
        table.append(
            f"| … only the index strips, {int(tile[f'{name}_parcels']):,} parcels in a {what}"
            f" ({tile[f'{name}_px'] / tile['full_px']:.0%} of the pixels) | | {tile[f'{name}_s']:.1f} s"
            f" ({tile['full_s'] / tile[f'{name}_s']:.1f}x less) | |"
        )
    lines.append(f"rasterstats/exactextract timed on a {args.subsample}-parcel subsample, scaled per parcel.")
    lines.append(f"Whole run: {time.time() - t0:.0f} s.")
    text = "\n".join([*lines, "", *table])
    print(text)
    if not args.no_docs:
        _write_docs(text)


def _write_docs(text: str) -> None:
    path = Path("docs/performance.md")
    doc = path.read_text() if path.exists() else "# Performance\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc = (
            doc.rstrip()
            + "\n\n## Extraction\n\n`make bench-extract` (`python -m cbmflow.dev.bench.extract`)\n\n"
            + block
            + "\n"
        )
    path.write_text(doc)


if __name__ == "__main__":
    main()
