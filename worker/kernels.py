"""numba kernels behind :mod:`worker.engine`.

Kept apart from the engine so that the engine reads as geometry and bookkeeping, and so that every
compiled function (and its on-disk cache) lives in one module. The kernels know nothing about
geometry: a parcel is a list of horizontal pixel runs ``(row, first column, length)`` in grid
coordinates, grouped per parcel by ``offsets`` (CSR). Runs, not pixels, because a rasterized
polygon is a union of row segments: a tenth of the memory of a pixel list, and the gather reads
contiguous memory.

Statistics are computed in float64 whatever the raster dtype. For integer rasters that is exactly
what numpy does for ``mean`` (int64 sum, then ``* 1.0 / count``), ``std`` and ``percentile``; for
float32 rasters numpy would accumulate in float32, so float64 here is the more accurate of the two
and agrees to about 1e-7 relative.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

# np.percentile(q=25/50/75) divides q by 100; these three quotients are exact in binary.
_Q25 = 0.25
_Q50 = 0.5
_Q75 = 0.75


@njit(cache=True)
def greedy_layers(n: int, nbr_ptr: Any, nbr_idx: Any) -> Any:
    """Colour the conflict graph so that parcels sharing a colour can never share a pixel.

    Greedy colouring in input order; parcel maps are near-planar, so a handful of colours suffices
    and each colour becomes one rasterization layer.
    """
    colour = np.full(n, -1, np.int32)
    seen = np.full(n + 1, -1, np.int64)
    for i in range(n):
        for k in range(nbr_ptr[i], nbr_ptr[i + 1]):
            c = colour[nbr_idx[k]]
            if c >= 0:
                seen[c] = i
        c = 0
        while seen[c] == i:
            c += 1
        colour[i] = c
    return colour


@njit(cache=True)
def group_order(keys: Any, n: int) -> Any:
    """Stable counting-sort permutation of ``keys`` (all in ``0..n-1``) and the CSR offsets.

    Linear time, where a stable argsort of millions of runs is a merge sort.
    """
    offsets = np.zeros(n + 1, np.int64)
    for k in keys:
        offsets[k + 1] += 1
    for i in range(n):
        offsets[i + 1] += offsets[i]
    nxt = offsets[:-1].copy()
    order = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        order[nxt[keys[i]]] = i
        nxt[keys[i]] += 1
    return order, offsets


@njit(cache=True)
def label_runs(burnt: Any, row0: int, col0: int, count_bits: int) -> Any:
    """Horizontal runs of the pixels burnt by exactly one parcel, in grid coordinates.

    ``burnt`` is the sum over parcels of ``(label << count_bits) + 1``: its low bits count the
    parcels that burnt a pixel, its high bits are the (1-based) label when that count is one.
    Returns the runs (0-based labels) and a mask of the pixels burnt more than once.
    Two passes (count, then fill) so the output is allocated once at its exact size.
    """
    h, w = burnt.shape
    low = (1 << count_bits) - 1
    clash = np.zeros((h, w), np.bool_)
    n = 0
    for r in range(h):
        prev = 0
        for c in range(w):
            v = burnt[r, c]
            lab = 0
            if v != 0:
                if v & low == 1:
                    lab = v >> count_bits
                else:
                    clash[r, c] = True
            if lab != prev:
                if lab != 0:
                    n += 1
                prev = lab
    parcel = np.empty(n, np.int64)
    rows = np.empty(n, np.int32)
    cols = np.empty(n, np.int32)
    lens = np.empty(n, np.int32)
    k = -1
    for r in range(h):
        prev = 0
        for c in range(w):
            v = burnt[r, c]
            lab = v >> count_bits if v & low == 1 else 0
            if lab != prev:
                if lab != 0:
                    k += 1
                    parcel[k] = lab - 1
                    rows[k] = row0 + r
                    cols[k] = col0 + c
                    lens[k] = 1
                prev = lab
            elif lab != 0:
                lens[k] += 1
    return parcel, rows, cols, lens, clash


@njit(cache=True)
def window_hits(clash: Any, a0: Any, a1: Any, b0: Any, b1: Any) -> Any:
    """Whether each window ``[a0, a1) x [b0, b1)`` of the ``clash`` mask holds a set pixel.

    One pass builds an int32 summed-area table, then every window is four lookups.
    """
    h, w = clash.shape
    sat = np.zeros((h + 1, w + 1), np.int32)
    for r in range(h):
        acc = 0
        for c in range(w):
            acc += clash[r, c]
            sat[r + 1, c + 1] = sat[r, c + 1] + acc
    hits = np.empty(a0.shape[0], np.bool_)
    for i in range(a0.shape[0]):
        hits[i] = sat[a1[i], b1[i]] - sat[a0[i], b1[i]] - sat[a1[i], b0[i]] + sat[a0[i], b0[i]] > 0
    return hits


@njit(cache=True)
def _rank_positions(n: int, pos: Any) -> int:
    """Ascending distinct sorted positions that p25, p50 and p75 read (see :func:`_percentile`)."""
    m = 0
    for q in (_Q25, _Q50, _Q75):
        v = (n - 1) * q
        if v >= n - 1:
            continue
        lo = int(np.floor(v))
        for p in (lo, lo + 1):
            if p > lo and v == lo:
                break
            if m == 0 or pos[m - 1] < p:
                pos[m] = p
                m += 1
    return m


@njit(cache=True)
def _percentile(s: Any, n: int, q: float, offset: float, vmax: float) -> float:
    """numpy's default ``method="linear"``, operation for operation, on order statistics in ``s``.

    ``s[i] + offset`` must be the i-th smallest value for the positions :func:`_rank_positions`
    names; ``vmax`` is the largest value. numpy: virtual index ``(n-1)*q``; at or past the last
    index the largest value; otherwise ``d = b - a``, then ``a + d*t`` for ``t < 0.5`` but
    ``b - d*(1-t)`` for ``t >= 0.5`` (its ``_lerp``, exact at the nearer end).
    """
    v = (n - 1) * q
    if v >= n - 1:
        return vmax
    lo = int(np.floor(v))
    t = v - lo
    a = s[lo] + offset
    if t == 0.0:
        return float(a)  # numpy's a + d*0.0, without reading s[lo + 1]
    b = s[lo + 1] + offset
    d = b - a
    if t >= 0.5:
        return float(b - d * (1.0 - t))
    return float(a + d * t)


@njit(cache=True)
def _select(a: Any, lo: int, hi: int, k: int) -> None:
    """Quickselect: reorder ``a[lo:hi]`` so that ``a[k]`` holds its sorted value, smaller ones left.

    Far cheaper than numba's NaN-aware sort for the handful of order statistics needed (values
    here are never NaN). Hoare partition around a median of three; short ranges by insertion.
    """
    hi -= 1
    while hi > lo:
        if hi - lo < 16:
            for i in range(lo + 1, hi + 1):
                x = a[i]
                j = i - 1
                while j >= lo and a[j] > x:
                    a[j + 1] = a[j]
                    j -= 1
                a[j + 1] = x
            return
        mid = (lo + hi) >> 1
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return


@njit(cache=True)
def _place_order_stats(a: Any, n: int, pos: Any, m: int) -> None:
    """Put the order statistics at ``pos[:m]`` (ascending) in place, each search right of the last."""
    start = 0
    for j in range(m):
        p = pos[j]
        if p == start:  # the smallest of what is left: one scan beats a partition
            best = start
            for i in range(start + 1, n):
                if a[i] < a[best]:
                    best = i
            a[start], a[best] = a[best], a[start]
        else:
            _select(a, start, n, p)
        start = p + 1


@njit(cache=True)
def _radix_order_stats(keys: Any, n: int, base: int, span: int, pos: Any, m: int, h1: Any, h2: Any, slot: Any) -> None:
    """Order statistics of integers ``base..base+span-1`` (span <= 65536), written to ``keys[pos]``.

    Two counting passes, high bits then low bits only inside the high-bit buckets that hold a
    wanted rank: linear time without data-dependent branches, several times faster than any
    comparison sort on 16-bit imagery. The split adapts to the span, so a homogeneous field walks
    a few dozen bins, not 2 x 256. ``h1`` (256), ``h2`` (6 x 256) and ``slot`` (256, all -1) are
    scratch; ``slot`` is returned to all -1.
    """
    width = 0
    while (1 << width) < span:
        width += 1
    shift = (width + 1) // 2
    mask = (1 << shift) - 1
    nb = ((span - 1) >> shift) + 1
    h1[:nb] = 0
    for i in range(n):
        h1[(keys[i] - base) >> shift] += 1
    bucket = np.empty(m, np.int64)
    within = np.empty(m, np.int64)
    cum = 0
    b = 0
    nslots = 0
    for j in range(m):
        while cum + h1[b] <= pos[j]:
            cum += h1[b]
            b += 1
        bucket[j] = b
        within[j] = pos[j] - cum
        if slot[b] < 0:
            slot[b] = nslots
            h2[nslots, : mask + 1] = 0
            nslots += 1
    for i in range(n):
        key = keys[i] - base
        s = slot[key >> shift]
        if s >= 0:
            h2[s, key & mask] += 1
    for j in range(m):
        s = slot[bucket[j]]
        cum = 0
        low = 0
        while cum + h2[s, low] <= within[j]:
            cum += h2[s, low]
            low += 1
        keys[pos[j]] = base + ((bucket[j] << shift) | low)
    for j in range(m):
        slot[bucket[j]] = -1


@njit(cache=True, parallel=True, nogil=True)
def band_stats_int(
    offsets: Any,
    run_row: Any,
    run_col: Any,
    run_len: Any,
    npix: Any,
    chunks: Any,
    values: Any,
    row0: int,
    col0: int,
    has_nodata: bool,
    nodata: int,
    offset: float,
) -> Any:
    """count, mean, std, min, max, p25, p50, p75 per parcel of an integer band.

    Valid: raw value != ``nodata`` (if ``has_nodata``; an integer, compared without a float
    conversion per pixel); ``offset`` is added afterwards. The sum is
    exact in int64, as rasterstats does; percentiles come from radix selection when the parcel's
    values span less than 65536 (always for uint8/uint16), else from quickselect. Parallel over
    chunks of parcels, each with its own scratch.
    """
    n = offsets.shape[0] - 1
    count = np.zeros(n, np.int64)
    out = np.full((7, n), np.nan)
    for ch in prange(chunks.shape[0] - 1):
        lo = chunks[ch]
        hi = chunks[ch + 1]
        cap = 1
        for p in range(lo, hi):
            cap = max(cap, npix[p])
        buf = np.empty(cap, np.int64)
        pos = np.empty(6, np.int64)
        h1 = np.zeros(256, np.int64)
        h2 = np.zeros((6, 256), np.int64)
        slot = np.full(256, -1, np.int64)
        for p in range(lo, hi):
            k = 0
            isum = 0
            vmin = 0
            vmax = 0
            for r in range(offsets[p], offsets[p + 1]):
                row = run_row[r] - row0
                c0 = run_col[r] - col0
                for j in range(run_len[r]):
                    x = int(values[row, c0 + j])
                    if has_nodata and x == nodata:
                        continue
                    if k == 0:
                        vmin = x
                        vmax = x
                    elif x < vmin:
                        vmin = x
                    elif x > vmax:
                        vmax = x
                    buf[k] = x
                    isum += x
                    k += 1
            count[p] = k
            if k == 0:
                continue
            mean = (float(isum) + k * offset) / k
            ss = 0.0
            for i in range(k):
                d = (buf[i] + offset) - mean
                ss += d * d
            m = _rank_positions(k, pos)
            if vmax - vmin < 65536:
                _radix_order_stats(buf, k, vmin, vmax - vmin + 1, pos, m, h1, h2, slot)
            else:
                _place_order_stats(buf, k, pos, m)
            top = vmax + offset
            out[0, p] = mean
            out[1, p] = np.sqrt(ss / k)
            out[2, p] = vmin + offset
            out[3, p] = top
            out[4, p] = _percentile(buf, k, _Q25, offset, top)
            out[5, p] = _percentile(buf, k, _Q50, offset, top)
            out[6, p] = _percentile(buf, k, _Q75, offset, top)
    return count, out


@njit(cache=True, parallel=True, nogil=True)
def band_stats_float(
    offsets: Any,
    run_row: Any,
    run_col: Any,
    run_len: Any,
    npix: Any,
    chunks: Any,
    values: Any,
    row0: int,
    col0: int,
    has_nodata: bool,
    nodata: float,
    offset: float,
) -> Any:
    """As :func:`band_stats_int` for a float band: NaN is never valid; float64 throughout."""
    n = offsets.shape[0] - 1
    count = np.zeros(n, np.int64)
    out = np.full((7, n), np.nan)
    for ch in prange(chunks.shape[0] - 1):
        lo = chunks[ch]
        hi = chunks[ch + 1]
        cap = 1
        for p in range(lo, hi):
            cap = max(cap, npix[p])
        buf = np.empty(cap, np.float64)
        pos = np.empty(6, np.int64)
        for p in range(lo, hi):
            k = 0
            total = 0.0
            vmin = np.inf
            vmax = -np.inf
            for r in range(offsets[p], offsets[p + 1]):
                row = run_row[r] - row0
                c0 = run_col[r] - col0
                for j in range(run_len[r]):
                    v = values[row, c0 + j]
                    if v != v or (has_nodata and v == nodata):
                        continue
                    x = v + offset
                    vmin = min(vmin, x)
                    vmax = max(vmax, x)
                    buf[k] = x
                    total += x
                    k += 1
            count[p] = k
            if k == 0:
                continue
            mean = total / k
            ss = 0.0
            for i in range(k):
                d = buf[i] - mean
                ss += d * d
            m = _rank_positions(k, pos)
            _place_order_stats(buf, k, pos, m)
            out[0, p] = mean
            out[1, p] = np.sqrt(ss / k)
            out[2, p] = vmin
            out[3, p] = vmax
            out[4, p] = _percentile(buf, k, _Q25, 0.0, vmax)
            out[5, p] = _percentile(buf, k, _Q50, 0.0, vmax)
            out[6, p] = _percentile(buf, k, _Q75, 0.0, vmax)
    return count, out


@njit(cache=True, parallel=True, nogil=True)
def class_counts(
    offsets: Any,
    run_row: Any,
    run_col: Any,
    run_len: Any,
    chunks: Any,
    values: Any,
    row0: int,
    col0: int,
    has_nodata: bool,
    nodata: int,
    starts: Any,
    fill: bool,
    out_parcel: Any,
    out_cls: Any,
    out_count: Any,
) -> Any:
    """Per-parcel histograms of 8-bit classes, as (parcel, class, count) rows of non-zero counts.

    Called twice: first (``fill=False``) to learn how many rows each parcel has, then, with
    ``starts`` the exclusive prefix sum of those numbers, to write the rows in parcel, class order.
    A 256-bin scratch histogram per chunk keeps memory independent of the parcel count.
    """
    n = offsets.shape[0] - 1
    nclasses = np.zeros(n, np.int64)
    for ch in prange(chunks.shape[0] - 1):
        hist = np.zeros(256, np.int64)
        for p in range(chunks[ch], chunks[ch + 1]):
            lo = 255
            hi = 0
            for r in range(offsets[p], offsets[p + 1]):
                row = run_row[r] - row0
                c0 = run_col[r] - col0
                for j in range(run_len[r]):
                    v = values[row, c0 + j]
                    if has_nodata and v == nodata:
                        continue
                    hist[v] += 1
                    lo = min(lo, v)
                    hi = max(hi, v)
            w = starts[p]
            for c in range(lo, hi + 1):
                if hist[c] != 0:
                    if fill:
                        out_parcel[w] = p
                        out_cls[w] = c
                        out_count[w] = hist[c]
                        w += 1
                    nclasses[p] += 1
                    hist[c] = 0
    return nclasses
