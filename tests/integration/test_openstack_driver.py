"""The OpenStack driver against a fake Keystone/Nova/Glance/Neutron HTTP surface (requests-mock).

The real openstacksdk runs unmodified, configured from a clouds.yaml as in production; only the
HTTP layer is fake. The fake keeps servers like Nova does (tags filter server-side, metadata POST
merges, 403 over quota), and the tests assert the exact requests: what is posted to create a
server is the contract with Nova, and what is listed decides which servers the provisioner may
ever touch.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import secrets
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import requests_mock
import yaml

from cbmflow import db
from cbmflow.errors import ConfigError
from cbmflow.settings import ProvisionSettings
from provisioner.controller import Controller
from provisioner.drivers.openstack import OpenStackDriver
from provisioner.policy import Policy
from provisioner.userdata import NOVA_USER_DATA_LIMIT, parse_worker_launch, render_userdata

# openstacksdk 4.x warns about its own internals (InfluxDB support, internal find calls); none is ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK50Warning"),
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK60Warning"),
]

AUTH = "https://keystone.cloud.test/v3"
NOVA = "https://nova.cloud.test/v2.1"
GLANCE = "https://glance.cloud.test"
NEUTRON = "https://neutron.cloud.test"
FLAVOR = {"id": "f-4c8g", "name": "eo.4c8g", "vcpus": 4, "ram": 8192, "disk": 40}
IMAGE = {"id": "img-debian-12", "name": "debian-12-cbmflow", "status": "active"}
NETWORK = {"id": "net-1234", "name": "cbm-private", "status": "ACTIVE"}
ENV = {
    "CBMFLOW_DB_DSN": "postgresql://cbm:secret@db.internal:5432/cbm",
    "CBMFLOW_BUS_AMQP_URL": "amqp://cbm:secret@mq.internal:5672/cbm",
    "CBMFLOW_BUS_MANAGEMENT_URL": "http://cbm:secret@mq.internal:15672",
}
SETTINGS = ProvisionSettings(
    driver="openstack",
    cloud="cbmtest",
    pool="eo",
    image="debian-12-cbmflow",
    flavor="eo.4c8g",
    network="cbm-private",
    key_name="cbm-ops",
    security_groups=["cbm-workers"],
    install="preinstalled",
)


def _endpoint(kind: str, url: str) -> dict[str, Any]:
    return {
        "type": kind,
        "name": kind,
        "id": kind,
        "endpoints": [{"id": f"{kind}-public", "interface": "public", "region": "RegionOne", "region_id": "RegionOne",
                       "url": url}],
    }  # fmt: skip


class FakeCloud:
    """Keystone (v3 password auth, catalogue), Nova 2.96, Glance v2 and Neutron v2.0, in memory."""

    def __init__(self, mock: requests_mock.Mocker, max_instances: int = 10) -> None:
        self.servers: dict[str, dict[str, Any]] = {}
        self.max_instances = max_instances
        self.limits = {"maxTotalCores": -1, "totalCoresUsed": 0, "maxTotalRAMSize": -1, "totalRAMUsed": 0}
        self.timeout_after_create = False
        self.create_statuses: list[int] = []
        self.mock = mock
        token = {
            "token": {
                "methods": ["password"],
                "expires_at": "2099-01-01T00:00:00.000000Z",
                "issued_at": "2025-01-01T00:00:00.000000Z",
                "user": {"id": "u1", "name": "cbm", "domain": {"id": "default", "name": "Default"}},
                "project": {"id": "p1", "name": "cbm", "domain": {"id": "default", "name": "Default"}},
                "catalog": [
                    _endpoint("identity", AUTH),
                    _endpoint("compute", NOVA),
                    _endpoint("image", GLANCE),
                    _endpoint("network", NEUTRON),
                ],
            }
        }
        nova_version = {"version": {"id": "v2.1", "status": "CURRENT", "version": "2.96", "min_version": "2.1",
                                    "links": [{"rel": "self", "href": NOVA + "/"}]}}  # fmt: skip
        # Anything not registered below is a 404, so an unexpected request shows up in the history.
        mock.register_uri(requests_mock.ANY, re.compile(".*"), status_code=404, json={"error": "not faked"})
        mock.get(AUTH, json={"version": {"id": "v3.14", "status": "stable",
                                         "links": [{"rel": "self", "href": AUTH + "/"}]}})  # fmt: skip
        mock.post(AUTH + "/auth/tokens", json=token, headers={"X-Subject-Token": "tok-1"}, status_code=201)
        mock.get(NOVA, json=nova_version)
        mock.get(NOVA + "/", json=nova_version)
        mock.get(NOVA + "/flavors/detail", json={"flavors": [FLAVOR]})
        mock.get(NOVA + "/flavors/" + FLAVOR["id"], json={"flavor": FLAVOR})
        mock.get(GLANCE + "/", json={"versions": [{"id": "v2.16", "status": "CURRENT",
                                                   "links": [{"rel": "self", "href": GLANCE + "/v2/"}]}]})  # fmt: skip
        mock.get(GLANCE + "/v2/images", json=self._by_name(IMAGE, "images"))
        mock.get(NEUTRON + "/v2.0/networks", json=self._by_name(NETWORK, "networks"))
        mock.post(NOVA + "/servers", json=self._create)
        mock.get(NOVA + "/servers/detail", json=self._list)
        mock.post(re.compile(re.escape(NOVA) + r"/servers/[^/]+/metadata$"), json=self._metadata)
        mock.delete(re.compile(re.escape(NOVA) + r"/servers/[^/]+$"), json=self._delete)
        mock.get(NOVA + "/limits", json=self._limits)

    @staticmethod
    def _by_name(item: dict[str, Any], key: str) -> Any:
        def reply(request: Any, context: Any) -> dict[str, Any]:
            return {key: [item] if request.qs.get("name") == [item["name"]] else []}

        return reply

    def _create(self, request: Any, context: Any) -> dict[str, Any]:
        if len(self.servers) >= self.max_instances:
            context.status_code = 403
            self.create_statuses.append(403)
            return {"forbidden": {"code": 403, "message": "Quota exceeded for instances: Requested 1, but already "
                                  f"used {len(self.servers)} of {self.max_instances} instances"}}  # fmt: skip
        body = request.json()["server"]
        server_id = f"srv-{secrets.token_hex(3)}"
        self.servers[server_id] = {
            "id": server_id,
            "name": body["name"],
            "status": "BUILD",
            "created": "2025-05-01T10:00:00Z",
            "metadata": dict(body.get("metadata", {})),
            "tags": list(body.get("tags", [])),
            "flavor": {"original_name": FLAVOR["name"], "vcpus": 4, "ram": 8192},
            "addresses": {
                "cbm-private": [{"addr": f"10.0.0.{len(self.servers) + 10}", "version": 4, "OS-EXT-IPS:type": "fixed"}]
            },  # fmt: skip
            "accessIPv4": "",
        }
        if self.timeout_after_create:
            raise requests.exceptions.ReadTimeout("the server was created, but the reply never came")
        context.status_code = 202
        self.create_statuses.append(202)
        return {"server": {"id": server_id, "links": [], "adminPass": "x", "security_groups": [{"name": "default"}]}}

    def _list(self, request: Any, context: Any) -> dict[str, Any]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)
        wanted = set(query["tags"][0].split(",")) if "tags" in query else set()
        return {"servers": [s for s in self.servers.values() if wanted <= set(s["tags"])]}

    def _metadata(self, request: Any, context: Any) -> dict[str, Any]:
        server = self.servers[request.path.split("/")[-2]]
        server["metadata"].update(request.json()["metadata"])
        return {"metadata": server["metadata"]}

    def _delete(self, request: Any, context: Any) -> str:
        if self.servers.pop(request.path.split("/")[-1], None) is None:
            context.status_code = 404
        else:
            context.status_code = 204
        return ""

    def _limits(self, request: Any, context: Any) -> dict[str, Any]:
        absolute = {"maxTotalInstances": self.max_instances, "totalInstancesUsed": len(self.servers), **self.limits}
        return {"limits": {"absolute": absolute, "rate": []}}

    def add(self, name: str, tags: list[str], status: str = "ACTIVE", metadata: dict[str, str] | None = None) -> str:
        server_id = f"srv-{secrets.token_hex(3)}"
        self.servers[server_id] = {"id": server_id, "name": name, "status": status, "created": "2025-05-01T09:00:00Z",
                                   "metadata": metadata or {}, "tags": tags, "addresses": {}, "accessIPv4": "192.0.2.7",
                                   "flavor": {"original_name": FLAVOR["name"]}}  # fmt: skip
        return server_id

    def calls(self, host: str = "") -> list[tuple[str, str]]:
        """(method, path?query) of every request, optionally only to one service."""
        out = []
        for r in self.mock.request_history:
            parts = urllib.parse.urlsplit(r.url)
            if host and parts.netloc != urllib.parse.urlsplit(host).netloc:
                continue
            out.append((r.method, parts.path + (f"?{urllib.parse.unquote(parts.query)}" if parts.query else "")))
        return out

    def posts(self) -> list[Any]:
        return [r for r in self.mock.request_history if r.method == "POST" and r.path == "/v2.1/servers"]


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    clouds = {
        "clouds": {
            "cbmtest": {
                "auth": {"auth_url": AUTH, "username": "cbm", "password": "pw", "project_name": "cbm",
                         "user_domain_name": "Default", "project_domain_name": "Default"},
                "region_name": "RegionOne",
                "identity_api_version": 3,
            }
        }
    }  # fmt: skip
    path = tmp_path / "clouds.yaml"
    path.write_text(yaml.safe_dump(clouds))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))
    monkeypatch.delenv("OS_CLOUD", raising=False)
    with requests_mock.Mocker() as mock:
        yield FakeCloud(mock)


def _userdata(name: str) -> str:
    return render_userdata({**ENV, "CBMFLOW_WORKER_ID": name})


def _driver(settings: ProvisionSettings = SETTINGS, dsn: str | None = None, **kwargs: Any) -> OpenStackDriver:
    return OpenStackDriver(settings, userdata=kwargs.pop("userdata", _userdata), dsn=dsn, clock=lambda: 1_750_000_000)


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
