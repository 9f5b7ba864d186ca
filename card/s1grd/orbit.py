"""Satellite orbit from the annotation's Earth-fixed state vectors.

Piecewise cubic Hermite interpolation of position with the annotated velocities as slopes: it
passes through every state vector and its velocity exactly, and its error on a 10 s spacing is a
fraction of a millimetre (h⁴·|x⁽⁴⁾|/384 with |x⁽⁴⁾| ≈ ω⁴·r ≈ 1e-5 m/s⁴), far below a range pixel.
sarsen fits one degree-5 polynomial instead; Hermite keeps the nodes exact and needs no fit.
The same interpolant serves a POEORB file's vectors (not read yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from card.s1grd.safe import Orbit

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class OrbitInterpolator:
    orbit: Orbit

    def __post_init__(self) -> None:
        if np.any(np.diff(self.orbit.t) <= 0):
            raise ValueError("orbit state vector times must increase strictly")

    def state(self, t: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Position, velocity and acceleration (each (..., 3)) at times ``t`` (seconds since t0).

        Outside the vectors' span the end segment's cubic is extrapolated; callers keep t inside.
        """
        tt = np.asarray(t, dtype=np.float64)
        ot, p, v = self.orbit.t, self.orbit.pos, self.orbit.vel
        k = np.clip(np.searchsorted(ot, tt, side="right") - 1, 0, len(ot) - 2)
        h = (ot[k + 1] - ot[k])[..., None]
        s = ((tt - ot[k])[..., None]) / h
        p0, p1, v0, v1 = p[k], p[k + 1], v[k] * h, v[k + 1] * h
        s2, s3 = s * s, s * s * s
        pos = (2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * v0 + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * v1
        vel = ((6 * s2 - 6 * s) * p0 + (3 * s2 - 4 * s + 1) * v0 + (-6 * s2 + 6 * s) * p1 + (3 * s2 - 2 * s) * v1) / h
        acc = ((12 * s - 6) * p0 + (6 * s - 4) * v0 + (-12 * s + 6) * p1 + (6 * s - 2) * v1) / (h * h)
        return pos, vel, acc
