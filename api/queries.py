"""The SQL behind the JRC-compatible routes, returning JRC's column → list shape.

Every value is a bound parameter. Table identifiers come only from the ``datasets`` row
(``Dataset.parcels/.sigs/.hists``, composed by psycopg2.sql); the one exception, a ``ptype``
variant table, is a validated suffix of the dataset's own parcel table that must exist in the
catalogue before it is composed. Areas and distances are computed in EPSG:3035 whatever the
national SRID, as JRC did, so values are comparable across Member States.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from psycopg2 import sql

from api.auth import USER_ROW_SQL
from api.observations import one_per_acquisition
from api.params import PTYPE_RE
from cbmflow.db import Cursor, Dataset
from cbmflow.errors import NotFoundError

Columns = dict[str, list[Any]]

# The card of each JRC tstype (tstype 'scl' is served from the histogram table instead).
CARDS = {"s2": "s2", "bs": "bs", "c6": "c6"}
TSTYPES = (*CARDS, "scl")
EQUAL_AREA_SRID = 3035
# parcelsByPolygon: the search area is clipped to the AOI's envelope grown by this margin (parcels
# may stick out of a hand-drawn AOI) and densified to this segment length before reprojection.
AREA_MARGIN_DEG = 1.0
AREA_STEP_DEG = 0.05


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; a statistic without a value is null. numeric → float for json.dumps.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return _jsonable(float(value))
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def fetch_columns(cur: Cursor) -> Columns:
    """Column → list mapping of the last query; zero rows still give every key (with [])."""
    names = [d.name for d in cur.description]
    out: Columns = {name: [] for name in names}
    for row in cur.fetchall():
        for name, value in zip(names, row, strict=True):
            out[name].append(_jsonable(value))
    return out


def parcel_table(cur: Cursor, ds: Dataset, ptype: str | None) -> sql.Composed:
    """The dataset's parcel table, or its ``_<ptype>`` variant (JRC: grazing, mowing, ...) if it exists."""
    if not ptype:
        return ds.parcels
    name = f"{ds.parcel_table}_{ptype}"
    cur.execute(
        "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = %s AND tablename = %s",
        (ds.schema_name, name),
    )
    if cur.fetchone() is None:
        raise NotFoundError(f"dataset {ds.aoi} {ds.year} has no parcel type {ptype!r}")
    return ds.ident(name)


def _parcel_columns(with_geometry: bool, wgs84: bool, *, only_ids: bool = False) -> sql.Composable:
    parts: list[sql.Composable] = [sql.SQL("p.parcel_id AS pid")]
    if not only_ids:
        parts.append(sql.SQL("p.crop_name AS cropname, p.crop_code::text AS cropcode, ST_SRID(p.geom) AS srid"))
    if with_geometry:
        # Native: GeoJSON with a "crs" member (PostGIS default for non-4326); wgs84: plain RFC 7946.
        parts.append(
            sql.SQL("ST_AsGeoJSON(ST_Transform(p.geom, 4326)) AS geom")
            if wgs84
            else sql.SQL("ST_AsGeoJSON(p.geom) AS geom")
        )
    if not only_ids:
        parts.append(
            sql.SQL(
                "ST_Area(ST_Transform(p.geom, {eq}))::bigint AS area,"
                " ST_X(ST_Transform(ST_Centroid(p.geom), 4326)) AS clon,"
                " ST_Y(ST_Transform(ST_Centroid(p.geom), 4326)) AS clat"
            ).format(eq=sql.Literal(EQUAL_AREA_SRID))
        )
    return sql.SQL(", ").join(parts)


def parcel_by_id(cur: Cursor, table: sql.Composed, pid: str, *, with_geometry: bool, wgs84: bool) -> Columns:
    cur.execute(
        sql.SQL("SELECT {cols} FROM {t} p WHERE p.parcel_id = %s").format(
            cols=_parcel_columns(with_geometry, wgs84), t=table
        ),
        (pid,),
    )
    out = fetch_columns(cur)
    if not out["pid"]:
        raise NotFoundError("no such parcel")
    return out


