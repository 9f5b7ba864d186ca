"""Read scenes from a STAC source: a STAC API (searched through pystac-client, which pages
lazily) or a static catalogue tree (walked with pystac).

Input is normalised once, here at the boundary, into :class:`SceneRecord`, so the rest of the
watcher never sees a pystac object.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pystac
import shapely
import shapely.geometry
from shapely.geometry.base import BaseGeometry

from cbmflow.errors import InvalidInputError

_COLLECTION_CARD = {
    "sentinel-2-l2a": "s2",
    "sentinel-2-c1-l2a": "s2",
    "sentinel-1-card-bs": "bs",
    "sentinel-1-card-c6": "c6",
}
_COLLECTION_CARD_INPUT = {"sentinel-1-grd": "grd", "sentinel-1-slc": "slc"}
"""Collections whose products are inputs of CARD generation (recorded in ``card_inputs``)."""
PRODUCT_RE = re.compile(r"^(S[12][ABCD])_([A-Z0-9]+)_")
_S2_NAME_RE = re.compile(r"^(S2[ABCD])_(MSIL[12][AC])_(\d{8}T\d{6})_N(\d{4})_R(\d{3})_T(\w{5})(?:_\d{8}T\d{6})?$")


_S1_NAME_RE = re.compile(
    r"^(S1[ABCD])_(IW|EW|SM|WV|S[1-6])_(GRD[FHM]|SLC_)_(\d)S(\w\w)_(\d{8}T\d{6})_(\d{8}T\d{6})_(\d{6})_(\w{6})_(\w{4})"
)
# Absolute orbit → relative orbit (175 orbits a 12-day cycle); offsets from the Sentinel-1
# product specification. S1C/S1D: only from the catalogue's sat:relative_orbit.
_S1_ORBIT_OFFSET = {"S1A": 73, "S1B": 27}


def s1_name(name: str) -> str:
    """The SAFE product name of a Sentinel-1 product, whatever packaging the catalogue lists:
    ``.SAFE`` and CDSE's COG-GRD suffix ``_COG`` (``…_6FF8_COG.SAFE``) are dropped, so the SAFE and
    its COG conversion are one acquisition."""
    return name.removesuffix(".SAFE").removesuffix("_COG")


def s1_input_key(name: str, properties: dict[str, Any]) -> tuple[str, str, int | None]:
    """(acquisition key, product type, relative orbit) of a Sentinel-1 GRD/SLC product.

    The key is mission, mode, product type, relative orbit and start of sensing
    (``S1A_IW_GRDH_R059_20210809T173953``): the product's unique id (last four characters) and the
    packaging change between a reprocessing, a COG conversion and a second catalogue, the
    acquisition does not. Raises when the name is not a Sentinel-1 Level-1 name.
    """
    m = _S1_NAME_RE.match(s1_name(name))
    if m is None:
        raise InvalidInputError(f"product {name}: not a Sentinel-1 GRD/SLC product name")
    mission, mode, ptype, _level, _pol, start, _stop, absolute, _datatake, _uid = m.groups()
    rel_raw = properties.get("sat:relative_orbit")
    if rel_raw is not None and str(rel_raw).strip():
        rel: int | None = int(rel_raw)
    elif mission in _S1_ORBIT_OFFSET:
        rel = (int(absolute) - _S1_ORBIT_OFFSET[mission]) % 175 + 1
    else:
        rel = None
    where = f"R{rel:03d}" if rel is not None else f"O{absolute}"
    return f"{mission}_{mode}_{ptype.rstrip('_')}_{where}_{start}", f"{mode}_{ptype}", rel


def acquisition_key(name: str, card: str, mission: str, when: datetime, properties: dict[str, Any]) -> tuple[str, int]:
    """The data identity of a product and its processing baseline.

    The key names the acquisition, not the catalogue entry: CDSE gives a reprocessed product a new
    id and path, earth-search lists one acquisition in two collections, and ``updated`` moves
    without the data changing, so none of those may make a second scene. For Sentinel-2 the SAFE
    name carries everything (mission, level, datatake sensing time, relative orbit, tile) and the
    baseline is dropped from the key; other products are keyed on mission, card, relative orbit
    (or tile) and acquisition time to the second.
    """
    m = _S2_NAME_RE.match(name)
    if m:
        mission_, level, sensing, baseline, orbit, tile = m.groups()
        return f"{mission_}_{level}_{sensing}_R{orbit}_T{tile}", int(baseline)
    raw = str(properties.get("s2:processing_baseline") or properties.get("processing:baseline") or "")
    try:
        baseline_n = int(round(float(raw) * 100)) if raw else 0
    except ValueError:
        baseline_n = 0
    where = properties.get("s2:mgrs_tile") or properties.get("grid:code")
    if not where and properties.get("sat:relative_orbit") is not None:
        where = f"R{int(properties['sat:relative_orbit']):03d}"
    if not where:
        return name, baseline_n
    return f"{mission}_{card}_{where}_{when.astimezone(UTC):%Y%m%dT%H%M%S}", baseline_n


@dataclass(frozen=True)
class SceneRecord:
    product_id: str
    product_name: str
    mission: str
    sensor: str
    card: str
    acquired_at: datetime
    footprint: BaseGeometry
    location: str
    updated: str
    acq_key: str = ""
    """Data identity (see :func:`acquisition_key`); empty = derived from ``product_id``."""
    baseline: int = 0
    """Processing baseline as an integer (``N0510`` / ``05.10`` → 510); 0 = unknown."""
    checksum: str = ""
    """The catalogue's content checksum when it gives one (OData ``Checksum``)."""
    published: datetime | None = None
    """When the catalogue published the product (the incremental cursor's time)."""
    collection: str = ""
    relative_orbit: int | None = None
    """Sentinel-1 CARD inputs (``card`` ``grd``/``slc``): the relative orbit of the key."""

    @property
    def key(self) -> str:
        return self.acq_key or self.product_id

    @property
    def is_card_input(self) -> bool:
        """A Sentinel-1 GRD/SLC product: recorded in ``card_inputs``, never extracted itself."""
        return self.card in _COLLECTION_CARD_INPUT.values()


