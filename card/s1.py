"""Sentinel-1 CARD rasters (backscatter ``bs``, 6-day coherence ``c6``): find each polarisation.

Two layouts are accepted:

* **cbmflow's CARD product**: ONE GeoTIFF/COG per scene, float32, linear (not dB), NaN nodata,
  with two bands whose *descriptions* are ``VV`` and ``VH``. The band order is taken from the
  descriptions, never assumed; a description that holds the polarisation as an ``_``-separated
  token (``Gamma0_VV``, ``coh_VV``) counts too.
* **JRC's BEAM-DIMAP archive** (SNAP/s1tbx output), so that an archive can be re-extracted:
  ``<ref>/<ref>.dim`` + ``<ref>/<ref>.data/`` holding one ENVI ``.img``/``.hdr`` pair per band:
  ``Gamma0_VV.img``/``Gamma0_VH.img`` for backscatter, files named with ``_VV``/``_VH`` (e.g.
  ``coh_IW2_VV_06Jan2020_12Jan2020.img``) for coherence. ``path`` may be the ``<ref>`` directory,
  the ``.dim`` file or the ``.data`` directory. When the ``.dim`` is there, its ``Data_Access``
  list names the band files and its ``Spectral_Band_Info`` the no-data value; without it the
  ``.img`` files of the ``.data`` directory are matched by name (as JRC's extractor did).

The result is a small frozen :class:`S1CardProduct`: product name, CRS, and per polarisation the
path GDAL opens, the 1-based band index and the no-data value. A polarisation that is not there
raises :class:`MissingPolarisationError` (a :class:`FileNotFoundError`), never zeros; a raster that
is not float32, or whose bands cannot be told apart, raises :class:`ValueError`.

No-data: NaN is never a valid value. A *finite* no-data value declared by the file (GeoTIFF
nodata tag, ENVI ``data ignore value``, DIMAP ``NO_DATA_VALUE`` with ``NO_DATA_VALUE_USED``) is
excluded as well. SNAP's terrain correction writes 0.0 outside the swath and declares it in the
``.dim``; a DIMAP band that declares nothing gets 0.0 too (linear backscatter or coherence of
exactly 0 is not a measurement), a GeoTIFF band only NaN.

Imports nothing of cbmflow's: stdlib, rasterio.
"""

from __future__ import annotations

import errno
import math
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import rasterio
import rasterio.errors

from card.geobox import GeoBox
from card.s2 import LocalProductFiles, ProductFiles

POLARISATIONS: tuple[str, ...] = ("VV", "VH")
DIMAP_DEFAULT_NODATA = 0.0
"""No-data of a DIMAP band that declares none: SNAP's Terrain-Correction fills with 0.0."""

_RASTER_SUFFIXES = (".tif", ".tiff")


class MissingPolarisationError(FileNotFoundError):
    """A polarisation the caller asked for is not in the product (no such band, or its file is absent).

    Derived from :class:`FileNotFoundError`, like ``card.s2.MissingBandError``, so that generic
    "unreadable input" handling catches it while callers that care can tell it apart.
    """

    def __init__(self, polarisation: str, where: str | Path, reason: str) -> None:
        self.polarisation = polarisation
        self.where = str(where)
        self.reason = reason
        super().__init__(errno.ENOENT, f"polarisation {polarisation} {reason}: {where}", str(where))

    def __str__(self) -> str:
        return f"polarisation {self.polarisation} {self.reason}: {self.where}"


@dataclass(frozen=True)
class PolarisationBand:
    """Where one polarisation is: the path GDAL opens, the 1-based band index, the no-data value
    besides NaN (None: NaN only)."""

    polarisation: str
    path: str
    band: int
    nodata: float | None


@dataclass(frozen=True)
class S1CardProduct:
    """One Sentinel-1 CARD scene, resolved (see the module docstring)."""

    path: str
    product_name: str
    layout: str
    """``geotiff`` or ``dimap``."""
    crs: str
    epsg: int | None
    bands: tuple[PolarisationBand, ...]

    @property
    def polarisations(self) -> tuple[str, ...]:
        return tuple(b.polarisation for b in self.bands)

    def band(self, polarisation: str) -> PolarisationBand:
        pol = polarisation.strip().upper()
        for b in self.bands:
            if b.polarisation == pol:
                return b
        raise MissingPolarisationError(pol, self.path, f"was not resolved in product {self.product_name}")


