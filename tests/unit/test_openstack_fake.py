"""The OpenStack driver against a fake Keystone/Nova/Glance/Neutron HTTP surface (requests-mock),
with no server at all: what is posted, listed, deleted, refused. The boot test that validates user-data with
Debian's cloud-init, and the tests with the database registry, are in tests/integration."""

from __future__ import annotations

import base64
import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openstack import (
    ENV,
    SETTINGS,
    FakeCloud,
    _driver,
    fake_cloud,
)

from cbmflow.errors import ConfigError
from provisioner.userdata import NOVA_USER_DATA_LIMIT, render_userdata

# openstacksdk 4.x warns about its own internals (InfluxDB support, internal find calls); none is ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK50Warning"),
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK60Warning"),
]


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with fake_cloud(tmp_path, monkeypatch) as fake:
        yield fake


def test_workers_are_listed_by_tag_server_side_and_nothing_else_is_seen(cloud: FakeCloud) -> None:
    cloud.add("db-server", [])
    cloud.add("cbmflow-other-00000000", ["cbmflow-worker", "cbmflow-pool-other"])
    mine = cloud.add("cbmflow-eo-0000abcd", ["cbmflow-worker", "cbmflow-pool-eo"], status="ERROR")
    [view] = _driver().list_workers()
    assert ("GET", "/v2.1/servers/detail?tags=cbmflow-worker,cbmflow-pool-eo") in cloud.calls()
    assert (view.id, view.server_id, view.server_status) == ("cbmflow-eo-0000abcd", mine, "ERROR")
    assert view.state == "unknown" and view.registered is None, "no registry configured: nothing is assumed"
    assert view.address == "192.0.2.7"
    assert view.started_at_s == 1746090000.0  # 2025-05-01T09:00:00Z


def test_delete_is_by_server_id_and_idempotent(cloud: FakeCloud) -> None:
    server_id = cloud.add("cbmflow-eo-0000abcd", ["cbmflow-worker", "cbmflow-pool-eo"])
    driver = _driver()
    driver.list_workers()
    assert driver.delete(["cbmflow-eo-0000abcd"]) == ["cbmflow-eo-0000abcd"]
    assert ("DELETE", f"/v2.1/servers/{server_id}") in cloud.calls()
    assert cloud.servers == {}
    assert driver.delete(["cbmflow-eo-0000abcd"]) == [], "already gone: no request, no error"
    assert driver.delete(["not-a-worker"]) == []


def test_quota_403_ends_the_wave_and_the_next_step_sees_the_truth(cloud: FakeCloud) -> None:
    cloud.max_instances = 2
    cloud.add("cbmflow-eo-00000001", ["cbmflow-worker", "cbmflow-pool-eo"])
    driver = _driver()
    started = driver.start(3)
    assert len(started) == 1
    posts = cloud.posts()
    assert len(posts) == 2, "one accepted, one refused with 403, then no further attempts"
    assert cloud.create_statuses == [202, 403]
    assert len(driver.list_workers()) == 2


def test_headroom_is_the_tightest_of_instances_cores_and_ram(cloud: FakeCloud) -> None:
    cloud.max_instances = 10
    cloud.add("x", [])
    driver = _driver()
    assert driver.headroom() == 9
    cloud.limits.update({"maxTotalCores": 20, "totalCoresUsed": 9})  # 11 cores left, 4 per server
    assert driver.headroom() == 2
    cloud.limits.update({"maxTotalRAMSize": 16384, "totalRAMUsed": 8192})  # one 8 GiB server left
    assert driver.headroom() == 1


def test_userdata_over_novas_limit_is_gzipped_and_still_the_same_document(cloud: FakeCloud) -> None:
    pems = [{"path": f"/etc/ssl/certs/site-{i}.pem", "content": "A" * 1000 + f"{i}\n"} for i in range(60)]
    big = {"write_files": pems}

    def large(name: str) -> str:
        return render_userdata({**ENV, "CBMFLOW_WORKER_ID": name}, base_config=big)

    [name] = _driver(userdata=large).start(1)
    encoded = cloud.posts()[0].json()["server"]["user_data"]
    assert len(base64.b64encode(large(name).encode())) > NOVA_USER_DATA_LIMIT, "the plain form would be refused"
    assert len(encoded) <= NOVA_USER_DATA_LIMIT
    raw = base64.b64decode(encoded)
    assert raw[:2] == b"\x1f\x8b", "gzip magic: cloud-init decompresses it"
    assert gzip.decompress(raw).decode() == large(name)

    def huge(name: str) -> str:
        noise = base64.b64encode(os.urandom(60_000)).decode()
        return render_userdata({**ENV, "CBMFLOW_WORKER_ID": name}, base_config={"write_files": [
            {"path": "/etc/noise", "content": noise}]})  # fmt: skip

    with pytest.raises(ConfigError, match="Nova accepts 65535"):
        _driver(userdata=huge).start(1)
    assert len(cloud.posts()) == 1, "nothing posted for a document Nova would refuse"


def test_a_timed_out_boot_is_found_by_its_tag_on_the_next_listing(cloud: FakeCloud) -> None:
    cloud.timeout_after_create = True
    driver = _driver()
    assert driver.start(2) == [], "the timeout ends the wave without an exception"
    assert len(cloud.posts()) == 1
    [view] = driver.list_workers()
    assert view.server_status == "BUILD", "it exists after all and counts as booting capacity"


def test_missing_settings_and_unknown_clouds_are_config_errors(cloud: FakeCloud) -> None:
    with pytest.raises(ConfigError, match="CBMFLOW_PROVISION_IMAGE, CBMFLOW_PROVISION_NETWORK"):
        _driver(SETTINGS.model_copy(update={"image": "", "network": ""})).start(1)
    with pytest.raises(ConfigError, match="CBMFLOW_PROVISION_CLOUD or OS_CLOUD"):
        _driver(SETTINGS.model_copy(update={"cloud": "nope"})).list_workers()
    with pytest.raises(ConfigError, match="cannot resolve"):
        _driver(SETTINGS.model_copy(update={"image": "no-such-image"})).start(1)
    with pytest.raises(ConfigError, match="CBMFLOW_PROVISION_POOL"):
        _driver(SETTINGS.model_copy(update={"pool": "Bad,Pool"}))
    assert cloud.posts() == []
