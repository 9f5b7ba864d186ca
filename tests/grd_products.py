"""Sentinel-1 GRD products for the CARD-BS input tests, built from the real sarsen annotation
(``../shared/data/sentinel1``) with a synthetic measurement: the classic SAFE layout, CDSE's
COG-GRD layout (``…_COG.SAFE``, ``…-001-cog.xml`` annotation, calibration and noise, a
``…-001-cog.tiff`` measurement), either as a directory or a zip. Not collected.

The measurement has the real size (16 705 × 26 102) but only one window of DN written: a tiled,
sparse, deflated GeoTIFF (tiles never written read as 0, i.e. fill), so a product costs kilobytes.
"""

from __future__ import annotations

import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.errors
from affine import Affine
from pyproj import Transformer

from card.geobox import GeoBox
from card.s1grd.geocode import Geocoder, ecef
from card.s1grd.safe import open_grd

SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")
LINES, SAMPLES = 16705, 26102

DnPattern = Callable[[Any, Any], Any]
"""(rows, cols) index grids → DN."""


def require_safe() -> None:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE}")


def _cog_name(name: str) -> str:
    """``…-001.xml`` → ``…-001-cog.xml``, ``…-001.tiff`` → ``…-001-cog.tiff`` (CDSE's COG-GRD naming)."""
    return re.sub(r"(-\d{3})\.(xml|tiff)$", r"\1-cog.\2", name)


def build_grd(
    dest: Path,
    window: tuple[int, int, int, int],
    dn: DnPattern,
    *,
    cog: bool = False,
    as_zip: bool = False,
) -> Path:
    """A copy of the sarsen GRD whose measurement holds ``dn(rows, cols)`` over ``window``
    (row0, row1, col0, col1; half-open) and fill elsewhere. Returns the ``.SAFE`` directory or ``.zip``."""
    name = f"{SAFE.stem}_COG.SAFE" if cog else SAFE.name
    root = dest / name
    for src in SAFE.rglob("*"):
        if src.is_dir() or src.parent.name == "measurement":
            continue
        rel = src.relative_to(SAFE)
        out = root / rel.parent / (_cog_name(rel.name) if cog else rel.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    measurement = next((SAFE / "measurement").glob("*.tiff")).name
    tif = root / "measurement" / (_cog_name(measurement) if cog else measurement)
    tif.parent.mkdir(parents=True, exist_ok=True)
    r0, r1, c0, c1 = window
    rows, cols = np.mgrid[r0:r1, c0:c1]
    profile = {"driver": "GTiff", "width": SAMPLES, "height": LINES, "count": 1, "dtype": "uint16"}
    profile |= {"tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "sparse_ok": True}
    with warnings.catch_warnings():  # radar geometry: no geotransform, as in the products (GCPs at best)
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tif, "w", **profile) as dst:
            dst.write(np.asarray(dn(rows, cols), dtype=np.uint16), 1, window=((r0, r1), (c0, c1)))
    if not as_zip:
        return root
    z = dest / f"{root.stem}.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                kind = zipfile.ZIP_STORED if f.suffix == ".tiff" else zipfile.ZIP_DEFLATED
                zf.write(f, f"{root.name}/{f.relative_to(root)}", compress_type=kind)
    shutil.rmtree(root)
    return z


def dn_pattern(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """DN that vary in both directions, so that a misplaced or swapped read changes the values."""
    return 200 + (cols % 97) * 3 + (rows % 89)


def grid_and_window() -> tuple[GeoBox, tuple[int, int, int, int]]:
    """A 48 × 48 10 m grid mid-scene and the GRD window (with margin) that it sees."""
    a = open_grd(SAFE).polarisations["VV"].annotation
    lon, lat = float(np.median(a.grid.lon)), float(np.median(a.grid.lat))
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True).transform(lon, lat)
    grid = GeoBox((48, 48), Affine(10, 0, round(x, -1), 0, -10, round(y, -1)), "EPSG:32633")
    xx, yy = np.meshgrid(grid.x_centres(), grid.y_centres())
    glon, glat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(xx, yy)
    pos = Geocoder(a).radar_position(ecef(glon, glat, 0.0))
    m = 20
    window = (
        int(pos.line.min()) - m,
        int(pos.line.max()) + m,
        int(pos.pixel.min()) - m,
        int(pos.pixel.max()) + m,
    )
    return grid, window
