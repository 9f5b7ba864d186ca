"""The four gaps a review found in the delivery guarantees (issue 14), each closed and proven here
on the session's real PostgreSQL and RabbitMQ (and moto's S3 server), with the test world's truth
as the reference for every row:

* a product the watcher finds changed while a worker extracts it is extracted again: the stale
  commit is refused (scene generations);
* an object-store outage is retried in place: no delivery is used up, the scene completes once
  the store is back;
* extraction holds no transaction while it reads and reduces rasters: it survives a 1 s
  ``idle_in_transaction_session_timeout`` with a computation slower than that;
* a job that killed its worker at every delivery, dead-lettered by the broker's delivery limit,
  has its scene marked failed with that reason, so ``cbmflow status`` and the queue agree.

Each test fails on the code before its fix (see docs/reliability.md).
"""

from __future__ import annotations

import csv
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import shapely
from moto.server import ThreadedMotoServer
from stackfixtures import free_ports

from card.testworld import WorldSummary, generate
from catalog_watcher.service import upsert_scene, watch_once
from catalog_watcher.stac import SceneRecord
from cbmflow import bus as busmod
from cbmflow import db, store
from cbmflow.dev.verify import verify_truth
from cbmflow.messages import ExtractParcels
from cbmflow.ops.jobs import retry
from cbmflow.ops.status import collect
from cbmflow.outbox import flush_outbox
from cbmflow.settings import BusSettings, WatchSettings, WorkerSettings
from worker import consumer, engine
from worker.consumer import Delivery, SceneJobs, Worker
from worker.deadletters import reconcile_dead_letters

YEAR = 2024


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("guarantees"), parcels=40, scenes=2, seed=11, aoi_name="ms", year=YEAR)


def _catalogue(dsn: str, world: WorldSummary, bus: BusSettings) -> None:
    from cbmflow.parcels.ingest import add_aoi, import_parcels

    with db.transaction(dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", YEAR)
    report = watch_once(
        dsn=dsn, bus=bus, settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0)
    )
    assert report.new == 2 and report.published == 2


def _scene_rows(dsn: str) -> list[tuple[Any, ...]]:
    """(id, product_id, card, location, status, attempts, generation, reason) of every scene, by id."""
    with db.transaction(dsn) as cur:
        cur.execute(
            "SELECT id, product_id, card, location, status, attempts, generation, reason FROM scenes ORDER BY id"
        )
        return list(cur.fetchall())


def _message(row: tuple[Any, ...]) -> ExtractParcels:
    return ExtractParcels(scene_id=row[0], product_id=row[1], card=row[2], location=row[3])


def _delivery(msg: ExtractParcels, count: int = 0) -> Delivery:
    """A delivery as the connection thread hands it to a job (the job never touches the channel)."""
    return Delivery(
        channel=None,
        connection=None,  # type: ignore[arg-type]
        tag=1,
        body=msg.model_dump_json().encode(),
        message_id=msg.message_id,
        delivery_count=count,
    )


def _truth(world: WorldSummary, products: set[str], dest: Path) -> tuple[Path, int]:
    """The world's truth restricted to ``products`` (rows of the other scenes would count as missing)."""
    n = 0
    with world.truth_path.open() as src, dest.open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        for r in reader:
            if r["product_id"] in products:
                writer.writerow(r)
                n += 1
    return dest, n


def _assert_truth(dsn: str, world: WorldSummary, products: set[str], tmp_path: Path) -> None:
    truth, n = _truth(world, products, tmp_path / f"truth-{len(products)}.csv")
    tally = verify_truth(dsn, truth, "ms", YEAR)
    assert (tally.expected, tally.found, tally.missing, tally.extra) == (n, n, 0, 0), tally
    assert tally.ok and n > 40, tally