def open_s1_card(path: str | Path, polarisations: tuple[str, ...] = POLARISATIONS) -> S1CardProduct:
    """Resolve a CARD GeoTIFF/COG or a BEAM-DIMAP product into :class:`S1CardProduct`.

    Every polarisation in ``polarisations`` must be there (:class:`MissingPolarisationError`
    otherwise). A missing product raises ``FileNotFoundError``; an unreadable, non-float32 or
    ambiguous one ``ValueError``: both are permanent, per-product failures.
    """
    pols = _polarisations(polarisations)
    text = str(path)
    local = Path(text)
    if text.startswith("/vsi"):
        return _open_geotiff(text, pols)
    if local.suffix.lower() in (".dim", ".data"):
        return open_s1_dimap(LocalProductFiles(local.parent), local.name, pols, text)
    if local.is_dir():
        return open_s1_dimap(LocalProductFiles(local), "", pols, text)
    if not local.exists():
        raise FileNotFoundError(errno.ENOENT, "no such CARD product", text)
    return _open_geotiff(text, pols)


def _polarisations(polarisations: tuple[str, ...]) -> tuple[str, ...]:
    pols = tuple(p.strip().upper() for p in polarisations)
    unknown = [p for p in pols if p not in ("VV", "VH", "HH", "HV")]
    if unknown or not pols:
        raise ValueError(f"unknown polarisation(s) {unknown or list(polarisations)!r}")
    return pols


# --- GeoTIFF / COG ------------------------------------------------------------------------------


def _polarisation_of(description: str | None) -> str | None:
    """``VV``, ``vv``, ``Gamma0_VV``, ``coh_VV_...`` → ``VV``; anything else → None."""
    text = (description or "").strip().upper()
    if text in ("VV", "VH", "HH", "HV"):
        return text
    found = {t for t in text.replace("-", "_").split("_") if t in ("VV", "VH", "HH", "HV")}
    return found.pop() if len(found) == 1 else None


def _open_geotiff(path: str, pols: tuple[str, ...]) -> S1CardProduct:
    try:
        with rasterio.open(path) as src:
            descriptions = list(src.descriptions)
            dtypes = list(src.dtypes)
            nodatavals = list(src.nodatavals)
            crs = src.crs
    except rasterio.errors.RasterioIOError as exc:
        raise ValueError(f"cannot read raster {path}: {exc}") from exc
    name = Path(path).name
    product_name = name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in _RASTER_SUFFIXES else name
    found: dict[str, list[int]] = {}
    unnamed: list[int] = []
    for i, desc in enumerate(descriptions, start=1):
        pol = _polarisation_of(desc)
        if pol is not None:
            found.setdefault(pol, []).append(i)
        elif not (desc or "").strip():
            unnamed.append(i)
    shown = ", ".join(f"{i}:{d or '(none)'}" for i, d in enumerate(descriptions, start=1))
    bands = []
    for pol in pols:
        idx = found.get(pol, [])
        if len(idx) > 1:
            raise ValueError(f"{path}: bands {idx} are all described as {pol}; cannot tell which is {pol} ({shown})")
        if not idx:
            if unnamed:
                raise ValueError(
                    f"{path}: band(s) {unnamed} have no description, so the {pol} band cannot be identified"
                    f" (bands: {shown}); CARD bands must be described as VV and VH"
                )
            raise MissingPolarisationError(pol, path, f"is not among the band descriptions ({shown})")
        bidx = idx[0]
        if dtypes[bidx - 1] != "float32":
            raise ValueError(f"{path}: band {bidx} ({pol}) is {dtypes[bidx - 1]}, a CARD raster must be float32")
        bands.append(PolarisationBand(pol, path, bidx, _finite(nodatavals[bidx - 1])))
    crs_text, epsg = _crs(crs, path)
    return S1CardProduct(path, product_name, "geotiff", crs_text, epsg, tuple(bands))


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