def parcels_by_location(
    cur: Cursor,
    ds: Dataset,
    table: sql.Composed,
    lon: float,
    lat: float,
    *,
    with_geometry: bool,
    wgs84: bool,
    limit: int,
) -> Columns:
    cur.execute(
        sql.SQL(
            "SELECT {cols} FROM {t} p"
            " WHERE ST_Intersects(p.geom, ST_Transform(ST_SetSRID(ST_MakePoint(%s, %s), 4326), %s))"
            " ORDER BY p.pid LIMIT %s"
        ).format(cols=_parcel_columns(with_geometry, wgs84), t=table),
        (lon, lat, ds.srid, limit),
    )
    return fetch_columns(cur)


def parcels_by_polygon(
    cur: Cursor,
    ds: Dataset,
    table: sql.Composed,
    wkb: bytes,
    *,
    only_ids: bool,
    with_geometry: bool,
    wgs84: bool,
    limit: int,
) -> Columns:
    """Parcels intersecting a lon/lat area.

    JRC reprojected the raw polygon, so a large one (a few vertices spanning tens of degrees)
    became a different shape in the national CRS, or a degenerate one far from the projection's
    centre, and silently matched the wrong parcels. Here the area is first clipped to the
    dataset's AOI envelope plus a margin, then densified in degrees, so what is tested is the
    polygon the caller drew in EPSG:4326.
    """
    cur.execute(
        sql.SQL(
            "WITH q AS (SELECT ST_Transform(ST_Segmentize(ST_Intersection(ST_GeomFromWKB(%(wkb)s, 4326),"
            " ST_Expand(ST_Envelope(a.geom), %(margin)s)), %(step)s), %(srid)s) AS g"
            " FROM aois a WHERE a.name = %(aoi)s)"
            " SELECT {cols} FROM {t} p, q WHERE ST_Intersects(p.geom, q.g) ORDER BY p.pid LIMIT %(limit)s"
        ).format(cols=_parcel_columns(with_geometry, wgs84, only_ids=only_ids), t=table),
        {
            "wkb": wkb,
            "margin": AREA_MARGIN_DEG,
            "step": AREA_STEP_DEG,
            "srid": ds.srid,
            "aoi": ds.aoi,
            "limit": limit,
        },
    )
    return fetch_columns(cur)


def parcel_pk(cur: Cursor, table: sql.Composed, pid: str) -> int:
    """The integer key shared by parcels, sigs and hists, for the user-facing parcel id."""
    cur.execute(sql.SQL("SELECT pid FROM {t} WHERE parcel_id = %s").format(t=table), (pid,))
    row = cur.fetchone()
    if row is None:
        raise NotFoundError("no such parcel")
    return int(row[0])


def parcel_peers(
    cur: Cursor,
    ds: Dataset,
    table: sql.Composed,
    pid: str,
    *,
    distance: float,
    max_peers: int,
    min_area: float,
) -> Columns:
    """Parcels with the same crop name within ``distance`` m (EPSG:3035), nearest first.

    The ``&&`` test against the search box, taken back to the national SRID, lets the GIST index
    prune candidates; the box is densified and padded so that reprojection cannot shrink it
    below the exact ST_DWithin test that follows.
    """
    parcel_pk(cur, table, pid)
    cur.execute(
        sql.SQL(
            "WITH cp AS (SELECT crop_name, ST_Transform(geom, {eq}) AS g FROM {t} WHERE parcel_id = %(pid)s)"
            " SELECT p.parcel_id AS pids, ST_Distance(ST_Transform(p.geom, {eq}), cp.g) AS distance"
            " FROM {t} p, cp"
            " WHERE p.crop_name = cp.crop_name AND p.parcel_id <> %(pid)s"
            " AND p.geom && ST_Transform(ST_Segmentize(ST_Expand(ST_Envelope(cp.g), %(d)s + 100),"
            " GREATEST((%(d)s + 100) / 8.0, 1.0)), %(srid)s)"
            " AND ST_DWithin(ST_Transform(p.geom, {eq}), cp.g, %(d)s)"
            " AND ST_Area(ST_Transform(p.geom, {eq})) >= %(min_area)s"
            " ORDER BY 2, p.parcel_id LIMIT %(max)s"
        ).format(t=table, eq=sql.Literal(EQUAL_AREA_SRID)),
        {"pid": pid, "d": distance, "srid": ds.srid, "min_area": min_area, "max": max_peers},
    )
    return fetch_columns(cur)