def _wait(what: str, pred: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def _queue_counts(bus: BusSettings) -> tuple[int, int]:
    """(ready in the job queue, messages in the dead-letter queue), by passive declare: exact, instant."""
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        ready = ch.queue_declare(bus.queue, passive=True).method.message_count
        dead = ch.queue_declare(bus.dead_letter_queue, passive=True).method.message_count
        return int(ready), int(dead)
    finally:
        conn.close()


@pytest.fixture
def running() -> Iterator[Callable[[Worker], None]]:
    """Start workers in threads; each is stopped (and must stop) at the end of the test."""
    started: list[tuple[Worker, threading.Thread]] = []

    def start(w: Worker) -> None:
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        started.append((w, t))

    yield start
    for w, t in started:
        w.request_stop()
        t.join(30)
        assert not t.is_alive(), "a worker did not stop"


# --- 1. a product changed during its extraction ---------------------------------------------------


def test_a_product_changed_during_its_extraction_is_extracted_again(
    cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, world: WorldSummary, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    _catalogue(pg_dsn, world, bus)
    first = _scene_rows(pg_dsn)[0]
    sid, product_id, old_location = first[0], first[1], first[3]
    new_location = tmp_path / "v2" / Path(old_location).name  # the new version: same pixels, new place
    shutil.copytree(old_location, new_location)
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "SELECT product_name, mission, sensor, acquired_at, ST_AsBinary(footprint), source_updated"
            " FROM scenes WHERE id = %s",
            (sid,),
        )
        name, mission, sensor, acquired, footprint, updated = cur.fetchone()
        cur.execute("UPDATE scenes SET checksum = 'v1' WHERE id = %s", (sid,))  # what the catalogue said first
    record = SceneRecord(
        product_id=product_id, product_name=name, mission=mission, sensor=sensor, card="s2", acquired_at=acquired,
        footprint=shapely.from_wkb(bytes(footprint)), location=old_location, updated=updated,
    )  # fmt: skip

    seen: list[str] = []
    real = consumer.EXTRACTORS["s2"]

    def changed_meanwhile(cur: Any, scene: Any, cache: Any, sink: Any = None) -> Any:
        seen.append(scene.location)
        result = real(cur, scene, cache, sink) if sink is not None else real(cur, scene, cache)
        if len(seen) == 1:  # the watcher sees the new version before this extraction commits
            with db.transaction(pg_dsn) as wcur:
                _, outcome = upsert_scene(
                    wcur, replace(record, location=str(new_location), updated="v2", checksum="v2")
                )
            assert outcome == "changed"
        return result

    monkeypatch.setitem(consumer.EXTRACTORS, "s2", changed_meanwhile)
    worker = Worker(dsn=pg_dsn, bus=bus, settings=WorkerSettings(metrics_port=-1, backoff_max_s=1))
    verdict = worker._handle(_delivery(_message(first)))
    assert (verdict.action, verdict.label) == ("ack", "extracted")
    assert seen == [old_location, str(new_location)], "the stale commit must be refused, the new version extracted"
    (_, _, _, location, status, attempts, generation, reason) = _scene_rows(pg_dsn)[0]
    assert (location, status, attempts, generation, reason) == (str(new_location), "extracted", 2, 1, None)
    # The new version's job (published by the watcher) finds the scene done: a duplicate.
    again = worker._handle(_delivery(_message(_scene_rows(pg_dsn)[0])))
    assert (again.action, again.label) == ("ack", "duplicate")
    _assert_truth(pg_dsn, world, {product_id}, tmp_path)


# --- 2. an object-store outage --------------------------------------------------------------------


def test_an_object_store_outage_is_retried_in_place_without_using_deliveries(
    cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, world: WorldSummary, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, running: Callable[[Worker], None],
) -> None:  # fmt: skip
    (port,) = free_ports(1)
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cbmflow-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cbmflow-test-secret")
    monkeypatch.setenv("CBMFLOW_STORE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CBMFLOW_STORE_S3_REGION", "us-east-1")
    monkeypatch.setenv("CBMFLOW_STORE_S3_PATH_STYLE", "true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = store.s3_client()
        client.create_bucket(Bucket="eodata")
        for safe in world.product_paths:
            for path in sorted(p for p in safe.rglob("*") if p.is_file()):
                client.upload_file(str(path), "eodata", f"L2A/{safe.name}/{path.relative_to(safe).as_posix()}")
    finally:
        server.stop()  # the store goes away before the worker gets its first job
    # Delivery limit 1: without retrying in place, one requeue more and the job is dead-lettered.
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url, delivery_limit=1)
    _catalogue(pg_dsn, world, bus)
    with db.transaction(pg_dsn) as cur:
        for safe in world.product_paths:
            cur.execute(
                "UPDATE scenes SET location = %s WHERE location LIKE %s",
                (f"s3://eodata/L2A/{safe.name}", f"%/{safe.name}"),
            )
    assert all(r[3].startswith("s3://") for r in _scene_rows(pg_dsn))

    worker = Worker(
        dsn=pg_dsn, bus=bus, settings=WorkerSettings(metrics_port=-1, heartbeat_s=0.5, lease_s=4, backoff_max_s=1)
    )
    running(worker)
    waiting = _wait(
        "a job waiting for the store",
        lambda: [r for r in _scene_rows(pg_dsn) if r[4] == "processing" and (r[7] or "").startswith("object store")],
        30,
    )
    time.sleep(5)  # several retries (1 s backoff), longer than the lease: it must be renewed meanwhile
    rows = _scene_rows(pg_dsn)
    assert [r[4] for r in rows].count("processing") == 1 and rows[0][0] == waiting[0][0]
    assert "attempt 3" in rows[0][7] or "attempt 4" in rows[0][7] or "attempt 5" in rows[0][7], rows[0][7]
    assert _queue_counts(bus) == (1, 0), "the waiting job keeps its message, the other one waits in the queue"

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # the store is back
    server.start()
    try:
        _wait("both scenes extracted", lambda: {r[4] for r in _scene_rows(pg_dsn)} == {"extracted"}, 90)
    finally:
        worker.request_stop()
        server.stop()
    rows = _scene_rows(pg_dsn)
    assert [(r[5], r[7]) for r in rows] == [(1, None), (1, None)], "claimed once each: no delivery was used up"
    assert _queue_counts(bus) == (0, 0)
    assert worker.done == 2, "two verdicts, both acks: a requeue would have meant a second claim"
    _assert_truth(pg_dsn, world, {r[1] for r in rows}, tmp_path)


# --- 3. no transaction held while computing -------------------------------------------------------


def test_extraction_holds_no_transaction_while_it_reads_and_reduces(
    cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, world: WorldSummary, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    _catalogue(pg_dsn, world, bus)
    first, second = _scene_rows(pg_dsn)
    # The second scene first, on ordinary settings: numba compiles the kernels (seconds, once per
    # process), so that the observation below falls into the reading and reducing of the scene.
    warm = Worker(dsn=pg_dsn, bus=bus, settings=WorkerSettings(metrics_port=-1))
    assert warm._handle(_delivery(_message(second))).label == "extracted"
    # Every connection of this worker is killed by the server after 1 s idle inside a transaction.
    strict = f"{pg_dsn}?options=-c%20idle_in_transaction_session_timeout%3D1000"
    open_while_computing: list[int] = []
    real = engine.band_stats_strips

    def slow(*args: Any, **kwargs: Any) -> Any:
        if not open_while_computing:  # the first band: look at the sessions, and take 1.6 s
            time.sleep(0.4)
            with db.transaction(pg_dsn) as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
                )
                open_while_computing.append(int(cur.fetchone()[0]))
            time.sleep(1.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "band_stats_strips", slow)
    worker = Worker(dsn=strict, bus=bus, settings=WorkerSettings(metrics_port=-1, backoff_max_s=1))
    verdict = worker._handle(_delivery(_message(first)))
    assert (verdict.action, verdict.label) == ("ack", "extracted")
    assert open_while_computing == [0], "a transaction stayed open while the rasters were reduced"
    assert _scene_rows(pg_dsn)[0][4:6] == ("extracted", 1), "extracted at the first claim, no retry"
    _assert_truth(pg_dsn, world, {first[1], second[1]}, tmp_path)


# --- 4. a job that kills its worker every time ----------------------------------------------------


def _die_with(bus: BusSettings, jobs: SceneJobs, dsn: str) -> None:
    """What a worker killed by the kernel's OOM killer leaves: a claimed scene, an unsettled delivery."""
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        got = _wait("a delivery", lambda: ch.basic_get(bus.queue, auto_ack=False), 10)
        method, _, body = got
        assert method is not None
        dbc = db.connect(dsn)
        try:
            assert jobs.claim(dbc, ExtractParcels.model_validate_json(body)) is not None
        finally:
            dbc.close()
    finally:
        conn.close()  # no ack, no reject: the broker returns the message and counts the delivery


def test_a_job_dead_lettered_by_the_delivery_limit_marks_its_scene_failed(
    cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str, running: Callable[[Worker], None],
) -> None:  # fmt: skip
    bus = BusSettings(amqp_url=amqp_url, management_url=management_url, delivery_limit=1)
    from datetime import UTC, datetime

    rec = SceneRecord(
        product_id="S2B_MSIL2A_20240601T102021_N0510_R065_T32UPU_X", product_name="p1", mission="S2B", sensor="MSI",
        card="s2", acquired_at=datetime(2024, 6, 1, tzinfo=UTC), footprint=shapely.box(11.0, 48.0, 11.5, 48.5),
        location="/nowhere/p1.SAFE", updated="2024-06-30T00:00:00Z",
    )  # fmt: skip
    with db.transaction(pg_dsn) as cur:
        sid, _ = upsert_scene(cur, rec)
    assert flush_outbox(pg_dsn, bus) == 1
    jobs = SceneJobs(pg_dsn, "w-oom", WorkerSettings(lease_s=1.5))
    _die_with(bus, jobs, pg_dsn)
    _die_with(bus, jobs, pg_dsn)
    _wait("the broker to dead-letter the job", lambda: _queue_counts(bus) == (0, 1), 10)

    # Its last worker's lease is still live: it might yet be alive, so the scene is left alone.
    early = reconcile_dead_letters(pg_dsn, bus)
    assert (early.letters, early.failed, early.deferred) == (1, [], [sid])
    assert _scene_rows(pg_dsn)[0][4] == "processing"

    # A healthy worker reconciles within a lease period, without anyone asking.
    worker = Worker(dsn=pg_dsn, bus=bus, settings=WorkerSettings(metrics_port=-1, heartbeat_s=0.5, lease_s=1.5))
    running(worker)
    _wait("the scene marked failed", lambda: _scene_rows(pg_dsn)[0][4] == "failed", 20)
    worker.request_stop()
    reason = "delivery limit reached (worker died 2 times; last worker w-oom)"
    assert _scene_rows(pg_dsn)[0][4:8:3] == ("failed", reason)
    status = collect()
    assert status["scenes"] == {"failed": 1}
    assert status["failed"] == [{"scene_id": sid, "product_id": rec.product_id, "reason": reason}]
    # The letter stays, headers and all, for `jobs retry --dead-lettered`.
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        method, props, _ = ch.basic_get(bus.dead_letter_queue, auto_ack=False)
        assert method is not None and busmod.DeadLetter(0, b"", props).death_reason == "delivery_limit"
        ch.basic_reject(method.delivery_tag, requeue=True)
    finally:
        conn.close()
    _wait("the worker to stop before the retry publishes a job it could take", worker.exited.is_set, 30)
    assert retry(pg_dsn, bus, dead_lettered=True).republished == [sid]
    assert _queue_counts(bus) == (1, 0)


def test_jobs_retry_waits_for_a_reconciliation_pass_that_holds_the_letters(
    cbm_env: Any, pg_dsn: str, amqp_url: str, management_url: str
) -> None:
    """The workers' dead-letter pass takes the letters off the queue for a moment each period. A
    `jobs retry --dead-lettered` in that moment once re-published nothing (it read an empty queue;
    seen in CI). Both now take turns on one advisory lock: retry waits, a pass finding retry (or
    another pass) at work skips its period."""
    from datetime import UTC, datetime

    bus = BusSettings(amqp_url=amqp_url, management_url=management_url)
    rec = SceneRecord(
        product_id="S2B_MSIL2A_20240611T102021_N0510_R065_T32UPU_L", product_name="p-lock", mission="S2B",
        sensor="MSI", card="s2", acquired_at=datetime(2024, 6, 11, tzinfo=UTC),
        footprint=shapely.box(11.0, 48.0, 11.5, 48.5), location="/nowhere/p-lock.SAFE", updated="2024-06-30T00:00:00Z",
    )  # fmt: skip
    with db.transaction(pg_dsn) as cur:
        sid, _ = upsert_scene(cur, rec)
    assert flush_outbox(pg_dsn, bus) == 1
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        method = _wait("the job", lambda: ch.basic_get(bus.queue, auto_ack=False)[0], 10)
        ch.basic_reject(method.delivery_tag, requeue=False)  # a poison verdict: dead-lettered at once
        _wait("the letter", lambda: _queue_counts(bus) == (0, 1), 10)

        ch.confirm_delivery()
        results: list[Any] = []
        with db.advisory_lock(pg_dsn, db.DEAD_LETTER_LOCK, wait=False) as ours:
            assert ours
            assert reconcile_dead_letters(pg_dsn, bus).letters == 0, "a second pass skips its period"
            letters = busmod.fetch_dead_letters(ch, bus)  # the pass at work: the queue is empty now
            assert len(letters) == 1 and _queue_counts(bus) == (0, 0)
            t = threading.Thread(target=lambda: results.append(retry(pg_dsn, bus, dead_lettered=True)))
            t.start()
            time.sleep(1.5)
            assert t.is_alive() and not results, "retry waits for the pass instead of reading an empty queue"
            for letter in letters:
                busmod.keep_dead_letter(ch, bus, letter)
        t.join(30)
    finally:
        conn.close()
    assert len(results) == 1
    assert results[0].republished == [sid] and results[0].letters_removed == 1
    assert _queue_counts(bus) == (1, 0)
