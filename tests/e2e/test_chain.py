"""The whole chain on real servers: test world → import → watch → RabbitMQ → worker → PostGIS,
checked against the generator's ground truth (not against the extractor's own output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from card.testworld import generate
from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.dev.verify import verify_truth
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import BusSettings, WatchSettings

CBMFLOW = str(Path(sys.executable).parent / "cbmflow")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, parcels=80, scenes=4, seed=7, aoi_name="ms", year=2024)
    return out


def _run_workers(n: int, env: dict[str, str], timeout_s: float = 240) -> list[subprocess.CompletedProcess[str]]:
    procs = [
        subprocess.Popen(
            [CBMFLOW, "worker", "--idle-exit", "4"],
            env={**env, "CBMFLOW_WORKER_ID": f"test-worker-{i}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout_s)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return results


def _scene_status(dsn: str) -> dict[str, int]:
    with db.transaction(dsn) as cur:
        cur.execute("SELECT status, count(*) FROM scenes GROUP BY status")
        return {s: int(n) for s, n in cur.fetchall()}


def test_chain_recovers_ground_truth(world: Path, cbm_env: object, pg_dsn: str) -> None:
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world / "aoi.geojson")
        report = import_parcels(cur, world / "parcels.gpkg", "ms", 2024)
    invalid = (world / "invalid_parcels.txt").read_text().split()
    assert len(report.rejected) == len(invalid) > 0
    assert {r[1] for r in report.rejected} == set(invalid)

    settings = WatchSettings(catalog_url=str(world / "stac" / "catalog.json"), lookback_days=0)
    first = watch_once(dsn=pg_dsn, settings=settings)
    assert (first.seen, first.new, first.published) == (4, 4, 4)
    again = watch_once(dsn=pg_dsn, settings=settings)
    assert (again.new, again.published) == (0, 0), "a second watch must publish nothing"

    env = dict(os.environ)
    results = _run_workers(2, env)
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    assert _scene_status(pg_dsn) == {"extracted": 4}

    tally = verify_truth(pg_dsn, world / "truth.csv", "ms", 2024)
    assert tally.expected > 80 * 4, tally
    assert tally.ok, tally

    # SCL histograms equal the generator's class counts.
    import csv

    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "SELECT p.parcel_id, s.product_id, h.class, h.count FROM ms.hists_2024 h"
            " JOIN ms.parcels_2024 p USING (pid) JOIN scenes s ON s.id = h.scene_id"
        )
        got = {(a, b, int(c)): int(n) for a, b, c, n in cur.fetchall()}
    with (world / "truth_scl.csv").open() as fh:
        want = {(r["parcel_id"], r["product_id"], int(r["class"])): int(r["count"]) for r in csv.DictReader(fh)}
    assert got == want

    # Re-publishing a finished scene is harmless: rows are replaced, never duplicated.
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT count(*) FROM ms.sigs_2024")
        before = cur.fetchone()[0]
        cur.execute("SELECT id, product_id, card, location FROM scenes ORDER BY id LIMIT 1")
        sid, pid, card, loc = cur.fetchone()
        cur.execute("UPDATE scenes SET status = 'queued' WHERE id = %s", (sid,))  # as `jobs retry` does
    bus = BusSettings()
    conn = pika.BlockingConnection(pika.URLParameters(bus.resolved_amqp_url()))
    ch = conn.channel()
    body = {"kind": "ExtractParcels", "schema_version": 1, "scene_id": sid, "product_id": pid, "card": card,
            "location": loc}  # fmt: skip
    ch.basic_publish("", bus.queue, json.dumps(body).encode())  # re-extracted: rows replaced
    ch.basic_publish("", bus.queue, json.dumps(body).encode())  # duplicate of a finished scene: acked
    ch.basic_publish("", bus.queue, b"{not json")  # poison: dead-lettered, never blocks the queue
    conn.close()
    results = _run_workers(1, env)
    assert results[0].returncode == 0, results[0].stdout[-3000:]
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT count(*) FROM ms.sigs_2024")
        assert cur.fetchone()[0] == before
        cur.execute("SELECT status, attempts FROM scenes WHERE id = %s", (sid,))
        assert cur.fetchone() == ("extracted", 2)
    assert verify_truth(pg_dsn, world / "truth.csv", "ms", 2024).ok
    deadline = time.monotonic() + 15
    from cbmflow.bus import queue_depth

    while time.monotonic() < deadline:
        depth = queue_depth(bus)
        if depth.dead_lettered == 1 and depth.backlog == 0:
            break
        time.sleep(1)
    assert (depth.dead_lettered, depth.backlog) == (1, 0)
