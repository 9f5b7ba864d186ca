"""A fake Keystone/Nova/Glance/Neutron HTTP surface (requests-mock) for the OpenStack driver's
tests in both layers; the real openstacksdk runs unmodified on top of it (not collected)."""

from __future__ import annotations

import re
import secrets
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import requests_mock
import yaml

from cbmflow.settings import ProvisionSettings
from provisioner.drivers.openstack import OpenStackDriver
from provisioner.userdata import render_userdata

AUTH = "https://keystone.cloud.test/v3"
NOVA = "https://nova.cloud.test/v2.1"
GLANCE = "https://glance.cloud.test"
NEUTRON = "https://neutron.cloud.test"
FLAVOR = {"id": "f-4c8g", "name": "eo.4c8g", "vcpus": 4, "ram": 8192, "disk": 40}
# A second size, for a pool of CARD workers beside the extraction pool.
BIG_FLAVOR = {"id": "f-16c64g", "name": "eo.16c64g", "vcpus": 16, "ram": 65536, "disk": 80}
FLAVORS = {f["id"]: f for f in (FLAVOR, BIG_FLAVOR)}
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
        mock.get(NOVA + "/flavors/detail", json={"flavors": list(FLAVORS.values())})
        for flavor in FLAVORS.values():
            mock.get(NOVA + "/flavors/" + str(flavor["id"]), json={"flavor": flavor})
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
            "flavor": {k: FLAVORS[body["flavorRef"]][k] for k in ("vcpus", "ram")}
            | {"original_name": FLAVORS[body["flavorRef"]]["name"]},
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


@contextmanager
def fake_cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    """A clouds.yaml naming the fake, and the fake itself for as long as the block runs."""
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
