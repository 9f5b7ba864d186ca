"""Map tiles for the explorer: parcels as Mapbox Vector Tiles built by PostGIS, and a true-colour
XYZ background from one Sentinel-2 scene, both behind the dataset grant.

No outside basemap can be assumed (an agency's network, an air-gapped host), so the background is
the project's own imagery: each PNG tile is a windowed read of B04/B03/B02 warped to web mercator
(``WarpedVRT``), never a pre-rendered pyramid. Parcels come from ``ST_AsMVT`` over the dataset's
GiST-indexed table: one index probe per tile, so a tile costs the same at 770k parcels as at 40
(figures in docs/explorer.md, ``python -m cbmflow.dev.bench.tiles``).

Below :data:`MIN_ZOOM` a tile would hold a whole region's parcels (megabytes, seconds), so it is
empty (a zero-byte body is a valid MVT) and the page asks to zoom in. Tiles are validated by an ETag built from the
dataset's ``parcels_version`` (bumped by every import that changes a parcel), so a revalidation
costs one cached lookup and no tile query.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from psycopg2 import sql
from starlette.requests import Request
from starlette.responses import Response

from api.auth import authorize
from api.infra import Call, Endpoint, authenticated
from api.openapi import BINARY, OBJECT, json_content
from api.params import PATH_AOI, PATH_YEAR, Param, Params
from api.responses import ApiJSONResponse
from card.s2 import S2Product, open_s2_product
from cbmflow import store
from cbmflow.db import Dataset
from cbmflow.errors import InvalidInputError, NotFoundError
from cbmflow.logging import get_logger

log = get_logger("api")

LAYER = "parcels"
EXTENT = 4096
BUFFER = 64
"""Pixels of the 4096 grid drawn beyond the tile edge, so a polygon's outline has no seam."""
MIN_ZOOM = 13
"""Lowest zoom with parcels: a z13 tile is about 3 km wide in Europe, about a thousand 1 ha
parcels in farmland (25-110 ms at 770k parcels); a z12 tile holds four times as many and took
0.3 s (docs/explorer.md), so the page asks to zoom in instead."""
MAX_ZOOM = 22
TILE_SCHEMA = 1
"""Part of every ETag: bump it when the tile's attributes change, so browsers refetch."""
TILE_PIXELS = 256
TRUE_COLOUR = ("B04", "B03", "B02")
REFLECTANCE_WHITE = 0.25
"""Surface reflectance shown as full brightness: vegetation and soil sit well below 0.3."""
MVT_MEDIA = "application/vnd.mapbox-vector-tile"
CACHE_CONTROL = "private, max-age=300"
"""Tiles are per-user (grants), so shared caches must not keep them; the browser revalidates
after five minutes with the ETag."""

Z = Param("z", "integer", where="path", minimum=0, maximum=MAX_ZOOM)
X = Param("x", "integer", where="path", minimum=0, maximum=2**MAX_ZOOM - 1)
Y = Param("y", "integer", where="path", minimum=0, maximum=2**MAX_ZOOM - 1)
SCENE = Param("scene_id", "integer", where="path", minimum=1, maximum=2**63 - 1)
TILE = (PATH_AOI, PATH_YEAR, Z, X, Y)
SCENE_TILE = (PATH_AOI, PATH_YEAR, SCENE, Z, X, Y)
DATASET = (PATH_AOI, PATH_YEAR)

MVT_SQL = (
    "SELECT ST_AsMVT(t, %(layer)s, %(extent)s, 'geom', 'fid') FROM ("
    " SELECT p.pid AS fid, p.parcel_id AS pid, p.crop_name AS crop, p.crop_code,"
    " ST_AsMVTGeom(ST_Transform(p.geom, 3857), ST_TileEnvelope(%(z)s, %(x)s, %(y)s), %(extent)s, %(buffer)s, true)"
    " AS geom FROM {parcels} p"
    " WHERE p.geom && ST_Transform(ST_Segmentize(ST_MakeEnvelope(%(w)s, %(s)s, %(e)s, %(n)s, 3857), %(step)s),"
    " %(srid)s)"
    ") t WHERE t.geom IS NOT NULL"
)
"""The tile's envelope (with its buffer) is moved into the dataset's SRID once, so the GiST index
on ``geom`` answers ``&&``; segmentised first, since a web-mercator square is curved in EPSG:3035
or UTM and its four transformed corners alone could miss parcels along an edge."""


