"""Two IW SLCs of one relative orbit → n-day coherence on a map grid, block by block (CARD-COH).

Geocode-then-interfere. For each output block (default 512 × 512 plus a halo of half the
coherence window) and each date:

1. DEM heights → ECEF → zero-Doppler time t and slant range R by the CARD-BS Newton solve
   (:class:`card.s1grd.geocode.Geocoder`, the orbit's cubic Hermite interpolant). One solve per
   date; the swaths of a product share its orbit, so each swath only shifts t to its own time axis.
2. **Which burst, which swath.** Every output pixel takes its value from exactly one burst of one
   swath, chosen on the *early* date's geometry and used for both dates (burst matched by ESA burst
   id, else by time since the ascending node): in azimuth the boundary between consecutive
   bursts is the middle of their valid overlap (the mid-overlap rule, as ESA's TOPS merge and
   SNAP's TOPSAR-Deburst), in range the swath whose valid samples reach farthest beyond the pixel
   on its nearer side. Same burst on both dates → the TOPS carriers of the pair nearly cancel in
   the interferogram, and nothing is counted twice. A pixel whose 8 × 8 interpolation taps
   would leave the burst's valid rectangle on either date is no data.
3. The burst's radar window under the block is read, **deramped** (× exp(−jφ), ESA TN terms, see
   :mod:`card.s1slc.tops`), interpolated at each pixel's fractional (line, sample) with an 8 × 8
   Kaiser-windowed sinc (:mod:`card.s1slc.interp`), **reramped** (× exp(+jφ) at that position) and
   multiplied by exp(+j4πR/λ): the geometric (flat-earth and topographic) phase of that date.
4. γ = |Σ s1·s2*| / √(Σ|s1|²·Σ|s2|²) over a k × k boxcar of output pixels (default k = 7 at 10 m:
   70 m × 70 m, the ground area of SNAP's 10 × 10 radar-sample window, ≈ 37 m × 139 m). A pixel is
   no data (NaN) unless all k² pixels of its window hold data on both dates.

Memory is bounded by a block (+ halo) and the radar windows of its bursts, never the scene.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pyproj import Transformer

from card.geobox import GeoBox
from card.s1grd.bs import _Linear  # node-to-pixel interpolation without BLAS, as the geocoder's
from card.s1grd.cog import ScratchRaster
from card.s1grd.dem import Dem
from card.s1grd.geocode import SPEED_OF_LIGHT, Geocoder, ecef
from card.s1grd.orbit import OrbitInterpolator
from card.s1slc.interp import TAPS, interpolate
from card.s1slc.safe import Burst, BurstReader, SlcProduct, SlcSwath, rasterio_burst_reader
from card.s1slc.tops import BurstCarrier

FloatArray = npt.NDArray[np.float64]
ComplexArray = npt.NDArray[np.complex128]

DEFAULT_WINDOW_PX = 7
EDGE_LINES = TAPS // 2
"""Interpolation taps reach this far either side of a point: it must stay inside valid data."""


class SlcGeocoder(Geocoder):
    """The CARD-BS zero-Doppler solve on an SLC swath's orbit (no GRD ground-range conversion).

    Reuses :meth:`Geocoder.zero_doppler` (coarse-seeded Newton); the GRD-only parts of the
    parent (srgr polynomials, bistatic line convention) are not set up and must not be called.
    """

    def __init__(self, swath: SlcSwath) -> None:  # noqa: D107 - deliberately not calling the GRD setup
        self.orbit = OrbitInterpolator(swath.orbit)
        self._t_mid = 0.5 * (swath.bursts[0].azimuth_time_s + swath.bursts[-1].azimuth_time_s)

    def time_and_range(self, points: FloatArray) -> tuple[FloatArray, FloatArray]:
        t = self.zero_doppler(points)
        s, _, _ = self.orbit.state(t)
        d = s - points
        return t, np.sqrt(np.einsum("...k,...k->...", d, d))


@dataclass
class SwathDate:
    """One swath of one date: its polarisations, readers, burst carriers and burst time spans."""

    swaths: dict[str, SlcSwath]
    readers: dict[str, BurstReader]
    time_shift_s: float
    """Added to the date's reference time axis to get this swath's (t0 differences)."""
    geom: SlcSwath = field(init=False)
    carriers: list[BurstCarrier] = field(init=False)
    span: FloatArray = field(init=False)
    """(n_bursts, 2): the azimuth time interval each burst owns (mid-overlap rule), this swath's axis."""

    def __post_init__(self) -> None:
        self.geom = next(iter(self.swaths.values()))
        orbit = OrbitInterpolator(self.geom.orbit)
        self.carriers = [BurstCarrier.of(self.geom, b, orbit) for b in self.geom.bursts]
        dt = self.geom.azimuth_time_interval_s
        valid = []
        for b in self.geom.bursts:
            first, last = b.valid_lines
            valid.append((b.azimuth_time_s + (first + EDGE_LINES) * dt, b.azimuth_time_s + (last - EDGE_LINES) * dt))
        span = np.array(valid, dtype=np.float64)
        for j in range(len(span) - 1):
            if span[j + 1, 0] < span[j, 1]:  # overlap: cut it in the middle
                mid = 0.5 * (span[j + 1, 0] + span[j, 1])
                span[j, 1], span[j + 1, 0] = mid, mid
        self.span = span

    def line_sample(self, burst: Burst, t: FloatArray, r: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Fractional line (relative to the burst's first line) and range sample of points (t on this swath's axis)."""
        g = self.geom
        line = (t - burst.azimuth_time_s) / g.azimuth_time_interval_s
        sample = (2.0 * r / SPEED_OF_LIGHT - g.slant_range_time_s) * g.range_sampling_rate_hz
        return line, sample

    def inside(self, burst: Burst, line: FloatArray, sample: FloatArray) -> npt.NDArray[np.bool_]:
        """All interpolation taps inside the burst's valid rectangle."""
        l0, l1 = burst.valid_lines
        s0, s1 = burst.valid_samples
        h = EDGE_LINES
        return (line >= l0 + h - 1) & (line < l1 - h) & (sample >= s0 + h - 1) & (sample < s1 - h)


def match_bursts(early: SlcSwath, late: SlcSwath) -> dict[int, int]:
    """Position in the early burst list → position in the late one, for the same ground footprint."""
    out: dict[int, int] = {}
    ids = {b.burst_id: k for k, b in enumerate(late.bursts) if b.burst_id is not None}
    cycle = float(np.median(np.diff([b.azimuth_anx_time_s for b in early.bursts]))) if len(early.bursts) > 1 else 2.75
    for j, b in enumerate(early.bursts):
        if b.burst_id is not None and ids:
            if b.burst_id in ids:
                out[j] = ids[b.burst_id]
            continue
        d = np.array([abs(lb.azimuth_anx_time_s - b.azimuth_anx_time_s) for lb in late.bursts])
        k = int(np.argmin(d))
        if d[k] < 0.5 * cycle:
            out[j] = k
    return out


def _lagrange(levels: list[float], h: FloatArray) -> list[FloatArray]:
    """Lagrange basis weights of each level at heights ``h`` (1, 2 or 3 levels)."""
    out = []
    for i, li in enumerate(levels):
        w = np.ones_like(h)
        for j, lj in enumerate(levels):
            if j != i:
                w = w * (h - lj) / (li - lj)
        out.append(w)
    return out


def boxcar(values: npt.NDArray[Any], k: int) -> npt.NDArray[Any]:
    """Sum over k × k windows (valid part only: shape shrinks by k − 1), by integral images."""
    c = np.cumsum(np.cumsum(values, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    out: npt.NDArray[Any] = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return out


def coherence(s1: ComplexArray, s2: ComplexArray, k: int) -> FloatArray:
    """|Σ s1·s2*| / √(Σ|s1|²·Σ|s2|²) over k × k windows; NaN unless the whole window holds data.

    The result is (k − 1) smaller than the inputs in each axis (a valid-only filter).
    """
    ok = np.isfinite(s1) & np.isfinite(s2)
    a = np.where(ok, s1, 0)
    b = np.where(ok, s2, 0)
    num = boxcar(a * np.conj(b), k)
    p1 = boxcar((a.real**2 + a.imag**2), k)
    p2 = boxcar((b.real**2 + b.imag**2), k)
    n = boxcar(ok.astype(np.int64), k)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.abs(num) / np.sqrt(p1 * p2)
    out: FloatArray = np.where((n == k * k) & (p1 > 0) & (p2 > 0), np.minimum(g, 1.0), np.nan)
    return out


@dataclass
class BlockResult:
    rows: slice
    cols: slice
    coherence: dict[str, FloatArray]
    source: npt.NDArray[np.int32]
    """Per pixel of the block + halo: 1000·swath number + burst index of the early date, −1 none."""
    geocoded: dict[str, tuple[ComplexArray, ComplexArray]] = field(default_factory=dict)
    """With ``keep_geocoded``: the block + halo's two flattened, geocoded SLCs per polarisation."""


@dataclass
class CohProcessor:
    """Processes an early/late pair (every common swath and polarisation) onto ``grid``."""

    early: SlcProduct
    late: SlcProduct
    grid: GeoBox
    dem: Dem
    window_px: int = DEFAULT_WINDOW_PX
    block_px: int = 512
    deramp: bool = True
    """False only to show what skipping the TOPS deramp/reramp does (tests): never in products."""
    readers: dict[tuple[str, str, str], BurstReader] = field(default_factory=dict)
    """(date 'early'|'late', swath, pol) → reader; default: the measurement file via rasterio."""
    keep_geocoded: bool = False
    geometry_stride_px: int = 8
    """Newton solves on every n-th pixel, interpolated in between (1: every pixel; see ``_geometry``)."""

    def __post_init__(self) -> None:
        if self.window_px < 1 or self.window_px % 2 == 0:
            raise ValueError(f"the coherence window must be an odd number of pixels, got {self.window_px}")
        keys = sorted(set(self.early.swaths) & set(self.late.swaths))
        if not keys:
            raise ValueError("the two products share no (swath, polarisation)")
        self.swath_names = sorted({s for s, _ in keys})
        self.polarisations = sorted({p for _, p in keys}, key=lambda p: ("VV", "HH", "VH", "HV").index(p))
        self.dates: dict[str, list[SwathDate]] = {}
        self.geocoders: dict[str, SlcGeocoder] = {}
        self.wavelength: dict[str, float] = {}
        for name, product in (("early", self.early), ("late", self.late)):
            ref = product.swaths[keys[0]]
            self.geocoders[name] = SlcGeocoder(ref)
            self.wavelength[name] = ref.wavelength_m
            dates = []
            for sw in self.swath_names:
                pols = {p: product.swaths[(sw, p)] for p in self.polarisations if (sw, p) in product.swaths}
                readers = {}
                for p, s in pols.items():
                    reader = self.readers.get((name, sw, p))
                    if reader is None:
                        if s.measurement is None:
                            raise ValueError(f"{product.product_name} {sw} {p}: no measurement file")
                        reader = rasterio_burst_reader(s.measurement)
                    readers[p] = reader
                shift = float((ref.t0 - next(iter(pols.values())).t0) / np.timedelta64(1, "ns")) * 1e-9
                dates.append(SwathDate(pols, readers, shift))
            self.dates[name] = dates
        self.matches = [
            match_bursts(e.geom, lt.geom) for e, lt in zip(self.dates["early"], self.dates["late"], strict=True)
        ]
        crs = self.grid.crs if isinstance(self.grid.crs, str) else f"EPSG:{self.grid.crs}"
        self._to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)

    def blocks(self) -> Iterator[tuple[slice, slice]]:
        ny, nx = self.grid.shape
        for r0 in range(0, ny, self.block_px):
            for c0 in range(0, nx, self.block_px):
                yield slice(r0, min(r0 + self.block_px, ny)), slice(c0, min(c0 + self.block_px, nx))

    def _geometry(self, box: GeoBox) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Zero-Doppler time and slant range of every pixel of ``box`` for both dates: t_e, R_e, t_l, R_l.

        ``geometry_stride_px`` = 1: the Newton solve at every pixel. Otherwise at every
        stride-th pixel (and the last row/column) at up to three heights spanning the box's DEM
        range, then bilinear in map position and quadratic (Lagrange) in each pixel's own height:
        t and R are smooth in (x, y, h), so with 8 px (80 m) the error is < 1 mm in R and < 0.1 µs
        in t (tests/unit/test_card_coh.py), ~60× fewer orbit evaluations and map projections.
        """
        heights = self.dem.heights(box)
        stride = self.geometry_stride_px
        ny, nx = box.shape
        if stride <= 1:
            xx, yy = np.meshgrid(box.x_centres(), box.y_centres())
            lon, lat = self._to_lonlat.transform(xx, yy)
            points = ecef(lon, lat, heights)
            t_e, r_e = self.geocoders["early"].time_and_range(points)
            t_l, r_l = self.geocoders["late"].time_and_range(points)
            return t_e, r_e, t_l, r_l
        ok = np.isfinite(heights)
        nan = np.full(box.shape, np.nan)
        if not ok.any():
            return nan, nan.copy(), nan.copy(), nan.copy()
        h_lo, h_hi = float(heights[ok].min()), float(heights[ok].max())
        levels = [h_lo] if h_hi - h_lo < 0.5 else [h_lo, 0.5 * (h_lo + h_hi), h_hi]
        rows_c = np.unique(np.r_[np.arange(0, ny, stride), ny - 1])
        cols_c = np.unique(np.r_[np.arange(0, nx, stride), nx - 1])
        xx, yy = np.meshgrid(box.x_centres(cols_c), box.y_centres(rows_c))
        lon, lat = self._to_lonlat.transform(xx, yy)
        along_r, along_c = _Linear(ny, rows_c), _Linear(nx, cols_c)
        h = np.where(ok, heights, h_lo)
        basis = _lagrange(levels, h)
        out = []
        for date in ("early", "late"):
            t_fine = np.zeros(box.shape)
            r_fine = np.zeros(box.shape)
            for level, weight in zip(levels, basis, strict=True):
                t_c, r_c = self.geocoders[date].time_and_range(ecef(lon, lat, np.full(lon.shape, level)))
                t_fine += weight * along_c(along_r(t_c, 0), 1)
                r_fine += weight * along_c(along_r(r_c, 0), 1)
            out += [np.where(ok, t_fine, np.nan), np.where(ok, r_fine, np.nan)]
        return out[0], out[1], out[2], out[3]

    def _may_cover(self, box: GeoBox) -> bool:
        """Cheap test on the box's corners and centre: can any swath of the early date see it?"""
        ny, nx = box.shape
        rows = np.array([0, 0, ny - 1, ny - 1, ny // 2])
        cols = np.array([0, nx - 1, 0, nx - 1, nx // 2])
        xs, ys = box.xy(rows, cols)
        lon, lat = self._to_lonlat.transform(xs, ys)
        # on the ellipsoid: terrain moves a point by less than the margins below, and no DEM is read
        t, r = self.geocoders["early"].time_and_range(ecef(lon, lat, np.zeros(rows.shape)))
        lo_t = min(d.span[0, 0] - d.time_shift_s for d in self.dates["early"])
        hi_t = max(d.span[-1, 1] - d.time_shift_s for d in self.dates["early"])
        diag = math.hypot(box.width * box.transform.a, box.height * box.transform.e)
        v = 7000.0  # ground speed (m/s), generous: a margin of one box diagonal in time
        if t.max() < lo_t - diag / v or t.min() > hi_t + diag / v:
            return False
        g = self.dates["early"]
        tau = 2 * r / SPEED_OF_LIGHT
        near = min(d.geom.slant_range_time_s for d in g)
        far = max(d.geom.slant_range_time_s + d.geom.n_samples / d.geom.range_sampling_rate_hz for d in g)
        margin = 2 * diag / SPEED_OF_LIGHT
        return not (tau.max() < near - margin or tau.min() > far + margin)

    def process_block(self, rows: slice, cols: slice) -> BlockResult:
        k = self.window_px
        halo = k // 2
        h, w = rows.stop - rows.start, cols.stop - cols.start
        box = self.grid.shifted(rows=rows.start - halo, cols=cols.start - halo, shape=(h + 2 * halo, w + 2 * halo))
        shape = box.shape
        source = np.full(shape, -1, dtype=np.int32)
        out = {p: (np.full(shape, np.nan + 0j), np.full(shape, np.nan + 0j)) for p in self.polarisations}
        if not self._may_cover(box):
            return self._finish(rows, cols, out, source, halo)
        t_e, r_e, t_l, r_l = self._geometry(box)

        # Early date decides the swath and burst of every pixel.
        best_margin = np.full(shape, -np.inf)
        choice = np.full(shape, -1, dtype=np.int64)
        for si, d in enumerate(self.dates["early"]):
            t = t_e + d.time_shift_s
            jb = np.searchsorted(d.span[:, 0], t, side="right") - 1
            jj = np.clip(jb, 0, len(d.span) - 1)
            ok = (jb >= 0) & (t < d.span[jj, 1]) & np.isfinite(t)
            _, sample = d.line_sample(d.geom.bursts[0], t, r_e)
            s0 = np.array([b.valid_samples[0] for b in d.geom.bursts])[jj]
            s1 = np.array([b.valid_samples[1] for b in d.geom.bursts])[jj]
            margin = np.minimum(sample - s0, s1 - sample)
            better = ok & (margin > best_margin) & (margin >= EDGE_LINES)
            best_margin = np.where(better, margin, best_margin)
            choice = np.where(better, si * 1000 + jj, choice)

        for code in np.unique(choice[choice >= 0]):
            si, j = divmod(int(code), 1000)
            jl = self.matches[si].get(j)
            if jl is None:
                continue
            sel = choice == code
            de, dl = self.dates["early"][si], self.dates["late"][si]
            be, bl = de.geom.bursts[j], dl.geom.bursts[jl]
            le, se = de.line_sample(be, t_e[sel] + de.time_shift_s, r_e[sel])
            ll, sl = dl.line_sample(bl, t_l[sel] + dl.time_shift_s, r_l[sel])
            ok = de.inside(be, le, se) & dl.inside(bl, ll, sl)
            if not ok.any():
                continue
            idx = np.flatnonzero(sel.ravel())[ok]
            source.ravel()[idx] = code
            sides = (
                _Side(self, de, j, le[ok], se[ok], r_e.ravel()[idx], self.wavelength["early"]),
                _Side(self, dl, jl, ll[ok], sl[ok], r_l.ravel()[idx], self.wavelength["late"]),
            )
            for p in self.polarisations:
                if p not in de.swaths or p not in dl.swaths:
                    continue
                out[p][0].ravel()[idx] = sides[0].values(p)
                out[p][1].ravel()[idx] = sides[1].values(p)
        return self._finish(rows, cols, out, source, halo)

    def _finish(
        self,
        rows: slice,
        cols: slice,
        out: dict[str, tuple[ComplexArray, ComplexArray]],
        source: npt.NDArray[np.int32],
        halo: int,
    ) -> BlockResult:
        coh = {p: coherence(a, b, self.window_px) for p, (a, b) in out.items()}
        return BlockResult(rows, cols, coh, source, out if self.keep_geocoded else {})


class _Side:
    """One date's points in one burst: the radar window under them, its deramp factor and the
    per-point factor exp(j(φ + 4πR/λ)) (reramp and geometric phase), shared by the polarisations."""

    def __init__(
        self,
        proc: CohProcessor,
        d: SwathDate,
        j: int,
        line: FloatArray,
        sample: FloatArray,
        slant_range: FloatArray,
        wavelength: float,
    ) -> None:
        self.d, self.burst, self.line, self.sample = d, d.geom.bursts[j], line, sample
        half = EDGE_LINES
        self.r0 = max(int(math.floor(line.min())) - half, 0)
        self.r1 = min(int(math.floor(line.max())) + half + 1, self.burst.lines)
        self.c0 = max(int(math.floor(sample.min())) - half, 0)
        self.c1 = min(int(math.floor(sample.max())) + half + 1, d.geom.n_samples)
        phase = 4 * np.pi * slant_range / wavelength
        self.deramp: npt.NDArray[np.complex64] | None = None
        if proc.deramp:
            carrier = d.carriers[j]
            self.deramp = carrier.deramp_window(self.r0, self.r1, self.c0, self.c1)
            phase = phase + carrier.phase(line, sample)
        self.factor = np.exp(1j * phase)

    def values(self, pol: str) -> ComplexArray:
        """Read, deramp, interpolate, reramp and flatten: the geocoded value at each point."""
        b = self.burst
        data = self.d.readers[pol](b.first_line + self.r0, b.first_line + self.r1, self.c0, self.c1)
        if self.deramp is not None:
            data = data * self.deramp
        out: ComplexArray = interpolate(data, self.line - self.r0, self.sample - self.c0) * self.factor
        return out


@dataclass(frozen=True)
class CohOutputs:
    coherence: dict[str, str]
    gap_days: int
    pixels: int
    seconds: float


def gap_days(early: SlcProduct, late: SlcProduct) -> int:
    """Whole days between the acquisitions (the n of COHn): 6 or 12 on a repeat track."""
    dt = float((late.start_time - early.start_time) / np.timedelta64(1, "s"))
    return round(dt / 86400.0)


def _write(rasters: dict[str, ScratchRaster], res: BlockResult) -> None:
    for p, v in res.coherence.items():
        rasters[p].write(res.rows, res.cols, v.astype(np.float32))


def generate_coh(
    early_path: str | SlcProduct,
    late_path: str | SlcProduct,
    grid: GeoBox,
    dem: Dem,
    out_dir: str,
    *,
    window_px: int = DEFAULT_WINDOW_PX,
    polarisations: tuple[str, ...] | None = None,
    swaths: tuple[str, ...] | None = None,
    readers: dict[tuple[str, str, str], BurstReader] | None = None,
    block_px: int = 512,
    workers: int = 1,
    name: str | None = None,
    software: str = "card.s1slc",
) -> CohOutputs:
    """Write one float32 COG per polarisation: ``<early>_<late>_<grid>_<POL>_COH<n>.tif``.

    The two products (paths, or products already opened, e.g. cut to some bursts) may be given in
    either order (they are sorted by time). Files appear only
    when complete. ``workers`` > 1 processes blocks in threads (numpy and the numba kernel
    release the GIL for most of the work).
    """
    from card.s1grd.bs import grid_name
    from card.s1slc.safe import open_slc

    started = time.perf_counter()
    a = early_path if isinstance(early_path, SlcProduct) else open_slc(early_path, polarisations, swaths)
    b = late_path if isinstance(late_path, SlcProduct) else open_slc(late_path, polarisations, swaths)
    early, late = (a, b) if a.start_time <= b.start_time else (b, a)
    if readers and early is b:
        readers = {({"early": "late", "late": "early"}[k[0]], k[1], k[2]): v for k, v in readers.items()}
    proc = CohProcessor(early, late, grid, dem, window_px, block_px, readers=dict(readers or {}))
    n = gap_days(early, late)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gname = name or grid_name(grid)
    stem = f"{early.product_name}_{late.product_name}_{gname}"
    first_e = next(iter(early.swaths.values()))
    pixel_m = abs(grid.transform.a)
    common = {
        "PRODUCT_EARLY": early.product_name,
        "PRODUCT_LATE": late.product_name,
        "DATE_EARLY": str(early.start_time),
        "DATE_LATE": str(late.start_time),
        "GAP_DAYS": str(n),
        "IPF_VERSION_EARLY": early.ipf_version,
        "IPF_VERSION_LATE": late.ipf_version,
        "SWATHS": ",".join(proc.swath_names),
        "WINDOW": f"{window_px}x{window_px} pixels boxcar ({window_px * pixel_m:g} m x {window_px * pixel_m:g} m)",
        "ESTIMATOR": "|sum s1 s2*| / sqrt(sum|s1|^2 sum|s2|^2), geometric phase 4piR/lambda removed per date",
        "DEM": dem.label,
        "ORBIT": "annotation state vectors (Hermite), both dates",
        "DERAMP": "ESA TOPS deramp before interpolation, reramp after",
        "INTERPOLATION": "8x8 Kaiser-windowed sinc on deramped bursts",
        "BURST_OVERLAP": "one burst per pixel: mid-overlap rule on the early date, same burst id on both dates",
        "SOFTWARE": software,
        "GRID": gname,
        "MISSION": first_e.mission,
        "PASS": first_e.pass_direction,
        "KIND": f"COH{n}",
        "SCALE": "linear 0..1",
    }
    rasters = {
        p: ScratchRaster(out / f"{stem}_{p}_COH{n}.tif", grid, "float32", float("nan"), f"coh_{p}")
        for p in proc.polarisations
    }
    try:
        blocks = list(proc.blocks())
        if workers > 1:
            # at most 2 blocks per thread in flight: finished blocks wait for the writer in order
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending: deque[Future[BlockResult]] = deque()
                for rows, cols in blocks:
                    pending.append(pool.submit(proc.process_block, rows, cols))
                    if len(pending) >= 2 * workers:
                        _write(rasters, pending.popleft().result())
                while pending:
                    _write(rasters, pending.popleft().result())
        else:
            for rows, cols in blocks:
                _write(rasters, proc.process_block(rows, cols))
    except BaseException:
        for r in rasters.values():
            r.abort()
        raise
    paths = {p: str(r.finish({**common, "POLARISATION": p})) for p, r in rasters.items()}
    return CohOutputs(paths, n, grid.width * grid.height, time.perf_counter() - started)


def expected_coherence(gamma: float, looks: float) -> float:
    """E[γ̂] of the boxcar estimator over ``looks`` independent complex Gaussian samples of true γ.

    Touzi, Lopes, Bruniquel & Vachon (1999, IEEE TGRS 37(1)), eq. 11:
    E[γ̂] = Γ(N)Γ(3/2)/Γ(N+½) · ₃F₂(3/2, N, N; N+½, 1; γ²) · (1 − γ²)^N,
    summed in log space. At γ = 0 it is Γ(N)Γ(3/2)/Γ(N+½) ≈ √(π/4N): the floor below which a
    small window cannot see decorrelation. Real windows of correlated pixels act like fewer looks
    than pixels (the product documents its N; see docs/card-coh.md).
    """
    if not (0.0 <= gamma <= 1.0) or looks <= 0:
        raise ValueError(f"need 0 ≤ γ ≤ 1 and looks > 0, got {gamma}, {looks}")
    if gamma >= 1.0:
        return 1.0
    n = float(looks)
    lead = math.lgamma(n) + math.lgamma(1.5) - math.lgamma(n + 0.5)
    z2 = gamma * gamma
    k = np.arange(0, 200000, dtype=np.float64)
    # log term_k, from the ratio of consecutive terms (k = 0 … K−1)
    ratio = np.log((1.5 + k) * (n + k) ** 2 / ((n + 0.5 + k) * (1.0 + k) ** 2)) + math.log(z2) if z2 > 0 else None
    if ratio is None:
        return math.exp(lead)
    log_terms = np.concatenate(([0.0], np.cumsum(ratio)[:-1]))
    top = float(log_terms.max())
    log_series = top + math.log(float(np.exp(log_terms - top).sum()))
    return math.exp(lead + log_series + n * math.log1p(-z2))
