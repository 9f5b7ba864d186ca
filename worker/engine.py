"""Parcel statistics from raster bands, numerically identical to JRC's rasterstats extractor.

The reference is ``rasterstats.zonal_stats(all_touched=False, nodata=0, stats="count mean std
min max percentile_25 percentile_50 percentile_75")``. Two definitions decide every number:

**Which pixels belong to a parcel.** rasterstats rasterizes each feature on its own with GDAL
(``all_touched=False``): a pixel belongs to the parcel when its *centre* falls inside the polygon
(GDAL's scanline fill: rows by their centre line ``r + 0.5``, and on it the pixels whose centre
``c + 0.5`` lies in ``(x_in, x_out]`` between an entering and a leaving edge). Features are
independent, so overlapping parcels each get all of their pixels, and a sliver that holds no
pixel centre gets no pixel at all.

We call the same GDAL rasterizer (``rasterio.features.rasterize``), but neither once per parcel
(0.3 ms each: half a minute for 100k parcels) nor into one full-grid label raster (480 MB at
10980², and overlaps would overwrite each other). All parcels are burnt together, one horizontal
strip of the grid at a time, with ``MergeAlg.add`` of ``(label << bits) + 1``: a pixel claimed by
one parcel names it, a pixel claimed by several says so. Because the fill is half-open, parcels
that merely share an edge never claim the same pixel, so for a clean parcel map that single pass
is final. Parcels whose pixel-centre window holds a pixel claimed twice are burnt again, in
layers of parcels with disjoint windows (greedy colouring), which cannot interfere by
construction. The rule is about pixel centres, so the result does not depend on the window a
polygon is burnt in (a window's transform is the grid's, shifted by whole pixels): the tests
check that against full-grid rasterization, parcel by parcel, and against rasterstats. Only an
edge passing through a pixel centre to within floating-point noise could go either way, as it
can between two rasterstats runs with different windows. Pixels are kept as horizontal runs per
parcel (CSR); parcels without a pixel are left out of the index.

**What the statistics are.** Over the parcel's pixels whose raw value is neither ``nodata`` nor NaN:
``count``; ``mean`` = sum / count; ``std`` the population standard deviation (ddof 0, two-pass);
``min``, ``max``; and p25, p50, p75 as ``numpy.percentile``'s default ``method="linear"``
(Hyndman & Fan type 7: the value at virtual index ``(n - 1) q`` of the sorted values, interpolated
linearly between its neighbours), which is what rasterstats calls. All in float64: for integer
rasters this reproduces rasterstats exactly (it sums integers in int64); for float32 rasters
rasterstats accumulates in float32, so the two agree to about 1e-7 relative and ours is the more
accurate. Parcels without a valid pixel are dropped (rasterstats reports count 0 and None).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.enums
import rasterio.features
import rasterio.windows
import shapely
from affine import Affine

from card.geobox import GeoBox
from worker import kernels

# Strips are read once, in order: a large GDAL block cache (default 5 % of RAM) would only hold
# decoded blocks nobody reads again, and dominate the worker's RSS. Set before GDAL's first read.
os.environ.setdefault("GDAL_CACHEMAX", "64")
# A burn strip is at most this many cells (32 MB as uint32), so memory stays flat on any grid.
_STRIP_CELLS = 8 * 1024 * 1024
# Pixel-centre windows are widened by this many pixels against rounding in GDAL's transform.
_EPS_PX = 1e-6
_POLYGONAL = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)


@dataclass(frozen=True, eq=False)
class ParcelIndex:
    """The pixels of every parcel of one parcel set on one grid, reusable for every scene.

    Parcel ``i`` (``pids[i]``) owns runs ``offsets[i]:offsets[i+1]``; run ``k`` covers grid row
    ``run_row[k]``, columns ``run_col[k]`` to ``run_col[k] + run_len[k] - 1``. ``window`` is
    ``(row_off, col_off, height, width)``, the smallest grid window holding every run: read only
    that from each band.
    """

    grid: GeoBox
    pids: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    run_row: npt.NDArray[np.int32]
    run_col: npt.NDArray[np.int32]
    run_len: npt.NDArray[np.int32]
    npixels: npt.NDArray[np.int64]
    window: tuple[int, int, int, int]
    buffer_m: float = 0.0

    def __len__(self) -> int:
        return len(self.pids)

    def pixels(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """``(pixel_offsets, rows, cols)``: the runs expanded to pixels, CSR by parcel."""
        n = int(self.run_len.sum())
        rows = np.repeat(self.run_row, self.run_len)
        starts = np.repeat(np.cumsum(self.run_len) - self.run_len, self.run_len)
        cols = (np.repeat(self.run_col, self.run_len) + (np.arange(n) - starts)).astype(np.int32)
        pixel_offsets = np.concatenate(([0], np.cumsum(self.npixels))).astype(np.int64)
        return pixel_offsets, rows, cols

    def save(self, path: str | Path) -> None:
        """Write as one ``.npz`` (no pickle), so indexes can be cached on disk between runs.

        Written through a file object so that ``path`` is used as given (``np.savez`` would
        append ``.npz`` to a bare name, and ``load(path)`` would then miss it).
        """
        t = self.grid.transform
        crs = self.grid.crs
        with open(path, "wb") as f:
            np.savez(
                f,
                pids=self.pids,
                offsets=self.offsets,
                run_row=self.run_row,
                run_col=self.run_col,
                run_len=self.run_len,
                window=np.array(self.window, np.int64),
                transform=np.array([t.a, t.b, t.c, t.d, t.e, t.f], np.float64),
                # (width, height), x first: the order of the files already cached on disk.
                shape=np.array([self.grid.width, self.grid.height], np.int64),
                crs=np.array(str(crs)),
                crs_is_int=np.array(isinstance(crs, int)),
                buffer_m=np.array(self.buffer_m, np.float64),
            )

    @classmethod
    def load(cls, path: str | Path) -> ParcelIndex:
        with np.load(path, allow_pickle=False) as z:
            crs_text = str(z["crs"])
            nx, ny = (int(v) for v in z["shape"])
            grid = GeoBox(
                shape=(ny, nx),
                transform=Affine(*(float(v) for v in z["transform"])),
                crs=int(crs_text) if bool(z["crs_is_int"]) else crs_text,
            )
            row_off, col_off, height, width = (int(v) for v in z["window"])
            return _make_index(
                grid,
                z["pids"],
                z["offsets"],
                z["run_row"],
                z["run_col"],
                z["run_len"],
                (row_off, col_off, height, width),
                float(z["buffer_m"]),
            )


@dataclass(frozen=True)
class BandStats:
    """One row per parcel with at least one valid pixel, in index order."""

    pid: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    p25: npt.NDArray[np.float64]
    p50: npt.NDArray[np.float64]
    p75: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.pid)


@dataclass(frozen=True)
class ClassHist:
    """Non-zero (parcel, class, pixel count) rows, ordered by parcel (index order) then class."""

    pid: npt.NDArray[np.int64]
    cls: npt.NDArray[np.int16]
    count: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.pid)


def _make_index(
    grid: GeoBox,
    pids: npt.NDArray[Any],
    offsets: npt.NDArray[Any],
    run_row: npt.NDArray[Any],
    run_col: npt.NDArray[Any],
    run_len: npt.NDArray[Any],
    window: tuple[int, int, int, int],
    buffer_m: float,
) -> ParcelIndex:
    offsets = np.ascontiguousarray(offsets, np.int64)
    run_len = np.ascontiguousarray(run_len, np.int32)
    # Runs are never empty and parcels never run-less, so reduceat over offsets[:-1] is safe.
    npixels = (np.add.reduceat(run_len.astype(np.int64), offsets[:-1]) if len(pids) else np.zeros(0, np.int64)).astype(
        np.int64
    )
    return ParcelIndex(
        grid=grid,
        pids=np.ascontiguousarray(pids, np.int64),
        offsets=offsets,
        run_row=np.ascontiguousarray(run_row, np.int32),
        run_col=np.ascontiguousarray(run_col, np.int32),
        run_len=run_len,
        npixels=npixels,
        window=window,
        buffer_m=buffer_m,
    )


def _check_north_up(grid: GeoBox) -> None:
    if not grid.north_up:
        raise ValueError(f"only north-up grids are supported, got transform {tuple(grid.transform)[:6]}")


def _centre_windows(
    bounds: npt.NDArray[np.float64], grid: GeoBox
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Inclusive row/column ranges of pixels whose centre lies in each bounding box, clipped to the grid.

    No pixel outside this range can be burnt (its centre is outside the polygon's bounding box), so
    two parcels whose ranges do not intersect can share a rasterization layer.
    """
    y0, x0 = grid.fractional_rowcol(bounds[:, 0], bounds[:, 3])  # north-west corner: smaller row and column
    y1, x1 = grid.fractional_rowcol(bounds[:, 2], bounds[:, 1])
    c_lo = np.maximum(np.ceil(x0 - 0.5 - _EPS_PX), 0).astype(np.int64)
    c_hi = np.minimum(np.floor(x1 - 0.5 + _EPS_PX), grid.width - 1).astype(np.int64)
    r_lo = np.maximum(np.ceil(y0 - 0.5 - _EPS_PX), 0).astype(np.int64)
    r_hi = np.minimum(np.floor(y1 - 0.5 + _EPS_PX), grid.height - 1).astype(np.int64)
    return r_lo, r_hi, c_lo, c_hi


