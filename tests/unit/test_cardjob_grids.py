"""Which grids a GenerateCard job generates: MGRS tiles under the AOIs, on each tile's own lattice.

The expectations are the tiles' own grids (``card.mgrs``) and pyproj's projection of the AOI, not
the job's arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyproj
import pytest
import shapely

from card import mgrs
from cbmflow.settings import WorkerSettings
from worker.cardjob import tile_grids

MUNICH = shapely.box(11.07, 48.23, 11.10, 48.25)  # 32UPU (alias 32TPU) and zone 33's 33UTP
GRD = shapely.box(9.0, 47.0, 13.0, 49.5)


def test_aoi_windows_lie_on_each_tiles_lattice_and_cover_the_aoi_plus_margin() -> None:
    settings = WorkerSettings(card_extent="aoi", card_margin_m=200)
    grids = {g.tile: g for g in tile_grids(MUNICH, GRD, settings)}
    assert sorted(grids) == ["32UPU", "33UTP"], "32TPU is 32UPU's grid under another name: generated once"
    for name, g in grids.items():
        tile = mgrs.tile_geobox(name)
        assert g.grid.crs == tile.crs and not g.whole
        rows, cols = tile.window_of(g.grid)  # raises unless on the tile's lattice and inside it
        assert rows.start > 0 and cols.start > 0
        to_tile = pyproj.Transformer.from_crs("EPSG:4326", tile.crs, always_xy=True)
        xs, ys = to_tile.transform(*shapely.segmentize(MUNICH, 0.001).exterior.coords.xy)
        left, bottom, right, top = g.grid.bounds
        assert left <= min(xs) - 200 and right >= max(xs) + 200
        assert bottom <= min(ys) - 200 and top >= max(ys) + 200
        assert left > min(xs) - 200 - 10 and top < max(ys) + 200 + 10, "snapped outwards by less than a pixel"
        assert g.grid.width == math.ceil((right - left) / 10)


def test_tile_extent_is_the_whole_tile() -> None:
    grids = tile_grids(MUNICH, GRD, WorkerSettings(card_extent="tile"))
    assert [(g.tile, g.whole) for g in grids] == [("32UPU", True), ("33UTP", True)]
    assert all(g.grid == mgrs.tile_geobox(g.tile) for g in grids)


def test_a_window_is_clipped_to_its_tile() -> None:
    # Rome lies ~22 km inside the east edge of zone 32's 32TQM: a 30 km margin reaches past it.
    aoi = shapely.box(12.45, 41.88, 12.50, 41.92)
    grids = {g.tile: g for g in tile_grids(aoi, shapely.box(11, 40, 15, 43), WorkerSettings(card_margin_m=30000))}
    assert sorted(grids) == ["32TQM", "33TTG"]
    qm, tile = grids["32TQM"].grid, mgrs.tile_geobox("32TQM")
    tile.window_of(qm)
    assert qm.bounds.right == tile.bounds.right and qm.bounds.left > tile.bounds.left


def test_job_dem_from_glo30_uses_an_unsigned_client_on_aws_and_the_default_store_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's DEM is its own setting: AWS's public bucket unsigned, any other bucket through
    the default store profile's endpoint (not a product's)."""
    from botocore import UNSIGNED

    from worker.cardjob import _dem

    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    base = {"card_dem": "glo30", "card_dem_geoid": "egm96", "card_dem_cache_dir": str(tmp_path)}
    aws = _dem(WorkerSettings(**base, card_dem_bucket="s3://copernicus-dem-30m"))
    assert aws.client.meta.config.signature_version is UNSIGNED
    assert "127.0.0.1" not in aws.client.meta.endpoint_url
    cdse = _dem(WorkerSettings(**base, card_dem_bucket="s3://eodata/auxdata/CopDEM_COG/copernicus-dem-30m"))
    assert cdse.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert cdse.client.meta.config.signature_version is not UNSIGNED