@dataclass(frozen=True)
class Rejected:
    item_id: str
    collection: str
    reason: str
    published: datetime | None = None


@dataclass(frozen=True)
class Offline:
    """A product the catalogue lists but cannot serve yet (OData ``Online: false``)."""

    item_id: str
    collection: str
    published: datetime | None = None


Candidate = SceneRecord | Rejected | Offline


def _href_location(item: pystac.Item) -> str:
    """Where the product lives: the ``product`` asset, else the ``.SAFE`` root of any band asset."""
    asset = item.assets.get("product")
    if asset is not None:
        return _absolute(asset.get_absolute_href() or asset.href)
    for a in item.assets.values():
        href = a.get_absolute_href() or a.href
        if ".SAFE" in href:
            return _absolute(href[: href.index(".SAFE") + len(".SAFE")])
    # Per-band COG products (earth-search): the product is the Item itself; the worker reads its
    # assets (and their raster:bands offset/scale) from the Item JSON at this href.
    self_href = item.get_self_href()
    if self_href and any(a.href.endswith((".tif", ".tiff")) for a in item.assets.values()):
        return _absolute(self_href)
    raise InvalidInputError(f"item {item.id}: no product asset, no .SAFE asset href and no COG assets")


def _absolute(href: str) -> str:
    parsed = urlparse(href)
    if parsed.scheme in ("", "file"):
        return str(Path(parsed.path if parsed.scheme else href).resolve())
    return href


def _input_location(item: pystac.Item) -> str:
    """Where a Sentinel-1 input lives: the ``.SAFE`` root of its assets (CDSE), else the product
    folder of its measurement assets (earth-search: ``…/<name>/measurement/…``, no ``.SAFE``),
    else as for scenes. The product folder comes first because CARD generation reads the SAFE
    layout (annotation, calibration, measurement), not the Item JSON."""
    hrefs = [a.get_absolute_href() or a.href for a in item.assets.values()]
    for href in hrefs:
        if ".SAFE" in href:
            return _absolute(href[: href.index(".SAFE") + len(".SAFE")])
    for href in hrefs:
        if "/measurement/" in href:
            return _absolute(href[: href.index("/measurement/")])
    return _href_location(item)


