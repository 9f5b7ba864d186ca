"""Parcel and AOI import: the only way parcels get into a dataset.

Parcel files come from national LPIS/GSA exports of uneven quality, so one bad feature must never
block a whole import: each feature is checked on its own and either loaded or rejected with a
reason the data provider can act on. Integer ``pid`` s are what signatures and histograms are keyed
on, so they must survive re-imports: a ``parcel_id`` seen before keeps its ``pid`` forever, and only
new ids get new ones. The worker caches its pixel index per ``parcels_version``, which is bumped
whenever an import changed anything, so a stale index is never used.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2.extensions
import pyproj
import shapely
from psycopg2 import sql
from shapely.geometry import MultiPolygon, box

from cbmflow import db
from cbmflow.errors import InvalidInputError
from cbmflow.logging import get_logger
from cbmflow.parcels.reader import FeatureBatch, open_features, read_frame
from cbmflow.vocab import AOI_NAME_PATTERN

log = get_logger("parcels")

AOI_NAME_RE = re.compile(AOI_NAME_PATTERN)
# The AOI name becomes the dataset's schema; these would collide with PostgreSQL's or PostGIS's own.
RESERVED_AOI_NAMES = frozenset({"public", "information_schema", "topology", "tiger", "tiger_data"})
ID_COLUMN_CANDIDATES = ("parcel_id", "pid", "id")
DEFAULT_CROP_CODE_COLUMN = "crop_code"
DEFAULT_CROP_NAME_COLUMN = "crop_name"
# Margin around the parcels' envelope when an AOI is derived from them: parcels on the edge still
# fall well inside it after the AOI is used to select scenes, whose footprints are coarse.
AOI_MARGIN_DEG = 0.01
# Rows per COPY: bounds the in-memory CSV buffer (about 1 KiB per parcel) for national-size files.
COPY_BATCH_ROWS = 50_000
_POLYGON_TYPE_ID = 3
_MULTIPOLYGON_TYPE_ID = 6
_STAGE_TABLE = "cbmflow_parcel_stage"

Rejection = tuple[int, str | None, str]


@dataclass
class ImportReport:
    """Outcome of one import; ``rejected`` holds (0-based feature index, parcel id or None, reason)."""

    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    srid: int = 0
    parcels_version: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase (read+check+stage, upsert, index when rebuilt): where a national
    import's time goes."""

    @property
    def accepted(self) -> int:
        return self.imported + self.updated + self.unchanged


def aoi_name(name: str) -> str:
    """The canonical (lowercase) AOI name; it becomes a schema name, hence the strict pattern."""
    canonical = name.strip().lower()
    if not AOI_NAME_RE.match(canonical):
        raise InvalidInputError(
            f"dataset/AOI name {name!r} must match {AOI_NAME_RE.pattern} (a letter, then letters, digits or _)"
        )
    if canonical in RESERVED_AOI_NAMES or canonical.startswith("pg_"):
        raise InvalidInputError(f"dataset/AOI name {name!r} is reserved by PostgreSQL/PostGIS; choose another")
    return canonical


class _PhaseClock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now