def _view_series_sql(
    ds: Dataset, *, bands: list[str] | None, scl: bool, ref: bool, pk: sql.Composable = sql.SQL("%(pk)s")
) -> sql.Composed:
    """One row per (scene, band) of the parcel, read through the row-per-band ``sigs``/``hists``
    (views since sql/011; tables in a dataset from before it, which only the storage benchmark
    still builds). The compact statement (:func:`_compact_series_sql`) returns the same rows.

    Unlike JRC, which inner-joined the histogram table and so silently dropped observations
    without an SCL histogram, the histogram is a LEFT JOIN: such rows stay, with ``hist`` ``{}``.
    An empty dict rather than null keeps the column one type, which the JRC client relies on
    (it parses every row's ``hist``); a real histogram is never empty, so ``{}`` is unambiguous.
    ``date_part('epoch', ...)`` is float8 arithmetic; ``extract`` returns numeric from PostgreSQL 14
    on and cost 5 % of the query in the numeric-to-float cast (the same value: the epoch in
    microseconds is exact in a double and one division by 1e6 is correctly rounded either way).
    Histograms are aggregated once per scene in a CTE (one index range scan) rather than probed
    once per (scene, band) row.

    Signatures are read through :func:`api.observations.one_per_acquisition`: a parcel in the
    overlap of two Sentinel-2 tiles has one row per tile for the same acquisition, and a series with
    both would show each date twice. The ``g.pid`` filter is pushed into the rule's subquery, so
    it still reads the parcel's rows only (one index range scan); the histogram joins on the chosen
    row's scene, so ``hist`` is the SCL of the observation that is returned.
    """
    extra: list[sql.Composable] = []
    ctes: list[sql.Composable] = []
    joins: list[sql.Composable] = []
    if scl:
        extra.append(sql.SQL(", coalesce(hh.hist, '{}'::json) AS hist"))
        ctes.append(
            sql.SQL(
                "WITH hh AS (SELECT h.scene_id, json_object_agg(h.class::text, h.count ORDER BY h.class) AS hist"
                " FROM {h} h WHERE h.pid = {pk} GROUP BY h.scene_id) "
            ).format(h=ds.hists, pk=pk)
        )
        joins.append(sql.SQL(" LEFT JOIN hh ON hh.scene_id = g.scene_id"))
    if ref:
        extra.append(sql.SQL(", s.product_name AS reference"))
    where = [sql.SQL("g.pid = {pk}").format(pk=pk), sql.SQL("s.card = %(card)s")]
    if bands:
        where.append(sql.SQL("g.band = ANY(%(bands)s)"))
    return sql.SQL(
        "{ctes}SELECT date_part('epoch', s.acquired_at) AS date_part, g.band, g.count,"
        " g.mean, g.std, g.min, g.p25, g.p50, g.p75, g.max{extra}"
        " FROM {sigs} g JOIN scenes s ON s.id = g.scene_id{joins}"
        " WHERE {where} ORDER BY s.acquired_at, g.band, s.id"
    ).format(
        ctes=sql.Composed(ctes),
        extra=sql.Composed(extra),
        sigs=one_per_acquisition(ds),
        joins=sql.Composed(joins),
        where=sql.SQL(" AND ").join(where),
    )


# SCL histograms of up to this many classes are written as JSON text by concatenation when their
# (class, count) pairs are stored in class order (the worker writes them so); others go through
# json_object_agg. A parcel's SCL holds one to three classes in nearly every scene.
_HIST_INLINE_PAIRS = 4


def _hist_text(o: str) -> sql.Composed:
    """``json_object_agg(class::text, count ORDER BY class)`` of the pairs in ``<o>.scl``, as text.

    json_object_agg's own format (``{ "4" : 120, "5" : 3 }``) built by string concatenation costs
    a fraction of the aggregate's sub-plan per row; the aggregate stays for what the concatenation
    does not cover (more pairs, pairs out of class order, a null). Null when there are no pairs.
    """
    s = sql.Identifier(o)
    k = _HIST_INLINE_PAIRS
    ordered = sql.SQL(" AND ").join(
        sql.SQL("coalesce({s}.scl[{a}] < {s}.scl[{b}], true)").format(
            s=s, a=sql.Literal(2 * j + 1), b=sql.Literal(2 * j + 3)
        )
        for j in range(k - 1)
    )
    pairs: list[sql.Composable] = [sql.SQL("""'{{ "' || {s}.scl[1]::smallint || '" : ' || {s}.scl[2]""").format(s=s)]
    for j in range(1, k):
        pairs.append(
            sql.SQL(""" || coalesce(', "' || {s}.scl[{a}]::smallint || '" : ' || {s}.scl[{b}], '')""").format(
                s=s, a=sql.Literal(2 * j + 1), b=sql.Literal(2 * j + 2)
            )
        )
    return sql.SQL(
        "CASE WHEN cardinality({s}.scl) <= {n} AND {ordered} AND array_position({s}.scl, NULL) IS NULL"
        " THEN {pairs} || ' }}'"
        " ELSE (SELECT json_object_agg({s}.scl[2 * h - 1]::smallint::text, {s}.scl[2 * h]"
        " ORDER BY {s}.scl[2 * h - 1]::smallint)"
        " FROM generate_series(1, cardinality({s}.scl) / 2) h)::text END"
    ).format(s=s, n=sql.Literal(2 * k), ordered=ordered, pairs=sql.Composed(pairs))


