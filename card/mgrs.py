"""Sentinel-2 tile names ↔ their pixel grids, so that S1 CARD lands on the grid S2 already uses.

A Sentinel-2 tile is named after an MGRS 100 km square (``32UPU``: UTM zone 32, latitude band U,
column P, row U) but is not that square: it is 109.8 km wide, its upper-left corner is the
square's north-west corner moved outwards (west, north) onto the 60 m lattice of the UTM zone,
and it reaches 9.8 km past the square's east and south edges, so neighbours overlap. The lattice
is anchored at easting 0 and at the **equator** (true northing, also south of it), which is why
the corners are not round numbers. From real tile metadata (MTD_TL ``Geoposition`` and STAC
``proj:transform``; tests/unit/test_card_mgrs.py lists them):

* 32TPP (EPSG:32632): ULX 600000 (already on the lattice), ULY 4900020 (⌈4 900 000 / 60⌉·60);
* 39QTA (EPSG:32639): ULX 199980 (⌊200 000 / 60⌋·60), ULY 2100000;
* 53HNV (EPSG:32753): ULX 499980, ULY 6000040 — true northing −3 999 960 is on the lattice;
  ⌈6 000 000 / 60⌉·60 in false northing would have given 6 000 000;
* 33UWP (EPSG:32633): ULY 5400000 — a square edge already on the lattice stays. So 32UPU's real
  ULY is 5 400 000, not the 5 400 020 card/testworld.py assumes for its synthetic world.

MGRS letters (WGS84, the "AA" scheme): the column letter cycles through A–H, J–R, S–Z with the
zone number mod 3, eastings 100–800 km; the row letter repeats every 2 000 km of (false)
northing, A at 0 in odd zones and F at 0 in even ones. Which 2 000 km cycle a row letter means is
decided by the latitude band (8° each, C–X without I and O; X is 12°). The exceptions of Norway
(32V spans 3–12° E) and Svalbard (31X, 33X, 35X, 37X; no 32X, 34X, 36X) are kept.

A 100 km square that straddles a band boundary belongs to both bands, and so does its tile
(32TPU and 32UPU are the same grid; public S2 tile lists name both): :func:`tiles_intersecting`
returns both names then, and a caller that wants one output per grid dedupes on the GeoBox.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from affine import Affine
from pyproj import Transformer
from shapely import Polygon, box, segmentize
from shapely import transform as shapely_transform
from shapely.geometry.base import BaseGeometry

from card.geobox import GeoBox

TILE_SIZE_M = 109_800
"""Width and height of a Sentinel-2 tile (10 980 px at 10 m, 5 490 at 20 m, 1 830 at 60 m)."""
LATTICE_M = 60
"""Tile corners lie on this lattice of the UTM zone (the coarsest S2 band), from easting 0 and the equator."""
SQUARE_M = 100_000

BANDS = "CDEFGHJKLMNPQRSTUVWX"
COLUMN_SETS = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")
ROW_LETTERS = "ABCDEFGHJKLMNPQRSTUV"
FALSE_NORTHING_SOUTH_M = 10_000_000
ROW_CYCLE_M = 2_000_000

_NAME = re.compile(r"^T?(\d{1,2})([C-HJ-NP-X])([A-HJ-NP-Z])([A-HJ-NP-V])$")


@dataclass(frozen=True)
class Tile:
    """A Sentinel-2 tile: its name, UTM zone and hemisphere, and the 100 km MGRS square it extends."""

    name: str
    zone: int
    band: str
    square_east_m: int
    """West edge of the MGRS square (easting, m)."""
    square_north_m: int
    """South edge of the MGRS square (northing, m; false northing south of the equator)."""

    @property
    def south(self) -> bool:
        return self.band < "N"

    @property
    def epsg(self) -> int:
        return (32700 if self.south else 32600) + self.zone

    @property
    def ulx(self) -> int:
        return math.floor(self.square_east_m / LATTICE_M) * LATTICE_M

    @property
    def uly(self) -> int:
        top = self.square_north_m + SQUARE_M - (FALSE_NORTHING_SOUTH_M if self.south else 0)
        return math.ceil(top / LATTICE_M) * LATTICE_M + (FALSE_NORTHING_SOUTH_M if self.south else 0)

    def geobox(self, resolution_m: float = 10) -> GeoBox:
        n = TILE_SIZE_M / resolution_m
        if resolution_m <= 0 or abs(n - round(n)) > 1e-9:
            raise ValueError(f"resolution {resolution_m} m does not divide the {TILE_SIZE_M} m tile")
        size = round(n)
        return GeoBox(
            (size, size),
            Affine(float(resolution_m), 0.0, float(self.ulx), 0.0, -float(resolution_m), float(self.uly)),
            f"EPSG:{self.epsg}",
        )


def band_latitudes(band: str) -> tuple[float, float]:
    """South and north latitude of a latitude band (X is 72–84°)."""
    i = BANDS.index(band)
    south = -80.0 + 8.0 * i
    return south, 84.0 if band == "X" else south + 8.0


def zone_longitudes(zone: int, band: str) -> tuple[float, float] | None:
    """West and east longitude of a zone within a band, with Norway's and Svalbard's exceptions; None: no such cell."""
    west = -180.0 + 6.0 * (zone - 1)
    east = west + 6.0
    if band == "V" and zone == 31:
        east = 3.0
    elif band == "V" and zone == 32:
        west = 3.0
    elif band == "X" and 31 <= zone <= 37:
        return {31: (0.0, 9.0), 33: (9.0, 21.0), 35: (21.0, 33.0), 37: (33.0, 42.0)}.get(zone)
    return west, east


@lru_cache(maxsize=256)
def _to_utm(zone: int, south: bool) -> Transformer:
    return Transformer.from_crs("EPSG:4326", f"EPSG:{(32700 if south else 32600) + zone}", always_xy=True)


def _project(geom: BaseGeometry, transformer: Transformer) -> BaseGeometry:
    return shapely_transform(geom, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def _cell_utm(zone: int, band: str) -> Polygon | None:
    """The zone × band cell as a polygon in the zone's UTM coordinates (edges densified to 0.1°)."""
    lons = zone_longitudes(zone, band)
    if lons is None:
        return None
    lat0, lat1 = band_latitudes(band)
    cell = segmentize(box(lons[0], lat0, lons[1], lat1), 0.1)
    out: Polygon = _project(cell, _to_utm(zone, band < "N"))
    return out


