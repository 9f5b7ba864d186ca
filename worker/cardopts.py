"""Output grids and DEM providers of the ``cbmflow card`` commands (``bs`` and ``coh``), resolved
from their options in one place so both commands read ``--tile``, ``--crs/--bounds/--resolution`` and
``--dem`` alike."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from card.geobox import GeoBox
    from card.s1grd.dem import Dem

DEM_HELP = (
    "'flat' (height 0 on the WGS84 ellipsoid), 'glo30' (Copernicus GLO-30 tiles from S3, cached) or a DEM raster."
)


def build_grid(crs: str, bounds: tuple[float, float, float, float], resolution_m: float) -> GeoBox:
    """A north-up GeoBox covering ``bounds``, its corners snapped outwards to multiples of the resolution."""
    from affine import Affine

    from card.geobox import GeoBox

    xmin, ymin, xmax, ymax = bounds
    if not (xmax > xmin and ymax > ymin and resolution_m > 0):
        raise ValueError(f"bounds must be XMIN YMIN XMAX YMAX with XMAX > XMIN, YMAX > YMIN; got {bounds}")
    x0 = math.floor(xmin / resolution_m) * resolution_m
    y1 = math.ceil(ymax / resolution_m) * resolution_m
    nx = math.ceil((xmax - x0) / resolution_m)
    ny = math.ceil((y1 - ymin) / resolution_m)
    return GeoBox((ny, nx), Affine(resolution_m, 0.0, x0, 0.0, -resolution_m, y1), crs.upper())


def output_grids(
    tiles: list[str], crs: str | None, bounds: tuple[float, float, float, float] | None, resolution_m: float | None
) -> list[tuple[str | None, GeoBox]]:
    """(name for the file names, grid) per output grid: one per ``--tile``, or the one ``--crs/--bounds`` grid."""
    from card.mgrs import parse_tile

    if tiles and (crs is not None or bounds is not None):
        raise ValueError("give either --tile or --crs/--bounds, not both")
    if tiles:
        out: list[tuple[str | None, GeoBox]] = []
        for name in tiles:
            tile = parse_tile(name)
            out.append((tile.name, tile.geobox(resolution_m or 10.0)))
        return out
    if crs is None or bounds is None:
        raise ValueError("give the output grid: --tile 32UPU or --crs EPSG:N --bounds XMIN YMIN XMAX YMAX")
    return [(None, build_grid(crs, bounds, resolution_m or 10.0))]


def default_dem_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cbmflow" / "glo30"


def glo30_client(location: str, profile: str | None = None) -> Any:
    """AWS's public bucket: an unsigned client there; any other bucket: the object store's client
    (``profile``'s, or the current one's: the worker's job names the default profile "", since the
    DEM is the worker's setting, not the product's)."""
    from card.s1grd.dem import GLO30_AWS

    if location.rstrip("/") == GLO30_AWS:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        return boto3.client("s3", region_name="eu-central-1", config=Config(signature_version=UNSIGNED))
    from cbmflow import store

    return store.s3_client(None if profile is None else store.profile_settings(profile))


def make_dem(dem: str, geoid: str | None, bucket: str, cache: Path | None) -> Dem:
    from card.s1grd.dem import FileDem, FlatDem, Glo30Dem

    if dem == "flat":
        return FlatDem()
    if dem == "glo30":
        return Glo30Dem(glo30_client(bucket), cache or default_dem_cache(), bucket, geoid=geoid)
    if not Path(dem).is_file():
        raise FileNotFoundError(f"DEM {dem} not found")
    return FileDem(Path(dem), geoid)
