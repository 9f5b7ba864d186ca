"""Sentinel-1 CARD products as the test-data generator writes them and JRC archived them:
helpers shared by the reader's unit tests and the worker's integration test (not collected)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import rasterio


def _card(name: str) -> str:
    return "bs" if name.endswith("_CARD_BS") else "c6"


def _truth(path: Path) -> dict[tuple[str, str, str], tuple[int, float]]:
    with path.open() as fh:
        return {
            (r["parcel_id"], r["product_id"], r["band"]): (int(r["count"]), float(r["mean"]))
            for r in csv.DictReader(fh)
        }


def _write_tif(path: Path, bands: list[tuple[str, np.ndarray[Any, Any]]], like: Path, dtype: str = "float32") -> None:
    """A GeoTIFF on ``like``'s grid with the given (description, array) bands, in that order."""
    with rasterio.open(like) as src:
        profile = {"crs": src.crs, "transform": src.transform, "width": src.width, "height": src.height}
    with rasterio.open(
        path, "w", driver="GTiff", count=len(bands), dtype=dtype, nodata=None if dtype != "float32" else math.nan,
        **profile,
    ) as dst:  # fmt: skip
        for k, (desc, array) in enumerate(bands, start=1):
            dst.write(array.astype(dtype), k)
            if desc:
                dst.set_band_description(k, desc)


def _read_pol(tif: Path) -> dict[str, np.ndarray[Any, Any]]:
    """The COG's bands by description (read independently of card.s1)."""
    with rasterio.open(tif) as src:
        return {d: src.read(k) for k, d in enumerate(src.descriptions, start=1)}


def to_dimap(tif: Path, dest: Path, *, names: dict[str, str] | None = None, dim: bool = True) -> Path:
    """Re-write a CARD COG as SNAP/JRC would have: ``<ref>/<ref>.dim`` + ``<ref>.data/<band>.img``
    (ENVI float32), no-data written as 0.0 and declared in the ``.dim``. Returns ``<ref>/``."""
    ref = tif.stem
    names = names or {"VV": "Gamma0_VV", "VH": "Gamma0_VH"}
    root = dest / ref
    data = root / f"{ref}.data"
    data.mkdir(parents=True)
    with rasterio.open(tif) as src:
        crs, transform, width, height = src.crs, src.transform, src.width, src.height
    infos, files = [], []
    for k, (pol, array) in enumerate(sorted(_read_pol(tif).items())):
        name = names[pol]
        with rasterio.open(
            data / f"{name}.img", "w", driver="ENVI", width=width, height=height, count=1, dtype="float32",
            crs=crs, transform=transform,
        ) as dst:  # fmt: skip
            dst.write(np.where(np.isnan(array), np.float32(0.0), array), 1)
        files.append(
            f'    <Data_File>\n      <DATA_FILE_PATH href="{ref}.data/{name}.hdr" />\n'
            f"      <BAND_INDEX>{k}</BAND_INDEX>\n    </Data_File>"
        )
        infos.append(
            f"    <Spectral_Band_Info>\n      <BAND_INDEX>{k}</BAND_INDEX>\n      <BAND_NAME>{name}</BAND_NAME>\n"
            "      <DATA_TYPE>float32</DATA_TYPE>\n      <PHYSICAL_UNIT>intensity</PHYSICAL_UNIT>\n"
            "      <NO_DATA_VALUE_USED>true</NO_DATA_VALUE_USED>\n      <NO_DATA_VALUE>0.0</NO_DATA_VALUE>\n"
            "    </Spectral_Band_Info>"
        )
    if dim:
        (root / f"{ref}.dim").write_text(
            '<?xml version="1.0" encoding="ISO-8859-1"?>\n<Dimap_Document name="{ref}.dim">\n'
            "  <Data_Access>\n    <DATA_FILE_FORMAT>ENVI</DATA_FILE_FORMAT>\n"
            + "\n".join(files)
            + "\n  </Data_Access>\n  <Image_Interpretation>\n"
            + "\n".join(infos)
            + "\n  </Image_Interpretation>\n</Dimap_Document>\n"
        )
    return root
