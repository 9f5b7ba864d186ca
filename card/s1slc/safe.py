"""Reading a Sentinel-1 IW/EW SLC SAFE (directory or ``.zip``): per swath and polarisation, the
annotation fields the TOPS chain needs, and the complex pixels of one burst window.

Times are float seconds since the swath's own ``productFirstLineUtcTime`` (``SlcSwath.t0``), as in
:mod:`card.s1grd.safe`, so that the orbit, the burst list and the FM-rate/Doppler estimates share
one exact axis. Two dates have two axes; the chain never mixes them.

The container (directory/zip), time parsing, the orbit type and the IPF version come from
:mod:`card.s1grd.safe`; only the SLC file naming and the SLC-only fields are new here:
``swathTiming/burstList`` (azimuth time, byte offset, per-line first/last valid sample, burst id),
``azimuthSteeringRate``, ``azimuthFmRateList`` (both the IPF ≥ 2.8 ``azimuthFmRatePolynomial``
and the older ``c0 c1 c2`` spelling) and ``dopplerCentroid/dcEstimateList`` (``dataDcPolynomial``).
"""

from __future__ import annotations

import math
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from card.s1grd.safe import (  # the annotation's field readers: one SAFE grammar for GRD and SLC
    GeolocationGrid,
    Orbit,
    SafeError,
    SafeSource,
    _float,
    _text,
    parse_time,
    read_ipf_version,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ComplexArray = npt.NDArray[np.complex64]

SLC_FILE = re.compile(r"^(annotation|measurement)/s1[abcd]-((?:iw|ew)[1-5]|s[1-6])-slc-([hv][hv])-[^/]+\.(xml|tiff?)$")

BurstReader = Callable[[int, int, int, int], ComplexArray]
"""(row0, row1, col0, col1) → complex pixels of the swath's measurement (half-open, inside the image)."""


def _seconds(t: np.datetime64, t0: np.datetime64) -> float:
    return float((t - t0) / np.timedelta64(1, "ns")) * 1e-9


def _ints(root: ET.Element, path: str) -> IntArray:
    return np.array(_text(root, path).split(), dtype=np.int64)


@dataclass(frozen=True)
class Burst:
    """One burst: lines ``first_line … first_line + lines − 1`` of the measurement."""

    index: int
    burst_id: int | None
    """ESA's relative burst id (IPF ≥ 3.4), the same ground footprint on every repeat of the track."""
    azimuth_time_s: float
    """Zero-Doppler time of the burst's first line (s since the swath's t0)."""
    azimuth_anx_time_s: float
    """Time since the ascending node crossing: matches bursts across dates when there is no id."""
    first_line: int
    lines: int
    byte_offset: int
    first_valid_sample: IntArray
    """Per line of the burst; −1 on lines without valid data."""
    last_valid_sample: IntArray

    @property
    def valid_lines(self) -> tuple[int, int]:
        """First and last (inclusive) line of the burst, relative to its first line, holding valid data."""
        ok = np.flatnonzero(self.first_valid_sample >= 0)
        if ok.size == 0:
            return (0, -1)
        return int(ok[0]), int(ok[-1])

    @property
    def valid_samples(self) -> tuple[int, int]:
        """The range sample interval (inclusive) valid on every valid line: the safe rectangle."""
        ok = self.first_valid_sample >= 0
        if not ok.any():
            return (0, -1)
        return int(self.first_valid_sample[ok].max()), int(self.last_valid_sample[ok].min())


@dataclass(frozen=True)
class RangePolynomials:
    """Per azimuth time ``t`` (s since t0): Σ c_k (τ − τ0)^k in two-way slant-range time τ."""

    t: FloatArray
    tau0: FloatArray
    coeffs: FloatArray
    """(n, k) coefficient rows."""

    def nearest(self, t: float) -> tuple[float, FloatArray]:
        """The estimate nearest in azimuth time (as s1-reader picks one per burst)."""
        k = int(np.argmin(np.abs(self.t - t)))
        return float(self.tau0[k]), self.coeffs[k]


@dataclass(frozen=True)
class SlcSwath:
    product_name: str
    swath: str
    polarisation: str
    mission: str
    pass_direction: str
    t0: np.datetime64
    n_lines: int
    n_samples: int
    lines_per_burst: int
    azimuth_time_interval_s: float
    slant_range_time_s: float
    range_sampling_rate_hz: float
    radar_frequency_hz: float
    azimuth_steering_rate_rad_s: float
    orbit: Orbit
    bursts: tuple[Burst, ...]
    fm_rate: RangePolynomials
    doppler: RangePolynomials
    grid: GeolocationGrid
    measurement: str | None
    """GDAL path of the complex measurement raster; None in annotation-only test products."""

    @property
    def wavelength_m(self) -> float:
        return 299792458.0 / self.radar_frequency_hz

    @property
    def start_time(self) -> np.datetime64:
        return self.t0


def _read_orbit(root: ET.Element, t0: np.datetime64) -> Orbit:
    orbits = root.findall("generalAnnotation/orbitList/orbit")
    if len(orbits) < 4:
        raise SafeError(f"annotation holds {len(orbits)} orbit state vectors, at least 4 are needed")
    ot = np.array([_seconds(parse_time(_text(o, "time")), t0) for o in orbits])
    pos = np.array([[_float(o, f"position/{a}") for a in "xyz"] for o in orbits])
    vel = np.array([[_float(o, f"velocity/{a}") for a in "xyz"] for o in orbits])
    order = np.argsort(ot)
    return Orbit(ot[order], pos[order], vel[order])


def _read_grid(root: ET.Element, t0: np.datetime64) -> GeolocationGrid:
    pts = root.findall("geolocationGrid/geolocationGridPointList/geolocationGridPoint")
    if not pts:
        raise SafeError("annotation holds no geolocation grid")

    def col(name: str) -> FloatArray:
        return np.array([_float(p, name) for p in pts])

    return GeolocationGrid(
        line=col("line"),
        pixel=col("pixel"),
        azimuth_time=np.array([_seconds(parse_time(_text(p, "azimuthTime")), t0) for p in pts]),
        slant_range_time=col("slantRangeTime"),
        lat=col("latitude"),
        lon=col("longitude"),
        height=col("height"),
        incidence_deg=col("incidenceAngle"),
    )


def _polynomials(items: list[ET.Element], t0: np.datetime64, poly_tag: str, where: str) -> RangePolynomials:
    if not items:
        raise SafeError(f"annotation holds no {where}")
    rows = []
    for it in items:
        el = it.find(poly_tag)
        if el is not None and el.text:
            rows.append(np.array(el.text.split(), dtype=np.float64))
        else:  # IPF < 2.8 wrote the FM rate as separate c0, c1, c2 elements
            rows.append(np.array([_float(it, c) for c in ("c0", "c1", "c2")]))
    width = max(len(r) for r in rows)
    coeffs = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        coeffs[i, : len(r)] = r
    return RangePolynomials(
        t=np.array([_seconds(parse_time(_text(it, "azimuthTime")), t0) for it in items]),
        tau0=np.array([_float(it, "t0") for it in items]),
        coeffs=coeffs,
    )


def read_slc_annotation(root: ET.Element, product_name: str, measurement: str | None) -> SlcSwath:
    info = "imageAnnotation/imageInformation/"
    t0 = parse_time(_text(root, info + "productFirstLineUtcTime"))
    lines_per_burst = int(_text(root, "swathTiming/linesPerBurst"))
    dt = _float(root, info + "azimuthTimeInterval")
    bursts = []
    for i, b in enumerate(root.findall("swathTiming/burstList/burst")):
        id_el = b.find("burstId")
        first = _ints(b, "firstValidSample")
        last = _ints(b, "lastValidSample")
        if first.size != lines_per_burst or last.size != lines_per_burst:
            raise SafeError(f"burst {i}: {first.size} valid-sample entries for {lines_per_burst} lines")
        bursts.append(
            Burst(
                index=i,
                burst_id=int(id_el.text) if id_el is not None and id_el.text else None,
                azimuth_time_s=_seconds(parse_time(_text(b, "azimuthTime")), t0),
                azimuth_anx_time_s=_float(b, "azimuthAnxTime"),
                first_line=i * lines_per_burst,
                lines=lines_per_burst,
                byte_offset=int(_text(b, "byteOffset")),
                first_valid_sample=first,
                last_valid_sample=last,
            )
        )
    if not bursts:
        raise SafeError("annotation holds no burst list (is this a TOPS SLC?)")
    return SlcSwath(
        product_name=product_name,
        swath=_text(root, "adsHeader/swath"),
        polarisation=_text(root, "adsHeader/polarisation"),
        mission=_text(root, "adsHeader/missionId"),
        pass_direction=_text(root, "generalAnnotation/productInformation/pass"),
        t0=t0,
        n_lines=int(_text(root, info + "numberOfLines")),
        n_samples=int(_text(root, info + "numberOfSamples")),
        lines_per_burst=lines_per_burst,
        azimuth_time_interval_s=dt,
        slant_range_time_s=_float(root, info + "slantRangeTime"),
        range_sampling_rate_hz=_float(root, "generalAnnotation/productInformation/rangeSamplingRate"),
        radar_frequency_hz=_float(root, "generalAnnotation/productInformation/radarFrequency"),
        azimuth_steering_rate_rad_s=math.radians(
            _float(root, "generalAnnotation/productInformation/azimuthSteeringRate")
        ),
        orbit=_read_orbit(root, t0),
        bursts=tuple(bursts),
        fm_rate=_polynomials(
            root.findall("generalAnnotation/azimuthFmRateList/azimuthFmRate"),
            t0,
            "azimuthFmRatePolynomial",
            "azimuth FM rate list",
        ),
        doppler=_polynomials(
            root.findall("dopplerCentroid/dcEstimateList/dcEstimate"), t0, "dataDcPolynomial", "Doppler estimates"
        ),
        grid=_read_grid(root, t0),
        measurement=measurement,
    )


@dataclass(frozen=True)
class SlcProduct:
    path: Path
    product_name: str
    ipf_version: str
    swaths: dict[tuple[str, str], SlcSwath]
    """Keyed by (swath, polarisation), e.g. ("IW2", "VV")."""

    @property
    def start_time(self) -> np.datetime64:
        return min(s.t0 for s in self.swaths.values())

    def footprint_lonlat(self) -> list[tuple[float, float]]:
        """Convex hull (lon, lat ring, closed) of every swath's geolocation grid: what
        ``card.mgrs.tiles_intersecting`` takes to list the output tiles of a pair."""
        pts = sorted(
            {
                (float(lo), float(la))
                for s in self.swaths.values()
                for lo, la in zip(s.grid.lon, s.grid.lat, strict=True)
            }
        )

        def half(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
            out: list[tuple[float, float]] = []
            for p in points:
                while (
                    len(out) >= 2
                    and (
                        (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                        - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                    )
                    <= 0
                ):
                    out.pop()
                out.append(p)
            return out

        lower, upper = half(pts), half(pts[::-1])
        ring = lower[:-1] + upper[:-1]
        return ring + ring[:1]


def open_slc(
    path: str | Path, polarisations: tuple[str, ...] | None = None, swaths: tuple[str, ...] | None = None
) -> SlcProduct:
    """Read the annotation of every (or the named) swath and polarisation of an SLC SAFE; no pixels."""
    src = SafeSource(path)
    ipf = read_ipf_version(src.xml("manifest.safe"))
    annotations: dict[tuple[str, str], str] = {}
    measurements: dict[tuple[str, str], str] = {}
    for name in src.names:
        m = SLC_FILE.match(name)
        if not m:
            continue
        key = (m.group(2).upper(), m.group(3).upper())
        (annotations if m.group(1) == "annotation" else measurements)[key] = name
    want_pols = {p.upper() for p in polarisations} if polarisations else None
    want_swaths = {s.upper() for s in swaths} if swaths else None
    out: dict[tuple[str, str], SlcSwath] = {}
    for key in sorted(annotations):
        if (want_swaths and key[0] not in want_swaths) or (want_pols and key[1] not in want_pols):
            continue
        meas = measurements.get(key)
        out[key] = read_slc_annotation(
            src.xml(annotations[key]), src.product_name, src.gdal_path(meas) if meas is not None else None
        )
    if not out:
        raise SafeError(
            f"{path}: no SLC annotation for swaths {swaths or 'any'} and polarisations {polarisations or 'any'}"
        )
    return SlcProduct(src.path, src.product_name, ipf, out)


def rasterio_burst_reader(path: str) -> BurstReader:
    """Windowed reads of a complex int16 (or complex float) measurement, as complex64.

    S1 measurements are uncompressed, untiled TIFFs: GDAL's direct I/O reads only a window's
    samples of each line instead of whole ~26 000-sample strips (12× less CPU for a 2000-sample
    window of the benchmark's one-line strips).
    """
    import rasterio
    import rasterio.errors
    from rasterio.windows import Window

    def read(row0: int, row1: int, col0: int, col1: int) -> ComplexArray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.Env(GTIFF_DIRECT_IO="YES"), rasterio.open(path) as src:
                data = src.read(1, window=Window(col0, row0, col1 - col0, row1 - row0))
        return np.asarray(data, dtype=np.complex64)

    return read