def _crs(crs: Any, where: str) -> tuple[str, int | None]:
    if crs is None:
        raise ValueError(f"{where}: raster has no CRS")
    return str(crs.to_string()), crs.to_epsg()


# --- BEAM-DIMAP ---------------------------------------------------------------------------------


class CardFiles(ProductFiles, Protocol):
    """The files of a BEAM-DIMAP product: :class:`~card.s2.ProductFiles` that can also be listed."""

    def files_under(self, rel: str) -> list[str] | None:
        """Every file below directory ``rel`` ("" = the root), as paths relative to the root; None
        where the store does not allow listing."""
        ...


@dataclass(frozen=True)
class _DimapBand:
    name: str
    img: str  # relative to the files' root
    nodata: float | None
    declared: bool
    """Whether the ``.dim`` says (``NO_DATA_VALUE_USED`` present); if not, GDAL's or the default."""


def _join(*parts: str) -> str:
    return posixpath.normpath(posixpath.join(*[p for p in parts if p]))


def _files_under(files: CardFiles, rel: str) -> list[str]:
    listed = files.files_under(rel)
    if listed is None:
        raise ValueError(f"{files.root / rel}: the store does not allow listing it; give the product's .dim")
    return listed


def _dimap_layout(files: CardFiles, entry: str) -> tuple[str | None, str]:
    """(the .dim if any, the .data directory), relative to the root, for a ``<ref>`` directory
    (``entry`` "" or a directory), a ``.dim`` or a ``.data`` directory."""
    where = files.root / entry
    if entry.lower().endswith(".dim"):
        if not files.exists(entry):
            raise FileNotFoundError(errno.ENOENT, "no such DIMAP header", str(where))
        return entry, entry[: -len(".dim")] + ".data"
    if entry.lower().endswith(".data"):
        dim = entry[: -len(".data")] + ".dim"
        return (dim if files.exists(dim) else None), entry
    listed = _files_under(files, entry)
    base = f"{entry}/" if entry else ""
    below = [rel[len(base) :] for rel in listed]
    data_dirs = sorted({r.split("/")[0] for r in below if "/" in r and r.split("/")[0].endswith(".data")})
    dims = sorted(r for r in below if "/" not in r and r.endswith(".dim"))
    if len(data_dirs) == 1:
        dim = _join(entry, data_dirs[0][: -len(".data")] + ".dim")
        return (dim if files.exists(dim) else None), _join(entry, data_dirs[0])
    if len(dims) == 1:
        return _join(entry, dims[0]), _join(entry, dims[0][: -len(".dim")] + ".data")
    if not data_dirs and not dims:
        raise ValueError(f"{where}: a directory but neither a BEAM-DIMAP product (<ref>.dim, <ref>.data/) nor a raster")
    raise ValueError(f"{where}: more than one DIMAP product in the directory ({data_dirs})")


def _dim_bands(files: CardFiles, dim: str, data_dir: str) -> list[_DimapBand]:
    """Bands listed in the ``.dim``: file from ``Data_Access``, no-data from ``Spectral_Band_Info``."""
    where = files.root / dim
    try:
        root = ET.fromstring(files.read_bytes(dim))
    except ET.ParseError as exc:
        raise ValueError(f"{where}: not well-formed XML ({exc})") from exc
    paths: dict[str, str] = {}
    for df in root.iter("Data_File"):
        href = df.find("DATA_FILE_PATH")
        index = (df.findtext("BAND_INDEX") or "").strip()
        if href is not None and href.get("href"):
            rel = PurePosixPath(str(href.get("href")).replace("\\", "/"))
            paths[index] = _join(posixpath.dirname(dim), str(rel.with_suffix(".img")))
    out = []
    for info in root.iter("Spectral_Band_Info"):
        index = (info.findtext("BAND_INDEX") or "").strip()
        name = (info.findtext("BAND_NAME") or "").strip()
        if not name:
            continue
        used_text = info.findtext("NO_DATA_VALUE_USED")
        value = (info.findtext("NO_DATA_VALUE") or "").strip()
        used = (used_text or "").strip().lower() == "true"
        try:
            nodata = _finite(value) if used and value else None
        except ValueError:
            raise ValueError(f"{where}: band {name} has NO_DATA_VALUE {value!r}, not a number") from None
        img = paths.get(index, _join(data_dir, f"{name}.img"))
        out.append(_DimapBand(name, img, nodata, declared=used_text is not None))
    if not out:
        raise ValueError(f"{where}: no Spectral_Band_Info with a BAND_NAME")
    return out


