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

from card.s1 import S1CardProduct, open_s1_card, open_s1_dimap
from card.s1rtc import open_s1_rtc_item
from card.s2cog import S2CogProduct, gdal_href, is_item_location, open_s2_cog_item, parse_item_bytes
from cbmflow import store
from cbmflow.errors import PermanentJobError

__all__ = ["S2Item", "asset_gdal_path", "is_item_location", "open_card_product", "open_s2_item", "read_item"]

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


class S2Item:
    """An S2 L2A COG Item with the interface the worker's S2 path uses on a SAFE
    (:class:`card.s2.S2Product`): ``epsg``, ``band_path`` (a path GDAL opens) and
    ``reflectance_offset`` (the DN offset to the stored units, see ``card/s2cog.py``)."""

    def __init__(self, product: S2CogProduct) -> None:
        self.product = product
        self.epsg = product.epsg
        self.product_name = product.product_name

    def band_path(self, band: str) -> str:
        """Raises ``card.s2.MissingBandError`` for a band the Item has no asset for."""
        return asset_gdal_path(self.product.band_href(band))

    def reflectance_offset(self, band: str) -> int:
        return self.product.reflectance_offset(band)


def _permanent_or_retry(location: str, product_id: str, exc: Exception) -> Exception:
    """A missing or malformed Item can never be read (permanent); a store or server that cannot be
    reached now (``OSError`` other than not-found) is retried."""
    if isinstance(exc, FileNotFoundError | ValueError | store.StoreRefused):
        return PermanentJobError(f"unreadable product {product_id} at {location}: {exc}")
    return exc


def open_s2_item(location: str, product_id: str) -> S2Item:
    """The S2 L2A COG product whose STAC Item is at ``location`` (see the module docstring)."""
    try:
        return S2Item(open_s2_cog_item(read_item(location), location))
    except store.StoreUnavailable:
        raise
    except (OSError, ValueError) as exc:
        raise _permanent_or_retry(location, product_id, exc) from exc


def open_card_product(location: str, polarisations: tuple[str, ...]) -> S1CardProduct:
    """A backscatter product: a STAC Item of per-polarisation COGs (``card/s1rtc.py``), else
    cbmflow's CARD COG / a BEAM-DIMAP product at a GDAL path (``card/s1.py``). Errors as theirs:
    ``FileNotFoundError`` (``MissingPolarisationError``) and ``ValueError`` are permanent."""
    if not is_item_location(location):
        if urlparse(location).scheme == "s3":  # BEAM-DIMAP on S3 (a COG comes as /vsis3/)
            try:
                files, entry = store.dimap_files(location)
            except store.UnsupportedLocation as exc:
                raise ValueError(str(exc)) from exc
            return open_s1_dimap(files, entry, polarisations, label=location)
        return open_s1_card(location, polarisations)
    item = read_item(location)
    with store.gdal_env(None if _any_s3(item) else location):
        return open_s1_rtc_item(item, location, polarisations, asset_gdal_path)


def _any_s3(item: dict[str, Any]) -> bool:
    return any(
        store.is_s3(str(a.get("href", ""))) for a in dict(item.get("assets") or {}).values() if isinstance(a, dict)
    )
