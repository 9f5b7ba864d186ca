"""Fault tests on real servers: kill -9 a worker mid-scene, restart RabbitMQ and PostgreSQL
mid-run, poison input, a broker-enforced consumer_timeout, and many scenes over two workers.

Every test ends with exact counts against the generator's truth: for each scene, the signature
rows found equal the truth's rows for that product (so none is missing and none is written
twice), plus the queue and the dead-letter queue hold exactly what they should.

The module runs its own throwaway PostgreSQL and RabbitMQ (same code as ``cbmflow stack up``, on
free ports), because two tests restart them and the session's servers are shared with other
tests. "Mid-scene" is made deterministic without any test hook in the worker: the test holds an
ACCESS EXCLUSIVE lock on the signatures table, so every worker stops inside its write
transaction (after reading and reducing the rasters, before its commit), and the test can see it
there in ``pg_stat_activity`` before pulling the plug.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg2
import psycopg2.extensions
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql

from card.testworld import generate
from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.dev import stack as stackmod
from cbmflow.dev.verify import verify_truth
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import BusSettings, StackSettings, WatchSettings

CBMFLOW = str(Path(sys.executable).parent / "cbmflow")
TEMPLATE = "fault_template"
YEAR = 2024

# Short lease and heartbeat so that a crashed worker's scene is taken over in seconds; documented
# settings, nothing test-only.
WORKER_ENV = {
    "CBMFLOW_WORKER_LEASE_S": "6",
    "CBMFLOW_WORKER_HEARTBEAT_S": "1",
    "CBMFLOW_WORKER_BACKOFF_MAX_S": "2",
    "CBMFLOW_WORKER_STOP_DEADLINE_S": "30",
    "CBMFLOW_LOG_LEVEL": "INFO",
}


# ------------------------------------------------------------------------------------------
# A dedicated stack for this module
# ------------------------------------------------------------------------------------------


@dataclass
class FaultStack:
    base: Path
    pg: stackmod.PgInfo
    rabbit: stackmod.RabbitInfo
    run_as: str
    ports: dict[str, int]

    def restart_rabbitmq(self, while_down: Callable[[], Any] | None = None) -> Any:
        """Stop the broker, run ``while_down``, start it again on the same ports and credentials."""
        assert stackmod.stop_rabbitmq(self.base / "rabbitmq")
        try:
            result = while_down() if while_down else None
        finally:  # the module's later tests need the broker back, whatever happened meanwhile
            info = stackmod.start_rabbitmq(
                self.base / "rabbitmq",
                self.ports["amqp"],
                self.ports["mgmt"],
                self.ports["dist"],
                self.ports["epmd"],
                self.run_as,
                StackSettings().consumer_timeout_ms,
            )
        assert (info.amqp_port, info.password) == (self.rabbit.amqp_port, self.rabbit.password)
        self.rabbit = info
        return result

    def restart_postgres(self, down_s: float) -> None:
        assert stackmod.stop_postgres(self.base / "postgres")
        try:
            time.sleep(down_s)
        finally:
            info = stackmod.start_postgres(self.base / "postgres", self.ports["pg"], self.run_as, "cbmflow", "cbmflow")
        assert (info.port, info.password) == (self.pg.port, self.pg.password)
        self.pg = info

    def rabbitmqctl_eval(self, expr: str) -> str:
        res = stackmod.rabbitmqctl(self.base / "rabbitmq", "eval", expr)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()


@pytest.fixture(scope="module")
def fault_stack(free_ports_factory: Callable[[int], list[int]]) -> Iterator[FaultStack]:
    run_as = StackSettings().run_as
    base = Path(tempfile.mkdtemp(prefix="cbmflow-fault-stack-"))
    base.chmod(0o755)
    pg_port, amqp, mgmt, dist, epmd = free_ports_factory(5)
    ports = {"pg": pg_port, "amqp": amqp, "mgmt": mgmt, "dist": dist, "epmd": epmd}
    timeout_ms = StackSettings().consumer_timeout_ms
    with ThreadPoolExecutor(max_workers=2) as pool:
        pg_f = pool.submit(stackmod.start_postgres, base / "postgres", pg_port, run_as, "cbmflow", "cbmflow")
        rb_f = pool.submit(stackmod.start_rabbitmq, base / "rabbitmq", amqp, mgmt, dist, epmd, run_as, timeout_ms)
        errors = [e for e in (pg_f.exception(), rb_f.exception()) if e is not None]
    try:
        if errors:
            raise errors[0]
        pg = pg_f.result()
        admin = psycopg2.connect(pg.dsn_for("postgres"))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
        admin.close()
        db.migrate(pg.dsn_for(TEMPLATE))
        yield FaultStack(base=base, pg=pg, rabbit=rb_f.result(), run_as=run_as, ports=ports)
    finally:
        with ThreadPoolExecutor(max_workers=2) as pool:
            for f in [
                pool.submit(stackmod.stop_postgres, base / "postgres"),
                pool.submit(stackmod.stop_rabbitmq, base / "rabbitmq"),
            ]:
                f.result()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Env:
    dsn: str
    bus: BusSettings
    vhost: str
    stack: FaultStack
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            **WORKER_ENV,
            "CBMFLOW_DB_DSN": self.dsn,
            "CBMFLOW_BUS_AMQP_URL": self.bus.amqp_url,
            "CBMFLOW_BUS_MANAGEMENT_URL": self.bus.management_url,
            "CBMFLOW_BUS_DELIVERY_LIMIT": str(self.bus.delivery_limit),
        }

    # ---- workers ---------------------------------------------------------------------------
    def start_worker(self, wid: str, **settings: str) -> subprocess.Popen[bytes]:
        environ = {**self.environ, **settings, "CBMFLOW_WORKER_ID": wid}
        with (self.logs / f"{wid}.log").open("ab") as out:
            proc = subprocess.Popen([CBMFLOW, "worker"], env=environ, stdout=out, stderr=subprocess.STDOUT)
        self.procs[wid] = proc
        return proc

    def stop_workers(self, timeout_s: float = 40) -> dict[str, int]:
        """SIGTERM every live worker and return their exit codes (a clean drain exits 0)."""
        live = {wid: p for wid, p in self.procs.items() if p.poll() is None}
        for p in live.values():
            p.send_signal(signal.SIGTERM)
        return {wid: p.wait(timeout=timeout_s) for wid, p in live.items()}

    def events(self, wid: str, event: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in (self.logs / f"{wid}.log").read_text(errors="replace").splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if event is None or rec.get("event") == event:
                    found.append(rec)
        return found

    def all_events(self, event: str) -> list[dict[str, Any]]:
        return [e for wid in self.procs for e in self.events(wid, event)]

    def log_tail(self) -> str:
        return "\n".join(f"--- {w}\n" + (self.logs / f"{w}.log").read_text()[-3000:] for w in self.procs)

    def metrics(self, wid: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The worker's /metrics, found through its registry row."""
        with tx(self.dsn) as cur:
            cur.execute("SELECT host, metrics_port FROM workers WHERE id = %s", (wid,))
            row = cur.fetchone()
        assert row is not None and row[1], f"{wid} registered no metrics port"
        text = requests.get(f"http://127.0.0.1:{row[1]}/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    # ---- broker ----------------------------------------------------------------------------
    def ready(self, queue: str) -> int:
        """Ready messages by passive declare: exact and instant, unlike the sampled management API."""
        conn = pika.BlockingConnection(pika.URLParameters(self.bus.amqp_url))
        try:
            return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
        finally:
            conn.close()

    def dead_letters(self) -> list[dict[str, Any]]:
        """The dead-letter queue's messages, peeked through the management API (not our own code)."""
        m = urllib.parse.urlparse(self.bus.management_url)
        url = (
            f"http://{m.hostname}:{m.port}/api/queues/{urllib.parse.quote(self.vhost, safe='')}/"
            f"{urllib.parse.quote(self.bus.dead_letter_queue, safe='')}/get"
        )
        body = {"count": 100, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 50000}
        resp = requests.post(url, json=body, auth=self.stack.rabbit.auth, timeout=10)
        resp.raise_for_status()
        return list(resp.json())


@pytest.fixture
def env(fault_stack: FaultStack, tmp_path: Path) -> Iterator[Env]:
    """A fresh database (from the migrated template) and vhost on the module's stack."""
    name = f"f_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(fault_stack.pg.dsn_for("postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))
    admin.close()
    rabbit = fault_stack.rabbit
    vhost = f"cbmflow/f-{uuid.uuid4().hex[:10]}"
    api = f"http://{rabbit.host}:{rabbit.management_port}/api"
    q = urllib.parse.quote(vhost, safe="")
    requests.put(f"{api}/vhosts/{q}", auth=rabbit.auth, timeout=10).raise_for_status()
    requests.put(
        f"{api}/permissions/{q}/{rabbit.user}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
        auth=rabbit.auth,
        timeout=10,
    ).raise_for_status()
    logs = tmp_path / "logs"
    logs.mkdir()
    bus = BusSettings(amqp_url=rabbit.amqp_url_for(vhost), management_url=rabbit.management_url)
    e = Env(dsn=fault_stack.pg.dsn_for(name), bus=bus, vhost=vhost, stack=fault_stack, logs=logs)
    try:
        yield e
    finally:
        for p in e.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        requests.delete(f"{api}/vhosts/{q}", auth=fault_stack.rabbit.auth, timeout=30)
        admin = psycopg2.connect(fault_stack.pg.dsn_for("postgres"))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


