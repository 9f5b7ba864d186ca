"""Sentinel-2 Level-2A SAFE reader (PSD 14.x, including the 2017-2018 "L2Ap" variant).

Only metadata is parsed here; pixels are left to the caller (rasterio on the JP2 paths), so that
a worker can read exactly the windows it needs. Two rules shape the design:

* Band files are resolved from ``MTD_MSIL2A.xml`` (``Granule_List/IMAGE_FILE``), never by globbing
  or by guessing names: file naming changed between processing baselines, and GDAL's SENTINEL2
  driver silently returns zeros for a listed file that is missing. A missing band therefore
  raises :class:`MissingBandError`.
* ``BOA_ADD_OFFSET`` is taken from the product. From baseline 04.00 on, DN 0 is still nodata but a
  valid DN carries a -1000 offset; using the pre-04.00 formula on newer products biases every
  reflectance by +0.1, which looks like a real seasonal signal. A new-baseline product without the
  offset list is therefore rejected instead of being read with offset 0.

XML is parsed with the standard library, matching on local names so that the PSD namespace
version (psd-14, psd-15, ...) does not matter.

Files are reached through :class:`ProductFiles` (paths relative to the product root), so that the
same parser serves a local ``.SAFE`` directory (:class:`LocalProductFiles`) and one in an object
store (``cbmflow.store.S3ProductFiles``: the listing and the XML through the S3 API, pixels through
GDAL's ``/vsis3/``). This module itself stays free of any storage client.
"""

from __future__ import annotations

import errno
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Protocol

import shapely
from affine import Affine

from card.geobox import GeoBox

NATIVE_RESOLUTION_M: Mapping[str, int] = MappingProxyType(
    {
        "B01": 60,
        "B02": 10,
        "B03": 10,
        "B04": 10,
        "B05": 20,
        "B06": 20,
        "B07": 20,
        "B08": 10,
        "B8A": 20,
        "B09": 60,
        "B10": 60,
        "B11": 20,
        "B12": 20,
        "SCL": 20,
        "AOT": 10,
        "WVP": 10,
        "TCI": 10,
    }
)
"""The resolution at which each L2A layer is measured or produced. L2A also ships resampled copies
(B02 at 20 m and 60 m, SCL at 60 m, ...); statistics must come from the native one."""

SPECTRAL_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
"""Band names by PSD ``bandId`` (0..12), used only when a product lacks Spectral_Information_List."""

_NON_REFLECTANCE = frozenset({"SCL", "AOT", "WVP", "TCI"})
_OFFSET_BASELINE = (4, 0)
_IMAGE_STEM_RE = re.compile(r"_(?P<band>B\d\d|B8A|SCL|AOT|WVP|TCI)_(?P<res>\d+)m$")
_NAME_RE = re.compile(r"^(?P<mission>S2[A-D])_MSIL2A_\d{8}T\d{6}_N\d{4}_R\d{3}_T(?P<tile>\d{2}[A-Z]{3})_")
_GRANULE_TILE_RE = re.compile(r"_T(?P<tile>\d{2}[A-Z]{3})_")


class MissingBandError(FileNotFoundError):
    """A band the caller asked for is not in the product (unlisted or file absent).

    Derived from :class:`FileNotFoundError` so that generic "unreadable input" handling catches it,
    while callers that care can tell a missing band from a missing product.
    """

    def __init__(self, band: str, expected_path: Path, reason: str) -> None:
        self.band = band
        self.expected_path = expected_path
        self.reason = reason
        super().__init__(errno.ENOENT, f"band {band} {reason}: expected {expected_path}", str(expected_path))

    def __str__(self) -> str:
        return f"band {self.band} {self.reason}: expected {self.expected_path}"


