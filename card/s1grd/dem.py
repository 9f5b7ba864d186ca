"""DEM providers: ellipsoidal heights on any grid box (the output grid, halo included).

* :class:`FlatDem` — height 0 on the WGS84 ellipsoid. Geocoding on it is honest ellipsoid
  correction (output named GEC/GTC, never RTC-on-terrain), and the reference for the RTC tests.
* :class:`FileDem` — any raster GDAL opens, bilinearly resampled onto the box.
* :class:`Glo30Dem` — Copernicus GLO-30 DEM COG tiles (1° × 1°, 1″) from an S3 bucket (the AWS
  open-data bucket ``s3://copernicus-dem-30m/`` or CDSE's ``s3://eodata/auxdata/CopDEM_COG/
  copernicus-dem-30m/``), fetched once into a local cache and mosaicked by a VRT, so that a block
  on a tile corner is warped from all four tiles at once (no seam).

Geoid-referenced heights (GLO-30: EGM2008; SRTM and sarsen's Rome DEM: EGM96) are made
ellipsoidal by adding the undulation N of a PROJ geoid grid, read directly with rasterio (the
pyproj wheel ships no grids): ``egm96`` is ``egm96_15.gtx`` from Debian's proj-data; ``egm2008``
(``us_nga_egm08_25.tif`` or ``egm08_25.gtx``) is used where a deployment installed it (Debian's
proj-data has none). GLO-30 is therefore converted with EGM96 by default, and the DEM tag says so.
EGM2008 − EGM96 is 0.5 m RMS worldwide, up to ~10 m in a few places (ocean trenches, the
Himalaya, the Andes; NGA / MICRODEM's EGM notes). A height error Δh moves a point by Δh/tan θ in
ground range: at 30–45° incidence 1 m is 1.0–1.7 m, 0.10–0.17 px of 10 m, so the typical
difference is ~0.05–0.1 px, and ~1 px where it reaches 10 m. Terrain flattening sees only the
geoid's slope, which the two models share to 1e-5 (cm per km): no effect on RTC values.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.vrt import WarpedVRT
from rasterio.warp import Resampling

from card.geobox import GeoBox

FloatArray = npt.NDArray[np.float64]

GEOID_GRIDS: dict[str, tuple[str, ...]] = {
    "egm96": ("egm96_15.gtx", "us_nga_egm96_15.tif"),
    "egm2008": ("us_nga_egm08_25.tif", "egm08_25.gtx"),
}
PROJ_DATA_DIRS = ("/usr/share/proj", "/usr/local/share/proj")


class DemLocationError(ValueError):
    """The DEM's location itself is wrong (no GLO-30 tiles where configured): every product would
    fail the same way, so a caller should treat it as its configuration, not as the product's fault."""


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
        for file_name in GEOID_GRIDS[name]:
            p = Path(d) / file_name
            if p.is_file():
                return p
    hint = "install Debian's proj-data" if name == "egm96" else "install the PROJ grid (proj-data has none)"
    raise FileNotFoundError(f"geoid grid {' or '.join(GEOID_GRIDS[name])} not found in {dirs}: {hint}")


def best_geoid(preferred: str = "egm2008") -> str:
    """``preferred`` if its grid is installed, else ``egm96`` (Debian's proj-data)."""
    try:
        geoid_grid_path(preferred)
    except FileNotFoundError:
        return "egm96"
    return preferred


def _local_env() -> AbstractContextManager[Any]:
    """A GDAL environment for reading local files, without AWS credentials.

    Outside any ``rasterio.Env`` each ``open`` builds its own, and with AWS keys in the environment
    that is a boto3 session each time (~40 ms).
    """
    from rasterio.env import hasenv
    from rasterio.session import DummySession

    return contextlib.nullcontext() if hasenv() else rasterio.Env(session=DummySession())


def _warp(path: str | Path, box: GeoBox, resampling: Resampling) -> FloatArray:
    """``path`` resampled onto ``box`` (NaN outside it or at its nodata), through a WarpedVRT.

    Not ``rasterio.warp.reproject``: it builds ``rasterio.Env`` objects internally, each a boto3
    session when AWS keys are in the environment (75 ms against 2 ms per call, the same values).
    """
    crs = box.crs if isinstance(box.crs, str) else f"EPSG:{box.crs}"
    with _local_env(), rasterio.open(path) as src:
        with WarpedVRT(
            src,
            crs=crs,
            transform=box.transform,
            width=box.width,
            height=box.height,
            resampling=resampling,
            src_nodata=src.nodata,
            nodata=np.nan,
            dtype="float64",
        ) as vrt:
            out: FloatArray = vrt.read(1)
    return out


