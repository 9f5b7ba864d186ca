"""Parcel files read in batches of features, so an import's memory does not grow with the country.

A national parcel file (the Netherlands' 770k parcels; France's ~10 M) read whole into a
GeoDataFrame costs gigabytes before a single check. Both readers here stream Arrow record
batches: GeoParquet through pyarrow (geometry as WKB, its CRS from the ``geo`` metadata), every
other vector format through GDAL's Arrow stream (pyogrio's ``open_arrow``). A batch is the
geometries as shapely objects plus the attribute columns as Python values; what the file says
about its CRS and columns is known before the first batch, so the import can decide its dataset
before reading on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import shapely

from cbmflow.errors import InvalidInputError

PARQUET_SUFFIXES = (".parquet", ".geoparquet")


@dataclass(frozen=True)
class FeatureBatch:
    offset: int
    """0-based index of the batch's first feature in the file."""
    geoms: np.ndarray[Any, Any]
    """shapely geometries (None where missing or unreadable)."""
    unreadable: np.ndarray[Any, Any]
    """True where the file holds a geometry that could not be decoded."""
    columns: dict[str, list[Any]]


@dataclass(frozen=True)
class FeatureSource:
    crs: pyproj.CRS | None
    columns: list[str]
    """Attribute columns, geometry excluded, as the file names them."""
    batches: Iterator[FeatureBatch]


def _batch(offset: int, record_batch: Any, geometry: str, wanted: list[str]) -> FeatureBatch:
    wkb = np.asarray(record_batch.column(geometry).to_pylist(), dtype=object)
    geoms = shapely.from_wkb(wkb, on_invalid="ignore")
    unreadable = np.fromiter((w is not None for w in wkb), dtype=bool, count=len(wkb)) & shapely.is_missing(geoms)
    return FeatureBatch(
        offset=offset,
        geoms=np.asarray(geoms, dtype=object),
        unreadable=unreadable,
        columns={name: record_batch.column(name).to_pylist() for name in wanted},
    )


def _stream(reader: Iterator[Any], geometry: str, wanted: list[str]) -> Iterator[FeatureBatch]:
    offset = 0
    for record_batch in reader:
        if record_batch.num_rows == 0:
            continue
        yield _batch(offset, record_batch, geometry, wanted)
        offset += record_batch.num_rows


@contextmanager
def open_features(path: Path, layer: str | None, batch_rows: int, wanted: Any = None) -> Iterator[FeatureSource]:
    """The file's CRS and columns, and its features in batches of ``batch_rows``.

    ``wanted(columns) -> list[str]`` picks the attribute columns to read (all when None), after
    the columns are known and before any feature is."""
    if _checked(path, layer):
        yield _open_parquet(path, batch_rows, wanted)
        return
    import pyogrio
    from pyogrio.raw import open_arrow

    try:
        info = pyogrio.read_info(path, layer=layer)
        fields = [str(f) for f in info["fields"]]
        picked = list(wanted(fields)) if wanted is not None else fields
        stream = open_arrow(path, layer=layer, batch_size=batch_rows, columns=picked, use_pyarrow=True)
        meta, reader = stream.__enter__()
    except Exception as exc:  # noqa: BLE001 - same as above
        raise InvalidInputError(f"{path}: cannot read: {exc}") from exc
    try:
        crs = pyproj.CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
        geometry = meta.get("geometry_name") or "wkb_geometry"
        yield FeatureSource(crs, fields, _stream(iter(reader), geometry, picked))
    finally:
        stream.__exit__(None, None, None)


def _open_parquet(path: Path, batch_rows: int, wanted: Any) -> FeatureSource:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        raw = (parquet.schema_arrow.metadata or {}).get(b"geo")
        geo = json.loads(raw) if raw else None
    except (ValueError, OSError) as exc:
        raise InvalidInputError(f"{path}: not a readable GeoParquet file: {exc}") from exc
    if not geo or "primary_column" not in geo:
        raise InvalidInputError(f"{path}: a Parquet file without GeoParquet 'geo' metadata")
    geometry = str(geo["primary_column"])
    column = geo.get("columns", {}).get(geometry, {})
    if str(column.get("encoding", "WKB")).upper() != "WKB":
        raise InvalidInputError(
            f"{path}: GeoParquet geometry encoding {column.get('encoding')!r}; write it as WKB (the default)"
        )
    # The specification: a missing "crs" means OGC:CRS84; an explicit null, an unknown CRS.
    if "crs" not in column:
        crs: pyproj.CRS | None = pyproj.CRS.from_user_input("OGC:CRS84")
    elif column["crs"] is None:
        crs = None
    else:
        crs = pyproj.CRS.from_user_input(column["crs"])
    fields = [name for name in parquet.schema_arrow.names if name != geometry]
    picked = list(wanted(fields)) if wanted is not None else fields
    reader = parquet.iter_batches(batch_size=batch_rows, columns=[*picked, geometry])
    return FeatureSource(crs, fields, _stream(reader, geometry, picked))


def _checked(path: Path, layer: str | None) -> bool:
    """Whether ``path`` is GeoParquet; raises for a missing or unreadable file, and for a layer it
    lacks or must be told (a multi-layer GeoPackage)."""
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        if layer is not None:
            raise InvalidInputError(f"{path}: GeoParquet has no layers; drop --layer")
        return True
    import pyogrio

    try:
        layers = pyogrio.list_layers(path)
    except Exception as exc:  # noqa: BLE001 - GDAL raises several unrelated types for unreadable files
        raise InvalidInputError(f"{path}: not a readable vector file: {exc}") from exc
    names = [str(row[0]) for row in layers]
    if layer is None and len(names) > 1:
        raise InvalidInputError(f"{path} has {len(names)} layers ({', '.join(names)}); choose one with --layer")
    if layer is not None and layer not in names:
        raise InvalidInputError(f"{path}: no layer {layer!r}; layers are {', '.join(names)}")
    return False


def read_frame(path: Path, layer: str | None) -> Any:
    """A small vector file whole, as a GeoDataFrame (an AOI's outline; parcels go through
    :func:`open_features`)."""
    import geopandas as gpd

    if _checked(path, layer):
        try:
            return gpd.read_parquet(path)
        except (ValueError, OSError) as exc:
            raise InvalidInputError(f"{path}: not a readable GeoParquet file: {exc}") from exc
    try:
        return gpd.read_file(path, layer=layer, engine="pyogrio")
    except Exception as exc:  # noqa: BLE001 - GDAL raises several unrelated types for unreadable files
        raise InvalidInputError(f"{path}: cannot read: {exc}") from exc
