"""TOPS azimuth carrier of one burst, after ESA's "Sentinel-1 TOPS SLC Deramping" (S1-TN-MDA-52-7445).

A TOPS burst's azimuth spectrum slides through ~4–5 kHz while the PRF is ~0.5 kHz: the samples
alias, and any interpolation along azimuth (resampling onto a map grid included) must first bring
them to baseband by multiplying with exp(−jφ), then put the carrier back (×exp(+jφ)) at the
interpolated position. With η the zero-Doppler time from the burst centre and τ the two-way
slant-range time (terms as in the TN and in s1-reader's ``az_carrier_components``):

* k_s = 2·|V(η_mid)|·k_ψ/λ (Doppler rate from the antenna steering; k_ψ = azimuthSteeringRate, rad/s)
* k_a(τ) = azimuth FM rate polynomial, f_ηc(τ) = data Doppler centroid polynomial (the estimates
  nearest the burst centre)
* k_t(τ) = k_s / (1 − k_s/k_a(τ)) (Doppler centroid rate of the focused data)
* η_c(τ) = −f_ηc(τ)/k_a(τ) (beam centre crossing time); η_ref(τ) = η_c(τ) − η_c(τ_first sample)
* φ(η, τ) = π·k_t(τ)·(η − η_ref(τ))² + 2π·f_ηc(τ)·(η − η_ref(τ))

so that the instantaneous azimuth frequency of the data is f_ηc + k_t·(η − η_ref).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from card.s1grd.orbit import OrbitInterpolator
from card.s1slc.safe import Burst, SlcSwath

FloatArray = npt.NDArray[np.float64]


def _poly(coeffs: FloatArray, x: FloatArray) -> FloatArray:
    out = np.zeros_like(x)
    for c in coeffs[::-1]:
        out = out * x + c
    return out


@dataclass(frozen=True)
class BurstCarrier:
    swath: SlcSwath
    burst: Burst
    ks: float
    """Doppler rate of the antenna steering (Hz/s)."""
    t_mid_s: float
    """Zero-Doppler time of the burst centre line (lines // 2), the origin of η."""

    @classmethod
    def of(cls, swath: SlcSwath, burst: Burst, orbit: OrbitInterpolator | None = None) -> BurstCarrier:
        orb = orbit or OrbitInterpolator(swath.orbit)
        t_mid = burst.azimuth_time_s + (burst.lines // 2) * swath.azimuth_time_interval_s
        _, v, _ = orb.state(np.array(t_mid))
        vs = float(np.linalg.norm(v))
        ks = 2.0 * vs * swath.azimuth_steering_rate_rad_s / swath.wavelength_m
        return cls(swath, burst, ks, t_mid)

    def range_terms(self, sample: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(k_t, η_ref, f_ηc) at range samples ``sample`` (fractional allowed)."""
        sw = self.swath
        tau = sw.slant_range_time_s + np.asarray(sample, dtype=np.float64) / sw.range_sampling_rate_hz
        fm_tau0, fm = sw.fm_rate.nearest(self.t_mid_s)
        dc_tau0, dc = sw.doppler.nearest(self.t_mid_s)
        ka = _poly(fm, tau - fm_tau0)
        fdc = _poly(dc, tau - dc_tau0)
        tau_first = np.array(sw.slant_range_time_s)
        eta_c_first = -_poly(dc, tau_first - dc_tau0) / _poly(fm, tau_first - fm_tau0)
        eta_ref = -fdc / ka - eta_c_first
        kt = self.ks / (1.0 - self.ks / ka)
        return kt, eta_ref, fdc

    def eta(self, line_in_burst: npt.ArrayLike) -> FloatArray:
        """η (s) of burst lines (fractional allowed), 0 at line ``lines // 2``."""
        return (
            np.asarray(line_in_burst, dtype=np.float64) - self.burst.lines // 2
        ) * self.swath.azimuth_time_interval_s

    def phase(self, line_in_burst: npt.ArrayLike, sample: npt.ArrayLike) -> FloatArray:
        """φ(η, τ) at points (arrays broadcast together)."""
        kt, eta_ref, fdc = self.range_terms(sample)
        d = self.eta(line_in_burst) - eta_ref
        out: FloatArray = np.pi * kt * d * d + 2.0 * np.pi * fdc * d
        return out

    def deramp_window(self, row0: int, row1: int, col0: int, col1: int) -> npt.NDArray[np.complex64]:
        """exp(−jφ) on burst lines row0…row1−1 × samples col0…col1−1, in one compiled pass."""
        kt, eta_ref, fdc = self.range_terms(np.arange(col0, col1))
        out = np.empty((row1 - row0, col1 - col0), dtype=np.complex64)
        _deramp(self.eta(np.arange(row0, row1)), kt, eta_ref, fdc, out)
        return out

    def phase_window(self, row0: int, row1: int, col0: int, col1: int) -> FloatArray:
        """φ on the burst lines row0…row1−1 (relative to the burst) × samples col0…col1−1."""
        kt, eta_ref, fdc = self.range_terms(np.arange(col0, col1))
        d = self.eta(np.arange(row0, row1))[:, None] - eta_ref[None, :]
        out: FloatArray = np.pi * kt[None, :] * d * d + 2.0 * np.pi * fdc[None, :] * d
        return out


@numba.njit(cache=True, nogil=True)
def _deramp(
    eta: FloatArray, kt: FloatArray, eta_ref: FloatArray, fdc: FloatArray, out: npt.NDArray[np.complex64]
) -> None:
    for i in range(eta.size):
        for j in range(kt.size):
            d = eta[i] - eta_ref[j]
            phi = np.pi * kt[j] * d * d + 2.0 * np.pi * fdc[j] * d
            out[i, j] = complex(np.cos(phi), -np.sin(phi))