def _compact_series_sql(
    ds: Dataset, *, bands: list[str] | None, scl: bool, ref: bool, pk: sql.Composable, text: bool
) -> sql.Composed:
    """The rows of :func:`_view_series_sql` read from the compact tables of sql/011 directly.

    Through the views, each (scene, band) row cost a join to the band list, a trip through
    ``one_per_acquisition``'s sort with the parcel's UTM zone (a PROJ transformation set up on every
    execution) in its key, and a histogram built by a sub-plan; at 50 M observations the statement
    missed its 1 ms (docs/performance.md "Chain rehearsal"). Here one scene row is read per
    ``(parcel, scene)`` (one index range scan of ``<sigs>_obs``, clustered by pid), its histogram
    and epoch are formatted once per scene, and the bands are unnested from the row. Scenes and band
    lists are fetched by the parcel's scene ids (``= ANY``, one index scan each): joined plainly,
    the planner merge-joined or hashed the whole ``scenes`` table, which holds every scene of every
    dataset (4.4 ms p50 per series with 5,072 scenes, against 1.7 ms this way).

    The overlap rule is :func:`api.observations.one_per_acquisition`'s, applied without its
    sort: a (scene, band) is kept unless another scene of the same UTC date has that band with more
    pixels, or as many and the parcel's own UTM zone where this one has not, or both alike and a
    lower id. Only dates with two scenes (``n > 1``, the window over the parcel's scenes) test it,
    and only they compute the zone. A zone that cannot be computed (null for all the parcel's
    scenes alike, so the sort found them equal) compares as false, lest the row comparison be null
    and keep both. A parcel key absent from the dataset's parcels yields no rows, as the rule's join
    to the parcels did.

    ``text``: ``date_part`` and ``hist`` as JSON text for :func:`series_json_sql`; else float8 and
    json, as the view statement returns them.
    """
    obs = ds.ident(f"{ds.sigs_table}_obs")
    band_lists = ds.ident(f"{ds.sigs_table}_bands")
    scene_cols: list[sql.Composable] = [
        sql.SQL(
            "to_json(date_part('epoch', s.acquired_at))::text AS date_part"
            if text
            else "date_part('epoch', s.acquired_at) AS date_part"
        )
    ]
    if scl:
        hist = sql.SQL("coalesce({h}, '{{}}')").format(h=_hist_text("o"))
        scene_cols.append(sql.SQL("{h} AS hist").format(h=hist if text else sql.SQL("{h}::json").format(h=hist)))
    row_cols = [sql.SQL("r.date_part")]
    row_cols += [
        sql.SQL("b.name AS band, r.stats[8 * b.i - 7]::integer AS count, r.stats[8 * b.i - 6] AS mean,"
                " r.stats[8 * b.i - 5] AS std, r.stats[8 * b.i - 4] AS min, r.stats[8 * b.i - 2] AS p25,"
                " r.stats[8 * b.i - 1] AS p50, r.stats[8 * b.i] AS p75, r.stats[8 * b.i - 3] AS max")
    ]  # fmt: skip
    if scl:
        row_cols.append(sql.SQL("r.hist"))
    if ref:
        row_cols.append(sql.SQL("r.product_name AS reference"))
    where = [sql.SQL("r.stats[8 * b.i - 7] > 0")]
    if bands:
        where.append(sql.SQL("b.name = ANY(%(bands)s)"))
    return sql.SQL(
        "WITH o AS (SELECT o.scene_id, o.stats, o.scl FROM {obs} o WHERE o.pid = {pk}"
        " AND EXISTS (SELECT 1 FROM {parcels} p WHERE p.pid = {pk})),"
        " r AS (SELECT s.id, s.acquired_at, s.product_name, (s.acquired_at AT TIME ZONE 'UTC')::date AS day,"
        " count(*) OVER (PARTITION BY (s.acquired_at AT TIME ZONE 'UTC')::date) AS n, o.stats, sb.bands, {scene_cols}"
        " FROM o JOIN scenes s ON s.id = o.scene_id JOIN {band_lists} sb ON sb.scene_id = o.scene_id"
        " WHERE s.card = %(card)s AND s.id = ANY (ARRAY(SELECT o.scene_id FROM o))"
        " AND sb.scene_id = ANY (ARRAY(SELECT o.scene_id FROM o))),"
        " z AS (SELECT '_T' || lpad((floor((ST_X(ST_Transform(ST_PointOnSurface(p.geom), 4326)) + 180) / 6)::int + 1)"
        "::text, 2, '0') AS tile_prefix FROM {parcels} p WHERE p.pid = {pk})"
        " SELECT {row_cols} FROM r CROSS JOIN LATERAL unnest(r.bands) WITH ORDINALITY b(name, i)"
        " WHERE {where} AND (r.n = 1 OR NOT EXISTS (SELECT 1 FROM r r2"
        " CROSS JOIN LATERAL unnest(r2.bands) WITH ORDINALITY b2(name, i)"
        " WHERE r2.day = r.day AND r2.id <> r.id AND b2.name = b.name AND r2.stats[8 * b2.i - 7] > 0"
        " AND (r2.stats[8 * b2.i - 7]::integer, coalesce(strpos(r2.product_name, (SELECT z.tile_prefix FROM z)) > 0,"
        " false), -r2.id) > (r.stats[8 * b.i - 7]::integer,"
        " coalesce(strpos(r.product_name, (SELECT z.tile_prefix FROM z)) > 0, false), -r.id)))"
        " ORDER BY r.acquired_at, b.name, r.id"
    ).format(
        scene_cols=sql.SQL(", ").join(scene_cols),
        obs=obs,
        pk=pk,
        parcels=ds.parcels,
        band_lists=band_lists,
        row_cols=sql.SQL(", ").join(row_cols),
        where=sql.SQL(" AND ").join(where),
    )


