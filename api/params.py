"""Query parameters, declared once per route: the parser and the OpenAPI document both read them.

The JRC API took parameters verbatim into f-string SQL; here each one is parsed into a Python
type (and range-checked) or rejected with InvalidInputError (HTTP 400). Values only ever travel
to PostgreSQL as bound parameters; the single parameter that selects a table (``ptype``) is
restricted to a short lower-case suffix and checked against the catalogue before use.

A route lists its :class:`Param` declarations (name, type, required, default, enum or pattern,
range, description); ``api.openapi`` renders the same objects, and :class:`Params` refuses to
read a name the route did not declare, so the document cannot silently drift from the parser.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import shapely
import shapely.geometry
from shapely.errors import GEOSException, ShapelyError
from shapely.geometry.base import BaseGeometry
from starlette.datastructures import QueryParams

from api.auth import AOI_PATTERN
from cbmflow.errors import InvalidInputError

PTYPE_PATTERN = r"^[a-z0-9]{1,3}$"
PTYPE_RE = re.compile(PTYPE_PATTERN)
BAND_RE = re.compile(r"^[A-Za-z0-9]{1,16}$")
BAND_LIST_PATTERN = r"^[A-Za-z0-9]{1,16}(,[A-Za-z0-9]{1,16})*$"
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

TRUE_WORDS = frozenset({"true", "1"})
FALSE_WORDS = frozenset({"false", "0"})
BOOLEAN_WORDS = ("True", "False", "true", "false", "1", "0")

# JRC band names (and the two-character names of its first extractor) → the names cbmflow stores.
_CANONICAL_BANDS = "B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B10 B11 B12 SCL VVb VHb VVc VHc".split()
BAND_ALIASES: dict[str, str] = {b.upper(): b for b in _CANONICAL_BANDS} | {
    "B1": "B01",
    "B2": "B02",
    "B3": "B03",
    "B4": "B04",
    "B5": "B05",
    "B6": "B06",
    "B7": "B07",
    "B8": "B08",
    "B9": "B09",
    "SC": "SCL",
}

MAX_POLYGON_VERTICES = 10_000


Kind = Literal["string", "integer", "number", "boolean", "date"]


@dataclass(frozen=True)
class Param:
    """One parameter of a route, as the parser checks it and the OpenAPI document shows it.

    ``pattern`` and ``enum`` are checked by :meth:`Params.text` and :meth:`Params.choice`; a
    parameter whose value is decoded further (band lists, areas, dates) keeps its pattern here
    for the document and is checked by its own decoder. ``hint`` completes the 400 message
    "parameter 'x' must be <hint>" when the pattern does not match; ``case`` folds the value
    before an enum is checked (JRC clients send ``S2``).
    """

    name: str
    type: Kind = "string"
    required: bool = False
    default: str | int | float | bool | None = None
    enum: tuple[str, ...] = ()
    pattern: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    max_len: int = 100
    min_len: int | None = None
    description: str = ""
    where: Literal["query", "path"] = "query"
    hint: str = ""
    case: Literal["lower", "upper", ""] = ""

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the value, as OpenAPI 3.0 writes it."""
        if self.type == "boolean":
            out: dict[str, Any] = {"type": "string", "enum": list(BOOLEAN_WORDS)}
            if isinstance(self.default, bool):
                out["default"] = str(self.default).lower()
            return out
        if self.type == "date":
            return {"type": "string", "format": "date"}
        out = {"type": self.type}
        if self.enum:
            out["enum"] = list(self.enum)
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.min_len is not None:
            out["minLength"] = self.min_len
        if self.type == "string" and not self.enum:
            out["maxLength"] = self.max_len
        for key, bound in (("minimum", self.minimum), ("maximum", self.maximum)):
            if bound is not None:
                out[key] = int(bound) if self.type == "integer" or float(bound).is_integer() else bound
        if self.default is not None:
            out["default"] = self.default
        return out

    def openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "in": self.where,
            "required": self.required or self.where == "path",
            "schema": self.schema(),
        }
        if self.description:
            out["description"] = self.description
        return out

    def label(self) -> str:
        return f"{'path segment' if self.where == 'path' else 'parameter'} {self.name!r}"


# Parameters shared by several routes.
AOI = Param(
    "aoi",
    required=True,
    pattern=AOI_PATTERN,
    max_len=31,
    case="lower",
    hint="a dataset name (lower-case letters, digits, _)",
)
OPTIONAL_AOI = Param("aoi", pattern=AOI_PATTERN, max_len=31, case="lower", hint=AOI.hint)
PATH_AOI = Param("aoi", where="path", pattern=AOI_PATTERN, max_len=31, case="lower", hint=AOI.hint)
YEAR = Param("year", "integer", required=True, minimum=1990, maximum=2100)
PATH_YEAR = Param("year", "integer", where="path", minimum=1990, maximum=2100)
PID = Param("pid", required=True, min_len=1, pattern=NO_CONTROL_PATTERN, description="user-facing parcel id")
PTYPE = Param(
    "ptype",
    pattern=PTYPE_PATTERN,
    max_len=3,
    hint="1 to 3 lower-case letters or digits",
    description="parcel table variant suffix",
)
LON = Param("lon", "number", required=True, minimum=-180, maximum=180)
LAT = Param("lat", "number", required=True, minimum=-90, maximum=90)


