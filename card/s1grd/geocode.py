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

import numba
import numpy as np
import numpy.typing as npt

from card.s1grd.orbit import OrbitInterpolator, hermite_at
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
    if lon.ndim and lon.shape == lat.shape == hh.shape:  # a block's grid: one compiled pass
        out = np.empty((*lon.shape, 3))
        _ecef_kernel(
            np.ascontiguousarray(lon).reshape(-1),
            np.ascontiguousarray(lat).reshape(-1),
            np.ascontiguousarray(hh).reshape(-1),
            out.reshape(-1, 3),
        )
        return out
    n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
    x = (n + hh) * np.cos(lat) * np.cos(lon)
    y = (n + hh) * np.cos(lat) * np.sin(lon)
    z = (n * (1 - WGS84_E2) + hh) * np.sin(lat)
    return np.stack(np.broadcast_arrays(x, y, z), axis=-1)


@numba.njit(cache=True, nogil=True)
def _ecef_kernel(lon: FloatArray, lat: FloatArray, h: FloatArray, out: FloatArray) -> None:
    for i in range(lon.shape[0]):
        sl, cl = np.sin(lat[i]), np.cos(lat[i])
        n = WGS84_A / np.sqrt(1 - WGS84_E2 * sl**2)
        out[i, 0] = (n + h[i]) * cl * np.cos(lon[i])
        out[i, 1] = (n + h[i]) * cl * np.sin(lon[i])
        out[i, 2] = (n * (1 - WGS84_E2) + h[i]) * sl


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
        """Each point iterates until its own step is under ``tol_s`` (compiled: one pass per point)."""
        o = self.orbit.orbit
        out = np.array(t, dtype=np.float64, copy=True, order="C")
        pts = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        _newton_kernel(
            pts, out.reshape(-1), o.t, np.ascontiguousarray(o.pos), np.ascontiguousarray(o.vel), iterations, tol_s
        )
        return out

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
        tt, rr = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(slant_range, dtype=np.float64))
        gr, dr_dgr = np.empty(tt.shape), np.empty(tt.shape)
        _srgr_kernel(
            np.ascontiguousarray(tt).reshape(-1),
            np.ascontiguousarray(rr).reshape(-1),
            np.ascontiguousarray(cc.t, dtype=np.float64),
            np.ascontiguousarray(cc.sr0, dtype=np.float64),
            np.ascontiguousarray(cc.srgr, dtype=np.float64),
            interpolate,
            gr.reshape(-1),
            dr_dgr.reshape(-1),
        )
        return gr, dr_dgr

    def radar_position(self, points: FloatArray) -> RadarPosition:
        t = self.zero_doppler(points)
        o = self.orbit.orbit
        r, vv, ft = np.empty(t.shape), np.empty(t.shape), np.empty(t.shape)
        look = np.empty(points.shape)
        _sensor_kernel(
            np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3),
            np.ascontiguousarray(t).reshape(-1),
            o.t,
            np.ascontiguousarray(o.pos),
            np.ascontiguousarray(o.vel),
            r.reshape(-1),
            vv.reshape(-1),
            ft.reshape(-1),
            look.reshape(-1, 3),
        )
        gr, dr_dgr = self.ground_range(t, r, interpolate=self.srgr_interpolated)
        gr_smooth, _ = self.ground_range(t, r, interpolate=True)
        return RadarPosition(
            line=(t - self.line_offset[0] - self.line_offset[1] * (2 * r / SPEED_OF_LIGHT) - self.ann.first_line_s)
            / self.ann.azimuth_time_interval_s,
            pixel=gr / self.ann.range_pixel_spacing_m,
            pixel_smooth=gr_smooth / self.ann.range_pixel_spacing_m,
            azimuth_time=t,
            slant_range=r,
            look=look,
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


@numba.njit(cache=True, nogil=True)
def _sensor_kernel(
    points: FloatArray,
    t: FloatArray,
    ot: FloatArray,
    p: FloatArray,
    v: FloatArray,
    r: FloatArray,
    vv: FloatArray,
    ft: FloatArray,
    look: FloatArray,
) -> None:
    """At each point's zero-Doppler time: slant range |S − P|, |V|², −f′ = |V|² + (S − P)·A, unit look."""
    s, vel, acc, d = np.empty(3), np.empty(3), np.empty(3), np.empty(3)
    for i in range(t.shape[0]):
        hermite_at(ot, p, v, t[i], s, vel, acc)
        dd = v2 = da = 0.0
        for c in range(3):
            d[c] = s[c] - points[i, c]
            dd += d[c] * d[c]
            v2 += vel[c] * vel[c]
            da += d[c] * acc[c]
        ri = np.sqrt(dd)
        r[i], vv[i], ft[i] = ri, v2, v2 + da
        for c in range(3):
            look[i, c] = d[c] / ri


@numba.njit(cache=True, nogil=True)
def _newton_kernel(
    points: FloatArray, t: FloatArray, ot: FloatArray, p: FloatArray, v: FloatArray, iterations: int, tol_s: float
) -> None:
    """Zero-Doppler Newton per point: f = (P − S)·V, f′ = (P − S)·A − |V|² (NaN points stay NaN)."""
    s, vel, acc = np.empty(3), np.empty(3), np.empty(3)
    for i in range(t.shape[0]):
        ti = t[i]
        for _ in range(iterations):
            hermite_at(ot, p, v, ti, s, vel, acc)
            f = fp = vv = 0.0
            for c in range(3):
                d = points[i, c] - s[c]
                f += d * vel[c]
                fp += d * acc[c]
                vv += vel[c] * vel[c]
            step = f / (fp - vv)
            ti -= step
            if not abs(step) >= tol_s:
                break
        t[i] = ti


@numba.njit(cache=True, nogil=True)
def _srgr_kernel(
    t: FloatArray,
    r: FloatArray,
    ct: FloatArray,
    sr0: FloatArray,
    srgr: FloatArray,
    interpolate: bool,
    gr: FloatArray,
    dr_dgr: FloatArray,
) -> None:
    """:meth:`Geocoder.ground_range` per point in one pass (numpy gathered a coefficient row per point)."""
    n, m = srgr.shape
    for i in range(t.shape[0]):
        ti = t[i]
        if n == 1:
            k, k1, w = 0, 0, 0.0
        else:
            if not np.isfinite(ti):  # as searchsorted: NaN after every entry
                k = n - 2
            else:
                lo, hi = 0, n
                while lo < hi:
                    mid = (lo + hi) // 2
                    if ct[mid] <= ti:
                        lo = mid + 1
                    else:
                        hi = mid
                k = min(max(lo - 1, 0), n - 2)
            k1 = k + 1
            if interpolate:
                w = min(max((ti - ct[k]) / (ct[k1] - ct[k]), 0.0), 1.0) if np.isfinite(ti) else np.nan
            else:
                if not (abs(ti - ct[k]) <= abs(ct[k1] - ti)):
                    k = k1
                k1, w = k, 0.0
        x0, x1 = r[i] - sr0[k], r[i] - sr0[k1]
        g0, d0, g1, d1 = srgr[k, m - 1], 0.0, srgr[k1, m - 1], 0.0
        for j in range(m - 2, -1, -1):
            d0 = d0 * x0 + g0
            g0 = g0 * x0 + srgr[k, j]
            d1 = d1 * x1 + g1
            g1 = g1 * x1 + srgr[k1, j]
        if interpolate and n > 1:
            gr[i] = (1 - w) * g0 + w * g1
            dr_dgr[i] = 1.0 / ((1 - w) * d0 + w * d1)
        else:
            gr[i] = g0
            dr_dgr[i] = 1.0 / d0