def _tile(p: Params) -> tuple[int, int, int]:
    z, x, y = p.integer("z"), p.integer("x"), p.integer("y")
    if x >= 2**z or y >= 2**z:
        raise InvalidInputError(f"tile {z}/{x}/{y} does not exist: x and y must be below {2**z} at zoom {z}")
    return z, x, y


def _dataset(call: Call, p: Params) -> Dataset:
    aoi, year = p.required_text("aoi"), p.integer("year")
    authorize(call.user, aoi)
    ds = call.state.datasets.get(call.cur, aoi, year)
    if ds is None:
        raise NotFoundError(f"no dataset {aoi} {year}")
    return ds


def _not_modified(request: Request, etag: str) -> bool:
    sent = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, f"W/{etag}", "*") for tag in sent.split(",")) if sent else False


def _cached(body: bytes, media_type: str, etag: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "Vary": "Authorization"}
    return Response(body, media_type=media_type, headers=headers)


@lru_cache(maxsize=1)
def transparent_png() -> bytes:
    """The tile outside the AOI: fully transparent (200 rather than 204, which image loaders
    treat differently; an empty MVT body is itself a valid tile)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (TILE_PIXELS, TILE_PIXELS), (0, 0, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def parcel_tile(request: Request, p: Params) -> Response:
    """Parcels of one web-mercator tile as MVT (layer ``parcels``: ``pid``, ``crop``, ``crop_code``;
    feature id = internal pid); an empty body (a valid empty tile) where there are none and below
    :data:`MIN_ZOOM`."""
    with authenticated(request) as call:
        z, x, y = _tile(p)
        ds = _dataset(call, p)
        etag = f'"mvt{TILE_SCHEMA}-{ds.id}-{ds.parcels_version}-{z}-{x}-{y}"'
        if _not_modified(request, etag):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})
        if z < MIN_ZOOM:
            return _cached(b"", MVT_MEDIA, etag)
        west, south, east, north = tile_bounds(z, x, y)
        pad = (east - west) * BUFFER / EXTENT
        envelope = {"w": west - pad, "s": south - pad, "e": east + pad, "n": north + pad, "step": (east - west) / 8}
        call.cur.execute(
            sql.SQL(MVT_SQL).format(parcels=ds.parcels),
            {"layer": LAYER, "extent": EXTENT, "buffer": BUFFER, "z": z, "x": x, "y": y, "srid": ds.srid, **envelope},
        )
        row = call.cur.fetchone()
        body = bytes(row[0]) if row is not None and row[0] is not None else b""
        return _cached(body, MVT_MEDIA, etag)


# --- TileJSON -------------------------------------------------------------------------------------

_crops_lock = threading.Lock()
_crops: dict[tuple[int, int], list[dict[str, Any]]] = {}


def _crop_legend(call: Call, ds: Dataset) -> list[dict[str, Any]]:
    """Crops of the dataset, most parcels first; one scan per parcels_version and process."""
    key = (ds.id, ds.parcels_version)
    with _crops_lock:
        if key in _crops:
            return _crops[key]
    call.cur.execute(
        sql.SQL(
            "SELECT coalesce(crop_name, ''), coalesce(crop_code, ''), count(*) FROM {t}"
            " GROUP BY 1, 2 ORDER BY 3 DESC, 1 LIMIT 200"
        ).format(t=ds.parcels)
    )
    legend = [{"name": str(n), "code": str(c), "parcels": int(k)} for n, c, k in call.cur.fetchall()]
    with _crops_lock:
        if len(_crops) > 256:
            _crops.clear()
        _crops[key] = legend
    return legend


def tilejson(request: Request, p: Params) -> Response:
    """TileJSON 3.0.0 of the dataset's parcel tiles, with the AOI's bounds and the crop legend."""
    with authenticated(request) as call:
        ds = _dataset(call, p)
        call.cur.execute(
            "SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM"
            " (SELECT ST_Extent(ST_Transform(geom, 4326))::geometry AS e FROM aois WHERE name = %s) a",
            (ds.aoi,),
        )
        row = call.cur.fetchone()
        bounds = (
            [round(float(v), 6) for v in row]
            if row is not None and row[0] is not None
            else [-180.0, -85.0, 180.0, 85.0]
        )
        base = str(request.base_url).rstrip("/")
        tiles = f"{base}/api/v1/datasets/{ds.aoi}/{ds.year}/tiles/{{z}}/{{x}}/{{y}}.mvt"
        centre_zoom = max(MIN_ZOOM, min(16, _fit_zoom(bounds)))
        fields = {"pid": "parcel id", "crop": "crop name", "crop_code": "crop code"}
        return ApiJSONResponse(
            {
                "tilejson": "3.0.0",
                "name": f"{ds.aoi} {ds.year} parcels",
                "tiles": [tiles],
                "minzoom": MIN_ZOOM,
                "maxzoom": MAX_ZOOM,
                "bounds": bounds,
                "center": [round((bounds[0] + bounds[2]) / 2, 6), round((bounds[1] + bounds[3]) / 2, 6), centre_zoom],
                "vector_layers": [{"id": LAYER, "fields": fields, "minzoom": MIN_ZOOM, "maxzoom": MAX_ZOOM}],
                "crops": _crop_legend(call, ds),
            }
        )


def _fit_zoom(bounds: list[float]) -> int:
    """The zoom at which the bounds fill about a 1024 px wide map."""
    width = max(bounds[2] - bounds[0], 1e-6)
    return int(math.floor(math.log2(360.0 * 1024 / 256 / width)))


# --- true colour ----------------------------------------------------------------------------------


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(west, south, east, north) of an XYZ tile in EPSG:3857 metres (what ST_TileEnvelope gives)."""
    half = 20037508.342789244
    size = 2 * half / 2**z
    west, north = -half + x * size, half - y * size
    return west, north - size, west + size, north


