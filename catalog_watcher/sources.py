"""Catalogue sources behind one interface: a STAC API, CDSE OData and a static STAC catalogue.

A source turns one (collection, AOI, publication window, acquisition window) query into a stream
of candidates in ascending publication order: a :class:`SceneRecord`, a :class:`Rejected` item
(it could not be normalised: recorded, never fatal) or an :class:`Offline` product (it waits).
Normalisation happens per item inside the source, so a malformed item costs one candidate and
never the rest of the page.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import pystac
import shapely.geometry
from shapely.geometry.base import BaseGeometry

from catalog_watcher.http import PoliteSession
from catalog_watcher.odata import ODataSource
from catalog_watcher.stac import Candidate, Rejected, iter_static_items, parse_time, to_record
from cbmflow.settings import SourceSettings, WatchSettings


class Source(Protocol):
    name: str
    collections: list[str]
    incremental: bool
    """True when the source filters and sorts on publication time (a cursor makes sense)."""
    session: PoliteSession | None
    store: str
    """Store profile of the source's products (``""``: the default store)."""

    def poll(
        self, collection: str, aoi: BaseGeometry, published_since: datetime | None, acquired_since: datetime | None
    ) -> Iterator[Candidate]: ...


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def normalise(d: dict[str, Any], collection: str, cursor_property: str) -> Candidate:
    """One STAC item dict → a record or a rejection; never raises."""
    item_id = str(d.get("id") or "?") if isinstance(d, dict) else "?"
    published = parse_time(d.get("properties", {}).get(cursor_property)) if isinstance(d, dict) else None
    try:
        item = pystac.Item.from_dict(d, preserve_dict=True)
        rec = to_record(item, item.collection_id or collection)
    except Exception as exc:  # noqa: BLE001 - any defect of one item is that item's rejection
        return Rejected(item_id, collection, f"{type(exc).__name__}: {exc}"[:500], published)
    return dataclasses.replace(rec, published=published or rec.published, collection=collection)


class StacApiSource:
    """A STAC API searched with pystac-client through a :class:`PoliteSession`.

    With a ``cursor_property`` (CDSE: ``published``) the search filters it with CQL2
    (``>=`` the cursor minus the overlap) and sorts on it ascending; without one the acquisition
    lookback is rescanned each cycle and the idempotent upsert publishes nothing twice.
    """

    def __init__(self, cfg: SourceSettings, watch: WatchSettings, stop: threading.Event | None = None) -> None:
        self.name = cfg.name
        self.store = cfg.store
        self.url = cfg.url
        self.collections = cfg.collections
        self.cursor_property = cfg.cursor_property
        self.incremental = bool(cfg.cursor_property)
        self.page_size = watch.page_size
        self.session: PoliteSession | None = PoliteSession(
            cfg.name,
            rate_per_s=cfg.rate_per_s,
            budget=cfg.request_budget,
            timeout_s=watch.request_timeout_s,
            max_retries=watch.max_retries,
            max_wait_s=watch.retry_max_wait_s,
            stop=stop,
        )
        if cfg.username:
            self.session.auth = (cfg.username, cfg.password.get_secret_value())

    def poll(
        self, collection: str, aoi: BaseGeometry, published_since: datetime | None, acquired_since: datetime | None
    ) -> Iterator[Candidate]:
        search = self._search(collection, aoi, published_since, acquired_since)
        for d in search.items_as_dicts():
            yield normalise(d, collection, self.cursor_property or "published")

    def list_ids(self, collection: str, aoi: BaseGeometry, acquired_since: datetime | None) -> set[str] | None:
        """Every item id of the acquisition window (no publication filter), or None when the listing
        is known to be incomplete (fewer items than the server's ``numberMatched``).

        Any request failure, the request budget included, raises: only a listing that ran to its
        last page may tell that an item is gone.
        """
        search = self._search(collection, aoi, None, acquired_since)
        ids: set[str] = set()
        matched: int | None = None
        for page in search.pages_as_dicts():
            for d in page.get("features", ()):
                if isinstance(d, dict) and d.get("id"):
                    ids.add(str(d["id"]))
            number = page.get("numberMatched", (page.get("context") or {}).get("matched"))
            matched = int(number) if isinstance(number, int) else matched
        if matched is not None and len(ids) < matched:
            return None
        return ids

    def _search(
        self, collection: str, aoi: BaseGeometry, published_since: datetime | None, acquired_since: datetime | None
    ) -> Any:
        from pystac_client import Client
        from pystac_client.stac_api_io import StacApiIO

        io = StacApiIO(timeout=self.session.timeout_s if self.session else None, max_retries=None)
        if self.session is not None:
            io.session = self.session
        client = Client.open(self.url, stac_io=io)
        # pystac-client 0.9 matches only v1.0.* conformance URIs; STAC API 1.1 servers (CDSE v1,
        # stac-fastapi 7) advertise sort as v1.1.0. Accept any version the server states.
        conforms = client.get_conforms_to()
        for name in ("SORT", "FILTER"):
            if any(c.endswith(f"/item-search#{name.lower()}") for c in conforms):
                client.add_conforms_to(name)
        kwargs: dict[str, Any] = {}
        if self.incremental:
            kwargs["sortby"] = [{"field": f"properties.{self.cursor_property}", "direction": "asc"}]
            if published_since is not None:
                kwargs["filter"] = {
                    "op": ">=",
                    "args": [{"property": self.cursor_property}, {"timestamp": _iso(published_since)}],
                }
                kwargs["filter_lang"] = "cql2-json"
        else:
            kwargs["sortby"] = [{"field": "properties.datetime", "direction": "asc"}]
        search = client.search(
            collections=[collection],
            intersects=shapely.geometry.mapping(aoi),
            datetime=f"{_iso(acquired_since)}/.." if acquired_since else None,
            limit=self.page_size,
            method="POST",
            **kwargs,
        )
        return search


class StaticSource:
    """A static catalogue (the test world): walked whole each cycle, filtered locally."""

    incremental = False
    session: PoliteSession | None = None

    def __init__(self, cfg: SourceSettings) -> None:
        self.name = cfg.name
        self.store = cfg.store
        self.url = cfg.url
        self.collections = cfg.collections

    def poll(
        self, collection: str, aoi: BaseGeometry, published_since: datetime | None, acquired_since: datetime | None
    ) -> Iterator[Candidate]:
        for item in iter_static_items(self.url):
            if (item.collection_id or "") != collection:
                continue
            try:
                rec = dataclasses.replace(to_record(item, collection), collection=collection)
            except Exception as exc:  # noqa: BLE001 - any defect of one item is that item's rejection
                yield Rejected(item.id, collection, f"{type(exc).__name__}: {exc}"[:500])
                continue
            if acquired_since is not None and rec.acquired_at < acquired_since:
                continue
            if rec.footprint.intersects(aoi):
                yield rec


def make_sources(settings: WatchSettings, stop: threading.Event | None = None) -> list[Source]:
    out: list[Source] = []
    for cfg in settings.all_sources():
        if cfg.kind == "static":
            out.append(StaticSource(cfg))
        elif cfg.kind == "odata":
            out.append(ODataSource(cfg, settings, stop))
        else:
            out.append(StacApiSource(cfg, settings, stop))
    return out
