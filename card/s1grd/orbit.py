"""Satellite orbit: the annotation's Earth-fixed state vectors, or a POEORB/RESORB orbit file.

Piecewise cubic Hermite interpolation of position with the state vectors' velocities as slopes:
it passes through every state vector and its velocity exactly, and its error on a 10 s spacing is
a fraction of a millimetre (h⁴·|x⁽⁴⁾|/384 with |x⁽⁴⁾| ≈ ω⁴·r ≈ 1e-5 m/s⁴), far below a range
pixel. sarsen fits one degree-5 polynomial instead; Hermite keeps the nodes exact and needs no fit.

Orbit files (Earth Explorer XML, ``S1A_OPER_AUX_POEORB_OPOD_<created>_V<start>_<stop>.EOF``) hold
a day of 10 s state vectors in the Earth-fixed frame with UTC, TAI and UT1 time tags; the
annotation's own vectors are UTC and Earth-fixed too, so the file's vectors simply replace them
over the product's time span (plus a margin). POEORB (precise, ~5 cm, ~3 weeks after sensing) is
what CARD needs for geometry; the annotation's vectors are the predicted or restituted orbit of
the processing time (decimetres to a metre or two along track, a tenth of a pixel or more).
"""

from __future__ import annotations

import dataclasses
import io
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np
import numpy.typing as npt

from card.s1grd.safe import Orbit, SafeError, parse_time

if TYPE_CHECKING:
    from card.s1grd.safe import GrdProduct

FloatArray = npt.NDArray[np.float64]

ANNOTATION_ORBIT = "annotation state vectors (Hermite)"
ORBIT_MARGIN_S = 60.0
"""State vectors kept either side of the product: Newton's first iterations may step outside it."""


