"""CARD-BS block scheduling: blocks off the image are skipped, block threads change nothing.

Both are properties of the output, so each test compares ``generate_bs`` against itself run the
plain way (every block geocoded, one thread) on the real sarsen GRD geometry with synthetic DN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer

from card.geobox import GeoBox
from card.s1grd.bs import BsOutputs, generate_bs
from card.s1grd.dem import FileDem, FlatDem
from card.s1grd.rtc import MASK_NODATA

SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")
ROME_DEM = Path("../shared/data/sentinel1/Rome-30m-DEM.tif")
CRS = "EPSG:32633"
TO_UTM = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)


def varying_dn(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """DN that changes from pixel to pixel (never 0, the fill value), so a misplaced block shows."""
    rows, cols = np.mgrid[r0:r1, c0:c1]
    out: np.ndarray = (100 + (7 * rows + 13 * cols) % 400).astype(np.uint16)
    return out


def grid_at(lon: float, lat: float, n: int, res: float) -> GeoBox:
    """An n × n grid whose top-left corner is at (lon, lat)."""
    x, y = TO_UTM.transform(lon, lat)
    return GeoBox((n, n), Affine(res, 0, round(x / res) * res, 0, -res, round(y / res) * res), CRS)


def read_all(out: BsOutputs) -> dict[str, np.ndarray]:
    arrays = {}
    for key, path in (*out.backscatter.items(), ("MASK", out.mask), ("LIA", out.local_incidence)):
        with rasterio.open(path) as ds:
            arrays[key] = ds.read(1)
    return arrays


@pytest.fixture(scope="module", autouse=True)
def shared_data() -> None:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE.parent}")


def test_blocks_off_the_image_are_skipped_without_losing_a_pixel(tmp_path: Path) -> None:
    # 12 km square on the product's first-line, near-range corner (descending, right-looking:
    # near range is east): the image's corner cuts through the grid, most blocks lie outside it
    grid = grid_at(15.26, 42.43, 384, 30.0)
    kw = {"quantity": "gamma0", "readers": {"VV": varying_dn}, "block_px": 64}
    skipped = generate_bs(str(SAFE), grid, FlatDem(), str(tmp_path / "skip"), **kw)  # type: ignore[arg-type]
    every = generate_bs(str(SAFE), grid, FlatDem(), str(tmp_path / "all"), skip_outside=False, **kw)  # type: ignore[arg-type]
    assert skipped.blocks == every.blocks == 36 and every.blocks_skipped == 0
    assert 10 <= skipped.blocks_skipped < 36
    a, b = read_all(skipped), read_all(every)
    valid = np.isfinite(b["VV"])
    assert 0.05 < valid.mean() < 0.6  # the grid does straddle the image's edge
    np.testing.assert_array_equal(a["VV"], b["VV"])  # NaN where NaN, every valid value bit for bit
    np.testing.assert_array_equal(a["LIA"], b["LIA"])
    np.testing.assert_array_equal(a["MASK"][valid], b["MASK"][valid])
    assert np.all(a["MASK"][~valid] & MASK_NODATA) and np.all(b["MASK"][~valid] & MASK_NODATA)
    # the flat DEM's exact height bound is tight: few blocks without data are still geocoded
    kept_empty = (
        sum(
            not np.isfinite(b["VV"][r0 : r0 + 64, c0 : c0 + 64]).any()
            for r0 in range(0, 384, 64)
            for c0 in range(0, 384, 64)
        )
        - skipped.blocks_skipped
    )
    assert 0 <= kept_empty <= 4


@dataclass(frozen=True)
class SeaLevelTerrain:
    """Height 0 everywhere, but a terrain DEM: the footprint test must allow any height on Earth."""

    label: str = "sea-level terrain"
    flat: bool = False

    def heights(self, box: GeoBox) -> np.ndarray:
        return np.zeros(box.shape)


def test_a_terrain_dem_keeps_blocks_that_high_ground_could_lift_into_the_image(tmp_path: Path) -> None:
    grid = grid_at(15.26, 42.43, 384, 30.0)
    kw = {"quantity": "beta0", "readers": {"VV": varying_dn}, "block_px": 64}
    terrain = generate_bs(str(SAFE), grid, SeaLevelTerrain(), str(tmp_path / "t"), **kw)  # type: ignore[arg-type]
    flat = generate_bs(str(SAFE), grid, FlatDem(), str(tmp_path / "f"), **kw)  # type: ignore[arg-type]
    assert 0 < terrain.blocks_skipped < flat.blocks_skipped
    np.testing.assert_array_equal(read_all(terrain)["VV"], read_all(flat)["VV"])


def test_two_block_threads_write_the_same_rasters_as_one(tmp_path: Path) -> None:
    if not ROME_DEM.is_file():
        pytest.skip(f"shared test data missing: {ROME_DEM.parent}")
    # γ0 RTC (the numba area simulation) on the Rome DEM (GDAL reads in the block threads)
    grid = grid_at(12.452, 42.048, 256, 10.0)
    dem = FileDem(ROME_DEM)
    kw = {"quantity": "gamma0-rtc", "readers": {"VV": varying_dn}, "block_px": 64}
    one = read_all(generate_bs(str(SAFE), grid, dem, str(tmp_path / "1"), workers=1, **kw))  # type: ignore[arg-type]
    two = read_all(generate_bs(str(SAFE), grid, dem, str(tmp_path / "2"), workers=2, **kw))  # type: ignore[arg-type]
    assert np.isfinite(one["VV"]).mean() > 0.99 and np.nanstd(one["VV"]) > 0
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])
