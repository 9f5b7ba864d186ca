"""The stack from a private home: root's checkout under a 0700 directory (``/root``) still runs its
servers as the unprivileged user, with their data where that user can reach it."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from typer.testing import CliRunner

from cbmflow.dev import stack as stackmod
from cbmflow.settings import StackSettings


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def test_state_dir_under_a_0700_home_keeps_server_data_where_run_as_reaches_it(
    free_ports_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root required, and never skipped: the case only exists for root (tests run as root here and in CI).
    assert os.geteuid() == 0, "this test needs root: it checks the servers' switch to the run-as user"
    run_as = StackSettings().run_as
    nobody = pwd.getpwnam(run_as)
    home = Path(tempfile.mkdtemp(prefix="cbmflow-test-privhome-"))  # 0700, like /root
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    state = home / "cbmflow" / ".cbmflow"
    monkeypatch.setenv("CBMFLOW_STATE_DIR", str(state))
    ports = free_ports_factory(5)
    for name, port in zip(("PG", "AMQP", "MANAGEMENT", "DIST", "EPMD"), ports, strict=True):
        monkeypatch.setenv(f"CBMFLOW_STACK_{name}_PORT", str(port))
    elsewhere = stackmod.system_home(state)
    assert elsewhere.parent == Path(StackSettings().data_root) and elsewhere.name.startswith("cbmflow-")
    runner = CliRunner()
    try:
        up = runner.invoke(stackmod.app, ["up"])
        assert up.exit_code == 0, up.output
        assert "cannot traverse" not in up.output

        # the credentials stay in the checkout, private to root; the servers' data is elsewhere
        stack_json = state / stackmod.STACK_JSON
        assert stat.S_IMODE(stack_json.stat().st_mode) == 0o600 and stack_json.stat().st_uid == 0
        info = json.loads(stack_json.read_text())
        assert info["data_home"] == str(elsewhere) == (state / stackmod.STACK_HOME).read_text().strip()
        assert not (state / "postgres").exists() and not (state / "rabbitmq").exists()
        for d in (elsewhere, elsewhere.parent, elsewhere.parent.parent):
            assert stat.S_IMODE(d.stat().st_mode) & 0o005 == 0o005, d  # run_as can traverse the way there
        for data in (elsewhere / "postgres" / "data", elsewhere / "rabbitmq" / "mnesia"):
            assert data.stat().st_uid == nobody.pw_uid, data
        for pid in (info["postgres"]["pid"], info["rabbitmq"]["pid"]):
            assert _uids(pid) == [nobody.pw_uid] * 4
        with psycopg2.connect(info["dsn"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_setting('data_directory')")
            assert cur.fetchone()[0] == str(elsewhere / "postgres" / "data")
        conn.close()

        st = runner.invoke(stackmod.app, ["status", "--json"])
        data = json.loads(st.stdout)
        assert data["running"] is True and data["data_home"] == str(elsewhere)
        assert data["state_dir"] == str(state) and data["dsn"] == info["dsn"]
        table = runner.invoke(stackmod.app, ["status"], env={"COLUMNS": "200"})
        assert f"server data: {elsewhere}" in table.stdout, table.stdout

        down = runner.invoke(stackmod.app, ["down"])
        assert down.exit_code == 0 and "postgres: stopped" in down.stdout and "rabbitmq: stopped" in down.stdout
        after = json.loads(runner.invoke(stackmod.app, ["status", "--json"]).stdout)
        assert after["running"] is False and after["data_home"] == str(elsewhere)
        assert (elsewhere / "postgres" / "data" / "PG_VERSION").exists()  # data kept for the next `up`
        for port in ports:
            assert not stackmod.pids_listening_on(port), port

        again = runner.invoke(stackmod.app, ["up"])  # the same home and the same credentials
        assert again.exit_code == 0, again.output
        assert json.loads(stack_json.read_text())["dsn"] == info["dsn"]
    finally:
        stackmod.down(state)
        shutil.rmtree(elsewhere, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_traversable_state_dir_keeps_its_data() -> None:
    """The usual case is unchanged: a state dir the servers' user reaches holds their data itself."""
    state = Path(tempfile.mkdtemp(prefix="cbmflow-test-home-"))
    try:
        state.chmod(0o755)
        assert stackmod.data_home(state, starting=True) == state
        assert stackmod.data_home(state) == state
    finally:
        shutil.rmtree(state)
