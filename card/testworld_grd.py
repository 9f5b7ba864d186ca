"""Synthetic Sentinel-1 IW GRDH products over any map area, rendered by the forward radar model.

CARD-BS generation (``card.s1grd``) must be checked on products whose backscatter is *known*:
real GRD annotation (``../shared/data/sentinel1``) lies over Rome, the test world over Bavaria,
and real measurements come without a truth. This module writes a complete, small IW GRDH SAFE
(directory, optionally also the ``.zip``) over a given map grid, with a physically consistent
geometry and a measurement whose DN were computed forwards from a γ0 field on that grid:

* **orbit**: circular, 693 km, inclination 98.18°, inertial and rotated into the Earth-fixed
  frame (so the Earth-fixed velocities include the rotation), solved so that the area's centre is
  seen at zero Doppler, right-looking, at the requested ellipsoid incidence (38° by default, the
  middle of IW2), descending or ascending; state vectors every 10 s, analytic.
* **image geometry**: GRD ground range = arc length on the WGS84 ellipsoid (height 0) in the
  zero-Doppler plane, measured from a fixed near slant range ``sr0``; one ``coordinateConversion``
  entry per second of azimuth time (srgr and grsr, 9 coefficients as IPF writes them); 10 m pixels
  in range, the azimuth time interval that gives 10 m along track; line times carry the IPF's
  bistatic convention (zero-Doppler time = line time + (τ − τ_centre)/2, τ the two-way range time).
* **forward model** per radar pixel (line, sample): line time → srgr entry → slant range (grsr) →
  zero-Doppler time → intersection of the range sphere, the zero-Doppler plane and the ellipsoid →
  map position → γ0 of the field's cell there → DN = √(γ0·A_γ² + η) with A_γ and η interpolated
  bilinearly from the LUTs exactly as written to the XML (the values are rounded to the XML's
  digits first). DN are dithered before rounding to uint16, so the quantisation averages out over
  a parcel instead of biasing it; γ0 = 0 (calm water, below the noise floor) gives DN = ⌊√η⌋, so
  DN² ≤ η there. The outermost ``fill_px`` lines and samples are fill (DN 0), as a real swath edge.
  Multiplicative speckle (gamma, ENL ``speckle_looks``) is off by default.
* **calibration**: betaNought constant, sigmaNought = β/√sin θ, gamma = β/√tan θ (θ the ellipsoid
  incidence), one vector per second of lines, pixel nodes every 40 samples plus the last; noise in
  the IPF ≥ 2.9 format: range vectors (nodes also on both sides of a sub-swath boundary, NESZ ≈
  −23 dB with an antenna-pattern bow) and one azimuth block per sub-swath the crop touches
  (IW1|IW2 at 36.28°, IW2|IW3 at 41.67° incidence, as in the real 2021 product).

The XML has the real files' element names, nesting and ``count`` attributes (taken from the real
S1B GRDH annotation, calibration and noise in ``../shared/data/sentinel1``); sections nothing
reads (downlink, attitude, replica, Doppler centroid, antenna pattern, RFI) are left out, and so
are ``preview/`` and ``support/``. ``manifest.safe`` lists every file with its size and MD5.

Nothing here uses ``card.s1grd``: the geometry is the forward direction (radar → ground) the
reader never takes, so a reader test against these products is evidence, not a tautology.
"""

from __future__ import annotations

import csv
import hashlib
import math
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt
import pystac
import rasterio
import rasterio.errors
import shapely
import shapely.geometry
from pyproj import Transformer
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS

from card.geobox import GeoBox

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
WGS84_B = WGS84_A * (1 - WGS84_F)
GM_EARTH = 3.986004418e14
OMEGA_EARTH = 7.2921150e-5
SPEED_OF_LIGHT = 299792458.0

ORBIT_ALTITUDE_M = 693_000.0
INCLINATION_DEG = 98.18
STATE_VECTOR_STEP_S = 10.0
STATE_VECTOR_MARGIN_S = 60.0
CONVERSION_STEP_S = 1.0
"""One coordinateConversion entry, calibration vector and noise range vector per second, as IPF."""
PIXEL_SPACING_M = 10.0
RADAR_FREQUENCY_HZ = 5.405000454334350e09
RANGE_SAMPLING_RATE_HZ = 6.434523812571428e07
IPF_VERSION = "003.71"
ABSOLUTE_CALIBRATION_CONSTANT = 1.0
BETA_NOUGHT = 4.739733e02
"""betaNought is constant over an IW GRD; this value and ``DN_LUT`` are the real S1B product's."""
DN_LUT = 4.015858e02
LUT_PIXEL_STEP = 40
AZIMUTH_NOISE_LINE_STEP = 10
NESZ_DB = {"VV": -23.0, "VH": -23.5, "HH": -23.0, "HV": -23.5}
SUBSWATHS = (("IW1", 0.0, 36.2763), ("IW2", 36.2763, 41.6659), ("IW3", 41.6659, 90.0))
"""(name, first, last incidence in degrees): the sub-swath boundaries of the real 2021 product."""
POLARISATION_IMAGE = {"VV": "001", "VH": "002", "HH": "001", "HV": "002"}
_S1_ORBIT_OFFSET = {"S1A": 73, "S1B": 27}
"""Absolute → relative orbit: (absolute − offset) mod 175 + 1 (Sentinel-1 product specification)."""


# --- public types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrdAcquisition:
    """What the product is of: when the area's centre is seen, from where, and its identifiers."""

    centre_time: datetime
    """Zero-Doppler time of the area's centre (UTC)."""
    absolute_orbit: int
    datatake: int
    unique: int
    """The product's 4-hex-digit unique identifier (the name's last field)."""
    mission: str = "S1A"
    pass_direction: str = "descending"
    incidence_deg: float = 38.0
    """Ellipsoid incidence angle at the area's centre."""

    @property
    def relative_orbit(self) -> int:
        offset = _S1_ORBIT_OFFSET.get(self.mission, 73)
        return (self.absolute_orbit - offset) % 175 + 1


@dataclass(frozen=True)
class BackscatterField:
    """The truth: linear γ0 per polarisation on a projected map grid, constant within each cell.

    ``outside`` is γ0 beyond the grid (the product covers the grid plus a margin). γ0 = 0 means
    below the noise floor (calm water); NaN is not allowed (a radar sees something everywhere).
    """

    grid: GeoBox
    gamma0: dict[str, npt.NDArray[np.floating[Any]]]
    outside: dict[str, float]


@dataclass(frozen=True)
class SyntheticGrd:
    name: str
    """``S1A_IW_GRDH_1SDV_<start>_<stop>_<absolute orbit>_<datatake>_<unique>`` (no ``.SAFE``)."""
    safe: Path
    zip: Path | None
    start: datetime
    """First line time."""
    stop: datetime
    """Last line time."""
    acquisition: GrdAcquisition
    polarisations: tuple[str, ...]
    measurements: dict[str, Path]
    footprint: Any
    """lon/lat polygon of the image corners (shapely)."""
    shape: tuple[int, int]
    """(lines, samples)."""
    fill_px: int
    geometry: Any = field(default=None, repr=False, compare=False)
    """The generator's own image geometry (for :func:`radar_position`)."""


def relative_to_absolute_orbit(mission: str, when: datetime, relative_orbit: int) -> int:
    """A plausible absolute orbit on ``when`` that lies on ``relative_orbit`` (175 orbits in 12
    days, anchored on S1A's orbit 39156 of 2021-08-09 17:39:53)."""
    anchor = datetime(2021, 8, 9, 17, 39, 53, tzinfo=UTC)
    estimate = 39156 + round((when - anchor).total_seconds() / 86400 * 175 / 12)
    offset = _S1_ORBIT_OFFSET.get(mission, 73)
    shift = (relative_orbit - 1 - (estimate - offset)) % 175
    return estimate + shift - (175 if shift > 87 else 0)


def product_name(mission: str, start: datetime, stop: datetime, absolute_orbit: int, datatake: int, unique: int) -> str:
    return (
        f"{mission}_IW_GRDH_1SDV_{start:%Y%m%dT%H%M%S}_{stop:%Y%m%dT%H%M%S}"
        f"_{absolute_orbit:06d}_{datatake:06X}_{unique:04X}"
    )


# --- orbit --------------------------------------------------------------------------------------


