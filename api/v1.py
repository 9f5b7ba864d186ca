"""``/api/v1``: what JRC's API lacked, in a versioned namespace with plain JSON shapes.

Parcel ids travel in the query string (``?pid=``), never in the path: real ids contain ``/`` and
``%``, which path routing would decode and split. Each handler keeps the order of the JRC routes:
authenticate (401), parse (400), grant (403), look up (404), query. :func:`routes` builds the router.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg2 import sql
from starlette.requests import Request
from starlette.responses import Response

from api import queries
from api.auth import authorize
from api.infra import Call, Endpoint, authenticated, state_of
from api.observations import one_per_acquisition
from api.openapi import BINARY, NULLNUM, OBJECT, STR, json_content
from api.params import BAND_LIST_PATTERN, OPTIONAL_AOI, PATH_AOI, PATH_YEAR, PID, PTYPE, Param, Params
from api.responses import ApiJSONResponse
from cbmflow.db import Dataset
from cbmflow.errors import InvalidInputError, NotFoundError
from cbmflow.vocab import SCENE_STATUSES

# Normalised differences (a - b) / (a + b) over S2 band means.
INDICES: dict[str, tuple[str, str]] = {
    "ndvi": ("B08", "B04"),
    "ndwi": ("B03", "B08"),
    "ndmi": ("B08", "B11"),
    "ndre": ("B08", "B05"),
}
# SCL classes that make an observation unusable: no data, saturated/defective, cloud shadow,
# cloud medium and high probability, thin cirrus (ESA L2A SCL legend).
DEFAULT_SCL_MASK = (0, 1, 3, 8, 9, 10)
MAX_SCENES_PAGE = 1000
SERIES_COLUMNS = ("acquired", "scene_id", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max")
COHERENCE_CARDS = {"c6": ("c6",), "c12": ("c12",), "coh": ("c6", "c12")}
"""Coherence in the series: 6-day, 12-day, or both (``coh``: the repeat changed with the constellation,
12 days from December 2021 until S1C, so a multi-year series mixes them). Their observations carry
``gap_days``, the n of COHn, which the JRC ``tstype=c6`` response has no column for."""
V1_CARDS = (*queries.CARDS, "c12", "coh")

BANDS = Param("bands", pattern=BAND_LIST_PATTERN, max_len=200, description="e.g. B04,B08")
FROM = Param("from", "date", max_len=40, description="first day (UTC), or an ISO 8601 date-time")
TO = Param("to", "date", max_len=40, description="last day included (UTC), or an ISO 8601 date-time")
PARCEL = (PATH_AOI, PATH_YEAR, PID, PTYPE)
TIMESERIES = (
    *PARCEL,
    Param(
        "card",
        enum=V1_CARDS,
        default="s2",
        case="lower",
        max_len=4,
        description="coh: 6- and 12-day coherence together (each observation has gap_days)",
    ),
    BANDS,
    FROM,
    TO,
    Param("format", enum=("json", "csv", "parquet"), default="json", case="lower", max_len=10),
)
INDEX_PARAMS = (
    Param(
        "index",
        enum=(*INDICES, "nd"),
        default="ndvi",
        case="lower",
        max_len=10,
        description="nd: give two bands in 'bands'",
    ),
    BANDS,
    Param("max_cloud", "number", default=0.1, minimum=0, maximum=1, description="largest masked fraction kept (0.1)"),
    Param(
        "mask",
        pattern="^([0-9]|1[01])(,([0-9]|1[01]))*$",
        description="SCL classes counted as masked, default " + ",".join(map(str, DEFAULT_SCL_MASK)),
    ),
    FROM,
    TO,
)
INDEX = (*PARCEL, *INDEX_PARAMS, Param("format", enum=("json", "csv"), default="json", case="lower", max_len=10))
PLOT = (*PARCEL, *INDEX_PARAMS)
SCENES = (
    OPTIONAL_AOI,
    Param("status", enum=SCENE_STATUSES, max_len=20),
    Param("card", enum=(*queries.CARDS, "c12"), max_len=4),
    FROM,
    TO,
    Param("limit", "integer", default=100, minimum=1, maximum=MAX_SCENES_PAGE),
    Param("offset", "integer", default=0, minimum=0, maximum=10_000_000),
)


def _path_dataset(call: Call, p: Params) -> Dataset:
    aoi, year = p.required_text("aoi"), p.integer("year")
    authorize(call.user, aoi)
    ds = call.state.datasets.get(call.cur, aoi, year)
    if ds is None:
        raise NotFoundError(f"no dataset {aoi} {year}")
    return ds


def _when(p: Params, name: str, *, end: bool) -> datetime | None:
    """``YYYY-MM-DD`` (a whole UTC day, so ``to`` includes its day) or an ISO 8601 date-time."""
    value = p.text(name)
    if value is None:
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            d = datetime.combine(date.fromisoformat(value), datetime.min.time(), tzinfo=UTC)
            return d + timedelta(days=1) if end else d
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInputError(f"parameter {name!r} must be YYYY-MM-DD or an ISO 8601 date-time") from exc
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _period(p: Params) -> tuple[datetime | None, datetime | None]:
    start, end = _when(p, "from", end=False), _when(p, "to", end=True)
    if start and end and start >= end:
        raise InvalidInputError("parameter 'from' must be before 'to'")
    return start, end


def _period_filter(start: datetime | None, end: datetime | None) -> list[sql.Composable]:
    """Conditions on ``s.acquired_at`` for the ``%(start)s``/``%(end)s`` parameters: [from, to)."""
    where: list[sql.Composable] = []
    if start:
        where.append(sql.SQL("s.acquired_at >= %(start)s"))
    if end:
        where.append(sql.SQL("s.acquired_at < %(end)s"))
    return where


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _table_response(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, name: str) -> Response:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow("" if r[c] is None else r[c] for c in columns)
        return Response(
            buf.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in columns})
    out = pa.BufferOutputStream()
    pq.write_table(table, out)
    return Response(
        out.getvalue().to_pybytes(),
        media_type="application/vnd.apache.parquet",
        headers={"Content-Disposition": f'attachment; filename="{name}.parquet"'},
    )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


# ---------------------------------------------------------------- routes


def datasets(request: Request, p: Params) -> Response:
    """The datasets the caller is granted, with their SRID and description."""
    with authenticated(request) as call:
        call.cur.execute("SELECT aoi, year, srid, description FROM datasets ORDER BY aoi, year")
        rows = [
            {"aoi": str(a), "year": int(y), "srid": int(s), "description": str(d)}
            for a, y, s, d in call.cur.fetchall()
            if call.user.can_see(str(a))
        ]
        return ApiJSONResponse({"datasets": rows})


def parcel(request: Request, p: Params) -> Response:
    """One parcel as a GeoJSON Feature in WGS84 (RFC 7946), area in m² (EPSG:3035)."""
    with authenticated(request) as call:
        pid, ptype = p.required_text("pid"), p.text("ptype")
        ds = _path_dataset(call, p)
        table = queries.parcel_table(call.cur, ds, ptype)
        call.cur.execute(
            sql.SQL(
                "SELECT p.parcel_id, p.crop_name, p.crop_code, ST_SRID(p.geom),"
                " ST_Area(ST_Transform(p.geom, 3035)), ST_AsGeoJSON(ST_Transform(p.geom, 4326), 9)"
                " FROM {t} p WHERE p.parcel_id = %s"
            ).format(t=table),
            (pid,),
        )
        row = call.cur.fetchone()
        if row is None:
            raise NotFoundError("no such parcel")
        feature = {
            "type": "Feature",
            "id": row[0],
            "geometry": json.loads(row[5]),
            "properties": {
                "pid": row[0],
                "aoi": ds.aoi,
                "year": ds.year,
                "crop_name": row[1],
                "crop_code": row[2],
                "srid": int(row[3]),
                "area_m2": round(float(row[4]), 2),
            },
        }
        return ApiJSONResponse(feature, media_type="application/geo+json")


def timeseries(request: Request, p: Params) -> Response:
    """Per-scene statistics of one parcel, filtered by period and bands, as JSON, CSV or Parquet."""
    with authenticated(request) as call:
        pid, ptype = p.required_text("pid"), p.text("ptype")
        card = p.choice("card") or "s2"
        bands = p.bands("bands")
        start, end = _period(p)
        fmt = p.choice("format") or "json"
        ds = _path_dataset(call, p)
        pk = queries.parcel_pk(call.cur, queries.parcel_table(call.cur, ds, ptype), pid)
        where = [sql.SQL("g.pid = %(pk)s"), sql.SQL("s.card = ANY(%(cards)s)")]
        if bands:
            where.append(sql.SQL("g.band = ANY(%(bands)s)"))
        where += _period_filter(start, end)
        coherence = card in COHERENCE_CARDS
        columns = (*SERIES_COLUMNS, "gap_days") if coherence else SERIES_COLUMNS
        gap = sql.SQL(", CASE s.card WHEN 'c6' THEN 6 WHEN 'c12' THEN 12 END" if coherence else "")
        call.cur.execute(
            sql.SQL(
                "SELECT s.acquired_at, g.scene_id, g.band, g.count, g.mean, g.std, g.min, g.p25, g.p50, g.p75,"
                " g.max{gap}"
                " FROM {sigs} g JOIN scenes s ON s.id = g.scene_id WHERE {where}"
                " ORDER BY s.acquired_at, g.band, s.id"
            ).format(gap=gap, sigs=one_per_acquisition(ds), where=sql.SQL(" AND ").join(where)),
            {"pk": pk, "cards": list(COHERENCE_CARDS.get(card, (card,))), "bands": bands, "start": start, "end": end},
        )
        rows = [
            {c: (_iso(v) if c == "acquired" else _finite(v)) for c, v in zip(columns, r, strict=True)}
            for r in call.cur.fetchall()
        ]
        if fmt == "json":
            return ApiJSONResponse({"pid": pid, "aoi": ds.aoi, "year": ds.year, "card": card, "observations": rows})
        return _table_response(rows, columns, fmt, f"{ds.aoi}_{ds.year}_{_safe(pid)}_{card}")


def _index_spec(p: Params) -> tuple[str, str, str]:
    name = p.choice("index") or "ndvi"
    if name == "nd":
        bands = p.bands("bands")
        if len(bands) != 2:
            raise InvalidInputError("index 'nd' needs parameter 'bands' with two bands, e.g. B08,B04")
        return name, bands[0], bands[1]
    return name, *INDICES[name]


def _mask(p: Params) -> list[int]:
    value = p.text("mask")
    if value is None:
        return list(DEFAULT_SCL_MASK)
    try:
        classes = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError as exc:
        raise InvalidInputError("parameter 'mask' must be SCL classes such as 3,8,9,10") from exc
    if any(not 0 <= c <= 11 for c in classes):
        raise InvalidInputError("parameter 'mask' classes must be between 0 and 11")
    return classes


def index_observations(call: Call, ds: Dataset, pk: int, p: Params) -> dict[str, Any]:
    """A normalised difference per scene, with the masked-pixel fraction from the SCL histogram.

    The index is computed from the parcel's band *means* ((mean a - mean b) / (mean a + mean b)),
    the same quantity the JRC notebooks derive from the signatures; it is not the mean of per-pixel
    indices. Observations whose masked fraction exceeds ``max_cloud``, and those without an SCL
    histogram (their cloudiness is unknown), are dropped unless ``max_cloud`` is 1.

    Where two tiles observed the parcel on one date (granule overlap), only the scene that
    :func:`api.observations.one_per_acquisition` chooses for band ``a`` is kept; both bands and
    the SCL histogram come from that one scene, so the ratio and its cloud filter describe the same
    pixels (choosing per band could pair band ``a`` of one tile with band ``b`` of the other).
    """
    name, a, b = _index_spec(p)
    max_cloud = p.number("max_cloud")
    mask = _mask(p)
    start, end = _period(p)
    where = [sql.SQL("s.card = 's2'")]
    where += _period_filter(start, end)
    call.cur.execute(
        sql.SQL(
            "WITH v AS (SELECT g.scene_id, max(g.mean) FILTER (WHERE g.band = %(a)s) AS a,"
            " max(g.mean) FILTER (WHERE g.band = %(b)s) AS b FROM {sigs} g"
            " WHERE g.pid = %(pk)s AND g.band IN (%(a)s, %(b)s) GROUP BY g.scene_id),"
            " h AS (SELECT h.scene_id, sum(h.count) AS total, coalesce(sum(h.count) FILTER"
            " (WHERE h.class = ANY(%(mask)s::smallint[])), 0) AS masked FROM {hists} h WHERE h.pid = %(pk)s"
            " GROUP BY h.scene_id)"
            " SELECT s.acquired_at, v.scene_id, (v.a - v.b) / nullif(v.a + v.b, 0),"
            " h.masked::float8 / nullif(h.total, 0)"
            " FROM v JOIN scenes s ON s.id = v.scene_id LEFT JOIN h ON h.scene_id = v.scene_id"
            " WHERE v.a IS NOT NULL AND v.b IS NOT NULL AND {where}"
            " AND v.scene_id IN (SELECT o.scene_id FROM {one} o WHERE o.pid = %(pk)s AND o.band = %(a)s)"
            " ORDER BY s.acquired_at, s.id"
        ).format(sigs=ds.sigs, hists=ds.hists, one=one_per_acquisition(ds), where=sql.SQL(" AND ").join(where)),
        {"a": a, "b": b, "pk": pk, "mask": mask, "start": start, "end": end},
    )
    kept: list[dict[str, Any]] = []
    dropped = 0
    for acquired, scene_id, value, cloud in call.cur.fetchall():
        clear = cloud is not None and cloud <= max_cloud
        if max_cloud >= 1.0 or clear:
            kept.append(
                {"acquired": _iso(acquired), "scene_id": scene_id, "value": _finite(value), "cloud": _finite(cloud)}
            )
        else:
            dropped += 1
    return {
        "index": name,
        "bands": [a, b],
        "max_cloud": max_cloud,
        "mask": mask,
        "dropped": dropped,
        "observations": kept,
    }


def index(request: Request, p: Params) -> Response:
    """NDVI (or another normalised difference) per clear scene, SCL cloud filtering server-side."""
    with authenticated(request) as call:
        pid, ptype = p.required_text("pid"), p.text("ptype")
        fmt = p.choice("format") or "json"
        _index_spec(p)
        _mask(p)
        p.number("max_cloud")
        _period(p)
        ds = _path_dataset(call, p)
        pk = queries.parcel_pk(call.cur, queries.parcel_table(call.cur, ds, ptype), pid)
        body = index_observations(call, ds, pk, p)
        if fmt == "csv":
            return _table_response(
                body["observations"],
                ("acquired", "scene_id", "value", "cloud"),
                "csv",
                f"{ds.aoi}_{ds.year}_{_safe(pid)}_{body['index']}",
            )
        return ApiJSONResponse({"pid": pid, "aoi": ds.aoi, "year": ds.year, **body})


def plot(request: Request, p: Params) -> Response:
    """A PNG of the parcel's index series (clear scenes as dots, masked ones as crosses)."""
    with authenticated(request) as call:
        pid, ptype = p.required_text("pid"), p.text("ptype")
        _index_spec(p)
        _mask(p)
        _period(p)
        max_cloud = p.number("max_cloud")
        ds = _path_dataset(call, p)
        pk = queries.parcel_pk(call.cur, queries.parcel_table(call.cur, ds, ptype), pid)
        clear = index_observations(call, ds, pk, p)
        everything = index_observations(call, ds, pk, p.replaced(max_cloud="1"))
    png = render_plot(f"{ds.aoi} {ds.year} {pid}", clear, everything["observations"], max_cloud)
    return Response(png, media_type="image/png")


