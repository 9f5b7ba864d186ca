"""Terrain geometry on the map grid: facets, local incidence, layover/shadow, Small (2011) flattening.

Facets are the output grid's pixels with their ECEF corners differenced (central differences of
the pixel centres' ECEF positions), so the facet area is the true 3D area whatever the map
projection's scale factor. For each facet:

* local incidence angle: arccos(n̂·l̂), n̂ the facet normal (pointing up), l̂ ground → sensor;
* shadow (facing away): n̂·l̂ ≤ 0, i.e. the slope away from the sensor exceeds 90° − θ.
  Shadow cast by *other* terrain (ray casting) is not modelled;
* layover: the facet's slope towards the sensor, measured in the range plane, exceeds the look
  angle from the ellipsoid normal (the ground range decreases while the slant range does);
* Small (2011) gamma flattening: the facet's area projected on the plane normal to the look,
  A_γ = A·(n̂·l̂)₊, in units of the radar pixel's β reference area A_β = δaz·δsr (along-track ground
  distance per line × slant range per GRD pixel, both exact at the facet from the orbit and the
  srgr polynomial), is splatted bilinearly into radar (line, pixel) bins; the sum per bin is the
  simulated β0 of a γ0 = 1 world, and γ0_RTC = β0 / simulated, gathered back bilinearly.
  On a flat ellipsoid this gives β0·tan θ exactly in the continuum limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
UInt8Array = npt.NDArray[np.uint8]

MASK_LAYOVER = 1
MASK_SHADOW = 2
MASK_NODATA = 4


def ellipsoid_up(points: FloatArray) -> FloatArray:
    """Unit normal of the WGS84 ellipsoid through each ECEF point (geodetic up)."""
    a2 = 6378137.0**2
    b2 = (6378137.0 * (1 - 1 / 298.257223563)) ** 2
    n = points / np.array([a2, a2, b2])
    out: FloatArray = n / np.linalg.norm(n, axis=-1, keepdims=True)
    return out


@dataclass(frozen=True)
class Facets:
    area_m2: FloatArray
    normal: FloatArray
    cos_local: FloatArray
    mask: UInt8Array

    @property
    def local_incidence_deg(self) -> FloatArray:
        out: FloatArray = np.degrees(np.arccos(np.clip(self.cos_local, -1.0, 1.0)))
        return out


def facets(points: FloatArray, look: FloatArray) -> Facets:
    """Facet area, normal, cos(local incidence) and layover/shadow bits for a (ny, nx, 3) ECEF grid."""
    ny, nx = points.shape[:2]
    if ny < 2 or nx < 2 or points.ndim != 3:
        return _facets_numpy(points, look)
    area, cos_local = np.empty((ny, nx)), np.empty((ny, nx))
    normal = np.empty((ny, nx, 3))
    mask = np.zeros((ny, nx), np.uint8)
    _facets_kernel(
        np.ascontiguousarray(points, dtype=np.float64),
        np.ascontiguousarray(look, dtype=np.float64),
        area,
        normal,
        cos_local,
        mask,
    )
    return Facets(area, normal, cos_local, mask)


@numba.njit(cache=True, nogil=True)
def _facets_kernel(
    points: FloatArray, look: FloatArray, area: FloatArray, normal: FloatArray, cos_local: FloatArray, mask: UInt8Array
) -> None:
    """:func:`_facets_numpy` in one pass per pixel (numpy made ~30 temporaries of the block's size)."""
    ny, nx = area.shape
    a2 = 6378137.0**2
    b2 = (6378137.0 * (1 - 1 / 298.257223563)) ** 2
    dc, dr, n, up, lk, g = np.empty(3), np.empty(3), np.empty(3), np.empty(3), np.empty(3), np.empty(3)
    for i in range(ny):
        i0, i1, si = (i - 1, i + 1, 2.0) if 0 < i < ny - 1 else ((0, 1, 1.0) if i == 0 else (ny - 2, ny - 1, 1.0))
        for j in range(nx):
            j0, j1, sj = (j - 1, j + 1, 2.0) if 0 < j < nx - 1 else ((0, 1, 1.0) if j == 0 else (nx - 2, nx - 1, 1.0))
            for c in range(3):  # np.gradient: central inside, one-sided at the edges
                dc[c] = (points[i, j1, c] - points[i, j0, c]) / sj
                dr[c] = (points[i1, j, c] - points[i0, j, c]) / si
                lk[c] = look[i, j, c]
            n[0] = dc[1] * dr[2] - dc[2] * dr[1]
            n[1] = dc[2] * dr[0] - dc[0] * dr[2]
            n[2] = dc[0] * dr[1] - dc[1] * dr[0]
            up[0], up[1], up[2] = points[i, j, 0] / a2, points[i, j, 1] / a2, points[i, j, 2] / b2
            norm_up = np.sqrt(up[0] * up[0] + up[1] * up[1] + up[2] * up[2])
            for c in range(3):
                up[c] /= norm_up
            n_up = n[0] * up[0] + n[1] * up[1] + n[2] * up[2]
            sign = np.nan if np.isnan(n_up) else (1.0 if n_up > 0 else (-1.0 if n_up < 0 else 0.0))
            for c in range(3):
                n[c] *= sign
            a = np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
            area[i, j] = a
            for c in range(3):
                n[c] /= a
                normal[i, j, c] = n[c]
            cl = n[0] * lk[0] + n[1] * lk[1] + n[2] * lk[2]
            cos_local[i, j] = cl
            l_up = lk[0] * up[0] + lk[1] * up[1] + lk[2] * up[2]
            for c in range(3):
                g[c] = lk[c] - l_up * up[c]
            norm_g = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2])
            for c in range(3):
                g[c] /= norm_g
            slope = np.arctan2(n[0] * g[0] + n[1] * g[1] + n[2] * g[2], n[0] * up[0] + n[1] * up[1] + n[2] * up[2])
            look_angle = np.arctan2(lk[0] * g[0] + lk[1] * g[1] + lk[2] * g[2], l_up)
            bits = 0
            if slope > look_angle:
                bits |= MASK_LAYOVER
            if cl <= 0:
                bits |= MASK_SHADOW
            mask[i, j] = bits