class CircularOrbit:
    """A circular inertial orbit seen from the rotating Earth; t in seconds since ``epoch``.

    The inertial frame coincides with the Earth-fixed one at the epoch, so the right ascension of
    the ascending node is an Earth-fixed longitude at the epoch.
    """

    def __init__(self, raan_rad: float, u0_rad: float, radius_m: float, inclination_rad: float) -> None:
        self.raan, self.u0, self.r, self.inc = raan_rad, u0_rad, radius_m, inclination_rad
        self.n = math.sqrt(GM_EARTH / radius_m**3)
        co, so, ci, si = math.cos(raan_rad), math.sin(raan_rad), math.cos(inclination_rad), math.sin(inclination_rad)
        self._node = np.array([co, so, 0.0])
        self._perp = np.array([-so * ci, co * ci, si])

    def state(self, t: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Earth-fixed position, velocity and acceleration, each (..., 3)."""
        tt = np.asarray(t, dtype=np.float64)[..., None]
        u = self.u0 + self.n * tt
        cu, su = np.cos(u), np.sin(u)
        r_in = self.r * (cu * self._node + su * self._perp)
        v_in = self.r * self.n * (-su * self._node + cu * self._perp)
        a_in = -(self.n**2) * r_in
        th = OMEGA_EARTH * tt[..., 0]
        ct, st = np.cos(th), np.sin(th)

        def rot(v: FloatArray) -> FloatArray:
            return np.stack([ct * v[..., 0] + st * v[..., 1], -st * v[..., 0] + ct * v[..., 1], v[..., 2]], axis=-1)

        w = OMEGA_EARTH
        pos = rot(r_in)
        vel = rot(v_in) + np.stack([w * pos[..., 1], -w * pos[..., 0], np.zeros_like(pos[..., 0])], axis=-1)
        acc = (
            rot(a_in)
            + np.stack([2 * w * vel[..., 1], -2 * w * vel[..., 0], np.zeros_like(pos[..., 0])], axis=-1)
            + np.stack([w * w * pos[..., 0], w * w * pos[..., 1], np.zeros_like(pos[..., 0])], axis=-1)
        )
        return pos, vel, acc


def ecef(lon_deg: npt.ArrayLike, lat_deg: npt.ArrayLike, h: npt.ArrayLike = 0.0) -> FloatArray:
    lon, lat = np.radians(np.asarray(lon_deg, dtype=np.float64)), np.radians(np.asarray(lat_deg, dtype=np.float64))
    e2 = WGS84_F * (2 - WGS84_F)
    n = WGS84_A / np.sqrt(1 - e2 * np.sin(lat) ** 2)
    hh = np.asarray(h, dtype=np.float64)
    return np.stack(
        np.broadcast_arrays(
            (n + hh) * np.cos(lat) * np.cos(lon),
            (n + hh) * np.cos(lat) * np.sin(lon),
            (n * (1 - e2) + hh) * np.sin(lat),
        ),
        axis=-1,
    )


def _normal(p: FloatArray) -> FloatArray:
    g = np.stack([p[..., 0] / WGS84_A**2, p[..., 1] / WGS84_A**2, p[..., 2] / WGS84_B**2], axis=-1)
    out: FloatArray = g / np.linalg.norm(g, axis=-1, keepdims=True)
    return out


def _dot(a: FloatArray, b: FloatArray) -> FloatArray:
    out: FloatArray = np.einsum("...k,...k->...", a, b)
    return out


def incidence_deg(p: FloatArray, s: FloatArray) -> FloatArray:
    """Ellipsoid incidence at ground point ``p`` seen from ``s`` (degrees)."""
    look = s - p
    cos = _dot(_normal(p), look) / np.linalg.norm(look, axis=-1)
    out: FloatArray = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return out


def solve_orbit(centre: FloatArray, acquisition: GrdAcquisition) -> CircularOrbit:
    """The orbit that sees ``centre`` (ECEF, on the ellipsoid) at zero Doppler at t = 0, on the
    right, at the acquisition's incidence; Newton on (RAAN, argument of latitude)."""
    r = WGS84_A + ORBIT_ALTITUDE_M
    inc = math.radians(INCLINATION_DEG)
    descending = acquisition.pass_direction.lower().startswith("desc")
    lon_c = math.atan2(centre[1], centre[0])
    lat_c = math.atan2(centre[2], math.hypot(centre[0], centre[1]))
    theta = math.radians(acquisition.incidence_deg)
    gamma = theta - math.asin(WGS84_A * math.sin(theta) / r)
    heading = math.asin(max(-1.0, min(1.0, math.cos(inc) / math.cos(lat_c))))
    if descending:
        heading = math.pi - heading
    bearing = heading - math.pi / 2  # right-looking: the track lies to the scene's left
    lat_s = math.asin(math.sin(lat_c) * math.cos(gamma) + math.cos(lat_c) * math.sin(gamma) * math.cos(bearing))
    lon_s = lon_c + math.atan2(
        math.sin(bearing) * math.sin(gamma) * math.cos(lat_c), math.cos(gamma) - math.sin(lat_c) * math.sin(lat_s)
    )
    u0 = math.asin(max(-1.0, min(1.0, math.sin(lat_s) / math.sin(inc))))
    if descending:
        u0 = math.pi - u0
    raan = lon_s - math.atan2(math.cos(inc) * math.sin(u0), math.cos(u0))

    def residual(x: FloatArray) -> FloatArray:
        s, v, _ = CircularOrbit(float(x[0]), float(x[1]), r, inc).state(0.0)
        d = centre - s
        return np.array(
            [
                _dot(d, v) / (np.linalg.norm(d) * np.linalg.norm(v)),
                math.radians(float(incidence_deg(centre, s))) - theta,
            ]
        )

    x = np.array([raan, u0])
    for _ in range(50):
        f = residual(x)
        jac = np.empty((2, 2))
        for k in range(2):
            dx = np.zeros(2)
            dx[k] = 1e-7
            jac[:, k] = (residual(x + dx) - f) / 1e-7
        step = np.linalg.solve(jac, f)
        x = x - step
        if np.max(np.abs(step)) < 1e-13:
            break
    orbit = CircularOrbit(float(x[0]), float(x[1]), r, inc)
    s, v, _ = orbit.state(0.0)
    right = np.cross(-s / np.linalg.norm(s), v)
    if np.max(np.abs(residual(x))) > 1e-9 or _dot(centre - s, right) <= 0 or (v[2] < 0) != descending:
        raise RuntimeError("no right-looking orbit found for the requested geometry")
    return orbit


def zero_doppler(orbit: CircularOrbit, points: FloatArray, t0: float = 0.0) -> tuple[FloatArray, FloatArray]:
    """(zero-Doppler time, slant range) of ECEF points: the backward direction, for image extents."""
    t = np.full(points.shape[:-1], t0)
    for _ in range(30):
        s, v, a = orbit.state(t)
        d = points - s
        step = _dot(d, v) / (_dot(d, a) - _dot(v, v))
        t = t - step
        if np.max(np.abs(step)) < 1e-10:
            break
    s, _, _ = orbit.state(t)
    return t, np.linalg.norm(points - s, axis=-1)


def ground_point(orbit: CircularOrbit, t: FloatArray, slant_range: FloatArray) -> FloatArray:
    """The point on the ellipsoid (h = 0) at slant range R, in the zero-Doppler plane at t, right of
    the track: P = S + R(cos φ û + sin φ ŵ), Newton on the look angle φ."""
    s, v, _ = orbit.state(t)
    vhat = v / np.linalg.norm(v, axis=-1, keepdims=True)
    down = -s - _dot(-s, vhat)[..., None] * vhat
    down /= np.linalg.norm(down, axis=-1, keepdims=True)
    right = np.cross(down, vhat)
    rs = np.linalg.norm(s, axis=-1)
    rho = 6_366_000.0
    r = np.asarray(slant_range, dtype=np.float64)
    phi = np.arccos(np.clip((rs * rs + r * r - rho * rho) / (2 * rs * r), -1.0, 1.0))
    scale = np.array([1 / WGS84_A**2, 1 / WGS84_A**2, 1 / WGS84_B**2])
    for _ in range(8):
        c, sn = np.cos(phi)[..., None], np.sin(phi)[..., None]
        p = s + r[..., None] * (c * down + sn * right)
        dp = r[..., None] * (-sn * down + c * right)
        g = _dot(p * p, np.broadcast_to(scale, p.shape)) - 1.0
        dg = 2.0 * _dot(p * dp, np.broadcast_to(scale, p.shape))
        phi = phi - g / dg
    c, sn = np.cos(phi)[..., None], np.sin(phi)[..., None]
    out: FloatArray = s + r[..., None] * (c * down + sn * right)
    return out


# --- geometry of the image ----------------------------------------------------------------------


def _q(x: float, digits: int = 15) -> float:
    """The value as the XML will hold it (``%.{digits}e``), so the forward model uses what is read."""
    return float(f"{x:.{digits}e}")


@dataclass
class _Conversion:
    t: FloatArray
    """Entry times, seconds since the epoch."""
    sr0: float
    srgr: FloatArray
    """(n, 9) raw coefficients in (R − sr0)."""
    grsr: FloatArray
    """(n, 9) raw coefficients in ground range."""

    def nearest(self, t: FloatArray) -> IntArray:
        k = np.clip(np.searchsorted(self.t, t, side="right") - 1, 0, len(self.t) - 2)
        out: IntArray = np.where(np.abs(t - self.t[k]) <= np.abs(self.t[k + 1] - t), k, k + 1)
        return out


def _fit_raw(x: FloatArray, y: FloatArray, degree: int = 8) -> FloatArray:
    """Least-squares polynomial in x ≥ 0, fitted on x/X and returned as raw coefficients c_k of x^k."""
    span = float(np.max(x))
    v = np.vander(x / span, degree + 1, increasing=True)
    d, *_ = np.linalg.lstsq(v, y, rcond=None)
    return np.array([_q(float(d[k] / span**k)) for k in range(degree + 1)])


def _horner(coeffs: FloatArray, x: FloatArray) -> FloatArray:
    out = np.zeros_like(x) + coeffs[..., -1]
    for i in range(coeffs.shape[-1] - 2, -1, -1):
        out = out * x + coeffs[..., i]
    return out


@dataclass
class _Image:
    orbit: CircularOrbit
    epoch: datetime
    t_first: float
    ati: float
    n_lines: int
    n_samples: int
    sr0: float
    tau_ref: float
    conversion: _Conversion

    @property
    def c0(self) -> float:
        return -0.5 * self.tau_ref

    def line_time(self, lines: npt.ArrayLike) -> FloatArray:
        return self.t_first + np.asarray(lines, dtype=np.float64) * self.ati

    def locate(self, lines: npt.ArrayLike, samples: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Forward model: radar (line, sample) grids → (ground ECEF, zero-Doppler time, slant range)."""
        tl = self.line_time(lines)
        gr = np.asarray(samples, dtype=np.float64) * PIXEL_SPACING_M
        tl, gr = np.broadcast_arrays(tl, gr)
        cc = self.conversion
        k = cc.nearest(tl)
        r = _horner(cc.grsr[k], gr)
        for _ in range(2):  # the entry is chosen by zero-Doppler time, which depends on the range
            t = tl + self.c0 + r / SPEED_OF_LIGHT
            k = cc.nearest(t)
            r = _horner(cc.grsr[k], gr)
        t = tl + self.c0 + r / SPEED_OF_LIGHT
        return ground_point(self.orbit, t, r), t, r


def _ground_range_curve(orbit: CircularOrbit, t: float, sr0: float, r_end: float) -> tuple[FloatArray, FloatArray]:
    """(slant range, ground range) along the zero-Doppler plane at t: arc length on the ellipsoid."""
    r = np.linspace(sr0, r_end, 4001)
    p = ground_point(orbit, np.full(r.shape, t), r)
    steps = np.linalg.norm(np.diff(p, axis=0), axis=-1)
    return r, np.concatenate([[0.0], np.cumsum(steps)])


def _plan_image(
    truth: BackscatterField, acquisition: GrdAcquisition, margin_m: float, to_lonlat: Transformer
) -> _Image:
    grid = truth.grid
    xmin, ymin, xmax, ymax = grid.bounds
    lon_c, lat_c = to_lonlat.transform(0.5 * (xmin + xmax), 0.5 * (ymin + ymax))
    centre = ecef(lon_c, lat_c, 0.0)
    orbit = solve_orbit(centre, acquisition)
    # the area plus margin, its boundary sampled densely enough for the extremes
    xs = np.linspace(xmin - margin_m, xmax + margin_m, 41)
    ys = np.linspace(ymin - margin_m, ymax + margin_m, 41)
    bx = np.concatenate([xs, xs, np.full(41, xs[0]), np.full(41, xs[-1])])
    by = np.concatenate([np.full(41, ys[0]), np.full(41, ys[-1]), ys, ys])
    lon, lat = to_lonlat.transform(bx, by)
    t_zd, r = zero_doppler(orbit, ecef(lon, lat, 0.0))
    _, r_c = zero_doppler(orbit, centre[None, :])
    tau_ref = _q(2 * float(r_c[0]) / SPEED_OF_LIGHT)
    t_line = t_zd - (2 * r / SPEED_OF_LIGHT - tau_ref) / 2
    # ATI for 10 m along track at the centre
    pc = ground_point(orbit, np.array([0.0, 1.0]), np.full(2, float(r_c[0])))
    ati = _q(PIXEL_SPACING_M / float(np.linalg.norm(pc[1] - pc[0])))
    t_first = math.floor(float(np.min(t_line)) * 1e6) / 1e6
    n_lines = math.ceil((float(np.max(t_line)) - t_first) / ati) + 1
    t_last = t_first + (n_lines - 1) * ati
    sr0 = _q(SPEED_OF_LIGHT * _q(2 * float(np.min(r)) / SPEED_OF_LIGHT) / 2)
    r_end = float(np.max(r)) + 300.0
    n_entries = math.ceil((t_last - t_first) / CONVERSION_STEP_S) + 3
    times = np.array([t_first - CONVERSION_STEP_S + k * CONVERSION_STEP_S for k in range(n_entries)])
    srgr, grsr, far = [], [], []
    for t in times:
        rr, gg = _ground_range_curve(orbit, float(t), sr0, r_end)
        srgr.append(_fit_raw(rr - sr0, gg))
        g_coeffs = _fit_raw(gg, rr)
        grsr.append(g_coeffs)
        far.append(float(np.interp(float(np.max(r)), rr, gg)))
    n_samples = math.ceil(max(far) / PIXEL_SPACING_M) + 1
    conversion = _Conversion(times, sr0, np.array(srgr), np.array(grsr))
    return _Image(orbit, acquisition.centre_time, t_first, ati, n_lines, n_samples, sr0, tau_ref, conversion)


# --- LUTs ---------------------------------------------------------------------------------------


def _lut_lines(n_lines: int, ati: float, beyond: bool) -> list[int]:
    """One vector per second of lines from line 0; the last one beyond the image (calibration,
    like IPF) or on its last line (noise)."""
    per = CONVERSION_STEP_S / ati
    lines = [round(k * per) for k in range(math.ceil((n_lines - 1) / per) + 1)]
    lines = [ln for ln in lines if ln < n_lines - 1]
    lines.append(round(len(lines) * per) if beyond else n_lines - 1)
    return lines


def _lut_pixels(n_samples: int, boundaries: Sequence[int] = ()) -> list[int]:
    """Nodes every 40 samples from each sub-swath's first sample, both sides of a boundary, and the last."""
    starts = [0, *[b + 1 for b in boundaries]]
    ends = [*boundaries, n_samples - 1]
    out: list[int] = []
    for a, b in zip(starts, ends, strict=True):
        out.extend(range(a, b, LUT_PIXEL_STEP))
        out.append(b)
    return sorted(set(out))


def _interp_lut(
    lines: Sequence[int], pixels: Sequence[int], values: FloatArray, ls: FloatArray, ps: FloatArray
) -> FloatArray:
    """Bilinear on the (line, pixel) node grid, clamped at the ends (the LUT definition)."""
    vl = np.asarray(lines, dtype=np.float64)
    per_vector = np.stack([np.interp(ps, np.asarray(pixels, dtype=np.float64), v) for v in values])
    j = np.clip(np.searchsorted(vl, ls, side="right") - 1, 0, len(vl) - 2)
    w = np.clip((ls - vl[j]) / (vl[j + 1] - vl[j]), 0.0, 1.0)
    out: FloatArray = (1 - w)[:, None] * per_vector[j] + w[:, None] * per_vector[j + 1]
    return out


@dataclass
class _Luts:
    cal_lines: list[int]
    cal_pixels: list[int]
    sigma: FloatArray
    beta: FloatArray
    gamma: FloatArray
    dn: FloatArray
    noise_lines: list[int]
    noise_pixels: list[int]
    noise_range: dict[str, FloatArray]
    swaths: list[tuple[str, int, int]]
    """(name, first sample, last sample) of each sub-swath in the image."""
    az_lines: list[int]
    az_values: dict[str, list[FloatArray]]
    """Per polarisation, per sub-swath, the azimuth noise LUT at ``az_lines``."""


def _incidence_at(image: _Image, lines: Sequence[int], pixels: Sequence[int]) -> FloatArray:
    ll, pp = np.meshgrid(np.asarray(lines, dtype=np.float64), np.asarray(pixels, dtype=np.float64), indexing="ij")
    p, t, _ = image.locate(ll, pp)
    s, _, _ = image.orbit.state(t)
    return incidence_deg(p, s)


def _make_luts(image: _Image, polarisations: Sequence[str]) -> _Luts:
    mid = image.n_lines // 2
    inc_row = _incidence_at(image, [mid], list(range(image.n_samples)))[0]
    swaths: list[tuple[str, int, int]] = []
    for name, lo, hi in SUBSWATHS:
        inside = np.flatnonzero((inc_row >= lo) & (inc_row < hi))
        if inside.size:
            swaths.append((name, int(inside[0]), int(inside[-1])))
    swaths[0] = (swaths[0][0], 0, swaths[0][2])
    swaths[-1] = (swaths[-1][0], swaths[-1][1], image.n_samples - 1)
    boundaries = [last for _, _, last in swaths[:-1]]

    cal_lines = _lut_lines(image.n_lines, image.ati, beyond=True)
    cal_pixels = _lut_pixels(image.n_samples)
    theta = np.radians(_incidence_at(image, cal_lines, cal_pixels))
    beta = np.full(theta.shape, BETA_NOUGHT)
    q6 = np.vectorize(lambda x: _q(float(x), 6))
    sigma = q6(beta / np.sqrt(np.sin(theta)))
    gamma = q6(beta / np.sqrt(np.tan(theta)))
    dn = np.full(theta.shape, DN_LUT)

    noise_lines = _lut_lines(image.n_lines, image.ati, beyond=False)
    noise_pixels = _lut_pixels(image.n_samples, boundaries)
    theta_n = _incidence_at(image, noise_lines, noise_pixels)
    sigma_n = BETA_NOUGHT / np.sqrt(np.sin(np.radians(theta_n)))
    bow = np.ones_like(theta_n)
    for _, lo, hi in SUBSWATHS:
        in_swath = (theta_n >= lo) & (theta_n < hi)
        centre, half = 0.5 * (max(lo, 29.0) + min(hi, 46.0)), 0.5 * (min(hi, 46.0) - max(lo, 29.0))
        bow[in_swath] = 1.0 + 0.35 * ((theta_n[in_swath] - centre) / half) ** 2
    noise_range = {
        pol: q6(10 ** (NESZ_DB[pol] / 10) * sigma_n**2 * bow * (1.0 + 0.002 * np.arange(len(noise_lines)))[:, None])
        for pol in polarisations
    }
    az_lines = sorted({*range(0, image.n_lines, AZIMUTH_NOISE_LINE_STEP), image.n_lines - 1})
    az = np.asarray(az_lines, dtype=np.float64)
    az_values = {
        pol: [q6(1.0 + 0.04 * np.sin(2 * np.pi * (az + 97.0 * k + 31.0 * p) / 613.0)) for k, _ in enumerate(swaths)]
        for p, pol in enumerate(polarisations)
    }
    return _Luts(
        cal_lines,
        cal_pixels,
        sigma,
        beta,
        gamma,
        dn,
        noise_lines,
        noise_pixels,
        noise_range,
        swaths,
        az_lines,
        az_values,
    )


def _noise_power(luts: _Luts, pol: str, ls: FloatArray, ps: FloatArray) -> FloatArray:
    eta = _interp_lut(luts.noise_lines, luts.noise_pixels, luts.noise_range[pol], ls, ps)
    factor = np.ones_like(eta)
    az = np.asarray(luts.az_lines, dtype=np.float64)
    for (_, first, last), values in zip(luts.swaths, luts.az_values[pol], strict=True):
        cols = (ps >= first) & (ps <= last)
        factor[:, cols] = np.interp(ls, az, values)[:, None]
    return eta * factor


# --- rendering ----------------------------------------------------------------------------------


def _render(
    image: _Image,
    luts: _Luts,
    truth: BackscatterField,
    polarisations: Sequence[str],
    to_map: Transformer,
    fill_px: int,
    speckle_looks: float | None,
    rng: np.random.Generator,
) -> dict[str, npt.NDArray[np.uint16]]:
    grid = truth.grid
    out = {pol: np.zeros((image.n_lines, image.n_samples), dtype=np.uint16) for pol in polarisations}
    samples = np.arange(image.n_samples, dtype=np.float64)
    gx, gy = grid.transform.c, grid.transform.f
    res = grid.transform.a
    for l0 in range(0, image.n_lines, 128):
        lines = np.arange(l0, min(l0 + 128, image.n_lines), dtype=np.float64)
        p, _, _ = image.locate(lines[:, None], samples[None, :])
        lon, lat, _ = _TO_GEODETIC.transform(p[..., 0], p[..., 1], p[..., 2])
        x, y = to_map.transform(lon, lat)
        col = np.floor((x - gx) / res).astype(np.int64)
        row = np.floor((gy - y) / res).astype(np.int64)
        inside = (col >= 0) & (col < grid.width) & (row >= 0) & (row < grid.height)
        rc, cc = np.where(inside, row, 0), np.where(inside, col, 0)
        a = _interp_lut(luts.cal_lines, luts.cal_pixels, luts.gamma, lines, samples)
        for pol in polarisations:
            g0 = np.where(inside, np.asarray(truth.gamma0[pol], dtype=np.float64)[rc, cc], truth.outside[pol])
            if speckle_looks:
                g0 = g0 * rng.gamma(speckle_looks, 1.0 / speckle_looks, g0.shape)
            eta = _noise_power(luts, pol, lines, samples)
            amplitude = np.sqrt(g0 * a * a + eta)
            dn = np.where(g0 > 0, np.floor(amplitude + rng.random(g0.shape)), np.floor(np.sqrt(eta)))
            out[pol][l0 : l0 + len(lines)] = np.clip(dn, 1, 65535).astype(np.uint16)
    for pol in polarisations:
        if fill_px:
            d = out[pol]
            d[:fill_px], d[-fill_px:], d[:, :fill_px], d[:, -fill_px:] = 0, 0, 0, 0
    return out


_TO_GEODETIC = Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)


# --- XML ----------------------------------------------------------------------------------------


def _utc(epoch: datetime, seconds: float) -> str:
    when = epoch + timedelta(microseconds=round(seconds * 1e6))
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _e(x: float, digits: int = 15) -> str:
    return f"{x:.{digits}e}"


def _list(values: Sequence[float] | FloatArray, digits: int = 6) -> str:
    return " ".join(f"{float(v):.{digits}e}" for v in values)


@dataclass
class _Header:
    mission: str
    pol: str
    start: str
    stop: str
    absolute_orbit: int
    datatake: int
    image_number: str

    def xml(self) -> str:
        return (
            "  <adsHeader>\n"
            f"    <missionId>{self.mission}</missionId>\n    <productType>GRD</productType>\n"
            f"    <polarisation>{self.pol}</polarisation>\n    <mode>IW</mode>\n    <swath>IW</swath>\n"
            f"    <startTime>{self.start}</startTime>\n    <stopTime>{self.stop}</stopTime>\n"
            f"    <absoluteOrbitNumber>{self.absolute_orbit}</absoluteOrbitNumber>\n"
            f"    <missionDataTakeId>{self.datatake}</missionDataTakeId>\n"
            f"    <imageNumber>{self.image_number}</imageNumber>\n"
            "  </adsHeader>\n"
        )


@dataclass
class _GeoGrid:
    lines: list[int]
    pixels: list[int]
    times: FloatArray
    tau: FloatArray
    lat: FloatArray
    lon: FloatArray
    incidence: FloatArray
    elevation: FloatArray


def _geolocation_grid(image: _Image) -> _GeoGrid:
    lines = sorted({*np.linspace(0, image.n_lines - 1, 10).round().astype(int).tolist()})
    pixels = sorted({*np.linspace(0, image.n_samples - 1, 21).round().astype(int).tolist()})
    ll, pp = np.meshgrid(np.asarray(lines, dtype=np.float64), np.asarray(pixels, dtype=np.float64), indexing="ij")
    p, t, r = image.locate(ll, pp)
    s, _, _ = image.orbit.state(t)
    lon, lat, _ = _TO_GEODETIC.transform(p[..., 0], p[..., 1], p[..., 2])
    look = p - s
    elevation = np.degrees(np.arccos(_dot(look, -s) / (np.linalg.norm(look, axis=-1) * np.linalg.norm(s, axis=-1))))
    return _GeoGrid(lines, pixels, t, 2 * r / SPEED_OF_LIGHT, lat, lon, incidence_deg(p, s), elevation)


def _annotation_xml(image: _Image, header: _Header, geo: _GeoGrid, luts: _Luts, acq: GrdAcquisition) -> str:
    ep = image.epoch
    t_last = image.t_first + (image.n_lines - 1) * image.ati
    sv_t0 = math.floor((image.t_first - STATE_VECTOR_MARGIN_S) / STATE_VECTOR_STEP_S) * STATE_VECTOR_STEP_S
    sv_times = np.arange(sv_t0, t_last + STATE_VECTOR_MARGIN_S + STATE_VECTOR_STEP_S, STATE_VECTOR_STEP_S)
    pos, vel, _ = image.orbit.state(sv_times)
    orbits = "".join(
        "      <orbit>\n"
        f"        <time>{_utc(ep, float(t))}</time>\n        <frame>Earth Fixed</frame>\n"
        "        <position>\n"
        + "".join(f"          <{a}>{_e(float(pos[i, k]))}</{a}>\n" for k, a in enumerate("xyz"))
        + "        </position>\n        <velocity>\n"
        + "".join(f"          <{a}>{_e(float(vel[i, k]))}</{a}>\n" for k, a in enumerate("xyz"))
        + "        </velocity>\n      </orbit>\n"
        for i, t in enumerate(sv_times)
    )
    s_mid, v_mid, _ = image.orbit.state(0.0)
    north = np.array([0.0, 0.0, 1.0])
    up = s_mid / np.linalg.norm(s_mid)
    east = np.cross(north, up)
    east /= np.linalg.norm(east)
    nth = np.cross(up, east)
    heading = math.degrees(math.atan2(float(_dot(v_mid, east)), float(_dot(v_mid, nth))))
    n_points = len(geo.lines) * len(geo.pixels)
    points = "".join(
        "      <geolocationGridPoint>\n"
        f"        <azimuthTime>{_utc(ep, float(geo.times[i, j]))}</azimuthTime>\n"
        f"        <slantRangeTime>{_e(float(geo.tau[i, j]))}</slantRangeTime>\n"
        f"        <line>{ln}</line>\n        <pixel>{px}</pixel>\n"
        f"        <latitude>{_e(float(geo.lat[i, j]))}</latitude>\n"
        f"        <longitude>{_e(float(geo.lon[i, j]))}</longitude>\n"
        f"        <height>{_e(0.0)}</height>\n"
        f"        <incidenceAngle>{_e(float(geo.incidence[i, j]))}</incidenceAngle>\n"
        f"        <elevationAngle>{_e(float(geo.elevation[i, j]))}</elevationAngle>\n"
        "      </geolocationGridPoint>\n"
        for i, ln in enumerate(geo.lines)
        for j, px in enumerate(geo.pixels)
    )
    cc = image.conversion
    conversions = "".join(
        "      <coordinateConversion>\n"
        f"        <azimuthTime>{_utc(ep, float(t))}</azimuthTime>\n"
        f"        <slantRangeTime>{_e(2 * cc.sr0 / SPEED_OF_LIGHT)}</slantRangeTime>\n"
        f"        <sr0>{_e(cc.sr0)}</sr0>\n"
        f'        <srgrCoefficients count="{cc.srgr.shape[1]}">{_list(cc.srgr[k], 15)}</srgrCoefficients>\n'
        f"        <gr0>{_e(0.0)}</gr0>\n"
        f'        <grsrCoefficients count="{cc.grsr.shape[1]}">{_list(cc.grsr[k], 15)}</grsrCoefficients>\n'
        "      </coordinateConversion>\n"
        for k, t in enumerate(cc.t)
    )
    merges = "".join(
        "      <swathMerge>\n"
        f"        <swath>{name}</swath>\n"
        '        <swathBoundsList count="1">\n          <swathBounds>\n'
        f"            <azimuthTime>{_utc(ep, image.t_first)}</azimuthTime>\n"
        "            <firstAzimuthLine>0</firstAzimuthLine>\n"
        f"            <firstRangeSample>{first}</firstRangeSample>\n"
        f"            <lastAzimuthLine>{image.n_lines - 1}</lastAzimuthLine>\n"
        f"            <lastRangeSample>{last}</lastRangeSample>\n"
        "          </swathBounds>\n        </swathBoundsList>\n      </swathMerge>\n"
        for name, first, last in luts.swaths
    )
    terrain = "".join(
        f"      <terrainHeight>\n        <azimuthTime>{_utc(ep, float(t))}</azimuthTime>\n"
        f"        <value>{_e(0.0)}</value>\n      </terrainHeight>\n"
        for t in cc.t[::5]
    )
    mid_inc = float(geo.incidence[len(geo.lines) // 2, len(geo.pixels) // 2])
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<product>\n'
        + header.xml()
        + "  <generalAnnotation>\n    <productInformation>\n"
        f"      <pass>{acq.pass_direction.capitalize()}</pass>\n"
        "      <timelinessCategory>Fast-24h</timelinessCategory>\n"
        f"      <platformHeading>{_e(heading)}</platformHeading>\n      <projection>Ground Range</projection>\n"
        f"      <rangeSamplingRate>{_e(RANGE_SAMPLING_RATE_HZ)}</rangeSamplingRate>\n"
        f"      <radarFrequency>{_e(RADAR_FREQUENCY_HZ)}</radarFrequency>\n"
        f"      <azimuthSteeringRate>{_e(1.590368784)}</azimuthSteeringRate>\n"
        "    </productInformation>\n"
        f'    <orbitList count="{len(sv_times)}">\n{orbits}    </orbitList>\n'
        f'    <terrainHeightList count="{len(cc.t[::5])}">\n{terrain}    </terrainHeightList>\n'
        "  </generalAnnotation>\n  <imageAnnotation>\n    <imageInformation>\n"
        f"      <productFirstLineUtcTime>{_utc(ep, image.t_first)}</productFirstLineUtcTime>\n"
        f"      <productLastLineUtcTime>{_utc(ep, t_last)}</productLastLineUtcTime>\n"
        f"      <slantRangeTime>{_e(2 * image.sr0 / SPEED_OF_LIGHT)}</slantRangeTime>\n"
        "      <pixelValue>Detected</pixelValue>\n      <outputPixels>16 bit Unsigned Integer</outputPixels>\n"
        f"      <rangePixelSpacing>{_e(PIXEL_SPACING_M, 6)}</rangePixelSpacing>\n"
        f"      <azimuthPixelSpacing>{_e(PIXEL_SPACING_M, 6)}</azimuthPixelSpacing>\n"
        f"      <azimuthTimeInterval>{_e(image.ati)}</azimuthTimeInterval>\n"
        f"      <azimuthFrequency>{_e(1 / image.ati)}</azimuthFrequency>\n"
        f"      <numberOfSamples>{image.n_samples}</numberOfSamples>\n"
        f"      <numberOfLines>{image.n_lines}</numberOfLines>\n"
        f"      <incidenceAngleMidSwath>{_e(mid_inc)}</incidenceAngleMidSwath>\n"
        "    </imageInformation>\n    <processingInformation>\n"
        "      <srgrConversionApplied>true</srgrConversionApplied>\n"
        "      <detectionPerformed>true</detectionPerformed>\n"
        "      <thermalNoiseCorrectionPerformed>false</thermalNoiseCorrectionPerformed>\n"
        "      <ellipsoidName>WGS84</ellipsoidName>\n"
        f"      <ellipsoidSemiMajorAxis>{_e(WGS84_A)}</ellipsoidSemiMajorAxis>\n"
        f"      <ellipsoidSemiMinorAxis>{_e(WGS84_B)}</ellipsoidSemiMinorAxis>\n"
        "      <bistaticDelayCorrectionApplied>true</bistaticDelayCorrectionApplied>\n"
        "      <orbitSource>Auxiliary</orbitSource>\n"
        "    </processingInformation>\n  </imageAnnotation>\n"
        "  <swathTiming>\n    <linesPerBurst>0</linesPerBurst>\n    <samplesPerBurst>0</samplesPerBurst>\n"
        '    <burstList count="0"/>\n  </swathTiming>\n'
        f'  <geolocationGrid>\n    <geolocationGridPointList count="{n_points}">\n{points}'
        "    </geolocationGridPointList>\n  </geolocationGrid>\n"
        f'  <coordinateConversion>\n    <coordinateConversionList count="{len(cc.t)}">\n{conversions}'
        "    </coordinateConversionList>\n  </coordinateConversion>\n"
        f'  <swathMerging>\n    <swathMergeList count="{len(luts.swaths)}">\n{merges}'
        "    </swathMergeList>\n  </swathMerging>\n</product>\n"
    )


def _calibration_xml(image: _Image, header: _Header, luts: _Luts) -> str:
    n = len(luts.cal_pixels)
    pixels = " ".join(str(p) for p in luts.cal_pixels)
    vectors = "".join(
        "    <calibrationVector>\n"
        f"      <azimuthTime>{_utc(image.epoch, float(image.line_time(ln)))}</azimuthTime>\n"
        f"      <line>{ln}</line>\n"
        f'      <pixel count="{n}">{pixels}</pixel>\n'
        f'      <sigmaNought count="{n}">{_list(luts.sigma[i])}</sigmaNought>\n'
        f'      <betaNought count="{n}">{_list(luts.beta[i])}</betaNought>\n'
        f'      <gamma count="{n}">{_list(luts.gamma[i])}</gamma>\n'
        f'      <dn count="{n}">{_list(luts.dn[i])}</dn>\n'
        "    </calibrationVector>\n"
        for i, ln in enumerate(luts.cal_lines)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<calibration>\n' + header.xml() + "  <calibrationInformation>\n"
        f"    <absoluteCalibrationConstant>{_e(ABSOLUTE_CALIBRATION_CONSTANT, 6)}</absoluteCalibrationConstant>\n"
        "  </calibrationInformation>\n"
        f'  <calibrationVectorList count="{len(luts.cal_lines)}">\n{vectors}  </calibrationVectorList>\n'
        "</calibration>\n"
    )


def _noise_xml(image: _Image, header: _Header, luts: _Luts, pol: str) -> str:
    n = len(luts.noise_pixels)
    pixels = " ".join(str(p) for p in luts.noise_pixels)
    ranges = "".join(
        "    <noiseRangeVector>\n"
        f"      <azimuthTime>{_utc(image.epoch, float(image.line_time(ln)))}</azimuthTime>\n"
        f"      <line>{ln}</line>\n"
        f'      <pixel count="{n}">{pixels}</pixel>\n'
        f'      <noiseRangeLut count="{n}">{_list(luts.noise_range[pol][i])}</noiseRangeLut>\n'
        "    </noiseRangeVector>\n"
        for i, ln in enumerate(luts.noise_lines)
    )
    az_lines = " ".join(str(x) for x in luts.az_lines)
    m = len(luts.az_lines)
    azimuths = "".join(
        "    <noiseAzimuthVector>\n"
        f"      <swath>{name}</swath>\n"
        f"      <firstAzimuthLine>0</firstAzimuthLine>\n      <firstRangeSample>{first}</firstRangeSample>\n"
        f"      <lastAzimuthLine>{image.n_lines - 1}</lastAzimuthLine>\n"
        f"      <lastRangeSample>{last}</lastRangeSample>\n"
        f'      <line count="{m}">{az_lines}</line>\n'
        f'      <noiseAzimuthLut count="{m}">{_list(values)}</noiseAzimuthLut>\n'
        "    </noiseAzimuthVector>\n"
        for (name, first, last), values in zip(luts.swaths, luts.az_values[pol], strict=True)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<noise>\n'
        + header.xml()
        + f'  <noiseRangeVectorList count="{len(luts.noise_lines)}">\n{ranges}  </noiseRangeVectorList>\n'
        f'  <noiseAzimuthVectorList count="{len(luts.swaths)}">\n{azimuths}  </noiseAzimuthVectorList>\n'
        "</noise>\n"
    )


NSSDC_ID = {"S1A": "2014-016A", "S1B": "2016-025A"}


def _unit_type(rep: str) -> str:
    return "Measurement Data Unit" if rep == "s1Level1MeasurementSchema" else "Metadata Unit"


def _manifest_xml(
    safe: Path,
    files: list[tuple[str, str, str]],
    acq: GrdAcquisition,
    start: str,
    stop: str,
    footprint: str,
    polarisations: Sequence[str],
    generated: datetime,
) -> str:
    """``files``: (data object id, relative href, repID) in manifest order."""
    units = "".join(
        f'      <xfdu:contentUnit unitType="{_unit_type(rep)}"'
        f' repID="{rep}">\n        <dataObjectPointer dataObjectID="{oid}"/>\n      </xfdu:contentUnit>\n'
        for oid, _, rep in files
    )
    objects = ""
    for oid, href, rep in files:
        data = (safe / href).read_bytes()
        mime = "application/octet-stream" if href.endswith(".tiff") else "text/xml"
        objects += (
            f'    <dataObject ID="{oid}" repID="{rep}">\n'
            f'      <byteStream mimeType="{mime}" size="{len(data)}">\n'
            f'        <fileLocation locatorType="URL" href="./{href}"/>\n'
            f'        <checksum checksumName="MD5">{hashlib.md5(data).hexdigest()}</checksum>\n'
            "      </byteStream>\n    </dataObject>\n"
        )
    pols = "".join(
        f"            <s1sarl1:transmitterReceiverPolarisation>{p}</s1sarl1:transmitterReceiverPolarisation>\n"
        for p in polarisations
    )
    gen = generated.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<xfdu:XFDU xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:gml="http://www.opengis.net/gml"'
        ' xmlns:xfdu="urn:ccsds:schema:xfdu:1" xmlns:safe="http://www.esa.int/safe/sentinel-1.0"'
        ' xmlns:s1="http://www.esa.int/safe/sentinel-1.0/sentinel-1"'
        ' xmlns:s1sar="http://www.esa.int/safe/sentinel-1.0/sentinel-1/sar"'
        ' xmlns:s1sarl1="http://www.esa.int/safe/sentinel-1.0/sentinel-1/sar/level-1"'
        ' xmlns:s1sarl2="http://www.esa.int/safe/sentinel-1.0/sentinel-1/sar/level-2"'
        ' xmlns:gx="http://www.google.com/kml/ext/2.2"'
        ' version="esa/safe/sentinel-1.0/sentinel-1/sar/level-1/grd/standard/iwdp">\n'
        "  <informationPackageMap>\n"
        '    <xfdu:contentUnit unitType="SAFE Archive Information Package" textInfo="Sentinel-1 IW Level-1 GRD Product"'
        ' dmdID="acquisitionPeriod platform generalProductInformation measurementOrbitReference measurementFrameSet"'
        ' pdiID="processing">\n'
        f"{units}    </xfdu:contentUnit>\n  </informationPackageMap>\n"
        "  <metadataSection>\n"
        '    <metadataObject ID="processing" classification="PROVENANCE" category="PDI">\n'
        '      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="Processing">\n        <xmlData>\n'
        f'          <safe:processing name="GRD Post Processing" start="{gen}" stop="{gen}">\n'
        '            <safe:facility country="Germany" name="Copernicus S1 Core Ground Segment - DPA" organisation="ESA"'
        ' site="DLR-Oberpfaffenhofen">\n'
        f'              <safe:software name="Sentinel-1 IPF" version="{IPF_VERSION}"/>\n'
        "            </safe:facility>\n          </safe:processing>\n"
        "        </xmlData>\n      </metadataWrap>\n    </metadataObject>\n"
        '    <metadataObject ID="platform" classification="DESCRIPTION" category="DMD">\n'
        '      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="Platform Description">\n'
        "        <xmlData>\n          <safe:platform>\n"
        f"            <safe:nssdcIdentifier>{NSSDC_ID.get(acq.mission, '')}</safe:nssdcIdentifier>\n"
        "            <safe:familyName>SENTINEL-1</safe:familyName>\n"
        f"            <safe:number>{acq.mission[-1]}</safe:number>\n"
        "            <safe:instrument>\n"
        '              <safe:familyName abbreviation="SAR">Synthetic Aperture Radar</safe:familyName>\n'
        "              <safe:extension>\n                <s1sarl1:instrumentMode>\n"
        "                  <s1sarl1:mode>IW</s1sarl1:mode>\n                  <s1sarl1:swath>IW</s1sarl1:swath>\n"
        "                </s1sarl1:instrumentMode>\n              </safe:extension>\n"
        "            </safe:instrument>\n          </safe:platform>\n        </xmlData>\n"
        "      </metadataWrap>\n    </metadataObject>\n"
        '    <metadataObject ID="measurementOrbitReference" classification="DESCRIPTION" category="DMD">\n'
        '      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="Orbit Reference">\n'
        "        <xmlData>\n          <safe:orbitReference>\n"
        f'            <safe:orbitNumber type="start">{acq.absolute_orbit}</safe:orbitNumber>\n'
        f'            <safe:orbitNumber type="stop">{acq.absolute_orbit}</safe:orbitNumber>\n'
        f'            <safe:relativeOrbitNumber type="start">{acq.relative_orbit}</safe:relativeOrbitNumber>\n'
        f'            <safe:relativeOrbitNumber type="stop">{acq.relative_orbit}</safe:relativeOrbitNumber>\n'
        f"            <safe:cycleNumber>{(acq.absolute_orbit - 1) // 175 + 1}</safe:cycleNumber>\n"
        "            <safe:phaseIdentifier>1</safe:phaseIdentifier>\n"
        "            <safe:extension>\n              <s1:orbitProperties>\n"
        f"                <s1:pass>{acq.pass_direction.upper()}</s1:pass>\n"
        "              </s1:orbitProperties>\n            </safe:extension>\n"
        "          </safe:orbitReference>\n        </xmlData>\n      </metadataWrap>\n    </metadataObject>\n"
        '    <metadataObject ID="generalProductInformation" classification="DESCRIPTION" category="DMD">\n'
        '      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="General Product Information">\n'
        "        <xmlData>\n          <s1sarl1:standAloneProductInformation>\n"
        "            <s1sarl1:instrumentConfigurationID>7</s1sarl1:instrumentConfigurationID>\n"
        f"            <s1sarl1:missionDataTakeID>{acq.datatake}</s1sarl1:missionDataTakeID>\n"
        f"{pols}"
        "            <s1sarl1:productClass>S</s1sarl1:productClass>\n"
        "            <s1sarl1:productClassDescription>SAR Standard L1 Product</s1sarl1:productClassDescription>\n"
        "            <s1sarl1:productComposition>Slice</s1sarl1:productComposition>\n"
        "            <s1sarl1:productType>GRD</s1sarl1:productType>\n"
        "            <s1sarl1:productTimelinessCategory>Fast-24h</s1sarl1:productTimelinessCategory>\n"
        "          </s1sarl1:standAloneProductInformation>\n        </xmlData>\n"
        "      </metadataWrap>\n    </metadataObject>\n"
        '    <metadataObject ID="acquisitionPeriod" classification="DESCRIPTION" category="DMD">\n'
        '      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="Acquisition Period">\n'
        "        <xmlData>\n          <safe:acquisitionPeriod>\n"
        f"            <safe:startTime>{start}</safe:startTime>\n            <safe:stopTime>{stop}</safe:stopTime>\n"
        "          </safe:acquisitionPeriod>\n        </xmlData>\n      </metadataWrap>\n    </metadataObject>\n"
        '    <metadataObject ID="measurementFrameSet" classification="DESCRIPTION" category="DMD">\n'
        '      <metadataWrap mimeType="text/xml" vocabularyName="SAFE" textInfo="Frame Set">\n'
        "        <xmlData>\n          <safe:frameSet>\n            <safe:frame>\n"
        '              <safe:footPrint srsName="http://www.opengis.net/gml/srs/epsg.xml#4326">\n'
        f"                <gml:coordinates>{escape(footprint)}</gml:coordinates>\n"
        "              </safe:footPrint>\n            </safe:frame>\n          </safe:frameSet>\n"
        "        </xmlData>\n      </metadataWrap>\n    </metadataObject>\n"
        "  </metadataSection>\n"
        f"  <dataObjectSection>\n{objects}  </dataObjectSection>\n</xfdu:XFDU>\n"
    )


# --- writing ------------------------------------------------------------------------------------


def _write_measurement(
    path: Path, dn: npt.NDArray[np.uint16], geo: _GeoGrid, mission: str, generated: datetime
) -> None:
    """uint16 GeoTIFF in radar geometry with the geolocation grid as GCPs (EPSG:4326), as IPF writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gcps = [
        GroundControlPoint(row=float(ln), col=float(px), x=float(geo.lon[i, j]), y=float(geo.lat[i, j]), z=0.0)
        for i, ln in enumerate(geo.lines)
        for j, px in enumerate(geo.pixels)
    ]
    with warnings.catch_warnings():  # radar geometry: GCPs, no geotransform, as the real files
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        dst = rasterio.open(path, "w", driver="GTiff", width=dn.shape[1], height=dn.shape[0], count=1, dtype="uint16")
    with dst:
        dst.gcps = (gcps, CRS.from_epsg(4326))
        dst.write(dn, 1)
        dst.update_tags(
            TIFFTAG_IMAGEDESCRIPTION=f"Sentinel-1{mission[-1]} IW GRD HR L1",
            TIFFTAG_SOFTWARE=f"Sentinel-1 IPF {IPF_VERSION}",
            TIFFTAG_DATETIME=generated.strftime("%Y:%m:%d %H:%M:%S"),
        )


def write_grd(
    out_dir: Path,
    acquisition: GrdAcquisition,
    truth: BackscatterField,
    *,
    polarisations: tuple[str, ...] = ("VV", "VH"),
    margin_m: float = 300.0,
    fill_px: int = 8,
    speckle_looks: float | None = None,
    seed: int = 0,
    zip_product: bool = False,
) -> SyntheticGrd:
    """Write ``out_dir/<name>.SAFE`` (and ``<name>.zip`` with ``zip_product``) covering ``truth.grid``
    plus ``margin_m``; same arguments, same bytes. See the module docstring for the model."""
    if fill_px < 0 or margin_m < fill_px * PIXEL_SPACING_M * 1.5:
        raise ValueError("margin_m must keep the fill border (fill_px) outside the field's grid")
    for pol in polarisations:
        if pol not in truth.gamma0 or pol not in truth.outside:
            raise ValueError(f"the truth field has no γ0 for polarisation {pol}")
        if not np.all(np.isfinite(truth.gamma0[pol])) or np.any(np.asarray(truth.gamma0[pol]) < 0):
            raise ValueError(f"γ0 of {pol} must be finite and ≥ 0 everywhere")
    crs = truth.grid.crs if isinstance(truth.grid.crs, str) else f"EPSG:{truth.grid.crs}"
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    to_map = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    image = _plan_image(truth, acquisition, margin_m, to_lonlat)
    luts = _make_luts(image, polarisations)
    geo = _geolocation_grid(image)
    epoch = acquisition.centre_time.astimezone(UTC)
    t_last = image.t_first + (image.n_lines - 1) * image.ati
    start_dt = epoch + timedelta(microseconds=round(image.t_first * 1e6))
    stop_dt = epoch + timedelta(microseconds=round(t_last * 1e6))
    name = product_name(
        acquisition.mission, start_dt, stop_dt, acquisition.absolute_orbit, acquisition.datatake, acquisition.unique
    )
    generated = (stop_dt + timedelta(hours=3, minutes=17)).replace(tzinfo=None)
    safe = Path(out_dir) / f"{name}.SAFE"
    if safe.exists():
        shutil.rmtree(safe)
    rng = np.random.default_rng(np.random.SeedSequence([seed, acquisition.absolute_orbit, acquisition.unique]))
    dns = _render(image, luts, truth, polarisations, to_map, fill_px, speckle_looks, rng)

    start, stop = _utc(epoch, image.t_first), _utc(epoch, t_last)
    m = acquisition.mission.lower()
    stem_time = (
        f"{start_dt:%Y%m%dt%H%M%S}-{stop_dt:%Y%m%dt%H%M%S}-{acquisition.absolute_orbit:06d}-{acquisition.datatake:06x}"
    )
    files: list[tuple[str, str, str]] = []
    measurements: dict[str, Path] = {}
    for pol in polarisations:
        number = POLARISATION_IMAGE[pol]
        stem = f"{m}-iw-grd-{pol.lower()}-{stem_time}-{number}"
        oid = stem.replace("-", "")
        header = _Header(
            acquisition.mission, pol, start, stop, acquisition.absolute_orbit, acquisition.datatake, number
        )
        texts = {
            f"annotation/{stem}.xml": _annotation_xml(image, header, geo, luts, acquisition),
            f"annotation/calibration/calibration-{stem}.xml": _calibration_xml(image, header, luts),
            f"annotation/calibration/noise-{stem}.xml": _noise_xml(image, header, luts, pol),
        }
        for rel, text in texts.items():
            (safe / rel).parent.mkdir(parents=True, exist_ok=True)
            (safe / rel).write_text(text)
        measurements[pol] = safe / f"measurement/{stem}.tiff"
        _write_measurement(measurements[pol], dns[pol], geo, acquisition.mission, generated)
        files += [
            (f"product{oid}", f"annotation/{stem}.xml", "s1Level1ProductSchema"),
            (f"noise{oid}", f"annotation/calibration/noise-{stem}.xml", "s1Level1NoiseSchema"),
            (f"calibration{oid}", f"annotation/calibration/calibration-{stem}.xml", "s1Level1CalibrationSchema"),
            (oid, f"measurement/{stem}.tiff", "s1Level1MeasurementSchema"),
        ]
    corners = [(0, 0), (0, -1), (-1, -1), (-1, 0)]
    footprint_pts = [(float(geo.lat[i, j]), float(geo.lon[i, j])) for i, j in corners]
    footprint_text = " ".join(f"{la:.6f},{lo:.6f}" for la, lo in footprint_pts)
    (safe / "manifest.safe").write_text(
        _manifest_xml(safe, files, acquisition, start, stop, footprint_text, polarisations, generated)
    )
    zip_path = None
    if zip_product:
        zip_path = Path(out_dir) / f"{name}.zip"
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(safe.rglob("*")):
                if f.is_file():
                    info = zipfile.ZipInfo(
                        f"{name}.SAFE/{f.relative_to(safe).as_posix()}", date_time=(2024, 1, 1, 0, 0, 0)
                    )
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, f.read_bytes())
    footprint = shapely.Polygon([(lo, la) for la, lo in [*footprint_pts, footprint_pts[0]]])
    return SyntheticGrd(
        name=name,
        safe=safe,
        zip=zip_path,
        start=start_dt,
        stop=stop_dt,
        acquisition=acquisition,
        polarisations=tuple(polarisations),
        measurements=measurements,
        footprint=footprint,
        shape=(image.n_lines, image.n_samples),
        fill_px=fill_px,
        geometry=image,
    )


def radar_position(product: SyntheticGrd, lon: npt.ArrayLike, lat: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """(line, sample) of ground points (h = 0) in the product, by the generator's own geometry: a
    test's reference for where the fill border and the image edges fall (not the reader's geocoder)."""
    image: _Image = product.geometry
    t, r = zero_doppler(image.orbit, ecef(lon, lat, 0.0))
    line = (t - image.c0 - r / SPEED_OF_LIGHT - image.t_first) / image.ati
    cc = image.conversion
    ground = _horner(cc.srgr[cc.nearest(t)], r - cc.sr0)
    return line, ground / PIXEL_SPACING_M


# --- STAC and truth -----------------------------------------------------------------------------


def grd_item(product: SyntheticGrd) -> pystac.Item:
    """A ``sentinel-1-grd`` Item shaped like CDSE's (tests/data/watch/cdse_s1_grd_item.json): the
    watcher records it as a CARD input located at the ``.SAFE`` of its asset hrefs."""
    acq = product.acquisition
    created = product.stop + timedelta(hours=3, minutes=17)
    item = pystac.Item(
        id=product.name,
        geometry=shapely.geometry.mapping(product.footprint),
        bbox=list(product.footprint.bounds),
        datetime=product.start,
        properties={
            "start_datetime": product.start.isoformat().replace("+00:00", "Z"),
            "end_datetime": product.stop.isoformat().replace("+00:00", "Z"),
            "platform": f"sentinel-1{acq.mission[-1].lower()}",
            "constellation": "sentinel-1",
            "instruments": ["sar"],
            "product:type": "IW_GRDH_1S",
            "sar:instrument_mode": "IW",
            "sar:frequency_band": "C",
            "sar:polarizations": list(product.polarisations),
            "sat:orbit_state": acq.pass_direction.lower(),
            "sat:absolute_orbit": acq.absolute_orbit,
            "sat:relative_orbit": acq.relative_orbit,
            "published": created.isoformat().replace("+00:00", "Z"),
            "created": created.isoformat().replace("+00:00", "Z"),
            "updated": created.isoformat().replace("+00:00", "Z"),
        },
        stac_extensions=[
            "https://stac-extensions.github.io/sar/v1.1.0/schema.json",
            "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
            "https://stac-extensions.github.io/product/v0.1.0/schema.json",
        ],
    )
    item.add_asset(
        "safe_manifest",
        pystac.Asset(str((product.safe / "manifest.safe").resolve()), media_type="application/xml", roles=["metadata"]),
    )
    for pol, path in product.measurements.items():
        item.add_asset(
            pol.lower(),
            pystac.Asset(str(path.resolve()), media_type="image/tiff; application=geotiff", roles=["data"]),
        )
    if product.zip is not None:
        item.add_asset(
            "Product", pystac.Asset(str(product.zip.resolve()), media_type="application/zip", roles=["data", "archive"])
        )
    return item


def grd_collection(products: Sequence[SyntheticGrd]) -> pystac.Collection:
    bounds = shapely.union_all([p.footprint for p in products]).bounds
    collection = pystac.Collection(
        id="sentinel-1-grd",
        description="Synthetic Sentinel-1 IW GRDH products (SAFE) over the test AOI: inputs of CARD-BS generation",
        extent=pystac.Extent(
            pystac.SpatialExtent([list(bounds)]), pystac.TemporalExtent([[products[0].start, products[-1].start]])
        ),
        license="other",
    )
    for p in products:
        collection.add_item(grd_item(p))
    return collection


TRUTH_INTERIOR_PX = 2
"""A pixel is interior when every pixel within this many pixels (Chebyshev) has its label: the
bilinear resampling of 10 m radar pixels reaches at most ~14 m, i.e. one 10 m cell, so two cells
leave room for the geometry's own tolerance."""


