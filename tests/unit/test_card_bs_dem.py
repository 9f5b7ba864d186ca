"""GLO-30 DEM provider without a server: tile naming, which tiles a block needs, and the mosaic of
tiles with different longitude spacings (GLO-30 north of 50°), through an in-memory stand-in for the
S3 client. Heights are a plane in (lon, lat), which bilinear resampling reproduces exactly, so the
plane is the truth. The geoid step and the real S3 protocol are in
tests/integration/test_card_bs_glo30.py (Debian's proj-data, a moto server)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from botocore.exceptions import ClientError
from pyproj import Transformer
from rasterio.warp import Resampling

from card.geobox import GeoBox
from card.s1grd.dem import DemLocationError, Glo30Dem, _warp, glo30_tile_name

BASE = 10 / 3600  # the test tiles' latitude spacing (GLO-30: 1″)


def plane(lon: Any, lat: Any) -> Any:
    return 500.0 + 25.0 * (lon - 10.0) + 80.0 * (lat - 50.0)


class FolderS3:
    """download_file / head_bucket / list_objects_v2 over a local folder (what Glo30Dem uses of boto3)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads: list[str] = []

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        src = self.root / bucket / key
        if not src.is_file():
            raise ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")
        self.downloads.append(key)
        shutil.copyfile(src, filename)

    def head_bucket(self, Bucket: str) -> None:  # noqa: N803 (boto3's keyword)
        if not (self.root / Bucket).is_dir():
            raise ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadBucket")

    def list_objects_v2(self, Bucket: str, Prefix: str, MaxKeys: int) -> dict[str, Any]:  # noqa: N803
        keys = [str(p.relative_to(self.root / Bucket)) for p in (self.root / Bucket).rglob("*.tif")]
        hits = [k for k in keys if k.startswith(Prefix)][:MaxKeys]
        return {"KeyCount": len(hits), "Contents": [{"Key": k} for k in hits]}


def write_tile(root: Path, lat: int, lon: int, lon_factor: float) -> None:
    """A GLO-30-shaped tile: pixel centres on whole multiples of its spacing, ``lon_factor`` × coarser in longitude."""
    name = glo30_tile_name(lat, lon)
    dx, dy = BASE * lon_factor, BASE
    nx, ny = round(1 / dx), round(1 / dy)
    cols, rows = lon + np.arange(nx) * dx, lat + 1 - np.arange(ny) * dy
    path = root / "dem" / name / f"{name}.tif"
    path.parent.mkdir(parents=True)
    transform = Affine(dx, 0, lon - dx / 2, 0, -dy, lat + 1 + dy / 2)
    profile = {"driver": "GTiff", "width": nx, "height": ny, "count": 1, "dtype": "float32", "crs": "EPSG:4326"}
    with rasterio.open(path, "w", transform=transform, **profile) as dst:
        dst.write(plane(cols[None, :], rows[:, None]).astype(np.float32), 1)


def test_tile_names_are_glo30s() -> None:
    # names as listed in the AWS and CDSE buckets
    assert glo30_tile_name(41, 12) == "Copernicus_DSM_COG_10_N41_00_E012_00_DEM"
    assert glo30_tile_name(-90, -180) == "Copernicus_DSM_COG_10_S90_00_W180_00_DEM"
    assert glo30_tile_name(0, -1) == "Copernicus_DSM_COG_10_N00_00_W001_00_DEM"
    assert glo30_tile_name(-1, 0) == "Copernicus_DSM_COG_10_S01_00_E000_00_DEM"