class Params:
    """Accessors over one request's parameters; each raises InvalidInputError on bad input.

    Only names the route declared can be read (anything else is a programming error, an
    AssertionError, so an undocumented parameter fails every request that reaches it, in tests).
    """

    def __init__(self, query: QueryParams, spec: Sequence[Param] = (), path: Mapping[str, Any] | None = None) -> None:
        self._query = query
        self._spec = {param.name: param for param in spec}
        self._path = path or {}

    def param(self, name: str) -> Param:
        declared = self._spec.get(name)
        assert declared is not None, f"parameter {name!r} is not declared for this route"
        return declared

    def replaced(self, **values: str) -> Params:
        """The same parameters with some replaced (a route that runs one query twice, differently)."""
        items = [(k, v) for k, v in self._query.multi_items() if k not in values]
        return Params(QueryParams([*items, *values.items()]), tuple(self._spec.values()), self._path)

    def raw(self, name: str) -> str | None:
        param = self.param(name)
        if param.where == "path":
            value = self._path.get(name)
            return None if value is None else str(value)
        values = self._query.getlist(name)
        if not values:
            return None
        if len(values) > 1:
            raise InvalidInputError(f"parameter {name!r} given more than once")
        value = values[0]
        if _CONTROL_RE.search(value):
            raise InvalidInputError(f"parameter {name!r} contains control characters")
        return value

    def text(self, name: str) -> str | None:
        """The value, length- and pattern-checked (after ``case``); None when absent or empty."""
        param = self.param(name)
        value = self.raw(name)
        if value is None or value == "":
            if param.required:
                raise InvalidInputError(f"{param.label()} is required")
            return None if param.default is None else str(param.default)
        if len(value) > param.max_len:
            raise InvalidInputError(f"{param.label()} is longer than {param.max_len} characters")
        if param.case:
            value = value.strip().lower() if param.case == "lower" else value.strip().upper()
        if param.pattern is not None and param.hint and not re.match(param.pattern, value):
            raise InvalidInputError(f"{param.label()} must be {param.hint}")
        return value

    def required_text(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise InvalidInputError(f"{self.param(name).label()} is required")
        return value

    def choice(self, name: str) -> str | None:
        """One of the declared ``enum`` values (or the default)."""
        param = self.param(name)
        value = self.text(name)
        if value is None:
            return None
        if value not in param.enum:
            raise InvalidInputError(f"{param.label()} must be {param.hint or 'one of ' + ', '.join(param.enum)}")
        return value

    def _parsed(self, param: Param, default: float | None, cast: type[int] | type[float], what: str) -> float:
        """The parameter converted by ``cast``, or ``default``; missing without a default is a 400."""
        value = self.raw(param.name)
        if value is None or value.strip() == "":
            if default is None:
                raise InvalidInputError(f"{param.label()} is required")
            return default
        try:
            return cast(value.strip())
        except ValueError as exc:
            raise InvalidInputError(f"{param.label()} must be {what}") from exc

    def integer(self, name: str, *, default: int | None = None) -> int:
        """The integer within the declared range; ``default`` overrides a declared one (a setting)."""
        param = self.param(name)
        fallback = default if default is not None else param.default
        assert fallback is None or isinstance(fallback, int)
        number = int(self._parsed(param, fallback, int, "an integer"))
        assert param.minimum is not None and param.maximum is not None
        lo, hi = int(param.minimum), int(param.maximum)
        if not lo <= number <= hi:
            raise InvalidInputError(f"{param.label()} must be between {lo} and {hi}")
        return number

    def number(self, name: str) -> float:
        param = self.param(name)
        fallback = param.default
        assert fallback is None or isinstance(fallback, int | float)
        number = float(self._parsed(param, fallback, float, "a number"))
        assert param.minimum is not None and param.maximum is not None
        lo, hi = float(param.minimum), float(param.maximum)
        if not math.isfinite(number) or not lo <= number <= hi:
            raise InvalidInputError(f"{param.label()} must be between {lo:g} and {hi:g}")
        return number

    def boolean(self, name: str) -> bool:
        param = self.param(name)
        value = self.raw(name)
        if value is None or value == "":
            return bool(param.default)
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise InvalidInputError(f"{param.label()} must be True or False")

    def bands(self, name: str, *, skip_empty: bool = True) -> list[str]:
        """A comma-separated band filter (extension), legacy JRC names mapped; [] when absent.

        The JRC route rejects an empty item (``B04,``) as it always did; /api/v1 skips it."""
        value = self.text(name)
        out: list[str] = []
        for part in value.split(",") if value else []:
            band = part.strip()
            if not band and skip_empty:
                continue
            if not BAND_RE.match(band):
                raise InvalidInputError(f"parameter {name!r} must be band names such as B04 or B04,B08")
            canonical = BAND_ALIASES.get(band.upper(), band)
            if canonical not in out:
                out.append(canonical)
        return out

    def area_geometry(self) -> BaseGeometry:
        """The search area of parcelsByPolygon, in EPSG:4326 (lon, lat).

        ``polygon`` is the JRC encoding (``lon_lat-lon_lat-...``), which cannot carry negative
        coordinates; ``geojson`` (an RFC 7946 Polygon/MultiPolygon geometry or Feature) and
        ``wkt`` (POLYGON/MULTIPOLYGON, lon lat order) are unambiguous alternatives. Exactly one
        of the three must be given.
        """
        given = {name: value for name in AREA_PARAMS if (value := self.text(name)) is not None}
        if len(given) != 1:
            raise InvalidInputError("give exactly one of the parameters 'polygon', 'geojson' or 'wkt'")
        ((name, value),) = given.items()
        if name == "polygon":
            geom: BaseGeometry = legacy_polygon(value)
        elif name == "geojson":
            geom = _from_geojson(value)
        else:
            geom = _from_wkt(value)
        return checked_area(geom, name)


AREA_PARAMS = ("polygon", "geojson", "wkt")


def legacy_polygon(text: str) -> shapely.Polygon:
    """Decode the JRC ``polygon`` parameter exactly as JRC did: ``_`` → space, ``-`` → comma."""
    ring = text.replace("_", " ").replace("-", ",")
    coords: list[tuple[float, float]] = []
    for pair in ring.split(","):
        parts = pair.split()
        if len(parts) != 2:
            raise InvalidInputError("parameter 'polygon' must look like lon_lat-lon_lat-lon_lat-...")
        try:
            lon, lat = float(parts[0]), float(parts[1])
        except ValueError as exc:
            raise InvalidInputError("parameter 'polygon' has a coordinate that is not a number") from exc
        if not (math.isfinite(lon) and math.isfinite(lat)):
            raise InvalidInputError("parameter 'polygon' has a coordinate that is not finite")
        coords.append((lon, lat))
    if len(coords) > 1 and coords[0] == coords[-1]:
        coords.pop()
    if len(coords) < 3:
        raise InvalidInputError("parameter 'polygon' needs at least three distinct vertices")
    if len(coords) > MAX_POLYGON_VERTICES:
        raise InvalidInputError(f"parameter 'polygon' has more than {MAX_POLYGON_VERTICES} vertices")
    try:
        return shapely.Polygon([*coords, coords[0]])
    except (ShapelyError, GEOSException, ValueError) as exc:
        raise InvalidInputError("parameter 'polygon' is not a polygon") from exc


def _from_geojson(text: str) -> BaseGeometry:
    try:
        doc: Any = json.loads(text)
    except ValueError as exc:
        raise InvalidInputError("parameter 'geojson' is not valid JSON") from exc
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        doc = doc.get("geometry")
    if not isinstance(doc, dict) or doc.get("type") not in ("Polygon", "MultiPolygon"):
        raise InvalidInputError("parameter 'geojson' must be a Polygon or MultiPolygon geometry (or such a Feature)")
    try:
        return shapely.geometry.shape(doc)
    except (ShapelyError, GEOSException, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise InvalidInputError("parameter 'geojson' has malformed coordinates") from exc


def _from_wkt(text: str) -> BaseGeometry:
    try:
        geom = shapely.from_wkt(text)
    except (ShapelyError, GEOSException, ValueError) as exc:
        raise InvalidInputError("parameter 'wkt' is not valid WKT") from exc
    if geom is None:
        raise InvalidInputError("parameter 'wkt' is empty")
    return geom


def checked_area(geom: BaseGeometry, name: str) -> BaseGeometry:
    """Reject what PostGIS would choke on or misread: wrong type, non-finite, out of range, invalid."""
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise InvalidInputError(f"parameter {name!r} must be a polygon or multipolygon")
    if geom.is_empty:
        raise InvalidInputError(f"parameter {name!r} is an empty geometry")
    if shapely.get_num_coordinates(geom) > MAX_POLYGON_VERTICES:
        raise InvalidInputError(f"parameter {name!r} has more than {MAX_POLYGON_VERTICES} vertices")
    if shapely.has_z(geom):
        geom = shapely.force_2d(geom)
    if not bool(np.isfinite(shapely.get_coordinates(geom)).all()):
        raise InvalidInputError(f"parameter {name!r} has non-finite coordinates")
    minx, miny, maxx, maxy = geom.bounds
    if minx < -180 or maxx > 180 or miny < -90 or maxy > 90:
        raise InvalidInputError(f"parameter {name!r} must be in longitude/latitude (EPSG:4326)")
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        raise InvalidInputError(f"parameter {name!r} is not a valid polygon: {reason}")
    return geom
