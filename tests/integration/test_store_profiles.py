"""Two catalogues, two object stores: each scene is read through its source's store profile.

Two S3 endpoints (two moto servers on two loopback ports), one bucket each: CDSE-like keys given
by environment variable names on one, unsigned reads (a public COG bucket) on the other. The
default store (``CBMFLOW_STORE_*``) points at a closed port, so any read sent to the wrong store
fails. A real ``cbmflow worker`` process extracts a scene from each store; the rows are checked
against the test world's truth. A scene whose profile this worker does not know fails for good
with an error naming the profile.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from stackfixtures import free_ports
from test_s3 import _run_worker, upload

from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
from cbmflow import db, store
from cbmflow.dev.verify import verify_truth
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import SourceSettings, WatchSettings


@pytest.fixture(scope="module")
def endpoints() -> Iterator[tuple[str, str]]:
    servers = []
    for port in free_ports(2):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        servers.append((server, f"http://127.0.0.1:{port}"))
    try:
        yield servers[0][1], servers[1][1]
    finally:
        for server, _ in servers:
            server.stop()


@pytest.fixture
def profiles(endpoints: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, Any]:
    """Store profiles ``cdse`` (keys in CDSE_TEST_KEY/SECRET) and ``cogs`` (anonymous); boto3 clients."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CDSE_TEST_KEY", "cdse-key")
    monkeypatch.setenv("CDSE_TEST_SECRET", "cdse-secret")
    (closed,) = free_ports(1)
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed}")  # nothing listens there
    cdse, cogs = endpoints
    monkeypatch.setenv(
        "CBMFLOW_STORE_PROFILES",
        f'{{"cdse": {{"s3_endpoint_url": "{cdse}", "s3_region": "us-east-1",'
        f' "access_key_env": "CDSE_TEST_KEY", "secret_key_env": "CDSE_TEST_SECRET"}},'
        f' "cogs": {{"s3_endpoint_url": "{cogs}", "s3_region": "us-east-1", "anonymous": true}}}}',
    )
    admin = functools.partial(
        boto3.client, "s3", region_name="us-east-1", aws_access_key_id="admin", aws_secret_access_key="admin"
    )
    return admin(endpoint_url=cdse), admin(endpoint_url=cogs)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("profworld"), parcels=30, scenes=3, seed=23, aoi_name="ms", year=2024)


def test_one_worker_reads_each_scene_from_its_own_store(
    profiles: tuple[Any, Any], world: WorldSummary, cbm_env: Any, pg_dsn: str, tmp_path: Path
) -> None:
    on_cdse = upload(profiles[0], world, prefix="eodata/L2A")
    on_cogs = upload(profiles[1], world, prefix="cogs")
    public = store.parse_s3(next(iter(on_cogs.values())))[0]
    for page in profiles[1].get_paginator("list_objects_v2").paginate(Bucket=public):
        for obj in page.get("Contents", ()):  # a public bucket: anonymous reads allowed
            profiles[1].put_object_acl(Bucket=public, Key=obj["Key"], ACL="public-read")
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
    source = SourceSettings(name="cdse", kind="static", url=str(world.stac_catalog_path), store="cdse")
    report = watch_once(dsn=pg_dsn, settings=WatchSettings(sources=[source], lookback_days=0))
    assert report.new == 3
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT id, product_id, location, store_profile FROM scenes ORDER BY acquired_at")
        scenes = cur.fetchall()
        assert [s[3] for s in scenes] == ["cdse"] * 3  # the watcher wrote its source's profile
        (a, _, loc_a, _), (b, _, loc_b, _), (c, _, loc_c, _) = scenes
        cur.execute("UPDATE scenes SET location = %s WHERE id = %s", (on_cdse[Path(loc_a).name], a))
        cur.execute(
            "UPDATE scenes SET location = %s, store_profile = 'cogs' WHERE id = %s", (on_cogs[Path(loc_b).name], b)
        )
        cur.execute(
            "UPDATE scenes SET location = %s, store_profile = 'nope' WHERE id = %s", (on_cdse[Path(loc_c).name], c)
        )

    proc = _run_worker()
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT id, status, attempts, coalesce(reason, '') FROM scenes ORDER BY id")
        status = {r[0]: r[1:] for r in cur.fetchall()}
    assert status[a][:2] == ("extracted", 1) and status[b][:2] == ("extracted", 1), (status, proc.stderr[-3000:])
    assert status[c][0] == "failed" and status[c][1] == 1, status  # permanent: no retry
    assert "'nope'" in status[c][2] and "CBMFLOW_STORE_PROFILES" in status[c][2], status[c]

    # Rows of the two readable scenes equal the world's truth for them (and only them).
    good = {Path(loc_a).name.removesuffix(".SAFE"), Path(loc_b).name.removesuffix(".SAFE")}
    truth = tmp_path / "truth.csv"
    with world.truth_path.open() as src, truth.open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=list(reader.fieldnames or ()))
        writer.writeheader()
        kept = [row for row in reader if row["product_id"] in good]
        writer.writerows(kept)
    assert len(kept) > 30
    tally = verify_truth(pg_dsn, truth, "ms", 2024)
    assert tally.ok and tally.expected == len(kept), tally


def test_gdal_options_are_set_per_bucket_for_each_profile(profiles: Any, endpoints: tuple[str, str]) -> None:
    with store.using_profile("cdse"), store.gdal_env("/vsis3/bucket-a/x.tif"):
        pass
    with store.using_profile("cogs"), store.gdal_env("/vsis3/bucket-b/x.tif"):
        pass
    option = store.gdal_option
    assert option("/vsis3/bucket-a/x.tif", "AWS_S3_ENDPOINT") == endpoints[0].removeprefix("http://")
    assert option("/vsis3/bucket-b/x.tif", "AWS_S3_ENDPOINT") == endpoints[1].removeprefix("http://")
    assert option("/vsis3/bucket-a/x.tif", "AWS_ACCESS_KEY_ID") == "cdse-key"
    assert option("/vsis3/bucket-b/x.tif", "AWS_NO_SIGN_REQUEST") == "YES"
    assert option("/vsis3/bucket-b/x.tif", "AWS_ACCESS_KEY_ID") == ""  # not the other profile's key
    with pytest.raises(store.UnknownStoreProfile, match="'nope'"):
        with store.using_profile("nope"):
            pass
