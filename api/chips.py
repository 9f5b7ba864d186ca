"""Sentinel-2 image chips around a point: JRC ``rawChipByLocation`` and ``chipsByLocation``.

JRC ssh-ed into worker VMs to cut chips and left them in a public ``/static/tmp``, so anyone who
could guess a path could fetch another tenant's imagery. Here chips are cut in the request path
from the products the watcher catalogued (``scenes.location``), with rasterio *windowed* reads
of the product's JP2 in the raster's own CRS, so no pixel is resampled for a raw chip.

The ``cbm`` client fetches each chip with an unauthenticated ``GET {url}{chip}``, so a chip URL
must itself be the credential. It is ``/chips/<token>/<ref>.<band>.tif`` where the token is a
signed, expiring capability (HMAC-SHA256 under a server secret) naming the user, scene, band,
point and size. Nothing is stored: a GET verifies the signature and expiry, re-checks that the
user still exists and is still granted an AOI at the point (so a revoke also stops chip URLs
already handed out), and cuts the chip then. Any worker on any host holding the same secret can
answer, and there is no chip directory to clean up. The token is signed, not encrypted: whoever
holds the URL can read the user name, scene id and point in it, which tell them no more than the
chip does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from api.infra import Call, Endpoint, authenticated, state_of
from api.openapi import BINARY, STR, json_content
from api.params import LAT, LON, Param, Params
from api.responses import ApiJSONResponse
from card.s2 import S2Product, normalize_band, open_s2_product
from cbmflow import store
from cbmflow.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from cbmflow.logging import get_logger
from cbmflow.settings import ApiSettings, state_dir

log = get_logger("api.chips")

# Bands an L2A product carries as images (B10 is not in L2A); legacy JRC spellings are mapped.
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12", "SCL")
MIN_CHIPSIZE_M, MAX_CHIPSIZE_M = 10.0, 10_240.0  # at 10 m: 1 to 1024 pixels a side
RGB_PIXELS, RGB_SIZE_M = 128, 1280.0
SECRET_FILE = "api-chip-secret"
_TOKEN_RE = re.compile(r"^([A-Za-z0-9_-]{1,600})\.([A-Za-z0-9_-]{22})$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_LUT_RE = re.compile(r"^(\d{1,2}(?:\.\d+)?)_(\d{1,3}(?:\.\d+)?)$")

WHERE = (
    LON,
    LAT,
    Param("start_date", "date", required=True, max_len=10, description="first day (UTC)"),
    Param("end_date", "date", required=True, max_len=10, description="last day included (UTC)"),
)
PLEVEL = Param(
    "plevel", enum=("LEVEL2A",), default="LEVEL2A", case="upper", max_len=10, hint="LEVEL2A (the only level catalogued)"
)
RAW_CHIPS = (
    *WHERE,
    Param("band", pattern="^[A-Za-z0-9]{2,3}$", default="B08", max_len=10),
    Param(
        "chipsize",
        "number",
        default=1280.0,
        minimum=MIN_CHIPSIZE_M,
        maximum=MAX_CHIPSIZE_M,
        description="side in metres (1280)",
    ),
    PLEVEL,
    Param("onlylist", "boolean", default=False),
)
RGB_CHIPS = (
    *WHERE,
    Param("lut", pattern="^\\d{1,2}_\\d{1,3}$", default="5_95", max_len=20, description="percentile stretch, 5_95"),
    Param(
        "bands",
        pattern="^[A-Za-z0-9]{2,3}_[A-Za-z0-9]{2,3}_[A-Za-z0-9]{2,3}$",
        default="B08_B04_B03",
        max_len=40,
    ),
    PLEVEL,
)
# The token is checked by its signature (any bad one is the same 404), so no length rule here.
CHIP = (Param("token", where="path", max_len=1000), Param("name", where="path", max_len=1000))


def load_secret(settings: ApiSettings) -> bytes:
    """The chip-signing key: the configured one, else one generated once in the state directory.

    The file is shared by the uvicorn workers of one host, so a URL minted by one worker is valid
    on another; several hosts behind a load balancer must set ``CBMFLOW_API_CHIP_SECRET``.
    """
    configured = settings.chip_secret
    if configured:
        return hashlib.sha256(configured.encode("utf-8")).digest()
    path = state_dir() / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(os.urandom(32)).decode("ascii"))
    for _ in range(50):  # another worker may have created it and not yet written it
        text = path.read_text().strip()
        if text:
            return hashlib.sha256(text.encode("ascii")).digest()
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty; delete it or set CBMFLOW_API_CHIP_SECRET")


@dataclass(frozen=True)
class ChipRef:
    """What a chip token grants: one band of one scene around one point, for one user, until ``expires``."""

    user: str
    scene_id: int
    band: str
    lon: float
    lat: float
    size_m: float
    expires: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, ref: ChipRef) -> str:
    payload = json.dumps(
        [ref.user, ref.scene_id, ref.band, ref.lon, ref.lat, ref.size_m, ref.expires], separators=(",", ":")
    )
    body = _b64(payload.encode("utf-8"))
    mac = hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()[:16]
    return f"{body}.{_b64(mac)}"


def verify_token(secret: bytes, token: str, now: float | None = None) -> ChipRef:
    """The chip a token names; any forged, altered, malformed or expired token is the same 404."""
    m = _TOKEN_RE.match(token)
    if m is None:
        raise NotFoundError("no such chip (unknown or expired link)")
    body, mac = m.groups()
    expected = hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(_b64(expected), mac):
        raise NotFoundError("no such chip (unknown or expired link)")
    user, scene_id, band, lon, lat, size_m, expires = json.loads(_unb64(body))
    ref = ChipRef(str(user), int(scene_id), str(band), float(lon), float(lat), float(size_m), int(expires))
    if ref.expires < (time.time() if now is None else now):
        raise NotFoundError("no such chip (unknown or expired link)")
    return ref


# --- parameters ----------------------------------------------------------------------------------


def _day(p: Params, name: str) -> date:
    value = p.required_text(name)
    if not _DATE_RE.match(value):
        raise InvalidInputError(f"parameter {name!r} must be a date YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInputError(f"parameter {name!r} is not a valid date") from exc


def _period(p: Params) -> tuple[datetime, datetime]:
    """[start, end) in UTC; ``end_date`` is included whole, as the JRC client passes days."""
    start, end = _day(p, "start_date"), _day(p, "end_date")
    if end < start:
        raise InvalidInputError("parameter 'end_date' must not be before 'start_date'")
    lo = datetime.combine(start, datetime.min.time(), tzinfo=UTC)
    return lo, datetime.combine(end, datetime.min.time(), tzinfo=UTC) + timedelta(days=1)


def _band(name: str, parameter: str) -> str:
    band = normalize_band(name)
    if band == "SC":  # JRC's two-character SCL
        band = "SCL"
    if band not in S2_BANDS:
        raise InvalidInputError(f"parameter {parameter!r} must name Sentinel-2 L2A bands ({', '.join(S2_BANDS)})")
    return band


def _point(p: Params) -> tuple[float, float]:
    return p.number("lon"), p.number("lat")


# --- database ------------------------------------------------------------------------------------


def _authorize_point(call: Call, lon: float, lat: float) -> None:
    """403 unless an AOI the caller is granted contains the point (admins: anywhere)."""
    if call.user.is_admin:
        return
    call.cur.execute(
        "SELECT EXISTS (SELECT 1 FROM aois a WHERE a.name = ANY(%(aois)s)"
        " AND ST_Intersects(a.geom, ST_SetSRID(ST_MakePoint(%(lon)s, %(lat)s), 4326)))",
        {"aois": sorted(call.user.grants), "lon": lon, "lat": lat},
    )
    if not call.cur.fetchone()[0]:
        log.info("auth.denied", user=call.user.name, lon=lon, lat=lat)
        raise PermissionDeniedError("the location is outside every area granted to the caller")


@dataclass(frozen=True)
class Scene:
    id: int
    product_name: str
    acquired_at: datetime
    location: str
    store_profile: str = ""


def _scenes(call: Call, lon: float, lat: float, period: tuple[datetime, datetime], limit: int) -> list[Scene]:
    """S2 scenes over the point in the period, oldest first; more than ``limit`` is a 400.

    JRC answered ``{}`` above its cap; a client cannot tell that from "no scenes", so the caller
    is told to narrow the dates instead.
    """
    call.cur.execute(
        "SELECT id, product_name, acquired_at, location, coalesce(store_profile, '') FROM scenes"
        " WHERE card = 's2' AND ST_Intersects(footprint, ST_SetSRID(ST_MakePoint(%(lon)s, %(lat)s), 4326))"
        " AND acquired_at >= %(lo)s AND acquired_at < %(hi)s ORDER BY acquired_at, id LIMIT %(n)s",
        {"lon": lon, "lat": lat, "lo": period[0], "hi": period[1], "n": limit + 1},
    )
    rows = [Scene(int(r[0]), str(r[1]), r[2], str(r[3]), str(r[4])) for r in call.cur.fetchall()]
    if len(rows) > limit:
        raise InvalidInputError(f"more than {limit} scenes match; narrow start_date/end_date")
    return rows


@lru_cache(maxsize=256)
def _product(location: str, profile: str = "") -> S2Product:
    """The product at a scene location, local or ``s3://`` (read in place, like the worker does),
    through the scene's store profile.

    Products are immutable once catalogued: parsing their XML (and, on S3, listing their keys) on
    every request is wasted work. A failure is not cached, so a store that was down is retried.
    """
    with store.using_profile(profile):
        return open_s2_product(store.product_files(location))


def _readable(scene: Scene, bands: tuple[str, ...]) -> S2Product | None:
    """The scene's product if it and every band exist (any processing status), else None.

    An unreachable store is not "unreadable": it raises :class:`cbmflow.store.StoreUnavailable`
    (HTTP 503), since leaving every scene out would tell the caller there is no imagery.
    """
    try:
        product = _product(scene.location, scene.store_profile)
        for band in bands:
            product.band_path(band)
    except store.StoreUnavailable:
        raise
    except (OSError, ValueError) as exc:
        log.info("chips.unreadable", scene_id=scene.id, error=str(exc)[:200])
        return None
    return product


# --- reading -------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _to_raster(epsg: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(4326, epsg, always_xy=True)


def _window(src: Any, lon: float, lat: float, size_m: float) -> Any:
    """The pixel-aligned square of about ``size_m`` centred on the pixel that holds the point."""
    from rasterio.windows import Window

    x, y = _to_raster(src.crs.to_string()).transform(lon, lat)
    col, row = ~src.transform @ (x, y)
    n = max(1, round(size_m / abs(src.transform.a)))
    return Window(math.floor(col) - n // 2, math.floor(row) - n // 2, n, n)


def _read(src: Any, window: Any, fill: int, out_shape: tuple[int, int] | None = None) -> npt.NDArray[Any]:
    from rasterio.enums import Resampling

    inside = (
        window.col_off >= 0
        and window.row_off >= 0
        and window.col_off + window.width <= src.width
        and window.row_off + window.height <= src.height
    )
    # A boundless read goes through a VRT; only pay for it at the edge of the raster.
    return np.asarray(
        src.read(
            1,
            window=window,
            boundless=not inside,
            fill_value=fill,
            out_shape=out_shape,
            resampling=Resampling.nearest,
        )
    )


def raw_chip(product: S2Product, band: str, lon: float, lat: float, size_m: float) -> bytes:
    """A GeoTIFF of the band's own pixels (DN, native grid and CRS) around the point."""
    import rasterio
    from rasterio.io import MemoryFile

    path = product.band_path(band)
    with store.gdal_env(path), rasterio.open(path) as src:
        window = _window(src, lon, lat, size_m)
        data = _read(src, window, product.nodata_dn)
        profile = {
            "driver": "GTiff",
            "width": int(window.width),
            "height": int(window.height),
            "count": 1,
            "dtype": data.dtype.name,
            "crs": src.crs,
            "transform": src.window_transform(window),
            "nodata": product.nodata_dn,
            "compress": "deflate",
        }
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(data, 1)
            dst.update_tags(PRODUCT=product.product_name, BAND=band)
        return bytes(mem.read())


