"""Products published as STAC Item assets (earth-search S2 L2A COGs, S1 RTC backscatter COGs).

The contract with the catalogue watcher: for such a product ``scenes.location`` is the href of the
**STAC Item document** itself (a STAC API's ``self`` link ``https://.../collections/<c>/items/<id>``,
an ``s3://.../<id>.json`` or a local ``.json``), not a directory. The worker fetches that one
document when it extracts the scene, so the asset hrefs, their ``raster:bands`` and the
``earthsearch:boa_offset_applied`` flag are read as published; the readers in ``card/`` turn it
into bands. See docs/extraction.md ("Products as STAC Item assets").
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

from card.s2cog import gdal_href, is_item_location, parse_item_bytes
from cbmflow import store

__all__ = ["asset_gdal_path", "is_item_location", "read_item"]

FETCH_TIMEOUT_S = 30.0


def read_item(location: str) -> dict[str, Any]:
    """The Item document at ``location``: local path, ``file://``, ``s3://`` (the store's client) or
    ``http(s)://``. ``FileNotFoundError`` when it is not there, ``ValueError`` when it is not an Item;
    a store or server that cannot be reached now raises ``OSError`` (retryable)."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        request = urllib.request.Request(location, headers={"Accept": "application/geo+json, application/json"})
        try:
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
                data = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileNotFoundError(f"no STAC item at {location} (HTTP {exc.code})") from exc
            if exc.code in (400, 401, 403):
                raise ValueError(f"STAC item {location} refused (HTTP {exc.code})") from exc
            raise OSError(f"STAC item {location}: HTTP {exc.code}") from exc
        return parse_item_bytes(data, location)
    if store.is_s3(location):
        bucket, key = store.parse_s3(location)
        prefix, _, name = key.rpartition("/")
        if not prefix:
            raise ValueError(f"{location}: an Item at the root of a bucket is not supported")
        return parse_item_bytes(store.S3ProductFiles(bucket, prefix).read_bytes(name), location)
    path = parsed.path if parsed.scheme == "file" else location
    with open(path, "rb") as fh:
        return parse_item_bytes(fh.read(), location)


def asset_gdal_path(href: str) -> str:
    """Where GDAL reads an asset: ``/vsis3/`` (the store's endpoint and credentials) for ``s3://``,
    ``/vsicurl/`` for HTTP(S), else the local path."""
    return store.gdal_path(href) if store.is_s3(href) else gdal_href(href)
