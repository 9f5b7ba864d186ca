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
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
import rasterio.errors

from card.geobox import GeoBox

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
    pols = tuple(p.strip().upper() for p in polarisations)
    unknown = [p for p in pols if p not in ("VV", "VH", "HH", "HV")]
    if unknown or not pols:
        raise ValueError(f"unknown polarisation(s) {unknown or list(polarisations)!r}")
    text = str(path)
    local = Path(text)
    if text.startswith("/vsi"):
        return _open_geotiff(text, pols)
    if local.suffix.lower() == ".dim" or local.suffix.lower() == ".data" or local.is_dir():
        return _open_dimap(local, pols)
    if not local.exists():
        raise FileNotFoundError(errno.ENOENT, "no such CARD product", text)
    return _open_geotiff(text, pols)


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


@dataclass(frozen=True)
class _DimapBand:
    name: str
    img: Path
    nodata: float | None
    declared: bool
    """Whether the ``.dim`` says (``NO_DATA_VALUE_USED`` present); if not, GDAL's or the default."""


def _dimap_paths(path: Path) -> tuple[Path | None, Path]:
    """(the .dim if any, the .data directory) for a ``<ref>`` dir, a ``.dim`` or a ``.data`` dir."""
    if path.suffix.lower() == ".dim":
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "no such DIMAP header", str(path))
        return path, path.with_suffix(".data")
    if path.suffix.lower() == ".data":
        dim = path.with_suffix(".dim")
        return (dim if dim.is_file() else None), path
    if not path.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such CARD product", str(path))
    data_dirs = sorted(p for p in path.iterdir() if p.is_dir() and p.suffix == ".data")
    dims = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".dim")
    if len(data_dirs) == 1:
        dim = data_dirs[0].with_suffix(".dim")
        return (dim if dim.is_file() else None), data_dirs[0]
    if len(dims) == 1:
        return dims[0], dims[0].with_suffix(".data")
    if not data_dirs and not dims:
        raise ValueError(f"{path}: a directory but neither a BEAM-DIMAP product (<ref>.dim, <ref>.data/) nor a raster")
    raise ValueError(f"{path}: more than one DIMAP product in the directory ({[p.name for p in data_dirs]})")


def _dim_bands(dim: Path, data_dir: Path) -> list[_DimapBand]:
    """Bands listed in the ``.dim``: file from ``Data_Access``, no-data from ``Spectral_Band_Info``."""
    try:
        root = ET.parse(dim).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{dim}: not well-formed XML ({exc})") from exc
    files: dict[str, Path] = {}
    for df in root.iter("Data_File"):
        href = df.find("DATA_FILE_PATH")
        index = (df.findtext("BAND_INDEX") or "").strip()
        if href is not None and href.get("href"):
            rel = Path(str(href.get("href")))
            files[index] = dim.parent / rel.with_suffix(".img")
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
            raise ValueError(f"{dim}: band {name} has NO_DATA_VALUE {value!r}, not a number") from None
        img = files.get(index, data_dir / f"{name}.img")
        out.append(_DimapBand(name, img, nodata, declared=used_text is not None))
    if not out:
        raise ValueError(f"{dim}: no Spectral_Band_Info with a BAND_NAME")
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


def _open_dimap(path: Path, pols: tuple[str, ...]) -> S1CardProduct:
    dim, data_dir = _dimap_paths(path)
    if dim is not None:
        candidates = _dim_bands(dim, data_dir)
    elif data_dir.is_dir():
        candidates = [_DimapBand(p.stem, p, None, False) for p in sorted(data_dir.glob("*.img"))]
    else:
        raise FileNotFoundError(errno.ENOENT, "no such DIMAP data directory", str(data_dir))
    product_name = data_dir.name[: -len(".data")] if data_dir.name.endswith(".data") else data_dir.name
    bands: list[PolarisationBand] = []
    grid: GeoBox | None = None
    crs_text, epsg = "", None
    for pol in pols:
        chosen = _pick(candidates, pol, data_dir)
        if not chosen.img.is_file():
            raise MissingPolarisationError(pol, chosen.img, f"band {chosen.name} is listed but its file is missing")
        hdr = chosen.img.with_suffix(".hdr")
        if not hdr.is_file():
            raise MissingPolarisationError(pol, hdr, f"band {chosen.name} has no ENVI header")
        try:
            with rasterio.open(chosen.img) as src:
                count, dtype, gdal_nodata = src.count, src.dtypes[0], src.nodatavals[0]
                this_grid = GeoBox.from_dataset(src)
                this_crs = _crs(src.crs, str(chosen.img))
        except rasterio.errors.RasterioIOError as exc:
            raise ValueError(f"cannot read raster {chosen.img}: {exc}") from exc
        if count != 1:
            raise ValueError(f"{chosen.img}: {count} bands, a DIMAP band file holds one")
        if dtype != "float32":
            raise ValueError(f"{chosen.img}: band {chosen.name} ({pol}) is {dtype}, a CARD raster must be float32")
        if grid is not None and this_grid != grid:
            raise ValueError(f"{chosen.img}: grid differs from the other polarisation's")
        grid = this_grid
        crs_text, epsg = this_crs
        if chosen.declared:
            nodata = chosen.nodata
        elif gdal_nodata is not None:
            nodata = _finite(gdal_nodata)
        else:
            nodata = DIMAP_DEFAULT_NODATA
        bands.append(PolarisationBand(pol, str(chosen.img), 1, nodata))
    return S1CardProduct(str(path), product_name, "dimap", crs_text, epsg, tuple(bands))