# ------------------------------------------------------------------------------------------
# The world and its truth
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fault-world")
    generate(out, parcels=40, scenes=50, seed=11, aoi_name="ms", year=YEAR)
    return out


@dataclass
class Staged:
    root: Path
    catalog: Path
    products: list[str]
    truth: Path
    truth_rows: dict[str, int]

    def product_dir(self, product: str) -> Path:
        return self.root / "products" / f"{product}.SAFE"


def stage(world: Path, dest: Path, k: int, first: int = 0) -> Staged:
    """A copy of ``k`` of the world's products with a catalogue and a truth of just those, so that
    each test owns its files (one of them corrupts a raster)."""
    names = sorted(p.name.removesuffix(".SAFE") for p in (world / "products").iterdir())[first : first + k]
    assert len(names) == k
    (dest / "products").mkdir(parents=True, exist_ok=True)
    for n in names:
        if not (dest / "products" / f"{n}.SAFE").exists():
            shutil.copytree(world / "products" / f"{n}.SAFE", dest / "products" / f"{n}.SAFE")
    stac = dest / f"stac{k}"  # at the same depth as the world's, so relative product hrefs hold
    shutil.copytree(world / "stac", stac)
    coll_path = stac / "sentinel-2-l2a" / "collection.json"
    coll = json.loads(coll_path.read_text())
    coll["links"] = [
        link for link in coll["links"] if link["rel"] != "item" or any(f"/{n}/" in link["href"] for n in names)
    ]
    coll_path.write_text(json.dumps(coll))
    rows: Counter[str] = Counter()
    truth = dest / f"truth{k}.csv"
    with (world / "truth.csv").open() as src, truth.open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        for r in reader:
            if r["product_id"] in names:
                writer.writerow(r)
                rows[r["product_id"]] += 1
    assert set(rows) == set(names)
    return Staged(dest, stac / "catalog.json", names, truth, dict(rows))


