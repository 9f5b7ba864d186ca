"""CDSE OData (``…/odata/v1/Products``) as a watcher source, with plain HTTP.

Paging is keyset on (``PublicationDate``, ``Id``), the server's own order: each page asks for
``PublicationDate ge`` the last date seen and drops what it already yielded at that date, so the
10 000 cap of ``$skip`` is never reached however many products a window holds. A full page of
products sharing one publication time is passed by asking once for a page of 1000 (the maximum). A collection is
written ``SENTINEL-2/S2MSI2A`` (``Collection/Name`` / ``productType``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import shapely
import shapely.geometry
from shapely.geometry.base import BaseGeometry

from catalog_watcher.http import PoliteSession
from catalog_watcher.stac import (
    PRODUCT_RE,
    Candidate,
    Offline,
    Rejected,
    SceneRecord,
    acquisition_key,
    parse_time,
    s1_input_key,
    s1_name,
)
from cbmflow.errors import InvalidInputError
from cbmflow.settings import SourceSettings, WatchSettings

_PRODUCT_TYPE_CARD = {"S2MSI2A": "s2"}
_PRODUCT_TYPE_CARD_INPUT = {"IW_GRDH_1S": "grd", "IW_GRDH_1S-COG": "grd", "IW_SLC__1S": "slc"}
"""Sentinel-1 product types recorded as CARD inputs (``card_inputs``), not extracted."""


def _odata_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_record(p: dict[str, Any], collection: str) -> SceneRecord:
    """One OData product → a record; raises on anything it cannot read."""
    name = str(p["Name"]).removesuffix(".SAFE")
    product_type = collection.partition("/")[2]
    card = _PRODUCT_TYPE_CARD.get(product_type) or _PRODUCT_TYPE_CARD_INPUT.get(product_type)
    if card is None:
        raise InvalidInputError(f"product {name}: unsupported product type {product_type!r}")
    relative_orbit: int | None = None
    when = parse_time(p["ContentDate"]["Start"])
    if when is None:
        raise InvalidInputError(f"product {name}: unreadable ContentDate/Start")
    footprint = shapely.geometry.shape(p["GeoFootprint"])
    if footprint.is_empty:
        raise InvalidInputError(f"product {name}: empty footprint")
    s3 = str(p.get("S3Path") or "")
    if not s3.startswith("/"):
        raise InvalidInputError(f"product {name}: no S3Path")
    m = PRODUCT_RE.match(name)
    if m is None:
        raise InvalidInputError(f"product {name}: not a Sentinel product name")
    if card in _PRODUCT_TYPE_CARD_INPUT.values():
        key, sensor, relative_orbit = s1_input_key(name, {})
        baseline = 0
    else:
        key, baseline = acquisition_key(name, card, m.group(1), when, {})
        sensor = m.group(2)
    checksums = p.get("Checksum") or []
    checksum = next((str(c.get("Value")) for c in checksums if c.get("Algorithm") == "MD5"), "")
    return SceneRecord(
        product_id=name,
        product_name=s1_name(name) if card in _PRODUCT_TYPE_CARD_INPUT.values() else name,
        mission=m.group(1),
        sensor=sensor,
        card=card,
        acquired_at=when,
        footprint=footprint,
        location="s3:/" + s3,
        updated=str(p.get("ModificationDate") or ""),
        acq_key=key,
        baseline=baseline,
        checksum=checksum,
        published=parse_time(p.get("PublicationDate")),
        collection=collection,
        relative_orbit=relative_orbit,
    )


class ODataSource:
    incremental = True

    def __init__(self, cfg: SourceSettings, watch: WatchSettings, stop: threading.Event | None = None) -> None:
        self.name = cfg.name
        self.store = cfg.store
        self.url = cfg.url.rstrip("/")
        self.collections = cfg.collections
        self.page_size = min(1000, watch.page_size)
        self.session: PoliteSession | None = PoliteSession(
            cfg.name,
            rate_per_s=cfg.rate_per_s,
            budget=cfg.request_budget,
            timeout_s=watch.request_timeout_s,
            max_retries=watch.max_retries,
            max_wait_s=watch.retry_max_wait_s,
            stop=stop,
        )

    def _filter(
        self, collection: str, aoi: BaseGeometry, published_since: datetime | None, acquired_since: datetime | None
    ) -> str:
        coll, _, product_type = collection.partition("/")
        parts = [f"Collection/Name eq '{coll}'"]
        if product_type:
            parts.append(
                "Attributes/OData.CSC.StringAttribute/any(att:att/Name eq 'productType'"
                f" and att/OData.CSC.StringAttribute/Value eq '{product_type}')"
            )
        parts.append(f"OData.CSC.Intersects(area=geography'SRID=4326;{shapely.to_wkt(aoi, rounding_precision=6)}')")
        if acquired_since is not None:
            parts.append(f"ContentDate/Start ge {_odata_time(acquired_since)}")
        if published_since is not None:
            parts.append(f"PublicationDate ge {_odata_time(published_since)}")
        return " and ".join(parts)

    def poll(
        self, collection: str, aoi: BaseGeometry, published_since: datetime | None, acquired_since: datetime | None
    ) -> Iterator[Candidate]:
        assert self.session is not None
        for ch in "'":
            if ch in collection:
                raise InvalidInputError(f"collection {collection!r}: quote not allowed")
        since = published_since
        seen_at_since: set[str] = set()
        top = self.page_size
        while True:
            resp = self.session.get(
                f"{self.url}/Products",
                params={
                    "$filter": self._filter(collection, aoi, since, acquired_since),
                    "$orderby": "PublicationDate asc",
                    "$top": str(top),
                },
            )
            resp.raise_for_status()
            page = resp.json().get("value", [])
            fresh = 0
            last_pub: datetime | None = None
            at_last: set[str] = set()
            for p in page:
                pid = str(p.get("Id") or "")
                pub = parse_time(p.get("PublicationDate"))
                if since is not None and pub == since and pid in seen_at_since:
                    continue
                fresh += 1
                if pub != last_pub:
                    last_pub, at_last = pub, set()
                at_last.add(pid)
                yield self._candidate(p, collection, pub)
            if len(page) < top:
                return
            if fresh == 0 or last_pub is None:
                # A full page of products all published at `since` and all seen: widen the page once
                # to the server's maximum to get past them.
                if top >= 1000:
                    raise InvalidInputError(f"{self.name}: more than 1000 products published at {since}")
                top = 1000
                continue
            top = self.page_size
            if last_pub == since:
                seen_at_since |= at_last
            else:
                since, seen_at_since = last_pub, at_last

    def deleted(self, collection: str, since: datetime) -> Iterator[tuple[str, datetime]]:
        """(product name, deletion time) of products removed since ``since``, oldest first.

        ``DeletedProducts`` takes the filters of ``Products``; paged like it, on ``DeletionDate``.
        """
        assert self.session is not None
        coll = collection.partition("/")[0]
        seen: set[str] = set()
        while True:
            resp = self.session.get(
                f"{self.url}/DeletedProducts",
                params={
                    "$filter": f"Collection/Name eq '{coll}' and DeletionDate ge {_odata_time(since)}",
                    "$orderby": "DeletionDate asc",
                    "$top": str(self.page_size),
                },
            )
            resp.raise_for_status()
            page = resp.json().get("value", [])
            fresh = 0
            for p in page:
                when = parse_time(p.get("DeletionDate"))
                name = str(p.get("Name") or "").removesuffix(".SAFE")
                if when is None or not name or (when == since and name in seen):
                    continue
                fresh += 1
                if when != since:
                    since, seen = when, set()
                seen.add(name)
                yield name, when
            if len(page) < self.page_size:
                return
            if fresh == 0:
                raise InvalidInputError(f"{self.name}: a full page of deletions at {since}; raise the page size")

    def _candidate(self, p: dict[str, Any], collection: str, pub: datetime | None) -> Candidate:
        name = str(p.get("Name") or p.get("Id") or "?")
        try:
            if p.get("Online") is False:
                return Offline(name.removesuffix(".SAFE"), collection, pub)
            return to_record(p, collection)
        except Exception as exc:  # noqa: BLE001 - any defect of one product is that product's rejection
            return Rejected(name, collection, f"{type(exc).__name__}: {exc}"[:500], pub)
