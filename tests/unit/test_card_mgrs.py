"""Sentinel-2 tile names → grids, checked against the origins of real tiles, and the reverse lookup.

The expected origins are copied from real products' metadata, not computed: MTD_TL.xml
``Geoposition`` (ULX/ULY at 10 m) and STAC ``proj:transform`` of the B02/B04 10 m assets.
"""

from __future__ import annotations

import numpy as np
import pytest
from pyproj import Transformer
from shapely import Point, box, segmentize, transform
from shapely.geometry.base import BaseGeometry

from card.mgrs import parse_tile, tile_geobox, tiles_intersecting

REAL_TILES = [
    # (tile, EPSG, ULX, ULY, where the numbers come from)
    ("39QTA", 32639, 199980, 2100000, "earth-search S2A_39QTA_20230628_0_L2A, tests/data"),
    ("32TPP", 32632, 600000, 4900020, "MTD_TL of S2A_OPER_MSI_L1C_TL_SGS__20160929T154211_A006640_T32TPP"),
    ("53HNV", 32753, 499980, 6000040, "MTD_TL of S2A_OPER_MSI_L1C_TL_SGS__20160905T073438_A006291_T53HNV"),
    ("38LMK", 32738, 399960, 8500000, "ODC dataset doc of S2A_MSIL2A_20220101T072201_N0301_R063_T38LMK"),
    ("33UWP", 32633, 499980, 5400000, "earth-search S2A_33UWP_20240601_0_L2A (B04 proj:transform)"),
    ("36TVK", 32636, 399960, 4500000, "T36TVK L2A B02 GeoTIFF"),
    ("36TUK", 32636, 300000, 4500000, "T36TUK L2A B02 GeoTIFF"),
    ("36SVJ", 32636, 399960, 4400040, "T36SVJ L2A B02 GeoTIFF"),
    ("36SWJ", 32636, 499980, 4400040, "T36SWJ L2A B02 GeoTIFF"),
]


@pytest.mark.parametrize(("name", "epsg", "ulx", "uly", "source"), REAL_TILES, ids=[t[0] for t in REAL_TILES])
def test_tile_grid_is_the_real_tiles(name: str, epsg: int, ulx: int, uly: int, source: str) -> None:
    g = tile_geobox(name)
    assert g.crs == f"EPSG:{epsg}", source
    assert tuple(g.transform)[:6] == (10.0, 0.0, float(ulx), 0.0, -10.0, float(uly)), source
    assert g.shape == (10980, 10980)


def test_coarser_resolutions_share_the_origin() -> None:
    g20, g60 = tile_geobox("53HNV", 20), tile_geobox("T53HNV", 60)
    assert g20.shape == (5490, 5490) and g60.shape == (1830, 1830)
    assert (g20.transform.c, g20.transform.f) == (g60.transform.c, g60.transform.f) == (499980.0, 6000040.0)
    with pytest.raises(ValueError, match="does not divide"):
        tile_geobox("32UPU", 7)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("32UAU", "column letter A is not used in zone 32"),  # zone 32 uses J–R
        ("32XPU", "no band X"),  # Svalbard: zones 32, 34, 36 do not exist in band X
        ("61UPU", "not in 1–60"),
        ("32IPU", "not a Sentinel-2 tile name"),
        ("32UPZ", "not a Sentinel-2 tile name"),  # row letters stop at V
        ("32NPV", "does not meet zone 32 band N"),  # row V of an even zone is at 1 400 km, band N ends at ~885 km
    ],
)
def test_names_that_are_no_tile_are_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tile_geobox(name)


def _project(geom: BaseGeometry, crs: str | int) -> BaseGeometry:
    to = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    return transform(geom, lambda xy: np.column_stack(to.transform(xy[:, 0], xy[:, 1])))


def _lonlat_of_tile_centre(name: str) -> tuple[float, float]:
    g = tile_geobox(name)
    x, y = g.transform @ (g.width / 2, g.height / 2)
    lon, lat = Transformer.from_crs(g.crs, "EPSG:4326", always_xy=True).transform(x, y)
    return float(lon), float(lat)