def _column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str | None:
    """Match column names case-insensitively: shapefile and GPKG exports differ only in case."""
    by_lower = {str(c).lower(): str(c) for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise InvalidInputError(f"no {what} column {wanted!r}; columns are {', '.join(sorted(by_lower.values()))}")
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    return None


def _text(value: Any) -> str | None:
    """A cell as text, with integral floats (shapefile ids read back as 123.0) kept integral."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def _crs_epsg(crs: pyproj.CRS, path: Path) -> int:
    epsg = crs.to_epsg()
    if epsg is None:
        raise InvalidInputError(f"{path}: CRS {crs.name!r} has no EPSG code; reproject to an EPSG CRS first")
    return int(epsg)


def _geometry_rejections(geoms: np.ndarray[Any, Any]) -> list[str | None]:
    """Per-feature reason, or None for an acceptable polygon; vectorised for national-size files."""
    missing = shapely.is_missing(geoms)
    empty = shapely.is_empty(geoms)
    types = shapely.get_type_id(geoms)
    reasons = shapely.is_valid_reason(geoms)
    out: list[str | None] = []
    for i, geom in enumerate(geoms):
        if missing[i]:
            out.append("null geometry")
        elif empty[i]:
            out.append("empty geometry")
        elif types[i] not in (_POLYGON_TYPE_ID, _MULTIPOLYGON_TYPE_ID):
            out.append(f"geometry type {geom.geom_type} is not polygonal")
        elif reasons[i] != "Valid Geometry":
            out.append(f"invalid geometry: {reasons[i]}")
        else:
            out.append(None)
    return out


def _csv_field(value: str | None) -> str:
    """COPY CSV: an unquoted empty field is NULL, a quoted one is text, so NULL and '' stay distinct."""
    if value is None:
        return ""
    return '"' + value.replace('"', '""') + '"'


def _aoi_exists(cur: psycopg2.extensions.cursor, name: str) -> bool:
    cur.execute("SELECT 1 FROM aois WHERE name = %s", (name,))
    return cur.fetchone() is not None


def _upsert_aoi_geom(cur: psycopg2.extensions.cursor, name: str, geom_4326: MultiPolygon) -> None:
    cur.execute(
        "INSERT INTO aois (name, geom) VALUES (%s, ST_SetSRID(ST_GeomFromWKB(%s), 4326))"
        " ON CONFLICT (name) DO UPDATE SET geom = EXCLUDED.geom",
        (name, psycopg2.Binary(shapely.to_wkb(geom_4326))),
    )


def _aoi_from_extent(bounds: Sequence[float], crs: pyproj.CRS) -> MultiPolygon:
    to_wgs84 = pyproj.Transformer.from_crs(crs, 4326, always_xy=True)
    west, south, east, north = to_wgs84.transform_bounds(bounds[0], bounds[1], bounds[2], bounds[3], densify_pts=21)
    envelope = box(
        max(west - AOI_MARGIN_DEG, -180.0),
        max(south - AOI_MARGIN_DEG, -90.0),
        min(east + AOI_MARGIN_DEG, 180.0),
        min(north + AOI_MARGIN_DEG, 90.0),
    )
    return MultiPolygon([envelope])


def import_parcels(
    cur: psycopg2.extensions.cursor,
    path: Path,
    aoi: str,
    year: int,
    *,
    id_column: str | None = None,
    crop_code_column: str | None = None,
    crop_name_column: str | None = None,
    layer: str | None = None,
    srid: int | None = None,
) -> ImportReport:
    """Load a parcel file into the (aoi, year) dataset inside the caller's transaction.

    ``srid`` only matters when the dataset is new: it is the CRS the dataset is created in (default:
    the file's, which must then be projected, because extraction works in metres on the UTM grid and
    a geographic dataset CRS would make every area and buffer meaningless). Later imports are
    reprojected to the dataset's CRS.

    The file is read ``COPY_BATCH_ROWS`` features at a time: each batch is checked, reprojected and
    copied into a staging table before the next is read, so memory stays flat for any country; the
    duplicate ids, which need every feature, are found in the staging table.
    """
    path = Path(path)
    aoi = aoi_name(aoi)
    if not 1990 <= year <= 2100:
        raise InvalidInputError(f"year {year} outside 1990..2100")
    clock = _PhaseClock()
    chosen: dict[str, str | None] = {}

    def pick(columns: list[str]) -> list[str]:
        chosen["id"] = _column(columns, id_column, ID_COLUMN_CANDIDATES, "parcel id")
        if chosen["id"] is None:
            raise InvalidInputError(
                f"{path}: no parcel id column (looked for {', '.join(ID_COLUMN_CANDIDATES)}); give --id-column"
            )
        chosen["code"] = _column(columns, crop_code_column, (DEFAULT_CROP_CODE_COLUMN,), "crop code")
        chosen["name"] = _column(columns, crop_name_column, (DEFAULT_CROP_NAME_COLUMN,), "crop name")
        return list(dict.fromkeys(c for c in chosen.values() if c is not None))

    with open_features(path, layer, COPY_BATCH_ROWS, pick) as source:
        if source.crs is None:
            raise InvalidInputError(f"{path}: no CRS; set one (e.g. ogr2ogr -a_srs) before importing")
        file_crs = source.crs
        dataset = db.get_dataset(cur, aoi, year)
        if dataset is not None:
            target_srid = dataset.srid
            if srid is not None and srid != dataset.srid:
                raise InvalidInputError(f"dataset {aoi}/{year} exists in EPSG:{dataset.srid}; --srid {srid} conflicts")
        elif srid is not None:
            target_srid = srid
        else:
            if file_crs.is_geographic:
                raise InvalidInputError(
                    f"{path} is in the geographic CRS {file_crs.name!r}; a new dataset needs a projected CRS "
                    "(give --srid, e.g. 3035 or the national grid, or reproject the file)"
                )
            target_srid = _crs_epsg(file_crs, path)
        target_crs = pyproj.CRS.from_epsg(target_srid)
        if target_crs.is_geographic:
            raise InvalidInputError(f"EPSG:{target_srid} is geographic; a dataset needs a projected CRS")
        reproject = None
        if not file_crs.equals(target_crs, ignore_axis_order=True):
            reproject = pyproj.Transformer.from_crs(file_crs, target_crs, always_xy=True)

        report = ImportReport(srid=target_srid, timings_s=clock.laps)
        cur.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(_STAGE_TABLE)))
        cur.execute(
            sql.SQL(
                "CREATE TEMP TABLE {} (ord integer NOT NULL, parcel_id text NOT NULL, crop_code text,"
                " crop_name text, wkb text) ON COMMIT DROP"
            ).format(sql.Identifier(_STAGE_TABLE))
        )
        copy = sql.SQL("COPY {} (ord, parcel_id, crop_code, crop_name, wkb) FROM STDIN WITH (FORMAT csv)").format(
            sql.Identifier(_STAGE_TABLE)
        )
        rejected: dict[int, Rejection] = {}
        bounds = np.array([np.inf, np.inf, -np.inf, -np.inf])
        for batch in source.batches:
            staged, batch_bounds = _check_batch(batch, chosen, reproject, target_srid, rejected)
            bounds = np.concatenate(
                [np.minimum(bounds[:2], batch_bounds[:2]), np.maximum(bounds[2:], batch_bounds[2:])]
            )
            cur.copy_expert(copy.as_string(cur), staged)
    clock.lap("read+check+stage")

    # Every copy of a duplicated id is rejected: which row the provider meant cannot be guessed,
    # and silently keeping one would attach signatures to possibly the wrong geometry.
    cur.execute(
        sql.SQL("SELECT parcel_id, array_agg(ord ORDER BY ord) FROM {} GROUP BY parcel_id HAVING count(*) > 1").format(
            sql.Identifier(_STAGE_TABLE)
        )
    )
    duplicates = cur.fetchall()
    for pid_text, where in duplicates:
        reason = f"duplicate parcel id {pid_text!r} (features {', '.join(map(str, where))})"
        for i in where:
            rejected[int(i)] = (int(i), pid_text, reason)
    if duplicates:
        cur.execute(
            sql.SQL("UPDATE {s} SET wkb = NULL WHERE parcel_id = ANY(%s)").format(s=sql.Identifier(_STAGE_TABLE)),
            ([d[0] for d in duplicates],),
        )
    report.rejected = [rejected[i] for i in sorted(rejected)]
    cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE wkb IS NOT NULL").format(sql.Identifier(_STAGE_TABLE)))
    count_row = cur.fetchone()
    accepted = int(count_row[0]) if count_row else 0
    if not accepted:
        cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(_STAGE_TABLE)))
        log.warning("parcels.nothing_accepted", path=str(path), aoi=aoi, year=year, rejected=len(report.rejected))
        return report

    if not _aoi_exists(cur, aoi):
        _upsert_aoi_geom(cur, aoi, _aoi_from_extent(bounds.tolist(), target_crs))
        log.info("aoi.created_from_parcels", aoi=aoi, bounds=[round(float(b), 3) for b in bounds])
    dataset = db.ensure_dataset(cur, aoi, year, target_srid)
    # Serialises imports into one dataset: new pids are max(pid)+1.. and must not be handed out twice.
    cur.execute("SELECT parcels_version FROM datasets WHERE id = %s FOR UPDATE", (dataset.id,))
    # Into an empty table (a country's first import, 770k parcels) a GiST index built once after the
    # rows, by PostGIS's sorted build, costs a fraction of maintaining it row by row. Dropping it
    # locks the table until commit, which nobody can mind while it holds no parcels.
    cur.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {t})").format(t=dataset.parcels))
    empty_row = cur.fetchone()
    rebuild_gist = bool(empty_row and empty_row[0])
    gist = sql.Identifier(f"{dataset.parcel_table}_geom_gix")
    if rebuild_gist:
        cur.execute(sql.SQL("DROP INDEX IF EXISTS {s}.{ix}").format(s=sql.Identifier(dataset.schema_name), ix=gist))
    # New ids are numbered in file order after the current max; known ids carry their pid into the
    # candidate row, so the parcel_id conflict always resolves to the same row as the pid key.
    # A geometry counts as changed only if it covers a different area (ST_Equals): the same parcel
    # exported through a Shapefile comes back with its rings re-oriented, which must not bump
    # parcels_version and throw away every worker's pixel index.
    cur.execute(
        sql.SQL(
            "INSERT INTO {t} AS t (pid, parcel_id, crop_code, crop_name, geom)"
            " SELECT COALESCE(e.pid, base.max_pid + row_number() OVER (PARTITION BY e.pid IS NULL ORDER BY s.ord)),"
            "        s.parcel_id, s.crop_code, s.crop_name,"
            "        ST_Multi(ST_Force2D(ST_GeomFromWKB(decode(s.wkb, 'hex'), {srid})))"
            " FROM {stage} s LEFT JOIN {t} e ON e.parcel_id = s.parcel_id"
            " CROSS JOIN (SELECT COALESCE(max(pid), 0) AS max_pid FROM {t}) base"
            " WHERE s.wkb IS NOT NULL"
            " ON CONFLICT (parcel_id) DO UPDATE"
            " SET crop_code = EXCLUDED.crop_code, crop_name = EXCLUDED.crop_name, geom = EXCLUDED.geom"
            " WHERE (t.crop_code, t.crop_name) IS DISTINCT FROM (EXCLUDED.crop_code, EXCLUDED.crop_name)"
            "    OR (ST_AsBinary(t.geom) <> ST_AsBinary(EXCLUDED.geom) AND NOT ST_Equals(t.geom, EXCLUDED.geom))"
            " RETURNING (xmax = 0)"
        ).format(t=dataset.parcels, stage=sql.Identifier(_STAGE_TABLE), srid=sql.Literal(int(target_srid)))
    )
    inserted_flags = [bool(row[0]) for row in cur.fetchall()]
    cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(_STAGE_TABLE)))
    clock.lap("upsert")
    if rebuild_gist:
        cur.execute(sql.SQL("CREATE INDEX {ix} ON {t} USING gist (geom)").format(ix=gist, t=dataset.parcels))
        clock.lap("index")
    report.imported = sum(inserted_flags)
    report.updated = len(inserted_flags) - report.imported
    report.unchanged = accepted - len(inserted_flags)
    if inserted_flags:
        cur.execute(
            "UPDATE datasets SET parcels_version = parcels_version + 1 WHERE id = %s RETURNING parcels_version",
            (dataset.id,),
        )
    else:
        cur.execute("SELECT parcels_version FROM datasets WHERE id = %s", (dataset.id,))
    version_row = cur.fetchone()
    assert version_row is not None
    report.parcels_version = int(version_row[0])
    log.info(
        "parcels.imported",
        path=str(path),
        aoi=aoi,
        year=year,
        srid=target_srid,
        imported=report.imported,
        updated=report.updated,
        unchanged=report.unchanged,
        rejected=len(report.rejected),
        parcels_version=report.parcels_version,
        timings_s={k: round(v, 2) for k, v in report.timings_s.items()},
    )
    return report


def _check_batch(
    batch: FeatureBatch,
    chosen: dict[str, str | None],
    reproject: pyproj.Transformer | None,
    target_srid: int,
    rejected: dict[int, Rejection],
) -> tuple[io.StringIO, np.ndarray[Any, Any]]:
    """One batch's rows for the staging table as COPY CSV, and the bounds of its accepted parcels.

    Rejected features with an id are staged too, without a geometry, so that an id they share with
    another feature still rejects both; ``rejected`` gets each rejection by its file index."""
    n = len(batch.geoms)
    ids = [_text(v) for v in batch.columns[chosen["id"] or ""]]
    codes = [_text(v) for v in batch.columns[chosen["code"]]] if chosen["code"] else [None] * n
    names = [_text(v) for v in batch.columns[chosen["name"]]] if chosen["name"] else [None] * n
    reasons = _geometry_rejections(batch.geoms)
    for k in np.flatnonzero(batch.unreadable).tolist():
        reasons[k] = "unreadable geometry (not WKB)"
    for k, pid_text in enumerate(ids):
        if pid_text is None:
            reasons[k] = reasons[k] or "missing parcel id"
    keep: list[int] = [k for k, r in enumerate(reasons) if r is None]
    geoms = shapely.force_2d(batch.geoms[keep]) if keep else np.empty(0, dtype=object)
    if reproject is not None and keep:
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(reproject.transform(xy[:, 0], xy[:, 1])))
        # Reprojection can fold a sliver onto itself; what is stored must be valid, not the input.
        after = shapely.is_valid_reason(geoms)
        for j, k in enumerate(keep):
            if after[j] != "Valid Geometry":
                reasons[k] = f"invalid after reprojection to EPSG:{target_srid}: {after[j]}"
    stored = [j for j, k in enumerate(keep) if reasons[k] is None]
    wkb_of: dict[int, str] = {}
    if stored:
        hexes = shapely.to_wkb(geoms[stored], hex=True)
        wkb_of = {keep[j]: str(h) for j, h in zip(stored, hexes, strict=True)}
    buf = io.StringIO()
    for k in range(n):
        ordinal = batch.offset + k
        reason = reasons[k]
        if reason is not None:
            rejected[ordinal] = (ordinal, ids[k], reason)
        if ids[k] is not None:
            wkb = wkb_of.get(k, "")
            buf.write(f"{ordinal},{_csv_field(ids[k])},{_csv_field(codes[k])},{_csv_field(names[k])},{wkb}\n")
    buf.seek(0)
    empty = np.array([np.inf, np.inf, -np.inf, -np.inf])
    bounds = shapely.total_bounds(geoms[stored]) if stored else empty
    return buf, np.asarray(bounds, dtype=np.float64)


def add_aoi(cur: psycopg2.extensions.cursor, name: str, path: Path, *, layer: str | None = None) -> tuple[float, ...]:
    """Create or replace an AOI from a polygon file; returns its (west, south, east, north) in degrees.

    An AOI only selects scenes and datasets, so a slightly invalid hand-drawn outline is repaired
    with ``make_valid`` (and logged) rather than rejected.
    """
    name = aoi_name(name)
    frame = read_frame(Path(path), layer)
    if frame.crs is None:
        raise InvalidInputError(f"{path}: no CRS; set one before using it as an AOI")
    geoms = np.asarray(frame.to_crs(4326).geometry.array, dtype=object)
    geoms = geoms[~(shapely.is_missing(geoms) | shapely.is_empty(geoms))]
    if len(geoms) == 0:
        raise InvalidInputError(f"{path}: no geometry")
    types = shapely.get_type_id(geoms)
    if not np.isin(types, (_POLYGON_TYPE_ID, _MULTIPOLYGON_TYPE_ID)).all():
        raise InvalidInputError(f"{path}: an AOI must be made of polygons only")
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        log.warning("aoi.repaired", aoi=name, invalid_features=int(invalid.sum()))
        geoms = shapely.make_valid(geoms)
    # Twice: make_valid may nest a MultiPolygon inside a GeometryCollection next to stray lines,
    # which are dropped because only areas make an AOI.
    parts = shapely.get_parts(shapely.get_parts(shapely.force_2d(geoms)))
    polygons = parts[shapely.get_type_id(parts) == _POLYGON_TYPE_ID]
    if len(polygons) == 0:
        raise InvalidInputError(f"{path}: no area left after repairing the geometry")
    union = shapely.union_all(polygons)
    merged = MultiPolygon([g for g in shapely.get_parts(union) if g.geom_type == "Polygon"])
    _upsert_aoi_geom(cur, name, merged)
    bounds = tuple(float(b) for b in merged.bounds)
    log.info("aoi.added", aoi=name, path=str(path), bounds=[round(b, 5) for b in bounds])
    return bounds
