"""``make chaos``: the demo's chain at size, with faults injected from a seeded schedule, and the
delivery guarantees checked at the end against the generator's truth.

Everything runs on servers of its own (PostgreSQL and RabbitMQ started with the ``cbmflow stack``
code on free loopback ports, an S3 endpoint (moto's server, in a thread of this process) holding
the products), so a developer's stack is never touched. The chain is the production one: the
catalogue watcher (``cbmflow watch``, a subprocess) on a static STAC catalogue revealed in
batches, real ``cbmflow worker`` processes reading the products from S3, and the API
(``api.server.serve``, a subprocess) under a steady load of time-series requests.

Faults fire when the share of finished scenes passes seeded random thresholds, so they land
mid-run whatever the machine's speed:

* ``worker_kill``: ``kill -9`` of a worker (a replacement is started at once);
* ``broker_restart``: RabbitMQ stopped and started on the same ports;
* ``db_restart``: PostgreSQL fast-shutdown (sessions cut), down 2 s, started again;
* ``store_outage``: the S3 endpoint stops listening for a few seconds (moto keeps its objects);
* ``watcher_kill``: ``kill -9`` of the watcher, restarted after a second;
* ``api_restart``: SIGTERM of the API process under load (uvicorn finishes what is in flight),
  started again on the same port.

Invariants checked at the end: every scene ``extracted`` (attempts may exceed 1), its rows exactly
the truth's (``verify_truth``: none missing, none extra, every count and mean equal), no duplicate
(pid, scene, band), the dead-letter queue empty (else each letter is listed with its scene's
reason), and every API request answered 2xx or a documented 503; a connection refused while the
API process itself was restarting is counted apart (no server was listening; the client retries),
anything else (another status, a reset or a timeout) is a violation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import requests
from psycopg2 import sql

from cbmflow.dev import stack as stackmod
from cbmflow.settings import StackSettings, state_dir

FAULT_KINDS = ("worker_kill", "broker_restart", "db_restart", "store_outage", "watcher_kill", "api_restart")
AOI = "ms"
YEAR = 2024
DB = "cbmflow"
BUCKET = "cbmflow-chaos"
PREFIX = "eodata/L2A"
API_USER = ("chaos", "chaos-password-1")
WORKER_ENV = {
    # Documented settings, short so that a killed worker's scene is taken over in seconds.
    "CBMFLOW_WORKER_LEASE_S": "6",
    "CBMFLOW_WORKER_HEARTBEAT_S": "1",
    "CBMFLOW_WORKER_BACKOFF_MAX_S": "2",
    "CBMFLOW_WORKER_STOP_DEADLINE_S": "20",
    "CBMFLOW_LOG_LEVEL": "INFO",
    "CBMFLOW_LOG_FORMAT": "json",
}


@dataclass(frozen=True)
class ChaosConfig:
    scenes: int = 50
    parcels: int = 5000
    faults: int = 12
    seed: int = 2026
    workers: int = 3
    kinds: tuple[str, ...] = FAULT_KINDS
    reveal_batches: int = 3
    reveal_every_s: float = 8.0
    timeout_s: float = 1500.0
    work_dir: Path | None = None
    """Where the world (cached per size and seed) and the logs go; default ``<state>/chaos``."""


@dataclass
class Fault:
    kind: str
    at_fraction: float
    fired_at_s: float | None = None
    detail: str = ""


@dataclass
class ChaosResult:
    config: ChaosConfig
    faults: list[Fault]
    duration_s: float = 0.0
    scenes_total: int = 0
    scenes_by_status: dict[str, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    rows_expected: int = 0
    rows_found: int = 0
    rows_missing: int = 0
    rows_extra: int = 0
    duplicates: int = 0
    truth_ok: bool = False
    count_equal: int = 0
    mean_equal: int = 0
    mismatches: list[str] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)
    api: Counter[str] = field(default_factory=Counter)
    api_violations: list[str] = field(default_factory=list)
    log_dir: Path | None = None

    @property
    def violations(self) -> list[str]:
        out = []
        if self.scenes_by_status.get("extracted", 0) != self.scenes_total:
            out.append(f"scenes not all extracted: {self.scenes_by_status} of {self.scenes_total}")
        if not self.truth_ok or self.rows_missing or self.rows_extra or self.rows_expected != self.rows_found:
            out.append(
                f"rows differ from truth: expected {self.rows_expected}, found {self.rows_found},"
                f" missing {self.rows_missing}, extra {self.rows_extra}, {len(self.mismatches)} value mismatches"
            )
        if self.duplicates:
            out.append(f"{self.duplicates} duplicate (pid, scene, band) rows")
        out += [f"dead letter: {d}" for d in self.dead_letters]
        out += [f"API: {v}" for v in self.api_violations[:20]]
        if len(self.api_violations) > 20:
            out.append(f"API: {len(self.api_violations) - 20} more violations")
        missed = [f.kind for f in self.faults if f.fired_at_s is None]
        if missed:
            out.append(f"faults scheduled but not fired (run ended first): {missed}")
        return out

    @property
    def ok(self) -> bool:
        return not self.violations


def schedule(cfg: ChaosConfig) -> list[Fault]:
    """The seeded fault schedule: kinds in turn (each kind at least once when there are enough),
    shuffled, each at a random share of finished scenes between 5 % and 85 %."""
    rng = random.Random(cfg.seed)
    kinds = [cfg.kinds[i % len(cfg.kinds)] for i in range(cfg.faults)]
    rng.shuffle(kinds)
    points = sorted(rng.uniform(0.05, 0.85) for _ in kinds)
    return [Fault(kind=k, at_fraction=round(p, 3)) for k, p in zip(kinds, points, strict=True)]


# ------------------------------------------------------------------------------------------
# The world, on S3
# ------------------------------------------------------------------------------------------


def _world(cfg: ChaosConfig, work: Path) -> Path:
    """The generated world, reused when this size and seed were generated before (minutes at
    full size; the generator is deterministic, so the cache is exact)."""
    from card.testworld import generate

    out = work / f"world-p{cfg.parcels}-s{cfg.scenes}-seed{cfg.seed}"
    marker = out / ".complete"
    if not marker.exists():
        shutil.rmtree(out, ignore_errors=True)
        generate(out, parcels=cfg.parcels, scenes=cfg.scenes, seed=cfg.seed, aoi_name=AOI, year=YEAR)
        marker.write_text("ok\n")
    return out


class S3Endpoint:
    """moto's S3 server in a thread on a fixed port; its objects live in this process, so it can
    stop listening (the outage) and come back with the same contents."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server: Any = None

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per GET otherwise

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "cbmflow-chaos-key",
    "AWS_SECRET_ACCESS_KEY": "cbmflow-chaos-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
    "CBMFLOW_STORE_S3_REGION": "us-east-1",
    "CBMFLOW_STORE_S3_PATH_STYLE": "true",
}


