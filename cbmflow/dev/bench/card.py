"""``make bench-card``: a full-size Sentinel-1 GRD → CARD-BS, side by side with sarsen (a benchmark, not a test).

Input: the real annotation, calibration and noise of ``../shared/data/sentinel1``'s GRD (S1B IW
GRDH, 16 705 × 26 102) with synthetic DN, as VV and as VH (the VH XML is the VV XML renamed: same
geometry and LUTs, its own DN), written once as uncompressed GeoTIFFs like the real measurements.
DN = √(σ0·A² · speckle + η): a smooth σ0 field (VV −10 dB, VH −17 dB ± 3 dB), 4-look gamma speckle, the
product's noise floor, so that some pixels fall under it, as on calm water and in radar shadow.

DEM: the Rome 30 m DEM (EGM96, 360 × 360) covers only ~10 × 10 km of the ~250 × 170 km scene, so
the benchmark DEM is that DEM **mirror-tiled** over the scene's footprint at its own 1″ spacing
(real relief statistics at GLO-30 resolution, EGM96 → ellipsoid through proj-data's grid);
``--dem flat`` uses the ellipsoid instead (output then named GTC).

Cases, each in a fresh process limited to N cores (CPU affinity; ``NUMBA_NUM_THREADS`` and
``GDAL_NUM_THREADS`` = N, the BLAS pools ``OMP_NUM_THREADS`` … = 1, dask sizing its pool from the
affinity), so that its wall time, CPU time and peak RSS (``VmHWM``) are its own:

* ``card.s1grd RTC, full scene``: ``generate_bs`` γ0-RTC, VV + VH, COGs (+ mask, LIA) on one 10 m
  UTM 33N grid over the footprint's bounding box (``--scale`` keeps a centred fraction of its area,
  all of it inside the footprint: its time per pixel is the full scene's upper bound). card.s1grd
  runs ``--workers`` block threads (default one per core) with ``GDAL_NUM_THREADS=1``; the table
  notes how many blocks it skipped as off the image.
* on a ``--crop-px`` square crop in the middle of the scene, VV only, the DEM warped once onto the
  crop grid as ellipsoidal heights (sarsen's output grid is its DEM grid): card.s1grd β0 GTC and γ0
  RTC, and sarsen 0.9.6 ``terrain_correction`` GTC (bilinear) and RTC (``gamma_bilinear``), so the
  comparison is per output pixel on the same input and grid.

Targets (issue 12): ≥ 5× faster than sarsen per output pixel, the full GRD in ≤ 5 min on 2 cores,
peak RSS ≤ 4 GB. Nothing asserts them; the table prints each beside its figure.

Coherence: if ``cbmflow.dev.bench.coh`` exists, its ``run(cores=[...], scale=..., root=Path)`` is
called after the CARD-BS cases and the rows it returns (dicts with the keys of :class:`Row`, and
optionally ``target``/``figure``/``verdict`` for target lines) are printed in the same table.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from affine import Affine

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared" / "data" / "sentinel1"
GRD = SHARED / "S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE"
ROME_DEM = SHARED / "Rome-30m-DEM.tif"
CRS = "EPSG:32633"
RES_M = 10.0
BEGIN, END = "<!-- bench-card:begin -->", "<!-- bench-card:end -->"
SIGMA0_DB = {"VV": -10.0, "VH": -17.0}
CASES = ("ours-full", "ours-gtc", "ours-rtc", "sarsen-gtc", "sarsen-rtc")


def _state_dir() -> Path:
    return Path(os.environ.get("CBMFLOW_STATE_DIR", ".cbmflow"))


# --- inputs -------------------------------------------------------------------------------------


def prepare_safe(root: Path) -> Path:
    """The full-size VV + VH SAFE (generated once; ~1.7 GB of uncompressed DN)."""
    from card.s1grd.calibration import interpolate_vectors
    from card.s1grd.safe import open_grd

    if not GRD.is_dir():
        raise SystemExit(f"shared test data missing: {GRD.parent}")
    safe = root / GRD.name
    done = safe / ".complete"
    if done.exists():
        return safe
    if safe.exists():
        shutil.rmtree(safe)
    for f in GRD.rglob("*"):
        if f.is_file() and f.suffix in (".xml", ".safe"):
            dst = safe / f.relative_to(GRD)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
            if "-vv-" in f.name and "rfi" not in f.parts:
                vh = dst.with_name(f.name.replace("-vv-", "-vh-"))
                vh.write_text(
                    dst.read_text().replace("<polarisation>VV</polarisation>", "<polarisation>VH</polarisation>")
                )
    pol = open_grd(GRD).polarisations["VV"]
    lines, samples = pol.annotation.n_lines, pol.annotation.n_samples
    # one A² and η per 64 × 64 cell is plenty for synthetic DN
    cl, cp = np.arange(0, lines, 64), np.arange(0, samples, 64)
    a2 = interpolate_vectors(pol.calibration.sigma, cl, cp) ** 2
    eta = interpolate_vectors(pol.noise.range, cl, cp)
    rng = np.random.default_rng(2026)
    field = rng.normal(0.0, 1.0, (lines // 512 + 2, samples // 512 + 2))
    measurement = Path(pol.measurement)
    for name, db in SIGMA0_DB.items():
        out = safe / "measurement" / measurement.name.replace("-vv-", f"-{name.lower()}-")
        out.parent.mkdir(parents=True, exist_ok=True)
        profile = {"driver": "GTiff", "width": samples, "height": lines, "count": 1, "dtype": "uint16"}
        with warnings.catch_warnings(), rasterio.open(out, "w", **profile) as dst:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            for r0 in range(0, lines, 512):
                r1 = min(r0 + 512, lines)
                rows = np.arange(r0, r1)
                coarse = field[rows // 512][:, np.arange(samples) // 512]
                sigma0 = 10 ** ((db + 3.0 * np.tanh(coarse)) / 10)
                cell = (rows // 64)[:, None], (np.arange(samples) // 64)[None, :]
                power = sigma0 * a2[cell] * rng.gamma(4.0, 0.25, (r1 - r0, samples)) + eta[cell]
                dst.write(np.sqrt(power).clip(1, 65534).astype(np.uint16), 1, window=((r0, r1), (0, samples)))
    done.touch()
    return safe


def footprint_lonlat() -> tuple[float, float, float, float]:
    from card.s1grd.safe import open_grd

    g = open_grd(GRD).polarisations["VV"].annotation.grid
    return float(g.lon.min()), float(g.lat.min()), float(g.lon.max()), float(g.lat.max())


def prepare_dem(root: Path) -> Path:
    """The Rome 30 m DEM mirror-tiled over the footprint (+0.05°), EGM96 heights, 1″ spacing."""
    path = root / "dem_rome_mirrored_egm96.tif"
    if path.exists():
        return path
    west, south, east, north = footprint_lonlat()
    with rasterio.open(ROME_DEM) as src:
        tile = src.read(1).astype(np.float32)
        step = src.transform.a
    tile = np.where(tile < -1000, 0.0, tile).astype(np.float32)
    west, south, east, north = west - 0.05, south - 0.05, east + 0.05, north + 0.05
    width, height = int(np.ceil((east - west) / step)), int(np.ceil((north - south) / step))
    period = np.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])  # mirrored: no seams
    tmp = path.with_suffix(".tmp.tif")
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "float32"}
    tiling = {"tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "predictor": 3}
    transform = Affine(step, 0, west, 0, -step, north)
    with rasterio.open(tmp, "w", crs="EPSG:4326", transform=transform, **profile, **tiling) as dst:
        for r0 in range(0, height, 512):
            r1 = min(r0 + 512, height)
            rows = np.arange(r0, r1) % period.shape[0]
            cols = np.arange(width) % period.shape[1]
            dst.write(period[np.ix_(rows, cols)], 1, window=((r0, r1), (0, width)))
    tmp.rename(path)
    return path


def scene_grid(scale: float) -> tuple[tuple[int, int], tuple[float, float]]:
    """(height, width), (left, top) of the 10 m UTM 33N grid over the footprint (a centred fraction)."""
    from pyproj import Transformer

    from card.s1grd.safe import open_grd

    g = open_grd(GRD).polarisations["VV"].annotation.grid
    x, y = Transformer.from_crs("EPSG:4326", CRS, always_xy=True).transform(g.lon, g.lat)
    left, right = np.floor(x.min() / RES_M) * RES_M, np.ceil(x.max() / RES_M) * RES_M
    bottom, top = np.floor(y.min() / RES_M) * RES_M, np.ceil(y.max() / RES_M) * RES_M
    width, height = int((right - left) / RES_M), int((top - bottom) / RES_M)
    f = float(np.sqrt(scale))
    w, h = max(int(width * f), 64), max(int(height * f), 64)
    left += (width - w) // 2 * RES_M
    top -= (height - h) // 2 * RES_M
    return (h, w), (float(left), float(top))


def prepare_crop(root: Path, dem: Path, crop_px: int) -> tuple[Path, tuple[float, float]]:
    """The DEM on the crop grid in ellipsoidal heights (sarsen's output grid is its DEM's)."""
    from card.geobox import GeoBox
    from card.s1grd.dem import FileDem

    (h, w), (left, top) = scene_grid(1.0)
    cx, cy = left + w * RES_M / 2, top - h * RES_M / 2
    c_left, c_top = round((cx - crop_px * RES_M / 2) / RES_M) * RES_M, round((cy + crop_px * RES_M / 2) / RES_M) * RES_M
    path = root / f"crop_{crop_px}_{c_left:.0f}_{c_top:.0f}_ellipsoidal.tif"
    if not path.exists():
        grid = GeoBox((crop_px, crop_px), Affine(RES_M, 0, c_left, 0, -RES_M, c_top), CRS)
        heights = FileDem(dem, "egm96").heights(grid)
        profile = {"driver": "GTiff", "width": crop_px, "height": crop_px, "count": 1, "dtype": "float32"}
        with rasterio.open(path, "w", crs=CRS, transform=grid.transform, **profile) as dst:
            dst.write(heights.astype(np.float32), 1)
    return path, (c_left, c_top)


# --- cases (each in its own process) ------------------------------------------------------------


def _generate(
    safe: str, shape: tuple[int, int], origin: tuple[float, float], dem: Any, out: str, workers: int, **kw: Any
) -> dict[str, Any]:
    from card.geobox import GeoBox
    from card.s1grd.bs import generate_bs

    grid = GeoBox(shape, Affine(RES_M, 0, origin[0], 0, -RES_M, origin[1]), CRS)
    params = inspect.signature(generate_bs).parameters
    if "workers" in params:  # block threads: one per core of the case unless --workers says otherwise
        kw["workers"] = workers or len(os.sched_getaffinity(0))
    result = generate_bs(safe, grid, dem, out, **kw)
    return {
        "pixels": int(result.pixels),
        "workers": kw.get("workers", 1),
        "blocks": getattr(result, "blocks", 0),
        "blocks_skipped": getattr(result, "blocks_skipped", 0),
    }


def case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process; returns the output pixel count and extra figures."""
    name, out = spec["case"], Path(spec["out"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if name.startswith("ours"):
        from card.s1grd.dem import FileDem, FlatDem

        dem: Any = FlatDem() if spec["dem"] == "flat" else FileDem(Path(spec["dem"]), spec.get("geoid"))
        pols = tuple(spec["pols"])
        got = _generate(spec["safe"], tuple(spec["shape"]), tuple(spec["origin"]), dem, str(out),
                        int(spec.get("workers", 0)), quantity=spec["quantity"], polarisations=pols)  # fmt: skip
        return {**got, "valid": _valid_fraction(out)}
    from sarsen import apps, sentinel1

    product = sentinel1.Sentinel1SarProduct(spec["safe"], measurement_group="IW/VV")
    radiometry = "gamma_bilinear" if name == "sarsen-rtc" else None
    apps.terrain_correction(
        product, spec["dem"], output_urlpath=str(out / "sarsen.tif"), correct_radiometry=radiometry,
        interp_method="linear", chunks=2048,
    )  # fmt: skip
    with rasterio.open(out / "sarsen.tif") as src:
        data = src.read(1, out_shape=(src.height // 8, src.width // 8))
        return {"pixels": src.width * src.height, "valid": float(np.isfinite(data).mean())}


def _valid_fraction(out: Path) -> float:
    """Share of the grid with data, from the first backscatter COG's overview (cheap)."""
    tif = sorted(p for p in out.glob("*.tif") if not p.name.endswith(("_MASK.tif", "_LIA.tif")))[0]
    with rasterio.open(tif) as src:
        data = src.read(1, out_shape=(max(src.height // 32, 1), max(src.width // 32, 1)))
    return float(np.isfinite(data).mean())


def _vm_hwm_mb() -> float:
    """This process's peak resident set (``VmHWM``: reset at exec, unlike ``ru_maxrss``, which a
    child inherits from the benchmark's own forked memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Row:
    case: str
    cores: int
    pixels: int
    wall_s: float
    """The case's work (reading, processing, writing), without interpreter start and imports."""
    cpu_s: float
    """CPU time of that work, all threads."""
    process_s: float
    """The whole process, start to exit."""
    rss_mb: float
    valid: float = 1.0
    note: str = ""
    load: str = ""
    """1-minute load average at the case's start and end (the machine is shared)."""

    @property
    def us_per_px(self) -> float:
        return self.wall_s / self.pixels * 1e6

    @property
    def cpu_us_per_px(self) -> float:
        return self.cpu_s / self.pixels * 1e6


def run_case(spec: dict[str, Any], cores: int) -> Row:
    """``spec`` in a fresh Python limited to ``cores`` CPUs (``taskset``, thread-count variables)."""
    allowed = sorted(os.sched_getaffinity(0))
    cpus = ",".join(str(c) for c in allowed[:cores])
    env = dict(os.environ)
    # The engines' own pools get the cores (numba, GDAL; dask sizes its pool from the affinity); the
    # BLAS pools stay at one thread: dask already runs numpy in N threads, and N × N spinning BLAS
    # threads on N cores made sarsen's RTC 17× slower on 2 cores than on 1 in the first run.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    for var in ("NUMBA_NUM_THREADS", "GDAL_NUM_THREADS"):
        env[var] = str(cores)
    if spec["case"].startswith("ours"):
        # card.s1grd spends its cores on block threads; GDAL's own threads inside each block's small
        # warps and reads only added CPU (+12 % at 2 cores, measured)
        env["GDAL_NUM_THREADS"] = "1"
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "cbmflow.dev.bench.card", "--case", json.dumps(spec)]
    load0 = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    process_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec['case']} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    note = spec.get("note", "")
    if "blocks" in result:
        skipped = f", {result['blocks_skipped']}/{result['blocks']} blocks off the image" if result["blocks"] else ""
        note = f"{note}{', ' if note else ''}{result['workers']} thread(s){skipped}"
    return Row(spec["case"], cores, int(result["pixels"]), float(result["work_s"]), float(result["work_cpu_s"]),
               process_s, float(result["rss_mb"]), float(result["valid"]), note,
               f"{load0:.1f}–{os.getloadavg()[0]:.1f}")  # fmt: skip


# --- report -------------------------------------------------------------------------------------


def _targets(rows: list[Row], scale: float) -> list[tuple[str, str, str, bool | None]]:
    """(what, figure, target, met) lines."""
    out: list[tuple[str, str, str, bool | None]] = []
    by = {(r.case, r.cores): r for r in rows}
    for cores in sorted({r.cores for r in rows}):
        for kind in ("gtc", "rtc"):
            ours, theirs = by.get((f"ours-{kind}", cores)), by.get((f"sarsen-{kind}", cores))
            if ours and theirs:
                ratio = theirs.us_per_px / ours.us_per_px
                cpu_ratio = theirs.cpu_us_per_px / ours.cpu_us_per_px
                out.append((f"sarsen / card.s1grd {kind.upper()}, wall per output pixel, {cores} core(s)",
                            f"{ratio:.1f}× (CPU time: {cpu_ratio:.1f}×)", "≥ 5×", ratio >= 5))  # fmt: skip
        full = by.get(("ours-full", cores))
        if full:
            wall, cpu = full.wall_s / scale, full.cpu_s / scale
            est = "" if scale == 1 else f", ×1/{scale:g} extrapolated"
            # on the shared development machine wall time is mostly waiting for a CPU: the CPU time is
            # what an idle machine would need (per core, if the work spread over the cores)
            figure = f"{wall:.0f} s wall, {cpu:.0f} s CPU ({cpu / cores:.0f} s per core){est}"
            out.append((f"full GRD → RTC COGs, VV+VH, {cores} core(s)", figure, "≤ 300 s on 2 cores",
                        wall <= 300 if cores == 2 else None))  # fmt: skip
    ours_rss = [r.rss_mb for r in rows if r.case.startswith("ours")]
    if ours_rss:
        out.append(("peak RSS, card.s1grd (any case)", f"{max(ours_rss):.0f} MB", "≤ 4096 MB", max(ours_rss) <= 4096))
    return out


def render(rows: list[Row], targets: list[tuple[str, str, str, bool | None]], header: list[str]) -> str:
    lines = [
        *header,
        "",
        "| case | cores | load | output px | with data | wall s | CPU s | process s | peak RSS | µs/px wall"
        " | µs/px CPU |",
    ]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lines.append(f"| {r.case}{' (' + r.note + ')' if r.note else ''} | {r.cores} | {r.load or '—'} | "
                     f"{r.pixels:,} | {r.valid:.0%} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.process_s:.1f} | "
                     f"{r.rss_mb:,.0f} MB | {r.us_per_px:.2f} | {r.cpu_us_per_px:.2f} |")  # fmt: skip
    lines += ["", "| target | figure | target | met |", "|---|---:|---|---|"]
    for what, figure, target, met in targets:
        lines.append(f"| {what} | {figure} | {target} | {'—' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines)


def _coherence_rows(cores: list[int], scale: float, root: Path) -> list[dict[str, Any]]:
    if importlib.util.find_spec("cbmflow.dev.bench.coh") is None:
        return []
    coh = importlib.import_module("cbmflow.dev.bench.coh")
    rows: list[dict[str, Any]] = coh.run(cores=cores, scale=scale, root=root)
    return rows


def _write_docs(text: str) -> None:
    path = REPO / "docs" / "performance.md"
    doc = path.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} … {END} block in the 'CARD generation' section")
    path.write_text(doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the scene's grid area (quick runs)")
    ap.add_argument("--cores", default="1,2", help="comma-separated core counts, one process per case")
    ap.add_argument("--crop-px", type=int, default=1024, help="side of the sarsen comparison crop (pixels)")
    ap.add_argument("--dem", choices=("tiled", "flat"), default="tiled", help="mirror-tiled Rome 30 m DEM, or flat")
    ap.add_argument("--no-sarsen", action="store_true", help="skip the sarsen cases")
    ap.add_argument(
        "--workers", type=int, default=0, help="card.s1grd block threads per case (default 0: one per core of the case)"
    )
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--no-coh", action="store_true", help="skip cbmflow.dev.bench.coh even if it exists")
    ap.add_argument("--root", type=Path, default=_state_dir() / "bench" / "card")
    ap.add_argument("--json", action="store_true", help="print the rows and targets as JSON")
    ap.add_argument("--docs", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args()
    if args.case:
        import resource

        started, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        result = case(json.loads(args.case))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        print(
            json.dumps({**result, "work_s": time.perf_counter() - started, "work_cpu_s": cpu, "rss_mb": _vm_hwm_mb()})
        )
        return

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=args.json)
    cores = [int(c) for c in args.cores.split(",")]
    if max(cores) > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--cores {args.cores}: only {len(os.sched_getaffinity(0))} CPUs available")
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.time()
    with console.status("inputs (generated once under " + str(root) + ") ..."):
        safe = prepare_safe(root)
        dem = prepare_dem(root)
        crop_dem, crop_origin = prepare_crop(root, dem, args.crop_px)
    shape, origin = scene_grid(args.scale)
    full: dict[str, Any] = {"case": "ours-full", "safe": str(safe), "shape": shape, "origin": origin,
                            "quantity": "gamma0-rtc", "pols": ["VV", "VH"], "workers": args.workers}  # fmt: skip
    full |= {"dem": "flat"} if args.dem == "flat" else {"dem": str(dem), "geoid": "egm96"}
    crop = {"safe": str(safe), "shape": [args.crop_px] * 2, "origin": crop_origin, "dem": str(crop_dem), "pols": ["VV"],
            "workers": args.workers}  # fmt: skip
    specs: list[dict[str, Any]] = [
        full,
        {**crop, "case": "ours-gtc", "quantity": "beta0", "note": "β0, VV"},
        {**crop, "case": "ours-rtc", "quantity": "gamma0-rtc", "note": "γ0 RTC, VV"},
    ]
    if not args.no_sarsen:
        specs += [
            {**crop, "case": "sarsen-gtc", "note": "β0, VV"},
            {**crop, "case": "sarsen-rtc", "note": "γ0 RTC, VV"},
        ]
    if args.cases:
        wanted = set(args.cases.split(","))
        if wanted - set(CASES):
            raise SystemExit(f"--cases: unknown {sorted(wanted - set(CASES))}; known: {', '.join(CASES)}")
        specs = [spec for spec in specs if spec["case"] in wanted]
    rows: list[Row] = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        for n in cores:
            for spec in specs:
                task = bar.add_task(f"{spec['case']} on {n} core(s)", total=None)
                row = run_case({**spec, "out": str(root / "out" / f"{spec['case']}-{n}")}, n)
                rows.append(row)
                bar.update(task, total=1, completed=1)
                bar.console.log(f"{row.case} {n} core(s): {row.pixels:,} px, {row.wall_s:.1f} s wall "
                                f"({row.process_s:.1f} s process), {row.cpu_s:.1f} s CPU, {row.rss_mb:,.0f} MB peak "
                                f"RSS, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    coh = [] if args.no_coh else _coherence_rows(cores, args.scale, root)
    load1 = os.getloadavg()
    dem_label = "flat ellipsoid" if args.dem == "flat" else "Rome 30 m mirror-tiled, EGM96"
    header = [
        f"{len(os.sched_getaffinity(0))} CPUs; load average {load0[0]:.1f} before, {load1[0]:.1f} after; "
        f"whole run {time.time() - t0:.0f} s.",
        f"Scene grid {shape[1]:,} × {shape[0]:,} px at 10 m (EPSG:32633, scale {args.scale:g}); crop "
        f"{args.crop_px} × {args.crop_px}; DEM: {dem_label}.",
    ]
    targets = _targets(rows, args.scale)
    for r in coh:  # coherence rows (Row's keys) and target lines (case, cores, figure, target, verdict)
        if "target" in r:
            met = None if r.get("verdict") is None else r["verdict"] == "met"
            targets.append((f"{r['case']}, {r['cores']} core(s)", str(r["figure"]), str(r["target"]), met))
        else:
            rows.append(Row(**{k: r[k] for k in Row.__dataclass_fields__ if k in r}))
    if args.json:
        print(json.dumps({"header": header, "rows": [asdict(r) for r in rows],
                          "targets": [dict(zip(("what", "figure", "target", "met"), t, strict=True)) for t in targets]},
                         indent=2))  # fmt: skip
    text = render(rows, targets, header)
    print(text, file=sys.stderr if args.json else sys.stdout)  # plain: a Markdown table, not wrapped
    if args.docs:
        _write_docs(text)


if __name__ == "__main__":
    main()
