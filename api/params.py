"""Typed query-parameter parsing: every value is checked before it can reach SQL.

The JRC API took parameters verbatim into f-string SQL; here each one is parsed into a Python
type (and range-checked) or rejected with InvalidInputError (HTTP 400). Values only ever travel
to PostgreSQL as bound parameters; the single parameter that selects a table (``ptype``) is
restricted to a short lower-case suffix and checked against the catalogue before use.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import shapely
import shapely.geometry
from shapely.errors import GEOSException, ShapelyError
from shapely.geometry.base import BaseGeometry
from starlette.datastructures import QueryParams

from api.auth import AOI_RE
from cbmflow.errors import InvalidInputError

PTYPE_RE = re.compile(r"^[a-z0-9]{1,3}$")
BAND_RE = re.compile(r"^[A-Za-z0-9]{1,16}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

TRUE_WORDS = frozenset({"true", "1"})
FALSE_WORDS = frozenset({"false", "0"})

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


class Params:
    """Accessors over one request's query string; each raises InvalidInputError on bad input."""

    def __init__(self, query: QueryParams) -> None:
        self._query = query

    def replaced(self, **values: str) -> Params:
        """The same parameters with some replaced (a route that runs one query twice, differently)."""
        items = [(k, v) for k, v in self._query.multi_items() if k not in values]
        return Params(QueryParams([*items, *values.items()]))

    def raw(self, name: str) -> str | None:
        values = self._query.getlist(name)
        if not values:
            return None
        if len(values) > 1:
            raise InvalidInputError(f"parameter {name!r} given more than once")
        value = values[0]
        if _CONTROL_RE.search(value):
            raise InvalidInputError(f"parameter {name!r} contains control characters")
        return value

    def text(self, name: str, *, required: bool = False, max_len: int = 100) -> str | None:
        value = self.raw(name)
        if value is None or value == "":
            if required:
                raise InvalidInputError(f"parameter {name!r} is required")
            return None
        if len(value) > max_len:
            raise InvalidInputError(f"parameter {name!r} is longer than {max_len} characters")
        return value

    def required_text(self, name: str, *, max_len: int = 100) -> str:
        value = self.text(name, required=True, max_len=max_len)
        assert value is not None
        return value

    def _parsed(self, name: str, default: float | None, cast: type[int] | type[float], what: str) -> float:
        """The parameter converted by ``cast``, or ``default``; missing without a default is a 400."""
        value = self.raw(name)
        if value is None or value.strip() == "":
            if default is None:
                raise InvalidInputError(f"parameter {name!r} is required")
            return default
        try:
            return cast(value.strip())
        except ValueError as exc:
            raise InvalidInputError(f"parameter {name!r} must be {what}") from exc

    def integer(self, name: str, *, default: int | None = None, lo: int, hi: int) -> int:
        number = int(self._parsed(name, default, int, "an integer"))
        if not lo <= number <= hi:
            raise InvalidInputError(f"parameter {name!r} must be between {lo} and {hi}")
        return number

    def number(self, name: str, *, default: float | None = None, lo: float, hi: float) -> float:
        number = float(self._parsed(name, default, float, "a number"))
        if not math.isfinite(number) or not lo <= number <= hi:
            raise InvalidInputError(f"parameter {name!r} must be between {lo:g} and {hi:g}")
        return number

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.raw(name)
        if value is None or value == "":
            return default
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise InvalidInputError(f"parameter {name!r} must be True or False")

    def aoi(self) -> str:
        value = self.optional_aoi()
        if value is None:
            raise InvalidInputError("parameter 'aoi' is required")
        return value

    def optional_aoi(self) -> str | None:
        value = self.text("aoi", max_len=31)
        if value is None:
            return None
        # JRC compared aoi.lower() against the grants; dataset names are lower case.
        value = value.strip().lower()
        if not AOI_RE.match(value):
            raise InvalidInputError("parameter 'aoi' must be a dataset name (lower-case letters, digits, _)")
        return value

    def year(self) -> int:
        return self.integer("year", lo=1990, hi=2100)

    def pid(self) -> str:
        return self.required_text("pid", max_len=100)

    def ptype(self) -> str | None:
        value = self.text("ptype", max_len=3)
        if value is None:
            return None
        if not PTYPE_RE.match(value):
            raise InvalidInputError("parameter 'ptype' must be 1 to 3 lower-case letters or digits")
        return value

    def bands(self) -> list[str] | None:
        """Band filter; a comma-separated list is accepted (extension), legacy JRC names mapped."""
        value = self.text("band", max_len=200)
        if value is None:
            return None
        out: list[str] = []
        for part in value.split(","):
            name = part.strip()
            if not BAND_RE.match(name):
                raise InvalidInputError("parameter 'band' must be band names such as B04 or B04,B08")
            canonical = BAND_ALIASES.get(name.upper(), name)
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
        given = {
            name: value
            for name in ("polygon", "geojson", "wkt")
            if (value := self.text(name, max_len=1_000_000)) is not None
        }
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
