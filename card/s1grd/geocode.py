"""Backward range-Doppler geocoding: ground point (ECEF) → GRD (line, pixel).

For each point P: solve the zero-Doppler condition f(t) = (P − S(t))·V(t) = 0 by Newton with
f′ = (P − S)·A − |V|² (UZH "Guide to Sentinel-1 Geocoding", as sarsen does); slant range
R = |P − S(t)|; ground range by the annotation's srgr polynomial of the two coordinateConversion
entries that bracket t (linear in t between them); pixel = ground range / range pixel spacing;
line = (t − first line time) / azimuth time interval. All vectorised over the points; callers
pass blocks so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from card.s1grd.orbit import OrbitInterpolator
from card.s1grd.safe import Annotation

FloatArray = npt.NDArray[np.float64]

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)
SPEED_OF_LIGHT = 299792458.0


def ecef(lon_deg: npt.ArrayLike, lat_deg: npt.ArrayLike, h: npt.ArrayLike) -> FloatArray:
    """WGS84 geodetic → Earth-centred Earth-fixed, (..., 3) metres."""
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    hh = np.asarray(h, dtype=np.float64)
    n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
    x = (n + hh) * np.cos(lat) * np.cos(lon)
    y = (n + hh) * np.cos(lat) * np.sin(lon)
    z = (n * (1 - WGS84_E2) + hh) * np.sin(lat)
    return np.stack(np.broadcast_arrays(x, y, z), axis=-1)


@dataclass(frozen=True)
class RadarPosition:
    """Where points fall in the GRD and how the sensor sees them (all arrays of the points' shape)."""

    line: FloatArray
    pixel: FloatArray
    pixel_smooth: FloatArray
    """Pixel with the srgr polynomials interpolated in time: continuous, for the RTC area simulation."""
    azimuth_time: FloatArray
    slant_range: FloatArray
    look: FloatArray
    """Unit vector from the ground point to the sensor, (..., 3)."""
    azimuth_spacing_m: FloatArray
    """Along-track ground distance per line at the point: Δt·(|V|² − (P−S)·A)/|V| (exact, linearised)."""
    slant_spacing_m: FloatArray
    """Slant-range change per GRD pixel at the point: dR/dgr · range pixel spacing."""


class Geocoder:
    def __init__(
        self, annotation: Annotation, orbit: OrbitInterpolator | None = None, *, srgr_interpolated: bool = False
    ) -> None:
        """``srgr_interpolated``: the image pixel from srgr polynomials interpolated in time (sarsen's
        convention) instead of the nearest entry (the geolocation grid's); see :meth:`ground_range`."""
        self.ann = annotation
        self.srgr_interpolated = srgr_interpolated
        self.orbit = orbit or OrbitInterpolator(annotation.orbit)
        self._t_mid = 0.5 * (annotation.first_line_s + annotation.last_line_s)
        self.line_offset = line_time_offset(annotation)

    def zero_doppler(self, points: FloatArray, iterations: int = 10, tol_s: float = 1e-9) -> FloatArray:
        """Zero-Doppler azimuth time of each point (seconds since t0).

        On a grid of points, Newton first runs on every 8th point and the result, interpolated,
        seeds the full grid: 1–2 iterations instead of 5–6 from the scene's mid time.
        """
        step_px = 8
        if points.ndim == 3 and min(points.shape[:2]) > 4 * step_px:
            rows = np.unique(np.r_[np.arange(0, points.shape[0], step_px), points.shape[0] - 1])
            cols = np.unique(np.r_[np.arange(0, points.shape[1], step_px), points.shape[1] - 1])
            coarse = self.zero_doppler(points[np.ix_(rows, cols)], iterations, tol_s)
            if np.isfinite(coarse).all():
                along_cols = np.stack([np.interp(np.arange(points.shape[1]), cols, r) for r in coarse])
                t = np.stack([np.interp(np.arange(points.shape[0]), rows, c) for c in along_cols.T], axis=1)
                return self._newton(points, t, iterations, tol_s)
        return self._newton(points, np.full(points.shape[:-1], self._t_mid), iterations, tol_s)

    def _newton(self, points: FloatArray, t: FloatArray, iterations: int, tol_s: float) -> FloatArray:
        for _ in range(iterations):
            s, v, a = self.orbit.state(t)
            d = points - s
            f = np.einsum("...k,...k->...", d, v)
            fp = np.einsum("...k,...k->...", d, a) - np.einsum("...k,...k->...", v, v)
            step = f / fp
            t = t - step
            if not np.any(np.abs(step) >= tol_s):  # NaN points (no DEM) do not keep it iterating
                break
        return t

    def ground_range(
        self, t: FloatArray, slant_range: FloatArray, *, interpolate: bool = False
    ) -> tuple[FloatArray, FloatArray]:
        """Ground range (m) and dR/dgr from the coordinateConversion srgr polynomials at time t.

        Default: the polynomial of the entry nearest t. Each entry holds for its own azimuth
        block: the nearest entry reproduces the annotation's geolocation grid pixels to 0.0014 px
        median (0.008 max) on the sarsen GRD, linear interpolation between entries is off by
        0.08 px median, 0.52 max. The entries jump by up to ~1 px from one second to the next
        (the IPF's terrain height steps), so ``interpolate=True`` gives the continuous version
        that the RTC area simulation needs (a jump there would fold facets onto the seam).
        """
        cc = self.ann.conversion
        if len(cc.t) == 1:
            gr1, dgr1 = _poly(cc.srgr[0], slant_range - cc.sr0[0])
            return gr1, 1.0 / dgr1
        k = np.clip(np.searchsorted(cc.t, t, side="right") - 1, 0, len(cc.t) - 2)
        if interpolate:
            w = np.clip((t - cc.t[k]) / (cc.t[k + 1] - cc.t[k]), 0.0, 1.0)
            g0, d0 = _poly(cc.srgr[k], slant_range - cc.sr0[k])
            g1, d1 = _poly(cc.srgr[k + 1], slant_range - cc.sr0[k + 1])
            return (1 - w) * g0 + w * g1, 1.0 / ((1 - w) * d0 + w * d1)
        k = np.where(np.abs(t - cc.t[k]) <= np.abs(cc.t[k + 1] - t), k, k + 1)
        gr, dgr_dr = _poly(cc.srgr[k], slant_range - cc.sr0[k])
        return gr, 1.0 / dgr_dr

    def radar_position(self, points: FloatArray) -> RadarPosition:
        t = self.zero_doppler(points)
        s, v, a = self.orbit.state(t)
        d = s - points
        r = np.sqrt(np.einsum("...k,...k->...", d, d))
        gr, dr_dgr = self.ground_range(t, r, interpolate=self.srgr_interpolated)
        gr_smooth, _ = self.ground_range(t, r, interpolate=True)
        vv = np.einsum("...k,...k->...", v, v)
        ft = vv + np.einsum("...k,...k->...", d, a)  # −f′ with d = S − P
        return RadarPosition(
            line=(t - self.line_offset[0] - self.line_offset[1] * (2 * r / SPEED_OF_LIGHT) - self.ann.first_line_s)
            / self.ann.azimuth_time_interval_s,
            pixel=gr / self.ann.range_pixel_spacing_m,
            pixel_smooth=gr_smooth / self.ann.range_pixel_spacing_m,
            azimuth_time=t,
            slant_range=r,
            look=d / r[..., None],
            azimuth_spacing_m=self.ann.azimuth_time_interval_s * np.abs(ft) / np.sqrt(vv),
            slant_spacing_m=dr_dgr * self.ann.range_pixel_spacing_m,
        )


def line_time_offset(annotation: Annotation) -> tuple[float, float]:
    """(c0, c1) with zero-Doppler time − line time = c0 + c1·τ (τ two-way slant-range time).

    GRD lines are bistatic-delay corrected (``bistaticDelayCorrectionApplied``): the zero-Doppler
    time of a point on a given line grows with τ/2 across the swath (±0.18 line on the sarsen
    GRD). The annotation gives the exact relation only through its geolocation grid, so it is fitted
    there by least squares (residual ~1 µs = 0.001 line; c1 comes out 0.4999, the physical ½).
    """
    g = annotation.grid
    dt = g.azimuth_time - (annotation.first_line_s + g.line * annotation.azimuth_time_interval_s)
    a = np.stack([np.ones_like(dt), g.slant_range_time], axis=1)
    c, *_ = np.linalg.lstsq(a, dt, rcond=None)
    return float(c[0]), float(c[1])


def _poly(coeffs: FloatArray, x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Σ c_k x^k and its derivative, by Horner; ``coeffs`` is (n,) or (..., n) per point."""
    val = np.zeros_like(x) + coeffs[..., -1]
    der = np.zeros_like(x)
    for i in range(coeffs.shape[-1] - 2, -1, -1):
        c = coeffs[..., i]
        der = der * x + val
        val = val * x + c
    return val, der