def _facets_numpy(points: FloatArray, look: FloatArray) -> Facets:
    d_col = np.gradient(points, axis=1)
    d_row = np.gradient(points, axis=0)
    n = np.cross(d_col, d_row)
    up = ellipsoid_up(points)
    n = n * np.sign(np.einsum("...k,...k->...", n, up))[..., None]
    area = np.linalg.norm(n, axis=-1)
    nh = n / area[..., None]
    cos_local = np.einsum("...k,...k->...", nh, look)
    # the range plane: ellipsoid up and the horizontal direction towards the sensor
    l_up = np.einsum("...k,...k->...", look, up)
    g = look - l_up[..., None] * up
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    slope_to_sensor = np.arctan2(np.einsum("...k,...k->...", nh, g), np.einsum("...k,...k->...", nh, up))
    look_angle = np.arctan2(np.einsum("...k,...k->...", look, g), l_up)
    mask = np.zeros(area.shape, np.uint8)
    mask[slope_to_sensor > look_angle] |= MASK_LAYOVER
    mask[cos_local <= 0] |= MASK_SHADOW
    return Facets(area, nh, cos_local, mask)


def splat(
    weights: FloatArray, line: FloatArray, pixel: FloatArray, shape: tuple[int, int], row0: int, col0: int
) -> FloatArray:
    """Bilinear accumulation of ``weights`` at (line, pixel) into a (rows, cols) radar grid starting at (row0, col0)."""
    acc = np.zeros(shape[0] * shape[1], dtype=np.float64)
    ok = np.isfinite(weights) & np.isfinite(line) & np.isfinite(pixel)
    lf, pf, w = line[ok] - row0, pixel[ok] - col0, weights[ok]
    i0, j0 = np.floor(lf).astype(np.int64), np.floor(pf).astype(np.int64)
    fi, fj = lf - i0, pf - j0
    for di, dj, ww in ((0, 0, (1 - fi) * (1 - fj)), (0, 1, (1 - fi) * fj), (1, 0, fi * (1 - fj)), (1, 1, fi * fj)):
        ii, jj = i0 + di, j0 + dj
        inside = (ii >= 0) & (ii < shape[0]) & (jj >= 0) & (jj < shape[1])
        acc += np.bincount(ii[inside] * shape[1] + jj[inside], weights=(w * ww)[inside], minlength=acc.size)
    return acc.reshape(shape)


