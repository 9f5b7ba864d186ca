"""The JRC-compatible ``GET /query/*`` routes (and ``/health``), built by :func:`routes`.

Each handler follows one order, so the status a client sees is predictable: authenticate (401),
parse every parameter (400), check the grant on the dataset name (403, before the dataset is
looked up, so a caller cannot probe which datasets exist), look the dataset up (404), query.
Parameter names, defaults and reply shapes are JRC's; deviations are noted where they occur.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg2
import shapely
from starlette.requests import Request
from starlette.responses import Response

from api import aiodb, prepared, queries
from api.auth import InsecureTransportError, TooManyAttemptsError, authorize, password_credentials
from api.infra import Call, Endpoint, authenticated, check_transport, client_address, state_of
from api.openapi import COLUMNS, OBJECT, STR, json_content
from api.params import AOI, BAND_LIST_PATTERN, LAT, LON, OPTIONAL_AOI, PID, PTYPE, YEAR, Param, Params
from api.responses import ApiJSONResponse
from cbmflow.db import Dataset
from cbmflow.errors import InvalidInputError, NotFoundError

MAX_PEERS = 10_000
MAX_PEER_DISTANCE_M = 100_000.0

GEOMETRY = (Param("withGeometry", "boolean", default=False), Param("wgs84", "boolean", default=False))
INFO = (OPTIONAL_AOI,)
PARCEL_BY_ID = (AOI, YEAR, PID, PTYPE, *GEOMETRY)
PARCEL_BY_LOCATION = (AOI, YEAR, LON, LAT, PTYPE, *GEOMETRY)
PARCELS_BY_POLYGON = (
    AOI,
    YEAR,
    Param("polygon", max_len=1_000_000, description="JRC encoding lon_lat-lon_lat-..."),
    Param("geojson", max_len=1_000_000, description="RFC 7946 Polygon/MultiPolygon (or Feature), EPSG:4326"),
    Param("wkt", max_len=1_000_000, description="POLYGON/MULTIPOLYGON, lon lat"),
    Param("only_ids", "boolean", default=True),
    Param("limit", "integer", minimum=1, maximum=1_000_000, description="capped by CBMFLOW_API_POLYGON_LIMIT"),
    PTYPE,
    *GEOMETRY,
)
PARCEL_PEERS = (
    AOI,
    YEAR,
    PID,
    PTYPE,
    Param("distance", "number", default=1000.0, minimum=0, maximum=MAX_PEER_DISTANCE_M),
    Param("max", "integer", default=10, minimum=1, maximum=1_000_000_000, description=f"capped at {MAX_PEERS}"),
    Param("min_area", "number", default=0.0, minimum=0, maximum=1e12, description="m²"),
)
TIME_SERIES = (
    AOI,
    YEAR,
    PID,
    PTYPE,
    Param("tstype", enum=queries.TSTYPES, default="s2", case="lower", max_len=10),
    Param("band", pattern=BAND_LIST_PATTERN, max_len=200, description="e.g. B04 or B04,B08"),
    Param("scl", "boolean", default=True),
    Param("ref", "boolean", default=False),
    Param("tsformat", enum=("json", "csv"), default="json", case="lower", max_len=10),
)


def _dataset(call: Call, aoi: str, year: int) -> Dataset:
    authorize(call.user, aoi)
    ds = call.state.datasets.get(call.cur, aoi, year)
    if ds is None:
        raise NotFoundError(f"no dataset {aoi} {year}")
    return ds


def _geometry_flags(p: Params) -> tuple[bool, bool]:
    return p.boolean("withGeometry"), p.boolean("wgs84")


def info(request: Request, p: Params) -> Response:
    """Datasets the caller may see, with example ids and request URLs (JRC ``/query/info``)."""
    with authenticated(request) as call:
        aoi = p.text("aoi")
        if aoi is not None:
            authorize(call.user, aoi)
        visible = [
            ds
            for ds in call.state.datasets.all(call.cur)
            if call.user.can_see(ds.aoi) and (aoi is None or ds.aoi == aoi)
        ]
        if aoi is not None and not visible:
            raise NotFoundError(f"no dataset {aoi}")
        base = str(request.base_url).rstrip("/")
        return ApiJSONResponse(queries.info(call.cur, visible, base, call.state.settings.server_title))


def parcel_by_id(request: Request, p: Params) -> Response:
    """One parcel by its user-facing id; 404 when there is none (JRC answered empty lists)."""
    with authenticated(request) as call:
        aoi, year, pid, ptype = p.required_text("aoi"), p.integer("year"), p.required_text("pid"), p.text("ptype")
        with_geometry, wgs84 = _geometry_flags(p)
        ds = _dataset(call, aoi, year)
        table = queries.parcel_table(call.cur, ds, ptype)
        return ApiJSONResponse(queries.parcel_by_id(call.cur, table, pid, with_geometry=with_geometry, wgs84=wgs84))


def parcel_by_location(request: Request, p: Params) -> Response:
    """Every parcel that intersects a WGS84 point; none is an empty result, not a 404."""
    with authenticated(request) as call:
        aoi, year, ptype = p.required_text("aoi"), p.integer("year"), p.text("ptype")
        lon, lat = p.number("lon"), p.number("lat")
        with_geometry, wgs84 = _geometry_flags(p)
        ds = _dataset(call, aoi, year)
        table = queries.parcel_table(call.cur, ds, ptype)
        cols = queries.parcels_by_location(
            call.cur, ds, table, lon, lat, with_geometry=with_geometry, wgs84=wgs84, limit=call.state.polygon_limit
        )
        return ApiJSONResponse(cols)


def parcels_by_polygon(request: Request, p: Params) -> Response:
    """Parcels intersecting an area, at most ``limit`` (configured cap, default 100), by key.

    The area is the JRC ``polygon=lon_lat-lon_lat-...`` (no negative coordinates possible), or,
    as an extension, ``geojson=`` or ``wkt=`` in EPSG:4326.
    """
    with authenticated(request) as call:
        aoi, year, ptype = p.required_text("aoi"), p.integer("year"), p.text("ptype")
        area = p.area_geometry()
        only_ids = p.boolean("only_ids")
        with_geometry, wgs84 = _geometry_flags(p)
        cap = call.state.polygon_limit
        limit = min(p.integer("limit", default=cap), cap)
        ds = _dataset(call, aoi, year)
        table = queries.parcel_table(call.cur, ds, ptype)
        cols = queries.parcels_by_polygon(
            call.cur,
            ds,
            table,
            psycopg2.Binary(shapely.to_wkb(area)),
            only_ids=only_ids,
            with_geometry=with_geometry,
            wgs84=wgs84,
            limit=limit,
        )
        return ApiJSONResponse(cols)


def parcel_peers(request: Request, p: Params) -> Response:
    """Nearest parcels with the same crop name (``max`` capped at 10 000).

    ``min_area`` (m², default 0) replaces JRC's hard-coded 3000 m² floor.
    """
    with authenticated(request) as call:
        aoi, year, pid, ptype = p.required_text("aoi"), p.integer("year"), p.required_text("pid"), p.text("ptype")
        distance = p.number("distance")
        max_peers = min(p.integer("max"), MAX_PEERS)
        min_area = p.number("min_area")
        ds = _dataset(call, aoi, year)
        table = queries.parcel_table(call.cur, ds, ptype)
        cols = queries.parcel_peers(call.cur, ds, table, pid, distance=distance, max_peers=max_peers, min_area=min_area)
        return ApiJSONResponse(cols)


def _csv_response(cols: dict[str, list[Any]], filename: str) -> Response:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols.keys())
    for row in zip(*cols.values(), strict=True):
        writer.writerow(
            json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else ("" if v is None else v) for v in row
        )
    return Response(
        buf.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@dataclass(frozen=True)
class _SeriesQuery:
    aoi: str
    year: int
    pid: str
    ptype: str | None
    tstype: str
    bands: list[str] | None
    scl: bool
    ref: bool
    tsformat: str


def _series_query(p: Params) -> _SeriesQuery:
    aoi, year, pid, ptype = p.required_text("aoi"), p.integer("year"), p.required_text("pid"), p.text("ptype")
    tstype, tsformat = p.choice("tstype") or "s2", p.choice("tsformat") or "json"
    bands = p.bands("band", skip_empty=False) or None
    scl = p.boolean("scl") and tstype == "s2"
    ref = p.boolean("ref")
    return _SeriesQuery(aoi, year, pid, ptype, tstype, bands, scl, ref, tsformat)


async def series_fast(request: Request, p: Params) -> Response | None:
    """The common ``parcelTimeSeries`` request (password login, JSON, no ptype) in one database
    round trip, on the event loop (api/aiodb.py).

    User row, grants, parcel key and the series body come back from one prepared statement (the
    series is only computed when the grant holds), so the route costs one round trip instead of
    four. The checks then run in Python in the usual order (401, 403, 404), on the same data the
    separate queries would have read: a revoke or password change still takes effect on the next
    request. None sends the request down the general path (in the thread pool): a token, a
    malformed parameter, an unknown dataset or a stale dataset cache, CSV, ptype, ``scl`` series,
    and a password not verified recently (argon2 must not run on the event loop).
    """
    try:
        q = _series_query(p)
    except InvalidInputError:
        return None  # reported after authentication, by the general path
    creds = password_credentials(request.headers.get("authorization"))
    if creds is None or q.ptype or q.tstype == "scl" or q.tsformat != "json":
        return None
    state = state_of(request)
    try:
        check_transport(request, state.settings)
        state.throttle.check(creds[0], client_address(request))
    except (InsecureTransportError, TooManyAttemptsError):
        return None  # the general path answers 403 / 429
    ds = state.datasets.fresh(q.aoi, q.year)
    if ds is None:
        return None  # the general path reads the datasets table and tells 401, 403 and 404 apart
    async with state.aio.connection() as conn:
        cur = conn.cursor()
        await prepared.execute_async(
            cur,
            ("series_for_user", ds, bool(q.bands), q.scl, q.ref),
            lambda: queries.series_for_user_sql(ds, bands=q.bands, scl=q.scl, ref=q.ref),
            {"user": creds[0], "aoi": q.aoi, "pid": q.pid, "card": queries.CARDS[q.tstype], "bands": q.bands or []},
            aiodb.wait,
        )
        row = cur.fetchone()
    user = state.auth.cached_user(creds[0], creds[1], row[:4] if row is not None else None)
    if user is None:
        return None
    request.state.user = user
    authorize(user, q.aoi)
    if row[4] is None:
        raise NotFoundError("no such parcel")
    return Response(str(row[5]).encode("utf-8"), media_type="application/json")


def parcel_time_series(request: Request, p: Params) -> Response:
    """Per-scene, per-band statistics of one parcel (JRC ``parcelTimeSeries``).

    ``date_part`` is named explicitly (the JRC client reads it; PostgreSQL ≥ 14 would call it
    ``extract``). With ``scl`` (default for s2, forced off for bs/c6) each row carries its
    scene's SCL histogram; rows without one are kept with ``hist`` ``{}`` (JRC dropped them).
    """
    with authenticated(request) as call:
        q = _series_query(p)
        ds = _dataset(call, q.aoi, q.year)
        table = queries.parcel_table(call.cur, ds, q.ptype)
        pk = queries.parcel_pk(call.cur, table, q.pid)
        bands, scl, ref = q.bands, q.scl, q.ref
        if q.tstype != "scl" and q.tsformat == "json":
            body = queries.time_series_json(call.cur, ds, pk, queries.CARDS[q.tstype], bands=bands, scl=scl, ref=ref)
            return Response(body, media_type="application/json")
        if q.tstype == "scl":
            cols = queries.scl_series(call.cur, ds, pk)
        else:
            cols = queries.time_series(call.cur, ds, pk, queries.CARDS[q.tstype], bands=bands, scl=scl, ref=ref)
        if q.tsformat == "csv":
            safe_pid = re.sub(r"[^A-Za-z0-9._-]", "_", q.pid)
            return _csv_response(cols, f"{ds.aoi}_{ds.year}_{safe_pid}_time_series_{q.tstype}.csv")
        return ApiJSONResponse(cols)


def health(request: Request, p: Params) -> Response:
    """Liveness for load balancers: unauthenticated, touches no dataset, only checks the pool."""
    with state_of(request).pool.cursor(wait_s=5.0) as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return ApiJSONResponse({"status": "ok"})


def routes() -> list[Endpoint]:
    """The JRC router: ``/query/*`` as the ``cbm`` client calls them, and the liveness probe."""

    def jrc(path: str, handler: Any, summary: str, params: tuple[Param, ...], content: dict[str, Any]) -> Endpoint:
        return Endpoint(f"/query/{path}", handler, summary, content, params, tag="jrc")

    columns = json_content(COLUMNS)
    return [
        Endpoint(
            "/health", health, "liveness (no credentials)", json_content(OBJECT), auth=False, found=False, tag="ops"
        ),
        jrc("info", info, "datasets visible to the caller (JRC)", INFO, json_content(OBJECT)),
        jrc("parcelByID", parcel_by_id, "one parcel (JRC)", PARCEL_BY_ID, columns),
        jrc("parcelByLocation", parcel_by_location, "parcels at a WGS84 point (JRC)", PARCEL_BY_LOCATION, columns),
        jrc(
            "parcelsByPolygon",
            parcels_by_polygon,
            "parcels intersecting an area; exactly one of polygon, geojson, wkt (JRC + extension)",
            PARCELS_BY_POLYGON,
            columns,
        ),
        jrc("parcelPeers", parcel_peers, "nearest parcels with the same crop (JRC)", PARCEL_PEERS, columns),
        Endpoint(
            "/query/parcelTimeSeries",
            parcel_time_series,
            "per-scene band statistics of a parcel; key date_part = epoch seconds (JRC)",
            {**columns, "text/csv": {"schema": STR}},
            TIME_SERIES,
            tag="jrc",
            fast=series_fast,
        ),
    ]
