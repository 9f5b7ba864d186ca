"""CARD-COH benchmark: IW SLC pairs → coherence COGs on Sentinel-2 tile grids (a benchmark, not a test).

Input: the real annotation of ``../shared/data/sentinel1/coh-pair`` (S1A IW2, VV + VH, 2025-04-06 and
2025-04-18: 9 bursts of 1513 lines × 26 395 samples per date and polarisation) with synthetic
pixels: complex int16 Gaussian noise (σ ≈ 65 DN per component, as the real products' image
statistics) written once per date and polarisation as uncompressed strip GeoTIFFs of the annotated
shape, like the real measurements. Only the bursts a case uses are written (sparse TIFF).
Timing does not depend on the pixel values; the validation lives in tests/unit/test_card_coh.py.

Cases, each in a fresh process limited to N cores (``taskset`` plus thread-count variables;
``generate_coh`` runs N block threads), wall time, CPU time and peak RSS (``os.wait4``) its own:

* ``coh burst pair``: burst 230136 (the 5th) of both dates, VV + VH;
* ``coh IW2 swath pair``: all 9 bursts (``scale`` < 1: a centred fraction of them), VV + VH.

Output grids: the Sentinel-2 tiles the bursts' footprint meets (``card.mgrs.tiles_intersecting``),
each cut to the footprint's bounding box on the tile's own 10 m pixel grid (the rest of a tile
is no data and costs only COG writing); flat ellipsoid DEM; 7 × 7 window.

Target (issue 13): a full three-swath pair onto its tiles in ≤ 10 min on 2 cores, peak RSS ≤ 6 GB.
Only IW2's annotation is public here, so the three-swath figure is **extrapolated** as 3 × the
IW2 swath (IW1 and IW3 have the same bursts and ~the same sample counts); the rows say so.

``python -m cbmflow.dev.bench.coh [--cores 1,2] [--scale 1]`` prints the table; ``run`` is what
``make bench-card`` (cbmflow/dev/bench/card.py) calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[3]
PAIR = REPO.parent / "shared" / "data" / "sentinel1" / "coh-pair"
DATES = (
    "S1A_IW_SLC__1SDV_20250406T022008_20250406T022035_058630_07421F_93A7.SAFE",
    "S1A_IW_SLC__1SDV_20250418T022008_20250418T022035_058805_074946_C7D4.SAFE",
)
BURST_CASE = 4
TARGET_S = 600.0
TARGET_RSS_MB = 6144.0


def _state_dir() -> Path:
    return Path(os.environ.get("CBMFLOW_STATE_DIR", ".cbmflow"))


def _burst_indices(scale: float, single: bool) -> list[int]:
    if single:
        return [BURST_CASE]
    n = max(1, min(9, round(9 * scale)))
    start = (9 - n) // 2
    return list(range(start, start + n))


def prepare(root: Path, bursts: list[int]) -> dict[str, Path]:
    """SAFE copies (manifest + annotation) with synthetic measurements holding ``bursts``; cached."""
    import rasterio
    import rasterio.errors

    from card.s1slc.safe import open_slc

    out: dict[str, Path] = {}
    for k, name in enumerate(DATES):
        src = PAIR / name
        if not src.is_dir():
            raise SystemExit(f"shared test data missing: {PAIR}")
        safe = root / name
        (safe / "annotation").mkdir(parents=True, exist_ok=True)
        (safe / "measurement").mkdir(exist_ok=True)
        if not (safe / "manifest.safe").exists():
            (safe / "manifest.safe").write_bytes((src / "manifest.safe").read_bytes())
        product = open_slc(src)
        for (_swath, pol), sw in product.swaths.items():
            xml = next((src / "annotation").glob(f"s1a-iw2-slc-{pol.lower()}-*.xml"))
            (safe / "annotation" / xml.name).write_bytes(xml.read_bytes())
            tif = safe / "measurement" / (xml.stem + ".tiff")
            done = tif.with_suffix(".bursts")
            have = set(json.loads(done.read_text())) if done.exists() else set()
            if set(bursts) <= have:
                continue
            rng = np.random.default_rng(1000 * k + len(pol) + ord(pol[1]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                mode = "r+" if tif.exists() else "w"
                kwargs: dict[str, Any] = {}
                if mode == "w":
                    kwargs = dict(driver="GTiff", width=sw.n_samples, height=sw.n_lines, count=1,
                                  dtype="complex_int16", sparse_ok=True)  # fmt: skip
                with rasterio.open(tif, mode, **kwargs) as ds:
                    for j in sorted(set(bursts) - have):
                        b = sw.bursts[j]
                        for r0 in range(0, b.lines, 256):
                            n = min(256, b.lines - r0)
                            z = rng.normal(0, 65, (n, sw.n_samples)) + 1j * rng.normal(0, 65, (n, sw.n_samples))
                            window = rasterio.windows.Window(0, b.first_line + r0, sw.n_samples, n)
                            ds.write(np.round(z).astype(np.complex64), 1, window=window)
            done.write_text(json.dumps(sorted(have | set(bursts))))
        out[name] = safe
    return out


def _cut(product: Any, bursts: list[int]) -> Any:
    """The product with each swath's burst list cut to ``bursts`` (same lines in the measurement)."""
    swaths = {
        key: dataclasses.replace(sw, bursts=tuple(sw.bursts[j] for j in bursts)) for key, sw in product.swaths.items()
    }
    return dataclasses.replace(product, swaths=swaths)


