"""``cbmflow db cluster``: a dataset's signatures rewritten in parcel order, nothing else changed."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
from typer.testing import CliRunner

from cbmflow import db
from cbmflow.ops.cli import db_app

PARCELS, SCENES = 40, 6


def _dataset_written_scene_by_scene(dsn: str) -> db.Dataset:
    """Rows appended as workers append them: every parcel of scene 1, then of scene 2, ..."""
    with db.transaction(dsn) as cur:
        cur.execute("INSERT INTO aois (name, geom) VALUES ('ms', ST_Multi(ST_MakeEnvelope(10, 47, 14, 49, 4326)))")
        ds = db.ensure_dataset(cur, "ms", 2024, 3035)
        obs = ds.ident(f"{ds.sigs_table}_obs").as_string(cur)
        for k in range(SCENES):
            when = datetime(2024, 5, 1, 10, tzinfo=UTC) + timedelta(days=5 * k)
            name = f"S2B_MSIL2A_{when:%Y%m%dT%H%M%S}_N0510_R065_T32UPU_{k}"
            cur.execute(
                "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint, location)"
                " VALUES (%s, %s, 'S2B', 'MSIL2A', 's2', %s, ST_Multi(ST_MakeEnvelope(10, 47, 14, 49, 4326)),"
                " '/nowhere') RETURNING id",
                (name, name, when),
            )
            scene_id = int(cur.fetchone()[0])
            cur.execute(
                f"INSERT INTO {obs} (scene_id, pid, stats, scl)"  # noqa: S608 - the dataset's own identifier
                " SELECT %s, pid, ARRAY[pid, %s, 1.5]::real[], ARRAY[4, pid] FROM generate_series(1, %s) pid",
                (scene_id, k, PARCELS),
            )
        return ds


def _physical(dsn: str, ds: db.Dataset) -> list[tuple[int, int, list[float], list[int]]]:
    with db.transaction(dsn) as cur:
        obs = ds.ident(f"{ds.sigs_table}_obs").as_string(cur)
        cur.execute(f"SELECT pid, scene_id, stats, scl FROM {obs} ORDER BY ctid")  # noqa: S608
        return [(int(a), int(b), list(c), list(d)) for a, b, c, d in cur.fetchall()]


def test_cluster_orders_the_rows_by_parcel_and_keeps_them(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _dataset_written_scene_by_scene(pg_dsn)
    before = _physical(pg_dsn, ds)
    assert [r[:2] for r in before] != sorted(r[:2] for r in before), "written scene by scene, not parcel order"

    monkeypatch.setenv("CBMFLOW_DB_DSN", pg_dsn)
    result = CliRunner().invoke(db_app, ["cluster", "--dataset", "MS", "--year", "2024"])
    assert result.exit_code == 0, result.output
    assert f"{PARCELS * SCENES:,} rows" in result.output

    after = _physical(pg_dsn, ds)
    assert [r[:2] for r in after] == sorted(r[:2] for r in before)  # one parcel's season is contiguous
    assert sorted(after) == sorted(before)  # the same rows, values included
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "SELECT i.indisclustered, i.indisprimary FROM pg_index i"
            " WHERE i.indrelid = 'ms.sigs_2024_obs'::regclass AND i.indisclustered"
        )
        assert cur.fetchall() == [(True, True)]


def test_cluster_refuses_an_unknown_dataset_and_gives_up_on_a_held_lock(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CBMFLOW_DB_DSN", pg_dsn)
    runner = CliRunner()
    result = runner.invoke(db_app, ["cluster", "--dataset", "nope", "--year", "2024"])
    assert result.exit_code == 1 and "no dataset nope/2024" in result.output

    ds = _dataset_written_scene_by_scene(pg_dsn)
    before = _physical(pg_dsn, ds)
    holder = psycopg2.connect(pg_dsn)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # a worker's write in progress: a row lock's table lock, kept open
        with holder, holder.cursor() as cur:
            cur.execute("DELETE FROM ms.sigs_2024_obs WHERE pid = 1 AND scene_id = %s", (before[0][1],))
            held.set()
            release.wait(30)
            holder.rollback()

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        result = runner.invoke(db_app, ["cluster", "--dataset", "ms", "--year", "2024", "--lock-timeout", "1"])
        assert result.exit_code == 1 and "stayed locked for 1 s" in result.output
        assert time.monotonic() - started < 15
    finally:
        release.set()
        t.join(30)
        holder.close()
    assert _physical(pg_dsn, ds) == before  # nothing changed
