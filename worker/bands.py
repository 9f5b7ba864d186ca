"""Which Sentinel-2 bands a dataset extracts, grouped by the native grid they are read on.

The set is a dataset setting (``datasets.s2_bands``, migration 007): NULL means JRC's set, which
the CbM API and its clients expect (B02 B03 B04 B08 at 10 m, B05 B11 at 20 m, SCL histograms);
any L2A reflectance band may be asked for instead, each read at its native resolution (never a
resampled copy), one parcel index per grid. SCL histograms are always written: they ride with
the 20 m group (SCL's native grid), or form a group of their own when no 20 m band is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from card.s2 import native_resolution_m, normalize_band

JRC_S2_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08", "B05", "B11")
L2A_REFLECTANCE_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)  # fmt: skip


def s2_band_groups(bands: Sequence[str] | None) -> list[tuple[tuple[str, ...], bool]]:
    """``(bands on one native grid, whether SCL goes with them)`` per resolution, finest first.

    ``None`` (or empty) gives JRC's set: ``[((B02, B03, B04, B08), False), ((B05, B11), True)]``.
    A group ``(("SCL",), False)`` carries the histograms alone when no 20 m band is asked for.
    ``ValueError`` for a name that is not an L2A reflectance band.
    """
    wanted: list[str] = []
    for b in bands or JRC_S2_BANDS:
        name = normalize_band(b)
        if name not in L2A_REFLECTANCE_BANDS:
            raise ValueError(f"{b!r} is not a Sentinel-2 L2A reflectance band ({', '.join(L2A_REFLECTANCE_BANDS)})")
        if name not in wanted:
            wanted.append(name)
    by_res: dict[int, list[str]] = {}
    for name in wanted:
        by_res.setdefault(native_resolution_m(name), []).append(name)
    groups = [(tuple(by_res[res]), res == native_resolution_m("SCL")) for res in sorted(by_res)]
    if native_resolution_m("SCL") not in by_res:
        groups.append((("SCL",), False))
    return groups
