"""Two worker pools on two queues scale apart: jobs only in the CARD queue grow only the CARD pool.

Once with the local driver against the real broker (the backlog read from each pool's own queue,
`provision scale`/`status` and `cbmflow status` as an operator runs them, the processes' own
environment read from /proc), once with the OpenStack driver against the fake Nova (each pool's
flavor, tag and user-data in what is posted; a drain touches only its own pool's servers).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_openstack import BIG_FLAVOR, FLAVOR, IMAGE, NETWORK, FakeCloud, fake_cloud
from typer.testing import CliRunner

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.errors import ConfigError
from cbmflow.settings import BusSettings, PoolSettings, ProvisionSettings
from provisioner import pools as poolsmod
from provisioner import service
from provisioner.cli import provision_app
from provisioner.drivers import local as localmod
from provisioner.drivers.local import LocalDriver
from provisioner.userdata import parse_worker_launch

pytestmark = [
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK50Warning"),
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK60Warning"),
]

POOLS = [
    {"name": "extract", "job_kinds": ["ExtractParcels"], "per_worker": 2, "max_workers": 2},
    {"name": "card", "job_kinds": ["GenerateCard"], "per_worker": 1, "max_workers": 2},
]
# Stands in for `cbmflow worker`: prints the job kinds it was launched with, then waits to be drained.
SLEEPER = [
    sys.executable,
    "-c",
    "import os,signal,sys,time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0));"
    " print(os.environ['CBMFLOW_WORKER_JOB_KINDS'], flush=True); time.sleep(120)",
]


def _publish(kind: str, n: int) -> None:
    settings = BusSettings()
    conn = busmod.connect(settings)
    try:
        channel = conn.channel()
        busmod.declare_topology(channel, settings)
        channel.confirm_delivery()
        for i in range(n):
            busmod.publish(channel, settings, b"{}", message_id=f"{kind}-{time.monotonic_ns()}-{i}", kind=kind)
    finally:
        conn.close()


def _purge(queue: str) -> None:
    conn = busmod.connect(BusSettings())
    try:
        conn.channel().queue_purge(queue)
    finally:
        conn.close()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_text().split("\0")
    return dict(item.split("=", 1) for item in raw if "=" in item)


def _register_idle(dsn: str, ids: list[str]) -> None:
    with db.transaction(dsn) as cur:
        for worker_id in ids:
            cur.execute("INSERT INTO workers (id, host, pid, state) VALUES (%s, 'h', 1, 'idle')", (worker_id,))


def _scale() -> Any:
    result = CliRunner().invoke(provision_app, ["scale"])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def local_pools(cbm_env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, LocalDriver]]:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(POOLS))
    monkeypatch.setattr(localmod, "local_worker_command", lambda: SLEEPER)
    drivers = {p.name: service.make_driver(p.settings) for p in poolsmod.resolve(ProvisionSettings())}
    assert all(isinstance(d, LocalDriver) for d in drivers.values())
    try:
        yield drivers  # type: ignore[misc]
    finally:
        LocalDriver(cbm_env.state_dir / "workers", userdata="").stop(grace_s=5.0)


def test_local_pools_scale_apart_on_their_own_queues(cbm_env: Any, local_pools: dict[str, LocalDriver]) -> None:
    extract, card = local_pools["extract"], local_pools["card"]
    _publish("GenerateCard", 3)
    out = _scale().stdout
    cards = card.list_workers()
    assert len(cards) == 2 and extract.list_workers() == [], "only the card pool grew (to its max of 2)"
    assert all(w.id.startswith("local-card-") and w.id in out for w in cards)
    for w in cards:
        assert w.pid is not None and _environ(w.pid)["CBMFLOW_WORKER_JOB_KINDS"] == '["GenerateCard"]'

    status = CliRunner().invoke(provision_app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    seen = {p["pool"]: p for p in json.loads(status.stdout)["pools"]}
    assert {k: (v["queues"], v["backlog"], v["want"], v["booting"], v["running"]) for k, v in seen.items()} == {
        "extract": (["cbmflow.extract"], 0, 0, 0, 0),
        "card": (["cbmflow.card"], 3, 2, 2, 0),  # no registry row yet: booting
    }
    table = CliRunner().invoke(provision_app, ["status"]).stdout
    assert "cbmflow.card" in table and all(w.id in table for w in cards)

    _publish("ExtractParcels", 3)
    _scale()
    extracts = extract.list_workers()
    assert len(extracts) == 2 and all(w.id.startswith("local-extract-") for w in extracts), "ceil(3 / 2)"
    assert sorted(w.id for w in card.list_workers()) == sorted(w.id for w in cards), "the card pool unchanged"
    assert _environ(extracts[0].pid or 0)["CBMFLOW_WORKER_JOB_KINDS"] == '["ExtractParcels"]'

    # the card queue empties and its workers report idle: only they drain
    _purge("cbmflow.card")
    _register_idle(cbm_env.dsn, [w.id for w in cards])
    out = _scale().stdout
    assert card.wait_gone([w.id for w in cards], 10.0) == [] and card.list_workers() == []
    assert sorted(w.id for w in extract.list_workers()) == sorted(w.id for w in extracts)
    assert all(w.id in out for w in cards)

    # `cbmflow status` shows both queues (the management API samples every ~5 s)
    from cbmflow.ops.status import collect

    deadline = time.monotonic() + 15
    while True:
        queues = collect()["queues"]
        shown = {name: (q.get("ready"), q.get("unacked")) for name, q in queues.items()}
        if shown == {"cbmflow.extract": (3, 0), "cbmflow.card": (0, 0)} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert shown == {"cbmflow.extract": (3, 0), "cbmflow.card": (0, 0)}


def test_openstack_pools_boot_their_own_flavor_and_drain_only_their_own_servers(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CBMFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CBMFLOW_DB_DSN", pg_dsn)
    monkeypatch.setenv("CBMFLOW_BUS_AMQP_URL", "amqp://w:pw@mq.internal/cbm")
    settings = ProvisionSettings(
        driver="openstack",
        cloud="cbmtest",
        image=str(IMAGE["name"]),
        flavor=str(FLAVOR["name"]),
        network=str(NETWORK["name"]),
        install="preinstalled",
        scale_down_window_s=0,
        cooldown_s=0,
        # the fake dates every server 2025-05-01 and the step runs on today's clock: no age rule applies
        boot_timeout_s=1e10,
        max_lifetime_s=0,
        pools=[
            PoolSettings(name="extract", job_kinds=["ExtractParcels"], max_workers=4),
            PoolSettings(name="card", job_kinds=["GenerateCard"], flavor=str(BIG_FLAVOR["name"]), per_worker=1,
                         max_workers=3),
        ],
    )  # fmt: skip
    with fake_cloud(tmp_path, monkeypatch) as cloud:
        drivers = {p.name: service.make_driver(p.settings) for p in poolsmod.resolve(settings)}

        def step(extract: int, card: int) -> dict[str, list[str]]:
            steps = service.scale_pools(settings, drivers=drivers, backlogs={"extract": extract, "card": card})
            assert all(not s.error for s in steps), [s.error for s in steps]
            return {s.pool.name: s.applied.started for s in steps if s.applied}

        started = step(extract=0, card=5)
        assert (len(started["card"]), started["extract"]) == (3, []), "card: min(5 / 1, max 3)"
        for post in cloud.posts():
            body = post.json()["server"]
            assert body["flavorRef"] == BIG_FLAVOR["id"]
            assert body["tags"] == ["cbmflow-worker", "cbmflow-pool-card"]
            assert body["metadata"]["cbmflow-pool"] == "card" and body["name"].startswith("cbmflow-card-")
            env, _ = parse_worker_launch(base64.b64decode(body["user_data"]).decode())
            assert env["CBMFLOW_WORKER_JOB_KINDS"] == '["GenerateCard"]'
        card_servers = dict(_servers(cloud, "card"))

        started = step(extract=12, card=5)
        assert (len(started["extract"]), started["card"]) == (3, []), "extract: ceil(12 / 5); card already booting"
        extract_posts = [p.json()["server"] for p in cloud.posts()[3:]]
        assert {p["flavorRef"] for p in extract_posts} == {FLAVOR["id"]}
        assert all(p["tags"] == ["cbmflow-worker", "cbmflow-pool-extract"] for p in extract_posts)
        # each pool lists only its own servers, filtered by Nova itself
        lists = {q for m, q in cloud.calls() if m == "GET" and q.startswith("/v2.1/servers/detail")}
        assert lists == {f"/v2.1/servers/detail?tags=cbmflow-worker,cbmflow-pool-{n}" for n in ("card", "extract")}

        _register_idle(pg_dsn, list(card_servers.values()))
        step(extract=12, card=0)
        drained = {r.path.split("/")[-2] for r in cloud.mock.request_history if r.path.endswith("/metadata")}
        assert drained == set(card_servers), "all three card servers drain, no extraction server is touched"
        assert len(_servers(cloud, "extract")) == 3


def _servers(cloud: FakeCloud, pool: str) -> list[tuple[str, str]]:
    return [(sid, s["name"]) for sid, s in cloud.servers.items() if f"cbmflow-pool-{pool}" in s["tags"]]


def test_each_queues_backlog_is_read_apart_and_an_undeclared_queue_holds_nothing(
    cbm_env: Any, monkeypatch: pytest.MonkeyPatch, free_ports_factory: Any
) -> None:
    """AMQP alone (management API away): a queue no one has declared yet is 0, not an unreadable backlog."""
    (port,) = free_ports_factory(1)
    monkeypatch.setenv("CBMFLOW_BUS_MANAGEMENT_URL", f"http://u:p@127.0.0.1:{port}")
    conn = busmod.connect(BusSettings())
    try:
        channel = conn.channel()
        channel.queue_declare("cbmflow.extract", durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        for _ in range(4):
            channel.basic_publish("", "cbmflow.extract", b"{}", mandatory=True)
    finally:
        conn.close()
    assert service.queue_backlogs(["cbmflow.extract", "cbmflow.card"]) == {"cbmflow.extract": 4, "cbmflow.card": 0}
    assert service.current_backlog(("cbmflow.card",)) == 0


def test_a_removed_pools_local_workers_are_shown_and_drained_as_orphans(
    cbm_env: Any, local_pools: dict[str, LocalDriver]
) -> None:
    """Renaming or removing a pool must not leave its workers running unseen: no pool's step lists
    them, so `status` names them and `down --orphans` drains them, and only them."""
    [kept] = local_pools["extract"].start(1)
    old = service.make_driver(ProvisionSettings(pool="old", pools=[]))
    assert isinstance(old, LocalDriver)
    [orphan] = old.start(1)
    assert orphan.startswith("local-old-")

    status = CliRunner().invoke(provision_app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    out = json.loads(status.stdout)
    assert [(w["id"], w["pool"]) for w in out["orphans"]] == [(orphan, "old")]
    with pytest.raises(ConfigError, match="starts no worker"):
        service.orphan_driver().start(1)
    assert orphan not in {w["id"] for w in out["workers"]} and kept in {w["id"] for w in out["workers"]}
    assert "pools no longer configured (old)" in " ".join(_scale().stdout.split()), "scale names them too"
    assert old.list_workers()[0].id == orphan, "a live orphan is reported, never deleted by a step"

    both = CliRunner().invoke(provision_app, ["down", "--orphans", "--pool", "card"])
    assert both.exit_code != 0 and "takes no --pool" in both.output
    down = CliRunner().invoke(provision_app, ["down", "--orphans", "--wait", "20"])
    assert down.exit_code == 0, down.output
    assert f"draining 1 worker(s): {orphan}" in down.stdout and "all stopped" in down.stdout
    assert old.list_workers() == []
    assert [w.id for w in local_pools["extract"].list_workers()] == [kept], "a configured pool's worker is untouched"


def test_a_removed_pools_openstack_servers_are_deleted_only_once_their_worker_stopped(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orphans are servers tagged cbmflow-worker whose pool tag names no configured pool. A stop in
    our registry is the only proof a server is ours and done; one we do not know may belong to
    another deployment in the same project, so it is reported, not deleted."""
    monkeypatch.setenv("CBMFLOW_STATE_DIR", str(tmp_path / "state"))
    settings = ProvisionSettings(
        driver="openstack", cloud="cbmtest", pools=[PoolSettings(name="extract", job_kinds=["ExtractParcels"])]
    )
    with fake_cloud(tmp_path, monkeypatch) as cloud:
        cloud.add("cbmflow-extract-0000000a", ["cbmflow-worker", "cbmflow-pool-extract"])
        stopped = cloud.add("cbmflow-card-0000000b", ["cbmflow-worker", "cbmflow-pool-card"])
        tags = ["cbmflow-worker", "cbmflow-pool-card"]
        busy = cloud.add("cbmflow-card-0000000c", tags, metadata={"cbmflow-pool": "card"})
        foreign = cloud.add("cbmflow-other-0000000d", ["cbmflow-worker", "cbmflow-pool-other"])
        cloud.add("build-box", ["ci"])  # not a worker at all
        with db.transaction(pg_dsn) as cur:
            for name, state in (("cbmflow-card-0000000b", "stopped"), ("cbmflow-card-0000000c", "busy")):
                cur.execute("INSERT INTO workers (id, host, pid, state) VALUES (%s, 'h', 1, %s)", (name, state))
        monkeypatch.setenv("CBMFLOW_DB_DSN", pg_dsn)
        driver = service.orphan_driver(settings)
        views = {w.id: (w.pool, w.state) for w in driver.list_workers()}
        assert views == {
            "cbmflow-card-0000000b": ("card", "stopped"),
            "cbmflow-card-0000000c": ("card", "busy"),
            "cbmflow-other-0000000d": ("other", "starting"),
        }
        assert ("GET", "/v2.1/servers/detail?tags=cbmflow-worker") in cloud.calls()
        with pytest.raises(ConfigError, match="starts no worker"):
            driver.start(1)

        alive = service.reap_orphans(settings, driver)
        assert sorted(w.id for w in alive) == ["cbmflow-card-0000000c", "cbmflow-other-0000000d"]
        deletes = [r.path for r in cloud.mock.request_history if r.method == "DELETE"]
        assert deletes == [f"/v2.1/servers/{stopped}"], "only the server our registry saw stop"
        assert {busy, foreign} <= set(cloud.servers)