@pytest.mark.parametrize("name", [t[0] for t in REAL_TILES])
def test_a_tiles_centre_is_found_in_that_tile(name: str) -> None:
    lon, lat = _lonlat_of_tile_centre(name)
    assert name in tiles_intersecting(Point(lon, lat).buffer(0.001))


def test_known_places() -> None:
    # Rome's Colosseum lies in T33TTG, Munich's Marienplatz in T32UPU, Bergen in T32VKN (Norway's
    # exception: 32V starts at 3° E, so no 31V tile reaches 5.3° E)
    assert "33TTG" in tiles_intersecting(Point(12.4922, 41.8902).buffer(1e-4))
    assert "32UPU" in tiles_intersecting(Point(11.5755, 48.1374).buffer(1e-4))
    bergen = tiles_intersecting(Point(5.3221, 60.3913).buffer(1e-4))
    assert "32VKN" in bergen and not any(n.startswith("31V") for n in bergen)


def test_every_returned_tile_meets_the_footprint_and_its_neighbours_do_not() -> None:
    """A 1° × 0.5° footprint across the 12° E zone edge: the truth is the tile extents themselves."""
    footprint = box(11.7, 47.6, 12.7, 48.1)
    names = tiles_intersecting(footprint)
    assert {n[:2] for n in names} == {"32", "33"}
    for n in names:
        g = tile_geobox(n)
        fp = Transformer.from_crs("EPSG:4326", g.crs, always_xy=True)
        x, y = fp.transform([11.7, 12.7, 12.7, 11.7, 12.2], [47.6, 47.6, 48.1, 48.1, 47.85])
        assert box(*g.bounds).intersects(box(min(x), min(y), max(x), max(y))), n
    # every tile of the two zones' rows around, not returned, misses the (densified) footprint
    dense = segmentize(footprint, 0.01)
    for zone, cols in (("32", "NPQR"), ("33", "STUV")):
        for band in "TU":
            for col in cols:
                for row in "TUV" if zone == "32" else "NPQ":
                    name = f"{zone}{band}{col}{row}"
                    try:
                        g = tile_geobox(name)
                    except ValueError:
                        continue
                    hit = box(*g.bounds).intersects(_project(dense, g.crs))
                    assert hit == (name in names), name


def test_band_boundary_squares_have_two_names_for_one_grid() -> None:
    # 32?PU spans 48° N (band T below, U above): both names exist and are the same grid
    assert tile_geobox("32TPU") == tile_geobox("32UPU")
    names = tiles_intersecting(box(11.0, 47.9, 11.1, 47.95))  # south of 48° N, inside that square
    assert {"32TPU", "32UPU"} <= set(names)


def test_southern_hemisphere_rows_use_the_band() -> None:
    t = parse_tile("53HNV")
    assert t.south and t.square_north_m == 5_900_000  # row V, 2 000 km cycle of band H (32–40° S)
    lon, lat = _lonlat_of_tile_centre("53HNV")
    assert -40 < lat < -32 and 132 < lon < 138


def test_a_sequence_of_lonlat_points_is_a_footprint() -> None:
    ring = [(12.3, 41.8), (12.6, 41.8), (12.6, 42.0), (12.3, 42.0)]
    assert tiles_intersecting(ring) == tiles_intersecting(box(12.3, 41.8, 12.6, 42.0))
    with pytest.raises(ValueError):
        tiles_intersecting([(0.0, 0.0), (1.0, 1.0)])


def test_a_footprint_across_the_antimeridian() -> None:
    # Fiji's Taveuni (179.9° W … 179.8° E): tiles of zone 60 (east of 174° E) and zone 1 (west of 174° W)
    ring = [(179.8, -16.9), (-179.9, -16.9), (-179.9, -16.6), (179.8, -16.6)]
    names = tiles_intersecting(ring)
    assert {n[:2] for n in names} == {"60", "01"}
    for n in names:  # each tile really meets one side of the footprint
        g = tile_geobox(n)
        side = box(179.8, -16.9, 180.0, -16.6) if n.startswith("60") else box(-180.0, -16.9, -179.9, -16.6)
        assert box(*g.bounds).intersects(_project(segmentize(side, 0.01), g.crs)), n
    # and nothing from the far side of the world, as an unwrapped 360° span would give
    assert all(n[:2] in ("60", "01") for n in names)
