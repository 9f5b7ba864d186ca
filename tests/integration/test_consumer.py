"""Decisions of the consumer, the outbox flush and ``jobs retry``, on the session's real servers.

The fault scenarios with worker processes (kill -9, broker and database restarts, poison input,
shutdown) are in ``test_faults.py``; these are the quicker checks of the pieces they rely on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pika
import psycopg2
import pytest
import shapely.geometry

from catalog_watcher.service import upsert_scene, watch_once
from catalog_watcher.stac import SceneRecord
from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.messages import ExtractParcels
from cbmflow.ops.jobs import retry
from cbmflow.ops.status import collect, print_status
from cbmflow.outbox import flush_outbox, pending_outbox
from cbmflow.settings import BusSettings, WatchSettings, WorkerSettings
from worker.consumer import Worker, db_unavailable

FOOTPRINT = shapely.geometry.box(11.0, 48.0, 11.5, 48.5)


def _bus(amqp_url: str, management_url: str) -> BusSettings:
    return BusSettings(amqp_url=amqp_url, management_url=management_url)


def _scene(cur: psycopg2.extensions.cursor, n: int) -> int:
    rec = SceneRecord(
        product_id=f"S2B_MSIL2A_202406{n:02d}T102021_N0510_R065_T32UPU_X",
        product_name=f"p{n}",
        mission="S2B",
        sensor="MSI",
        card="s2",
        acquired_at=datetime(2024, 6, n, tzinfo=UTC),
        footprint=FOOTPRINT,
        location=f"/nowhere/p{n}.SAFE",
        updated="2024-06-30T00:00:00Z",
    )
    sid, what = upsert_scene(cur, rec)
    assert what == "new"
    return sid


def _get_all(bus: BusSettings, queue: str) -> list[tuple[str | None, bytes, dict[str, object]]]:
    """Drain a queue (acking), returning (message id, body, headers) of each message."""
    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props.message_id, body, dict(props.headers or {})))
    finally:
        conn.close()


def test_an_unreachable_database_is_told_apart_from_a_failing_job(
    pg_dsn: str, free_ports_factory: Callable[[int], list[int]]
) -> None:
    (port,) = free_ports_factory(1)
    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(f"postgresql://u:p@127.0.0.1:{port}/x", connect_timeout=3)
    assert db_unavailable(refused.value, None)

    conn = psycopg2.connect(pg_dsn)
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()
        conn.commit()
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg2.Error) as cut, conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        assert db_unavailable(cut.value, conn), "a terminated session is an outage, not the job's fault"

        with pytest.raises(psycopg2.Error) as failing, admin.cursor() as cur:
            cur.execute("SELECT 1 / 0")
        assert not db_unavailable(failing.value, admin), "an error raised in a live session is the job's"
    finally:
        conn.close()
        admin.close()


def test_the_outbox_survives_a_broker_outage_and_is_flushed_afterwards(
    cbm_env: object,
    pg_dsn: str,
    amqp_url: str,
    management_url: str,
    free_ports_factory: Callable[[int], list[int]],
    tmp_path: Path,
) -> None:
    with db.transaction(pg_dsn) as cur:
        ids = [_scene(cur, n) for n in (1, 2, 3)]
    (port,) = free_ports_factory(1)
    down = BusSettings(amqp_url=f"amqp://u:p@127.0.0.1:{port}/%2F", management_url=management_url)
    assert flush_outbox(pg_dsn, down) == 0, "a broker outage is not an error of the cycle"
    assert pending_outbox(pg_dsn) == 3

    # A cycle whose catalogue scan fails still flushes what earlier cycles left pending.
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": FOOTPRINT.__geo_interface__}))
    from cbmflow.parcels.ingest import add_aoi

    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", aoi)
    up = _bus(amqp_url, management_url)
    broken = WatchSettings(catalog_url=str(tmp_path / "missing" / "catalog.json"), lookback_days=0)
    with pytest.raises(Exception):  # noqa: B017 - whatever the STAC library raises for a missing file
        watch_once(dsn=pg_dsn, bus=up, settings=broken)
    assert pending_outbox(pg_dsn) == 0
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT count(*) FROM scenes WHERE status = 'queued'")
        assert cur.fetchone() == (3,)
    assert sorted(m[0] or "" for m in _get_all(up, up.queue)) == sorted(f"scene-{i}" for i in ids)


def test_retry_dead_lettered_republishes_what_it_can_and_keeps_the_rest(
    cbm_env: object, pg_dsn: str, amqp_url: str, management_url: str
) -> None:
    bus = _bus(amqp_url, management_url)
    with db.transaction(pg_dsn) as cur:
        failed, done, busy, failed_no_letter = (_scene(cur, n) for n in (1, 2, 3, 4))
        cur.execute("UPDATE outbox SET published_at = now()")  # as if the watcher had published them
        cur.execute(
            "UPDATE scenes SET status = 'failed', reason = 'corrupt raster' WHERE id IN (%s, %s)",
            (failed, failed_no_letter),
        )
        cur.execute("UPDATE scenes SET status = 'extracted' WHERE id = %s", (done,))
        cur.execute(
            "UPDATE scenes SET status = 'processing', lease_owner = 'w', lease_until = now() + interval '1 hour'"
            " WHERE id = %s",
            (busy,),
        )
        cur.execute("SELECT id, product_id, location FROM scenes")
        rows = {r[0]: r for r in cur.fetchall()}
    conn = busmod.connect(bus)
    ch = conn.channel()
    ch.confirm_delivery()
    busmod.declare_topology(ch, bus)
    for sid in (failed, done, busy, 999):
        product, location = (rows[sid][1], rows[sid][2]) if sid in rows else ("gone", "/gone")
        msg = ExtractParcels(scene_id=sid, product_id=product, card="s2", location=location)
        props = pika.BasicProperties(message_id=msg.message_id, delivery_mode=2, headers={"origin": "test"})
        ch.basic_publish("", bus.dead_letter_queue, msg.model_dump_json().encode(), props, mandatory=True)
    ch.basic_publish("", bus.dead_letter_queue, b"{not json", pika.BasicProperties(message_id="poison"), mandatory=True)
    conn.close()

    report = retry(pg_dsn, bus, dead_lettered=True)
    assert report.republished == [failed]
    assert report.skipped == {done: "already extracted", busy: "being processed now", 999: "unknown scene"}
    assert (report.letters_removed, report.letters_kept, report.letters_malformed) == (2, 3, 1)
    assert report.pending == []
    assert [m[0] for m in _get_all(bus, bus.queue)] == [f"scene-{failed}"]
    kept = _get_all(bus, bus.dead_letter_queue)
    assert sorted(m[0] or "" for m in kept) == sorted(["poison", f"scene-{busy}", "scene-999"])
    assert all(m[2].get("origin") == "test" for m in kept if m[0] != "poison"), "kept letters keep their headers"
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT id, status, reason FROM scenes ORDER BY id")
        states = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
    assert states[failed] == ("queued", None)
    assert states[failed_no_letter] == ("failed", "corrupt raster"), "no dead letter, not retried by --dead-lettered"

    # --failed takes the scenes from the database; a bare --scene forces even a finished one.
    assert retry(pg_dsn, bus, failed=True).republished == [failed_no_letter]
    assert retry(pg_dsn, bus, scenes=[done]).republished == [done]
    assert sorted(m[0] or "" for m in _get_all(bus, bus.queue)) == sorted(
        [f"scene-{failed_no_letter}", f"scene-{done}"]
    )


def test_status_shows_the_database_half_when_the_broker_is_down(
    cbm_env: object,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    free_ports_factory: Callable[[int], list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    (port,) = free_ports_factory(1)
    monkeypatch.setenv("CBMFLOW_BUS_MANAGEMENT_URL", f"http://u:p@127.0.0.1:{port}")
    with db.transaction(pg_dsn) as cur:
        _scene(cur, 1)
        cur.execute(
            "INSERT INTO workers (id, host, pid, state, current_scene, metrics_port, heartbeat_at)"
            " VALUES ('w-1', 'h1', 1, 'busy', 1, 9100, now() - interval '1 hour')"
        )
    data = collect()
    print_status()
    screen = capsys.readouterr().out
    assert "queue:" in screen and "w-1" in screen and "stale" in screen and "outbox pending 1" in screen
    assert "error" in data["queue"]
    assert (data["scenes"], data["outbox_pending"]) == ({"discovered": 1}, 1)
    (w,) = data["workers"]
    assert (w["state"], w["stale"], w["metrics"]) == ("busy", True, "http://h1:9100/metrics")


def _run_in_thread(worker: Worker) -> tuple[threading.Thread, list[int]]:
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    t.start()
    return t, rc


def _state(dsn: str, wid: str) -> str | None:
    with db.transaction(dsn) as cur:
        cur.execute("SELECT state FROM workers WHERE id = %s", (wid,))
        row = cur.fetchone()
    return str(row[0]) if row else None


def _wait(pred: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_drain_requests_stop_idle_workers_and_stick_across_reconnects(
    cbm_env: object, pg_dsn: str, amqp_url: str, management_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = _bus(amqp_url, management_url)
    settings = WorkerSettings(heartbeat_s=0.2, metrics_port=-1)

    monkeypatch.setenv("CBMFLOW_WORKER_ID", "w-registry")
    w = Worker(dsn=pg_dsn, bus=bus, settings=settings)
    t, rc = _run_in_thread(w)
    _wait(lambda: _state(pg_dsn, "w-registry") == "idle", 10)
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE workers SET state = 'draining' WHERE id = 'w-registry'")
    t.join(10)
    assert rc == [0] and _state(pg_dsn, "w-registry") == "stopped"

    # A drain that arrives while the worker reconnects is not overwritten by its "idle".
    monkeypatch.setenv("CBMFLOW_WORKER_ID", "w-sticky")
    sticky = Worker(dsn=pg_dsn, bus=bus, settings=settings)
    sticky._registry("idle")
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE workers SET state = 'draining' WHERE id = 'w-sticky'")
    sticky._registry("idle")
    assert _state(pg_dsn, "w-sticky") == "draining" and sticky.stopping.is_set()

    drain_file = tmp_path / "drain"
    monkeypatch.setenv("CBMFLOW_WORKER_ID", "w-file")
    f = Worker(dsn=pg_dsn, bus=bus, settings=settings.model_copy(update={"drain_file": str(drain_file)}))
    t, rc = _run_in_thread(f)
    _wait(lambda: _state(pg_dsn, "w-file") == "idle", 10)
    drain_file.touch()
    t.join(10)
    assert rc == [0] and _state(pg_dsn, "w-file") == "stopped"
