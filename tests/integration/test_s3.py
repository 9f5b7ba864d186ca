"""Sentinel-2 SAFE products read in place from S3: a real S3 HTTP endpoint (moto's server on
127.0.0.1), boto3 for listings and XML, GDAL's ``/vsis3/`` for pixels.

The references are not the S3 code: the same product read from local disk, and the test world's
own truth. The worker (a real ``cbmflow worker`` process, RabbitMQ and PostgreSQL), ``cbmflow
extract`` and the API chips must give for ``s3://bucket/prefix/X.SAFE`` exactly what they give
for the local copy; a missing band, metadata or bucket is a permanent error naming what is
missing, an unreachable endpoint a transient one.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
import typer
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer
from s1_products import to_dimap
from stackfixtures import free_ports
from starlette.testclient import TestClient
from test_api import ROOT, _hash, _json
from typer.testing import CliRunner

from card.geobox import GeoBox
from card.s2 import MissingBandError, open_s2_product
from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
from cbmflow import db, store
from cbmflow.dev.verify import verify_truth
from cbmflow.errors import ConfigError, PermanentJobError
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import ApiSettings, WatchSettings
from worker import engine
from worker.index_cache import IndexCache
from worker.scene import ClaimedScene, _open_raster, extract_card, extract_s2, open_product

CBMFLOW = str(Path(sys.executable).parent / "cbmflow")
SCENES = 2


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """An S3 HTTP server on a free loopback port for this module (moto's, in a thread)."""
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Settings and credentials pointing boto3 and GDAL at the fake endpoint; a boto3 client.

    Credentials are given the way an operator gives them (environment, read by boto3's chain);
    any profile or config file of the machine is kept out.
    """
    return _point_at(moto_endpoint, monkeypatch, tmp_path)


def _point_at(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cbmflow-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cbmflow-test-secret")
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("CBMFLOW_STORE_S3_REGION", "us-east-1")
    monkeypatch.setenv("CBMFLOW_STORE_S3_PATH_STYLE", "true")
    return store.s3_client()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("s3world"), parcels=40, scenes=SCENES, seed=11, aoi_name="ms", year=2024)


def upload(client: Any, world: WorldSummary, bucket: str | None = None, prefix: str = "eodata/L2A") -> dict[str, str]:
    """Every file of every SAFE under ``s3://bucket/prefix/``; product dir name → its s3:// location."""
    bucket = bucket or f"cbm-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    locations = {}
    for safe in world.product_paths:
        for path in sorted(p for p in safe.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{safe.name}/{path.relative_to(safe).as_posix()}")
        locations[safe.name] = f"s3://{bucket}/{prefix}/{safe.name}"
    return locations


# --- the store ------------------------------------------------------------------------------------


def test_product_on_s3_parses_like_the_local_copy_with_one_listing(s3: Any, world: WorldSummary) -> None:
    locations = upload(s3, world)
    local = open_s2_product(world.product_paths[0])
    remote = open_s2_product(store.product_files(locations[world.product_paths[0].name]))
    for name in ("product_name", "mission", "sensing_time", "processing_baseline", "tile_id", "epsg",
                 "boa_add_offset", "quantification_value", "nodata_dn", "grids", "image_files"):  # fmt: skip
        assert getattr(remote, name) == getattr(local, name), name
    assert remote.footprint.equals(local.footprint)
    bucket, key = store.parse_s3(locations[world.product_paths[0].name])
    assert str(remote.path) == f"/vsis3/{bucket}/{key}"
    for band in ("B02", "B03", "B04", "B08", "B05", "B11", "SCL"):
        rel = local.band_path(band).relative_to(local.path)
        assert str(remote.band_path(band)) == f"/vsis3/{bucket}/{key}/{rel.as_posix()}"
    files = remote.files
    assert isinstance(files, store.S3ProductFiles)
    assert (files.list_requests, files.head_requests) == (1, 0)  # one listing answers every existence check
    with pytest.raises(MissingBandError, match="B12"):
        remote.band_path("B12")  # not listed by the world's products: never zeros


def test_gdal_reads_the_pixels_from_the_s3_endpoint(
    s3: Any, world: WorldSummary, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    locations = upload(s3, world)
    remote = open_s2_product(store.product_files(locations[world.product_paths[1].name]))
    local = open_s2_product(world.product_paths[1])
    path = remote.band_path("B04")
    with store.gdal_env(path):
        # the settings reach GDAL: endpoint host:port, plain HTTP, path-style, boto3's credentials
        option = functools.partial(store.gdal_option, str(path))
        assert option("AWS_S3_ENDPOINT") == moto_endpoint.removeprefix("http://")
        assert (option("AWS_HTTPS"), option("AWS_VIRTUAL_HOSTING")) == ("NO", "NO")
        assert (option("AWS_ACCESS_KEY_ID"), option("AWS_NO_SIGN_REQUEST")) == ("cbmflow-test-key", None)
        assert store.gdal_option("/vsis3x/other", "AWS_S3_ENDPOINT") is None  # only /vsis3/ paths
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="werkzeug"), rasterio.open(path) as src:
            window = rasterio.windows.Window(src.width // 2 - 8, src.height // 2 - 5, 17, 11)
            got = src.read(1, window=window)
    with rasterio.open(local.band_path("B04")) as src:
        want = src.read(1, window=window)
    assert np.array_equal(got, want) and len(np.unique(got)) > 5
    # The server saw GDAL's requests for this object, all of them HTTP range reads (206).
    _, key = store.parse_s3(str(path))
    seen = [r.getMessage() for r in caplog.records if r.name == "werkzeug" and key in r.getMessage()]
    assert seen and all('" 206' in line for line in seen), seen


@pytest.fixture(scope="module")
def tiled_jp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A 2048² JPEG2000 of 512² tiles (a read of it spans many tiles), and its pixels."""
    n = 2048
    yy, xx = np.mgrid[0:n, 0:n]
    data = ((xx * 3 + yy * 5) % 4000 + 1).astype("uint16")
    path = tmp_path_factory.mktemp("jp2") / "tiled.jp2"
    profile = {"driver": "JP2OpenJPEG", "width": n, "height": n, "count": 1, "dtype": "uint16", "crs": "EPSG:32632",
               "transform": rasterio.transform.from_origin(500000, 5300000, 10, 10), "blockxsize": 512,
               "blockysize": 512, "QUALITY": 100, "REVERSIBLE": "YES"}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path, data


def _in_job_thread(work: Any) -> dict[str, Any]:
    """Run ``work()`` as the consumer runs a job: in a thread that is not the main thread."""
    got: dict[str, Any] = {}

    def job() -> None:
        try:
            got["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            got["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(120)
    return got


def test_gdal_threads_of_a_worker_job_reach_the_endpoint(s3: Any, tiled_jp2: tuple[Path, Any]) -> None:
    """A worker reads in its job thread and a prefetch thread, and OpenJPEG may decode several
    tiles at once in GDAL's own threads, each opening the file anew: options only the opening
    thread sees (``rasterio.Env`` outside the main thread) send those reads to AWS, and the tiles
    come back as zeros."""
    local, data = tiled_jp2
    bucket = f"cbm-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(local), bucket, "big/tiled.jp2")
    path = f"/vsis3/{bucket}/big/tiled.jp2"

    def work() -> tuple[Any, Any]:
        with _open_raster(path) as src:
            whole = src.read(1)
            read = store.in_read_env(path, lambda: src.read(1, window=rasterio.windows.Window(512, 1024, 1536, 1024)))
            with ThreadPoolExecutor(1) as prefetch:
                return whole, prefetch.submit(read).result()

    got = _in_job_thread(work)
    assert "error" not in got, got.get("error")
    whole, part = got["result"]
    assert np.array_equal(whole, data)
    assert np.array_equal(part, data[1024:2048, 512:2048])


def test_a_read_that_loses_the_store_fails_instead_of_returning_zeros(
    s3: Any, tiled_jp2: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GDAL's multi-threaded JPEG2000 reader turns a tile it could not fetch into zeros without an
    error; the worker's reads must fail instead (transiently: the job is retried), never write
    nodata where the product has pixels."""
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    client = store.s3_client()
    client.create_bucket(Bucket="lost")
    client.upload_file(str(tiled_jp2[0]), "lost", "big/tiled.jp2")
    path = "/vsis3/lost/big/tiled.jp2"

    def work() -> Any:
        with _open_raster(path) as src:
            server.stop()  # the store goes away between the open and the pixel reads
            read = store.in_read_env(path, lambda: src.read(1))
            with ThreadPoolExecutor(1) as prefetch:
                return prefetch.submit(read).result()

    try:
        got = _in_job_thread(work)
    finally:
        server.stop()
    assert "result" not in got, f"read returned {int((got['result'] == 0).sum())} zero pixels instead of failing"
    assert isinstance(got["error"], store.StoreUnavailable), repr(got["error"])
    assert not isinstance(got["error"], PermanentJobError)


def test_a_product_gdal_saw_missing_during_an_outage_is_read_once_the_cache_is_forgotten(
    s3: Any, world: WorldSummary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos run: GDAL caches an outage's failures as "does not exist" and keeps
    answering so after the store is back, so a retry failed a product that exists, for good.
    ``store.forget_cached`` (called by the worker before each retry after an outage) clears it."""
    (port,) = free_ports(1)
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = store.s3_client()
    client.create_bucket(Bucket="flaky")
    band = open_s2_product(world.product_paths[0]).band_path("B04")
    client.upload_file(str(band), "flaky", "L2A/product/B04.jp2")
    location, path = "s3://flaky/L2A/product", "/vsis3/flaky/L2A/product/B04.jp2"

    def read() -> Any:
        with store.gdal_env(path), rasterio.open(path) as src:
            return src.read(1, window=rasterio.windows.Window(0, 0, 16, 16))

    expected = read()
    store.forget_cached(location)
    server.stop()  # the outage: GDAL's answers are now failures, and it caches them
    try:
        with pytest.raises(rasterio.errors.RasterioIOError):
            read()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # the store is back, with the same objects
        client.head_object(Bucket="flaky", Key="L2A/product/B04.jp2")
        with pytest.raises(rasterio.errors.RasterioIOError, match="does not exist"):
            read()  # still "missing": the cached answer, not the store's
        store.forget_cached(location)
        assert np.array_equal(read(), expected)
    finally:
        server.stop()


def test_worker_errors_are_permanent_or_transient_as_they_should_be(
    s3: Any, world: WorldSummary, monkeypatch: pytest.MonkeyPatch
) -> None:
    locations = upload(s3, world)
    location = locations[world.product_paths[0].name]
    bucket, key = store.parse_s3(location)

    with pytest.raises(PermanentJobError, match="NoSuchBucket"):
        open_product(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/{key}", "p")
    with pytest.raises(PermanentJobError, match="no MTD_MSIL2A.xml"):
        open_product(f"s3://{bucket}/elsewhere/{world.product_paths[0].name}", "p")
    with pytest.raises(PermanentJobError, match="unsupported product location 'gs://"):
        open_product(f"gs://{bucket}/{key}", "p")

    # A JP2 that is there but is not a JP2: the data is at fault, not the store.
    s3.put_object(Bucket=bucket, Key=f"{key}/junk.jp2", Body=b"\x00\x00\x00\x0cjP  \r\n" + b"x" * 5000)
    with pytest.raises(PermanentJobError, match=f"cannot read raster s3://{bucket}/{key}/junk.jp2"):
        with _open_raster(f"/vsis3/{bucket}/{key}/junk.jp2"):
            pass

    # An endpoint that does not answer: transient (an OSError, never a PermanentJobError).
    (dead,) = free_ports(1)
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    with pytest.raises(store.StoreUnavailable) as opening:
        open_product(location, "p")
    assert not isinstance(opening.value, PermanentJobError) and isinstance(opening.value, OSError)
    band = f"/vsis3/{bucket}/{key}/GRANULE/x/IMG_DATA/R10m/never-cached_B04_10m.jp2"
    with pytest.raises(store.StoreUnavailable), _open_raster(band):
        pass


def test_listing_denied_falls_back_to_one_head_per_file(s3: Any, world: WorldSummary) -> None:
    """Some buckets grant GetObject but not ListBucket: existence is then checked per file."""
    locations = upload(s3, world)
    bucket, key = store.parse_s3(locations[world.product_paths[0].name])

    class NoListing:
        def __getattr__(self, name: str) -> Any:
            return getattr(s3, name)

        def get_paginator(self, name: str) -> Any:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListObjectsV2")

    files = store.S3ProductFiles(bucket, key, client=NoListing())
    product = open_s2_product(files)
    product.band_path("B04")
    product.band_path("B04")
    with pytest.raises(MissingBandError, match="B12"):
        product.band_path("B12")
    assert (files.list_requests, files.head_requests) == (0, 3)  # MTD, MTD_TL, B04 (once)


# --- the worker -----------------------------------------------------------------------------------


def _rows(dsn: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with db.transaction(dsn) as cur:
        cur.execute(
            "SELECT pid, scene_id, band, count, mean, std, min, max, p25, p50, p75 FROM ms.sigs_2024 ORDER BY 1, 2, 3"
        )
        sigs = cur.fetchall()
        cur.execute("SELECT pid, scene_id, class, count FROM ms.hists_2024 ORDER BY 1, 2, 3")
        hists = cur.fetchall()
    return sigs, hists


def _catalogue(dsn: str, world: WorldSummary) -> None:
    with db.transaction(dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
    report = watch_once(dsn=dsn, settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0))
    assert report.new == SCENES


def _scenes(dsn: str) -> list[ClaimedScene]:
    with db.transaction(dsn) as cur:
        cur.execute("SELECT id, product_id, card, location, 2024 FROM scenes ORDER BY id")
        return [ClaimedScene(*row) for row in cur.fetchall()]


def _run_worker() -> subprocess.CompletedProcess[str]:
    """A real ``cbmflow worker`` process until the queue has been idle 4 s; it must exit 0."""
    proc = subprocess.run(
        [CBMFLOW, "worker", "--idle-exit", "4"],
        env={**os.environ, "CBMFLOW_WORKER_ID": "s3-worker"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_worker_extracts_s3_products_exactly_as_local_ones(
    s3: Any, world: WorldSummary, cbm_env: Any, pg_dsn: str
) -> None:
    locations = upload(s3, world)
    _catalogue(pg_dsn, world)
    local = {s.id: s for s in _scenes(pg_dsn)}
    with db.transaction(pg_dsn) as cur:
        for scene in local.values():
            cur.execute(
                "UPDATE scenes SET location = %s WHERE id = %s", (locations[Path(scene.location).name], scene.id)
            )
    assert all(s.location.startswith("s3://") for s in _scenes(pg_dsn))

    # A real worker process: job thread, prefetch thread, GDAL /vsis3/ to the endpoint.
    proc = _run_worker()
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT status, attempts, count(*) FROM scenes GROUP BY 1, 2")
        assert cur.fetchall() == [("extracted", 1, SCENES)], proc.stderr[-3000:]  # no retry was needed
    from_s3 = _rows(pg_dsn)
    assert len(from_s3[0]) > 40 * SCENES and len(from_s3[1]) > 0
    tally = verify_truth(pg_dsn, world.truth_path, "ms", 2024)
    assert tally.ok and tally.expected > 40 * SCENES, tally
    with (world.truth_scl_path).open() as fh:
        assert sum(int(r["count"]) for r in csv.DictReader(fh)) == sum(int(r[3]) for r in from_s3[1])

    # The same scenes from the local copies replace the rows: they must come out identical.
    cache = IndexCache(entries=8, cache_dir="")
    with db.transaction(pg_dsn) as cur:
        for scene in local.values():
            extract_s2(cur, scene, cache)
    assert _rows(pg_dsn) == from_s3


def test_a_band_missing_on_s3_is_a_permanent_error_naming_it(
    s3: Any, world: WorldSummary, cbm_env: Any, pg_dsn: str
) -> None:
    locations = upload(s3, world)
    _catalogue(pg_dsn, world)
    scenes = _scenes(pg_dsn)
    scene = scenes[0]
    location = locations[Path(scene.location).name]
    bucket, key = store.parse_s3(location)
    victim = open_s2_product(Path(scene.location)).band_path("B08")
    s3.delete_object(Bucket=bucket, Key=f"{key}/{victim.relative_to(Path(scene.location)).as_posix()}")
    on_s3 = ClaimedScene(scene.id, scene.product_id, scene.card, location, scene.year)
    missing = rf"band B08 at 10 m is listed in MTD_MSIL2A.xml but its file is missing: expected /vsis3/{bucket}/"
    with pytest.raises(PermanentJobError, match=missing):
        with db.transaction(pg_dsn) as cur:
            extract_s2(cur, on_s3, IndexCache(entries=2, cache_dir=""))

    # The real worker: that scene is dead-lettered at once with the reason, the other extracted.
    with db.transaction(pg_dsn) as cur:
        for s in scenes:
            cur.execute("UPDATE scenes SET location = %s WHERE id = %s", (locations[Path(s.location).name], s.id))
    _run_worker()
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT id, status, attempts, reason FROM scenes ORDER BY id")
        rows = {r[0]: r[1:] for r in cur.fetchall()}
        cur.execute("SELECT DISTINCT scene_id FROM ms.sigs_2024")
        written = {r[0] for r in cur.fetchall()}
    status, attempts, reason = rows[scene.id]
    assert (status, attempts) == ("failed", 1) and re.search(missing, reason), rows
    assert all(rows[s.id][:2] == ("extracted", 1) for s in scenes[1:]), rows
    assert written == {s.id for s in scenes[1:]}  # nothing of the broken scene


# --- cbmflow extract ------------------------------------------------------------------------------


def test_cli_extract_reads_s3_safe_like_the_local_one(
    s3: Any, world: WorldSummary, cli: typer.Typer, tmp_path: Path
) -> None:
    locations = upload(s3, world)
    safes = [str(p) for p in world.product_paths]
    remote = [locations[p.name] for p in world.product_paths]
    remote[1] += "/MTD_MSIL2A.xml"  # the metadata file names the product too
    parcels = str(world.parcels_path)
    for name, sources in (("local", safes), ("s3", remote)):
        result = CliRunner().invoke(
            cli,
            [
                "extract",
                *sources,
                "--parcels",
                parcels,
                "--id-column",
                "parcel_id",
                "--out",
                str(tmp_path / name / "stats.csv"),
            ],
        )
        assert result.exit_code == 0, result.output
    local_stats = (tmp_path / "local" / "stats.csv").read_bytes()
    assert (tmp_path / "s3" / "stats.csv").read_bytes() == local_stats
    assert (tmp_path / "s3" / "stats_scl.csv").read_bytes() == (tmp_path / "local" / "stats_scl.csv").read_bytes()
    rows = list(csv.DictReader(io.StringIO(local_stats.decode())))
    assert len(rows) > 40 * SCENES and {r["band"] for r in rows} == {"B02", "B03", "B04", "B05", "B08", "B11"}

    bucket, key = store.parse_s3(locations[world.product_paths[0].name])
    s3.delete_object(Bucket=bucket, Key=f"{key}/MTD_MSIL2A.xml")
    gone = CliRunner().invoke(cli, ["extract", locations[world.product_paths[0].name], "--parcels", parcels,
                                    "--out", str(tmp_path / "gone.csv")])  # fmt: skip
    assert gone.exit_code == 1 and "no MTD_MSIL2A.xml" in gone.output


# --- API chips ------------------------------------------------------------------------------------


def test_chip_of_an_s3_product_holds_its_pixels(
    s3: Any, world: WorldSummary, cbm_env: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api import chips
    from api.app import create_app

    locations = upload(s3, world)
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        cur.execute(
            "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, true)", (ROOT[0], _hash(ROOT[1]))
        )
    watch_once(dsn=pg_dsn, settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0))
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT id, location FROM scenes")
        for sid, loc in cur.fetchall():
            cur.execute("UPDATE scenes SET location = %s WHERE id = %s", (locations[Path(loc).name], sid))
    chips._product.cache_clear()
    w, s, e, n = world.aoi_bbox
    params = {"lon": (w + e) / 2, "lat": (s + n) / 2, "start_date": "2024-01-01", "end_date": "2024-12-31"}
    with TestClient(create_app(pg_dsn, ApiSettings(chip_secret="test-secret"))) as client:
        body = _json(
            client.get("/query/rawChipByLocation", params={**params, "band": "B08", "chipsize": 200}, auth=ROOT)
        )
        assert len(body["chips"]) == SCENES
        for url in body["chips"]:
            ref = url.rsplit("/", 1)[1].removesuffix(".B08.tif")
            resp = client.get(url)
            assert resp.status_code == 200, resp.text
            with rasterio.open(io.BytesIO(resp.content)) as chip:
                got, bounds = chip.read(1), chip.bounds
            with rasterio.open(open_s2_product(world.out / "products" / f"{ref}.SAFE").band_path("B08")) as jp2:
                want = jp2.read(1, window=rasterio.windows.from_bounds(*bounds, transform=jp2.transform))
            assert got.shape == (20, 20) and np.array_equal(got, want)
        page = client.get("/query/chipsByLocation", params=params, auth=ROOT)
        assert page.status_code == 200 and page.text.count("data:image/png;base64,") == SCENES

        # The store goes away: an outage is a 503 to retry, not "no imagery here" or a dead link.
        (dead,) = free_ports(1)
        monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
        chips._product.cache_clear()
        listing = client.get("/query/rawChipByLocation", params={**params, "band": "B08"}, auth=ROOT)
        assert listing.status_code == 503 and "object store" in listing.json()["error"]["message"]
        chip = client.get(body["chips"][0])
        assert chip.status_code == 503 and "object store" in chip.json()["error"]["message"]


def _s1_scene_from_its_local_cog(
    pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ClaimedScene, list[tuple[Any, ...]]]:
    """A generated S1 CARD-BS scene catalogued and extracted from its local COG: the rows any other
    copy of the product must give."""
    s1world = generate(
        tmp_path_factory.mktemp("s1s3"), parcels=30, scenes=1, seed=12, aoi_name="ms", year=2024, s1_scenes=1
    )
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", s1world.aoi_path)
        import_parcels(cur, s1world.parcels_path, "ms", 2024)
    watch_once(
        dsn=pg_dsn,
        settings=WatchSettings(
            catalog_url=str(s1world.stac_catalog_path), lookback_days=0, collections=["sentinel-1-card-bs"]
        ),
    )
    (scene,) = _scenes(pg_dsn)
    assert scene.card == "bs" and scene.location.endswith(".tif")
    with db.transaction(pg_dsn) as cur:
        extract_card(cur, scene, IndexCache(entries=8, cache_dir=""))
    local_rows = _rows(pg_dsn)[0]
    assert {r[2] for r in local_rows} == {"VVb", "VHb"} and len(local_rows) > 30
    return scene, local_rows


def test_s1_card_cog_on_s3_gives_the_local_rows(
    s3: Any, cbm_env: Any, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An S1 CARD COG at an s3:// location is read through /vsis3/ like an S2 band: the same rows
    as from the local file; a location that is neither a .tif nor a BEAM-DIMAP is refused."""
    scene, local_rows = _s1_scene_from_its_local_cog(pg_dsn, tmp_path_factory)
    cache = IndexCache(entries=8, cache_dir="")

    bucket = f"cbm-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(scene.location, bucket, f"card/{Path(scene.location).name}")
    remote = ClaimedScene(scene.id, scene.product_id, "bs", f"s3://{bucket}/card/{Path(scene.location).name}", 2024)
    with db.transaction(pg_dsn) as cur:
        extract_card(cur, remote, IndexCache(entries=8, cache_dir=""))
    assert _rows(pg_dsn)[0] == local_rows

    folder = ClaimedScene(scene.id, scene.product_id, "bs", f"s3://{bucket}/card/X", 2024)
    with db.transaction(pg_dsn) as cur, pytest.raises(PermanentJobError, match="GeoTIFF/COG .* or a BEAM-DIMAP"):
        extract_card(cur, folder, cache)

    # The store away while the COG is opened: transient (retried in place), never a corrupt product.
    (port,) = free_ports(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there
        away = ClaimedScene(
            scene.id, scene.product_id, "bs", f"s3://{bucket}/card/gone-{Path(scene.location).name}", 2024
        )
        with db.transaction(pg_dsn) as cur, pytest.raises(store.StoreUnavailable):
            extract_card(cur, away, IndexCache(entries=8, cache_dir=""))


def test_a_fresh_worker_takes_the_fleets_parcel_index_from_the_store(
    s3: Any, world: WorldSummary, cbm_env: Any, pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CBMFLOW_WORKER_INDEX_CACHE_URL: the first VM builds a tile's parcel index, the next ones read
    it from the object store and write the same rows; a bad or unreachable tier is only a miss."""
    _catalogue(pg_dsn, world)
    scenes = _scenes(pg_dsn)
    bucket = f"cbm-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/fleet-a/index-cache/"

    def extract(cache: IndexCache) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        with db.transaction(pg_dsn) as cur:
            for scene in scenes:
                extract_s2(cur, scene, cache)
        return _rows(pg_dsn)

    first = IndexCache(entries=8, cache_dir="", shared_url=url)
    built = extract(first)
    assert first.misses >= 1 and first.shared_hits == 0 and len(built[0]) > 40 * SCENES
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="fleet-a/index-cache/")["Contents"]
    assert len(listed) == first.misses, "each index built is left in the store once"

    disk = tmp_path / "disk"
    fresh = IndexCache(entries=8, cache_dir=disk, shared_url=url)
    assert extract(fresh) == built
    assert (fresh.misses, fresh.shared_hits) == (0, first.misses), "a fresh VM builds nothing"
    assert len(list(disk.glob("index-*.npz"))) == first.misses, "and keeps them on its own disk"

    # A damaged object is a miss that is rebuilt (and replaced), never a failed job.
    victim = listed[0]["Key"]
    s3.put_object(Bucket=bucket, Key=victim, Body=b"not an npz")
    capsys.readouterr()
    third = IndexCache(entries=8, cache_dir="", shared_url=url)
    assert extract(third) == built
    assert third.misses == 1 and "index_cache.shared_unreadable" in capsys.readouterr().err
    assert s3.get_object(Bucket=bucket, Key=victim)["Body"].read()[:2] == b"PK", "rebuilt and put back"


def test_an_unreachable_shared_index_cache_is_a_miss(
    s3: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_ports(1)
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    geoms = [shapely.box(500010, 4499900, 500100, 4499990)]
    grid = GeoBox(shape=(20, 20), transform=rasterio.Affine(10, 0, 500000, 0, -10, 4500000), crs=32633)
    index = engine.build_index(geoms, np.arange(1), grid)
    cache = IndexCache(entries=2, cache_dir="", shared_url="s3://nowhere/index/")
    cache.put(("k",), index)  # the upload fails: logged, the job goes on
    assert "index_cache.shared_write_failed" in capsys.readouterr().err
    assert IndexCache(entries=2, cache_dir="", shared_url="s3://nowhere/index/").get(("k",)) is None
    with pytest.raises(ConfigError, match="use s3://bucket/prefix/"):
        IndexCache(entries=2, cache_dir="", shared_url="/mnt/shared/index")


@pytest.fixture
def s3_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Like ``s3``, with moto in a process of its own: GDAL checks an ENVI band for a ``.msk``
    sibling with the GIL held (rasterio's mask flags), which an S3 server in one of our own
    threads could never answer; a real store is always another process."""
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = _point_at(f"http://127.0.0.1:{port}", monkeypatch, tmp_path)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield client
    finally:
        server.terminate()
        server.wait(10)


def test_jrc_beam_dimap_on_s3_gives_the_local_rows(
    s3_apart: Any, cbm_env: Any, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """JRC's CARD archive (<ref>.dim + <ref>.data/ of ENVI bands) read in place on S3, addressed by
    its .dim or its .data: the rows of the same product as a local COG. One listing covers the
    product's own keys, not the archive folder around it."""
    s3 = s3_apart
    scene, local_rows = _s1_scene_from_its_local_cog(pg_dsn, tmp_path_factory)

    bucket = f"cbm-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    archive = tmp_path_factory.mktemp("dimap")
    product = to_dimap(Path(scene.location), archive / "a")
    neighbour = to_dimap(Path(scene.location), archive / "b", names={"VV": "Sigma0_VV", "VH": "Sigma0_VH"})
    ref = product.name
    for root, prefix in ((product, "archive/"), (neighbour, "archive/X")):  # X<ref>: never listed
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"{prefix}{path.relative_to(root).as_posix()}")
    for entry in (f"{ref}.dim", f"{ref}.data"):
        dimap = ClaimedScene(scene.id, scene.product_id, "bs", f"s3://{bucket}/archive/{entry}", 2024)
        with db.transaction(pg_dsn) as cur:
            extract_card(cur, dimap, IndexCache(entries=8, cache_dir=""))
        assert _rows(pg_dsn)[0] == local_rows, entry
    files, entry = store.dimap_files(f"s3://{bucket}/archive/{ref}.dim")
    assert entry == f"{ref}.dim"
    assert files.files_under("") == sorted(p.relative_to(product).as_posix() for p in product.rglob("*") if p.is_file())

    # Without its .dim the bands are found by name; a missing one is a permanent error naming it.
    s3.delete_object(Bucket=bucket, Key=f"archive/{ref}.dim")
    s3.delete_object(Bucket=bucket, Key=f"archive/{ref}.data/Gamma0_VH.img")
    gone = ClaimedScene(scene.id, scene.product_id, "bs", f"s3://{bucket}/archive/{ref}.data", 2024)
    with db.transaction(pg_dsn) as cur, pytest.raises(PermanentJobError, match="polarisation VH has no band file"):
        extract_card(cur, gone, IndexCache(entries=8, cache_dir=""))
