"""Fixtures on real servers, never mocks: one throwaway PostgreSQL + PostGIS and RabbitMQ per test
session, started with the same code as ``cbmflow stack up``, on free loopback ports.

Isolation per test is cheap where it matters: a fresh database cloned from a migrated template
(``CREATE DATABASE ... TEMPLATE``, ~0.1 s instead of re-running migrations) and a fresh RabbitMQ
vhost. A missing server binary fails the session instead of skipping, so a CI machine without
the Debian packages can never report green.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest
import requests
import typer
from psycopg2 import sql
from stackfixtures import CbmEnv, Stack, free_ports, traversable_tmpdir

from cbmflow import db
from cbmflow.dev.stack import (
    StackError,
    start_postgres,
    start_rabbitmq,
    stop_postgres,
    stop_rabbitmq,
)
from cbmflow.settings import StackSettings

TEMPLATE_DB = "cbm_template"


@pytest.fixture(scope="session")
def free_ports_factory() -> Callable[[int], list[int]]:
    return free_ports


@pytest.fixture(scope="session", autouse=True)
def _no_developer_stack() -> Iterator[None]:
    """Point CBMFLOW_STATE_DIR away from ./.cbmflow, so no test ever reads a developer's stack.json
    and writes into the developer's own database by accident."""
    state = Path(tempfile.mkdtemp(prefix="cbmflow-test-state-"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CBMFLOW_STATE_DIR", str(state))
        yield
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """PostgreSQL 15 + PostGIS and RabbitMQ (+ management), started in parallel, torn down at the end."""
    settings = StackSettings()
    base = traversable_tmpdir("cbmflow-test-stack-")
    pg_port, amqp, mgmt, dist, epmd = free_ports(5)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pg_f = pool.submit(start_postgres, base / "postgres", pg_port, settings.run_as, "cbmflow", "cbmflow")
        rb_f = pool.submit(
            start_rabbitmq, base / "rabbitmq", amqp, mgmt, dist, epmd, settings.run_as, settings.consumer_timeout_ms
        )
        errors = [e for e in (pg_f.exception(), rb_f.exception()) if e is not None]

    def teardown() -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            stops = [pool.submit(stop_postgres, base / "postgres"), pool.submit(stop_rabbitmq, base / "rabbitmq")]
            for f in stops:
                f.result()
        shutil.rmtree(base, ignore_errors=True)

    if errors:
        teardown()
        exc = errors[0]
        if isinstance(exc, StackError):
            pytest.fail(f"the test stack could not start: {exc}", pytrace=False)
        raise exc
    try:
        yield Stack(base_dir=base, pg=pg_f.result(), rabbit=rb_f.result(), run_as=settings.run_as)
    finally:
        teardown()


def _admin(stack: Stack) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(stack.pg.dsn_for("postgres"), connect_timeout=10)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def pg_template(stack: Stack) -> str:
    """A database migrated once per session, cloned by every ``pg_dsn``."""
    conn = _admin(stack)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    finally:
        conn.close()
    db.migrate(stack.pg.dsn_for(TEMPLATE_DB))
    return TEMPLATE_DB


@pytest.fixture
def pg_dsn(stack: Stack, pg_template: str) -> Iterator[str]:
    """DSN of a fresh, migrated database for this test only; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = _admin(stack)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(pg_template))
            )
    finally:
        conn.close()
    try:
        yield stack.pg.dsn_for(name)
    finally:
        conn = _admin(stack)
        try:
            with conn.cursor() as cur:
                # a worker the test left behind may still be connected: cut it off first
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            conn.close()


@pytest.fixture
def rabbit_vhost(stack: Stack) -> Iterator[str]:
    """A fresh vhost for this test (its queues and messages vanish with it).

    The name contains a ``/`` on purpose: every URL built from it must percent-encode the vhost,
    and a component that forgets to would fail here rather than in production.
    """
    vhost = f"cbmflow/t-{uuid.uuid4().hex[:12]}"
    api = f"http://{stack.rabbit.host}:{stack.rabbit.management_port}/api"
    q = urllib.parse.quote(vhost, safe="")
    requests.put(f"{api}/vhosts/{q}", auth=stack.rabbit.auth, timeout=10).raise_for_status()
    requests.put(
        f"{api}/permissions/{q}/{urllib.parse.quote(stack.rabbit.user, safe='')}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
        auth=stack.rabbit.auth,
        timeout=10,
    ).raise_for_status()
    try:
        yield vhost
    finally:
        requests.delete(f"{api}/vhosts/{q}", auth=stack.rabbit.auth, timeout=30)


@pytest.fixture
def amqp_url(stack: Stack, rabbit_vhost: str) -> str:
    """AMQP URL of this test's vhost (percent-encoded in the path)."""
    return stack.rabbit.amqp_url_for(rabbit_vhost)


@pytest.fixture
def management_url(stack: Stack, rabbit_vhost: str) -> str:
    """Management API base URL with credentials; the vhost comes from ``amqp_url``."""
    return stack.rabbit.management_url


@pytest.fixture
def cbm_env(
    pg_dsn: str,
    amqp_url: str,
    management_url: str,
    rabbit_vhost: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> CbmEnv:
    """Environment of a component under test: its own database, vhost and state directory.

    Subprocesses started with ``os.environ`` (workers, the CLI) inherit it.
    """
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    monkeypatch.setenv("CBMFLOW_DB_DSN", pg_dsn)
    monkeypatch.setenv("CBMFLOW_BUS_AMQP_URL", amqp_url)
    monkeypatch.setenv("CBMFLOW_BUS_MANAGEMENT_URL", management_url)
    monkeypatch.setenv("CBMFLOW_STATE_DIR", str(state))
    return CbmEnv(dsn=pg_dsn, amqp_url=amqp_url, management_url=management_url, state_dir=state, vhost=rabbit_vhost)


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    """``cbmflow extract`` alone, for CliRunner (tests/test_extract.py, tests/test_s3.py)."""
    from worker import extract

    app = typer.Typer()
    extract.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the group
        pass

    return app