@lru_cache(maxsize=64)
def _product(location: str, profile: str) -> S2Product:
    """Products are immutable once catalogued: their XML is parsed once per process."""
    with store.using_profile(profile):
        return open_s2_product(store.product_files(location))


def _band_tile(product: S2Product, band: str, bounds: tuple[float, float, float, float]) -> npt.NDArray[np.float64]:
    """Reflectance of one band on the tile's 256 x 256 web-mercator grid; NaN where no data."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_bounds
    from rasterio.vrt import WarpedVRT

    path = product.band_path(band)
    with (
        store.gdal_env(path),
        rasterio.open(path) as src,
        WarpedVRT(
            src,
            crs="EPSG:3857",
            transform=from_bounds(*bounds, TILE_PIXELS, TILE_PIXELS),
            width=TILE_PIXELS,
            height=TILE_PIXELS,
            resampling=Resampling.bilinear,
            src_nodata=product.nodata_dn,
            nodata=product.nodata_dn,
        ) as vrt,
    ):
        dn = vrt.read(1).astype(np.float64)
    out: npt.NDArray[np.float64] = (dn + product.reflectance_offset(band)) / product.quantification_value
    out[dn == product.nodata_dn] = np.nan
    return out


def true_colour_png(product: S2Product, bounds: tuple[float, float, float, float], inside: Any) -> bytes:
    """An RGBA PNG: reflectance 0..REFLECTANCE_WHITE stretched linearly (one scale for every tile,
    so neighbours match), transparent where there is no data or outside ``inside`` (a mask)."""
    from PIL import Image

    planes = [_band_tile(product, band, bounds) for band in TRUE_COLOUR]
    rgb = np.dstack(planes)
    valid = np.all(np.isfinite(rgb), axis=2) & inside
    scaled = np.clip(np.nan_to_num(rgb) / REFLECTANCE_WHITE * 255.0, 0, 255).round().astype(np.uint8)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.dstack([scaled, alpha]), mode="RGBA").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _aoi_mask(call: Call, aoi: str, bounds: tuple[float, float, float, float]) -> Any:
    """Pixels of the tile inside the AOI: a tenant sees the imagery of its area, not the scene's."""
    from rasterio.features import geometry_mask
    from rasterio.transform import from_bounds
    from shapely import wkb

    call.cur.execute(
        "SELECT ST_AsBinary(ST_Intersection(ST_Transform(geom, 3857), ST_MakeEnvelope(%s, %s, %s, %s, 3857)))"
        " FROM aois WHERE name = %s",
        (*bounds, aoi),
    )
    row = call.cur.fetchone()
    if row is None or row[0] is None:
        return np.zeros((TILE_PIXELS, TILE_PIXELS), bool)
    geom = wkb.loads(bytes(row[0]))
    if geom.is_empty:
        return np.zeros((TILE_PIXELS, TILE_PIXELS), bool)
    transform = from_bounds(*bounds, TILE_PIXELS, TILE_PIXELS)
    return ~geometry_mask([geom], out_shape=(TILE_PIXELS, TILE_PIXELS), transform=transform, all_touched=True)


