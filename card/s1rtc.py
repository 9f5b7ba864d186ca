"""Sentinel-1 analysis-ready backscatter as one COG per polarisation (STAC Item assets), read as ``bs``.

Catalogues that already offer terrain-corrected backscatter publish it per polarisation:
Planetary Computer ``sentinel-1-rtc`` (assets ``vv``, ``vh``: float32 gamma0, terrain flattened,
**linear**, no-data -32768), CDSE ``SENTINEL-1-RTC`` and CARD4L NRB products (one GeoTIFF per
polarisation, linear gamma0). cbmflow's own CARD ``bs`` product is one COG with bands described
``VV``/``VH`` (``card/s1.py``); this module resolves an Item into the same
:class:`card.s1.S1CardProduct`, so the worker's ``bs`` path reads both alike: per polarisation the
path GDAL opens, band 1, the finite no-data value (NaN never counts either).

Asset keys are matched case-insensitively: ``vv``/``VV``, or a key holding the polarisation as an
``_``/``-`` token (``gamma0_vv``, ``VV-gamma0``). A polarisation without an asset raises
:class:`card.s1.MissingPolarisationError`; two assets for one polarisation, a raster that is not
float32, or one with several bands raise ``ValueError``. Values are taken as linear: an asset that
declares ``raster:bands`` ``unit`` ``dB`` is refused, because averaging dB is not averaging power.

Opening the rasters is done here (rasterio); mapping an ``s3://`` href into the caller's store
(``/vsis3/`` with its endpoint) is the caller's, through ``gdal_path``. Imports nothing of cbmflow's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import rasterio
import rasterio.errors

from card.s1 import POLARISATIONS, MissingPolarisationError, PolarisationBand, S1CardProduct, _crs, _finite
from card.s2cog import gdal_href, resolve_href

_POLS = ("VV", "VH", "HH", "HV")


def _pol_of_key(key: str) -> str | None:
    text = key.strip().upper()
    if text in _POLS:
        return text
    found = {t for t in text.replace("-", "_").split("_") if t in _POLS}
    return found.pop() if len(found) == 1 else None


def open_s1_rtc_item(
    item: Mapping[str, Any],
    item_href: str | None = None,
    polarisations: tuple[str, ...] = POLARISATIONS,
    gdal_path: Callable[[str], str] = gdal_href,
) -> S1CardProduct:
    """Resolve a backscatter Item (one COG per polarisation) into :class:`S1CardProduct`.

    Must be called inside the GDAL environment that reaches the assets (the rasters are opened to
    check their type and read their no-data value and CRS).
    """
    item_id = str(item.get("id") or "")
    where = item_href or item_id or "STAC item"
    pols = tuple(p.strip().upper() for p in polarisations)
    if not pols or any(p not in _POLS for p in pols):
        raise ValueError(f"unknown polarisation(s) {list(polarisations)!r}")
    by_pol: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for key, asset in dict(item.get("assets") or {}).items():
        pol = _pol_of_key(str(key))
        if pol is None or not isinstance(asset, Mapping) or not asset.get("href"):
            continue
        roles = asset.get("roles") or ["data"]
        if "data" not in roles:
            continue
        if pol in by_pol:
            raise ValueError(f"{where}: assets {by_pol[pol][0]!r} and {key!r} are both {pol}")
        by_pol[pol] = (str(key), asset)
    bands: list[PolarisationBand] = []
    crs_epsg: tuple[str, int | None] | None = None
    for pol in pols:
        if pol not in by_pol:
            shown = ", ".join(sorted(dict(item.get("assets") or {}))) or "(none)"
            raise MissingPolarisationError(pol, where, f"has no asset in the STAC item (assets: {shown})")
        key, asset = by_pol[pol]
        rbs = asset.get("raster:bands") or [{}]
        rb = rbs[0] if isinstance(rbs, list) and rbs and isinstance(rbs[0], Mapping) else {}
        if str(rb.get("unit") or "").strip().lower() == "db":
            raise ValueError(f"{where}: asset {key!r} is in dB; backscatter must be linear to be averaged")
        path = gdal_path(resolve_href(str(asset["href"]), item_href))
        try:
            with rasterio.open(path) as src:
                count, dtype, nodata, crs = src.count, src.dtypes[0], src.nodatavals[0], src.crs
        except rasterio.errors.RasterioIOError as exc:
            raise ValueError(f"cannot read raster {path} ({pol}): {exc}") from exc
        if count != 1:
            raise ValueError(f"{path}: {count} bands; a per-polarisation asset must hold one")
        if dtype != "float32":
            raise ValueError(f"{path}: {dtype}; backscatter ({pol}) must be float32")
        declared = rb.get("nodata")
        nd = _finite(declared if declared is not None and nodata is None else nodata)
        bands.append(PolarisationBand(pol, path, 1, nd))
        crs_epsg = crs_epsg or _crs(crs, path)
    if crs_epsg is None:  # unreachable: pols is not empty
        raise ValueError(f"{where}: no polarisation requested")
    return S1CardProduct(where, item_id, "assets", crs_epsg[0], crs_epsg[1], tuple(bands))