def render_plot(title: str, clear: dict[str, Any], all_obs: list[dict[str, Any]], max_cloud: float) -> bytes:
    # The object-oriented API, never pyplot: pyplot keeps global state (current figure, backend)
    # and is not thread-safe, while this runs in Starlette's thread pool, several at once. A
    # Figure with its own Agg canvas touches no global state and needs no close().
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(obs: list[dict[str, Any]]) -> tuple[Any, list[float]]:
        pts = [(datetime.fromisoformat(o["acquired"].replace("Z", "+00:00")), o["value"]) for o in obs]
        pts = [(t, v) for t, v in pts if v is not None]
        return [t for t, _ in pts], [v for _, v in pts]

    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    kept = {o["scene_id"] for o in clear["observations"]}
    tx, vx = series([o for o in all_obs if o["scene_id"] not in kept])
    tc, vc = series(clear["observations"])
    if tx:
        ax.plot(tx, vx, "x", color="0.6", label=f"masked > {max_cloud:g}")
    if tc:
        ax.plot(tc, vc, "o-", color="tab:green", label="clear")
    ax.set_title(title)
    ax.set_ylabel(clear["index"].upper() + f" ({clear['bands'][0]}, {clear['bands'][1]})")
    ax.grid(alpha=0.3)
    if tx or tc:
        ax.legend(loc="best", fontsize="small")
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_URL_RE = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+")
_DSN_KV_RE = re.compile(r"(?i)\b(?:host|hostaddr|port|user|password|dbname|sslkey|sslcert|passfile)=(?:'[^']*'|\S+)")
_PATH_RE = re.compile(r"(?<![\w.:/-])(?:[A-Za-z]:)?(?:/|\\)[^\s'\",;()\[\]]+")
# IPv4, and IPv6 in its full or "::" forms (not any a:b:c, which times like 12:30:45 also are).
_IP_RE = re.compile(
    r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b|\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b"
    r"|(?<![\w:])(?:[0-9a-f]{1,4}:)*:(?::?[0-9a-f]{1,4})+\b",
    re.IGNORECASE,
)
_HOST_RE = re.compile(r'(?i)(server at|host|hostname)\s*"?[^\s",]+"?')


