"""CARD-BS from GRD products on S3 (a moto server): a COG-GRD ``….SAFE`` prefix laid out as in CDSE's
eodata and a classic ``.zip`` object, read through a boto3 client (XML) and GDAL's ``/vsis3/``
(measurement); the backscatter equals that of the same products on local disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import rasterio
from grd_products import SAFE, build_grd, dn_pattern, grid_and_window, require_safe
from moto.server import ThreadedMotoServer
from stackfixtures import free_ports

from card.geobox import GeoBox
from card.s1grd.bs import generate_bs
from card.s1grd.dem import FlatDem
from card.s1grd.safe import S3SafeSource, SafeError, SafeSource
from cbmflow import store

BUCKET = "eodata"
COG_KEY = f"Sentinel-1/SAR/IW_GRDH_1S-COG/2021/12/23/{SAFE.stem}_COG.SAFE"
ZIP_KEY = f"archive/{SAFE.stem}.zip"


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
def products(endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, GeoBox, Path, Path]:
    """The boto3 client, a grid, and the local COG-GRD directory and classic zip also uploaded to S3."""
    require_safe()
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    client.create_bucket(Bucket=BUCKET)
    work = tmp_path_factory.mktemp("s3grd")
    grid, window = grid_and_window()
    cog = build_grd(work / "cog", window, dn_pattern, cog=True)
    zipped = build_grd(work / "zip", window, dn_pattern, as_zip=True)
    for f in cog.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{COG_KEY}/{f.relative_to(cog)}")
    client.upload_file(str(zipped), BUCKET, ZIP_KEY)
    return client, grid, cog, zipped


def _values(product: str | SafeSource, grid: GeoBox, out: Path) -> tuple[np.ndarray, dict[str, str]]:
    result = generate_bs(product, grid, FlatDem(), str(out), quantity="beta0", denoise=False)
    with rasterio.open(result.backscatter["VV"]) as ds:
        return ds.read(1), ds.tags()


def _gdal_s3(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[None]:
    """GDAL's /vsis3/ on the moto server, set up exactly as the worker sets it for its store
    (``store.gdal_env``). Its /vsis3/ options are process-wide path-specific options that outlive
    the block (every thread of a worker must see them), so a plain ``rasterio.Env`` here would lose
    to the endpoint an earlier test's store left behind."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("CBMFLOW_STORE_S3_REGION", "us-east-1")
    return store.gdal_env()


@pytest.mark.parametrize("key", [COG_KEY, ZIP_KEY], ids=["cog-safe-prefix", "classic-zip"])
def test_a_grd_on_s3_gives_the_local_backscatter(
    products: tuple[Any, GeoBox, Path, Path], endpoint: str, tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, grid, cog, zipped = products
    local, _ = _values(str(cog if key == COG_KEY else zipped), grid, tmp_path / "local")
    src = S3SafeSource(f"s3://{BUCKET}/{key}", client)
    assert src.product_name == (f"{SAFE.stem}_COG" if key == COG_KEY else SAFE.stem)
    vv = src.gdal_path(src.find("measurement", "VV"))
    assert vv.startswith("/vsizip//vsis3/" if key == ZIP_KEY else f"/vsis3/{BUCKET}/{COG_KEY}/measurement/")
    with _gdal_s3(endpoint, monkeypatch):
        remote, tags = _values(src, grid, tmp_path / "s3")
    assert np.isfinite(local).all() and np.array_equal(remote, local)
    assert tags["PRODUCT"] == src.product_name


def test_a_missing_product_is_a_safe_error(products: tuple[Any, GeoBox, Path, Path]) -> None:
    client = products[0]
    with pytest.raises(SafeError, match="no such SAFE"):
        S3SafeSource(f"s3://{BUCKET}/Sentinel-1/nope.SAFE", client)
    with pytest.raises(SafeError, match="not an s3://"):
        S3SafeSource("/data/x.SAFE", client)


def test_cli_reads_an_s3_product_through_the_store_settings(
    products: tuple[Any, GeoBox, Path, Path], endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    from worker.cardgen import register

    _, grid, cog, _ = products
    local, _ = _values(str(cog), grid, tmp_path / "local")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("CBMFLOW_STORE_S3_REGION", "us-east-1")
    app = typer.Typer()
    register(app)
    b = grid.bounds
    args = ["card", "bs", f"s3://{BUCKET}/{COG_KEY}", "--out", str(tmp_path / "cli"), "--crs", "EPSG:32633"]
    args += ["--bounds", str(b.left), str(b.bottom), str(b.right), str(b.top), "--quantity", "beta0", "--no-denoise"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (out,) = (tmp_path / "cli").glob("*_VV_BETA0_GTC.tif")
    with rasterio.open(out) as ds:
        assert np.array_equal(ds.read(1), local)
