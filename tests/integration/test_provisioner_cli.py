"""`cbmflow provision` as an operator uses it: scale, status, drain, down, watch and logs on the local
driver against the real broker and worker; logs and exec over Fabric with the SSH side faked."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cbmflow import bus as busmod
from cbmflow.settings import BusSettings, ProvisionSettings
from provisioner import cli as cli_mod
from provisioner import service as service_mod
from provisioner import ssh
from provisioner.cli import provision_app
from provisioner.drivers.local import LocalDriver
from provisioner.policy import WorkerView

runner = CliRunner()


def _publish(n: int) -> None:
    settings = BusSettings()
    conn = busmod.connect(settings)
    try:
        channel = conn.channel()
        busmod.declare_topology(channel, settings)
        channel.confirm_delivery()
        for i in range(n):
            busmod.publish(channel, settings, b"{}", message_id=f"m-{i}", kind="ExtractParcels")
    finally:
        conn.close()


def _invoke(*args: str) -> Any:
    result = runner.invoke(provision_app, list(args))
    return result


def test_scale_status_drain_and_down_on_the_local_driver(cbm_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables to the terminal
    monkeypatch.setenv("CBMFLOW_PROVISION_MAX_WORKERS", "1")
    monkeypatch.setenv("CBMFLOW_WORKER_HEARTBEAT_S", "1")
    _publish(2)
    dry = _invoke("scale", "--dry-run", "--per-worker", "1", "--max", "3")
    assert dry.exit_code == 0, dry.output
    assert "scaling plan (dry run)" in dry.stdout and "(2 new)" in dry.stdout
    driver = service_mod.make_driver(ProvisionSettings())
    assert isinstance(driver, LocalDriver) and driver.list_workers() == [], "a dry run starts nothing"
    try:
        real = _invoke("scale", "--per-worker", "1")
        assert real.exit_code == 0, real.output
        [worker] = driver.list_workers()
        assert worker.id in real.stdout and "start" in real.stdout
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and driver.list_workers()[0].state not in ("idle", "busy"):
            time.sleep(0.2)
        status = _invoke("status", "--json")
        assert status.exit_code == 0, status.output
        seen = json.loads(status.stdout)
        [row] = seen["workers"]
        assert row["id"] == worker.id and row["state"] in ("idle", "busy") and row["server_status"] == "running"
        assert row["pool"] == "default"
        [pool] = seen["pools"]
        assert pool["pool"] == "default" and pool["queues"] == ["cbmflow.extract", "cbmflow.card"]
        assert pool["running"] + pool["booting"] == 1 and pool["draining"] == 0
        table = _invoke("status")
        assert worker.id in table.stdout and "job (scene)" in table.stdout
        logs = _invoke("logs", worker.id, "-n", "50")
        assert logs.exit_code == 0 and "worker.consuming" in logs.stdout
        refused = _invoke("exec", worker.id, "uptime")
        assert refused.exit_code == 2 and "run the command here" in refused.output
        assert _invoke("drain").exit_code == 2, "neither servers nor --all"
        assert "no such worker" in _invoke("drain", "nope").output
        drained = _invoke("drain", worker.id)
        assert drained.exit_code == 0 and f"draining 1 worker(s): {worker.id}" in drained.stdout
        down = _invoke("down", "--wait", "30")
        assert down.exit_code == 0 and "all stopped" in down.stdout, down.output
        assert driver.list_workers() == []
    finally:
        driver.wait_gone(driver.down(), 10.0)


def test_watch_runs_steps_until_told_to_stop(cbm_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plans = []
    real_step = service_mod.run_step

    def counting(*args: Any, **kwargs: Any) -> Any:
        plans.append(real_step(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(service_mod, "run_step", counting)
    result = _invoke("watch", "--interval", "0.2", "--iterations", "2")
    assert result.exit_code == 0, result.output
    assert [(p.backlog, p.want) for p, _ in plans] == [(0, 0), (0, 0)]


def test_watch_survives_a_failing_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken(*_: object) -> int:
        calls.append(1)
        raise RuntimeError("broker away")

    monkeypatch.setattr(service_mod, "current_backlog", broken)
    monkeypatch.setattr(service_mod, "make_driver", lambda settings: FakeFleet([]))
    result = _invoke("watch", "--interval", "0.05", "--iterations", "3")
    assert result.exit_code == 0, result.output
    assert len(calls) == 3, "every step ran, each failure was logged and survived"


class FakeFleet:
    def __init__(self, workers: list[WorkerView]) -> None:
        self.workers = workers

    def list_workers(self) -> list[WorkerView]:
        return self.workers

    def start(self, n: int) -> list[str]:
        return []

    def drain(self, ids: list[str]) -> list[str]:
        return ids

    def delete(self, ids: list[str]) -> list[str]:
        return ids

    def down(self) -> list[str]:
        return [w.id for w in self.workers]

    def headroom(self) -> int | None:
        return None


class FakeResult:
    def __init__(self, exited: int) -> None:
        self.exited = exited


class FakeConnection:
    """Stands in for fabric.Connection: records what would have run on the VM."""

    def __init__(self, host: str, exited: int = 0) -> None:
        self.host = host
        self.exited = exited
        self.ran: list[tuple[str, dict[str, Any]]] = []

    def run(self, command: str, **kwargs: Any) -> FakeResult:
        self.ran.append((command, kwargs))
        return FakeResult(self.exited)


@pytest.fixture
def vm_fleet(monkeypatch: pytest.MonkeyPatch) -> list[FakeConnection]:
    monkeypatch.setenv("CBMFLOW_PROVISION_DRIVER", "openstack")
    vm = WorkerView(id="cbmflow-default-0000beef", state="busy", server_status="ACTIVE", server_id="srv-1",
                    address="10.0.0.12")  # fmt: skip
    booting = WorkerView(id="cbmflow-default-0000cafe", state="starting", server_status="BUILD", server_id="srv-2")

    def fleet(settings: ProvisionSettings) -> FakeFleet:
        return FakeFleet([vm, booting])

    # provisioner.cli calls the make_driver it imported from provisioner.service: patch both names
    monkeypatch.setattr(service_mod, "make_driver", fleet)
    monkeypatch.setattr(cli_mod, "make_driver", fleet)
    made: list[FakeConnection] = []

    def connection(settings: ProvisionSettings, host: str) -> FakeConnection:
        made.append(FakeConnection(host, exited=3))
        return made[-1]

    monkeypatch.setattr(ssh, "connection", connection)
    return made


def test_logs_and_exec_go_over_ssh_to_the_servers_address(vm_fleet: list[FakeConnection]) -> None:
    logs = _invoke("logs", "srv-1", "-n", "50")
    assert logs.exit_code == 3, "the remote exit status is passed on"
    [conn] = vm_fleet
    assert conn.host == "10.0.0.12"
    command, kwargs = conn.ran[0]
    assert command == (
        "sudo -n sh -c 'if [ -d /run/systemd/system ]; then journalctl -u cbmflow-worker.service -n 50 --no-pager"
        " -o cat; else tail -n 50 /var/log/cbmflow-worker.log; fi'"
    )
    assert kwargs == {"hide": False, "warn": True}
    boot = _invoke("logs", "cbmflow-default-0000beef", "--boot")
    assert boot.exit_code == 3 and vm_fleet[1].ran[0][0] == "sudo -n sh -c 'tail -n 200 /var/log/cloud-init-output.log'"
    ran = _invoke("exec", "cbmflow-default-0000beef", "--", "systemctl", "is-active", "cbmflow-worker")
    assert ran.exit_code == 3 and vm_fleet[2].ran[0][0] == "systemctl is-active cbmflow-worker"
    quoted = _invoke("exec", "srv-1", "df -h / && free -m")
    assert vm_fleet[3].ran[0][0] == "df -h / && free -m" and quoted.exit_code == 3
    no_address = _invoke("exec", "cbmflow-default-0000cafe", "uptime")
    assert no_address.exit_code == 2 and "has no address yet (status BUILD)" in no_address.output
    assert len(vm_fleet) == 4


def test_ssh_connection_uses_the_key_and_the_bastion() -> None:
    settings = ProvisionSettings(ssh_user="debian", ssh_key_file="/keys/worker", ssh_gateway="ops@bastion.example")
    conn = ssh.connection(settings, "10.0.0.12")
    assert (conn.host, conn.user, conn.port) == ("10.0.0.12", "debian", 22)
    assert conn.connect_kwargs == {"key_filename": ["/keys/worker"], "look_for_keys": False}
    assert conn.connect_timeout == ssh.CONNECT_TIMEOUT_S
    assert (conn.gateway.host, conn.gateway.user) == ("bastion.example", "ops")
    plain = ssh.connection(ProvisionSettings(ssh_user="root"), "192.0.2.1")
    assert plain.gateway is None and plain.connect_kwargs == {}
    assert not ssh.logs_command(10, False, "root").startswith("sudo")


def test_render_userdata_example_variants(tmp_path: Path) -> None:
    for install in ("wheel", "index", "preinstalled"):
        result = _invoke("render-userdata", "--example", "--install", install)
        assert result.exit_code == 0, result.output
        assert result.stdout == (Path(__file__).resolve().parents[2] / "cloud-init" / {
            "wheel": "worker.example.yaml", "index": "worker.index.example.yaml",
            "preinstalled": "worker.preinstalled.example.yaml"}[install]).read_text()  # fmt: skip
    assert _invoke("render-userdata", "--example", "--install", "docker").exit_code == 2