def interior(labels: npt.NDArray[np.integer[Any]], margin_px: int = TRUTH_INTERIOR_PX) -> npt.NDArray[np.bool_]:
    ny, nx = labels.shape
    padded = np.pad(labels, margin_px, mode="constant", constant_values=-1)
    same = np.ones(labels.shape, dtype=bool)
    for dr in range(-margin_px, margin_px + 1):
        for dc in range(-margin_px, margin_px + 1):
            same &= padded[margin_px + dr : margin_px + dr + ny, margin_px + dc : margin_px + dc + nx] == labels
    return same


def write_truth(
    path: Path,
    products: Sequence[tuple[str, dict[str, npt.NDArray[np.floating[Any]]]]],
    labels: npt.NDArray[np.integer[Any]],
    label_ids: Sequence[str],
) -> int:
    """``parcel_id, product_id, band, count, mean, interior_count`` per (parcel, product, band).

    ``products``: (product name, {band: γ0 per label, index 0 = background}); ``labels``: the
    parcels' pixel-centre labels on the 10 m grid (k ↔ ``label_ids[k-1]``). ``mean`` is the linear
    γ0 of the parcel's pixel-centre pixels in the truth field (one value per parcel and date), so
    it is what CARD-BS gives on the ``interior_count`` pixels within quantisation; at the other
    (edge) pixels bilinear resampling mixes in the neighbourhood (see ``TRUTH_INTERIOR_PX``).

    Measured (``generate_bs`` γ0 on the world's 10 m grid, flat DEM; seeds 3, 5, 21, 60 parcels):
    interior means within 0.5 % (VV) / 1 % (VH) of ``mean`` for parcels with ≥ 25 interior pixels,
    median 0.05 % / 0.15 %; ``gamma0-rtc`` the same to 0.01 %. Means over *all* pixel-centre pixels
    (what an extraction returns) are 0.7–1.4 % low in the median and up to 9 % (VV) / 14 % (VH) off
    for small parcels, whose edge pixels mix in the background.
    """
    n = len(label_ids) + 1
    counts = np.bincount(labels.ravel(), minlength=n)
    inner = np.bincount(labels[interior(labels)].ravel(), minlength=n)
    rows = 0
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["parcel_id", "product_id", "band", "count", "mean", "interior_count"])
        for name, levels in products:
            for k, pid in enumerate(label_ids, start=1):
                if not counts[k]:
                    continue
                for band in sorted(levels):
                    writer.writerow([pid, name, band, int(counts[k]), repr(float(levels[band][k])), int(inner[k])])
                    rows += 1
    return rows