def _stretch(data: npt.NDArray[Any], nodata: int, lo_pct: float, hi_pct: float) -> npt.NDArray[np.uint8]:
    valid = data[data != nodata]
    if valid.size == 0:
        return np.zeros(data.shape, np.uint8)
    lo, hi = (float(v) for v in np.percentile(valid, [lo_pct, hi_pct]))
    scaled = (data.astype(np.float64) - lo) / max(hi - lo, 1e-9) * 255.0
    out = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    out[data == nodata] = 0
    return out


def rgb_png(product: S2Product, bands: tuple[str, str, str], lon: float, lat: float, lut: tuple[float, float]) -> bytes:
    """A 128 px RGB PNG of 1280 m around the point, each band stretched between two percentiles."""
    import rasterio
    from PIL import Image

    planes = []
    for band in bands:
        path = product.band_path(band)
        with store.gdal_env(path), rasterio.open(path) as src:
            window = _window(src, lon, lat, RGB_SIZE_M)
            data = _read(src, window, product.nodata_dn, out_shape=(RGB_PIXELS, RGB_PIXELS))
        planes.append(_stretch(data, product.nodata_dn, *lut))
    buf = io.BytesIO()
    Image.fromarray(np.dstack(planes), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


# --- routes --------------------------------------------------------------------------------------


def _limit(settings: ApiSettings) -> int:
    return max(1, settings.chip_limit)


def raw_chip_by_location(request: Request, p: Params) -> Response:
    """JRC ``rawChipByLocation``: one GeoTIFF link per scene, or with ``onlylist`` the product ids."""
    with authenticated(request) as call:
        lon, lat = _point(p)
        period = _period(p)
        band = _band(p.text("band") or "B08", "band")
        size_m = p.number("chipsize")
        p.choice("plevel")
        onlylist = p.boolean("onlylist")
        _authorize_point(call, lon, lat)
        scenes = _scenes(call, lon, lat, period, _limit(call.state.settings))
        readable = [(s, prod) for s in scenes if (prod := _readable(s, (band,))) is not None]
        if onlylist:
            return ApiJSONResponse({"chips": [s.product_name for s, _ in readable]})
        ttl = max(1, call.state.settings.chip_ttl_s)
        expires = int(time.time()) + ttl
        dates, chips = [], []
        for scene, _ in readable:
            token = sign(call.state.chip_secret, ChipRef(call.user.name, scene.id, band, lon, lat, size_m, expires))
            dates.append(scene.acquired_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S"))
            chips.append(f"/chips/{token}/{scene.product_name}.{band}.tif")
        return ApiJSONResponse({"dates": dates, "chips": chips})


def chip(request: Request, p: Params) -> Response:
    """``GET /chips/<token>/<name>`` without credentials: the token is the credential."""
    state = state_of(request)
    ref = verify_token(state.chip_secret, p.raw("token") or "")
    with state.pool.cursor() as cur:
        cur.execute(
            "SELECT s.location, s.product_name, u.is_admin OR EXISTS (SELECT 1 FROM user_grants g"
            " JOIN aois a ON a.name = g.aoi WHERE g.user_name = u.name"
            " AND ST_Intersects(a.geom, ST_SetSRID(ST_MakePoint(%(lon)s, %(lat)s), 4326)))"
            " , coalesce(s.store_profile, '') FROM scenes s, users u WHERE s.id = %(scene)s AND u.name = %(user)s",
            {"scene": ref.scene_id, "user": ref.user, "lon": ref.lon, "lat": ref.lat},
        )
        row = cur.fetchone()
    # A deleted user, a revoked grant or a removed scene turn the link dead, like a bad signature.
    if row is None or not row[2] or p.raw("name") != f"{row[1]}.{ref.band}.tif":
        raise NotFoundError("no such chip (unknown or expired link)")
    profile = str(row[3])
    try:
        product = _product(str(row[0]), profile)
        with store.using_profile(profile):
            body = raw_chip(product, ref.band, ref.lon, ref.lat, ref.size_m)
    except store.StoreUnavailable:
        raise
    except (OSError, ValueError) as exc:
        import rasterio.errors

        if isinstance(exc, rasterio.errors.RasterioIOError) and store.is_s3(str(row[0])):
            # GDAL's error does not say whose fault it was; one HEAD of the object does.
            with store.using_profile(profile):
                failure = store.read_failure(product.band_path(ref.band), exc)
            if isinstance(failure, store.StoreUnavailable):
                raise failure from exc
        log.warning("chips.unreadable", scene_id=ref.scene_id, error=str(exc)[:200])
        raise NotFoundError("the product of this chip is no longer readable") from exc
    return Response(body, media_type="image/tiff", headers={"Cache-Control": "private, max-age=3600"})


def chips_by_location(request: Request, p: Params) -> Response:
    """JRC ``chipsByLocation``: an HTML page of RGB PNG chips (128 px, 1280 m), images inlined.

    The PNGs are ``data:`` URIs, so the page needs no further (authenticated) request to show.
    """
    with authenticated(request) as call:
        lon, lat = _point(p)
        period = _period(p)
        lut_text = p.text("lut") or "5_95"
        m = _LUT_RE.match(lut_text)
        lut = (float(m.group(1)), float(m.group(2))) if m else (-1.0, -1.0)
        if not 0 <= lut[0] < lut[1] <= 100:
            raise InvalidInputError("parameter 'lut' must be two percentiles LOW_HIGH with 0 <= LOW < HIGH <= 100")
        names = (p.text("bands") or "B08_B04_B03").split("_")
        if len(names) != 3:
            raise InvalidInputError("parameter 'bands' must be three bands joined by '_', such as B08_B04_B03")
        bands = (_band(names[0], "bands"), _band(names[1], "bands"), _band(names[2], "bands"))
        p.choice("plevel")
        _authorize_point(call, lon, lat)
        scenes = _scenes(call, lon, lat, period, _limit(call.state.settings))
        figures = []
        for scene in scenes:
            product = _readable(scene, bands)
            if product is None:
                continue
            with store.using_profile(scene.store_profile):
                png = base64.b64encode(rgb_png(product, bands, lon, lat, lut)).decode("ascii")
            when = scene.acquired_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            figures.append(
                f'<figure><img alt="{html.escape(scene.product_name)}" width="{RGB_PIXELS}" height="{RGB_PIXELS}"'
                f' src="data:image/png;base64,{png}"><figcaption>{html.escape(when)} UTC</figcaption></figure>'
            )
    title = html.escape(f"{'/'.join(bands)} chips at {lon:.5f}, {lat:.5f}")
    body = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        "<style>figure{display:inline-block;margin:4px;font:12px sans-serif}</style></head>"
        f"<body><h1>{title}</h1>{''.join(figures) or '<p>no scenes</p>'}</body></html>"
    )
    return HTMLResponse(body)


def routes() -> list[Endpoint]:
    """The chip router: the two JRC chip routes and the signed chip URLs they hand out."""
    dates = {"type": "array", "items": {"type": "string", "pattern": "^\\d{8}T\\d{6}$"}}
    return [
        Endpoint(
            "/query/rawChipByLocation",
            raw_chip_by_location,
            "Sentinel-2 GeoTIFF chips around a point: signed, expiring chip URLs, or product ids (JRC)",
            json_content(
                {
                    "type": "object",
                    "required": ["chips"],
                    "properties": {"dates": dates, "chips": {"type": "array", "items": STR}},
                }
            ),
            RAW_CHIPS,
            found=False,
            tag="jrc",
        ),
        Endpoint(
            "/query/chipsByLocation",
            chips_by_location,
            "HTML page of 128 px RGB PNG chips (1280 m) around a point (JRC)",
            {"text/html": {"schema": STR}},
            RGB_CHIPS,
            found=False,
            tag="jrc",
        ),
        Endpoint(
            "/chips/{token}/{name}",
            chip,
            "one chip by its signed URL from rawChipByLocation (no credentials: the token is one)",
            {"image/tiff": {"schema": BINARY}},
            CHIP,
            auth=False,
            tag="jrc",
        ),
    ]