def _series_sql(
    ds: Dataset,
    *,
    bands: list[str] | None,
    scl: bool,
    ref: bool,
    pk: sql.Composable = sql.SQL("%(pk)s"),
    compact: bool = True,
) -> sql.Composed:
    """One row per (scene, band) of the parcel, by acquisition time then band (see the two above)."""
    if compact:
        return _compact_series_sql(ds, bands=bands, scl=scl, ref=ref, pk=pk, text=False)
    return _view_series_sql(ds, bands=bands, scl=scl, ref=ref, pk=pk)


def time_series(
    cur: Cursor, ds: Dataset, pk: int, card: str, *, bands: list[str] | None, scl: bool, ref: bool
) -> Columns:
    """The parcel's series as column → list (for CSV and callers that need Python values)."""
    cur.execute(_series_sql(ds, bands=bands, scl=scl, ref=ref), {"pk": pk, "card": card, "bands": bands or []})
    return fetch_columns(cur)


SERIES_COLUMNS = ("date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max")
_STATS = ("mean", "std", "min", "p25", "p50", "p75", "max")


def series_json_sql(
    ds: Dataset, *, bands: list[str] | None, scl: bool, ref: bool, pk: sql.Composable, compact: bool = True
) -> sql.Composed:
    """One text value: the series as JRC's column → list JSON, for the parcel key ``pk`` (SQL).

    A parcel-year is hundreds of rows; converting each value to Python and back to JSON cost more
    than the query (docs/performance.md "API"), so the body is built by PostgreSQL and passed
    through untouched. Statistics that are NaN become null, as in the Python path.

    The aggregates carry no ORDER BY of their own: each would sort its 360 rows again (eleven
    sorts, 0.6 of 1.5 ms). They read a subquery that is already sorted, with nothing but the
    aggregate above it, which the PostgreSQL manual ("Aggregate Expressions") names as the way to
    feed ordered input; tests/test_api.py inserts scenes out of time order to keep this honest.

    On the compact tables the body is ``json_build_object``'s format (``{"k" : [a, b], ...}`` with
    ``json_agg``'s lists) written by concatenation, so that the epoch and the histogram, formatted
    once per scene by :func:`_compact_series_sql`, are appended as text (``string_agg`` with
    ``json_agg``'s separator) instead of being parsed back into json values once per band row.
    ``compact=False`` is the statement through the row-per-band views (or the tables of a dataset
    from before sql/011), unchanged: the reference of tests/integration/test_series_compact.py and
    the benchmark's "before".
    """
    cols = [*SERIES_COLUMNS, *(["hist"] if scl else []), *(["reference"] if ref else [])]
    if not compact:
        old: list[sql.Composable] = []
        for name in cols:
            value = sql.SQL("nullif(t.{c}, 'NaN')" if name in _STATS else "t.{c}").format(c=sql.Identifier(name))
            old.append(sql.SQL("{k}, coalesce(json_agg({v}), '[]'::json)").format(k=sql.Literal(name), v=value))
        return sql.SQL("SELECT json_build_object({parts})::text FROM ({inner}) t").format(
            parts=sql.SQL(", ").join(old), inner=_view_series_sql(ds, bands=bands, scl=scl, ref=ref, pk=pk)
        )
    parts: list[sql.Composable] = []
    for n, name in enumerate(cols):
        c = sql.Identifier(name)
        if name in ("date_part", "hist"):
            agg = sql.SQL("coalesce('[' || string_agg(t.{c}, ', ') || ']', '[]')").format(c=c)
        elif name in _STATS:
            agg = sql.SQL("coalesce(json_agg(nullif(t.{c}, 'NaN'))::text, '[]')").format(c=c)
        else:
            agg = sql.SQL("coalesce(json_agg(t.{c})::text, '[]')").format(c=c)
        key = ("{" if n == 0 else ", ") + json.dumps(name) + " : "
        parts.append(sql.SQL("{k} || {a}").format(k=sql.Literal(key), a=agg))
    inner = _compact_series_sql(ds, bands=bands, scl=scl, ref=ref, pk=pk, text=True)
    return sql.SQL("SELECT {parts} || '}}' FROM ({inner}) t").format(parts=sql.SQL(" || ").join(parts), inner=inner)


