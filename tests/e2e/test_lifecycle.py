"""Nothing left behind: the demo and ``cbmflow stack down`` stop the workers they started, and a
worker whose broker and database are both gone for good exits instead of retrying forever."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from stackfixtures import CbmEnv, free_ports, traversable_tmpdir

from cbmflow.dev import stack as stackmod
from provisioner.drivers.local import LocalDriver, local_worker_command
from provisioner.userdata import render_userdata, worker_env

CBMFLOW = str(Path(sys.executable).parent / "cbmflow")
EXIT_UNREACHABLE = 75


def _processes_referring_to(marker: str) -> dict[int, str]:
    """Live processes whose command line or environment mentions ``marker`` (ours excepted)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and (marker.encode() in cmdline or marker.encode() in environ):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def _events(log_text: str, event: str) -> list[dict[str, Any]]:
    out = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == event:
                out.append(rec)
    return out


def _stack_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBMFLOW_")}
    env["CBMFLOW_STATE_DIR"] = str(state)
    for name, port in zip(("PG", "AMQP", "MANAGEMENT", "DIST", "EPMD"), free_ports(5), strict=True):
        env[f"CBMFLOW_STACK_{name}_PORT"] = str(port)
    return env


@pytest.mark.timeout(600)
def test_demo_then_stack_down_leaves_no_process_behind() -> None:
    base = traversable_tmpdir("cbmflow-test-lifecycle-")
    state = base / "state"
    env = _stack_env(state)
    try:
        t0 = time.monotonic()
        demo = subprocess.run(
            [CBMFLOW, "demo", "--no-serve", "--parcels", "30", "--scenes", "2", "--workers", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "verification against truth.csv" in demo.stdout
        logs = sorted((state / "workers").glob("*.log"))
        assert logs, "the demo started no local worker"
        # the demo drained and stopped its own workers before it returned: each logged a clean stop
        for log in logs:
            assert _events(log.read_text(), "worker.stopped"), log.read_text()[-2000:]
        assert not list((state / "workers").glob("*.pid"))
        down = subprocess.run(
            [CBMFLOW, "stack", "down"], env=env, capture_output=True, text=True, timeout=180, check=False
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert "postgres: stopped" in down.stdout and "rabbitmq: stopped" in down.stdout
        time.sleep(1.0)  # let the last children of the servers be reaped
        left = _processes_referring_to(str(state))
        assert left == {}, f"processes still refer to {state}: {left}"
        print(f"demo + stack down: {time.monotonic() - t0:.1f} s")
    finally:
        stackmod.down(state)
        shutil.rmtree(base, ignore_errors=True)


def test_worker_with_broker_and_database_gone_exits_nonzero_in_time(tmp_path: Path) -> None:
    closed_pg, closed_amqp = free_ports(2)  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBMFLOW_")}
    env.update(
        CBMFLOW_STATE_DIR=str(tmp_path),
        CBMFLOW_DB_DSN=f"postgresql://nobody:x@127.0.0.1:{closed_pg}/cbmflow",
        CBMFLOW_BUS_AMQP_URL=f"amqp://nobody:x@127.0.0.1:{closed_amqp}/%2F",
        CBMFLOW_BUS_MANAGEMENT_URL=f"http://nobody:x@127.0.0.1:{closed_amqp}",
        CBMFLOW_WORKER_UNREACHABLE_EXIT_S="4",
        CBMFLOW_WORKER_METRICS_PORT="-1",
        CBMFLOW_WORKER_ID="unreachable-test",
        CBMFLOW_LOG_FORMAT="json",
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([CBMFLOW, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert rc == EXIT_UNREACHABLE, text[-3000:]
    (gave_up,) = _events(text, "worker.giving_up")
    assert 4 <= gave_up["unreachable_s"] < 4 + 3, gave_up  # the backoff is cut short at the deadline
    assert gave_up["level"] == "error" and gave_up["exit_code"] == EXIT_UNREACHABLE
    reconnects = _events(text, "worker.reconnect")
    assert reconnects and all(r["database_reachable"] is False for r in reconnects)
    (stopped,) = _events(text, "worker.stopped")
    assert stopped["exit_code"] == EXIT_UNREACHABLE


def test_worker_keeps_retrying_a_gone_broker_while_the_database_answers(cbm_env: CbmEnv, tmp_path: Path) -> None:
    """Only both gone counts: a broker outage alone (the database answers) is waited out."""
    (closed_amqp,) = free_ports(1)
    env = {
        **os.environ,
        "CBMFLOW_BUS_AMQP_URL": f"amqp://nobody:x@127.0.0.1:{closed_amqp}/%2F",
        "CBMFLOW_WORKER_UNREACHABLE_EXIT_S": "2",
        "CBMFLOW_WORKER_METRICS_PORT": "-1",
        "CBMFLOW_WORKER_ID": "broker-only-test",
        "CBMFLOW_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([CBMFLOW, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(_events(log_path.read_text(), "worker.reconnect")) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.3)
        reconnects = _events(log_path.read_text(), "worker.reconnect")
        assert len(reconnects) >= 3 and reconnects[-1]["database_reachable"] is True
        time.sleep(3)  # past the 2 s limit: still running
        assert proc.poll() is None, log_path.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not _events(log_path.read_text(), "worker.giving_up")


def test_stack_down_stops_a_running_local_worker(cbm_env: CbmEnv) -> None:
    """``stack down`` first drains the state directory's local workers (they exit 0, cleanly)."""
    driver = LocalDriver(
        cbm_env.state_dir / "workers",
        userdata=render_userdata(
            {**worker_env(), "CBMFLOW_WORKER_METRICS_PORT": "-1", "CBMFLOW_LOG_FORMAT": "json"},
            worker_command=local_worker_command(),
        ),
        dsn=cbm_env.dsn,
    )
    (worker_id,) = driver.start(1)
    pid = driver.list_workers()[0].pid
    assert pid is not None
    log = driver.log_path(worker_id)
    try:
        deadline = time.monotonic() + 60
        while not _events(log.read_text(), "worker.consuming") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _events(log.read_text(), "worker.consuming"), log.read_text()[-3000:]
        result = stackmod.down(cbm_env.state_dir)  # no servers of its own here: only the workers
        assert result["workers"] == [worker_id]
        assert driver.list_workers() == []
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
        (stopped,) = _events(log.read_text(), "worker.stopped")
        assert stopped["exit_code"] == 0
        assert _events(log.read_text(), "worker.signal")[0]["signal"] == "SIGTERM"
    finally:
        driver.delete([worker_id])