def _meets(square: Polygon, cell: Polygon) -> bool:
    """Overlap with area: a square that only touches the cell (the equator, a zone edge) is not in it."""
    return bool(square.intersects(cell) and not square.touches(cell))


def _column_letter(zone: int, east_m: int) -> str | None:
    k = east_m // SQUARE_M
    return COLUMN_SETS[(zone - 1) % 3][k - 1] if 1 <= k <= 8 else None


def _row_letter(zone: int, north_m: int) -> str:
    return ROW_LETTERS[(north_m // SQUARE_M + (5 if zone % 2 == 0 else 0)) % 20]


def parse_tile(name: str) -> Tile:
    """``32UPU`` (or ``T32UPU``) → its zone, band and MGRS square; ValueError for a name that is no tile.

    The row letter repeats every 2 000 km; the cycle taken is the one whose square meets the
    latitude band (one at most: a band spans ≤ 1 340 km).
    """
    m = _NAME.match(name.strip().upper())
    if not m:
        raise ValueError(f"{name!r} is not a Sentinel-2 tile name (e.g. 32UPU)")
    zone, band, col, row = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if not 1 <= zone <= 60:
        raise ValueError(f"{name!r}: UTM zone {zone} is not in 1–60")
    columns = COLUMN_SETS[(zone - 1) % 3]
    if col not in columns:
        raise ValueError(f"{name!r}: column letter {col} is not used in zone {zone} (only {columns})")
    east = (columns.index(col) + 1) * SQUARE_M
    base = ((ROW_LETTERS.index(row) - (5 if zone % 2 == 0 else 0)) % 20) * SQUARE_M
    cell = _cell_utm(zone, band)
    if cell is None:
        raise ValueError(f"{name!r}: zone {zone} has no band {band} (Svalbard's exceptions)")
    lo, hi = cell.bounds[1], cell.bounds[3]
    candidates = [base + k * ROW_CYCLE_M for k in range(6)]
    for north in candidates:
        if north + SQUARE_M > lo and north < hi and _meets(box(east, north, east + SQUARE_M, north + SQUARE_M), cell):
            return Tile(f"{zone:02d}{band}{col}{row}", zone, band, east, north)
    raise ValueError(f"{name!r}: square {col}{row} does not meet zone {zone} band {band}")


def tile_geobox(name: str, resolution_m: float = 10) -> GeoBox:
    """The pixel grid of Sentinel-2 tile ``name`` at ``resolution_m`` (10, 20, 60 …): 109.8 km square, north-up."""
    return parse_tile(name).geobox(resolution_m)


def _as_lonlat_geometry(footprint: BaseGeometry | Sequence[tuple[float, float]]) -> BaseGeometry:
    if isinstance(footprint, BaseGeometry):
        return footprint
    points = [(float(x), float(y)) for x, y in footprint]
    if len(points) < 3:
        raise ValueError("a footprint needs at least three (lon, lat) points")
    return Polygon(points)


def _cells_near(lon0: float, lat0: float, lon1: float, lat1: float) -> Iterable[tuple[int, str]]:
    """Zone × band cells whose tiles may reach the box: tiles run up to ~110 km past their cell."""
    margin_lat = 1.1
    for band in BANDS:
        s, n = band_latitudes(band)
        if n < lat0 - margin_lat or s > lat1 + margin_lat:
            continue
        worst = max(abs(s), abs(n), abs(lat0), abs(lat1))
        margin_lon = min(180.0, 1.2 / max(math.cos(math.radians(min(worst, 89.0))), 1e-3))
        for zone in range(1, 61):
            lons = zone_longitudes(zone, band)
            if lons is None or lons[1] < lon0 - margin_lon or lons[0] > lon1 + margin_lon:
                continue
            yield zone, band


def tiles_intersecting(footprint_lonlat: BaseGeometry | Sequence[tuple[float, float]]) -> list[str]:
    """Names of the Sentinel-2 tiles whose 109.8 km extent meets a lon/lat footprint (sorted).

    ``footprint_lonlat`` is a shapely geometry or a ring of (lon, lat) points, e.g. a GRD's
    footprint from its manifest or STAC item; one that crosses ±180° (its longitudes jumping from
    179 to −179, as footprints are written) is unwrapped and split there. A tile exists
    for every MGRS square that meets its zone × band cell, so squares on a band boundary give two
    names for one grid (see the module note).
    """
    geom = _as_lonlat_geometry(footprint_lonlat)
    if geom.is_empty:
        return []
    if geom.bounds[2] - geom.bounds[0] > 180:
        # a footprint across ±180° given in [-180, 180]: unwrap to [0, 360], then split at 180°
        unwrapped = shapely_transform(
            geom, lambda xy: np.column_stack([np.where(xy[:, 0] < 0, xy[:, 0] + 360, xy[:, 0]), xy[:, 1]])
        )
        east = unwrapped.intersection(box(0, -90, 180, 90))
        west = shapely_transform(unwrapped.intersection(box(180, -90, 360, 90)), lambda xy: xy - np.array([360.0, 0.0]))
        return sorted(set(_tiles_meeting(east)) | set(_tiles_meeting(west)))
    return _tiles_meeting(geom)


def _tiles_meeting(geom: BaseGeometry) -> list[str]:
    if geom.is_empty:
        return []
    lon0, lat0, lon1, lat1 = geom.bounds
    dense = segmentize(geom, 0.05)
    names: set[str] = set()
    for zone, band in _cells_near(lon0, lat0, lon1, lat1):
        cell = _cell_utm(zone, band)
        if cell is None:
            continue
        fp = _project(dense, _to_utm(zone, band < "N"))
        if not fp.is_valid:
            fp = fp.buffer(0)
        cx0, cy0, cx1, cy1 = cell.bounds
        for east in range(int(cx0 // SQUARE_M) * SQUARE_M, int(cx1) + 1, SQUARE_M):
            col = _column_letter(zone, east)
            if col is None:
                continue
            for north in range(int(cy0 // SQUARE_M) * SQUARE_M, int(cy1) + 1, SQUARE_M):
                if not _meets(box(east, north, east + SQUARE_M, north + SQUARE_M), cell):
                    continue
                tile = Tile(f"{zone:02d}{band}{col}{_row_letter(zone, north)}", zone, band, east, north)
                extent = box(tile.ulx, tile.uly - TILE_SIZE_M, tile.ulx + TILE_SIZE_M, tile.uly)
                if extent.intersects(fp):
                    names.add(tile.name)
    return sorted(names)
