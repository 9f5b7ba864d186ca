"""Least privilege on the real servers: the database roles `db migrate` creates, the login DSNs
`db role-dsn` hands out, and the broker users of `bus role-url`, each probed for what it must be
able to do and for what it must be refused."""

from __future__ import annotations

import functools
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg2
import psycopg2.errors
import pytest
import requests
import typer
from test_api import _seed
from typer.testing import CliRunner

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.ops.cli import register
from cbmflow.settings import BusSettings

SERVED = ("aois", "datasets", "scenes", "users", "user_grants", "api_tokens")
DATASET_TABLES = ("ms.parcels_2024", "ms.sigs_2024", "ms.hists_2024")
COLUMN = {  # a column of each table, so an UPDATE fails on privilege and not on its text
    "aois": "name",
    "datasets": "id",
    "scenes": "id",
    "users": "name",
    "user_grants": "aoi",
    "api_tokens": "id",
    **{t: "pid" for t in DATASET_TABLES},
}


def _cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _denied(dsn: str, statement: str, args: tuple[object, ...] = ()) -> bool:
    """True when PostgreSQL refuses ``statement`` for lack of privilege (even with writes allowed
    for the session, so the refusal is the role's, not a session default's)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SET default_transaction_read_only = off")
            try:
                cur.execute(statement, args)
            except psycopg2.errors.InsufficientPrivilege:
                return True
            return False
    finally:
        conn.rollback()
        conn.close()


def _one(dsn: str, statement: str) -> object:
    with db.transaction(dsn) as cur:
        cur.execute(statement)
        row = cur.fetchone()
        return row[0] if row else None


def test_migrate_creates_nologin_groups_and_role_dsn_rotates_a_scram_login(
    cbm_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.transaction(cbm_env.dsn) as cur:
        cur.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
            (list(db.ROLES.values()),),
        )
        assert cur.fetchall() == [("cbmflow_api", False), ("cbmflow_watcher", False), ("cbmflow_worker", False)]
    result = CliRunner().invoke(_cli(), ["db", "role-dsn", "api"])
    assert result.exit_code == 0, result.output
    first = result.stdout.strip()
    password = psycopg2.extensions.parse_dsn(first)["password"]
    assert _one(first, "SELECT current_user") == "cbmflow_api_login"
    assert _one(first, "SELECT pg_has_role('cbmflow_api', 'member')") is True
    # Only a SCRAM verifier is stored: the printed DSN is the one copy of the password.
    stored = str(_one(cbm_env.dsn, "SELECT rolpassword FROM pg_authid WHERE rolname = 'cbmflow_api_login'"))
    assert stored.startswith("SCRAM-SHA-256$") and password not in stored

    second = CliRunner().invoke(_cli(), ["db", "role-dsn", "api"]).stdout.strip()
    assert second != first and _one(second, "SELECT current_user") == "cbmflow_api_login"
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(first).close()
    bad = CliRunner().invoke(_cli(), ["db", "role-dsn", "owner"])
    assert bad.exit_code == 1 and "unknown role" in bad.output
    # Re-running migrate (nothing pending) re-applies grants without error.
    assert db.migrate(cbm_env.dsn) == []


def test_api_role_reads_what_it_serves_and_cannot_write(pg_dsn: str) -> None:
    _seed(pg_dsn)
    api = db.role_dsn(pg_dsn, "api")
    for table in (*SERVED, *DATASET_TABLES, "ms.parcels_2024_g"):
        assert isinstance(_one(api, f"SELECT count(*) FROM {table}"), int), table  # noqa: S608
    for table in (*SERVED, *DATASET_TABLES):
        assert _denied(api, f"DELETE FROM {table}"), table  # noqa: S608
        assert _denied(api, f"UPDATE {table} SET {COLUMN[table]} = {COLUMN[table]}"), table  # noqa: S608
    assert _denied(api, "INSERT INTO users (name, password_hash) VALUES ('mallory', 'x')")
    assert _denied(api, "INSERT INTO user_grants (user_name, aoi) VALUES ('alice', 'br')")
    assert _denied(api, "INSERT INTO api_tokens (id, user_name, secret_sha256) VALUES ('0', 'alice', '0')")
    assert _denied(api, "INSERT INTO ms.sigs_2024 (pid, scene_id, band, count) VALUES (1, 1, 'X', 1)")
    assert _denied(api, "CREATE TABLE ms.evil (x int)")
    assert _denied(api, "SELECT * FROM outbox") and _denied(api, "SELECT * FROM workers")
    # The shared login throttle (sql/015): its three functions only, never its table.
    assert _denied(api, "SELECT * FROM login_failures")
    assert _denied(api, "DELETE FROM login_failures")
    assert _denied(api, "INSERT INTO login_failures (kind, user_name, address) VALUES ('addr', '', 'x')")
    assert _one(api, "SELECT login_wait_s('alice', '192.0.2.1')") == 0
    with db.transaction(api) as cur:
        cur.execute("SET TRANSACTION READ WRITE")
        cur.execute("SELECT login_failed('alice', '192.0.2.1', '\\x01'::bytea, 0, 0, 60.0, 300.0)")
        assert 59 < cur.fetchone()[0] <= 60  # past an allowance of 0: locked for the base
        cur.execute("SELECT login_failed('bob', '192.0.2.2', '\\x02'::bytea, 0, 0, 1e12, 1e12)")
        assert 86_000 < cur.fetchone()[0] <= 86_400  # whatever the caller asks: at most a day
    assert 0 < float(str(_one(api, "SELECT login_wait_s('alice', '192.0.2.1')"))) <= 60
    # the owner's rows are intact
    assert _one(pg_dsn, "SELECT count(*) FROM users") == 3
    assert _one(pg_dsn, "SELECT count(*) FROM login_failures") == 4  # ('user', name, address) and ('addr', address)


def test_worker_role_writes_its_rows_and_cannot_read_users_or_tokens(pg_dsn: str) -> None:
    seed = _seed(pg_dsn)
    worker = db.role_dsn(pg_dsn, "worker")
    for table in ("users", "user_grants", "api_tokens", "outbox"):
        assert _denied(worker, f"SELECT * FROM {table}"), table  # noqa: S608
    scene = seed.scenes["may"]
    # What a worker does: lease the scene, replace its rows, mark it, register and heartbeat.
    with db.transaction(worker) as cur:
        cur.execute(
            "UPDATE scenes SET status = 'processing', lease_owner = 'w1', lease_until = now() WHERE id = %s", (scene,)
        )
        cur.execute("SELECT count(*) FROM ms.parcels_2024")
        cur.execute("DELETE FROM ms.sigs_2024 WHERE scene_id = %s", (scene,))
        cur.execute("DELETE FROM ms.hists_2024 WHERE scene_id = %s", (scene,))
        cur.execute(
            "INSERT INTO ms.sigs_2024 (pid, scene_id, band, count, mean) VALUES (1, %s, 'B04', 9, 0.5)", (scene,)
        )
        cur.execute("INSERT INTO ms.hists_2024 (pid, scene_id, class, count) VALUES (1, %s, 4, 9)", (scene,))
        cur.execute("UPDATE scenes SET status = 'extracted', rows_written = 1 WHERE id = %s", (scene,))
        cur.execute(
            "INSERT INTO workers (id, host, pid, state) VALUES ('w1', 'h', 1, 'busy')"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()"
        )
    assert _one(pg_dsn, f"SELECT count(*) FROM ms.sigs_2024 WHERE scene_id = {scene}") == 1  # noqa: S608
    assert _denied(worker, "DELETE FROM scenes")
    assert _denied(worker, "INSERT INTO ms.parcels_2024 (pid, parcel_id, geom) SELECT 99, 'x', geom FROM aois")
    assert _denied(worker, "UPDATE datasets SET srid = 4326")
    # A CARD job queues its scenes' extraction through the outbox: it may add rows, never read or mark them.
    assert _denied(worker, "SELECT body FROM outbox") and _denied(worker, "UPDATE outbox SET published_at = now()")
    assert _denied(worker, "DROP VIEW ms.sigs_2024")  # a view over the compact table since sql/011


def test_watcher_role_and_grants_follow_a_new_dataset(pg_dsn: str) -> None:
    _seed(pg_dsn)
    watcher, api, worker = (db.role_dsn(pg_dsn, r) for r in ("watcher", "api", "worker"))
    for table in ("users", "user_grants", "api_tokens", "ms.sigs_2024", "ms.parcels_2024"):
        assert _denied(watcher, f"SELECT * FROM {table}"), table  # noqa: S608
    with db.transaction(watcher) as cur:
        cur.execute(
            "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location)"
            " VALUES ('p-w', 'P_W', 'sentinel', 'S2A', 's2', %s, ST_Multi(ST_MakeEnvelope(9, 51, 10, 52, 4326)),"
            " '/x') RETURNING id",
            (datetime(2024, 7, 1, tzinfo=UTC),),
        )
        cur.execute("INSERT INTO outbox (message_id, kind, body) VALUES ('1', 'extract', '{}')")
        cur.execute("UPDATE outbox SET published_at = now()")
    assert _denied(watcher, "DELETE FROM scenes") and _denied(watcher, "UPDATE users SET is_admin = true")

    # A dataset imported after the login roles exist is readable by the API and writable by workers.
    with db.transaction(pg_dsn) as cur:
        cur.execute("INSERT INTO aois (name, geom) VALUES ('nl', ST_Multi(ST_MakeEnvelope(4, 51, 6, 53, 4326)))")
        db.ensure_dataset(cur, "nl", 2025, 28992)
    assert _one(api, "SELECT count(*) FROM nl.parcels_2025") == 0
    with db.transaction(worker) as cur:
        cur.execute("INSERT INTO nl.sigs_2025 (pid, scene_id, band, count) VALUES (1, 1, 'B04', 1)")
    assert _denied(api, "INSERT INTO nl.sigs_2025 (pid, scene_id, band, count) VALUES (2, 1, 'B04', 1)")


def _refused(action: object) -> int:
    """The AMQP reply code of the channel error ``action`` (a callable) provokes; 0 if none."""
    try:
        action()  # type: ignore[operator]
    except pika.exceptions.ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    return 0


def test_broker_users_per_role(cbm_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(_cli(), ["bus", "role-url", "worker"])
    assert result.exit_code == 0, result.output
    worker_url = result.stdout.strip()
    watcher_url = CliRunner().invoke(_cli(), ["bus", "role-url", "watcher"]).stdout.strip()
    assert urllib.parse.urlparse(worker_url).username == "cbmflow-worker"
    assert urllib.parse.unquote(urllib.parse.urlparse(worker_url).path[1:]) == cbm_env.vhost
    admin = BusSettings()

    # The watcher declares the topology and publishes a job; it cannot read dead letters nor declare
    # elsewhere. (It may read the job queue: RabbitMQ asks that of whoever declares a queue with a
    # dead-letter exchange.)
    watcher_bus = BusSettings(amqp_url=watcher_url, management_url="")
    with pika.BlockingConnection(busmod.connection_params(watcher_bus)) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        busmod.declare_topology(ch, watcher_bus)
        busmod.publish(ch, watcher_bus, b'{"scene_id": 1}', "1", "extract")
        assert _refused(lambda: conn.channel().basic_get(admin.dead_letter_queue)) == 403
        assert _refused(lambda: conn.channel().exchange_declare("evil", "fanout")) == 403

    worker_bus = BusSettings(amqp_url=worker_url, management_url="")
    with pika.BlockingConnection(busmod.connection_params(worker_bus)) as conn:
        ch = conn.channel()
        busmod.declare_topology(ch, worker_bus)  # what the worker does on start
        method, _, body = ch.basic_get(worker_bus.queue, auto_ack=False)
        assert method is not None and body == b'{"scene_id": 1}'
        ch.basic_reject(method.delivery_tag, requeue=False)  # dead-lettered by the broker, no publish right needed
        assert _refused(lambda: conn.channel().exchange_declare("evil", "fanout")) == 403
        assert _refused(lambda: conn.channel().queue_declare("evil")) == 403
        for exchange, key in (("amq.topic", "x"), ("", worker_bus.queue), ("", worker_bus.dead_letter_queue)):
            pub = conn.channel()
            pub.confirm_delivery()
            assert _refused(functools.partial(pub.basic_publish, exchange, key, b"forged")) == 403, exchange
        # (It may read the dead-letter queue: the workers reconcile it, see the chain test below.)
        assert _refused(lambda: conn.channel().queue_bind(worker_bus.queue, "amq.topic", "x")) == 403

    depth = None
    for _ in range(40):  # management figures are sampled every few seconds
        depth = busmod.queue_depth(admin)
        if depth.dead_lettered == 1:
            break
        time.sleep(0.5)
    assert depth is not None and depth.dead_lettered == 1 and depth.ready == 0

    # Neither role can use the management API.
    mgmt = urllib.parse.urlparse(cbm_env.management_url)
    for url in (worker_url, watcher_url):
        parsed = urllib.parse.urlparse(url)
        auth = (urllib.parse.unquote(parsed.username or ""), urllib.parse.unquote(parsed.password or ""))
        resp = requests.get(f"http://{mgmt.hostname}:{mgmt.port}/api/overview", auth=auth, timeout=10)
        assert resp.status_code == 401, resp.text


def test_the_chain_runs_on_role_credentials_alone(cbm_env: Any, tmp_path: Path) -> None:
    """Watcher and worker on their own database roles and broker users, the management API out of
    reach of both: every scene extracted, every row equal to the world's truth, and the workers'
    dead-letter reconciliation working within the worker's rights."""
    from card.testworld import generate
    from catalog_watcher.service import watch_once
    from cbmflow.dev.verify import verify_truth
    from cbmflow.parcels.ingest import add_aoi, import_parcels
    from cbmflow.settings import WatchSettings, WorkerSettings
    from worker.consumer import Worker
    from worker.deadletters import reconcile_dead_letters

    world = generate(tmp_path / "world", parcels=40, scenes=2, seed=5, aoi_name="ms", year=2024)
    with db.transaction(cbm_env.dsn) as cur:  # the operator, as owner
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
    admin = BusSettings()
    # management_url="" overrides the environment's: a component that reached for it would fail.
    watcher_bus = BusSettings(amqp_url=busmod.role_url(admin, "watcher"), management_url="")
    worker_bus = BusSettings(amqp_url=busmod.role_url(admin, "worker"), management_url="")
    watcher_dsn, worker_dsn = db.role_dsn(cbm_env.dsn, "watcher"), db.role_dsn(cbm_env.dsn, "worker")

    report = watch_once(
        dsn=watcher_dsn,
        bus=watcher_bus,
        settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0),
    )
    assert report.new == 2 and report.published == 2
    worker = Worker(dsn=worker_dsn, bus=worker_bus, settings=WorkerSettings(metrics_port=-1, backoff_max_s=1))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while _one(cbm_env.dsn, "SELECT count(*) FROM scenes WHERE status IN ('extracted', 'no_parcels')") != 2:
            assert time.monotonic() < deadline, _one(
                cbm_env.dsn, "SELECT string_agg(status || ':' || coalesce(reason, ''), '; ') FROM scenes"
            )
            time.sleep(0.2)
    finally:
        worker.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    tally = verify_truth(cbm_env.dsn, world.truth_path, "ms", 2024)
    assert tally.ok and tally.missing == 0 and tally.extra == 0 and tally.found == tally.expected > 40, tally

    # A letter in the dead-letter queue: the worker's reconciliation reads it and puts it back.
    with pika.BlockingConnection(busmod.connection_params(admin)) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", admin.dead_letter_queue, b'{"not": "a job"}', mandatory=True)
    result = reconcile_dead_letters(worker_dsn, worker_bus)
    assert result.letters == 1 and result.failed == []
    with pika.BlockingConnection(busmod.connection_params(admin)) as conn:
        assert conn.channel().queue_declare(admin.dead_letter_queue, passive=True).method.message_count == 1