def time_series_json(
    cur: Cursor, ds: Dataset, pk: int, card: str, *, bands: list[str] | None, scl: bool, ref: bool
) -> bytes:
    """The series of parcel key ``pk`` as JSON bytes (see :func:`series_json_sql`)."""
    cur.execute(
        series_json_sql(ds, bands=bands, scl=scl, ref=ref, pk=sql.SQL("%(pk)s")),
        {"pk": pk, "card": card, "bands": bands or []},
    )
    return str(cur.fetchone()[0]).encode("utf-8")


def series_for_user_sql(
    ds: Dataset, *, bands: list[str] | None, scl: bool, ref: bool, compact: bool = True
) -> sql.Composed:
    """The caller's user row, the parcel key and the series body, in one statement.

    Columns: name, password_hash, is_admin, grants (``auth.USER_ROW_SQL``), then the parcel key
    and the JSON body, both null unless the user is an admin or granted ``%(aoi)s``. No row at
    all: no such user. Parameters: user, aoi, pid, card, bands.
    """
    return sql.SQL(
        "WITH u AS ({user_row}),"
        " k AS (SELECT p.pid AS pk FROM {t} p WHERE p.parcel_id = %(pid)s"
        " AND EXISTS (SELECT 1 FROM u WHERE u.is_admin OR %(aoi)s = ANY(u.grants)))"
        " SELECT u.name, u.password_hash, u.is_admin, u.grants, k.pk,"
        " CASE WHEN k.pk IS NOT NULL THEN ({series}) END"
        " FROM u LEFT JOIN k ON true"
    ).format(
        user_row=sql.SQL(USER_ROW_SQL),
        t=ds.parcels,
        series=series_json_sql(ds, bands=bands, scl=scl, ref=ref, pk=sql.SQL("k.pk"), compact=compact),
    )


