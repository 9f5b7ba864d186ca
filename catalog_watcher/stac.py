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
_PRODUCT_RE = re.compile(r"^(S[12][ABCD])_([A-Z0-9]+)_")


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


def _href_location(item: pystac.Item) -> str:
    """Where the product lives: the ``product`` asset, else the ``.SAFE`` root of any band asset."""
    asset = item.assets.get("product")
    if asset is not None:
        return _absolute(asset.get_absolute_href() or asset.href)
    for a in item.assets.values():
        href = a.get_absolute_href() or a.href
        if ".SAFE" in href:
            return _absolute(href[: href.index(".SAFE") + len(".SAFE")])
    raise InvalidInputError(f"item {item.id}: no product asset and no .SAFE asset href")


def _absolute(href: str) -> str:
    parsed = urlparse(href)
    if parsed.scheme in ("", "file"):
        return str(Path(parsed.path if parsed.scheme else href).resolve())
    return href


def to_record(item: pystac.Item, collection: str | None = None) -> SceneRecord:
    coll = collection or item.collection_id or ""
    card = _COLLECTION_CARD.get(coll)
    if card is None:
        raise InvalidInputError(f"item {item.id}: unsupported collection {coll!r}")
    if item.geometry is None:
        raise InvalidInputError(f"item {item.id}: no geometry")
    when = item.datetime or (item.common_metadata.start_datetime if item.common_metadata else None)
    if when is None:
        raise InvalidInputError(f"item {item.id}: no datetime")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    name = str(item.properties.get("s2:product_uri") or item.id).removesuffix(".SAFE")
    m = _PRODUCT_RE.match(name)
    mission = m.group(1) if m else str(item.properties.get("platform", "")).upper()[:3]
    sensor = m.group(2) if m else str(item.properties.get("instruments", [""])[0]).upper()
    updated = str(item.properties.get("updated") or item.properties.get("created") or "")
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
    )


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


def _iter_static(url: str, collections: list[str], aoi: BaseGeometry, start: datetime | None) -> Iterator[SceneRecord]:
    root = pystac.read_file(url)
    if not isinstance(root, pystac.Catalog):
        raise InvalidInputError(f"{url} is not a STAC catalog or collection")
    for item in root.get_items(recursive=True):
        coll = item.collection_id or ""
        if collections and coll not in collections:
            continue
        rec = to_record(item, coll)
        if start is not None and rec.acquired_at < start:
            continue
        if rec.footprint.intersects(aoi):
            yield rec
