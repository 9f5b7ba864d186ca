"""Sentinel-2 L2A as per-band COG assets of a STAC Item (Element84 earth-search), read as the SAFE is.

earth-search publishes L2A not as a ``.SAFE`` but as one Cloud-Optimized GeoTIFF per band, each an
asset of the Item (``blue``, ``green``, ``red``, ``nir``, ``rededge1..3``, ``nir08``, ``nir09``,
``coastal``, ``swir16``, ``swir22``, ``scl``, ...) with a ``raster:bands`` entry giving ``nodata``,
``scale`` and ``offset``. cbmflow stores reflectance in **DN with the product's offset applied**
(``DN + BOA_ADD_OFFSET``, i.e. reflectance × 10000; see docs/extraction.md), so this module
resolves, per band, the integer to add to a valid COG DN to reach those units. That number is
*not* always ``offset / scale``, because the two earth-search collections encode DN differently:

* ``sentinel-2-c1-l2a`` (Collection 1, baseline >= 05.00): the COG holds ESA's DN unchanged, so
  ``reflectance = DN × scale + offset`` with ``scale 0.0001, offset -0.1``: add ``offset / scale``
  (-1000), exactly as the SAFE's ``BOA_ADD_OFFSET``. These items carry no
  ``earthsearch:boa_offset_applied`` property.
* ``sentinel-2-l2a`` with ``earthsearch:boa_offset_applied: true``: Element84 already subtracted the
  offset when converting the JP2 to COG (DN = reflectance × 10000, as before baseline 04.00), but
  the asset still declares ``offset: -0.1`` (copied from the JP2 it was made from; the same item's
  ``*-jp2`` assets declare the same numbers, rightly). Add 0; applying -0.1 again would bias every
  reflectance by -0.1.
* ``sentinel-2-l2a`` with ``earthsearch:boa_offset_applied: false``: before baseline 04.00 there is
  no offset at all (add 0). From 04.00 on the flag is known to be wrong on many items (the pixels
  were shifted although the flag says not: Element84/earth-search#66, #71,
  cirrus-geo/cirrus-earth-search#33), so such an item is refused (``ValueError``) rather than read
  with a guess that is off by 0.1 reflectance: read the same acquisition from ``sentinel-2-c1-l2a``
  or the SAFE.

A declared ``scale`` other than 1/10000 is refused too (the stored units would change), as is a
reflectance asset whose offset is not a whole number of DN. SCL carries classes: no offset.

This module only parses the Item (a mapping, plus the href it was read from so relative asset hrefs
resolve); fetching the JSON and opening the pixels are the caller's (the worker opens ``s3://``
hrefs through its store's GDAL environment). Imports nothing of cbmflow's.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from card.s2 import NATIVE_RESOLUTION_M, MissingBandError, normalize_band

EARTH_SEARCH_ASSETS: Mapping[str, str] = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "swir16": "B11",
    "swir22": "B12",
    "scl": "SCL",
}
"""earth-search v1 asset key → L2A band. Asset keys named by band (``B04``, ``SCL``: earth-search v0,
other catalogues) are understood as well."""

OFFSET_APPLIED = "earthsearch:boa_offset_applied"
QUANTIFICATION_VALUE = 10000
_OFFSET_BASELINE = (4, 0)
_CLASS_BANDS = frozenset({"SCL"})
_ITEM_TILE_RE = re.compile(r"_T?(?P<tile>\d{2}[A-Z]{3})_")


@dataclass(frozen=True)
class CogBand:
    """One band asset: the href as published, its no-data DN and the DN offset to cbmflow's units."""

    band: str
    href: str
    nodata: int
    offset_dn: int


@dataclass(frozen=True)
class S2CogProduct:
    """One L2A acquisition as COG assets (see the module docstring)."""

    item_id: str
    collection: str | None
    product_name: str
    """The SAFE name without ``.SAFE`` when the Item names it (``s2:product_uri``), else the Item id,
    so rows from the COG product and the SAFE of one acquisition carry the same product name."""
    mission: str
    sensing_time: datetime
    tile_id: str
    epsg: int
    processing_baseline: str | None
    offset_applied: bool | None
    bands: Mapping[str, CogBand] = field(hash=False, repr=False)

    def band_href(self, band: str) -> str:
        """The asset href of ``band`` (resolved against the Item's own href); missing: MissingBandError."""
        name = normalize_band(band)
        found = self.bands.get(name)
        if found is None:
            raise MissingBandError(name, Path(self.item_id), "is not an asset of the STAC item")
        return found.href

    def reflectance_offset(self, band: str) -> int:
        """The integer to add to a valid DN of ``band`` to store reflectance × 10000 (0 for SCL)."""
        name = normalize_band(band)
        found = self.bands.get(name)
        if found is None:
            raise MissingBandError(name, Path(self.item_id), "is not an asset of the STAC item")
        return found.offset_dn

    def nodata(self, band: str) -> int:
        return self.bands[normalize_band(band)].nodata