def geoid_heights(name: str, box: GeoBox, step_px: int = 16) -> FloatArray:
    """Geoid undulation (m) at ``box``'s pixel centres: warped on every ``step_px``-th pixel, linear between.

    The grids are 15′ (EGM96) or 2.5′ (EGM2008), bilinear already: re-interpolating them over 16
    output pixels moves them by millimetres where a grid cell's slope changes, and halves the
    DEM's cost (the geoid warp cost as much as the DEM's own).
    """
    ny, nx = box.shape
    if ny <= step_px or nx <= step_px:
        return _warp(geoid_grid_path(name), box, Resampling.bilinear)
    my, mx = -(-(ny - 1) // step_px) + 1, -(-(nx - 1) // step_px) + 1
    # coarse pixel i is centred on fine pixel step·i
    half = 0.5 - 0.5 * step_px
    coarse = GeoBox((my, mx), box.transform * Affine.translation(half, half) * Affine.scale(step_px), box.crs)
    return upsample_linear(_warp(geoid_grid_path(name), coarse, Resampling.bilinear), step_px, (ny, nx))


def upsample_linear(coarse: FloatArray, step_px: int, shape: tuple[int, int]) -> FloatArray:
    """Separable linear interpolation of nodes at every ``step_px``-th pixel onto ``shape`` (nodes
    reach at least the last pixel)."""
    out = coarse
    for axis, n in enumerate(shape):
        idx = np.arange(n)
        k = np.minimum(idx // step_px, coarse.shape[axis] - 2)
        f = (idx - k * step_px) / step_px
        lo, hi = np.take(out, k, axis=axis), np.take(out, k + 1, axis=axis)
        f2 = f[:, None] if axis == 0 else f[None, :]
        out = lo + f2 * (hi - lo)
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
            h = h + geoid_heights(self.geoid, box)
        return h


# --------------------------------------------------------------------------------------------
# Copernicus GLO-30 from S3


GLO30_AWS = "s3://copernicus-dem-30m"
"""The AWS open-data bucket (anonymous reads, eu-central-1)."""
GLO30_CDSE = "s3://eodata/auxdata/CopDEM_COG/copernicus-dem-30m"
"""The same tiles in CDSE's eodata (its S3 credentials)."""
GLO30_DATUM = "egm2008"
GLO30_RESOLUTION_DEG = 1 / 3600


def glo30_tile_name(lat: int, lon: int) -> str:
    """``Copernicus_DSM_COG_10_N41_00_E012_00_DEM``: the 1° tile whose south-west corner is (lat, lon)."""
    ns, ew = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
    return f"Copernicus_DSM_COG_10_{ns}{abs(lat):02d}_00_{ew}{abs(lon):03d}_00_DEM"


@lru_cache(maxsize=64)
def _to_lonlat(crs: str) -> Transformer:
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def lonlat_bounds(box: GeoBox) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a box's outline (densified: UTM edges are curved in lon/lat)."""
    left, bottom, right, top = box.bounds
    n = 8
    xs = np.r_[np.linspace(left, right, n), np.full(n, right), np.linspace(right, left, n), np.full(n, left)]
    ys = np.r_[np.full(n, top), np.linspace(top, bottom, n), np.full(n, bottom), np.linspace(bottom, top, n)]
    crs = box.crs if isinstance(box.crs, str) else f"EPSG:{box.crs}"
    lon, lat = _to_lonlat(crs).transform(xs, ys)
    return float(np.min(lon)), float(np.min(lat)), float(np.max(lon)), float(np.max(lat))


class Glo30Dem:
    """Copernicus GLO-30 heights from 1° COG tiles in an S3 bucket, cached on local disk.

    ``client`` is a boto3 S3 client for the store that holds the tiles (card/ knows no store
    settings: the caller passes its endpoint and credentials; for the AWS bucket an unsigned
    client). Tiles are downloaded whole (~5–25 MB; a GRD needs ~10–40 of them) into
    ``cache_dir`` once, atomically, so that concurrent jobs share them. A tile that is not in the
    bucket (open sea: GLO-30 has no all-ocean tiles) is remembered as such and is height 0 on the
    geoid; any other S3 error propagates (the caller decides whether to retry).
    """

    flat = False

    def __init__(
        self, client: Any, cache_dir: str | Path, location: str = GLO30_AWS, *, geoid: str | None = None
    ) -> None:
        m = re.match(r"^(?:s3://|/vsis3/)([^/]+)/?(.*?)/?$", location)
        if not m:
            raise ValueError(f"GLO-30 location {location!r} is not s3://bucket[/prefix]")
        self.client = client
        self.bucket, prefix = m.group(1), m.group(2)
        self.prefix = f"{prefix}/" if prefix else ""
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._bucket_ok = False
        self.geoid = geoid or best_geoid(GLO30_DATUM)

    @property
    def label(self) -> str:
        return (
            f"Copernicus GLO-30 (s3://{self.bucket}/{self.prefix}; EGM2008 heights + {self.geoid.upper()} geoid"
            " → ellipsoid)"
        )

    def tile(self, name: str) -> Path | None:
        """The cached tile file, downloaded first if needed; None when the bucket has no such tile."""
        path = self.cache_dir / f"{name}.tif"
        if path.is_file():
            return path
        missing = self.cache_dir / f"{name}.missing"
        if missing.is_file():
            return None
        from botocore.exceptions import ClientError

        part = self.cache_dir / f".{name}.{uuid.uuid4().hex}.part"
        try:
            self.client.download_file(self.bucket, f"{self.prefix}{name}/{name}.tif", str(part))
        except ClientError as exc:
            part.unlink(missing_ok=True)
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                self._check_bucket()  # a HEAD 404 is also what a wrong bucket or prefix gives
                missing.touch()
                return None
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, path)
        return path

    def _check_bucket(self) -> None:
        """The bucket exists and its prefix holds GLO-30 tiles; else a 404 means no sea but a wrong location."""
        if self._bucket_ok:
            return
        self.client.head_bucket(Bucket=self.bucket)
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}Copernicus_DSM_", MaxKeys=1)
        if not listing.get("KeyCount", len(listing.get("Contents", []))):
            raise DemLocationError(
                f"s3://{self.bucket}/{self.prefix} holds no Copernicus_DSM_… tiles: a wrong GLO-30 location?"
            )
        self._bucket_ok = True

    def tiles_for(self, box: GeoBox) -> list[tuple[int, int]]:
        """(lat, lon) of the south-west corners of the tiles the box needs (2 DEM pixels of margin)."""
        west, south, east, north = lonlat_bounds(box)
        if east - west > 180:
            raise ValueError(f"a block across ±180° longitude ({box.bounds} in {box.crs}) is not supported by Glo30Dem")
        m = 2 * GLO30_RESOLUTION_DEG
        mlon = m / max(math.cos(math.radians(max(abs(south), abs(north)))), 0.05)
        lats = range(math.floor(south - m), math.floor(north + m) + 1)
        lons = range(math.floor(west - mlon), math.floor(east + mlon) + 1)
        return [(lat, lon) for lat in lats for lon in lons if -90 <= lat < 90 and -180 <= lon < 180]

    def mosaic(self, tiles: list[tuple[int, int]]) -> Path:
        """A VRT over ``tiles`` on the finest spacing among them; absent tiles read 0.

        Tiles of one spacing (1″ south of 50°) are placed 1:1, so the warp onto the block sees one
        seamless raster. North of 50° GLO-30's longitude spacing grows (1.5″, 2″, 3″, 5″, 10″);
        where tiles of two spacings meet, the coarser ones are resampled bilinearly into the VRT,
        which is exact inside them and up to a few centimetres off within one pixel of a seam.
        """
        names = sorted(glo30_tile_name(lat, lon) for lat, lon in tiles)
        vrt = self.cache_dir / f"mosaic-{hashlib.sha1(' '.join(names).encode()).hexdigest()[:16]}.vrt"
        present = [p for lat, lon in tiles if (p := self.tile(glo30_tile_name(lat, lon))) is not None]  # refetch
        if vrt.is_file():
            return vrt
        grids = []
        for path in present:
            with _local_env(), rasterio.open(path) as src:
                grids.append((path, src.transform, src.shape, src.dtypes[0]))
        res_x = min((t.a for _, t, _, _ in grids), default=GLO30_RESOLUTION_DEG)
        res_y = min((-t.e for _, t, _, _ in grids), default=GLO30_RESOLUTION_DEG)
        lat0, lat1 = min(t[0] for t in tiles), max(t[0] for t in tiles) + 1
        lon0, lon1 = min(t[1] for t in tiles), max(t[1] for t in tiles) + 1
        # GLO-30 pixels are points on whole multiples of the spacing: the grids start half a pixel out
        left, top = lon0 - res_x / 2, lat1 + res_y / 2
        width, height = round((lon1 - lon0) / res_x), round((lat1 - lat0) / res_y)
        sources = []
        for path, t, (h, w), _ in grids:
            x_off, y_off = (t.c - left) / res_x, (top - t.f) / res_y  # fractional only for other spacings
            x_size, y_size = w * t.a / res_x, h * -t.e / res_y
            sources.append(
                f'<ComplexSource resampling="bilinear"><SourceFilename relativeToVRT="0">{path.resolve()}'
                f"</SourceFilename><SourceBand>1</SourceBand>"
                f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                f'<DstRect xOff="{x_off!r}" yOff="{y_off!r}" xSize="{x_size!r}" ySize="{y_size!r}"/></ComplexSource>'
            )
        dtype = _gdal_type(grids[0][3]) if grids else "Float32"
        xml = (
            f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>EPSG:4326</SRS>'
            f"<GeoTransform>{left!r}, {res_x!r}, 0, {top!r}, 0, {-res_y!r}</GeoTransform>"
            f'<VRTRasterBand dataType="{dtype}" band="1">' + "".join(sources) + "</VRTRasterBand></VRTDataset>"
        )
        part = self.cache_dir / f".{vrt.name}.{uuid.uuid4().hex}.part"
        part.write_text(xml)
        os.replace(part, vrt)
        return vrt

    def heights(self, box: GeoBox) -> FloatArray:
        h = _warp(self.mosaic(self.tiles_for(box)), box, Resampling.bilinear)
        return h + geoid_heights(self.geoid, box)


def _gdal_type(dtype: str) -> str:
    return {"float32": "Float32", "float64": "Float64", "int16": "Int16", "uint16": "UInt16", "int32": "Int32"}[dtype]