def to_record(item: pystac.Item, collection: str | None = None) -> SceneRecord:
    coll = collection or item.collection_id or ""
    card = _COLLECTION_CARD.get(coll) or _COLLECTION_CARD_INPUT.get(coll)
    if card is None:
        raise InvalidInputError(f"item {item.id}: unsupported collection {coll!r}")
    if card in _COLLECTION_CARD_INPUT.values():
        return _input_record(item, coll, card)
    if item.geometry is None:
        raise InvalidInputError(f"item {item.id}: no geometry")
    when = item.datetime or (item.common_metadata.start_datetime if item.common_metadata else None)
    if when is None:
        raise InvalidInputError(f"item {item.id}: no datetime")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    name = str(item.properties.get("s2:product_uri") or item.id).removesuffix(".SAFE")
    m = PRODUCT_RE.match(name)
    mission = m.group(1) if m else str(item.properties.get("platform", "")).upper()[:3]
    sensor = m.group(2) if m else str(item.properties.get("instruments", [""])[0]).upper()
    updated = str(item.properties.get("updated") or item.properties.get("created") or "")
    key, baseline = acquisition_key(name, card, mission, when, item.properties)
    published = parse_time(item.properties.get("published") or item.properties.get("created"))
    return SceneRecord(
        product_id=item.id.removesuffix(".SAFE"),
        product_name=name,
        mission=mission,
        sensor=sensor,
        card=card,
        acquired_at=when,
        footprint=shapely.geometry.shape(item.geometry),
        location=_href_location(item),
        updated=updated,
        acq_key=key,
        baseline=baseline,
        checksum=str(item.properties.get("file:checksum") or ""),
        published=published,
        collection=coll,
    )


def _input_record(item: pystac.Item, coll: str, card: str) -> SceneRecord:
    """A Sentinel-1 GRD/SLC item: a CARD input, keyed per acquisition like the scenes."""
    if item.geometry is None:
        raise InvalidInputError(f"item {item.id}: no geometry")
    when = item.datetime or (item.common_metadata.start_datetime if item.common_metadata else None)
    if when is None:
        raise InvalidInputError(f"item {item.id}: no datetime")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    name = s1_name(str(item.properties.get("s1:product_uri") or item.id))
    key, ptype, rel = s1_input_key(name, item.properties)
    return SceneRecord(
        product_id=item.id.removesuffix(".SAFE"),
        product_name=name,
        mission=name[:3],
        sensor=ptype,
        card=card,
        acquired_at=when,
        footprint=shapely.geometry.shape(item.geometry),
        location=_input_location(item),
        updated=str(item.properties.get("updated") or item.properties.get("created") or ""),
        acq_key=key,
        checksum=str(item.properties.get("file:checksum") or ""),
        published=parse_time(item.properties.get("published") or item.properties.get("created")),
        collection=coll,
        relative_orbit=rel,
    )


def parse_time(value: object) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _is_static(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("", "file") or url.endswith(".json")


def iter_scenes(
    catalog_url: str,
    collections: list[str],
    aoi: BaseGeometry,
    lookback_days: int,
    page_size: int = 100,
    now: datetime | None = None,
) -> Iterator[SceneRecord]:
    """Scenes intersecting ``aoi`` (EPSG:4326) acquired within the lookback window.

    STAC has no publication-time filter, so the watcher re-scans a ``datetime`` lookback window
    every time and relies on the idempotent upsert to publish nothing twice.
    """
    start = (now or datetime.now(UTC)) - timedelta(days=lookback_days) if lookback_days > 0 else None
    if _is_static(catalog_url):
        yield from _iter_static(catalog_url, collections, aoi, start)
        return
    from pystac_client import Client

    client = Client.open(catalog_url)
    dt: Any = f"{start.isoformat().replace('+00:00', 'Z')}/.." if start else None
    search = client.search(
        collections=collections,
        intersects=shapely.geometry.mapping(aoi),
        datetime=dt,
        limit=page_size,
        sortby=[{"field": "properties.datetime", "direction": "asc"}],
    )
    for item in search.items():
        yield to_record(item)


def iter_static_items(url: str) -> Iterator[pystac.Item]:
    root = pystac.read_file(url)
    if not isinstance(root, pystac.Catalog):
        raise InvalidInputError(f"{url} is not a STAC catalog or collection")
    yield from root.get_items(recursive=True)


def _iter_static(url: str, collections: list[str], aoi: BaseGeometry, start: datetime | None) -> Iterator[SceneRecord]:
    for item in iter_static_items(url):
        coll = item.collection_id or ""
        if collections and coll not in collections:
            continue
        rec = to_record(item, coll)
        if start is not None and rec.acquired_at < start:
            continue
        if rec.footprint.intersects(aoi):
            yield rec