def bilinear(image: FloatArray, line: FloatArray, pixel: FloatArray, row0: int = 0, col0: int = 0) -> FloatArray:
    """``image`` (whose top-left is radar (row0, col0)) at fractional (line, pixel); NaN outside or next to NaN."""
    out = np.full(line.shape, np.nan)
    if image.size == 0:
        return out
    _bilinear_kernel(
        np.ascontiguousarray(image, dtype=np.float64),
        np.ascontiguousarray(line, dtype=np.float64).reshape(-1),
        np.ascontiguousarray(pixel, dtype=np.float64).reshape(-1),
        float(row0),
        float(col0),
        out.reshape(-1),
    )
    return out


@numba.njit(cache=True, nogil=True)
def _bilinear_kernel(
    image: FloatArray, line: FloatArray, pixel: FloatArray, row0: float, col0: float, out: FloatArray
) -> None:
    """One pass per point (numpy needed ~15 temporaries of the block's size)."""
    rows, cols = image.shape
    for n in range(line.shape[0]):
        lf = line[n] - row0
        pf = pixel[n] - col0
        if not (np.isfinite(lf) and np.isfinite(pf)) or lf < 0 or pf < 0 or lf > rows - 1 or pf > cols - 1:
            continue
        i0 = min(int(np.floor(lf)), rows - 2 if rows > 1 else 0)
        j0 = min(int(np.floor(pf)), cols - 2 if cols > 1 else 0)
        i1, j1 = min(i0 + 1, rows - 1), min(j0 + 1, cols - 1)
        fi, fj = lf - i0, pf - j0
        out[n] = (
            image[i0, j0] * (1 - fi) * (1 - fj)
            + image[i0, j1] * (1 - fi) * fj
            + image[i1, j0] * fi * (1 - fj)
            + image[i1, j1] * fi * fj
        )


@numba.njit(cache=True, nogil=True)
def _splat_oversampled_kernel(
    acc: FloatArray,
    weights: FloatArray,
    line: FloatArray,
    pixel: FloatArray,
    dl_dc: FloatArray,
    dl_dr: FloatArray,
    dp_dc: FloatArray,
    dp_dr: FloatArray,
    k: int,
    row0: int,
    col0: int,
) -> None:
    rows, cols = acc.shape
    share = 1.0 / (k * k)
    for i in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            w = weights[i, j] * share
            if not (np.isfinite(w) and np.isfinite(line[i, j]) and np.isfinite(pixel[i, j])):
                continue
            for a_i in range(k):
                a = (a_i + 0.5) / k - 0.5
                for b_i in range(k):
                    b = (b_i + 0.5) / k - 0.5
                    lf = line[i, j] + a * dl_dc[i, j] + b * dl_dr[i, j] - row0
                    pf = pixel[i, j] + a * dp_dc[i, j] + b * dp_dr[i, j] - col0
                    if not (np.isfinite(lf) and np.isfinite(pf)):
                        continue
                    i0 = int(np.floor(lf))
                    j0 = int(np.floor(pf))
                    fi = lf - i0
                    fj = pf - j0
                    for di in range(2):
                        ii = i0 + di
                        if ii < 0 or ii >= rows:
                            continue
                        wi = fi if di else 1.0 - fi
                        for dj in range(2):
                            jj = j0 + dj
                            if jj < 0 or jj >= cols:
                                continue
                            acc[ii, jj] += w * wi * (fj if dj else 1.0 - fj)


def splat_oversampled(
    weights: FloatArray,
    line: FloatArray,
    pixel: FloatArray,
    derivatives: tuple[FloatArray, FloatArray, FloatArray, FloatArray],
    k: int,
    shape: tuple[int, int],
    row0: int,
    col0: int,
) -> FloatArray:
    """:func:`splat` of each facet's weight shared over k × k points of its footprint.

    The points sit at offsets ((a + ½)/k − ½, (b + ½)/k − ½) pixels around the facet centre, moved
    to radar coordinates with the local derivatives (dline/dcol, dline/drow, dpixel/dcol,
    dpixel/drow). One compiled pass (numba) instead of k² numpy passes.
    """
    acc = np.zeros(shape, dtype=np.float64)
    dl_dc, dl_dr, dp_dc, dp_dr = (np.ascontiguousarray(d, dtype=np.float64) for d in derivatives)
    _splat_oversampled_kernel(
        acc,
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(line, dtype=np.float64),
        np.ascontiguousarray(pixel, dtype=np.float64),
        dl_dc,
        dl_dr,
        dp_dc,
        dp_dr,
        int(k),
        int(row0),
        int(col0),
    )
    return acc
