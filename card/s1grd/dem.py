"""DEM providers: ellipsoidal heights on any grid box (the output grid, halo included).

* :class:`FlatDem` — height 0 on the WGS84 ellipsoid. Geocoding on it is honest ellipsoid
  correction (output named GEC/GTC, never RTC-on-terrain), and the reference for the RTC tests.
* :class:`FileDem` — any raster GDAL opens, bilinearly resampled onto the box. Geoid-referenced
  heights (Copernicus GLO-30: EGM2008; SRTM and sarsen's Rome DEM: EGM96) are made ellipsoidal by
  adding the undulation N of a PROJ geoid grid: ``egm96`` reads ``egm96_15.gtx`` from Debian's
  proj-data (/usr/share/proj; the pyproj wheel ships no grids). EGM2008 − EGM96 is about ±1 m
  (up to a few metres in mountains), ~0.1 px of range at 10 m pixels and 30–45° incidence; a
  GLO-30 DEM with the EGM96 grid is documented as such in the output tags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.warp import Resampling, reproject

from card.geobox import GeoBox

FloatArray = npt.NDArray[np.float64]

GEOID_GRIDS = {"egm96": "egm96_15.gtx"}
PROJ_DATA_DIRS = ("/usr/share/proj", "/usr/local/share/proj")


class Dem(Protocol):
    @property
    def label(self) -> str:
        """What the output tags say: ``flat-ellipsoid`` or ``<file name> (EGM96 + geoid → ellipsoid)``."""
        ...

    @property
    def flat(self) -> bool:
        """True for the ellipsoid itself: the output is then never called RTC."""
        ...

    def heights(self, box: GeoBox) -> FloatArray:
        """Ellipsoidal heights (m) at the centres of ``box``'s pixels; NaN where the DEM has none."""
        ...


@dataclass(frozen=True)
class FlatDem:
    height_m: float = 0.0
    label: str = "flat-ellipsoid"
    flat: bool = True

    def heights(self, box: GeoBox) -> FloatArray:
        return np.full(box.shape, self.height_m, dtype=np.float64)


def geoid_grid_path(name: str) -> Path:
    if name not in GEOID_GRIDS:
        raise ValueError(f"unknown geoid {name!r}; known: {sorted(GEOID_GRIDS)}")
    dirs = [d for d in os.environ.get("PROJ_DATA", "").split(os.pathsep) if d] + list(PROJ_DATA_DIRS)
    for d in dirs:
        p = Path(d) / GEOID_GRIDS[name]
        if p.is_file():
            return p
    raise FileNotFoundError(f"geoid grid {GEOID_GRIDS[name]} not found in {dirs}: install Debian's proj-data")


def _warp(path: str | Path, box: GeoBox, resampling: Resampling) -> FloatArray:
    out = np.full(box.shape, np.nan, dtype=np.float64)
    with rasterio.open(path) as src:
        reproject(
            source=rasterio.band(src, 1),
            destination=out,
            src_nodata=src.nodata,
            dst_transform=box.transform,
            dst_crs=box.crs if isinstance(box.crs, str) else f"EPSG:{box.crs}",
            dst_nodata=np.nan,
            resampling=resampling,
        )
    return out


@dataclass(frozen=True)
class FileDem:
    path: Path
    geoid: str | None = None
    """Vertical datum of the file's heights: None = already ellipsoidal, ``egm96`` = EGM96."""
    flat: bool = False

    @property
    def label(self) -> str:
        return f"{self.path.name}" + (
            f" ({self.geoid.upper()} + geoid → ellipsoid)" if self.geoid else " (ellipsoidal)"
        )

    def heights(self, box: GeoBox) -> FloatArray:
        h = _warp(self.path, box, Resampling.bilinear)
        if self.geoid:
            h = h + _warp(geoid_grid_path(self.geoid), box, Resampling.bilinear)
        return h
