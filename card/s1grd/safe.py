"""Reading a Sentinel-1 GRD SAFE (directory or ``.zip``): manifest, annotation, calibration, noise.

Only the fields the CARD-BS chain uses are parsed, into plain numpy arrays. Times are float
seconds since ``Annotation.t0`` (the product's first line time) so that the orbit, the
calibration/noise vectors and the geocoder all share one exact time axis: a float64 of seconds
within a few minutes keeps sub-nanosecond resolution, a datetime64 would not survive numba.

Both noise formats are read: IPF ≥ 2.9 (``noiseRangeVectorList`` + ``noiseAzimuthVectorList``
blocks) and the older range-only ``noiseVectorList``. The format is taken from what the XML
holds, not from the IPF version alone, since the version is also recorded for the output tags.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class SafeError(ValueError):
    """The input is not a readable Sentinel-1 GRD SAFE (missing file, missing field)."""


def parse_time(text: str) -> np.datetime64:
    return np.datetime64(text.strip().rstrip("Z"), "ns")


def _seconds(t: np.datetime64, t0: np.datetime64) -> float:
    return float((t - t0) / np.timedelta64(1, "ns")) * 1e-9


def _floats(el: ET.Element | None, where: str) -> FloatArray:
    if el is None or el.text is None:
        raise SafeError(f"missing numeric list {where}")
    return np.array(el.text.split(), dtype=np.float64)


def _text(root: ET.Element, path: str) -> str:
    el = root.find(path)
    if el is None or el.text is None:
        raise SafeError(f"missing field {path}")
    return el.text.strip()


def _float(root: ET.Element, path: str) -> float:
    return float(_text(root, path))


# --------------------------------------------------------------------------------------------
# Where the files are: a directory or a zip, both addressed by paths relative to the SAFE root.


class SafeSource:
    """A SAFE product's files, in a directory or a zip (with or without a top folder).

    Subclasses read the same layout elsewhere (:class:`S3SafeSource`: an S3 prefix or zip object);
    everything downstream sees names relative to the SAFE root, :meth:`read` and :meth:`gdal_path`.
    """

    _zip: zipfile.ZipFile | None
    _prefix: str

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self._zip = None
            self._prefix = ""
            names = [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            names = self._open_zip(zipfile.ZipFile(self.path))
        else:
            raise SafeError(f"{self.path}: neither a SAFE directory nor a zip")
        self._set_names(names, self.path.name)

    def _open_zip(self, zf: zipfile.ZipFile) -> list[str]:
        self._zip = zf
        manifests = [n for n in zf.namelist() if n.endswith("manifest.safe")]
        if not manifests:
            raise SafeError(f"{self.path}: zip holds no manifest.safe")
        self._prefix = manifests[0][: -len("manifest.safe")]
        return [n[len(self._prefix) :] for n in zf.namelist() if n.startswith(self._prefix)]

    def _set_names(self, names: list[str], file_name: str) -> None:
        self.names = sorted(n.replace("\\", "/") for n in names)
        if "manifest.safe" not in self.names:
            raise SafeError(f"{self.path}: no manifest.safe")
        stem = file_name
        for suffix in (".zip", ".SAFE"):
            stem = stem.removesuffix(suffix)
        self.product_name = stem

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._prefix + name)
        return (self.path / name).read_bytes()

    def xml(self, name: str) -> ET.Element:
        return ET.fromstring(self.read(name))

    def gdal_path(self, name: str) -> str:
        """A path GDAL/rasterio opens (``/vsizip/`` inside a zip)."""
        if self._zip is not None:
            return f"/vsizip/{self.path.resolve()}/{self._prefix}{name}"
        return str(self.path / name)

    def find(self, folder: str, pol: str, prefix: str = "") -> str:
        """The one file of ``folder`` for polarisation ``pol`` (GRD naming ``s1x-iw-grd-vv-…``)."""
        pat = re.compile(rf"^{re.escape(folder)}/{prefix}s1[abcd]-[a-z0-9]+-grd-{pol.lower()}-[^/]+\.(xml|tiff?)$")
        hits = [n for n in self.names if pat.match(n)]
        if len(hits) != 1:
            raise SafeError(f"{self.path}: expected one {folder}/{prefix}…-{pol.lower()}-… file, found {hits}")
        return hits[0]

    def polarisations(self) -> tuple[str, ...]:
        pols = set()
        for n in self.names:
            m = re.match(r"^annotation/s1[abcd]-[a-z0-9]+-grd-([hv][hv])-", n)
            if m:
                pols.add(m.group(1).upper())
        return tuple(sorted(pols, key=lambda p: ("VV", "HH", "VH", "HV").index(p)))


class _S3RangeFile(io.RawIOBase):
    """A seekable read-only file over one S3 object, read by ranged GETs in blocks (for ``zipfile``)."""

    def __init__(self, client: Any, bucket: str, key: str, block_bytes: int = 4 << 20) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._block = client, bucket, key, block_bytes
        self.size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        self._pos = 0
        self._cache: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def _block_at(self, k: int) -> bytes:
        if k not in self._cache:
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            start = k * self._block
            end = min(start + self._block, self.size) - 1
            resp = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{end}")
            self._cache[k] = resp["Body"].read()
        return self._cache[k]

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self._pos)
        done = 0
        while done < n:
            k, off = divmod(self._pos + done, self._block)
            chunk = self._block_at(k)[off : off + n - done]
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        self._pos += n
        return n


class S3SafeSource(SafeSource):
    """A SAFE on S3: a ``….SAFE`` prefix (CDSE's eodata layout) or a ``.zip`` object.

    ``client`` is a boto3 S3 client for the store that holds it (card/ knows no store settings:
    the caller passes its client, credentials and endpoint included). The XML is read through it;
    the measurement is handed to GDAL as ``/vsis3/…`` (``/vsizip//vsis3/…`` in a zip), so the
    caller must also have GDAL's ``/vsis3/`` options set for that bucket while the pixels are read.
    """

    def __init__(self, location: str, client: Any) -> None:
        m = re.match(r"^(?:s3://|/vsis3/)([^/]+)/(.+?)/?$", location)
        if not m:
            raise SafeError(f"{location}: not an s3://bucket/key or /vsis3/bucket/key location")
        self._client, self._bucket, self._key = client, m.group(1), m.group(2)
        self.path = Path(f"/vsis3/{self._bucket}/{self._key}")
        if self._key.lower().endswith(".zip"):
            names = self._open_zip(zipfile.ZipFile(_S3RangeFile(client, self._bucket, self._key)))
            self._root = f"/vsizip//vsis3/{self._bucket}/{self._key}/{self._prefix}"
        else:
            self._zip, self._prefix = None, ""
            prefix = self._key + "/"
            names = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix):
                names += [o["Key"][len(prefix) :] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if not names:
                raise SafeError(f"s3://{self._bucket}/{self._key}: no such SAFE (nothing under that prefix)")
            self._root = f"/vsis3/{self._bucket}/{prefix}"
        self._set_names(names, self._key.rsplit("/", 1)[-1])

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._prefix + name)
        body: bytes = self._client.get_object(Bucket=self._bucket, Key=f"{self._key}/{name}")["Body"].read()
        return body

    def gdal_path(self, name: str) -> str:
        return self._root + name


# --------------------------------------------------------------------------------------------
# Annotation


@dataclass(frozen=True)
class Orbit:
    """Earth-fixed state vectors: ``t`` (n,) seconds since t0, ``pos``/``vel`` (n, 3) metres, m/s."""

    t: FloatArray
    pos: FloatArray
    vel: FloatArray


@dataclass(frozen=True)
class GeolocationGrid:
    """The annotation's tie points: radar (line, pixel) ↔ (lat, lon, height), incidence."""

    line: FloatArray
    pixel: FloatArray
    azimuth_time: FloatArray
    slant_range_time: FloatArray
    lat: FloatArray
    lon: FloatArray
    height: FloatArray
    incidence_deg: FloatArray


@dataclass(frozen=True)
class CoordinateConversion:
    """GRD slant↔ground range polynomials per azimuth time (``srgr`` and ``grsr`` coefficient rows)."""

    t: FloatArray
    sr0: FloatArray
    srgr: FloatArray
    gr0: FloatArray
    grsr: FloatArray


@dataclass(frozen=True)
class Annotation:
    polarisation: str
    mission: str
    mode: str
    pass_direction: str
    t0: np.datetime64
    n_lines: int
    n_samples: int
    range_pixel_spacing_m: float
    azimuth_pixel_spacing_m: float
    azimuth_time_interval_s: float
    slant_range_time_s: float
    range_sampling_rate_hz: float
    radar_frequency_hz: float
    incidence_mid_deg: float
    first_line_s: float
    last_line_s: float
    orbit: Orbit
    grid: GeolocationGrid
    conversion: CoordinateConversion


def read_annotation(root: ET.Element) -> Annotation:
    t0 = parse_time(_text(root, "imageAnnotation/imageInformation/productFirstLineUtcTime"))
    info = "imageAnnotation/imageInformation/"
    orbits = root.findall("generalAnnotation/orbitList/orbit")
    if len(orbits) < 4:
        raise SafeError(f"annotation holds {len(orbits)} orbit state vectors, at least 4 are needed")
    ot = np.array([_seconds(parse_time(_text(o, "time")), t0) for o in orbits])
    pos = np.array([[_float(o, f"position/{a}") for a in "xyz"] for o in orbits])
    vel = np.array([[_float(o, f"velocity/{a}") for a in "xyz"] for o in orbits])
    order = np.argsort(ot)
    orbit = Orbit(ot[order], pos[order], vel[order])

    pts = root.findall("geolocationGrid/geolocationGridPointList/geolocationGridPoint")
    if not pts:
        raise SafeError("annotation holds no geolocation grid")

    def col(name: str) -> FloatArray:
        return np.array([_float(p, name) for p in pts])

    grid = GeolocationGrid(
        line=col("line"),
        pixel=col("pixel"),
        azimuth_time=np.array([_seconds(parse_time(_text(p, "azimuthTime")), t0) for p in pts]),
        slant_range_time=col("slantRangeTime"),
        lat=col("latitude"),
        lon=col("longitude"),
        height=col("height"),
        incidence_deg=col("incidenceAngle"),
    )
    ccs = root.findall("coordinateConversion/coordinateConversionList/coordinateConversion")
    if not ccs:
        raise SafeError("annotation holds no coordinateConversion (is this a GRD?)")
    conversion = CoordinateConversion(
        t=np.array([_seconds(parse_time(_text(c, "azimuthTime")), t0) for c in ccs]),
        sr0=np.array([_float(c, "sr0") for c in ccs]),
        srgr=np.array([_floats(c.find("srgrCoefficients"), "srgrCoefficients") for c in ccs]),
        gr0=np.array([_float(c, "gr0") for c in ccs]),
        grsr=np.array([_floats(c.find("grsrCoefficients"), "grsrCoefficients") for c in ccs]),
    )
    return Annotation(
        polarisation=_text(root, "adsHeader/polarisation"),
        mission=_text(root, "adsHeader/missionId"),
        mode=_text(root, "adsHeader/mode"),
        pass_direction=_text(root, "generalAnnotation/productInformation/pass"),
        t0=t0,
        n_lines=int(_text(root, info + "numberOfLines")),
        n_samples=int(_text(root, info + "numberOfSamples")),
        range_pixel_spacing_m=_float(root, info + "rangePixelSpacing"),
        azimuth_pixel_spacing_m=_float(root, info + "azimuthPixelSpacing"),
        azimuth_time_interval_s=_float(root, info + "azimuthTimeInterval"),
        slant_range_time_s=_float(root, info + "slantRangeTime"),
        range_sampling_rate_hz=_float(root, "generalAnnotation/productInformation/rangeSamplingRate"),
        radar_frequency_hz=_float(root, "generalAnnotation/productInformation/radarFrequency"),
        incidence_mid_deg=_float(root, info + "incidenceAngleMidSwath"),
        first_line_s=0.0,
        last_line_s=_seconds(parse_time(_text(root, info + "productLastLineUtcTime")), t0),
        orbit=orbit,
        grid=grid,
        conversion=conversion,
    )


# --------------------------------------------------------------------------------------------
# Calibration and noise: vectors on a sparse (line, pixel) grid; each vector keeps its own
# pixel positions (the noise range vectors and the calibration vectors need not share them).


@dataclass(frozen=True)
class LineVectors:
    """Per-line LUT vectors: ``lines`` (n,), and for each, ``pixels[i]`` and ``values[i]``."""

    lines: IntArray
    pixels: tuple[FloatArray, ...]
    values: tuple[FloatArray, ...]


@dataclass(frozen=True)
class Calibration:
    absolute_constant: float
    sigma: LineVectors
    beta: LineVectors
    gamma: LineVectors
    dn: LineVectors


def read_calibration(root: ET.Element) -> Calibration:
    vecs = root.findall("calibrationVectorList/calibrationVector")
    if not vecs:
        raise SafeError("calibration XML holds no calibrationVector")
    lines = np.array([int(_text(v, "line")) for v in vecs], dtype=np.int64)
    pixels = tuple(_floats(v.find("pixel"), "pixel") for v in vecs)

    def lut(name: str) -> LineVectors:
        values = tuple(_floats(v.find(name), name) for v in vecs)
        for p, x in zip(pixels, values, strict=True):
            if p.shape != x.shape:
                raise SafeError(f"calibration {name}: {x.size} values for {p.size} pixels")
        return LineVectors(lines, pixels, values)

    return Calibration(
        absolute_constant=_float(root, "calibrationInformation/absoluteCalibrationConstant"),
        sigma=lut("sigmaNought"),
        beta=lut("betaNought"),
        gamma=lut("gamma"),
        dn=lut("dn"),
    )


@dataclass(frozen=True)
class AzimuthNoiseBlock:
    """One IPF ≥ 2.9 azimuth noise block (a sub-swath over a line range), inclusive bounds."""

    swath: str
    first_line: int
    last_line: int
    first_sample: int
    last_sample: int
    lines: FloatArray
    values: FloatArray


@dataclass(frozen=True)
class Noise:
    """Thermal noise: the range vectors and, for IPF ≥ 2.9, the azimuth blocks (empty before)."""

    range: LineVectors
    azimuth: tuple[AzimuthNoiseBlock, ...] = field(default=())

    @property
    def format(self) -> str:
        return "range+azimuth" if self.azimuth else "range-only"


def read_noise(root: ET.Element) -> Noise:
    new = root.findall("noiseRangeVectorList/noiseRangeVector")
    if new:
        vecs, lut_tag = new, "noiseRangeLut"
    else:
        vecs, lut_tag = root.findall("noiseVectorList/noiseVector"), "noiseLut"
    if not vecs:
        raise SafeError("noise XML holds neither noiseRangeVectorList nor noiseVectorList")
    lines = np.array([int(_text(v, "line")) for v in vecs], dtype=np.int64)
    pixels = tuple(_floats(v.find("pixel"), "pixel") for v in vecs)
    values = tuple(_floats(v.find(lut_tag), lut_tag) for v in vecs)
    for p, x in zip(pixels, values, strict=True):
        if p.shape != x.shape:
            raise SafeError(f"noise {lut_tag}: {x.size} values for {p.size} pixels")
    blocks = []
    for b in root.findall("noiseAzimuthVectorList/noiseAzimuthVector"):
        az_lines = _floats(b.find("line"), "line")
        az_values = _floats(b.find("noiseAzimuthLut"), "noiseAzimuthLut")
        if az_lines.shape != az_values.shape:
            raise SafeError(f"noiseAzimuthLut: {az_values.size} values for {az_lines.size} lines")
        swath_el = b.find("swath")
        blocks.append(
            AzimuthNoiseBlock(
                swath=(swath_el.text or "").strip() if swath_el is not None else "",
                first_line=int(_text(b, "firstAzimuthLine")),
                last_line=int(_text(b, "lastAzimuthLine")),
                first_sample=int(_text(b, "firstRangeSample")),
                last_sample=int(_text(b, "lastRangeSample")),
                lines=az_lines,
                values=az_values,
            )
        )
    return Noise(LineVectors(lines, pixels, values), tuple(blocks))


# --------------------------------------------------------------------------------------------
# The product


@dataclass(frozen=True)
class Polarisation:
    name: str
    annotation: Annotation
    calibration: Calibration
    noise: Noise
    measurement: str
    """GDAL path of the measurement raster (GeoTIFF or CDSE COG)."""


@dataclass(frozen=True)
class GrdProduct:
    path: Path
    product_name: str
    ipf_version: str
    polarisations: dict[str, Polarisation]


def read_ipf_version(manifest: ET.Element) -> str:
    for el in manifest.iter():
        if el.tag.endswith("}software") and el.get("name") == "Sentinel-1 IPF" and el.get("version"):
            return str(el.get("version"))
    return "unknown"


def open_grd(path: str | Path | SafeSource, polarisations: tuple[str, ...] | None = None) -> GrdProduct:
    """Read the metadata of every (or the named) polarisation of a GRD SAFE; no pixels are read.

    ``path``: a local ``.SAFE`` directory or ``.zip``, or any :class:`SafeSource` (e.g. an
    :class:`S3SafeSource`). CDSE's COG-GRD products (``…_COG.SAFE``, ``…-cog.tiff`` measurements and
    ``…-cog.xml`` annotation) have the same layout and are read the same way.
    """
    src = path if isinstance(path, SafeSource) else SafeSource(path)
    ipf = read_ipf_version(src.xml("manifest.safe"))
    pols = polarisations or src.polarisations()
    if not pols:
        raise SafeError(f"{path}: no GRD annotation found")
    out: dict[str, Polarisation] = {}
    for pol in pols:
        ann = read_annotation(src.xml(src.find("annotation", pol)))
        cal = read_calibration(src.xml(src.find("annotation/calibration", pol, "calibration-")))
        noise = read_noise(src.xml(src.find("annotation/calibration", pol, "noise-")))
        out[pol.upper()] = Polarisation(pol.upper(), ann, cal, noise, src.gdal_path(src.find("measurement", pol)))
    return GrdProduct(src.path, src.product_name, ipf, out)
