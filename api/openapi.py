"""The OpenAPI 3.0 document served at ``/api/v1/openapi.json``.

Written by hand next to the routes rather than generated from docstrings, because JRC's generated
spec drifted from its routes; ``tests/test_openapi.py`` keeps this one honest by checking that it
names exactly the app's routes and by fuzzing every operation with schemathesis against it.
"""

from __future__ import annotations

from typing import Any

from api.v1 import DEFAULT_SCL_MASK, INDICES
from cbmflow.vocab import SCENE_STATUSES

JSON = "application/json"


def _p(name: str, schema: dict[str, Any], *, required: bool = False, where: str = "query", desc: str = "") -> Any:
    out: dict[str, Any] = {"name": name, "in": where, "required": required or where == "path", "schema": schema}
    if desc:
        out["description"] = desc
    return out


STR = {"type": "string"}
BOOL = {"type": "string", "enum": ["True", "False", "true", "false", "1", "0"]}
AOI = _p("aoi", {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,30}$"}, required=True)
YEAR = _p("year", {"type": "integer", "minimum": 1990, "maximum": 2100}, required=True)
PID = _p(
    "pid",
    {"type": "string", "minLength": 1, "maxLength": 100, "pattern": "^[^\\x00-\\x1f\\x7f]+$"},
    required=True,
    desc="user-facing parcel id",
)
PTYPE = _p("ptype", {"type": "string", "pattern": "^[a-z0-9]{1,3}$"}, desc="parcel table variant suffix")
PATH_AOI = _p("aoi", {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,30}$"}, where="path")
PATH_YEAR = _p("year", {"type": "integer", "minimum": 1990, "maximum": 2100}, where="path")
DATE = {"type": "string", "format": "date"}
FROM = _p("from", DATE, desc="first day (UTC), or an ISO 8601 date-time")
TO = _p("to", DATE, desc="last day included (UTC), or an ISO 8601 date-time")
BANDS = _p("bands", {"type": "string", "pattern": "^[A-Za-z0-9]{1,16}(,[A-Za-z0-9]{1,16})*$"}, desc="e.g. B04,B08")
COLUMNS = {"type": "object", "additionalProperties": {"type": "array"}, "description": "column name → list of values"}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
NULLNUM = {"type": "number", "nullable": True}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _op(
    summary: str,
    params: list[Any],
    ok: dict[str, Any],
    *,
    auth: bool = True,
    found: bool = True,
    tag: str = "v1",
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "success", "content": ok}}
    if params:
        responses["400"] = _err("a parameter is missing or invalid")
    if auth:
        responses["401"] = _err("missing or wrong credentials (with WWW-Authenticate)")
        responses["403"] = _err("the dataset is not granted to the caller")
    if found:
        responses["404"] = _err("unknown dataset, parcel or parcel type")
    responses["503"] = _err("database unavailable or query timeout")
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "parameters": params, "responses": responses}
    if not auth:
        op["security"] = []
    return {"get": op}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


OBS = {
    "type": "object",
    "properties": {
        "acquired": {"type": "string", "format": "date-time"},
        "scene_id": {"type": "integer"},
        "band": STR,
        "count": {"type": "integer"},
        **{k: NULLNUM for k in ("mean", "std", "min", "p25", "p50", "p75", "max")},
    },
}
INDEX_OBS = {
    "type": "object",
    "properties": {
        "acquired": {"type": "string", "format": "date-time"},
        "scene_id": {"type": "integer"},
        "value": NULLNUM,
        "cloud": NULLNUM,
    },
}
INDEX_PARAMS = [
    _p("index", {"type": "string", "enum": [*INDICES, "nd"]}, desc="nd: give two bands in 'bands'"),
    BANDS,
    _p("max_cloud", {"type": "number", "minimum": 0, "maximum": 1}, desc="largest masked fraction kept (0.1)"),
    _p(
        "mask",
        {"type": "string", "pattern": "^([0-9]|1[01])(,([0-9]|1[01]))*$"},
        desc="SCL classes counted as masked, default " + ",".join(map(str, DEFAULT_SCL_MASK)),
    ),
    FROM,
    TO,
]