def scene_tile(request: Request, p: Params) -> Response:
    """A 256 px true-colour PNG of one S2 scene over the dataset's AOI (transparent elsewhere)."""
    with authenticated(request) as call:
        z, x, y = _tile(p)
        scene_id = p.integer("scene_id")
        ds = _dataset(call, p)
        call.cur.execute(
            "SELECT s.location, coalesce(s.store_profile, ''), s.product_name FROM scenes s JOIN aois a"
            " ON a.name = %s AND ST_Intersects(a.geom, s.footprint) WHERE s.id = %s AND s.card = 's2'",
            (ds.aoi, scene_id),
        )
        row = call.cur.fetchone()
        if row is None:
            raise NotFoundError("no such Sentinel-2 scene over this dataset")
        location, profile, name = str(row[0]), str(row[1]), str(row[2])
        etag = '"rgb{}-{}"'.format(
            TILE_SCHEMA, hashlib.sha256(f"{ds.aoi}|{name}|{z}/{x}/{y}".encode()).hexdigest()[:32]
        )
        if _not_modified(request, etag):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})
        bounds = tile_bounds(z, x, y)
        inside = _aoi_mask(call, ds.aoi, bounds)
    if not inside.any():
        return _cached(transparent_png(), "image/png", etag)
    try:
        product = _product(location, profile)
        with store.using_profile(profile):
            png = true_colour_png(product, bounds, inside)
    except store.StoreUnavailable:
        raise
    except (OSError, ValueError) as exc:
        log.warning("tiles.unreadable", scene_id=scene_id, error=str(exc)[:200])
        raise NotFoundError("the product of this scene is not readable") from exc
    return _cached(png, "image/png", etag)


def routes() -> list[Endpoint]:
    """The explorer's map routes: parcel MVT, their TileJSON, and a scene's true-colour tiles."""
    base = "/api/v1/datasets/{aoi}/{year}"
    return [
        Endpoint(
            f"{base}/tiles.json",
            tilejson,
            "TileJSON 3.0.0 of the dataset's parcel vector tiles, with a crop legend",
            json_content(OBJECT),
            DATASET,
            tag="explorer",
        ),
        Endpoint(
            f"{base}/tiles/{{z}}/{{x}}/{{y}}.mvt",
            parcel_tile,
            "parcels of one web-mercator tile as a Mapbox Vector Tile (empty body: none there)",
            {MVT_MEDIA: {"schema": BINARY}},
            TILE,
            tag="explorer",
        ),
        Endpoint(
            f"{base}/scenes/{{scene_id}}/truecolor/{{z}}/{{x}}/{{y}}.png",
            scene_tile,
            "true-colour PNG tile (B04, B03, B02) of one Sentinel-2 scene, clipped to the dataset's AOI",
            {"image/png": {"schema": BINARY}},
            SCENE_TILE,
            tag="explorer",
        ),
    ]