def tenant_reason(reason: str | None) -> str | None:
    """A failure reason as a tenant may see it: the class (``permanent: FileNotFoundError``) and
    the wording kept, every server path, URL, DSN field, address and host name replaced.

    Reasons are written by workers for operators (``label: ExceptionName: message``), and the
    message of an ``OSError`` or a driver names mount points, buckets and database hosts. Admins
    get the full text; the product id is a column of its own, so nothing a tenant needs is lost.
    """
    if not reason:
        return reason
    text = _URL_RE.sub("<url>", reason)
    text = _DSN_KV_RE.sub("<hidden>", text)
    text = _PATH_RE.sub("<path>", text)
    text = _HOST_RE.sub(lambda m: f"{m.group(1)} <host>", text)
    return _IP_RE.sub("<address>", text)


def scenes(request: Request, p: Params) -> Response:
    """The scene catalogue with processing status, limited to scenes over the caller's datasets.

    A scene is visible when its footprint intersects an AOI the caller is granted (admins see
    all), so a tenant learns nothing about acquisitions elsewhere.
    """
    with authenticated(request) as call:
        aoi, status, card = p.text("aoi"), p.choice("status"), p.choice("card")
        start, end = _period(p)
        limit, offset = p.integer("limit"), p.integer("offset")
        where: list[sql.Composable] = [sql.SQL("true")]
        args: dict[str, Any] = {"status": status, "card": card, "start": start, "end": end}
        if aoi is not None:
            authorize(call.user, aoi)
            call.cur.execute("SELECT 1 FROM aois WHERE name = %s", (aoi,))
            if call.cur.fetchone() is None:
                raise NotFoundError(f"no area of interest {aoi}")
            args["aois"] = [aoi]
        elif not call.user.is_admin:
            args["aois"] = sorted(call.user.grants)
        if "aois" in args:
            where.append(
                sql.SQL(
                    "EXISTS (SELECT 1 FROM aois a WHERE a.name = ANY(%(aois)s) AND ST_Intersects(a.geom, s.footprint))"
                )
            )
        for cond, key in (("s.status = %(status)s", "status"), ("s.card = %(card)s", "card")):
            if args[key] is not None:
                where.append(sql.SQL(cond))
        where += _period_filter(start, end)
        call.cur.execute(
            sql.SQL(
                "SELECT s.id, s.product_id, s.product_name, s.card, s.sensor, s.acquired_at, s.status, s.reason,"
                " s.rows_written, s.updated_at FROM scenes s WHERE {w}"
                " ORDER BY s.acquired_at DESC, s.id DESC LIMIT %(limit)s OFFSET %(offset)s"
            ).format(w=sql.SQL(" AND ").join(where)),
            {**args, "limit": limit, "offset": offset},
        )
        rows = [
            {
                "id": r[0],
                "product_id": r[1],
                "product_name": r[2],
                "card": r[3],
                "sensor": r[4],
                "acquired": _iso(r[5]),
                "status": r[6],
                "reason": r[7] if call.user.is_admin else tenant_reason(r[7]),
                "rows_written": r[8],
                "updated_at": _iso(r[9]),
            }
            for r in call.cur.fetchall()
        ]
        return ApiJSONResponse({"scenes": rows, "limit": limit, "offset": offset})