CHIP_WHERE = [
    _p("lon", {"type": "number", "minimum": -180, "maximum": 180}, required=True),
    _p("lat", {"type": "number", "minimum": -90, "maximum": 90}, required=True),
    _p("start_date", DATE, required=True, desc="first day (UTC)"),
    _p("end_date", DATE, required=True, desc="last day included (UTC)"),
]
BAND1 = {"type": "string", "pattern": "^[A-Za-z0-9]{2,3}$"}
CHIPSIZE = _p("chipsize", {"type": "number", "minimum": 10, "maximum": 10240}, desc="side in metres (1280)")
PLEVEL = _p("plevel", {"type": "string", "enum": ["LEVEL2A"]})


def document(server_url: str = "") -> dict[str, Any]:
    geometry = [_p("withGeometry", BOOL), _p("wgs84", BOOL)]
    paths: dict[str, Any] = {
        "/query/info": _op(
            "datasets visible to the caller (JRC)", [_p("aoi", AOI["schema"])], _json({"type": "object"}), tag="jrc"
        ),
        "/query/parcelByID": _op("one parcel (JRC)", [AOI, YEAR, PID, PTYPE, *geometry], _json(COLUMNS), tag="jrc"),
        "/query/parcelByLocation": _op(
            "parcels at a WGS84 point (JRC)",
            [
                AOI,
                YEAR,
                _p("lon", {"type": "number", "minimum": -180, "maximum": 180}, required=True),
                _p("lat", {"type": "number", "minimum": -90, "maximum": 90}, required=True),
                PTYPE,
                *geometry,
            ],
            _json(COLUMNS),
            tag="jrc",
        ),
        "/query/parcelsByPolygon": _op(
            "parcels intersecting an area; exactly one of polygon, geojson, wkt (JRC + extension)",
            [
                AOI,
                YEAR,
                _p("polygon", STR, desc="JRC encoding lon_lat-lon_lat-..."),
                _p("geojson", STR, desc="RFC 7946 Polygon/MultiPolygon (or Feature), EPSG:4326"),
                _p("wkt", STR, desc="POLYGON/MULTIPOLYGON, lon lat"),
                _p("only_ids", BOOL),
                _p("limit", {"type": "integer", "minimum": 1}),
                PTYPE,
                *geometry,
            ],
            _json(COLUMNS),
            tag="jrc",
        ),
        "/query/parcelPeers": _op(
            "nearest parcels with the same crop (JRC)",
            [
                AOI,
                YEAR,
                PID,
                PTYPE,
                _p("distance", {"type": "number", "minimum": 0, "maximum": 100000}),
                _p("max", {"type": "integer", "minimum": 1}),
                _p("min_area", {"type": "number", "minimum": 0}),
            ],
            _json(COLUMNS),
            tag="jrc",
        ),
        "/query/parcelTimeSeries": _op(
            "per-scene band statistics of a parcel; key date_part = epoch seconds (JRC)",
            [
                AOI,
                YEAR,
                PID,
                PTYPE,
                _p("tstype", {"type": "string", "enum": ["s2", "bs", "c6", "scl"]}),
                _p("band", {"type": "string", "pattern": "^[A-Za-z0-9]{1,16}(,[A-Za-z0-9]{1,16})*$"}),
                _p("scl", BOOL),
                _p("ref", BOOL),
                _p("tsformat", {"type": "string", "enum": ["json", "csv"]}),
            ],
            {**_json(COLUMNS), "text/csv": {"schema": STR}},
            tag="jrc",
        ),
        "/query/rawChipByLocation": _op(
            "Sentinel-2 GeoTIFF chips around a point: signed, expiring chip URLs, or product ids (JRC)",
            [*CHIP_WHERE, _p("band", BAND1), CHIPSIZE, PLEVEL, _p("onlylist", BOOL)],
            _json(
                {
                    "type": "object",
                    "required": ["chips"],
                    "properties": {
                        "dates": {"type": "array", "items": {"type": "string", "pattern": "^\\d{8}T\\d{6}$"}},
                        "chips": {"type": "array", "items": STR},
                    },
                }
            ),
            found=False,
            tag="jrc",
        ),
        "/query/chipsByLocation": _op(
            "HTML page of 128 px RGB PNG chips (1280 m) around a point (JRC)",
            [
                *CHIP_WHERE,
                _p("lut", {"type": "string", "pattern": "^\\d{1,2}_\\d{1,3}$"}, desc="percentile stretch, 5_95"),
                _p("bands", {"type": "string", "pattern": "^[A-Za-z0-9]{2,3}_[A-Za-z0-9]{2,3}_[A-Za-z0-9]{2,3}$"}),
                PLEVEL,
            ],
            {"text/html": {"schema": STR}},
            found=False,
            tag="jrc",
        ),
        "/chips/{token}/{name}": _op(
            "one chip by its signed URL from rawChipByLocation (no credentials: the token is one)",
            [_p("token", STR, where="path"), _p("name", STR, where="path")],
            {"image/tiff": {"schema": {"type": "string", "format": "binary"}}},
            auth=False,
            tag="jrc",
        ),
        "/health": _op("liveness (no credentials)", [], _json({"type": "object"}), auth=False, found=False, tag="ops"),
        "/healthz": _op(
            "readiness (no credentials)", [], _json({"type": "object"}), auth=False, found=False, tag="ops"
        ),
        "/metrics": _op(
            "Prometheus metrics (no credentials; route templates only)",
            [],
            {"text/plain": {"schema": STR}},
            auth=False,
            found=False,
            tag="ops",
        ),
        "/api/v1/openapi.json": _op("this document", [], _json({"type": "object"}), auth=False, found=False),
        "/api/v1/datasets": _op(
            "datasets granted to the caller",
            [],
            _json(
                {
                    "type": "object",
                    "properties": {
                        "datasets": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "aoi": STR,
                                    "year": {"type": "integer"},
                                    "srid": {"type": "integer"},
                                    "description": STR,
                                },
                            },
                        }
                    },
                }
            ),
            found=False,
        ),
        "/api/v1/datasets/{aoi}/{year}/parcel": _op(
            "one parcel as a GeoJSON Feature in WGS84",
            [PATH_AOI, PATH_YEAR, PID, PTYPE],
            {"application/geo+json": {"schema": {"type": "object", "required": ["type", "geometry", "properties"]}}},
        ),
        "/api/v1/datasets/{aoi}/{year}/timeseries": _op(
            "band statistics per scene, by period and bands",
            [
                PATH_AOI,
                PATH_YEAR,
                PID,
                PTYPE,
                _p("card", {"type": "string", "enum": ["s2", "bs", "c6"]}),
                BANDS,
                FROM,
                TO,
                _p("format", {"type": "string", "enum": ["json", "csv", "parquet"]}),
            ],
            {
                **_json({"type": "object", "properties": {"observations": {"type": "array", "items": OBS}}}),
                "text/csv": {"schema": STR},
                "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
            },
        ),
        "/api/v1/datasets/{aoi}/{year}/index": _op(
            "a normalised difference (NDVI, ...) per clear scene; SCL cloud filtering on the server",
            [
                PATH_AOI,
                PATH_YEAR,
                PID,
                PTYPE,
                *INDEX_PARAMS,
                _p("format", {"type": "string", "enum": ["json", "csv"]}),
            ],
            {
                **_json(
                    {
                        "type": "object",
                        "properties": {
                            "dropped": {"type": "integer"},
                            "observations": {"type": "array", "items": INDEX_OBS},
                        },
                    }
                ),
                "text/csv": {"schema": STR},
            },
        ),
        "/api/v1/datasets/{aoi}/{year}/plot.png": _op(
            "PNG plot of the parcel's index series",
            [PATH_AOI, PATH_YEAR, PID, PTYPE, *INDEX_PARAMS],
            {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        ),
        "/api/v1/scenes": _op(
            "scene catalogue with processing status, over the caller's datasets",
            [
                _p("aoi", {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,30}$"}),
                _p("status", {"type": "string", "enum": list(SCENE_STATUSES)}),
                _p("card", {"type": "string", "enum": ["s2", "bs", "c6"]}),
                FROM,
                TO,
                _p("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                _p("offset", {"type": "integer", "minimum": 0, "maximum": 10_000_000}),
            ],
            _json({"type": "object", "properties": {"scenes": {"type": "array", "items": {"type": "object"}}}}),
        ),
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "cbmflow API",
            "version": "1",
            "description": "JRC CbM-compatible /query routes and the versioned /api/v1 routes. Errors are"
            ' {"error": {"code", "message"}}.',
        },
        "servers": [{"url": server_url or "/"}],
        "security": [{"basic": []}, {"bearer": []}],
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer", "description": "token from `cbmflow users token`"},
            },
            "schemas": {"Error": ERROR},
        },
        "paths": paths,
    }
