"""One pixel-grid type for readers, the extraction engine and the test-world generator.

Modelled on odc-geo's ``GeoBox``: a shape, an affine transform and a CRS, nothing else. The axis
order is the one thing a grid type exists to get right, so it is spelt out everywhere:

* ``shape`` is ``(ny, nx)``, rows then columns, the order of a numpy array read from the raster
  (``array.shape == box.shape``); ``height`` is ``ny`` and ``width`` is ``nx``.
* ``transform`` maps (column, row) to (x, y): ``x = a·col + b·row + c``, ``y = d·col + e·row + f``
  (GDAL/rasterio convention), x being easting or longitude and y northing or latitude, whatever
  axis order the CRS's own definition declares (EPSG:4326 is lat/lon there; GDAL and we are not).
* Methods that take or return pixel positions say which axis comes first: ``box[rows, cols]``,
  ``xy(rows, cols)`` like ``rasterio.transform.xy``, ``fractional_rowcol(xs, ys)`` like
  ``rasterio.transform.rowcol``.

The arithmetic of each method is written in a fixed operation order (noted where it matters), so
that pixel centres and window transforms come out bit for bit as GDAL, rasterstats and the
generated test worlds expect: a pixel whose centre lies on a parcel edge must fall the same way
every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from affine import Affine
from rasterio.coords import BoundingBox

FloatArray = npt.NDArray[np.float64]

# Offsets of a sub-box must be whole pixels to within this (they are computed in floating point).
_ALIGN_TOL_PX = 1e-6


class Resolution(NamedTuple):
    """Signed pixel size per axis, named so that x and y cannot be swapped by position.

    ``y`` is negative on a north-up grid (rows run southwards), as in the transform.
    """

    x: float
    y: float


@dataclass(frozen=True)
class GeoBox:
    """A georeferenced pixel grid: ``shape`` (ny, nx), ``transform`` (pixel → CRS) and ``crs``.

    ``crs`` is an EPSG code or the text rasterio gives for a CRS (``str(src.crs)``: ``EPSG:32632``
    or WKT). It is compared as given, not normalised, so two boxes only compare equal when built
    the same way; that is what makes a box a safe cache key (equal boxes hash equal).
    """

    shape: tuple[int, int]
    transform: Affine
    crs: int | str

    def __post_init__(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"shape must be (ny, nx), got {self.shape!r}")
        ny, nx = (int(v) for v in self.shape)
        if ny < 0 or nx < 0:
            raise ValueError(f"shape must not be negative, got {self.shape!r}")
        # Plain ints, so that a shape given as numpy integers hashes and prints like any other.
        object.__setattr__(self, "shape", (ny, nx))

    @classmethod
    def from_dataset(cls, src: Any) -> GeoBox:
        """The grid of an open rasterio dataset, CRS as ``str(src.crs)``."""
        return cls((int(src.height), int(src.width)), src.transform, str(src.crs))

    @property
    def height(self) -> int:
        """Number of rows (``shape[0]``)."""
        return self.shape[0]

    @property
    def width(self) -> int:
        """Number of columns (``shape[1]``)."""
        return self.shape[1]

    @property
    def resolution(self) -> Resolution:
        """Signed pixel size along x and y; only meaningful for an axis-aligned grid."""
        return Resolution(self.transform.a, self.transform.e)

    @property
    def axis_aligned(self) -> bool:
        """Columns run along x and rows along y (no rotation or shear)."""
        return self.transform.b == 0 and self.transform.d == 0

    @property
    def north_up(self) -> bool:
        """Axis-aligned with x growing to the right and y shrinking downwards (the usual raster)."""
        return self.axis_aligned and self.transform.a > 0 and self.transform.e < 0

    @property
    def bounds(self) -> BoundingBox:
        """``(left, bottom, right, top)`` of the grid's outer pixel edges, in the CRS.

        The corners are mapped with the transform's own operation order (``a·col + b·row + c``),
        so on a north-up grid ``left`` is exactly ``c`` and ``right`` exactly ``c + nx·a``.
        """
        t = self.transform
        ny, nx = self.shape
        xs = [a * t.a + b * t.b + t.c for a, b in ((0, 0), (nx, 0), (0, ny), (nx, ny))]
        ys = [a * t.d + b * t.e + t.f for a, b in ((0, 0), (nx, 0), (0, ny), (nx, ny))]
        return BoundingBox(min(xs), min(ys), max(xs), max(ys))

    def __getitem__(self, roi: tuple[slice, slice]) -> GeoBox:
        """The sub-box ``box[rows, cols]``, clipped like numpy slicing: ``array[roi]`` lies on it.

        The new origin is ``a·col + b·row + c`` (and ``d·col + e·row + f``; see :meth:`shifted`),
        the operation order of ``affine``'s ``t * (col, row)`` and thus of rasterstats' per-feature
        windows: GDAL is handed the same numbers whichever of the two placed a window.
        """
        if not (isinstance(roi, tuple) and len(roi) == 2 and all(isinstance(s, slice) for s in roi)):
            raise TypeError(f"index a GeoBox with two slices, [rows, cols]; got {roi!r}")
        rows, cols = roi
        if rows.step not in (None, 1) or cols.step not in (None, 1):
            raise ValueError("GeoBox slices must have step 1")
        r0, r1, _ = rows.indices(self.height)
        c0, c1, _ = cols.indices(self.width)
        return self.shifted(rows=r0, cols=c0, shape=(max(r1 - r0, 0), max(c1 - c0, 0)))

    def shifted(self, *, rows: int, cols: int, shape: tuple[int, int] | None = None) -> GeoBox:
        """A box on the same pixel grid whose top-left pixel is pixel (``rows``, ``cols``) of this one.

        Unlike slicing, nothing is clipped: the box may reach past any edge (rasterstats burns each
        feature in such a window). Keyword-only, so that the axis order is visible at every call.
        ``shape`` defaults to this box's.
        """
        t = self.transform
        c = cols * t.a + rows * t.b + t.c
        f = cols * t.d + rows * t.e + t.f
        return GeoBox(self.shape if shape is None else shape, Affine(t.a, t.b, c, t.d, t.e, f), self.crs)

    def window_of(self, sub: GeoBox) -> tuple[slice, slice]:
        """``(rows, cols)`` slices with ``self[rows, cols] == sub`` (read ``array[rows, cols]``).

        ``sub`` must share the CRS and pixel size, start a whole number of pixels from this
        box's origin and lie inside it; anything else would silently misregister the data.
        """
        t, s = self.transform, sub.transform
        if sub.crs != self.crs or (t.a, t.b, t.d, t.e) != (s.a, s.b, s.d, s.e):
            raise ValueError(f"{sub} is not on the pixel grid of {self}")
        col_f, row_f = ~t @ (s.c, s.f)
        col, row = round(col_f), round(row_f)
        if abs(col - col_f) > _ALIGN_TOL_PX or abs(row - row_f) > _ALIGN_TOL_PX:
            raise ValueError(f"{sub} starts at pixel ({row_f}, {col_f}) of {self}, not on a pixel corner")
        if row < 0 or col < 0 or row + sub.height > self.height or col + sub.width > self.width:
            raise ValueError(f"{sub} does not lie inside {self}")
        return slice(row, row + sub.height), slice(col, col + sub.width)

    def zoomed_out(self, factor: int) -> GeoBox:
        """The same origin with pixels ``factor`` times larger, e.g. a 10 m grid's 20 m sibling.

        Unlike odc-geo's ``zoom_out`` (which rounds the shape up), a partial coarse pixel at the
        right or bottom edge is dropped, so that every coarse pixel is covered by fine ones.
        """
        if factor < 1:
            raise ValueError(f"zoom factor must be a positive integer, got {factor}")
        t = self.transform
        return GeoBox(
            (self.height // factor, self.width // factor),
            Affine(t.a * factor, t.b * factor, t.c, t.d * factor, t.e * factor, t.f),
            self.crs,
        )

    def x_centres(self, cols: npt.ArrayLike | None = None) -> FloatArray:
        """x of the centres of columns ``cols`` (default: all), on an axis-aligned grid.

        Computed as ``c + (col + 0.5)·a``, which is bit for bit what :meth:`xy` gives there.
        """
        self._require_axis_aligned()
        u = (np.arange(self.width) if cols is None else np.asarray(cols)).astype(np.float64) + 0.5
        return np.asarray(self.transform.c + u * self.transform.a, np.float64)

    def y_centres(self, rows: npt.ArrayLike | None = None) -> FloatArray:
        """y of the centres of rows ``rows`` (default: all), on an axis-aligned grid."""
        self._require_axis_aligned()
        v = (np.arange(self.height) if rows is None else np.asarray(rows)).astype(np.float64) + 0.5
        return np.asarray(self.transform.f + v * self.transform.e, np.float64)

    def xy(self, rows: npt.ArrayLike, cols: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """``(x, y)`` of the centres of pixels ``(rows[i], cols[i])``; rasterio's ``xy(t, rows, cols)``."""
        t = self.transform
        u = np.asarray(cols).astype(np.float64) + 0.5
        v = np.asarray(rows).astype(np.float64) + 0.5
        return np.asarray(t.a * u + t.b * v + t.c, np.float64), np.asarray(t.d * u + t.e * v + t.f, np.float64)

    def fractional_rowcol(self, xs: npt.ArrayLike, ys: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """``(rows, cols)`` of points as fractional pixel positions (pixel corners are whole).

        ``floor`` of the result is rasterio's ``rowcol``; the fractions let callers apply their
        own rule (e.g. "pixel centres inside a bounding box"). Axis-aligned grids only: there the
        inverse is one subtraction and one division per axis, exact enough that a point on a pixel
        edge lands on a whole number.
        """
        self._require_axis_aligned()
        t = self.transform
        x = np.asarray(xs, np.float64)
        y = np.asarray(ys, np.float64)
        return (y - t.f) / t.e, (x - t.c) / t.a

    def _require_axis_aligned(self) -> None:
        if not self.axis_aligned:
            raise ValueError(f"a rotated or sheared grid has no per-axis coordinates: {tuple(self.transform)[:6]}")