def _polygon_parts(geoms: npt.NDArray[Any]) -> tuple[list[dict[str, Any]], npt.NDArray[np.int64]]:
    """GeoJSON-like Polygon dicts with plain-list coordinates, one per polygon part, CSR by parcel.

    rasterio converts each shape from its ``__geo_interface__``; shapely builds that slowly
    (~25 µs a polygon), while nested lists cut from one ragged coordinate array take a few µs.
    Multipolygons are split into their parts because rasterio does the same (GDAL would fill a
    multipolygon's rings even-odd, emptying where parts overlap), and the parts count matters for
    the burn encoding.
    """
    kind, coords, offs = shapely.to_ragged_array(geoms, include_z=False)
    rings = [coords[a:b].tolist() for a, b in zip(offs[0][:-1], offs[0][1:], strict=True)]
    ring_off = offs[1]
    parts = [{"type": "Polygon", "coordinates": rings[a:b]} for a, b in zip(ring_off[:-1], ring_off[1:], strict=True)]
    if kind == shapely.GeometryType.POLYGON:
        return parts, np.arange(len(parts) + 1, dtype=np.int64)
    return parts, np.asarray(offs[2], np.int64)


def _layers(r_lo: Any, r_hi: Any, c_lo: Any, c_hi: Any) -> npt.NDArray[np.int32]:
    """Layer number per parcel: parcels in one layer have disjoint pixel-centre windows."""
    n = len(r_lo)
    # Boxes in pixel-index space, padded by a quarter pixel so that one-pixel windows are not
    # degenerate: integer ranges overlap exactly when the padded boxes intersect.
    boxes = shapely.box(c_lo - 0.25, r_lo - 0.25, c_hi + 0.25, r_hi + 0.25)
    src, dst = shapely.STRtree(boxes).query(boxes)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    order = np.argsort(src, kind="stable")
    nbr_ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=nbr_ptr[1:])
    return np.asarray(kernels.greedy_layers(n, nbr_ptr, dst[order].astype(np.int64)), np.int32)


