"""The local stack on real servers: PostGIS, unprivileged processes, loopback-only listeners,
quorum queues, the consumer timeout, and the ``cbmflow stack`` CLI life cycle."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pika
import psycopg2
import pytest
import requests
from typer.testing import CliRunner

from cbmflow import settings as cbm_settings
from cbmflow.dev import stack as stackmod
from cbmflow.settings import BusSettings, DbSettings

LOOPBACK = {"127.0.0.1", "::1"}


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid if os.geteuid() == 0 else os.geteuid()


def _proc_uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def _non_loopback_ip() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_postgis_in_a_migrated_database(pg_dsn: str) -> None:
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT postgis_full_version()")
        assert 'POSTGIS="3.' in cur.fetchone()[0]
        cur.execute("SELECT ST_Area(ST_Transform(ST_MakeEnvelope(10, 50, 10.01, 50.01, 4326), 3035)) > 0")
        assert cur.fetchone()[0] is True
        cur.execute("SELECT name FROM schema_migrations ORDER BY name")
        assert cur.fetchone()[0] == "001_core.sql"
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone()[0] is True  # CREATE EXTENSION postgis needs it on the local stack
    conn.close()


def test_each_test_gets_its_own_database(stack: Any, pg_dsn: str) -> None:
    name = urllib.parse.urlparse(pg_dsn).path[1:]
    assert name.startswith("t_") and name != stack.pg.db_name
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database(), count(*) FROM scenes")
        assert cur.fetchone() == (name, 0)
    conn.close()


def test_servers_run_as_the_unprivileged_user(stack: Any, pg_dsn: str) -> None:
    uid = _uid_of(stack.run_as)
    assert uid != 0
    epmd = stackmod.pids_listening_on(stack.rabbit.epmd_port)
    assert epmd, "no epmd on the stack's private epmd port"
    for pid in [stack.pg.pid, stack.rabbit.pid, *epmd]:
        assert _proc_uids(pid) == [uid] * 4, pid
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:  # a backend, not just the postmaster
        cur.execute("SELECT pg_backend_pid()")
        assert _proc_uids(cur.fetchone()[0]) == [uid] * 4
    conn.close()


def test_servers_listen_on_loopback_only(stack: Any) -> None:
    pg = stackmod.listen_addresses(stack.pg.pid)
    assert pg == {("127.0.0.1", stack.pg.port)}
    beam = stackmod.listen_addresses(stack.rabbit.pid)
    r = stack.rabbit
    assert beam == {("127.0.0.1", r.amqp_port), ("127.0.0.1", r.management_port), ("127.0.0.1", r.dist_port)}
    (epmd_pid,) = stackmod.pids_listening_on(r.epmd_port)
    epmd = stackmod.listen_addresses(epmd_pid)
    assert epmd and {a for a, _ in epmd} <= LOOPBACK and {p for _, p in epmd} == {r.epmd_port}
    ip = _non_loopback_ip()
    if ip is not None:  # and from the outside, the ports are simply closed
        for port in (stack.pg.port, r.amqp_port, r.management_port, r.dist_port, r.epmd_port):
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()


def test_quorum_queue_round_trip(amqp_url: str, management_url: str, rabbit_vhost: str) -> None:
    assert urllib.parse.quote(rabbit_vhost, safe="") in amqp_url and "%2F" in amqp_url
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("roundtrip", durable=True, arguments={"x-queue-type": "quorum"})
        ch.basic_publish(
            "", "roundtrip", b"hello parcels", properties=pika.BasicProperties(delivery_mode=2), mandatory=True
        )
        body = None
        deadline = time.monotonic() + 10
        while body is None and time.monotonic() < deadline:
            method, _props, body = ch.basic_get("roundtrip")
            if method is None:
                time.sleep(0.05)
            else:
                ch.basic_ack(method.delivery_tag)
        assert body == b"hello parcels"
    finally:
        conn.close()
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    from cbmflow.bus import management_get

    q = management_get(bus, f"/api/queues/{urllib.parse.quote(rabbit_vhost, safe='')}/roundtrip")
    assert q["type"] == "quorum" and q["vhost"] == rabbit_vhost


def test_management_api_and_console(stack: Any, management_url: str) -> None:
    url = urllib.parse.urlparse(management_url)
    assert (url.hostname, url.port) == ("127.0.0.1", stack.rabbit.management_port)
    auth = (urllib.parse.unquote(url.username or ""), urllib.parse.unquote(url.password or ""))
    base = f"http://127.0.0.1:{url.port}"
    overview = requests.get(f"{base}/api/overview", auth=auth, timeout=10)
    assert overview.status_code == 200 and overview.json()["rabbitmq_version"].startswith("3.")
    assert "administrator" in str(requests.get(f"{base}/api/whoami", auth=auth, timeout=10).json()["tags"])
    assert requests.get(f"{base}/api/overview", auth=(auth[0], "wrong"), timeout=10).status_code == 401
    console = requests.get(stack.rabbit.console_url, timeout=10)
    assert console.status_code == 200 and "RabbitMQ" in console.text


def test_consumer_timeout_is_configured(stack: Any) -> None:
    res = stackmod.rabbitmqctl(stack.rabbit.base_dir, "eval", "application:get_env(rabbit, consumer_timeout).")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{{ok,{stack.rabbit.consumer_timeout_ms}}}"
    assert stack.rabbit.consumer_timeout_ms > 3600 * 1000  # above the longest job


def test_missing_binaries_name_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stackmod, "PG_BIN", tmp_path / "no-postgres")
    with pytest.raises(stackmod.StackError, match="postgresql-15"):
        stackmod.start_postgres(tmp_path / "pg", 1, "nobody")
    monkeypatch.setattr(stackmod, "RABBIT_BIN", tmp_path / "no-rabbit")
    with pytest.raises(stackmod.StackError, match="rabbitmq-server"):
        stackmod.start_rabbitmq(tmp_path / "rb", 1, 2, 3, 4, "nobody", 1000)
    monkeypatch.undo()
    monkeypatch.setattr(stackmod, "POSTGIS_CONTROL", tmp_path / "postgis.control")
    with pytest.raises(stackmod.StackError, match="postgresql-15-postgis-3"):
        stackmod.start_postgres(tmp_path / "pg", 1, "nobody")


@pytest.mark.skipif(os.geteuid() != 0, reason="run-as switching only applies to root")
def test_unreachable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(stackmod.StackError, match="cannot traverse"):
        stackmod.start_postgres(private / "pg", 1, "nobody")


def test_cli_up_is_idempotent_survives_a_crash_and_goes_down(
    free_ports_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = Path(tempfile.mkdtemp(prefix="cbmflow-test-cli-"))
    state.chmod(0o755)
    pg_port, amqp, mgmt, dist, epmd = free_ports_factory(5)
    monkeypatch.setenv("CBMFLOW_STATE_DIR", str(state / "state"))
    for name, port in (("PG", pg_port), ("AMQP", amqp), ("MANAGEMENT", mgmt), ("DIST", dist), ("EPMD", epmd)):
        monkeypatch.setenv(f"CBMFLOW_STACK_{name}_PORT", str(port))
    # a pid file left by a previous boot whose pid now belongs to an unrelated process: must be ignored
    (state / "state" / "rabbitmq" / "run").mkdir(parents=True)
    (state / "state" / "rabbitmq" / "run" / "rabbitmq.pid").write_text(str(os.getpid()))
    runner = CliRunner()
    try:
        res = runner.invoke(stackmod.app, ["up"])
        assert res.exit_code == 0, res.output
        stack_json = state / "state" / "stack.json"
        assert stat.S_IMODE(stack_json.stat().st_mode) == 0o600
        info = json.loads(stack_json.read_text())
        assert info["dsn"].startswith("postgresql://cbmflow:") and info["dsn"].endswith(f"@127.0.0.1:{pg_port}/cbmflow")
        assert info["amqp_url"].startswith("amqp://cbmflow:") and info["amqp_url"].endswith(f"@127.0.0.1:{amqp}/%2F")
        assert info["management_url"].startswith("http://cbmflow:") and info["management_url"].endswith(
            f"@127.0.0.1:{mgmt}"
        )
        assert cbm_settings.stack_info()["dsn"] == info["dsn"] == DbSettings().resolved_dsn()
        assert BusSettings().resolved_amqp_url() == info["amqp_url"]
        with psycopg2.connect(info["dsn"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, inet_server_addr()::text")
            assert cur.fetchone() == ("cbmflow", "127.0.0.1/32")
        conn.close()
        pika.BlockingConnection(pika.URLParameters(info["amqp_url"])).close()
        pg_pid, rb_pid = info["postgres"]["pid"], info["rabbitmq"]["pid"]

        again = runner.invoke(stackmod.app, ["up"])
        assert again.exit_code == 0, again.output
        assert "already running" in again.output
        info2 = json.loads(stack_json.read_text())
        assert (info2["dsn"], info2["amqp_url"]) == (info["dsn"], info["amqp_url"])
        assert (info2["postgres"]["pid"], info2["rabbitmq"]["pid"]) == (pg_pid, rb_pid)

        # PostgreSQL crashes: its postmaster.pid stays behind; `up` restarts it with the same DSN
        os.kill(pg_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while stackmod.pids_listening_on(pg_port) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # let its backends notice the postmaster is gone
        assert (state / "state" / "postgres" / "data" / "postmaster.pid").exists()
        third = runner.invoke(stackmod.app, ["up"])
        assert third.exit_code == 0, third.output
        info3 = json.loads(stack_json.read_text())
        assert info3["postgres"]["pid"] != pg_pid and info3["rabbitmq"]["pid"] == rb_pid
        assert info3["dsn"] == info["dsn"]
        with psycopg2.connect(info["dsn"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.close()

        st = runner.invoke(stackmod.app, ["status", "--json"])
        assert st.exit_code == 0, st.output
        data = json.loads(st.stdout)
        assert data["running"] is True and data["postgres"]["running"] and data["rabbitmq"]["running"]
        assert (data["dsn"], data["amqp_url"], data["management_url"]) == (
            info["dsn"],
            info["amqp_url"],
            info["management_url"],
        )
        table = runner.invoke(stackmod.app, ["status"])
        assert table.exit_code == 0 and f"http://127.0.0.1:{mgmt}/" in table.stdout
        assert info["management_url"].split("@")[0].split(":")[-1] not in table.stdout  # no password

        down = runner.invoke(stackmod.app, ["down"])
        assert down.exit_code == 0, down.output
        assert not stack_json.exists()
        for port in (pg_port, amqp, mgmt, dist, epmd):
            assert not stackmod.pids_listening_on(port), port
        after = json.loads(runner.invoke(stackmod.app, ["status", "--json"]).stdout)
        assert after["running"] is False and not after["postgres"]["running"] and not after["rabbitmq"]["running"]
        assert (state / "state" / "postgres" / "data" / "PG_VERSION").exists()  # data kept
    finally:
        stackmod.down(state / "state")
        shutil.rmtree(state, ignore_errors=True)
