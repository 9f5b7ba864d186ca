"""The OpenStack driver against a fake Keystone/Nova/Glance/Neutron HTTP surface (requests-mock).

The real openstacksdk runs unmodified, configured from a clouds.yaml as in production; only the
HTTP layer is fake. The fake keeps servers like Nova does (tags filter server-side, metadata POST
merges, 403 over quota), and the tests assert the exact requests: what is posted to create a
server is the contract with Nova, and what is listed decides which servers the provisioner may
ever touch.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openstack import (
    SETTINGS,
    FakeCloud,
    _driver,
    _userdata,
    fake_cloud,
)

from cbmflow import db
from provisioner.controller import Controller
from provisioner.drivers.openstack import OpenStackDriver
from provisioner.policy import Policy
from provisioner.userdata import parse_worker_launch

# openstacksdk 4.x warns about its own internals (InfluxDB support, internal find calls); none is ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK50Warning"),
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK60Warning"),
]


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with fake_cloud(tmp_path, monkeypatch) as fake:
        yield fake


def test_boot_posts_exactly_the_server_nova_should_create(cloud: FakeCloud, tmp_path: Path) -> None:
    driver = _driver()
    names = driver.start(1) + driver.start(1)
    assert len(names) == 2 and all(re.fullmatch(r"cbmflow-eo-[0-9a-f]{8}", n) for n in names)
    posts = cloud.posts()
    assert len(posts) == 2
    for name, post in zip(names, posts, strict=True):
        body = post.json()
        user_data = body["server"].pop("user_data")
        assert body == {
            "server": {
                "name": name,
                "flavorRef": "f-4c8g",
                "imageRef": "img-debian-12",
                "networks": [{"uuid": "net-1234"}],
                "key_name": "cbm-ops",
                "security_groups": [{"name": "cbm-workers"}],
                "tags": ["cbmflow-worker", "cbmflow-pool-eo"],
                "metadata": {"cbmflow-pool": "eo", "cbmflow-state": "active"},
            }
        }
        # tags in the create body need compute microversion >= 2.52; the SDK negotiated 2.96
        assert post.headers["OpenStack-API-Version"] == "compute 2.96"
        decoded = base64.b64decode(user_data, validate=True).decode()
        assert decoded == _userdata(name), "plain base64 of this server's own user-data"
        env, command = parse_worker_launch(decoded)
        assert env["CBMFLOW_WORKER_ID"] == name, "the worker registers under the server's name"
        assert command == ["/opt/cbmflow/venv/bin/cbmflow", "worker"]
        doc = tmp_path / f"{name}.yaml"
        doc.write_text(decoded)
        check = subprocess.run(["/usr/bin/cloud-init", "schema", "--config-file", str(doc)], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
    # image, flavor and network are looked up once per driver, then only POSTs follow
    assert [c for c in cloud.calls() if not c[1].startswith(("/v3", "/v2.1/servers"))] == [
        ("GET", "/v2.1"),
        ("GET", "/v2.1/flavors/eo.4c8g"),
        ("GET", "/v2.1/flavors/detail?is_public=None"),
        ("GET", "/"),
        ("GET", "/v2/images/debian-12-cbmflow"),
        ("GET", "/v2/images?name=debian-12-cbmflow"),
        ("GET", "/v2.0/networks/cbm-private"),
        ("GET", "/v2.0/networks?name=cbm-private"),
    ]


def _register(dsn: str, worker_id: str, state: str, scene: int | None = None) -> None:
    with db.transaction(dsn) as cur:
        cur.execute(
            "INSERT INTO workers (id, host, pid, state, current_scene) VALUES (%s, %s, 1, %s, %s)",
            (worker_id, worker_id, state, scene),
        )


def _state(dsn: str, worker_id: str) -> str:
    with db.transaction(dsn) as cur:
        cur.execute("SELECT state FROM workers WHERE id = %s", (worker_id,))
        row = cur.fetchone()
    return str(row[0])


def test_drain_records_metadata_and_signals_the_worker_through_the_registry(cloud: FakeCloud, pg_dsn: str) -> None:
    tags = ["cbmflow-worker", "cbmflow-pool-eo"]
    idle_id = cloud.add("cbmflow-eo-0000000a", tags)
    cloud.add("cbmflow-eo-0000000b", tags)
    cloud.add("cbmflow-eo-0000000c", tags, status="BUILD")
    _register(pg_dsn, "cbmflow-eo-0000000a", "idle")
    _register(pg_dsn, "cbmflow-eo-0000000b", "busy", scene=42)
    driver = _driver(dsn=pg_dsn)
    views = {v.id: v for v in driver.list_workers()}
    assert {k: (v.state, v.registered, v.current_scene) for k, v in views.items()} == {
        "cbmflow-eo-0000000a": ("idle", True, None),
        "cbmflow-eo-0000000b": ("busy", True, 42),
        "cbmflow-eo-0000000c": ("starting", False, None),
    }
    assert driver.drain(["cbmflow-eo-0000000a"]) == ["cbmflow-eo-0000000a"]
    meta = [r for r in cloud.mock.request_history if r.method == "POST" and r.path.endswith("/metadata")]
    assert [(r.path, r.json()) for r in meta] == [
        (f"/v2.1/servers/{idle_id}/metadata",
         {"metadata": {"cbmflow-state": "draining", "cbmflow-draining-since": "1750000000"}}),
    ]  # fmt: skip
    assert _state(pg_dsn, "cbmflow-eo-0000000a") == "draining", "the worker's heartbeat will see this"
    # a drain request that never reached the row (database away, row recreated) is asserted again
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE workers SET state = 'idle' WHERE id = 'cbmflow-eo-0000000a'")
    view = {v.id: v for v in driver.list_workers()}["cbmflow-eo-0000000a"]
    assert (view.state, view.draining_since_s) == ("draining", 1_750_000_000.0)
    assert _state(pg_dsn, "cbmflow-eo-0000000a") == "draining"


def test_control_steps_boot_reconcile_and_drain_a_real_sdk_fleet(cloud: FakeCloud, pg_dsn: str) -> None:
    """The Controller over the OpenStack driver: boot 3, replace one in ERROR, drain and delete when idle."""
    now = [1_750_000_000.0]
    driver = OpenStackDriver(SETTINGS, userdata=_userdata, dsn=pg_dsn, clock=lambda: now[0])
    policy = Policy(per_worker=5, min_workers=0, max_workers=4, scale_down_window_s=0, cooldown_s=0)
    controller = Controller(driver, policy, clock=lambda: now[0])
    plan, applied = controller.step(12)
    assert (plan.want, len(applied.started)) == (3, 3)
    broken, *healthy = applied.started
    for server in cloud.servers.values():
        server["status"] = "ERROR" if server["name"] == broken else "ACTIVE"
    for name in healthy:
        _register(pg_dsn, name, "idle")
    plan, applied = controller.step(12)
    assert applied.deleted == [broken] and len(applied.started) == 1
    assert broken not in {s["name"] for s in cloud.servers.values()}
    replacement = applied.started[0]
    _register(pg_dsn, replacement, "busy", scene=7)
    plan, applied = controller.step(0)
    assert sorted(applied.drained) == sorted(healthy), "the idle ones drain; the busy one is left alone"
    for name in healthy:
        with db.transaction(pg_dsn) as cur:
            cur.execute("UPDATE workers SET state = 'stopped' WHERE id = %s", (name,))
    plan, applied = controller.step(0)
    assert sorted(applied.deleted) == sorted(healthy)
    assert {s["name"] for s in cloud.servers.values()} == {replacement}
    assert sorted(plan.delete) == sorted(healthy) and all(a.why == "worker exited" for a in plan.actions)