def _upload(world: Path, endpoint: S3Endpoint) -> dict[str, str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name="us-east-1",
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=BUCKET)
    files = [p for p in sorted((world / "products").rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(
            pool.map(
                lambda p: client.upload_file(
                    str(p), BUCKET, f"{PREFIX}/{p.relative_to(world / 'products').as_posix()}"
                ),
                files,
            )
        )
    return {d.name: f"s3://{BUCKET}/{PREFIX}/{d.name}" for d in (world / "products").iterdir()}


class Catalogue:
    """A copy of the world's STAC catalogue whose items point at the S3 products, revealed to the
    watcher in batches (atomic rewrites of the collection's item links)."""

    def __init__(self, world: Path, dest: Path, locations: dict[str, str], batches: int, seed: int) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(world / "stac", dest)
        self.path = dest / "catalog.json"
        self.coll_path = dest / "sentinel-2-l2a" / "collection.json"
        for item_path in dest.glob("sentinel-2-l2a/*/*.json"):
            item = json.loads(item_path.read_text())
            safe = Path(item["assets"]["product"]["href"]).name
            item["assets"] = {"product": {**item["assets"]["product"], "href": locations[safe]}}
            item_path.write_text(json.dumps(item))
        self.coll = json.loads(self.coll_path.read_text())
        self.items = [link for link in self.coll["links"] if link["rel"] == "item"]
        random.Random(seed).shuffle(self.items)
        self.batches = max(1, batches)
        self.revealed = 0
        self.reveal(0)

    @property
    def total(self) -> int:
        return len(self.items)

    def reveal(self, batch: int) -> None:
        n = min(self.total, -(-self.total * (batch + 1) // self.batches))
        others = [link for link in self.coll["links"] if link["rel"] != "item"]
        tmp = self.coll_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.coll, "links": others + self.items[:n]}))
        tmp.replace(self.coll_path)
        self.revealed = n


# ------------------------------------------------------------------------------------------
# The servers and processes
# ------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class Run:
    """The servers and processes of one chaos run, and the faults applied to them."""

    def __init__(self, cfg: ChaosConfig, base: Path, logs: Path) -> None:
        self.cfg = cfg
        self.base = base
        self.logs = logs
        self.run_as = StackSettings().run_as
        pg, amqp, mgmt, dist, epmd, s3, api = free_ports(7)
        self.ports = {"pg": pg, "amqp": amqp, "mgmt": mgmt, "dist": dist, "epmd": epmd, "s3": s3, "api": api}
        self.pg: stackmod.PgInfo | None = None
        self.rabbit: stackmod.RabbitInfo | None = None
        self.s3 = S3Endpoint(s3)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.watcher: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.api_down: list[list[float]] = []  # [start, end] of each API restart (monotonic)
        self._n_workers = 0
        self._n_watchers = 0

    # ---- servers --------------------------------------------------------------------------
    def start_servers(self) -> None:
        p = self.ports
        with ThreadPoolExecutor(max_workers=2) as pool:
            pg_f = pool.submit(stackmod.start_postgres, self.base / "postgres", p["pg"], self.run_as, DB, DB)
            rb_f = pool.submit(self._start_rabbit)
            self.pg = pg_f.result()
            self.rabbit = rb_f.result()
        self.s3.start()

    def _start_rabbit(self) -> stackmod.RabbitInfo:
        p = self.ports
        return stackmod.start_rabbitmq(
            self.base / "rabbitmq",
            p["amqp"],
            p["mgmt"],
            p["dist"],
            p["epmd"],
            self.run_as,
            StackSettings().consumer_timeout_ms,
        )

    def stop_servers(self) -> None:
        self.s3.stop()
        with ThreadPoolExecutor(max_workers=2) as pool:
            for f in [
                pool.submit(stackmod.stop_postgres, self.base / "postgres"),
                pool.submit(stackmod.stop_rabbitmq, self.base / "rabbitmq"),
            ]:
                with suppress(Exception):
                    f.result()

    @property
    def dsn(self) -> str:
        assert self.pg is not None
        return self.pg.dsn_for(DB)

    @property
    def env(self) -> dict[str, str]:
        assert self.rabbit is not None
        return {
            **os.environ,
            **WORKER_ENV,
            **S3_ENV,
            "CBMFLOW_STORE_S3_ENDPOINT_URL": self.s3.url,
            "CBMFLOW_DB_DSN": self.dsn,
            "CBMFLOW_BUS_AMQP_URL": self.rabbit.amqp_url,
            "CBMFLOW_BUS_MANAGEMENT_URL": self.rabbit.management_url,
            "CBMFLOW_STATE_DIR": str(self.base / "state"),
        }

    def bus(self) -> Any:
        from cbmflow.settings import BusSettings

        assert self.rabbit is not None
        return BusSettings(amqp_url=self.rabbit.amqp_url, management_url=self.rabbit.management_url)

    # ---- processes ------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:
            return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self) -> str:
        self._n_workers += 1
        wid = f"chaos-worker-{self._n_workers}"
        cbmflow = str(Path(sys.executable).parent / "cbmflow")
        self.workers[wid] = self._spawn(wid, [cbmflow, "worker"], {**self.env, "CBMFLOW_WORKER_ID": wid})
        return wid

    def start_watcher(self, catalog: Path) -> None:
        self._n_watchers += 1
        cbmflow = str(Path(sys.executable).parent / "cbmflow")
        args = [cbmflow, "watch", "--catalog", str(catalog), "--interval", "2", "--lookback-days", "0"]
        self.watcher = self._spawn(f"watcher-{self._n_watchers}", args, self.env)

    def start_api(self, timeout_s: float = 60) -> None:
        code = f"from api.server import serve; serve('127.0.0.1', {self.ports['api']}, 1)"
        self.api = self._spawn("api", [sys.executable, "-c", code], self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with suppress(requests.RequestException):
                if requests.get(f"{self.api_url}/healthz", timeout=2).status_code in (200, 503):
                    return
            if self.api.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the API did not start (exit {self.api.poll()}); see {self.logs / 'api.log'}")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def stop_processes(self) -> None:
        procs = [*self.workers.values(), self.watcher, self.api]
        for p in procs:
            if p is not None and p.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    # ---- faults ---------------------------------------------------------------------------
    def inject(self, fault: Fault, rng: random.Random, catalog: Path) -> str:
        if fault.kind == "worker_kill":
            live = sorted(w for w, p in self.workers.items() if p.poll() is None)
            victim = rng.choice(live)
            os.killpg(self.workers[victim].pid, signal.SIGKILL)
            self.workers[victim].wait(10)
            new = self.start_worker()
            return f"kill -9 {victim}; started {new}"
        if fault.kind == "broker_restart":
            t0 = time.monotonic()
            assert stackmod.stop_rabbitmq(self.base / "rabbitmq")
            self.rabbit = self._start_rabbit()
            return f"RabbitMQ down and back in {time.monotonic() - t0:.1f} s"
        if fault.kind == "db_restart":
            t0 = time.monotonic()
            assert stackmod.stop_postgres(self.base / "postgres")
            time.sleep(2)
            self.pg = stackmod.start_postgres(self.base / "postgres", self.ports["pg"], self.run_as, DB, DB)
            return f"PostgreSQL down and back in {time.monotonic() - t0:.1f} s"
        if fault.kind == "store_outage":
            down_s = round(rng.uniform(3, 8), 1)
            self.s3.stop()
            time.sleep(down_s)
            self.s3.start()
            return f"S3 endpoint not listening for {down_s} s"
        if fault.kind == "watcher_kill":
            assert self.watcher is not None
            with suppress(ProcessLookupError):
                os.killpg(self.watcher.pid, signal.SIGKILL)
            self.watcher.wait(10)
            time.sleep(1)
            self.start_watcher(catalog)
            return "kill -9 the watcher; restarted after 1 s"
        if fault.kind == "api_restart":
            assert self.api is not None
            window = [time.monotonic(), float("inf")]
            self.api_down.append(window)
            os.killpg(self.api.pid, signal.SIGTERM)
            self.api.wait(30)
            self.start_api()
            window[1] = time.monotonic()
            return f"API SIGTERM under load, serving again in {window[1] - window[0]:.1f} s"
        raise ValueError(f"unknown fault {fault.kind!r}")


# ------------------------------------------------------------------------------------------
# API load
# ------------------------------------------------------------------------------------------


class Load:
    """Clients asking for time series all the time, recording every answer."""

    def __init__(self, run: Run, pids: list[str], seed: int, threads: int = 2) -> None:
        self.run = run
        self.pids = pids
        self.seed = seed
        self.threads = threads
        self.stop = threading.Event()
        self.records: list[tuple[float, str, str]] = []  # (monotonic, url, outcome)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _loop(self, k: int) -> None:
        rng = random.Random(self.seed * 100 + k)
        session = requests.Session()
        while not self.stop.is_set():
            pid = rng.choice(self.pids)
            url = rng.choice(
                [
                    f"/query/parcelTimeSeries?aoi={AOI}&year={YEAR}&pid={pid}&tstype=s2",
                    f"/api/v1/datasets/{AOI}/{YEAR}/timeseries?pid={urllib.parse.quote(pid)}",
                    "/api/v1/scenes",
                ]
            )
            t = time.monotonic()
            try:
                resp = session.get(self.run.api_url + url, auth=API_USER, timeout=30)
                outcome = str(resp.status_code)
                if resp.status_code == 503:
                    with suppress(ValueError, KeyError, TypeError):
                        outcome = f"503 {resp.json()['error']['code']}"
            except requests.ConnectionError as exc:
                outcome = "refused" if "refused" in str(exc).lower() else f"connection error: {str(exc)[:120]}"
                session = requests.Session()
            except requests.RequestException as exc:
                outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
            with self._lock:
                self.records.append((t, url.split("?")[0], outcome))
            time.sleep(0.05)

    def start(self) -> None:
        for k in range(self.threads):
            th = threading.Thread(target=self._loop, args=(k,), daemon=True, name=f"chaos-load-{k}")
            th.start()
            self._threads.append(th)

    def finish(self) -> tuple[Counter[str], list[str]]:
        self.stop.set()
        for th in self._threads:
            th.join(60)
        tally: Counter[str] = Counter()
        bad: list[str] = []
        for t, url, outcome in self.records:
            if outcome.startswith("2"):
                tally["2xx"] += 1
            elif outcome.startswith("503 "):
                tally[outcome] += 1
            elif outcome == "refused" and any(a - 1 <= t <= b + 1 for a, b in self.run.api_down):
                tally["refused while the API restarted"] += 1
            else:
                tally["violation"] += 1
                bad.append(f"{url}: {outcome}")
        return tally, bad


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


@contextmanager
def _cursor(dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET statement_timeout = '20s'")
            yield cur
    finally:
        conn.close()


def _finished(dsn: str) -> int | None:
    try:
        with _cursor(dsn) as cur:
            cur.execute("SELECT count(*) FROM scenes WHERE status IN ('extracted', 'no_parcels', 'failed')")
            row = cur.fetchone()
            return int(row[0]) if row else 0
    except psycopg2.Error:
        return None  # the database is restarting


def run_chaos(cfg: ChaosConfig, progress: Any = None) -> ChaosResult:
    from cbmflow import db
    from cbmflow.parcels.ingest import add_aoi, import_parcels

    work = Path(cfg.work_dir or state_dir() / "chaos")
    work.mkdir(parents=True, exist_ok=True)
    world = _world(cfg, work)
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    base = Path(tempfile.mkdtemp(prefix="cbmflow-chaos-"))
    base.chmod(0o755)
    faults = schedule(cfg)
    result = ChaosResult(config=cfg, faults=faults, log_dir=logs)
    rng = random.Random(cfg.seed + 1)
    run = Run(cfg, base, logs)
    load: Load | None = None
    started = time.monotonic()
    try:
        run.start_servers()
        db.migrate(run.dsn)
        locations = _upload(world, run.s3)
        catalog = Catalogue(world, base / "stac", locations, cfg.reveal_batches, cfg.seed)
        result.scenes_total = catalog.total
        with db.transaction(run.dsn) as cur:
            add_aoi(cur, AOI, world / "aoi.geojson")
            import_parcels(cur, world / "parcels.gpkg", AOI, YEAR)
            from api.users import upsert_user

            upsert_user(cur, API_USER[0], API_USER[1], datasets=[AOI])
            cur.execute(
                sql.SQL("SELECT parcel_id FROM {}.{}").format(sql.Identifier(AOI), sql.Identifier(f"parcels_{YEAR}"))
            )
            pids = [str(r[0]) for r in cur.fetchall()]
        run.start_api()
        run.start_watcher(catalog.path)
        for _ in range(cfg.workers):
            run.start_worker()
        load = Load(run, pids, cfg.seed)
        load.start()
        t0 = time.monotonic()
        pending = list(faults)
        batch = 0
        done = 0
        while True:
            if batch + 1 < catalog.batches and time.monotonic() - t0 >= (batch + 1) * cfg.reveal_every_s:
                batch += 1
                catalog.reveal(batch)
            got = _finished(run.dsn)
            done = got if got is not None else done
            if progress is not None:
                progress(done, catalog.total)
            while pending and done >= pending[0].at_fraction * catalog.total:
                fault = pending.pop(0)
                fault.fired_at_s = round(time.monotonic() - t0, 1)
                fault.detail = run.inject(fault, rng, catalog.path)
            if done >= catalog.total and catalog.revealed == catalog.total and not pending:
                break
            if time.monotonic() - started > cfg.timeout_s:
                break
            time.sleep(0.5)
        # Let the queue settle (redeliveries of finished scenes are acknowledged as duplicates).
        from cbmflow.bus import queue_depth

        bus = run.bus()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with suppress(Exception):
                if queue_depth(bus).backlog == 0:
                    break
            time.sleep(1)
        result.api, result.api_violations = load.finish()
        load = None
        run.stop_processes()
        result.duration_s = round(time.monotonic() - t0, 1)
        _check(run, world, result)
    finally:
        if load is not None:
            load.finish()
        run.stop_processes()
        run.stop_servers()
        shutil.rmtree(base, ignore_errors=True)
    return result


def _check(run: Run, world: Path, result: ChaosResult) -> None:
    from cbmflow.bus import queue_depth
    from cbmflow.dev.verify import verify_truth

    with _cursor(run.dsn) as cur:
        cur.execute("SELECT status, count(*) FROM scenes GROUP BY status")
        result.scenes_by_status = {str(s): int(n) for s, n in cur.fetchall()}
        cur.execute("SELECT attempts, count(*) FROM scenes GROUP BY attempts ORDER BY attempts")
        result.attempts = {int(a): int(n) for a, n in cur.fetchall()}
        cur.execute(
            sql.SQL(
                "SELECT count(*) FROM (SELECT 1 FROM {} GROUP BY pid, scene_id, band HAVING count(*) > 1) d"
            ).format(sql.Identifier(AOI, f"sigs_{YEAR}"))
        )
        row = cur.fetchone()
        result.duplicates = int(row[0]) if row else 0
    truth = world / "truth.csv"
    tally = verify_truth(run.dsn, truth, AOI, YEAR)
    result.rows_expected, result.rows_found = tally.expected, tally.found
    result.rows_missing, result.rows_extra = tally.missing, tally.extra
    result.mismatches = list(tally.mismatches)
    result.truth_ok = tally.ok
    result.count_equal, result.mean_equal = tally.count_equal, tally.mean_equal
    with truth.open() as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == tally.expected
    depth = queue_depth(run.bus())
    if depth.dead_lettered:
        result.dead_letters = _explain_dead_letters(run)


def _explain_dead_letters(run: Run) -> list[str]:
    """Each dead letter with its scene's status and reason (peeked; left in the queue)."""
    bus = run.bus()
    assert run.rabbit is not None
    vhost = urllib.parse.unquote(urllib.parse.urlparse(bus.amqp_url).path.lstrip("/")) or "/"
    url = (
        f"{run.rabbit.management_url.rstrip('/')}/api/queues/{urllib.parse.quote(vhost, safe='')}/"
        f"{urllib.parse.quote(bus.dead_letter_queue, safe='')}/get"
    )
    body = {"count": 1000, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 5000}
    letters = requests.post(url, json=body, auth=run.rabbit.auth, timeout=10).json()
    out = []
    with _cursor(run.dsn) as cur:
        for letter in letters:
            try:
                sid = int(json.loads(letter["payload"])["scene_id"])
            except (ValueError, KeyError, TypeError):
                out.append(f"unparseable message {letter.get('payload', '')[:80]!r}")
                continue
            cur.execute("SELECT status, attempts, reason FROM scenes WHERE id = %s", (sid,))
            row = cur.fetchone()
            out.append(f"scene {sid}: {row}")
    return out


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def print_report(result: ChaosResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = result.config
    faults = Table(title=f"faults injected (seed {cfg.seed})")
    for col in ("#", "fault", "at finished share", "at s", "what happened"):
        faults.add_column(col)
    for i, f in enumerate(result.faults, 1):
        fired = f"{f.fired_at_s}" if f.fired_at_s is not None else "not fired"
        faults.add_row(str(i), f.kind, f"{f.at_fraction:.0%}", fired, f.detail)
    console.print(faults)
    tally = Table(title=f"chaos tally: {result.scenes_total} scenes, {cfg.parcels} parcels, {cfg.workers} workers")
    tally.add_column("check")
    tally.add_column("figure", justify="right")
    tally.add_column("verdict")

    def verdict(good: bool) -> str:
        return "[green]ok[/green]" if good else "[red]VIOLATION[/red]"

    extracted = result.scenes_by_status.get("extracted", 0)
    tally.add_row("scenes extracted", f"{extracted} / {result.scenes_total}", verdict(extracted == result.scenes_total))
    tally.add_row("scenes by status", str(result.scenes_by_status), "")
    tally.add_row("attempts (attempts: scenes)", str(result.attempts), "")
    rows_ok = result.rows_expected == result.rows_found and not (result.rows_missing or result.rows_extra)
    tally.add_row("rows expected = found", f"{result.rows_expected} = {result.rows_found}", verdict(rows_ok))
    tally.add_row("rows missing / extra", f"{result.rows_missing} / {result.rows_extra}", verdict(rows_ok))
    tally.add_row(
        "rows with count / mean equal to truth",
        f"{result.count_equal} / {result.mean_equal} of {result.rows_expected}",
        verdict(result.truth_ok),
    )
    tally.add_row("duplicate (pid, scene, band)", str(result.duplicates), verdict(not result.duplicates))
    tally.add_row("dead letters", str(len(result.dead_letters)), verdict(not result.dead_letters))
    for k, n in sorted(result.api.items()):
        tally.add_row(f"API answers: {k}", str(n), verdict(k != "violation"))
    tally.add_row("duration", f"{result.duration_s} s", "")
    console.print(tally)
    for v in result.violations:
        console.print(f"[red]{v}[/red]")
    console.print(f"logs: {result.log_dir}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cbmflow.dev.chaos", description=__doc__.split("\n\n")[0])
    d = ChaosConfig()
    p.add_argument("--scenes", type=int, default=d.scenes)
    p.add_argument("--parcels", type=int, default=d.parcels)
    p.add_argument("--faults", type=int, default=d.faults)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--kinds", default=",".join(d.kinds), help="comma-separated fault kinds")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds before the run is cut short")
    p.add_argument("--work-dir", type=Path, default=None)
    a = p.parse_args(argv)
    kinds = tuple(k for k in a.kinds.split(",") if k)
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        p.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    cfg = ChaosConfig(
        scenes=a.scenes,
        parcels=a.parcels,
        faults=a.faults,
        seed=a.seed,
        workers=a.workers,
        kinds=kinds,
        timeout_s=a.timeout,
        work_dir=a.work_dir,
    )
    from rich.console import Console

    from cbmflow.logging import configure as configure_logging

    configure_logging(level="WARNING", force=True)
    console = Console()
    console.print(f"chaos: {cfg.scenes} scenes, {cfg.parcels} parcels, {cfg.faults} faults, seed {cfg.seed}")
    last = [-1]

    def progress(done: int, total: int) -> None:
        if done != last[0]:
            last[0] = done
            console.print(f"  {done}/{total} scenes finished", highlight=False)

    result = run_chaos(cfg, progress)
    print_report(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