def healthz(request: Request, p: Params) -> Response:
    """Readiness without credentials: the pool hands out a working connection within 5 s."""
    with state_of(request).pool.cursor(wait_s=5.0) as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return ApiJSONResponse({"status": "ok", "database": "ok"})


def metrics(request: Request, p: Params) -> Response:
    """Prometheus exposition of request counts and latencies by route template (no tenant data)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def routes() -> list[Endpoint]:
    """The ``/api/v1`` router, with the readiness and metrics probes."""
    base = "/api/v1/datasets/{aoi}/{year}"
    obs = {
        "type": "object",
        "properties": {
            "acquired": {"type": "string", "format": "date-time"},
            "scene_id": {"type": "integer"},
            "band": STR,
            "count": {"type": "integer"},
            **{k: NULLNUM for k in ("mean", "std", "min", "p25", "p50", "p75", "max")},
        },
    }
    index_obs = {
        "type": "object",
        "properties": {
            "acquired": {"type": "string", "format": "date-time"},
            "scene_id": {"type": "integer"},
            "value": NULLNUM,
            "cloud": NULLNUM,
        },
    }
    dataset = {
        "type": "object",
        "properties": {"aoi": STR, "year": {"type": "integer"}, "srid": {"type": "integer"}, "description": STR},
    }
    return [
        Endpoint(
            "/healthz", healthz, "readiness (no credentials)", json_content(OBJECT), auth=False, found=False, tag="ops"
        ),
        Endpoint(
            "/metrics",
            metrics,
            "Prometheus metrics (no credentials; route templates only)",
            {"text/plain": {"schema": STR}},
            auth=False,
            found=False,
            tag="ops",
        ),
        Endpoint(
            "/api/v1/datasets",
            datasets,
            "datasets granted to the caller",
            json_content({"type": "object", "properties": {"datasets": {"type": "array", "items": dataset}}}),
            found=False,
        ),
        Endpoint(
            f"{base}/parcel",
            parcel,
            "one parcel as a GeoJSON Feature in WGS84",
            {"application/geo+json": {"schema": {"type": "object", "required": ["type", "geometry", "properties"]}}},
            PARCEL,
        ),
        Endpoint(
            f"{base}/timeseries",
            timeseries,
            "band statistics per scene, by period and bands",
            {
                **json_content({"type": "object", "properties": {"observations": {"type": "array", "items": obs}}}),
                "text/csv": {"schema": STR},
                "application/vnd.apache.parquet": {"schema": BINARY},
            },
            TIMESERIES,
        ),
        Endpoint(
            f"{base}/index",
            index,
            "a normalised difference (NDVI, ...) per clear scene; SCL cloud filtering on the server",
            {
                **json_content(
                    {
                        "type": "object",
                        "properties": {
                            "dropped": {"type": "integer"},
                            "observations": {"type": "array", "items": index_obs},
                        },
                    }
                ),
                "text/csv": {"schema": STR},
            },
            INDEX,
        ),
        Endpoint(
            f"{base}/plot.png",
            plot,
            "PNG plot of the parcel's index series",
            {"image/png": {"schema": BINARY}},
            PLOT,
        ),
        Endpoint(
            "/api/v1/scenes",
            scenes,
            "scene catalogue with processing status, over the caller's datasets",
            json_content({"type": "object", "properties": {"scenes": {"type": "array", "items": OBJECT}}}),
            SCENES,
        ),
    ]
