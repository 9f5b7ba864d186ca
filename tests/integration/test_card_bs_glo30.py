"""Copernicus GLO-30 tiles from S3 (a moto server), cached, mosaicked and made ellipsoidal.

The tiles are written here with the real naming (``Copernicus_DSM_COG_10_N41_00_E012_00_DEM/…tif``
under CDSE's ``auxdata/CopDEM_COG/copernicus-dem-30m/`` prefix) and the real grid convention
(pixel centres on whole arc-seconds: the tile's raster starts half a pixel west and north of its
corner), at 10″ instead of 1″ to stay small. Their heights are a plane in (lon, lat), which
bilinear resampling reproduces exactly, so the truth at any point is the plane itself plus the
EGM96 undulation computed by PROJ (pyproj with Debian's proj-data grid), not by our code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyproj
import pytest
import rasterio
from affine import Affine
from moto.server import ThreadedMotoServer
from stackfixtures import free_ports
from typer.testing import CliRunner

from card.geobox import GeoBox
from card.s1grd.dem import Glo30Dem, glo30_tile_name

BUCKET = "eodata"
PREFIX = "auxdata/CopDEM_COG/copernicus-dem-30m"
RES = 10 / 3600
PRESENT = [(41, 11), (41, 12), (42, 12), (41, 13), (42, 13), (42, 15)]  # (42, 11) is "sea": not in the bucket
SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")


def plane(lon: Any, lat: Any) -> Any:
    return 150.0 + 40.0 * (lon - 12.0) - 60.0 * (lat - 42.0)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    s3.create_bucket(Bucket=BUCKET)
    work = tmp_path_factory.mktemp("glo30")
    n = round(1 / RES)
    for lat, lon in PRESENT:
        name = glo30_tile_name(lat, lon)
        cols = lon + np.arange(n) * RES  # pixel centres on whole multiples of the spacing
        rows = lat + 1 - np.arange(n) * RES
        heights = plane(cols[None, :], rows[:, None]).astype(np.float32)
        path = work / f"{name}.tif"
        profile = {"driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": "float32", "crs": "EPSG:4326"}
        profile |= {"transform": Affine(RES, 0, lon - RES / 2, 0, -RES, lat + 1 + RES / 2), "compress": "deflate"}
        with rasterio.open(path, "w", tiled=True, blockxsize=128, blockysize=128, **profile) as dst:
            dst.write(heights, 1)
            dst.update_tags(AREA_OR_POINT="Point")
        s3.upload_file(str(path), BUCKET, f"{PREFIX}/{name}/{name}.tif")
    return s3


def egm96(lon: Any, lat: Any) -> Any:
    """N of EGM96 by PROJ itself (EGM96 height 0 → WGS84 ellipsoidal height)."""
    pyproj.datadir.append_data_dir("/usr/share/proj")
    t = pyproj.Transformer.from_crs("EPSG:4326+5773", "EPSG:4979", always_xy=True)
    return np.asarray(t.transform(lon, lat, np.zeros_like(lon))[2])


def utm_box(lon: float, lat: float, n: int, res: float = 10.0) -> GeoBox:
    x, y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True).transform(lon, lat)
    return GeoBox((n, n), Affine(res, 0, round(x, -1) - n * res / 2, 0, -res, round(y, -1) + n * res / 2), "EPSG:32633")


def lonlat_of(box: GeoBox) -> tuple[Any, Any]:
    xx, yy = np.meshgrid(box.x_centres(), box.y_centres())
    return pyproj.Transformer.from_crs(box.crs, "EPSG:4326", always_xy=True).transform(xx, yy)


def test_a_block_on_four_tiles_is_the_plane_plus_egm96(client: Any, tmp_path: Path) -> None:
    dem = Glo30Dem(client, tmp_path / "cache", f"s3://{BUCKET}/{PREFIX}", geoid="egm96")
    box = utm_box(13.0, 42.0, 300)  # 3 km around the corner of four tiles, all present
    h = dem.heights(box)
    lon, lat = lonlat_of(box)
    truth = plane(lon, lat) + egm96(lon, lat)
    assert np.all(np.isfinite(h))
    assert np.max(np.abs(h - truth)) < 0.01  # metres: no seam, no half-pixel shift (that would be ~1 m)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.tif")) == sorted(
        f"{glo30_tile_name(la, lo)}.tif" for la, lo in [(41, 12), (41, 13), (42, 12), (42, 13)]
    )
    assert "GLO-30" in dem.label and "EGM96" in dem.label and "EGM2008 heights" in dem.label


def test_a_missing_tile_is_sea_level_and_is_remembered(client: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dem = Glo30Dem(client, cache, f"s3://{BUCKET}/{PREFIX}", geoid="egm96")
    box = utm_box(12.0, 42.5, 300)  # across the seam of N42 E011 (absent) and N42 E012
    h = dem.heights(box)
    lon, lat = lonlat_of(box)
    sea = lon < 12.0 - 2 * RES  # two DEM pixels from the seam: only the missing tile's zeros are used
    land = lon > 12.0 + 2 * RES
    assert sea.sum() > 1000 and land.sum() > 1000
    assert np.max(np.abs(h[sea] - egm96(lon[sea], lat[sea]))) < 0.01
    assert np.max(np.abs(h[land] - plane(lon[land], lat[land]) - egm96(lon[land], lat[land]))) < 0.01
    assert (cache / f"{glo30_tile_name(42, 11)}.missing").is_file()


def test_the_cache_serves_without_the_store(client: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    box = utm_box(12.5, 41.5, 50)
    first = Glo30Dem(client, cache, f"s3://{BUCKET}/{PREFIX}", geoid="egm96").heights(box)
    (closed,) = free_ports(1)
    offline = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{closed}", region_name="us-east-1",
        aws_access_key_id="k", aws_secret_access_key="s",
    )  # fmt: skip
    again = Glo30Dem(offline, cache, f"s3://{BUCKET}/{PREFIX}", geoid="egm96").heights(box)
    assert np.array_equal(first, again)
    # a tile not cached yet needs the store, and a dead store is an error, never sea level
    from botocore.exceptions import EndpointConnectionError

    with pytest.raises(EndpointConnectionError):
        Glo30Dem(offline, cache, f"s3://{BUCKET}/{PREFIX}", geoid="egm96").heights(utm_box(13.5, 42.5, 10))
    assert not list(cache.glob(".*.part"))


def test_a_wrong_bucket_or_prefix_is_an_error_not_sea(client: Any, tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):
        Glo30Dem(client, tmp_path / "a", "s3://no-such-bucket/x", geoid="egm96").heights(utm_box(12.5, 41.5, 10))
    with pytest.raises(ValueError, match="holds no Copernicus_DSM_"):
        Glo30Dem(client, tmp_path / "b", f"s3://{BUCKET}/auxdata/other", geoid="egm96").heights(utm_box(12.5, 41.5, 10))
    assert not list((tmp_path / "b").glob("*.missing"))


def test_cli_card_bs_on_a_tile_with_glo30(
    client: Any, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE}")
    import typer

    from worker.cardgen import register

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("CBMFLOW_STORE_S3_REGION", "us-east-1")
    app = typer.Typer()
    register(app)
    # 33TWH at 360 m: 305 × 305 pixels on the tile's own origin, 1 % of it inside the GRD (the cost
    # goes with the radar area covered); the stored measurement is all fill, so the values are NaN:
    # this checks the wiring (tile grid, DEM from the bucket, tags)
    args = ["card", "bs", str(SAFE), "--out", str(tmp_path / "out"), "--tile", "33TWH", "--resolution", "360"]
    args += ["--quantity", "sigma0", "--dem", "glo30", "--dem-bucket", f"s3://{BUCKET}/{PREFIX}"]
    args += ["--dem-cache", str(tmp_path / "cache"), "--dem-geoid", "egm96"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / f"{SAFE.stem}_33TWH_VV_SIGMA0_GTC.tif"
    with rasterio.open(out) as ds:
        assert ds.shape == (305, 305) and ds.crs.to_epsg() == 32633
        # W = 500 km in zone 33, row H = 4 700 km; the corner moved onto the 60 m lattice
        assert tuple(ds.transform)[:6] == (360.0, 0.0, 499980.0, 0.0, -360.0, 4800000.0)
        assert ds.tags()["DEM"].startswith("Copernicus GLO-30 (s3://eodata/auxdata/CopDEM_COG/copernicus-dem-30m/")
    assert any(p.suffix == ".tif" for p in (tmp_path / "cache").iterdir())


def test_the_public_aws_bucket_gets_an_unsigned_client() -> None:
    from botocore import UNSIGNED

    from worker.cardopts import glo30_client

    c = glo30_client("s3://copernicus-dem-30m/")
    assert c.meta.region_name == "eu-central-1" and c.meta.config.signature_version is UNSIGNED
