"""CARD-BS in the chain on real servers, with real worker processes and a real crash.

Test world with Sentinel-1 GRD inputs (``card/testworld_grd.py``: rendered forwards from a known γ0
per parcel and date) → the watcher records them as CARD inputs and writes their ``GenerateCard``
jobs → a worker claims one and is killed (``kill -9``) in the middle of it → another worker takes
the input over once the lease expired, generates the backscatter COGs on the world's MGRS tile,
registers one ``bs`` scene per tile and queues its extraction → ``VVb``/``VHb`` rows. A second,
re-published delivery of the same job is acknowledged without work. Checked: one scene per
(GRD, tile), no duplicate row, every count equal to the generator's truth, means within its stated
agreement (``cbmflow.dev.verify.verify_card_truth``), the Sentinel-2 rows exact (``verify_truth``),
empty queues and dead-letter queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.dev.verify import verify_card_truth, verify_truth
from cbmflow.messages import GenerateCard
from cbmflow.outbox import enqueue, flush_outbox
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import BusSettings, WatchSettings

CBMFLOW = str(Path(sys.executable).parent / "cbmflow")
COLLECTIONS = ["sentinel-2-l2a", "sentinel-1-grd"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("world"), parcels=40, scenes=1, seed=3, aoi_name="ms", grd_scenes=2)


def _worker(env: dict[str, str], wid: str, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    extra = {f"CBMFLOW_WORKER_{k.upper()}": v for k, v in settings.items()}
    with log.open("ab") as fh:
        return subprocess.Popen(
            [CBMFLOW, "worker", "--idle-exit", "3"],
            env={**env, **extra, "CBMFLOW_WORKER_ID": wid},
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def _rows(dsn: str, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with db.transaction(dsn) as cur:
        cur.execute(query, args)
        return list(cur.fetchall())


@pytest.mark.timeout(400)
def test_grd_to_card_bs_to_parcel_rows_survives_a_kill_and_a_redelivery(
    world: WorldSummary, cbm_env: Any, pg_dsn: str, tmp_path: Path
) -> None:
    assert world.truth_grd_path is not None and len(world.grd_products) == 2
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.out / "aoi.geojson")
        import_parcels(cur, world.out / "parcels.gpkg", "ms", 2024)
    settings = WatchSettings(
        catalog_url=str(world.out / "stac" / "catalog.json"), lookback_days=0, collections=COLLECTIONS
    )
    first = watch_once(dsn=pg_dsn, settings=settings)
    assert first.card_inputs == {"new": 2} and (first.new, first.published) == (1, 3)
    again = watch_once(dsn=pg_dsn, settings=settings)
    assert again.published == 0, "a GRD seen again enqueues nothing"
    inputs = dict(_rows(pg_dsn, "SELECT product_name, id FROM card_inputs WHERE status = 'queued'"))
    assert sorted(inputs) == sorted(world.grd_products)

    # The same job published a second time (e.g. `jobs retry` racing the first delivery).
    first_name = min(inputs)
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT location FROM card_inputs WHERE id = %s", (inputs[first_name],))
        (location,) = cur.fetchone()
        enqueue(
            cur, GenerateCard(card_input_id=inputs[first_name], product_id=first_name, card="bs", location=location)
        )
    bus = BusSettings()
    assert flush_outbox(pg_dsn, bus) == 1

    env = dict(os.environ)
    timing = {"lease_s": "4", "heartbeat_s": "1", "card_scratch_dir": str(tmp_path / "scratch")}
    log = tmp_path / "workers.log"
    victim = _worker(env, "card-victim", log, job_kinds='["GenerateCard"]', **timing)
    deadline = time.monotonic() + 120
    claimed: list[tuple[Any, ...]] = []
    while not claimed and time.monotonic() < deadline and victim.poll() is None:
        claimed = _rows(
            pg_dsn, "SELECT id FROM card_inputs WHERE status = 'processing' AND lease_owner = 'card-victim'"
        )
        time.sleep(0.05)
    assert claimed, log.read_text()[-3000:]
    victim.send_signal(signal.SIGKILL)  # mid-job: the input stays leased to a dead worker
    victim.wait(10)
    assert _rows(pg_dsn, "SELECT status FROM card_inputs WHERE id = %s", (claimed[0][0],)) == [("processing",)]

    survivor = _worker(env, "card-survivor", log, **timing)
    assert survivor.wait(300) == 0, log.read_text()[-4000:]

    states = _rows(pg_dsn, "SELECT id, status, attempts, scenes_written FROM card_inputs ORDER BY id")
    assert {s[1] for s in states} == {"done"}, states
    attempts = {s[0]: s[2] for s in states}
    assert attempts[claimed[0][0]] == 2, "the killed job was taken over once its lease expired"
    # North of Munich: 32UPU (also named 32TPU: one grid, generated once) and zone 33's 33UTP overlap.
    assert all(s[3] == 2 for s in states), states
    scenes = _rows(pg_dsn, "SELECT card, status, acq_key FROM scenes ORDER BY card, acq_key")
    assert [s[:2] for s in scenes] == [("bs", "extracted")] * 4 + [("s2", "extracted")]
    assert sorted(s[2].split("_")[2] for s in scenes[:4]) == ["32UPU", "32UPU", "33UTP", "33UTP"]
    assert len({s[2] for s in scenes}) == 5, "one scene per (GRD, tile)"
    dup = _rows(
        pg_dsn,
        "SELECT count(*) FROM (SELECT pid, scene_id, band FROM ms.sigs_2024 GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    assert dup == [(0,)]
    events = log.read_text()
    assert '"card-survivor"' in events and '"job.duplicate"' in events, "the re-published job did no work"

    card = verify_card_truth(pg_dsn, world.truth_grd_path, "ms", 2024, tile="32UPU")
    assert card.ok(), card
    assert card.expected >= 2 * 2 * 30 and card.other_tiles == card.expected, card
    s2 = verify_truth(pg_dsn, world.out / "truth.csv", "ms", 2024)
    assert s2.ok, s2

    conn = busmod.connect(bus)
    try:
        ch = conn.channel()
        for queue in (bus.queue, bus.card_queue, bus.dead_letter_queue):
            assert busmod.passive_depth(ch, bus, queue)[0] == 0, queue
    finally:
        conn.close()