class ProductFiles(Protocol):
    """Read access to the files of one product, addressed by POSIX paths relative to its root.

    ``root`` is the product root as GDAL names it: a local directory, or ``/vsis3/bucket/key`` for
    a product in S3 (a :class:`~pathlib.Path` that only GDAL can open), so that ``root / rel``
    equals :meth:`gdal_path` and can be handed to ``rasterio.open``.
    """

    @property
    def root(self) -> Path: ...

    def read_bytes(self, rel: str) -> bytes:
        """The file's content; :class:`FileNotFoundError` when it does not exist."""
        ...

    def exists(self, rel: str) -> bool:
        """Whether the file exists (a cheap check: no pixel is read)."""
        ...

    def gdal_path(self, rel: str) -> str:
        """A path GDAL opens (for an object store: a ``/vsi`` path read with range requests)."""
        ...


class LocalProductFiles:
    """A product in a local directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        return self._root

    def read_bytes(self, rel: str) -> bytes:
        return (self._root / rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return (self._root / rel).is_file()

    def gdal_path(self, rel: str) -> str:
        return str(self._root / rel)

    def files_under(self, rel: str) -> list[str]:
        """Every file below directory ``rel`` ("" = the root), relative to the root (none if it is not there)."""
        base = self._root / rel
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self._root).as_posix() for p in base.rglob("*") if p.is_file())


@dataclass(frozen=True)
class S2Product:
    """Metadata of one L2A product, enough to locate bands and convert DN to reflectance."""

    path: Path
    product_name: str
    mission: str
    sensing_time: datetime
    processing_baseline: str
    tile_id: str
    epsg: int
    boa_add_offset: dict[str, int] = field(hash=False)
    quantification_value: int
    footprint: shapely.Polygon
    nodata_dn: int
    granule_path: Path
    grids: dict[int, GeoBox] = field(hash=False, repr=False)
    """Pixel grid per resolution (m), from MTD_TL.xml ``Tile_Geocoding`` (Size + Geoposition)."""
    image_files: dict[tuple[str, int], PurePosixPath] = field(hash=False, repr=False)
    files: ProductFiles = field(hash=False, repr=False, compare=False)

    @property
    def baseline_tuple(self) -> tuple[int, int]:
        return _baseline_tuple(self.processing_baseline)

    def band_path(self, band: str, resolution_m: int | None = None) -> Path:
        """The JP2 of ``band`` at its native resolution (or ``resolution_m``), checked to exist.

        A path GDAL (``rasterio.open``) opens: the file of a local product, ``/vsis3/bucket/key``
        for a product in S3 (open it inside ``cbmflow.store.gdal_env``; it is no local file).
        """
        name = normalize_band(band)
        res = resolution_m if resolution_m is not None else native_resolution_m(name)
        rel = self.image_files.get((name, res))
        if rel is None:
            expected = self._conventional_path(name, res)
            raise MissingBandError(name, expected, f"at {res} m is not listed in MTD_MSIL2A.xml")
        rel = _with_suffix(rel)
        path = self.path / rel
        if not self.files.exists(str(rel)):
            raise MissingBandError(name, path, f"at {res} m is listed in MTD_MSIL2A.xml but its file is missing")
        return path

    def reflectance_offset(self, band: str) -> int:
        """The value to add to a valid DN before dividing by :attr:`quantification_value`.

        -1000 for reflectance bands from baseline 04.00 on, 0 before, and always 0 for SCL and the
        other non-reflectance layers (their DN are classes or physical units, not offset).
        """
        name = normalize_band(band)
        if name in _NON_REFLECTANCE:
            return 0
        return self.boa_add_offset.get(name, 0)

    def tile_grid(self, resolution_m: int) -> GeoBox:
        """The band grid at ``resolution_m`` as the metadata declares it (a band file must match it)."""
        try:
            return self.grids[resolution_m]
        except KeyError:
            raise ValueError(f"{self.product_name}: MTD_TL.xml has no {resolution_m} m geoposition") from None

    def _conventional_path(self, band: str, res: int) -> Path:
        """Where a band would live if listed, for an error message that points somewhere useful."""
        stem = f"T{self.tile_id}_{self.sensing_time:%Y%m%dT%H%M%S}_{band}_{res}m.jp2"
        return self.granule_path / "IMG_DATA" / f"R{res}m" / stem


def native_resolution_m(band: str) -> int:
    name = normalize_band(band)
    try:
        return NATIVE_RESOLUTION_M[name]
    except KeyError:
        raise ValueError(f"unknown Sentinel-2 L2A band {band!r}") from None


def normalize_band(band: str) -> str:
    """``B2``/``b02``/``B02`` → ``B02``; the PSD itself writes ``B2`` in Spectral_Information."""
    name = band.strip().upper()
    m = re.fullmatch(r"B(\d{1,2})", name)
    if m:
        name = f"B{int(m.group(1)):02d}"
    return name


def open_s2_product(path: str | os.PathLike[str] | ProductFiles) -> S2Product:
    """Parse a ``.SAFE`` directory (or its ``MTD_MSIL2A.xml``), or the product behind a
    :class:`ProductFiles`, into :class:`S2Product`.

    Raises ``FileNotFoundError`` for a missing metadata file and ``ValueError`` for metadata that is
    malformed or inconsistent, so that callers can treat both as a permanent, per-product failure.
    Errors of the file access itself (an object store that cannot be reached) pass through.
    """
    files: ProductFiles
    mtd_rel = "MTD_MSIL2A.xml"
    if isinstance(path, str | os.PathLike):
        given = Path(path)
        if given.is_file():
            files, mtd_rel = LocalProductFiles(given.parent), given.name
        else:
            files = LocalProductFiles(given)
    else:
        files = path
    root_dir = files.root
    mtd_path = root_dir / mtd_rel
    if not files.exists(mtd_rel):
        raise FileNotFoundError(errno.ENOENT, "no MTD_MSIL2A.xml in product", str(mtd_path))
    mtd = _parse_xml(files.read_bytes(mtd_rel), mtd_path)

    product_info = _first(mtd, ("Product_Info", "L2A_Product_Info"), mtd_path)
    uri = _text_of(product_info, ("PRODUCT_URI", "PRODUCT_URI_2A"), required=False)
    product_name = (uri or root_dir.name).removesuffix(".SAFE")
    baseline = _text_of(product_info, ("PROCESSING_BASELINE",), mtd_path)
    try:
        baseline_t = _baseline_tuple(baseline)
    except ValueError:
        raise ValueError(f"{mtd_path}: unparsable PROCESSING_BASELINE {baseline!r}") from None
    sensing_time = _parse_time(_text_of(product_info, ("PRODUCT_START_TIME",), mtd_path), mtd_path)

    name_match = _NAME_RE.match(product_name)
    mission = name_match.group("mission") if name_match else _mission_from_spacecraft(product_info, mtd_path)

    image_files = _image_files(product_info, mtd_path)
    granule_rel = _single_granule(image_files.values(), mtd_path)
    granule_path = root_dir / granule_rel
    tile_id = name_match.group("tile") if name_match else _tile_from_granule(granule_rel.name, mtd_path)

    chars = _first(mtd, ("Product_Image_Characteristics", "L2A_Product_Image_Characteristics"), mtd_path)
    quantification = _text_of(chars, ("BOA_QUANTIFICATION_VALUE", "L2A_BOA_QUANTIFICATION_VALUE"), mtd_path)
    offsets = _boa_offsets(chars, mtd_path)
    if not offsets and baseline_t >= _OFFSET_BASELINE:
        raise ValueError(
            f"{mtd_path}: processing baseline {baseline} (>= 04.00) but no BOA_ADD_OFFSET_VALUES_LIST;"
            " refusing to guess the reflectance offset"
        )

    footprint = _footprint(mtd, mtd_path)
    epsg, grids = _tile_geocoding(files, f"{granule_rel}/MTD_TL.xml")
    return S2Product(
        path=root_dir,
        product_name=product_name,
        mission=mission,
        sensing_time=sensing_time,
        processing_baseline=baseline,
        tile_id=tile_id,
        epsg=epsg,
        boa_add_offset=offsets,
        quantification_value=int(float(quantification)),
        footprint=footprint,
        nodata_dn=_nodata_dn(chars),
        granule_path=granule_path,
        grids=grids,
        image_files=image_files,
        files=files,
    )


# --- XML plumbing -------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_xml(data: bytes, where: Path) -> ET.Element:
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"{where}: not well-formed XML ({exc})") from exc


def _iter_named(elem: ET.Element, names: tuple[str, ...]) -> Iterator[ET.Element]:
    for e in elem.iter():
        if _local(e.tag) in names:
            yield e


def _first(elem: ET.Element, names: tuple[str, ...], where: Path) -> ET.Element:
    for e in _iter_named(elem, names):
        return e
    raise ValueError(f"{where}: no <{'|'.join(names)}> element")


def _text_of(elem: ET.Element, names: tuple[str, ...], where: Path | None = None, *, required: bool = True) -> str:
    for e in _iter_named(elem, names):
        if e.text and e.text.strip():
            return e.text.strip()
    if required:
        raise ValueError(f"{where}: no <{'|'.join(names)}> text")
    return ""


# --- field parsers ------------------------------------------------------------------------------


def _baseline_tuple(baseline: str) -> tuple[int, int]:
    major, _, minor = baseline.strip().partition(".")
    return int(major), int(minor or 0)


def _parse_time(text: str, where: Path) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where}: unparsable PRODUCT_START_TIME {text!r}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _mission_from_spacecraft(product_info: ET.Element, where: Path) -> str:
    craft = _text_of(product_info, ("SPACECRAFT_NAME",), where)
    m = re.fullmatch(r"Sentinel-2([A-D])", craft)
    if not m:
        raise ValueError(f"{where}: unknown SPACECRAFT_NAME {craft!r}")
    return f"S2{m.group(1)}"


def _tile_from_granule(granule_dir: str, where: Path) -> str:
    m = _GRANULE_TILE_RE.search(f"_{granule_dir}_")
    if not m:
        raise ValueError(f"{where}: cannot tell the tile from granule {granule_dir!r}")
    return m.group("tile")


def _image_files(product_info: ET.Element, where: Path) -> dict[tuple[str, int], PurePosixPath]:
    """(band, resolution) → path relative to the SAFE root, as listed (without extension)."""
    files: dict[tuple[str, int], PurePosixPath] = {}
    for e in _iter_named(product_info, ("IMAGE_FILE", "IMAGE_FILE_2A")):
        rel = PurePosixPath((e.text or "").strip())
        stem = rel.name.removesuffix(".jp2")
        m = _IMAGE_STEM_RE.search(stem)
        if not m or "IMG_DATA" not in rel.parts:
            continue  # QI/AUX rasters (CLD, SNW, DEM) are not bands
        files.setdefault((m.group("band"), int(m.group("res"))), rel)
    if not files:
        raise ValueError(f"{where}: Granule_List lists no IMG_DATA image files")
    return files


def _single_granule(paths: Iterable[PurePosixPath], where: Path) -> PurePosixPath:
    """The one GRANULE/<dir> all image files live in; multi-granule (pre-2016) products are refused."""
    granules = set()
    for rel in paths:
        parts = rel.parts
        if len(parts) < 2 or parts[0] != "GRANULE":
            raise ValueError(f"{where}: image file {rel} is not under GRANULE/")
        granules.add(PurePosixPath(*parts[:2]))
    if len(granules) != 1:
        raise ValueError(f"{where}: expected one granule, found {sorted(map(str, granules))}")
    return granules.pop()


def _with_suffix(rel: PurePosixPath) -> PurePosixPath:
    return rel if rel.suffix == ".jp2" else rel.with_name(rel.name + ".jp2")


def _boa_offsets(chars: ET.Element, where: Path) -> dict[str, int]:
    names: dict[str, str] = {str(i): b for i, b in enumerate(SPECTRAL_BANDS)}
    for e in _iter_named(chars, ("Spectral_Information",)):
        band_id, physical = e.get("bandId"), e.get("physicalBand")
        if band_id is not None and physical:
            names[band_id.strip()] = normalize_band(physical)
    offsets: dict[str, int] = {}
    for e in _iter_named(chars, ("BOA_ADD_OFFSET",)):
        band_id = (e.get("band_id") or "").strip()
        if band_id not in names:
            raise ValueError(f"{where}: BOA_ADD_OFFSET for unknown band_id {band_id!r}")
        try:
            offsets[names[band_id]] = int(float((e.text or "").strip()))
        except ValueError:
            raise ValueError(f"{where}: BOA_ADD_OFFSET band_id={band_id} is not a number") from None
    return offsets


def _nodata_dn(chars: ET.Element) -> int:
    for sv in _iter_named(chars, ("Special_Values",)):
        text = _text_of(sv, ("SPECIAL_VALUE_TEXT",), required=False)
        if text == "NODATA":
            return int(_text_of(sv, ("SPECIAL_VALUE_INDEX",), required=False) or 0)
    return 0


def _footprint(mtd: ET.Element, where: Path) -> shapely.Polygon:
    """EXT_POS_LIST is "lat lon lat lon ..." (latitude first); shapely wants (lon, lat)."""
    text = _text_of(mtd, ("EXT_POS_LIST",), where)
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        raise ValueError(f"{where}: EXT_POS_LIST is not a list of numbers") from None
    if len(values) % 2 or len(values) < 6:
        raise ValueError(f"{where}: EXT_POS_LIST has {len(values)} numbers, not lat/lon pairs of a ring")
    ring = [(values[i + 1], values[i]) for i in range(0, len(values), 2)]
    return shapely.Polygon(ring)


def _tile_geocoding(files: ProductFiles, rel: str) -> tuple[int, dict[int, GeoBox]]:
    mtd_tl = files.root / rel
    if not files.exists(rel):
        raise FileNotFoundError(errno.ENOENT, "no granule MTD_TL.xml", str(mtd_tl))
    root = _parse_xml(files.read_bytes(rel), mtd_tl)
    geo = _first(root, ("Tile_Geocoding",), mtd_tl)
    code = _text_of(geo, ("HORIZONTAL_CS_CODE",), mtd_tl)
    m = re.fullmatch(r"EPSG:(\d+)", code)
    if not m:
        raise ValueError(f"{mtd_tl}: HORIZONTAL_CS_CODE {code!r} is not EPSG:<code>")
    sizes: dict[int, tuple[int, int]] = {}
    for e in _iter_named(geo, ("Size",)):
        res = int(e.get("resolution") or 0)
        sizes[res] = (int(_text_of(e, ("NROWS",), mtd_tl)), int(_text_of(e, ("NCOLS",), mtd_tl)))
    epsg = int(m.group(1))
    grids: dict[int, GeoBox] = {}
    for e in _iter_named(geo, ("Geoposition",)):
        res = int(e.get("resolution") or 0)
        if res not in sizes:
            raise ValueError(f"{mtd_tl}: Geoposition {res} m without a matching Size")
        ulx, uly = float(_text_of(e, ("ULX",), mtd_tl)), float(_text_of(e, ("ULY",), mtd_tl))
        xdim, ydim = float(_text_of(e, ("XDIM",), mtd_tl)), float(_text_of(e, ("YDIM",), mtd_tl))
        # ULX/ULY is the outer corner of the top-left pixel; YDIM is negative (rows run south).
        grids[res] = GeoBox(sizes[res], Affine(xdim, 0.0, ulx, 0.0, ydim, uly), epsg)
    return epsg, grids