def test_a_block_needs_the_tiles_under_it_plus_a_margin(tmp_path: Path) -> None:
    dem = Glo30Dem(FolderS3(tmp_path), tmp_path / "cache", "s3://dem", geoid="egm96")
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    x, y = to_utm.transform(13.3, 42.5)
    inside = GeoBox((10, 10), Affine(10, 0, round(x), 0, -10, round(y)), "EPSG:32633")
    assert dem.tiles_for(inside) == [(42, 13)]
    x, y = to_utm.transform(13.0, 42.0)  # a corner of four tiles
    corner = GeoBox((10, 10), Affine(10, 0, round(x) - 50, 0, -10, round(y) + 50), "EPSG:32633")
    assert sorted(dem.tiles_for(corner)) == [(41, 12), (41, 13), (42, 12), (42, 13)]
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32719", always_xy=True).transform(-69.5, -33.5)
    south_west = GeoBox((10, 10), Affine(10, 0, round(x), 0, -10, round(y)), "EPSG:32719")
    assert dem.tiles_for(south_west) == [(-34, -70)]
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32760", always_xy=True).transform(180.0, -16.8)
    across = GeoBox((10, 10), Affine(10, 0, round(x) - 50, 0, -10, round(y)), "EPSG:32760")
    with pytest.raises(ValueError, match="across ±180°"):  # not 360 tiles of a wrapped longitude range
        dem.tiles_for(across)


def test_tiles_of_two_longitude_spacings_mosaic_onto_the_plane(tmp_path: Path) -> None:
    """49° N (10″ × 10″ here) under 50° N (15″ × 10″, as GLO-30's 1.5″ × 1″ north of 50°)."""
    write_tile(tmp_path, 49, 10, 1.0)
    write_tile(tmp_path, 50, 10, 1.5)
    s3 = FolderS3(tmp_path)
    dem = Glo30Dem(s3, tmp_path / "cache", "s3://dem", geoid="egm96")
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(10.5, 50.0)
    box = GeoBox((400, 200), Affine(10, 0, round(x, -1), 0, -10, round(y, -1) + 2000), "EPSG:32632")
    assert sorted(dem.tiles_for(box)) == [(49, 10), (50, 10)]
    h = _warp(dem.mosaic(dem.tiles_for(box)), box, Resampling.bilinear)
    xx, yy = np.meshgrid(box.x_centres(), box.y_centres())
    lon, lat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(xx, yy)
    err = np.abs(h - plane(lon, lat))
    away = np.abs(lat - 50.0) > 2 * BASE
    assert away.sum() > 10000 and np.max(err[away]) < 1e-3  # metres: each tile placed exactly
    assert np.max(err) < 0.05  # at the seam, the coarser tile resampled into the mosaic
    assert len(s3.downloads) == 2
    # cached: a second provider on the same cache downloads nothing
    again = Glo30Dem(FolderS3(tmp_path / "elsewhere"), tmp_path / "cache", "s3://dem", geoid="egm96")
    assert np.array_equal(_warp(again.mosaic(again.tiles_for(box)), box, Resampling.bilinear), h)


def test_absent_tiles_read_zero_and_a_wrong_prefix_is_refused(tmp_path: Path) -> None:
    write_tile(tmp_path, 49, 10, 1.0)
    dem = Glo30Dem(FolderS3(tmp_path), tmp_path / "cache", "s3://dem", geoid="egm96")
    assert dem.tile(glo30_tile_name(49, 11)) is None  # sea
    assert (tmp_path / "cache" / f"{glo30_tile_name(49, 11)}.missing").is_file()
    box = GeoBox((20, 20), Affine(0.001, 0, 11.2, 0, -0.001, 49.6), "EPSG:4326")
    assert np.array_equal(_warp(dem.mosaic([(49, 11)]), box, Resampling.bilinear), np.zeros((20, 20)))
    wrong = Glo30Dem(FolderS3(tmp_path), tmp_path / "cache2", "s3://dem/other-prefix", geoid="egm96")
    with pytest.raises(DemLocationError, match="holds no Copernicus_DSM_"):
        wrong.tile(glo30_tile_name(49, 10))
    with pytest.raises(ClientError):
        Glo30Dem(FolderS3(tmp_path), tmp_path / "cache3", "s3://nobucket", geoid="egm96").tile("x")