def is_item_location(location: str) -> bool:
    """Whether a scene location names a STAC Item document rather than a product on disk.

    An Item is a ``.json`` document (local, ``file://``, ``s3://``) or any ``http(s)://`` URL (a STAC
    API serves ``.../collections/<c>/items/<id>`` without a suffix; a SAFE is never read over HTTP).
    """
    if urlparse(location).scheme in ("http", "https"):
        return True
    return location.rstrip("/").lower().endswith((".json", ".geojson"))


def gdal_href(href: str) -> str:
    """The path GDAL opens for an asset href: ``/vsicurl/`` for HTTP(S), the path for ``file://``;
    anything else (``s3://`` included: the caller maps it into its store's ``/vsis3/``) as is."""
    parsed = urlparse(href)
    if parsed.scheme in ("http", "https"):
        return f"/vsicurl/{href}"
    if parsed.scheme == "file":
        return parsed.path
    return href


def resolve_href(href: str, item_href: str | None) -> str:
    """An asset href made absolute against the Item's own location (local path or URL)."""
    if urlparse(href).scheme or os.path.isabs(href) or not item_href:
        return href
    scheme = urlparse(item_href).scheme
    if scheme == "s3":  # urljoin does not resolve relative references for s3://
        return f"{item_href.rsplit('/', 1)[0]}/{posixpath.normpath(href)}"
    if scheme in ("http", "https", "file"):
        return urljoin(item_href, href)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(item_href)), href))