@contextmanager
def tx(dsn: str) -> Iterator[psycopg2.extensions.cursor]:
    """A test-side transaction that cannot hang the suite: pytest-timeout cannot interrupt a
    query blocked in libpq, so every lock wait and statement of the test itself is bounded."""
    conn = psycopg2.connect(dsn, connect_timeout=10, options="-c lock_timeout=20s -c statement_timeout=60s")
    try:
        with conn, conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def import_world(dsn: str, world: Path) -> None:
    with tx(dsn) as cur:
        add_aoi(cur, "ms", world / "aoi.geojson")
        import_parcels(cur, world / "parcels.gpkg", "ms", YEAR)


def watch(e: Env, catalog: Path) -> Any:
    return watch_once(dsn=e.dsn, bus=e.bus, settings=WatchSettings(catalog_url=str(catalog), lookback_days=0))


def rows_by_product(dsn: str) -> dict[str, int]:
    """Signature rows per scene, scenes without rows included (as 0)."""
    with tx(dsn) as cur:
        cur.execute(
            "SELECT s.product_id, count(g.scene_id) FROM scenes s LEFT JOIN ms.sigs_2024 g ON g.scene_id = s.id"
            " GROUP BY s.product_id"
        )
        return {p: int(n) for p, n in cur.fetchall()}


def scenes(dsn: str) -> dict[str, tuple[int, str, int, str | None]]:
    """product_id -> (scene id, status, attempts, reason)."""
    with tx(dsn) as cur:
        cur.execute("SELECT product_id, id, status, attempts, reason FROM scenes")
        return {r[0]: (int(r[1]), r[2], int(r[3]), r[4]) for r in cur.fetchall()}


def statuses(dsn: str) -> Counter[str]:
    return Counter(s[1] for s in scenes(dsn).values())


def wait_for(what: str, pred: Callable[[], Any], timeout_s: float, e: Env | None = None, every_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what}" + (f"\n{e.log_tail()}" if e else "")
            )
        time.sleep(every_s)


