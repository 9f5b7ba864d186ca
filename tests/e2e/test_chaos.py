"""The short, seeded version of ``make chaos``: the whole chain (watcher, workers, API under load,
products on an S3 endpoint) on servers of its own, with three faults at seeded moments, and every
guarantee checked against the generator's truth at the end.

The faults here are a worker's ``kill -9``, a PostgreSQL restart and an object-store outage
(the fault that once lost scenes: GDAL cached the outage's failures as missing files, fixed by
``cbmflow.store.forget_cached`` before each retry); the broker restart, the watcher kill and the
API restart run in the full ``make chaos`` (same code, ``cbmflow.dev.chaos.Run.inject``), and
broker restarts are covered in ``test_faults.py`` as well.
"""

from __future__ import annotations

from pathlib import Path

from cbmflow.dev.chaos import ChaosConfig, run_chaos, schedule

KINDS = ("worker_kill", "db_restart", "store_outage")


def test_schedule_is_seeded_and_covers_the_kinds() -> None:
    cfg = ChaosConfig(faults=12, seed=5)
    first, again = schedule(cfg), schedule(cfg)
    assert [(f.kind, f.at_fraction) for f in first] == [(f.kind, f.at_fraction) for f in again]
    assert sorted(f.kind for f in first) == sorted(2 * list(cfg.kinds))
    assert all(0.05 <= f.at_fraction <= 0.85 for f in first)
    assert [f.at_fraction for f in first] == sorted(f.at_fraction for f in first)
    assert [(f.kind, f.at_fraction) for f in schedule(ChaosConfig(faults=12, seed=6))] != [
        (f.kind, f.at_fraction) for f in first
    ]


def test_short_chaos_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        scenes=10, parcels=500, faults=3, seed=11, workers=2, kinds=KINDS, reveal_every_s=3, timeout_s=150,
        work_dir=tmp_path,
    )  # fmt: skip
    result = run_chaos(cfg)
    assert sorted(f.kind for f in result.faults) == sorted(KINDS)
    assert all(f.fired_at_s is not None and f.detail for f in result.faults), result.faults
    assert result.scenes_total == 10
    assert result.scenes_by_status == {"extracted": 10}, result.violations
    assert result.rows_expected > 500 * 10 and result.rows_expected == result.rows_found
    assert result.truth_ok and result.duplicates == 0 and result.dead_letters == []
    assert result.api["2xx"] > 20, result.api
    assert result.api_violations == [], result.api_violations[:10]
    assert set(result.api) <= {"2xx", "503 unavailable", "503 timeout", "refused while the API restarted"}, result.api
    assert result.ok, result.violations
