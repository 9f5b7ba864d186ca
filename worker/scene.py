"""Reduce one claimed scene to parcel statistics and write them in one short transaction.

The extractors read rasters and reduce them with no transaction of their own open: their few
queries (datasets, parcels) run on whatever cursor the caller gives, and their rows go to a
*sink*. The consumer passes a :class:`RowSpool` on an autocommit connection, so nothing is held
open while rasters are read and reduced (no lock, no snapshot holding back vacuum, nothing for
``idle_in_transaction_session_timeout`` to kill), and writes the spooled rows afterwards in one
short transaction that re-checks its lease. Without a sink the rows are written through the
caller's cursor at once (tools and tests that own their transaction).

The parcel index of a (dataset, grid) pair is built once and reused for every later scene on
that grid: parcels are selected by the *grid's* extent, not the scene footprint, so that every
scene of a tile shares one cache key. Pixels outside the scene's data are nodata and drop out.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, Any
from urllib.parse import urlparse

import numpy as np
import psycopg2.extensions
import rasterio
import rasterio.errors
import shapely
from psycopg2 import sql

from card.geobox import GeoBox
from card.s1 import MissingPolarisationError, S1CardProduct
from card.s2 import MissingBandError, S2Product, open_s2_product
from cbmflow import store
from cbmflow.db import Dataset
from cbmflow.errors import PermanentJobError
from cbmflow.logging import get_logger
from worker import engine, items, pgcopy
from worker.bands import s2_band_groups
from worker.index_cache import IndexCache

log = get_logger("worker")

S2_BANDS_10M = ("B02", "B03", "B04", "B08")
S2_BANDS_20M = ("B05", "B11")
S1_CARD_BANDS: dict[str, dict[str, str]] = {
    "bs": {"VV": "VVb", "VH": "VHb"},
    "c6": {"VV": "VVc", "VH": "VHc"},
    "c12": {"VV": "VVc", "VH": "VHc"},
}
"""Sentinel-1 CARD polarisation → band name in ``sigs_<year>``, per card (the names the JRC API serves)."""


@dataclass(frozen=True)
class ClaimedScene:
    id: int
    product_id: str
    card: str
    location: str
    year: int
    generation: int = 0
    """The scene's generation when claimed: rows are committed only if it is still current."""
    store_profile: str = ""
    """The object store the product is read from (``scenes.store_profile``; ``""``: the default)."""


@dataclass
class SceneResult:
    datasets: int = 0
    parcels: int = 0
    sig_rows: int = 0
    hist_rows: int = 0


RowSink = Callable[[Dataset, list[bytes], list[bytes]], None]
"""Receives one dataset's signature and histogram COPY rows (binary, without header/trailer)."""


class RowSpool:
    """A scene's rows kept until its write transaction: each dataset's COPY stream in a temporary
    file (in memory up to ``memory_bytes``, then on disk), so memory stays bounded however many
    datasets a scene covers, and the write is a plain COPY from the file."""

    def __init__(self, memory_bytes: int = 16 << 20) -> None:
        self.memory_bytes = memory_bytes
        self.items: list[tuple[Dataset, list[str], IO[bytes] | None]] = []

    def __call__(self, ds: Dataset, sig_chunks: list[bytes], hist_chunks: list[bytes]) -> None:
        bands, rows = pgcopy.observation_rows(sig_chunks, hist_chunks)
        f: IO[bytes] | None = None
        if rows:
            f = tempfile.SpooledTemporaryFile(max_size=self.memory_bytes)  # noqa: SIM115 - closed by close()
            f.write(pgcopy.HEADER)
            f.write(rows)
            f.write(pgcopy.TRAILER)
        self.items.append((ds, bands, f))

    def write(self, cur: psycopg2.extensions.cursor, scene_id: int) -> None:
        """Replace the scene's rows of every dataset, inside the caller's transaction."""
        for ds, bands, f in self.items:
            if f is not None:
                f.seek(0)
            copy_scene_rows(cur, ds, scene_id, bands, f)

    def close(self) -> None:
        for _, _, f in self.items:
            if f is not None:
                f.close()
        self.items.clear()


