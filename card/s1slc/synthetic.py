"""Synthetic TOPS SLC bursts of a ground scatterer field, through a real annotation's geometry.

For tests and benchmarks only (no runtime code imports it). A distributed target is a dense set
of point scatterers at random ground positions (a few per resolution cell) with complex
amplitudes; coherence between dates is set by the amplitudes, a_late = γ·a_early + √(1−γ²)·n.

Each scatterer k is projected through one date's geometry, *independently of the processor*:
zero-Doppler time and slant range R_k by Newton on the annotation orbit, then burst line and
range sample. Its focused TOPS response is written as (ESA TN "Sentinel-1 TOPS SLC Deramping")

    a_k · exp(−j4πR_k/λ) · h_r(τ − τ_k) · h_a(η − η_k) · exp(j[φ(η, τ) − φ(η_k, τ)])

with h_r, h_a band-limited (Kaiser-windowed sinc of the range and azimuth processing bandwidths
over the sampling rates, 0.75 and 0.64 for IW) and φ the TOPS azimuth carrier: the phase at the
response peak is the zero-Doppler −4πR_k/λ, and the local azimuth frequency follows the burst's
Doppler centroid ramp. The carrier here is computed by this module's own code from the
annotation (not by :mod:`card.s1slc.tops`), so that a slip in either shows in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt
from pyproj import Transformer

from card.geobox import GeoBox
from card.s1grd.geocode import SPEED_OF_LIGHT, ecef
from card.s1grd.orbit import OrbitInterpolator
from card.s1slc.safe import Burst, BurstReader, SlcSwath

FloatArray = npt.NDArray[np.float64]
ComplexArray = npt.NDArray[np.complex128]

RANGE_BANDWIDTH = 0.75
"""IW range processing bandwidth / range sampling rate (48.3 MHz / 64.35 MHz)."""
AZIMUTH_BANDWIDTH = 0.64
"""IW azimuth processing bandwidth × azimuth time interval (313 Hz × 2.056 ms)."""
KERNEL_HALF = 8


@dataclass(frozen=True)
class Scatterers:
    points: FloatArray
    """(n, 3) ECEF positions."""
    x: FloatArray
    y: FloatArray


def scatterers(box: GeoBox, spacing_m: float, rng: np.random.Generator, height_m: float = 0.0) -> Scatterers:
    """One scatterer at a uniformly random place in each ``spacing_m`` square of ``box`` (its CRS).

    Stratified rather than Poisson: a Poisson field's clumps and gaps modulate the local power
    from place to place, which adds variance to any windowed intensity or coherence estimate
    (the estimator would then see fewer looks than the speckle's autocorrelation implies).
    Heights: the ellipsoid + ``height_m``.
    """
    left, bottom, right, top = box.bounds
    nx = int((right - left) // spacing_m)
    ny = int((top - bottom) // spacing_m)
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    x = left + (gx.ravel() + rng.uniform(0, 1, gx.size)) * spacing_m
    y = bottom + (gy.ravel() + rng.uniform(0, 1, gy.size)) * spacing_m
    n = x.size
    crs = box.crs if isinstance(box.crs, str) else f"EPSG:{box.crs}"
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return Scatterers(ecef(lon, lat, np.full(n, height_m)), x, y)


def complex_gaussian(n: int, rng: np.random.Generator) -> ComplexArray:
    out: ComplexArray = np.asarray((rng.normal(size=n) + 1j * rng.normal(size=n)) / math.sqrt(2.0), np.complex128)
    return out


def zero_doppler(orbit: OrbitInterpolator, points: FloatArray, t_start: float) -> tuple[FloatArray, FloatArray]:
    """Zero-Doppler time and slant range: this module's own Newton (f = (P−S)·V)."""
    t = np.full(points.shape[0], t_start)
    for _ in range(30):
        s, v, a = orbit.state(t)
        d = points - s
        f = np.einsum("ij,ij->i", d, v)
        fp = np.einsum("ij,ij->i", d, a) - np.einsum("ij,ij->i", v, v)
        step = f / fp
        t = t - step
        if np.max(np.abs(step)) < 1e-10:
            break
    s, _, _ = orbit.state(t)
    return t, np.linalg.norm(points - s, axis=1)


def tops_phase(swath: SlcSwath, burst: Burst, line: FloatArray, sample: FloatArray, speed: float) -> FloatArray:
    """The TOPS azimuth carrier φ (ESA TN terms) at burst-relative (line, sample)."""
    lam = SPEED_OF_LIGHT / swath.radar_frequency_hz
    ks = 2.0 * speed * swath.azimuth_steering_rate_rad_s / lam
    t_mid = burst.azimuth_time_s + (burst.lines // 2) * swath.azimuth_time_interval_s
    kf = int(np.argmin(np.abs(swath.fm_rate.t - t_mid)))
    kd = int(np.argmin(np.abs(swath.doppler.t - t_mid)))

    def fm(tau: FloatArray) -> FloatArray:
        c = swath.fm_rate.coeffs[kf]
        x = tau - swath.fm_rate.tau0[kf]
        return np.asarray(c[0] + c[1] * x + c[2] * x * x, dtype=np.float64)

    def dc(tau: FloatArray) -> FloatArray:
        c = swath.doppler.coeffs[kd]
        x = tau - swath.doppler.tau0[kd]
        return np.asarray(c[0] + c[1] * x + c[2] * x * x, dtype=np.float64)

    tau = swath.slant_range_time_s + sample / swath.range_sampling_rate_hz
    tau_first = np.asarray(swath.slant_range_time_s)
    ka, fdc = fm(tau), dc(tau)
    kt = ks / (1.0 - ks / ka)
    eta_ref = (-fdc / ka) - (-dc(tau_first) / fm(tau_first))
    eta = (line - burst.lines // 2) * swath.azimuth_time_interval_s
    d = eta - eta_ref
    out: FloatArray = np.pi * kt * d * d + 2.0 * np.pi * fdc * d
    return out


@numba.njit(cache=True)
def _splat(
    out: npt.NDArray[np.complex128],
    lines: npt.NDArray[np.float64],
    samples: npt.NDArray[np.float64],
    values: npt.NDArray[np.complex128],
    b_az: float,
    b_rg: float,
    half: int,
) -> None:
    ny, nx = out.shape
    wa = np.empty(2 * half)
    wr = np.empty(2 * half)
    for i in range(lines.size):
        l0 = int(np.floor(lines[i]))
        s0 = int(np.floor(samples[i]))
        if l0 + half < 0 or l0 - half + 1 >= ny or s0 + half < 0 or s0 - half + 1 >= nx:
            continue
        for a in range(2 * half):
            d = (l0 - half + 1 + a) - lines[i]
            u = d / half
            win = 0.0
            if abs(u) < 1.0:
                win = 0.42 + 0.5 * np.cos(np.pi * u) + 0.08 * np.cos(2 * np.pi * u)
            x = np.pi * b_az * d
            wa[a] = b_az * (np.sin(x) / x if x != 0.0 else 1.0) * win
        for b in range(2 * half):
            d = (s0 - half + 1 + b) - samples[i]
            u = d / half
            win = 0.0
            if abs(u) < 1.0:
                win = 0.42 + 0.5 * np.cos(np.pi * u) + 0.08 * np.cos(2 * np.pi * u)
            x = np.pi * b_rg * d
            wr[b] = b_rg * (np.sin(x) / x if x != 0.0 else 1.0) * win
        for a in range(2 * half):
            row = l0 - half + 1 + a
            if row < 0 or row >= ny:
                continue
            va = values[i] * wa[a]
            for b in range(2 * half):
                col = s0 - half + 1 + b
                if col < 0 or col >= nx:
                    continue
                out[row, col] += va * wr[b]


@dataclass
class SyntheticSwath:
    """Simulated pixels of one swath on a window of its measurement (global rows/cols)."""

    swath: SlcSwath
    row0: int
    col0: int
    data: npt.NDArray[np.complex64]

    def reader(self) -> BurstReader:
        """Windowed reads like the real measurement; NaN outside the simulated window."""

        def read(r0: int, r1: int, c0: int, c1: int) -> npt.NDArray[np.complex64]:
            out = np.full((r1 - r0, c1 - c0), np.nan + 0j, dtype=np.complex64)
            ny, nx = self.data.shape
            a0, a1 = max(r0, self.row0), min(r1, self.row0 + ny)
            b0, b1 = max(c0, self.col0), min(c1, self.col0 + nx)
            if a0 < a1 and b0 < b1:
                out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = self.data[
                    a0 - self.row0 : a1 - self.row0, b0 - self.col0 : b1 - self.col0
                ]
            return out

        return read


def simulate(
    swath: SlcSwath,
    points: FloatArray,
    amplitudes: ComplexArray,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    ramp: bool = True,
    scale: float = 60.0,
) -> SyntheticSwath:
    """The SLC of ``points`` (ECEF) with ``amplitudes`` on measurement rows × cols of ``swath``.

    ``scale`` is the DN of a unit amplitude (real IW SLCs have a per-component std of ~65 DN).
    Each burst's lines inside the window get the scatterers whose response reaches them.
    """
    orbit = OrbitInterpolator(swath.orbit)
    lam = SPEED_OF_LIGHT / swath.radar_frequency_hz
    row0, row1 = rows
    col0, col1 = cols
    data = np.zeros((row1 - row0, col1 - col0), dtype=np.complex128)
    t_start = swath.bursts[len(swath.bursts) // 2].azimuth_time_s
    t, r = zero_doppler(orbit, points, t_start)
    sample = (2.0 * r / SPEED_OF_LIGHT - swath.slant_range_time_s) * swath.range_sampling_rate_hz
    geometric = amplitudes * np.exp(-4j * np.pi * r / lam)
    for burst in swath.bursts:
        b0, b1 = max(row0, burst.first_line), min(row1, burst.first_line + burst.lines)
        if b0 >= b1:
            continue
        line = (t - burst.azimuth_time_s) / swath.azimuth_time_interval_s
        keep = (
            (line > b0 - burst.first_line - KERNEL_HALF)
            & (line < b1 - burst.first_line + KERNEL_HALF)
            & (sample > col0 - KERNEL_HALF)
            & (sample < col1 + KERNEL_HALF)
        )
        t_mid = burst.azimuth_time_s + (burst.lines // 2) * swath.azimuth_time_interval_s
        _, v, _ = orbit.state(np.array(t_mid))
        speed = float(np.linalg.norm(v))
        values = geometric[keep]
        if ramp:
            values = values * np.exp(-1j * tops_phase(swath, burst, line[keep], sample[keep], speed))
        part = np.zeros((b1 - b0, col1 - col0), dtype=np.complex128)
        _splat(
            part,
            line[keep] - (b0 - burst.first_line),
            sample[keep] - col0,
            values,
            AZIMUTH_BANDWIDTH,
            RANGE_BANDWIDTH,
            KERNEL_HALF,
        )
        if ramp:
            ll = np.arange(b0, b1, dtype=np.float64)[:, None] - burst.first_line
            ss = np.arange(col0, col1, dtype=np.float64)[None, :]
            part *= np.exp(1j * tops_phase(swath, burst, ll + 0 * ss, ss + 0 * ll, speed))
        data[b0 - row0 : b1 - row0] = part
    return SyntheticSwath(swath, row0, col0, (data * scale).astype(np.complex64))