@dataclass(frozen=True)
class OrbitInterpolator:
    orbit: Orbit

    def __post_init__(self) -> None:
        if np.any(np.diff(self.orbit.t) <= 0):
            raise ValueError("orbit state vector times must increase strictly")

    def state(self, t: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Position, velocity and acceleration (each (..., 3)) at times ``t`` (seconds since t0).

        Outside the vectors' span the end segment's cubic is extrapolated; callers keep t inside.
        One compiled pass per point (the geocoding's largest cost as numpy temporaries: 40 % of a
        block); NaN times give NaN states.
        """
        tt = np.asarray(t, dtype=np.float64)
        flat = np.ascontiguousarray(tt.reshape(-1))
        pos, vel, acc = (np.empty((flat.size, 3)) for _ in range(3))
        o = self.orbit
        _hermite(flat, o.t, np.ascontiguousarray(o.pos), np.ascontiguousarray(o.vel), pos, vel, acc)
        shape = (*tt.shape, 3)
        return pos.reshape(shape), vel.reshape(shape), acc.reshape(shape)


@numba.njit(cache=True, nogil=True)
def _hermite(
    t: FloatArray, ot: FloatArray, p: FloatArray, v: FloatArray, pos: FloatArray, vel: FloatArray, acc: FloatArray
) -> None:
    for i in range(t.shape[0]):
        hermite_at(ot, p, v, t[i], pos[i], vel[i], acc[i])


@numba.njit(cache=True, nogil=True)
def hermite_at(
    ot: FloatArray, p: FloatArray, v: FloatArray, ti: float, pos: FloatArray, vel: FloatArray, acc: FloatArray
) -> None:
    """Cubic Hermite through (ot, p, v) at ti into pos, vel, acc (3 each): the segment k with
    ot[k] ≤ ti < ot[k+1], clamped to the ends; NaN takes the last segment (as searchsorted)."""
    n = ot.shape[0]
    if not np.isfinite(ti):
        k = n - 2
    else:
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if ot[mid] <= ti:
                lo = mid + 1
            else:
                hi = mid
        k = min(max(lo - 1, 0), n - 2)
    h = ot[k + 1] - ot[k]
    s = (ti - ot[k]) / h
    s2 = s * s
    s3 = s2 * s
    h00, h10, h01, h11 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2
    d00, d10, d01, d11 = 6 * s2 - 6 * s, 3 * s2 - 4 * s + 1, -6 * s2 + 6 * s, 3 * s2 - 2 * s
    a00, a10, a01, a11 = 12 * s - 6, 6 * s - 4, -12 * s + 6, 6 * s - 2
    for c in range(3):
        p0, p1, v0, v1 = p[k, c], p[k + 1, c], v[k, c] * h, v[k + 1, c] * h
        pos[c] = h00 * p0 + h10 * v0 + h01 * p1 + h11 * v1
        vel[c] = (d00 * p0 + d10 * v0 + d01 * p1 + d11 * v1) / h
        acc[c] = (a00 * p0 + a10 * v0 + a01 * p1 + a11 * v1) / (h * h)


@dataclass(frozen=True)
class OrbitFile:
    """The state vectors of an Earth Explorer orbit file (``AUX_POEORB``, ``AUX_RESORB``)."""

    name: str
    mission: str
    """``Sentinel-1A`` … as the file's Fixed_Header says."""
    file_type: str
    validity_start: np.datetime64
    validity_stop: np.datetime64
    utc: npt.NDArray[np.datetime64]
    pos: FloatArray
    vel: FloatArray

    @property
    def kind(self) -> str:
        """``POEORB`` or ``RESORB`` (the file type without ``AUX_``)."""
        return self.file_type.removeprefix("AUX_")

    @property
    def label(self) -> str:
        """What the output's ORBIT tag says."""
        return f"{self.kind} {self.name} (Hermite)"


def _eof_time(text: str | None, where: str) -> np.datetime64:
    if not text or "=" not in text:
        raise SafeError(f"orbit file: {where} is not a UTC=… time ({text!r})")
    scale, value = text.strip().split("=", 1)
    if scale != "UTC":
        raise SafeError(f"orbit file: {where} is on the {scale} scale, UTC expected")
    return parse_time(value)


def read_orbit_file(source: str | Path | bytes) -> OrbitFile:
    """Parse an EOF (path or its bytes, or a ``.EOF.zip`` as the orbit services hand them out);
    only Earth-fixed files with UTC state vectors are accepted."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    if raw[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            eofs = [n for n in zf.namelist() if n.upper().endswith(".EOF")]
            if len(eofs) != 1:
                raise SafeError(f"orbit zip holds {len(eofs)} .EOF files, expected one")
            raw = zf.read(eofs[0])
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise SafeError(f"orbit file is not XML: {exc}") from exc
    header = root.find("Earth_Explorer_Header/Fixed_Header")
    if root.tag != "Earth_Explorer_File" or header is None:
        raise SafeError("not an Earth Explorer orbit file (no Earth_Explorer_File/Earth_Explorer_Header/Fixed_Header)")
    frame = root.findtext("Earth_Explorer_Header/Variable_Header/Ref_Frame")
    if frame is not None and frame.strip() != "EARTH_FIXED":
        raise SafeError(f"orbit file reference frame is {frame.strip()}, EARTH_FIXED expected")
    file_type = (header.findtext("File_Type") or "").strip()
    if file_type not in ("AUX_POEORB", "AUX_RESORB"):
        raise SafeError(f"orbit file type {file_type!r} is neither AUX_POEORB nor AUX_RESORB")
    osvs = root.findall("Data_Block/List_of_OSVs/OSV")
    if len(osvs) < 4:
        raise SafeError(f"orbit file holds {len(osvs)} state vectors, at least 4 are needed")

    def num(osv: ET.Element, tag: str) -> float:
        text = osv.findtext(tag)
        if text is None:
            raise SafeError(f"orbit file: an OSV has no {tag}")
        return float(text)

    utc = np.array([_eof_time(o.findtext("UTC"), "OSV/UTC") for o in osvs])
    pos = np.array([[num(o, a) for a in ("X", "Y", "Z")] for o in osvs])
    vel = np.array([[num(o, a) for a in ("VX", "VY", "VZ")] for o in osvs])
    order = np.argsort(utc)
    return OrbitFile(
        name=(header.findtext("File_Name") or "").strip(),
        mission=(header.findtext("Mission") or "").strip(),
        file_type=file_type,
        validity_start=_eof_time(header.findtext("Validity_Period/Validity_Start"), "Validity_Start"),
        validity_stop=_eof_time(header.findtext("Validity_Period/Validity_Stop"), "Validity_Stop"),
        utc=utc[order],
        pos=pos[order],
        vel=vel[order],
    )


def orbit_for_product(
    eof: OrbitFile, t0: np.datetime64, first_s: float, last_s: float, mission: str, margin_s: float = ORBIT_MARGIN_S
) -> Orbit:
    """The file's state vectors over [first − margin, last + margin] (seconds since ``t0``), as an :class:`Orbit`.

    The file must be for the product's satellite (``S1A`` ↔ ``Sentinel-1A``) and its validity must
    cover the product; both are checked, since a wrong file geocodes silently kilometres off.
    """
    if eof.mission and not eof.mission.upper().endswith(mission.upper()[-2:]):
        raise SafeError(f"orbit file {eof.name} is for {eof.mission}, the product is {mission}")
    start = t0 + np.timedelta64(round(first_s * 1e9), "ns")
    stop = t0 + np.timedelta64(round(last_s * 1e9), "ns")
    if not (eof.validity_start <= start and stop <= eof.validity_stop):
        raise SafeError(
            f"orbit file {eof.name} is valid {eof.validity_start}–{eof.validity_stop}, the product spans {start}–{stop}"
        )
    t = (eof.utc - t0) / np.timedelta64(1, "ns") * 1e-9
    keep = (t >= first_s - margin_s) & (t <= last_s + margin_s)
    idx = np.flatnonzero(keep)
    if idx.size == 0 or t[idx[0]] > first_s or t[idx[-1]] < last_s:
        raise SafeError(f"orbit file {eof.name} has no state vectors around the product ({start}–{stop})")
    # one more vector either side, so that Hermite interpolates (never extrapolates) near the ends
    lo, hi = max(idx[0] - 1, 0), min(idx[-1] + 2, t.size)
    return Orbit(t[lo:hi].astype(np.float64), eof.pos[lo:hi], eof.vel[lo:hi])


def with_orbit_file(product: GrdProduct, eof: OrbitFile) -> GrdProduct:
    """The product with every polarisation's annotation orbit replaced by the file's vectors."""
    pols = {}
    for name, pol in product.polarisations.items():
        ann = pol.annotation
        orbit = orbit_for_product(eof, ann.t0, ann.first_line_s, ann.last_line_s, ann.mission)
        pols[name] = dataclasses.replace(pol, annotation=dataclasses.replace(ann, orbit=orbit))
    return dataclasses.replace(product, polarisations=pols)