@dataclass
class _Rasterizer:
    """Burns groups of parcels, strip by strip, and collects their runs.

    Parcel positions ``0..n-1`` index the inclusive pixel-centre windows and, through
    ``part_off``, the polygon parts in ``parts``.
    """

    grid: GeoBox
    parts: list[dict[str, Any]]
    part_off: npt.NDArray[np.int64]
    r_lo: npt.NDArray[np.int64]
    r_hi: npt.NDArray[np.int64]
    c_lo: npt.NDArray[np.int64]
    c_hi: npt.NDArray[np.int64]

    def burn(self, group: npt.NDArray[np.int64], shared: bool) -> tuple[list[Any], npt.NDArray[np.bool_]]:
        """Runs of the parcels in ``group``, and which of them may have lost pixels to another.

        Each polygon part of the ``k``-th parcel of a strip burns ``(k << bits) + 1``. When
        parcels may share pixels (``shared``) the burns are added (``MergeAlg.add``), so a pixel
        says both how many parts claimed it (low ``bits``) and, when only one did, which parcel.
        ``bits`` exceeds the strip's part count, so the count never carries into the label; GDAL
        adds in double and saturates, so a sum beyond the dtype reads as a clash, never as a
        single claim. Every parcel whose window holds a clash is reported (a summed-area table
        answers that per parcel in O(1)); the runs of all the others are complete and exact.
        Otherwise the burns replace each other, so a multipolygon with overlapping parts keeps
        its own pixels. uint32 strips while labels and counts fit, int64 beyond.
        """
        found: list[Any] = []
        suspect = np.zeros(len(self.r_lo), bool)
        strip_rows = max(16, _STRIP_CELLS // self.grid.width)
        r_lo, r_hi, c_lo, c_hi = self.r_lo[group], self.r_hi[group], self.c_lo[group], self.c_hi[group]
        merge = rasterio.enums.MergeAlg.add if shared else rasterio.enums.MergeAlg.replace
        for s0 in range(int(r_lo.min()), int(r_hi.max()) + 1, strip_rows):
            sel = (r_lo < s0 + strip_rows) & (r_hi >= s0)
            if not sel.any():
                continue
            members = group[sel]
            w_r0 = max(s0, int(r_lo[sel].min()))
            w_r1 = min(s0 + strip_rows - 1, int(r_hi[sel].max()))
            w_c0, w_c1 = int(c_lo[sel].min()), int(c_hi[sel].max())
            first, stop = self.part_off[members], self.part_off[members + 1]
            bits = int((stop - first).sum()).bit_length()
            label_bits = len(members).bit_length()
            if bits + label_bits > 53:
                raise ValueError(f"{len(members)} parcels in one strip: too many to label exactly")
            dtype = np.uint32 if bits + label_bits <= 32 else np.int64
            shapes = [
                (self.parts[j], (k << bits) + 1)
                for k, (a, b) in enumerate(zip(first.tolist(), stop.tolist(), strict=True), start=1)
                for j in range(a, b)
            ]
            burnt = rasterio.features.rasterize(
                shapes,
                out=np.zeros((w_r1 - w_r0 + 1, w_c1 - w_c0 + 1), dtype),
                transform=self.grid[w_r0 : w_r1 + 1, w_c0 : w_c1 + 1].transform,
                all_touched=False,
                merge_alg=merge,
            )
            local, rows, cols, lens, clash = kernels.label_runs(burnt, w_r0, w_c0, bits)
            found.append((members[local], rows, cols, lens))
            if not shared or not clash.any():
                continue
            a0 = np.maximum(self.r_lo[members], w_r0) - w_r0
            a1 = np.minimum(self.r_hi[members], w_r1) - w_r0 + 1
            b0 = self.c_lo[members] - w_c0
            b1 = self.c_hi[members] - w_c0 + 1
            hits = kernels.window_hits(clash, a0, a1, b0, b1)
            suspect[members[hits]] = True
        return found, suspect


def build_index(
    geoms: Sequence[Any] | npt.NDArray[Any],
    pids: npt.ArrayLike,
    grid: GeoBox,
    buffer_m: float = 0.0,
) -> ParcelIndex:
    """Pixels of every parcel on ``grid`` by GDAL's pixel-centre rule, exactly as rasterstats sees them.

    ``geoms`` must already be in the grid's CRS. A non-zero ``buffer_m`` is applied first with
    shapely's default round buffer (CbM's negative buffer keeps mixed border pixels out).
    Parcels that are empty, not polygonal, outside the grid or too thin to hold a pixel centre
    get no entry.

    All parcels are first burnt together, which is exact for every parcel that shares no pixel
    with another (GDAL's half-open pixel-centre rule gives a pixel on a shared edge to one side
    only). The few parcels near a doubly-burnt pixel are burnt again in layers of parcels whose
    pixel-centre windows are disjoint, which is exact by construction.
    """
    _check_north_up(grid)
    geom_arr = np.asarray(geoms, dtype=object)
    pid_arr = np.asarray(pids, dtype=np.int64)
    if geom_arr.ndim != 1 or geom_arr.shape != pid_arr.shape:
        raise ValueError(f"{geom_arr.shape} geometries but {pid_arr.shape} pids")
    if buffer_m:
        geom_arr = shapely.buffer(geom_arr, buffer_m)
    ok = np.isin(shapely.get_type_id(geom_arr), _POLYGONAL) & ~shapely.is_empty(geom_arr)
    cand = np.flatnonzero(ok)
    r_lo, r_hi, c_lo, c_hi = _centre_windows(shapely.bounds(geom_arr[cand]), grid)
    fits = (r_lo <= r_hi) & (c_lo <= c_hi)
    cand, r_lo, r_hi, c_lo, c_hi = cand[fits], r_lo[fits], r_hi[fits], c_lo[fits], c_hi[fits]
    n = len(cand)
    if n == 0:
        return _empty_index(grid, buffer_m)

    burner = _Rasterizer(grid, *_polygon_parts(geom_arr[cand]), r_lo, r_hi, c_lo, c_hi)
    found, suspect = burner.burn(np.arange(n), shared=True)
    if suspect.any():
        found = [
            (parcel[keep], rows[keep], cols[keep], lens[keep])
            for parcel, rows, cols, lens in found
            for keep in (~suspect[parcel],)
        ]
        redo = np.flatnonzero(suspect)
        layer = _layers(r_lo[redo], r_hi[redo], c_lo[redo], c_hi[redo])
        for lay in range(int(layer.max()) + 1):
            found += burner.burn(redo[layer == lay], shared=False)[0]

    parcel = np.concatenate([f[0] for f in found])
    if len(parcel) == 0:
        return _empty_index(grid, buffer_m)
    # Stable: a parcel's runs stay in burn order (strip, then row), i.e. row-major.
    order, all_offsets = kernels.group_order(parcel, n)
    run_row = np.concatenate([f[1] for f in found])[order]
    run_col = np.concatenate([f[2] for f in found])[order]
    run_len = np.concatenate([f[3] for f in found])[order]
    has = all_offsets[1:] > all_offsets[:-1]
    offsets = np.concatenate(([0], all_offsets[1:][has])).astype(np.int64)
    row_off, col_off = int(run_row.min()), int(run_col.min())
    window = (
        row_off,
        col_off,
        int(run_row.max()) - row_off + 1,
        int((run_col + run_len).max()) - col_off,
    )
    return _make_index(grid, pid_arr[cand[has]], offsets, run_row, run_col, run_len, window, buffer_m)


def _empty_index(grid: GeoBox, buffer_m: float) -> ParcelIndex:
    z32 = np.zeros(0, np.int32)
    return _make_index(grid, np.zeros(0, np.int64), np.zeros(1, np.int64), z32, z32, z32, (0, 0, 0, 0), buffer_m)


def _chunks(npixels: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Parcel ranges of about equal pixel totals, several per thread, for the parallel kernels."""
    n = len(npixels)
    target = min(n, 8 * numba.get_num_threads())
    if target <= 1:
        return np.array([0, n], np.int64)
    cum = np.cumsum(npixels)
    cuts = np.searchsorted(cum, np.linspace(0, cum[-1], target + 1)[1:-1], side="right")
    return np.unique(np.concatenate(([0], cuts, [n]))).astype(np.int64)


def _values_for(index: ParcelIndex, values: npt.NDArray[Any], window_offset: tuple[int, int]) -> tuple[int, int]:
    """Check that ``values`` (a window starting at ``window_offset``) covers the index's window."""
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D, got shape {values.shape}")
    r0, c0 = (int(v) for v in window_offset)
    row_off, col_off, height, width = index.window
    if len(index.pids) and (
        row_off < r0
        or col_off < c0
        or row_off + height > r0 + values.shape[0]
        or col_off + width > c0 + values.shape[1]
    ):
        raise ValueError(f"values {values.shape} at offset {(r0, c0)} do not cover the index window {index.window}")
    return r0, c0


def band_stats(
    index: ParcelIndex,
    values: npt.NDArray[Any],
    nodata: float | None = 0,
    offset: float = 0.0,
    window_offset: tuple[int, int] = (0, 0),
) -> BandStats:
    """count, mean, std, min, max, p25, p50, p75 per parcel (definitions in the module docstring).

    ``values`` is the whole grid or any window of it that covers ``index.window``, whose top-left
    pixel is ``window_offset`` = (row, col) in the grid. ``nodata`` is compared with the raw value
    (None: no nodata value); NaN is never valid. ``offset`` is then added (Sentinel-2's
    ``BOA_ADD_OFFSET`` since processing baseline 04.00), so statistics are in reflectance DN.
    """
    count, out = _band_stats_raw(index, values, nodata, offset, window_offset)
    return _kept_stats(index.pids, count, out)


def _kept_stats(pids: npt.NDArray[np.int64], count: npt.NDArray[np.int64], out: npt.NDArray[np.float64]) -> BandStats:
    keep = count > 0
    kept = out[:, keep]
    return BandStats(
        pid=pids[keep],
        count=count[keep],
        mean=kept[0],
        std=kept[1],
        min=kept[2],
        max=kept[3],
        p25=kept[4],
        p50=kept[5],
        p75=kept[6],
    )


def _band_stats_raw(
    index: ParcelIndex,
    values: npt.NDArray[Any],
    nodata: float | None,
    offset: float,
    window_offset: tuple[int, int],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Valid-pixel count per parcel and the (7, n) statistics, for every parcel of ``index``."""
    r0, c0 = _values_for(index, values, window_offset)
    args = (index.offsets, index.run_row, index.run_col, index.run_len, index.npixels, _chunks(index.npixels))
    if values.dtype.kind in "iu":
        # A nodata value the dtype cannot hold (or a fraction) can never match: no test at all.
        info = np.iinfo(values.dtype)
        matchable = nodata is not None and float(nodata).is_integer() and info.min <= nodata <= info.max
        nd_int = int(nodata) if matchable and nodata is not None else 0
        count, out = kernels.band_stats_int(*args, values, r0, c0, matchable, nd_int, float(offset))
    elif values.dtype.kind == "f":
        nd = math.nan if nodata is None else float(nodata)
        count, out = kernels.band_stats_float(*args, values, r0, c0, not math.isnan(nd), nd, float(offset))
    else:
        raise ValueError(f"unsupported band dtype {values.dtype}")
    return count, out


def class_histograms(
    index: ParcelIndex,
    values: npt.NDArray[Any],
    nodata: int | None = 0,
    window_offset: tuple[int, int] = (0, 0),
) -> ClassHist:
    """Pixel count per class per parcel of an 8-bit class band (Sentinel-2 SCL), nodata excluded."""
    parcel, cls, cnt = _class_rows(index, values, nodata, window_offset)
    return ClassHist(pid=index.pids[parcel], cls=cls, count=cnt)


def _class_rows(
    index: ParcelIndex, values: npt.NDArray[Any], nodata: int | None, window_offset: tuple[int, int]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16], npt.NDArray[np.int64]]:
    """(parcel position, class, count) rows of non-zero counts, in parcel then class order."""
    if values.dtype != np.uint8:
        raise ValueError(f"class band must be uint8, got {values.dtype}")
    r0, c0 = _values_for(index, values, window_offset)
    has_nodata = nodata is not None
    nd = int(nodata) if nodata is not None else 0
    chunks = _chunks(index.npixels)
    n = len(index.pids)
    none64 = np.zeros(0, np.int64)
    args = (index.offsets, index.run_row, index.run_col, index.run_len, chunks, values, r0, c0, has_nodata, nd)
    sizes = kernels.class_counts(*args, np.zeros(n, np.int64), False, none64, np.zeros(0, np.int16), none64)
    starts = np.zeros(n, np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    total = int(sizes.sum())
    parcel = np.empty(total, np.int64)
    cls = np.empty(total, np.int16)
    cnt = np.empty(total, np.int64)
    kernels.class_counts(*args, starts, True, parcel, cls, cnt)
    return parcel, cls, cnt


def read_window(path: str | Path, index: ParcelIndex, band: int = 1) -> tuple[npt.NDArray[Any], tuple[int, int]]:
    """Read only the index's window of one band; returns ``(array, window_offset)`` for the stats calls."""
    row_off, col_off, height, width = index.window
    with rasterio.open(path) as src:
        if (src.width, src.height) != (index.grid.width, index.grid.height) or src.transform != index.grid.transform:
            raise ValueError(f"{path}: grid differs from the index's grid")
        if not len(index):
            return np.zeros((0, 0), src.dtypes[band - 1]), (0, 0)
        arr = src.read(band, window=rasterio.windows.Window(col_off, row_off, width, height))
    return arr, (row_off, col_off)


# --- streaming: bounded memory on any grid -------------------------------------------------------

ReadRows = Callable[[int, int], npt.NDArray[Any]]
"""``read(r0, r1)``: grid rows ``r0:r1`` of one band, restricted to the index window's columns."""

DEFAULT_STRIP_ROWS = 1024
"""Rows decoded per read; a multiple of the 1024-row JP2 tiles of Sentinel-2 and of COG blocks."""


@dataclass(frozen=True)
class _Step:
    read_from: int
    read_to: int
    keep_from: int
    lo: int
    hi: int


@dataclass(frozen=True, eq=False)
class StripPlan:
    """The order in which one index's parcels are reduced while a band is read strip by strip.

    Parcels are sorted by their last row. A strip ends on a multiple of ``strip_rows`` (so each
    JP2 tile row or COG block row is decoded once); after reading it, every parcel whose last row
    lies above the strip's end is complete and is reduced from the buffer, and rows above the first
    row of every pending parcel are dropped. Rows no pending parcel needs are never read. A parcel
    that spans strips is therefore reduced once, over all of its pixels, from one buffer: its
    numbers are those of a whole-raster computation. The buffer holds at most
    ``buffer_rows`` = strip + tallest parcel rows of the window's width.
    """

    index: ParcelIndex
    perm: npt.NDArray[np.int64]
    ordered: ParcelIndex
    first_row: npt.NDArray[np.int64]
    steps: tuple[_Step, ...]
    strip_rows: int

    @property
    def buffer_rows(self) -> int:
        return max((s.read_to - s.keep_from for s in self.steps), default=0)

    @property
    def rows_read(self) -> int:
        return sum(s.read_to - s.read_from for s in self.steps)

    def reads(self) -> list[tuple[int, int]]:
        """The ``(r0, r1)`` grid row ranges read, in order (what a decode-only pass must read too)."""
        return [(s.read_from, s.read_to) for s in self.steps]

    def _sub(self, step: _Step) -> ParcelIndex:
        o = self.ordered
        a, b = int(o.offsets[step.lo]), int(o.offsets[step.hi])
        top = int(self.first_row[step.lo : step.hi].min())
        _, col_off, _, width = o.window
        return ParcelIndex(
            grid=o.grid,
            pids=o.pids[step.lo : step.hi],
            offsets=o.offsets[step.lo : step.hi + 1] - a,
            run_row=o.run_row[a:b],
            run_col=o.run_col[a:b],
            run_len=o.run_len[a:b],
            npixels=o.npixels[step.lo : step.hi],
            window=(top, col_off, step.read_to - top, width),
            buffer_m=o.buffer_m,
        )


def _reorder(index: ParcelIndex, perm: npt.NDArray[np.int64]) -> ParcelIndex:
    nruns = np.diff(index.offsets)[perm]
    offsets = np.zeros(len(perm) + 1, np.int64)
    np.cumsum(nruns, out=offsets[1:])
    src = np.repeat(index.offsets[:-1][perm] - offsets[:-1], nruns) + np.arange(offsets[-1])
    return ParcelIndex(
        grid=index.grid,
        pids=index.pids[perm],
        offsets=offsets,
        run_row=index.run_row[src],
        run_col=index.run_col[src],
        run_len=index.run_len[src],
        npixels=index.npixels[perm],
        window=index.window,
        buffer_m=index.buffer_m,
    )


def plan_strips(index: ParcelIndex, strip_rows: int = DEFAULT_STRIP_ROWS) -> StripPlan:
    """Plan the strip-by-strip reduction of ``index`` (see :class:`StripPlan`)."""
    if strip_rows < 1:
        raise ValueError("strip_rows must be positive")
    n = len(index)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return StripPlan(index, empty, index, empty, (), strip_rows)
    first = index.run_row[index.offsets[:-1]].astype(np.int64)
    last = index.run_row[index.offsets[1:] - 1].astype(np.int64)
    perm = np.argsort(last, kind="stable").astype(np.int64)
    first_o, last_o = first[perm], last[perm]
    pending_top = np.minimum.accumulate(first_o[::-1])[::-1]
    row_off, _, height, _ = index.window
    row_end = row_off + height
    ends = [*range((row_off // strip_rows + 1) * strip_rows, row_end, strip_rows), row_end]
    steps: list[_Step] = []
    lo, buf_end = 0, row_off
    for end in ends:
        if lo >= n:
            break
        need = int(pending_top[lo])
        if need >= end:
            continue  # nothing pending reaches into this strip: skip its rows entirely
        hi = int(np.searchsorted(last_o, end, side="left"))
        steps.append(_Step(max(buf_end, need), end, need, lo, hi))
        buf_end, lo = end, hi
    return StripPlan(index, perm, _reorder(index, perm), first_o, tuple(steps), strip_rows)


def _run_strips(plan: StripPlan, read: ReadRows, reduce: Callable[[_Step, ParcelIndex, Any, int], None]) -> None:
    """Read the plan's strips (the next one prefetched in a thread) and reduce each completed group.

    One buffer of ``buffer_rows`` rows is allocated per band and reused: retained rows are moved
    to its top, new rows appended. The kernels release the GIL, so decoding strip k+1 (GDAL, also
    GIL-free) overlaps with reducing strip k.
    """
    if not plan.steps:
        return
    threads = numba.get_num_threads()
    if threads <= 1:
        # One thread (``CBMFLOW_WORKER_THREADS=1``, one worker per core): a prefetch thread would
        # only take turns with the kernels on the same core, so decode and reduce alternate.
        _strips(plan, read, reduce, prefetch=False)
        return
    # One core decodes, the others reduce: numba's pool would otherwise fight the decoder thread
    # for the same cores (and, with several workers per host, oversubscribe them).
    numba.set_num_threads(threads - 1)
    try:
        _strips(plan, read, reduce, prefetch=True)
    finally:
        numba.set_num_threads(threads)


def _strips(
    plan: StripPlan, read: ReadRows, reduce: Callable[[_Step, ParcelIndex, Any, int], None], prefetch: bool
) -> None:
    buf: npt.NDArray[Any] | None = None
    buf_r0 = buf_r1 = 0
    reads = plan.reads()
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="cbmflow-read")) if prefetch else None
        nxt = pool.submit(read, *reads[0]) if pool is not None else None
        for k, step in enumerate(plan.steps):
            new = nxt.result() if nxt is not None else read(*reads[k])
            if pool is not None and k + 1 < len(reads):
                nxt = pool.submit(read, *reads[k + 1])
            if new.shape[0] != step.read_to - step.read_from:
                raise ValueError(f"read returned {new.shape[0]} rows for {step.read_from}:{step.read_to}")
            if buf is None:
                buf = np.empty((plan.buffer_rows, new.shape[1]), new.dtype)
            keep = max(0, buf_r1 - step.keep_from) if step.read_from == buf_r1 else 0
            if keep:
                buf[:keep] = buf[buf_r1 - buf_r0 - keep : buf_r1 - buf_r0]
            buf[keep : keep + new.shape[0]] = new
            buf_r0, buf_r1 = step.read_to - keep - new.shape[0], step.read_to
            if step.hi > step.lo:
                reduce(step, plan._sub(step), buf[: buf_r1 - buf_r0], buf_r0)


def band_stats_strips(plan: StripPlan, read: ReadRows, nodata: float | None = 0, offset: float = 0.0) -> BandStats:
    """:func:`band_stats` over a band read strip by strip; same numbers, memory bounded by the plan."""
    n = len(plan.index)
    count = np.zeros(n, np.int64)
    out = np.full((7, n), np.nan)
    col_off = plan.index.window[1]

    def reduce(step: _Step, sub: ParcelIndex, values: Any, row0: int) -> None:
        c, o = _band_stats_raw(sub, values, nodata, offset, (row0, col_off))
        where = plan.perm[step.lo : step.hi]
        count[where] = c
        out[:, where] = o

    _run_strips(plan, read, reduce)
    return _kept_stats(plan.index.pids, count, out)


def class_histograms_strips(plan: StripPlan, read: ReadRows, nodata: int | None = 0) -> ClassHist:
    """:func:`class_histograms` over a band read strip by strip (rows in index, then class order)."""
    parts: list[tuple[Any, Any, Any]] = []
    col_off = plan.index.window[1]

    def reduce(step: _Step, sub: ParcelIndex, values: Any, row0: int) -> None:
        parcel, cls, cnt = _class_rows(sub, values, nodata, (row0, col_off))
        parts.append((plan.perm[step.lo : step.hi][parcel], cls, cnt))

    _run_strips(plan, read, reduce)
    if not parts:
        return ClassHist(np.zeros(0, np.int64), np.zeros(0, np.int16), np.zeros(0, np.int64))
    pos = np.concatenate([p[0] for p in parts])
    order = np.argsort(pos, kind="stable")
    return ClassHist(
        pid=plan.index.pids[pos[order]],
        cls=np.concatenate([p[1] for p in parts])[order],
        count=np.concatenate([p[2] for p in parts])[order],
    )


def window_reader(src: Any, index: ParcelIndex, band: int = 1) -> ReadRows:
    """A :data:`ReadRows` over an open rasterio dataset, checked against the index's grid."""
    if (src.width, src.height) != (index.grid.width, index.grid.height) or src.transform != index.grid.transform:
        raise ValueError(f"{src.name}: grid differs from the index's grid")
    _, col_off, _, width = index.window

    def read(r0: int, r1: int) -> npt.NDArray[Any]:
        return np.asarray(src.read(band, window=rasterio.windows.Window(col_off, r0, width, r1 - r0)))

    return read