def local_path(location: str) -> Path:
    """The filesystem path of a local location (a path or ``file://`` URL); anything else is refused."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else location)
    raise PermanentJobError(f"product location {location!r} is not a local path or file:// URL")


def open_product(location: str, product_id: str) -> S2Product | items.S2Item:
    """The S2 L2A product at ``location``: a local path, ``file://`` or ``s3://bucket/key`` (read in place),
    or the href of a STAC Item of per-band COGs (earth-search: ``worker/items.py``).

    A product that can never be read (no metadata, bad metadata, an unknown scheme, no such
    bucket, access denied) is a :class:`PermanentJobError`; a store that cannot be reached right
    now (:class:`cbmflow.store.StoreUnavailable`, an ``OSError``) passes through, so the job is
    requeued and retried.
    """
    if items.is_item_location(location):  # a STAC Item of per-band COGs (earth-search)
        return items.open_s2_item(location, product_id)
    try:
        return open_s2_product(store.product_files(location))
    except store.StoreUnavailable:
        raise
    except (FileNotFoundError, ValueError, store.StoreRefused) as exc:
        raise PermanentJobError(f"unreadable product {product_id} at {location}: {exc}") from exc


def _raster_error(path: str | PurePath, exc: Exception, what: str) -> Exception:
    """The error for a raster GDAL could not open or read: permanent, unless it is on S3 and the
    store (not the file) failed, which stays a transient ``OSError`` so the job is retried."""
    if store.is_s3(str(path)):
        failure = store.read_failure(path, exc)
        if isinstance(failure, store.StoreUnavailable):
            return failure
        if failure is not None:
            return PermanentJobError(f"{what} {store.display(path)}: {failure}")
    return PermanentJobError(f"{what} {store.display(path)}: {exc}")


@contextmanager
def _open_raster(path: str | PurePath) -> Iterator[Any]:
    """``rasterio.open`` a local path or an S3 object (``/vsis3/``, inside the store's GDAL env)."""
    with store.gdal_env(path):
        try:
            with rasterio.open(path) as src:
                yield src
        except rasterio.errors.RasterioIOError as exc:
            raise _raster_error(path, exc, "cannot read raster") from exc


def datasets_for_scene(cur: psycopg2.extensions.cursor, scene_id: int) -> list[Dataset]:
    cur.execute(
        "SELECT d.id, d.aoi, d.year, d.schema_name, d.parcel_table, d.sigs_table, d.hists_table, d.srid,"
        "       d.buffer_m, d.min_pixels, d.parcels_version, d.s2_bands, d.created_at"
        "  FROM datasets d JOIN aois a ON a.name = d.aoi JOIN scenes s ON s.id = %s"
        " WHERE ST_Intersects(a.geom, s.footprint)"
        "   AND d.year = extract(year FROM s.acquired_at AT TIME ZONE 'UTC')::int"
        " ORDER BY d.id",
        (scene_id,),
    )
    return [Dataset(*row) for row in cur.fetchall()]


def grid_of(src: Any) -> GeoBox:
    return GeoBox.from_dataset(src)


def parcels_on_grid(
    cur: psycopg2.extensions.cursor, ds: Dataset, grid: GeoBox, epsg: int
) -> tuple[np.ndarray[Any, Any], list[Any]]:
    """Parcels intersecting the grid extent, transformed to the raster CRS in PostGIS."""
    left, top = grid.transform @ (0, 0)
    right, bottom = grid.transform @ (grid.width, grid.height)
    cur.execute(
        sql.SQL(
            "SELECT pid, ST_AsBinary(ST_Transform(geom, %(epsg)s)) FROM {parcels}"
            " WHERE geom && ST_Transform(ST_MakeEnvelope(%(xmin)s, %(ymin)s, %(xmax)s, %(ymax)s, %(epsg)s), %(srid)s)"
            " ORDER BY pid"
        ).format(parcels=ds.parcels),
        {
            "epsg": epsg,
            "xmin": min(left, right),
            "xmax": max(left, right),
            "ymin": min(top, bottom),
            "ymax": max(top, bottom),
            "srid": ds.srid,
        },
    )
    rows = cur.fetchall()
    pids = np.array([r[0] for r in rows], dtype=np.int64)
    geoms = list(shapely.from_wkb([bytes(r[1]) for r in rows])) if rows else []
    return pids, geoms


def parcel_index(
    cur: psycopg2.extensions.cursor, cache: IndexCache, ds: Dataset, grid: GeoBox, epsg: int
) -> engine.ParcelIndex:
    """The dataset's parcel index on ``grid``, from the cache or built (and cached) from PostGIS."""
    # created_at tells apart two deployments' dataset 1 at parcel version 1 in a shared cache.
    created = ds.created_at.isoformat() if ds.created_at else ""
    key = (ds.id, created, ds.parcels_version, ds.buffer_m, epsg, tuple(grid.transform)[:6], grid.width, grid.height)
    index = cache.get(key)
    if index is None:
        pids, geoms = parcels_on_grid(cur, ds, grid, epsg)
        index = engine.build_index(geoms, pids, grid, buffer_m=ds.buffer_m)
        cache.put(key, index)
    return index


def _add_sig_rows(
    chunks: list[bytes], parcels: set[int], stats: engine.BandStats, ds: Dataset, scene_id: int, band: str
) -> int:
    """Append one band's COPY rows of the parcels with at least ``min_pixels`` valid pixels; how many."""
    keep = stats.count >= ds.min_pixels
    if not keep.any():
        return 0
    parcels.update(stats.pid[keep].tolist())
    chunks.append(
        pgcopy.sig_rows(
            stats.pid[keep],
            scene_id,
            band,
            stats.count[keep],
            {name: getattr(stats, name)[keep] for name in pgcopy.STAT_FIELDS},
        )
    )
    return int(keep.sum())


def _writer(cur: psycopg2.extensions.cursor, scene_id: int, sink: RowSink | None) -> RowSink:
    if sink is not None:
        return sink
    return lambda ds, sigs, hists: write_scene_rows(cur, ds, scene_id, sigs, hists)


def extract_s2(
    cur: psycopg2.extensions.cursor, scene: ClaimedScene, cache: IndexCache, sink: RowSink | None = None
) -> SceneResult:
    """Compute every dataset's statistics for one S2 L2A product and hand them to ``sink``.

    Without a sink they are written through ``cur`` (the old rows of this scene deleted, the new
    ones COPY'd in), inside the caller's transaction, so a re-run replaces and a crash leaves the
    previous state untouched.
    """
    emit = _writer(cur, scene.id, sink)
    product = open_product(scene.location, scene.product_id)
    result = SceneResult()
    for ds in datasets_for_scene(cur, scene.id):
        result.datasets += 1
        sig_chunks: list[bytes] = []
        hist_chunks: list[bytes] = []
        n_parcels: set[int] = set()
        for bands, with_scl in s2_band_groups(ds.s2_bands):  # the dataset's band set, per native grid
            try:
                paths = {b: product.band_path(b) for b in (*bands, *(("SCL",) if with_scl else ()))}
            except MissingBandError as exc:
                raise PermanentJobError(str(exc)) from exc
            with _open_raster(paths[bands[0]]) as src:
                grid = grid_of(src)
            index = parcel_index(cur, cache, ds, grid, product.epsg)
            if len(index.pids) == 0:
                continue
            plan = engine.plan_strips(index)
            for band, path in paths.items():
                with _open_raster(path) as src:
                    if (src.width, src.height) != (grid.width, grid.height) or src.transform != grid.transform:
                        raise PermanentJobError(
                            f"{os.path.basename(path)}: grid differs from {os.path.basename(paths[bands[0]])}"
                        )
                    read = store.in_read_env(path, engine.window_reader(src, index))  # S3: in the prefetch thread too
                    try:
                        if band == "SCL":
                            hist = engine.class_histograms_strips(plan, read, nodata=0)
                        else:
                            stats = engine.band_stats_strips(
                                plan, read, nodata=0, offset=float(product.reflectance_offset(band))
                            )
                    except rasterio.errors.RasterioIOError as exc:
                        raise _raster_error(path, exc, "corrupt raster") from exc
                if band == "SCL":
                    if len(hist.pid):
                        hist_chunks.append(pgcopy.hist_rows(hist.pid, scene.id, hist.cls, hist.count))
                        result.hist_rows += len(hist.pid)
                    continue
                result.sig_rows += _add_sig_rows(sig_chunks, n_parcels, stats, ds, scene.id, band)
        emit(ds, sig_chunks, hist_chunks)
        result.parcels += len(n_parcels)
    return result


def card_location(location: str) -> str:
    """Where a CARD product is read: a local path, ``/vsis3/...`` for a COG on S3, or the
    ``s3://`` URL itself for a BEAM-DIMAP product (its files are listed through the store)."""
    if store.is_s3(location):
        if location.lower().endswith((".tif", ".tiff")):
            return store.gdal_path(location)
        if location.lower().rstrip("/").endswith(store.DIMAP_SUFFIXES):
            return location
        raise PermanentJobError(
            f"{location}: on S3 a CARD product is one GeoTIFF/COG (.tif) or a BEAM-DIMAP product (.dim or .data)"
        )
    return str(local_path(location))


def extract_card(
    cur: psycopg2.extensions.cursor, scene: ClaimedScene, cache: IndexCache, sink: RowSink | None = None
) -> SceneResult:
    """Compute and write every dataset's statistics for one Sentinel-1 CARD scene (``bs``, ``c6``).

    The same machinery as :func:`extract_s2`: one parcel index per grid from the cache, strips
    read once, float statistics with NaN (and any finite no-data the product declares) excluded,
    binary COPY to ``sink`` (or in the caller's transaction). Band names: ``VVb``/``VHb`` (bs), ``VVc``/``VHc``
    (c6). No SCL, hence no histograms.
    """
    emit = _writer(cur, scene.id, sink)
    names = S1_CARD_BANDS.get(scene.card)
    if names is None:
        raise PermanentJobError(f"card {scene.card!r} is not a Sentinel-1 CARD")
    location = scene.location if items.is_item_location(scene.location) else card_location(scene.location)
    try:
        with store.gdal_env(location):
            product: S1CardProduct = items.open_card_product(location, tuple(names))
    except (FileNotFoundError, ValueError) as exc:  # MissingPolarisationError is a FileNotFoundError
        if location.startswith(store.VSIS3) and not isinstance(exc, MissingPolarisationError):
            # GDAL says "does not exist" for an unreachable endpoint too: one HEAD tells which.
            raise _raster_error(location, exc, f"unreadable product {scene.product_id} at") from exc
        raise PermanentJobError(f"unreadable product {scene.product_id}: {exc}") from exc
    except store.StoreRefused as exc:  # a BEAM-DIMAP's listing or .dim denied (StoreUnavailable is retried)
        raise PermanentJobError(f"unreadable product {scene.product_id}: {exc}") from exc
    if product.epsg is None:
        raise PermanentJobError(f"unreadable product {scene.product_id}: CRS {product.crs!r} has no EPSG code")
    result = SceneResult()
    for ds in datasets_for_scene(cur, scene.id):
        result.datasets += 1
        sig_chunks: list[bytes] = []
        n_parcels: set[int] = set()
        for pol, band in names.items():
            source = product.band(pol)
            with _open_raster(source.path) as src:
                grid = grid_of(src)
                index = parcel_index(cur, cache, ds, grid, product.epsg)
                if len(index.pids) == 0:
                    continue
                plan = engine.plan_strips(index)
                read = store.in_read_env(source.path, engine.window_reader(src, index, band=source.band))
                try:
                    stats = engine.band_stats_strips(plan, read, nodata=source.nodata)
                except rasterio.errors.RasterioIOError as exc:
                    raise _raster_error(source.path, exc, "corrupt raster") from exc
            result.sig_rows += _add_sig_rows(sig_chunks, n_parcels, stats, ds, scene.id, band)
        emit(ds, sig_chunks, [])
        result.parcels += len(n_parcels)
    return result


def write_scene_rows(
    cur: psycopg2.extensions.cursor, ds: Dataset, scene_id: int, sig_chunks: list[bytes], hist_chunks: list[bytes]
) -> None:
    """Replace the scene's rows of one dataset by binary COPY (idempotent re-extraction)."""
    bands, rows = pgcopy.observation_rows(sig_chunks, hist_chunks)
    copy_scene_rows(cur, ds, scene_id, bands, pgcopy.stream([rows]) if rows else None)


def copy_scene_rows(
    cur: psycopg2.extensions.cursor, ds: Dataset, scene_id: int, bands: list[str], rows: IO[bytes] | None
) -> None:
    """Delete the scene's rows of one dataset and COPY the given binary stream in their place.

    One row per parcel in ``<sigs>_obs`` and the scene's band order in ``<sigs>_bands``
    (sql/011_compact_signatures.sql; ``<sigs>`` and ``<hists>`` are views over them).
    """
    obs, band_table = ds.ident(f"{ds.sigs_table}_obs"), ds.ident(f"{ds.sigs_table}_bands")
    cur.execute(sql.SQL("DELETE FROM {} WHERE scene_id = %s").format(obs), (scene_id,))
    cur.execute(sql.SQL("DELETE FROM {} WHERE scene_id = %s").format(band_table), (scene_id,))
    if rows is None:
        return
    cur.execute(sql.SQL("INSERT INTO {} (scene_id, bands) VALUES (%s, %s)").format(band_table), (scene_id, bands))
    cur.copy_expert(
        sql.SQL("COPY {} (scene_id, pid, stats, scl) FROM STDIN WITH (FORMAT binary)").format(obs).as_string(cur), rows
    )