def load_item(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A local Item document (``FileNotFoundError`` if absent, ``ValueError`` if not an Item)."""
    return parse_item_bytes(Path(path).read_bytes(), str(path))


def parse_item_bytes(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not a JSON document ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("type") != "Feature" or not isinstance(doc.get("assets"), dict):
        raise ValueError(f"{where}: not a STAC Item (a Feature with assets)")
    return doc


def open_s2_cog_item(item: Mapping[str, Any], item_href: str | None = None) -> S2CogProduct:
    """Resolve an earth-search-shaped L2A Item into :class:`S2CogProduct`.

    ``ValueError`` for an Item that is not an L2A COG product or whose radiometry cannot be told
    (see the module docstring); both are permanent, per-product failures.
    """
    item_id = str(item.get("id") or "")
    where = item_href or item_id or "STAC item"
    props = item.get("properties")
    if not isinstance(props, Mapping):
        raise ValueError(f"{where}: item has no properties")
    baseline = _baseline(props)
    applied = props.get(OFFSET_APPLIED)
    if applied is not None and not isinstance(applied, bool):
        raise ValueError(f"{where}: {OFFSET_APPLIED} is {applied!r}, not a boolean")
    bands: dict[str, CogBand] = {}
    for key, asset in dict(item.get("assets") or {}).items():
        band = _band_of(key)
        if band is None or not isinstance(asset, Mapping) or not asset.get("href"):
            continue
        media = str(asset.get("type") or "")
        if media and "tiff" not in media.lower():
            continue  # the ``*-jp2`` twins of a sentinel-2-l2a item: same band, other product model
        if band in bands:
            raise ValueError(f"{where}: two COG assets for band {band}")
        bands[band] = _cog_band(band, asset, props, baseline, where, item_href)
    if not bands:
        raise ValueError(f"{where}: no Sentinel-2 band assets (COG) in the item")
    uri = str(props.get("s2:product_uri") or "")
    product_name = uri.removesuffix(".SAFE") if uri else item_id
    return S2CogProduct(
        item_id=item_id,
        collection=item.get("collection"),
        product_name=product_name,
        mission=_mission(props, item_id, where),
        sensing_time=_datetime(props, where),
        tile_id=_tile(props, item_id, where),
        epsg=_epsg(props, where),
        processing_baseline=None if baseline is None else f"{baseline[0]:02d}.{baseline[1]:02d}",
        offset_applied=applied,
        bands=bands,
    )


def _band_of(key: str) -> str | None:
    if key in EARTH_SEARCH_ASSETS:
        return EARTH_SEARCH_ASSETS[key]
    name = normalize_band(key)
    return name if name in NATIVE_RESOLUTION_M and name not in ("AOT", "WVP", "TCI") else None


def _cog_band(
    band: str, asset: Mapping[str, Any], props: Mapping[str, Any], baseline: tuple[int, int] | None, where: str,
    item_href: str | None,
) -> CogBand:  # fmt: skip
    rbs = asset.get("raster:bands") or [{}]
    rb = rbs[0] if isinstance(rbs, list) and rbs and isinstance(rbs[0], Mapping) else {}
    nodata = rb.get("nodata", 0)
    if nodata is None or not float(nodata).is_integer():
        raise ValueError(f"{where}: band {band} nodata {nodata!r} is not an integer DN")
    href = resolve_href(str(asset["href"]), item_href)
    if band in _CLASS_BANDS:
        return CogBand(band, href, int(nodata), 0)
    scale = float(rb.get("scale", 1.0 / QUANTIFICATION_VALUE))
    if not math.isclose(scale, 1.0 / QUANTIFICATION_VALUE, rel_tol=1e-9):
        raise ValueError(f"{where}: band {band} scale {scale} is not 1/{QUANTIFICATION_VALUE} (units would change)")
    declared = float(rb.get("offset", 0.0)) * QUANTIFICATION_VALUE
    if not math.isclose(declared, round(declared), abs_tol=1e-6):
        raise ValueError(f"{where}: band {band} offset {rb.get('offset')!r} is not a whole number of DN")
    applied = props.get(OFFSET_APPLIED)
    if applied is True or declared == 0:
        offset = 0  # already in the pixels (the declared offset describes the JP2 the COG was made from)
    elif applied is None:
        offset = round(declared)  # raster extension as written: sentinel-2-c1-l2a
    elif baseline is not None and baseline < _OFFSET_BASELINE:
        offset = 0  # no BOA_ADD_OFFSET before baseline 04.00
    else:
        raise ValueError(
            f"{where}: {OFFSET_APPLIED} is false at processing baseline "
            f"{props.get('s2:processing_baseline')!r} while band {band} declares offset {rb.get('offset')!r}; "
            "earth-search's flag is unreliable on such items (Element84/earth-search#66, #71), so the DN "
            "cannot be told apart: read this acquisition from sentinel-2-c1-l2a or the SAFE"
        )
    return CogBand(band, href, int(nodata), offset)


def _baseline(props: Mapping[str, Any]) -> tuple[int, int] | None:
    text = props.get("s2:processing_baseline") or props.get("processing:baseline")
    if not text:
        return None
    major, _, minor = str(text).strip().partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        raise ValueError(f"unparsable processing baseline {text!r}") from None


def _datetime(props: Mapping[str, Any], where: str) -> datetime:
    text = props.get("datetime")
    try:
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where}: unparsable datetime {text!r}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _mission(props: Mapping[str, Any], item_id: str, where: str) -> str:
    m = re.fullmatch(r"sentinel-2([a-d])", str(props.get("platform") or "").lower())
    if m:
        return f"S2{m.group(1).upper()}"
    m = re.match(r"S2[A-D]", item_id)
    if m:
        return m.group(0)
    raise ValueError(f"{where}: cannot tell the mission (platform {props.get('platform')!r})")


def _tile(props: Mapping[str, Any], item_id: str, where: str) -> str:
    if props.get("mgrs:utm_zone") and props.get("mgrs:latitude_band") and props.get("mgrs:grid_square"):
        return f"{int(props['mgrs:utm_zone']):02d}{props['mgrs:latitude_band']}{props['mgrs:grid_square']}"
    code = str(props.get("grid:code") or props.get("s2:mgrs_tile") or "")
    m = re.search(r"(\d{2}[A-Z]{3})$", code)
    if m:
        return m.group(1)
    m = _ITEM_TILE_RE.search(f"{item_id}_")
    if m:
        return m.group("tile")
    raise ValueError(f"{where}: cannot tell the MGRS tile")


def _epsg(props: Mapping[str, Any], where: str) -> int:
    if props.get("proj:epsg"):
        return int(props["proj:epsg"])
    m = re.fullmatch(r"EPSG:(\d+)", str(props.get("proj:code") or ""))
    if m:
        return int(m.group(1))
    raise ValueError(f"{where}: no proj:epsg / proj:code")
