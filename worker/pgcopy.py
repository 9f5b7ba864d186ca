"""PostgreSQL binary COPY encoding of statistics, built with numpy structured arrays.

Binary COPY skips text parsing on the server and float formatting on the client; building the
rows as one big-endian structured array keeps the encoder free of Python loops over rows.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt

HEADER = b"PGCOPY\n\xff\r\n\x00" + np.array([0, 0], dtype=">i4").tobytes()
TRAILER = np.array([-1], dtype=">i2").tobytes()

STAT_FIELDS = ("mean", "std", "min", "max", "p25", "p50", "p75")


def sig_rows(
    pid: npt.NDArray[Any], scene_id: int, band: str, count: npt.NDArray[Any], stats: dict[str, npt.NDArray[Any]]
) -> bytes:
    """Rows of ``(pid int4, scene_id int8, band text, count int4, mean..p75 float8)``."""
    band_b = band.encode()
    fields: list[tuple[str, str]] = [
        ("n", ">i2"),
        ("l_pid", ">i4"), ("pid", ">i4"),
        ("l_scene", ">i4"), ("scene", ">i8"),
        ("l_band", ">i4"), ("band", f"S{len(band_b)}"),
        ("l_count", ">i4"), ("count", ">i4"),
    ]  # fmt: skip
    for name in STAT_FIELDS:
        fields += [(f"l_{name}", ">i4"), (name, ">f8")]
    rows = np.empty(len(pid), dtype=np.dtype(fields))
    rows["n"] = 4 + len(STAT_FIELDS)
    rows["l_pid"], rows["pid"] = 4, pid
    rows["l_scene"], rows["scene"] = 8, scene_id
    rows["l_band"], rows["band"] = len(band_b), band_b
    rows["l_count"], rows["count"] = 4, count
    for name in STAT_FIELDS:
        rows[f"l_{name}"], rows[name] = 8, stats[name]
    return rows.tobytes()


def hist_rows(pid: npt.NDArray[Any], scene_id: int, cls: npt.NDArray[Any], count: npt.NDArray[Any]) -> bytes:
    """Rows of ``(pid int4, scene_id int8, class int2, count int4)``."""
    dt = np.dtype(
        [("n", ">i2"), ("l_pid", ">i4"), ("pid", ">i4"), ("l_scene", ">i4"), ("scene", ">i8"),
         ("l_cls", ">i4"), ("cls", ">i2"), ("l_count", ">i4"), ("count", ">i4")]
    )  # fmt: skip
    rows = np.empty(len(pid), dtype=dt)
    rows["n"] = 4
    rows["l_pid"], rows["pid"] = 4, pid
    rows["l_scene"], rows["scene"] = 8, scene_id
    rows["l_cls"], rows["cls"] = 2, cls
    rows["l_count"], rows["count"] = 4, count
    return rows.tobytes()


def stream(chunks: list[bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    buf.write(HEADER)
    for chunk in chunks:
        buf.write(chunk)
    buf.write(TRAILER)
    buf.seek(0)
    return buf


# --- compact layout: one row per (parcel, scene) (sql/011_compact_signatures.sql) -----------------

STATS_PER_BAND = 1 + len(STAT_FIELDS)
"""Slots per band in ``stats``: count, then mean, std, min, max, p25, p50, p75."""
_FLOAT4_OID, _INT4_OID = 700, 23


def _sig_dtype(band_len: int) -> np.dtype[Any]:
    fields: list[tuple[str, str]] = [
        ("n", ">i2"), ("l_pid", ">i4"), ("pid", ">i4"), ("l_scene", ">i4"), ("scene", ">i8"),
        ("l_band", ">i4"), ("band", f"S{band_len}"), ("l_count", ">i4"), ("count", ">i4"),
    ]  # fmt: skip
    for name in STAT_FIELDS:
        fields += [(f"l_{name}", ">i4"), (name, ">f8")]
    return np.dtype(fields)


def _decode_sigs(chunk: bytes) -> tuple[str, npt.NDArray[Any]]:
    """A :func:`sig_rows` chunk back as (band, structured rows); every row of a chunk has one band."""
    band_len = int(np.frombuffer(chunk, dtype=">i4", count=1, offset=22)[0])  # after n, pid and scene_id
    rows = np.frombuffer(chunk, dtype=_sig_dtype(band_len))
    return rows["band"][0].decode(), rows


_HIST_DTYPE = np.dtype(
    [("n", ">i2"), ("l_pid", ">i4"), ("pid", ">i4"), ("l_scene", ">i4"), ("scene", ">i8"),
     ("l_cls", ">i4"), ("cls", ">i2"), ("l_count", ">i4"), ("count", ">i4")]
)  # fmt: skip


def observation_rows(sig_chunks: list[bytes], hist_chunks: list[bytes]) -> tuple[list[str], bytes]:
    """One scene's per-band rows (:func:`sig_rows`) and SCL rows (:func:`hist_rows`) of one dataset
    (the scene id is the rows' own) as binary COPY rows of ``(scene_id int8, pid int4, stats float4[],
    scl int4[])``, one per parcel, and the band order of ``stats``.

    The engine works band by band (10 m and 20 m bands on their own grids), so a parcel's row is
    assembled here: ``stats`` holds ``STATS_PER_BAND`` slots per band, count 0 where the parcel had
    too few pixels in that band; ``scl`` the (class, count) pairs by class, NULL without any. Rows
    are grouped by their number of SCL pairs, each group one fixed-size numpy record, so no Python
    loop runs per parcel. Statistics are rounded to float4 here (the table's type).
    """
    bands: list[str] = []
    blocks: list[npt.NDArray[Any]] = []
    for chunk in sig_chunks:
        if not chunk:
            continue
        band, rows = _decode_sigs(chunk)
        if band in bands:
            raise ValueError(f"band {band} given twice for one scene")
        bands.append(band)
        blocks.append(rows)
    hist = np.concatenate([np.frombuffer(c, dtype=_HIST_DTYPE) for c in hist_chunks if c]) if any(hist_chunks) else None
    pid_parts = [b["pid"] for b in blocks] + ([hist["pid"]] if hist is not None else [])
    if not pid_parts:
        return bands, b""
    scenes = np.unique(np.concatenate([b["scene"] for b in blocks] + ([hist["scene"]] if hist is not None else [])))
    if len(scenes) != 1:
        raise ValueError(f"rows of {len(scenes)} scenes given as one scene's")
    scene_id = int(scenes[0])
    pids = np.unique(np.concatenate(pid_parts).astype(np.int32))
    n, width = len(pids), STATS_PER_BAND * len(bands)
    stats = np.zeros((n, width), dtype=np.float32)
    for b, rows in enumerate(blocks):
        at = np.searchsorted(pids, rows["pid"])
        stats[at, b * STATS_PER_BAND] = rows["count"]
        for k, name in enumerate(STAT_FIELDS, start=1):
            stats[at, b * STATS_PER_BAND + k] = rows[name]
    pairs = np.zeros(n, dtype=np.int64)
    if hist is not None:
        order = np.lexsort((hist["cls"], hist["pid"]))
        h_pid, h_cls, h_cnt = hist["pid"][order], hist["cls"][order], hist["count"][order]
        at = np.searchsorted(pids, h_pid)
        np.add.at(pairs, at, 1)
        first = np.cumsum(pairs) - pairs  # where each parcel's pairs start in the sorted arrays
    out: list[bytes] = []
    for k in np.unique(pairs):
        sel = np.flatnonzero(pairs == k)
        fields: list[tuple[Any, ...]] = [
            ("n", ">i2"), ("l_scene", ">i4"), ("scene", ">i8"), ("l_pid", ">i4"), ("pid", ">i4"), ("l_stats", ">i4"),
        ]  # fmt: skip
        if width:
            fields += [("s_hdr", ">i4", (5,)), ("stats", [("l", ">i4"), ("v", ">f4")], (width,))]
        if k:
            fields += [("l_scl", ">i4"), ("h_hdr", ">i4", (5,)), ("scl", [("l", ">i4"), ("v", ">i4")], (2 * int(k),))]
        else:
            fields += [("l_scl", ">i4")]
        rec = np.empty(len(sel), dtype=np.dtype(fields))
        rec["n"] = 4
        rec["l_scene"], rec["scene"] = 8, scene_id
        rec["l_pid"], rec["pid"] = 4, pids[sel]
        if width:
            rec["l_stats"] = 20 + 8 * width
            rec["s_hdr"] = (1, 0, _FLOAT4_OID, width, 1)  # ndim, has-null flags, element type, length, lower bound
            rec["stats"]["l"] = 4
            rec["stats"]["v"] = stats[sel]
        else:
            rec["l_stats"] = -1  # a scene with SCL only: no statistics
        if k:
            kk = int(k)
            rec["l_scl"] = 20 + 16 * kk
            rec["h_hdr"] = (1, 0, _INT4_OID, 2 * kk, 1)
            rec["scl"]["l"] = 4
            idx = first[sel][:, None] + np.arange(kk)[None, :]
            flat = np.empty((len(sel), 2 * kk), dtype=np.int64)
            flat[:, 0::2] = h_cls[idx]
            flat[:, 1::2] = h_cnt[idx]
            rec["scl"]["v"] = flat
        else:
            rec["l_scl"] = -1
        out.append(rec.tobytes())
    return bands, b"".join(out)