class SigsLock:
    """Holds ACCESS EXCLUSIVE on the signatures table: workers stop inside their write transaction."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg2.connect(dsn, options="-c lock_timeout=20s")
        with self.conn.cursor() as cur:
            cur.execute("LOCK TABLE ms.sigs_2024 IN ACCESS EXCLUSIVE MODE")

    def blocked_writers(self) -> int:
        with tx(self.dsn) as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM \"ms\".\"sigs_2024_obs\"%'"
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def release(self) -> None:
        try:
            self.conn.rollback()
            self.conn.close()
        except psycopg2.Error:
            pass  # the server was restarted under us: the lock went with it


def processing(dsn: str) -> dict[int, str]:
    with tx(dsn) as cur:
        cur.execute("SELECT id, lease_owner FROM scenes WHERE status = 'processing'")
        return {int(r[0]): str(r[1]) for r in cur.fetchall()}


def lease_until(dsn: str, scene_id: int) -> Any:
    with tx(dsn) as cur:
        cur.execute("SELECT lease_until FROM scenes WHERE id = %s", (scene_id,))
        row = cur.fetchone()
    return row[0] if row else None


def _state(e: Env, wid: str) -> str | None:
    with tx(e.dsn) as cur:
        cur.execute("SELECT state FROM workers WHERE id = %s", (wid,))
        row = cur.fetchone()
    return str(row[0]) if row else None


def assert_exact(e: Env, staged: Staged) -> dict[str, int]:
    """Every scene's rows equal the truth's, none missing, none extra; returns the per-scene rows."""
    found = rows_by_product(e.dsn)
    assert found == staged.truth_rows, {p: (found.get(p), n) for p, n in staged.truth_rows.items() if found.get(p) != n}
    tally = verify_truth(e.dsn, staged.truth, "ms", YEAR)
    assert (tally.expected, tally.found, tally.missing, tally.extra) == (
        sum(staged.truth_rows.values()),
        sum(staged.truth_rows.values()),
        0,
        0,
    ), tally
    assert tally.ok, tally
    return found


def report(name: str, **figures: Any) -> None:
    """The figures the issue's closing note asks for, printed for ``pytest -s`` and the CI log."""
    print(f"\n[fault] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), file=sys.stderr)


# ------------------------------------------------------------------------------------------
# (a) kill -9 mid-scene
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_kill_9_mid_scene_another_worker_completes_it_rows_exactly_once(env: Env, world: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    staged = stage(world, tmp_path / "w", 6)
    import_world(env.dsn, world)
    assert watch(env, staged.catalog).published == 6

    lock = SigsLock(env.dsn)
    victim = env.start_worker("fault-a-victim")
    owned = wait_for("the victim to claim a scene", lambda: processing(env.dsn), 60, env)
    assert list(owned.values()) == ["fault-a-victim"]
    (sid,) = owned
    wait_for("the victim to block inside its write transaction", lambda: lock.blocked_writers() == 1, 30, env)
    with tx(env.dsn) as cur:
        cur.execute("SELECT state, current_scene FROM workers WHERE id = 'fault-a-victim'")
        assert cur.fetchone() == ("busy", sid)
    # Heartbeats do not starve while the job is deep in its transaction: the lease keeps moving.
    before = lease_until(env.dsn, sid)
    time.sleep(2.5)
    assert lease_until(env.dsn, sid) > before
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    lock.release()

    env.start_worker("fault-a-rescuer")
    wait_for("all scenes extracted", lambda: statuses(env.dsn) == {"extracted": 6}, 60, env)
    assert env.stop_workers() == {"fault-a-rescuer": 0}

    found = assert_exact(env, staged)
    attempts = {s[0]: s[2] for s in scenes(env.dsn).values()}
    assert attempts[sid] == 2 and all(n == 1 for s, n in attempts.items() if s != sid), attempts
    done_by_rescuer = {ev["scene_id"] for ev in env.events("fault-a-rescuer", "job.done")}
    assert done_by_rescuer == set(attempts), "the rescuer finished every scene, the victim's included"
    assert any(ev["scene_id"] == sid for ev in env.events("fault-a-rescuer", "job.lease_held"))
    assert (env.ready(env.bus.queue), env.ready(env.bus.dead_letter_queue)) == (0, 0)
    report(
        "a kill -9",
        scenes=6,
        kills=1,
        rows_expected=sum(staged.truth_rows.values()),
        rows_found=sum(found.values()),
        wall_s=round(time.monotonic() - t0, 1),
    )


# ------------------------------------------------------------------------------------------
# (b) restart RabbitMQ mid-run
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_rabbitmq_restart_mid_run_loses_no_job(env: Env, world: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    first = stage(world, tmp_path / "w", 2)
    full = stage(world, tmp_path / "w", 6)  # the same two first products, plus four more
    import_world(env.dsn, world)
    assert watch(env, first.catalog).published == 2

    lock = SigsLock(env.dsn)
    for i in range(3):  # two get stuck mid-scene, one idles and must reconnect on its own
        env.start_worker(f"fault-b-{i}")
    wait_for("two workers blocked mid-scene", lambda: lock.blocked_writers() == 2, 60, env)
    stuck = processing(env.dsn)
    assert len(stuck) == 2

    # While the broker is down the watcher finds four new scenes: recorded, nothing lost, no crash.
    during = env.stack.restart_rabbitmq(while_down=lambda: watch(env, full.catalog))
    assert (during.new, during.published, during.pending) == (4, 0, 4)
    lock.release()

    wait_for("the stuck scenes to finish", lambda: statuses(env.dsn)["extracted"] == 2, 60, env)
    after = watch(env, full.catalog)
    assert (after.new, after.published, after.pending) == (0, 4, 0), "the outbox is flushed once the broker is back"
    wait_for("all scenes extracted", lambda: statuses(env.dsn) == {"extracted": 6}, 60, env)
    wait_for("the queue to empty", lambda: env.ready(env.bus.queue) == 0, 20, env)
    codes = env.stop_workers()
    assert codes == {f"fault-b-{i}": 0 for i in range(3)}

    found = assert_exact(env, full)
    assert all(s[2] == 1 for s in scenes(env.dsn).values()), "no scene was extracted twice"
    # The two stuck jobs finished after their channel died: their verdicts were lost, the broker
    # redelivered both messages, and the redeliveries were acknowledged as duplicates.
    assert len(env.all_events("job.settle_lost")) == 2
    assert sorted(ev["scene_id"] for ev in env.all_events("job.duplicate")) == sorted(stuck)
    assert all(env.events(f"fault-b-{i}", "worker.reconnect") for i in range(3))
    assert env.ready(env.bus.dead_letter_queue) == 0
    report(
        "b rabbitmq restart",
        scenes=6,
        restarts=1,
        published_during_outage=during.published,
        pending_during_outage=during.pending,
        rows_expected=sum(full.truth_rows.values()),
        rows_found=sum(found.values()),
        wall_s=round(time.monotonic() - t0, 1),
    )


# ------------------------------------------------------------------------------------------
# (c) restart PostgreSQL mid-run
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_postgres_restart_mid_run_workers_retry_all_done(env: Env, world: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    staged = stage(world, tmp_path / "w", 6)
    import_world(env.dsn, world)
    assert watch(env, staged.catalog).published == 6

    lock = SigsLock(env.dsn)
    env.start_worker("fault-c-0")
    env.start_worker("fault-c-1")
    wait_for("both workers blocked mid-scene", lambda: lock.blocked_writers() == 2, 60, env)
    stuck = set(processing(env.dsn))
    env.stack.restart_postgres(down_s=3.0)  # fast shutdown: every session is cut, the lock's too
    lock.release()

    wait_for("all scenes extracted", lambda: statuses(env.dsn) == {"extracted": 6}, 90, env)
    wait_for("the queue to empty", lambda: env.ready(env.bus.queue) == 0, 20, env)
    assert env.stop_workers() == {"fault-c-0": 0, "fault-c-1": 0}

    found = assert_exact(env, staged)
    attempts = {s[0]: s[2] for s in scenes(env.dsn).values()}
    assert {s for s, n in attempts.items() if n == 2} == stuck and all(n <= 2 for n in attempts.values()), attempts
    # The outage is not the jobs' fault: they waited for the database holding their messages,
    # so no delivery was used up and nothing was requeued or dead-lettered.
    assert len({ev["worker_id"] for ev in env.all_events("job.database_unavailable")}) == 2
    assert env.all_events("job.failed_transient") == []
    assert env.ready(env.bus.dead_letter_queue) == 0
    report(
        "c postgres restart",
        scenes=6,
        restarts=1,
        rows_expected=sum(staged.truth_rows.values()),
        rows_found=sum(found.values()),
        wall_s=round(time.monotonic() - t0, 1),
    )


# ------------------------------------------------------------------------------------------
# Shutdown: a drain finishes the current job; past the stop deadline the job is requeued
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_drain_finishes_the_job_and_a_passed_stop_deadline_requeues_it(env: Env, world: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    staged = stage(world, tmp_path / "w", 2)
    import_world(env.dsn, world)
    assert watch(env, staged.catalog).published == 2

    # A drain through the registry (what the provisioner does) while the job is stuck mid-scene:
    # the worker stops consuming, finishes the job once it can, and exits 0.
    lock = SigsLock(env.dsn)
    drained = env.start_worker("fault-s-drained")
    wait_for("the worker blocked mid-scene", lambda: lock.blocked_writers() == 1, 60, env)
    (first,) = processing(env.dsn)
    with tx(env.dsn) as cur:
        cur.execute("UPDATE workers SET state = 'draining' WHERE id = 'fault-s-drained'")
    wait_for("the drain to be noticed", lambda: env.events("fault-s-drained", "worker.drain_requested"), 10, env)
    # While it drains, its heartbeat goes on renewing the lease (6 s) of the job it still runs.
    lease = lambda: lease_until(env.dsn, first)  # noqa: E731
    before = lease()
    time.sleep(2.5)
    assert lease() > before and _state(env, "fault-s-drained") == "draining"
    lock.release()
    assert drained.wait(30) == 0
    assert {s[0]: s[1] for s in scenes(env.dsn).values()}[first] == "extracted"
    assert env.ready(env.bus.queue) == 1, "the drained worker took no further job"

    # SIGTERM with a 1 s deadline while the job cannot finish: exit 0 at once, the message requeued.
    lock = SigsLock(env.dsn)
    late = env.start_worker("fault-s-deadline", CBMFLOW_WORKER_STOP_DEADLINE_S="1")
    wait_for("the worker blocked mid-scene", lambda: lock.blocked_writers() == 1, 60, env)
    (second,) = processing(env.dsn)
    stopped_at = time.monotonic()
    late.send_signal(signal.SIGTERM)
    assert late.wait(15) == 0
    stop_s = time.monotonic() - stopped_at
    assert stop_s < 6, f"took {stop_s:.1f} s to stop with a 1 s deadline"
    assert env.events("fault-s-deadline", "worker.stop_deadline_passed")
    wait_for("the job back in the queue", lambda: env.ready(env.bus.queue) == 1, 10, env)
    product_of = {s[0]: p for p, s in scenes(env.dsn).items()}
    lock.release()
    assert rows_by_product(env.dsn)[product_of[second]] == 0, "nothing of the interrupted job was committed"

    env.start_worker("fault-s-next")  # takes the requeued job over once the lease expires
    wait_for("both scenes extracted", lambda: statuses(env.dsn) == {"extracted": 2}, 60, env)
    assert env.stop_workers() == {"fault-s-next": 0}
    found = assert_exact(env, staged)
    attempts = {s[0]: s[2] for s in scenes(env.dsn).values()}
    assert attempts == {first: 1, second: 2}
    report(
        "shutdown",
        scenes=2,
        drains=1,
        sigterms=1,
        stop_after_deadline_s=round(stop_s, 1),
        rows_expected=sum(staged.truth_rows.values()),
        rows_found=sum(found.values()),
        wall_s=round(time.monotonic() - t0, 1),
    )


# ------------------------------------------------------------------------------------------
# (d) poison message, corrupt raster, a transient failure that never heals; then the fix
# ------------------------------------------------------------------------------------------


def _corrupt_band(staged: Staged, product: str, band: str) -> tuple[Path, bytes]:
    (path,) = staged.product_dir(product).glob(f"GRANULE/*/IMG_DATA/R*/*_{band}_*.jp2")
    original = path.read_bytes()
    path.write_bytes(os.urandom(len(original)))
    return path, original


def _cli(e: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CBMFLOW, *args], env=e.environ, capture_output=True, text=True, timeout=60, check=False)


def _failed_sum(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], reason: str, verdict: str) -> float:
    return m.get(("cbmflow_worker_jobs_failed_total", (("reason", reason), ("verdict", verdict))), 0.0)


@pytest.mark.timeout(150)
def test_poison_corrupt_raster_and_delivery_limit_are_dead_lettered_the_rest_unaffected(
    env: Env, world: Path, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    env.bus = env.bus.model_copy(update={"delivery_limit": 2})
    staged = stage(world, tmp_path / "w", 6)
    corrupt_product, flaky_product = staged.products[1], staged.products[4]
    raster, original = _corrupt_band(staged, corrupt_product, "B04")
    import_world(env.dsn, world)
    assert watch(env, staged.catalog).published == 6
    ids = {p: s[0] for p, s in scenes(env.dsn).items()}
    with tx(env.dsn) as cur:  # storage that keeps rejecting one scene: a transient error forever
        cur.execute(
            "CREATE FUNCTION fault_reject() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.scene_id = {ids[flaky_product]} THEN"
            "   RAISE EXCEPTION 'injected fault: storage rejects scene %', NEW.scene_id; END IF;"
            " RETURN NEW; END $$"
        )
        cur.execute(
            "CREATE TRIGGER fault_reject BEFORE INSERT ON ms.sigs_2024_obs FOR EACH ROW EXECUTE FUNCTION fault_reject()"
        )
    conn = pika.BlockingConnection(pika.URLParameters(env.bus.amqp_url))
    conn.channel().basic_publish(
        "", env.bus.queue, b"{not json", pika.BasicProperties(delivery_mode=2, message_id="poison-1")
    )
    conn.close()

    env.start_worker("fault-d-0")
    env.start_worker("fault-d-1")
    healthy = [p for p in staged.products if p not in (corrupt_product, flaky_product)]
    wait_for(
        "4 extracted, 2 failed, 3 dead letters",
        lambda: statuses(env.dsn) == {"extracted": 4, "failed": 2} and env.ready(env.bus.dead_letter_queue) == 3,
        90,
        env,
    )
    state = scenes(env.dsn)
    assert state[corrupt_product][1:3] == ("failed", 1), "a corrupt raster is dead-lettered at once"
    assert "raster" in (state[corrupt_product][3] or "") and raster.name in (state[corrupt_product][3] or "")
    assert state[flaky_product][1:3] == ("failed", 3), "dead-lettered after 1 + delivery limit (2) deliveries"
    assert "delivery limit 2" in (state[flaky_product][3] or "") and "injected fault" in (state[flaky_product][3] or "")
    letters = env.dead_letters()
    by_id = sorted(
        (m["properties"].get("message_id"), m["properties"]["headers"]["x-death"][0]["reason"]) for m in letters
    )
    assert by_id == sorted(
        [
            ("poison-1", "rejected"),
            (f"scene-{ids[corrupt_product]}", "rejected"),
            (f"scene-{ids[flaky_product]}", "delivery_limit"),
        ]
    )
    rows = rows_by_product(env.dsn)
    assert {p: rows[p] for p in healthy} == {p: staged.truth_rows[p] for p in healthy}, "the rest is unaffected"
    assert rows[corrupt_product] == rows[flaky_product] == 0
    m = [env.metrics("fault-d-0"), env.metrics("fault-d-1")]
    assert sum(_failed_sum(x, "malformed", "dead_letter") for x in m) == 1
    assert sum(_failed_sum(x, "product", "dead_letter") for x in m) == 1
    assert sum(_failed_sum(x, "database", "requeue") for x in m) == 2
    assert sum(_failed_sum(x, "delivery_limit", "requeue") for x in m) == 1
    assert sum(x[("cbmflow_worker_jobs_done_total", (("result", "extracted"),))] for x in m) == 4

    # The fix, one scene at a time: its dead letter goes once its new job is confirmed.
    with tx(env.dsn) as cur:
        cur.execute("DROP TRIGGER fault_reject ON ms.sigs_2024_obs")
    res = _cli(env, "jobs", "retry", "--dead-lettered", "--scene", str(ids[flaky_product]))
    assert res.returncode == 0, res.stderr
    assert f"re-published 1 scene(s): {ids[flaky_product]}; dead letters removed 1, kept 2 (1 malformed)" in res.stdout
    assert env.ready(env.bus.dead_letter_queue) == 2
    raster.write_bytes(original)
    res = _cli(env, "jobs", "retry", "--dead-lettered")
    assert res.returncode == 0, res.stderr
    assert (
        f"re-published 1 scene(s): {ids[corrupt_product]}; dead letters removed 1, kept 1 (1 malformed)" in res.stdout
    )
    wait_for("all scenes extracted", lambda: statuses(env.dsn) == {"extracted": 6}, 60, env)
    wait_for("the queue to empty", lambda: env.ready(env.bus.queue) == 0, 20, env)
    assert env.stop_workers() == {"fault-d-0": 0, "fault-d-1": 0}

    found = assert_exact(env, staged)
    letters = env.dead_letters()
    assert [m["payload"] for m in letters] == ["{not json"], "only the poison message is left"
    attempts = {p: s[2] for p, s in scenes(env.dsn).items()}
    assert attempts == {p: {corrupt_product: 2, flaky_product: 4}.get(p, 1) for p in staged.products}
    report(
        "d poison",
        scenes=6,
        poison=1,
        corrupt=1,
        delivery_limit=1,
        dead_letters_before_fix=3,
        dead_letters_after_fix=len(letters),
        rows_expected=sum(staged.truth_rows.values()),
        rows_found=sum(found.values()),
        wall_s=round(time.monotonic() - t0, 1),
    )


# ------------------------------------------------------------------------------------------
# consumer_timeout: the broker closes the channel under a long job, pika does not raise
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_broker_consumer_timeout_is_detected_and_the_job_counted_once(env: Env, world: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    staged = stage(world, tmp_path / "w", 2)
    import_world(env.dsn, world)
    assert watch(env, staged.catalog).published == 2
    lock = SigsLock(env.dsn)
    # Applies to channels opened from now on: 2 s timeout, checked every second (default: 60 s).
    ctl = env.stack.rabbitmqctl_eval
    previous = {k: ctl(f"application:get_env(rabbit, {k}).") for k in ("consumer_timeout", "channel_tick_interval")}
    assert all(v.startswith("{ok,") for v in previous.values()), previous
    ctl(
        "application:set_env(rabbit, consumer_timeout, 2000), application:set_env(rabbit, channel_tick_interval, 1000)."
    )
    try:
        env.start_worker("fault-t")
        wait_for("the worker blocked mid-scene", lambda: lock.blocked_writers() == 1, 60, env)
        wait_for(
            "the broker to close the channel", lambda: env.events("fault-t", "worker.connection_lost_midjob"), 30, env
        )
    finally:
        ctl(", ".join(f"application:set_env(rabbit, {k}, {v[4:-1]})" for k, v in previous.items()) + ".")
    lock.release()
    wait_for("both scenes extracted", lambda: statuses(env.dsn) == {"extracted": 2}, 60, env)
    wait_for("the queue to empty", lambda: env.ready(env.bus.queue) == 0, 20, env)
    assert env.stop_workers() == {"fault-t": 0}
    found = assert_exact(env, staged)
    assert all(s[2] == 1 for s in scenes(env.dsn).values())
    (closed,) = env.events("fault-t", "worker.channel_closed")
    assert "PRECONDITION_FAILED" in closed["reason"] and "timed out" in closed["reason"], closed
    assert len(env.events("fault-t", "job.settle_lost")) == 1
    assert len(env.events("fault-t", "job.duplicate")) == 1
    assert len(env.events("fault-t", "job.done")) == 2
    report(
        "consumer_timeout",
        scenes=2,
        channel_closures=1,
        rows_expected=sum(staged.truth_rows.values()),
        rows_found=sum(found.values()),
        wall_s=round(time.monotonic() - t0, 1),
    )


# ------------------------------------------------------------------------------------------
# (e) two workers, fifty scenes
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_two_workers_fifty_scenes_every_scene_exactly_once(env: Env, world: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    staged = stage(world, tmp_path / "w", 50)
    import_world(env.dsn, world)
    assert watch(env, staged.catalog).published == 50
    env.start_worker("fault-e-0")
    env.start_worker("fault-e-1")
    wait_for("all 50 scenes extracted", lambda: statuses(env.dsn) == {"extracted": 50}, 120, env, every_s=0.5)
    wait_for("the queue to empty", lambda: env.ready(env.bus.queue) == 0, 20, env)
    per_worker = [
        env.metrics(w)[("cbmflow_worker_jobs_done_total", (("result", "extracted"),))]
        for w in ("fault-e-0", "fault-e-1")
    ]
    assert env.stop_workers() == {"fault-e-0": 0, "fault-e-1": 0}

    found = assert_exact(env, staged)
    assert sum(per_worker) == 50 and min(per_worker) > 0, per_worker
    assert all(s[2] == 1 for s in scenes(env.dsn).values()), "every scene claimed and written once"
    done = [ev["scene_id"] for ev in env.all_events("job.done")]
    assert len(done) == len(set(done)) == 50
    assert env.ready(env.bus.dead_letter_queue) == 0
    report(
        "e 2 workers",
        scenes=50,
        jobs_per_worker=[int(x) for x in per_worker],
        rows_expected=sum(staged.truth_rows.values()),
        rows_found=sum(found.values()),
        wall_s=round(time.monotonic() - t0, 1),
    )
