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
