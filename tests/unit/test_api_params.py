"""Parameter declarations, without a server: the parser enforces what each ``Param`` declares, and
the OpenAPI document (built here without an app running) shows those same declarations."""

from __future__ import annotations

from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from openapi_spec_validator import validate
from starlette.datastructures import QueryParams

from api import routes, v1
from api.app import create_app, endpoints
from api.auth import AOI_PATTERN, AOI_RE
from api.openapi import document
from api.params import AOI, PATH_AOI, PATH_YEAR, PTYPE, YEAR, Param, Params
from cbmflow.errors import InvalidInputError


def _p(query: str, spec: tuple[Param, ...], path: dict[str, Any] | None = None) -> Params:
    return Params(QueryParams(query), spec, path)


def _rejects(fn: Any, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        fn()
    assert message in str(info.value), str(info.value)


def test_declared_rules_are_enforced() -> None:
    p = _p("aoi=%20MS%20&year=2024&ptype=b", (AOI, YEAR, PTYPE))
    assert (p.required_text("aoi"), p.integer("year"), p.text("ptype")) == ("ms", 2024, "b")
    _rejects(lambda: _p("year=1989", (YEAR,)).integer("year"), "parameter 'year' must be between 1990 and 2100")
    _rejects(lambda: _p("", (YEAR,)).integer("year"), "parameter 'year' is required")
    _rejects(lambda: _p("aoi=m-s", (AOI,)).text("aoi"), "parameter 'aoi' must be a dataset name")
    _rejects(lambda: _p("aoi=" + "a" * 32, (AOI,)).text("aoi"), "longer than 31 characters")
    _rejects(lambda: _p("ptype=B", (PTYPE,)).text("ptype"), "1 to 3 lower-case letters or digits")
    _rejects(lambda: _p("ptype=a&ptype=b", (PTYPE,)).text("ptype"), "given more than once")
    _rejects(lambda: _p("ptype=a%01", (PTYPE,)).text("ptype"), "control characters")


def test_enums_defaults_and_booleans() -> None:
    spec = routes.TIME_SERIES
    assert _p("", spec).choice("tstype") == "s2" and _p("tstype=BS", spec).choice("tstype") == "bs"
    _rejects(lambda: _p("tstype=zz", spec).choice("tstype"), "must be one of s2, bs, c6, scl")
    assert _p("", spec).boolean("scl") is True and _p("scl=False", spec).boolean("scl") is False
    _rejects(lambda: _p("scl=maybe", spec).boolean("scl"), "must be True or False")
    assert _p("band=b4,B08,b04", spec).bands("band", skip_empty=False) == ["B04", "B08"]
    _rejects(lambda: _p("band=B04,", spec).bands("band", skip_empty=False), "band names")
    assert _p("bands=B04,", v1.TIMESERIES).bands("bands") == ["B04"]  # /api/v1 skips empty items
    peers = routes.PARCEL_PEERS
    assert (_p("", peers).number("distance"), _p("", peers).integer("max")) == (1000.0, 10)
    _rejects(lambda: _p("distance=nan", peers).number("distance"), "must be between 0 and 100000")
    assert _p("limit=7", routes.PARCELS_BY_POLYGON).integer("limit", default=3) == 7
    assert _p("", routes.PARCELS_BY_POLYGON).integer("limit", default=3) == 3


def test_path_segments_are_parsed_by_the_same_declarations() -> None:
    p = _p("", (PATH_AOI, PATH_YEAR), {"aoi": "MS", "year": "2024"})
    assert (p.required_text("aoi"), p.integer("year")) == ("ms", 2024)
    bad = _p("", (PATH_AOI, PATH_YEAR), {"aoi": "1x", "year": "twenty"})
    _rejects(lambda: bad.required_text("aoi"), "path segment 'aoi' must be a dataset name")
    _rejects(lambda: bad.integer("year"), "path segment 'year' must be an integer")


def test_reading_an_undeclared_parameter_is_a_programming_error() -> None:
    with pytest.raises(AssertionError, match="not declared"):
        _p("pid=P-1", (YEAR,)).text("pid")


def test_document_is_valid_and_lists_exactly_the_routes() -> None:
    doc = document(endpoints())
    validate(doc)
    app = create_app("postgresql://nowhere.invalid/db")  # building an app opens no connection
    assert set(doc["paths"]) == {r.path for r in app.routes}  # type: ignore[attr-defined]


def test_document_shows_the_parsers_declarations() -> None:
    doc = document(endpoints())
    for endpoint in endpoints():
        params = doc["paths"][endpoint.path]["get"]["parameters"]
        assert params == [param.openapi() for param in endpoint.params]
        for param, shown in zip(endpoint.params, params, strict=True):
            if param.default is not None:  # a default the parser uses is a value the schema accepts
                jsonschema.validate(shown["schema"]["default"], shown["schema"])
            if param.name == "aoi":
                assert shown["schema"]["pattern"] == AOI_PATTERN
    assert AOI_RE.pattern == AOI_PATTERN
    info = doc["paths"]["/query/parcelTimeSeries"]["get"]
    assert {p["name"] for p in info["parameters"]} >= {"aoi", "year", "pid", "tstype", "band", "scl", "tsformat"}
    assert set(info["responses"]) == {"200", "400", "401", "403", "404", "429", "503"}  # 429: login throttle
    chip = doc["paths"]["/chips/{token}/{name}"]["get"]
    assert chip["security"] == [] and "401" not in chip["responses"]