def _grids(product: Any) -> list[tuple[str, Any]]:
    """The S2 tiles the bursts' footprint meets, each cut to the footprint's bounding box."""
    from pyproj import Transformer
    from shapely.geometry import MultiPoint

    from card.mgrs import parse_tile, tiles_intersecting

    sw = next(iter(product.swaths.values()))
    g = sw.grid
    t0, t1 = (
        sw.bursts[0].azimuth_time_s,
        sw.bursts[-1].azimuth_time_s + sw.bursts[-1].lines * sw.azimuth_time_interval_s,
    )
    keep = (g.azimuth_time >= t0 - 1.0) & (g.azimuth_time <= t1 + 1.0)
    hull = MultiPoint(list(zip(g.lon[keep], g.lat[keep], strict=True))).convex_hull
    out = []
    for name in tiles_intersecting(hull):
        box = parse_tile(name).geobox(10)
        to_map = Transformer.from_crs("EPSG:4326", box.crs, always_xy=True)
        x, y = to_map.transform(*np.asarray(hull.exterior.coords).T)
        rows, cols = box.fractional_rowcol(x, y)
        r0, r1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())), box.height)
        c0, c1 = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())), box.width)
        if r0 < r1 and c0 < c1:
            out.append((name, box[r0:r1, c0:c1]))
    return out


def case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this process: returns work time, CPU time, pixels, valid fraction, peak RSS."""
    import rasterio

    from card.s1grd.dem import FlatDem
    from card.s1slc.coh import generate_coh
    from card.s1slc.safe import open_slc

    root = Path(spec["root"])
    bursts = list(spec["bursts"])
    early, late = (_cut(open_slc(root / name), bursts) for name in DATES)
    grids = _grids(early)
    started, cpu0 = time.perf_counter(), time.process_time()
    pixels = valid = 0
    for name, grid in grids:
        out = generate_coh(early, late, grid, FlatDem(), str(root / "out"), workers=int(spec["cores"]), name=name)
        pixels += out.pixels
        with rasterio.open(out.coherence["VV"]) as ds:
            valid += int(np.isfinite(ds.read(1)).sum())
    return {
        "pixels": pixels,
        "valid_pixels": valid,
        "tiles": [n for n, _ in grids],
        "work_s": time.perf_counter() - started,
        "work_cpu_s": time.process_time() - cpu0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def run_case(spec: dict[str, Any], cores: int) -> dict[str, Any]:
    allowed = sorted(os.sched_getaffinity(0))
    cpus = ",".join(str(c) for c in allowed[:cores])
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "GDAL_NUM_THREADS"):
        env[var] = str(cores)
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "cbmflow.dev.bench.coh", "--case", json.dumps(spec)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    process_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec['case']} failed ({proc.returncode}):\n{stderr[-3000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    return {
        "case": spec["case"],
        "cores": cores,
        "pixels": int(r["pixels"]),
        "wall_s": float(r["work_s"]),
        "cpu_s": float(r["work_cpu_s"]),
        "process_s": process_s,
        "rss_mb": float(r["rss_mb"]),
        "valid": r["valid_pixels"] / max(r["pixels"], 1),
        "note": f"{len(spec['bursts'])} burst(s) x VV+VH, tiles {' '.join(r['tiles'])}",
    }


def run(cores: list[int], scale: float, root: Path | None = None) -> list[dict[str, Any]]:
    """The table's rows (keys of cbmflow.dev.bench.card.Row) plus the target lines."""
    base = (root or _state_dir() / "bench" / "card") / "coh"
    swath_bursts = _burst_indices(scale, single=False)
    prepare(base, sorted(set(swath_bursts) | {BURST_CASE}))
    rows = []
    for n in cores:
        for name, bursts in (("coh burst pair", [BURST_CASE]), ("coh IW2 swath pair", swath_bursts)):
            spec = {"case": name, "bursts": bursts, "root": str(base), "cores": n}
            rows.append(run_case(spec, n))
    swath = [r for r in rows if r["case"] == "coh IW2 swath pair"]
    for r in swath:
        # 3 swaths x 9 bursts at IW2's time per burst; "idle" = CPU time / cores, the wall time on
        # an otherwise idle machine if the threads scale (the development machine is shared)
        scale_up = 3 * 9 / len(swath_bursts)
        three, idle = scale_up * r["wall_s"], scale_up * r["cpu_s"] / r["cores"]
        rows.append({
            "case": "coh three-swath pair (extrapolated: 3 x 9 bursts x IW2's time per burst)",
            "cores": r["cores"],
            "target": f"<= {TARGET_S / 60:.0f} min on 2 cores, peak RSS <= {TARGET_RSS_MB / 1024:.0f} GB",
            "figure": f"{three / 60:.1f} min wall as measured, {idle / 60:.1f} min from CPU time / cores; "
                      f"peak RSS {r['rss_mb'] / 1024:.2f} GB (one swath's)",
            "verdict": "met" if (min(three, idle) <= TARGET_S and r["rss_mb"] <= TARGET_RSS_MB) else "not met",
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--cores", default="1,2")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the swath's 9 bursts (quick runs)")
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(json.loads(args.case))))
        return
    rows = run([int(c) for c in args.cores.split(",")], args.scale, args.root)
    print(f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}")
    for r in rows:
        if "target" in r:
            print(f"| {r['case']} | {r['cores']} | {r['figure']} | target {r['target']} | {r['verdict']} |")
        else:
            print(
                f"| {r['case']} | {r['cores']} core(s) | {r['pixels']:,} px ({r['valid']:.0%} valid) | "
                f"{r['wall_s']:.1f} s wall | {r['cpu_s']:.1f} s CPU | {r['rss_mb']:,.0f} MB peak RSS | {r['note']} |"
            )


if __name__ == "__main__":
    main()