def _pick(candidates: list[_DimapBand], pol: str, where: Path) -> _DimapBand:
    exact = [c for c in candidates if c.name.upper() == f"GAMMA0_{pol}"]
    if exact:
        return exact[0]
    named = [c for c in candidates if pol in c.name.upper().replace("-", "_").split("_")]
    coherence = [c for c in named if c.name.lower().startswith("coh")]
    pick = coherence or named
    if len(pick) > 1:
        raise ValueError(f"{where}: {len(pick)} bands could be {pol} ({', '.join(c.name for c in pick)})")
    if not pick:
        listed = ", ".join(c.name for c in candidates) or "none"
        raise MissingPolarisationError(pol, where / f"Gamma0_{pol}.img", f"has no band file (bands: {listed})")
    return pick[0]


def open_s1_dimap(
    files: CardFiles, entry: str = "", polarisations: tuple[str, ...] = POLARISATIONS, label: str = ""
) -> S1CardProduct:
    """A BEAM-DIMAP product from ``files`` (a local directory or an object store prefix): ``entry``
    is its ``.dim``, its ``.data`` directory, or "" when the root is the ``<ref>`` directory.
    Band paths are ``files.gdal_path``s; ``label`` names the product (default: its root/entry)."""
    pols = _polarisations(polarisations)
    dim, data_dir = _dimap_layout(files, entry)
    where = files.root / data_dir
    if dim is not None:
        candidates = _dim_bands(files, dim, data_dir)
    else:
        listed = _files_under(files, data_dir)
        if not listed:
            raise FileNotFoundError(errno.ENOENT, "no such DIMAP data directory", str(where))
        imgs = sorted(r for r in listed if posixpath.dirname(r) == data_dir and r.endswith(".img"))
        candidates = [_DimapBand(PurePosixPath(r).stem, r, None, False) for r in imgs]
    name = posixpath.basename(data_dir)
    product_name = name[: -len(".data")] if name.endswith(".data") else name
    bands: list[PolarisationBand] = []
    grid: GeoBox | None = None
    crs_text, epsg = "", None
    for pol in pols:
        chosen = _pick(candidates, pol, where)
        img = files.gdal_path(chosen.img)
        if not files.exists(chosen.img):
            raise MissingPolarisationError(pol, img, f"band {chosen.name} is listed but its file is missing")
        hdr = str(PurePosixPath(chosen.img).with_suffix(".hdr"))
        if not files.exists(hdr):
            raise MissingPolarisationError(pol, files.gdal_path(hdr), f"band {chosen.name} has no ENVI header")
        try:
            with rasterio.open(img) as src:
                count, dtype, gdal_nodata = src.count, src.dtypes[0], src.nodatavals[0]
                this_grid = GeoBox.from_dataset(src)
                this_crs = _crs(src.crs, img)
        except rasterio.errors.RasterioIOError as exc:
            raise ValueError(f"cannot read raster {img}: {exc}") from exc
        if count != 1:
            raise ValueError(f"{img}: {count} bands, a DIMAP band file holds one")
        if dtype != "float32":
            raise ValueError(f"{img}: band {chosen.name} ({pol}) is {dtype}, a CARD raster must be float32")
        if grid is not None and this_grid != grid:
            raise ValueError(f"{img}: grid differs from the other polarisation's")
        grid = this_grid
        crs_text, epsg = this_crs
        if chosen.declared:
            nodata = chosen.nodata
        elif gdal_nodata is not None:
            nodata = _finite(gdal_nodata)
        else:
            nodata = DIMAP_DEFAULT_NODATA
        bands.append(PolarisationBand(pol, img, 1, nodata))
    return S1CardProduct(label or str(files.root / entry), product_name, "dimap", crs_text, epsg, tuple(bands))