def scl_series(cur: Cursor, ds: Dataset, pk: int) -> Columns:
    """JRC ``tstype=scl``: one SCL histogram per scene (``obsid`` = scene id), by acquisition time.

    A scene whose signatures of the parcel all lost to another tile's (granule overlap,
    :func:`api.observations.one_per_acquisition`) is left out, so the histograms are those of
    the observations the series returns; a histogram without signatures is kept, as before.
    """
    cur.execute(
        sql.SQL(
            "SELECT h.scene_id AS obsid, json_object_agg(h.class::text, h.count ORDER BY h.class) AS hist"
            " FROM {h} h JOIN scenes s ON s.id = h.scene_id"
            " WHERE h.pid = %(pk)s AND (h.scene_id IN (SELECT o.scene_id FROM {one} o WHERE o.pid = %(pk)s)"
            " OR NOT EXISTS (SELECT 1 FROM {sigs} g WHERE g.pid = %(pk)s AND g.scene_id = h.scene_id))"
            " GROUP BY h.scene_id, s.acquired_at ORDER BY s.acquired_at, h.scene_id"
        ).format(h=ds.hists, one=one_per_acquisition(ds), sigs=ds.sigs),
        {"pk": pk},
    )
    return fetch_columns(cur)


def _ptypes(cur: Cursor, ds: Dataset) -> list[str]:
    cur.execute(
        "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = %s AND tablename LIKE %s ORDER BY tablename",
        (ds.schema_name, ds.parcel_table.replace("_", r"\_") + r"\_%"),
    )
    prefix = ds.parcel_table + "_"
    return [str(name)[len(prefix) :] for (name,) in cur.fetchall() if PTYPE_RE.match(str(name)[len(prefix) :])]


def _examples(cur: Cursor, table: sql.Composed, n: int = 5) -> list[str]:
    # The first ids by key, not a random sample: cheap on tables of millions and stable for docs.
    cur.execute(sql.SQL("SELECT parcel_id FROM {t} ORDER BY pid LIMIT %s").format(t=table), (n,))
    return [str(r[0]) for r in cur.fetchall()]


def _cards_present(cur: Cursor, ds: Dataset) -> list[str]:
    # LATERAL ... LIMIT 1 forces one index probe per scene: a plain join may be planned as a scan
    # of the whole signatures table (hundreds of millions of rows) for a card that has none.
    out = []
    for card in CARDS:
        cur.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM scenes s"
                " CROSS JOIN LATERAL (SELECT 1 FROM {sigs} g WHERE g.scene_id = s.id LIMIT 1) x"
                " WHERE s.card = %s)"
            ).format(sigs=ds.sigs),
            (card,),
        )
        if cur.fetchone()[0]:
            out.append(card)
    return out


def info(cur: Cursor, datasets: list[Dataset], base_url: str, title: str) -> dict[str, Any]:
    """JRC ``/query/info`` for the datasets the caller may see (all years, not one at random)."""
    aois: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        entry = aois.setdefault(
            ds.aoi,
            {
                "years": [],
                "datasets": [],
                "time_series": [],
                "tms": [],
                "id_table_column": "parcel_id",
                "request_examples": {},
            },
        )
        entry["years"].append(ds.year)
        ptypes = _ptypes(cur, ds)
        for pt in ptypes:
            if pt not in entry["datasets"]:
                entry["datasets"].append(pt)
        for card in _cards_present(cur, ds):
            if card not in entry["time_series"]:
                entry["time_series"].append(card)
        examples = _examples(cur, ds.parcels)
        entry[f"id_examples_{ds.year}"] = examples
        for pt in ptypes:
            entry[f"id_examples_{ds.year}_{pt}"] = _examples(cur, ds.ident(f"{ds.parcel_table}_{pt}"))
        if examples:
            q = f"aoi={quote(ds.aoi)}&year={ds.year}&pid={quote(examples[0], safe='')}"
            entry["request_examples"] = {
                "parcelByID": f"{base_url}/query/parcelByID?{q}&withGeometry=True",
                "parcelTimeSeries_s2": f"{base_url}/query/parcelTimeSeries?{q}&tstype=s2&scl=True",
                "parcelTimeSeries_bs": f"{base_url}/query/parcelTimeSeries?{q}&tstype=bs",
                "parcelTimeSeries_c6": f"{base_url}/query/parcelTimeSeries?{q}&tstype=c6",
                "parcelPeers": f"{base_url}/query/parcelPeers?{q}",
            }
    return {
        "server": {"title": title},
        "helpers": {
            "documentation": None,
            "git_repository": None,
            "information_page": f"{base_url}/query/info",
            "downloadable material": None,
            "swagger": None,
        },
        "aois": aois,
    }
