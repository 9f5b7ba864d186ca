"""bench-chain's readings: the per-job overhead and the projection's transfer model."""

from __future__ import annotations

import math

import pytest

from cbmflow.dev.bench.chain import GRANULE_COG_MB_10M, GRANULE_MB, VM_MB_S, job_overhead, project


def test_job_overhead_compares_the_same_products_and_skips_each_workers_first_job() -> None:
    engine = {"A": 2.0, "B": 4.0}
    jobs = [
        [{"product_id": "A", "cpu_s": 9.0}, {"product_id": "B", "cpu_s": 4.4}, {"product_id": "X", "cpu_s": 1.0}],
        [{"product_id": "B", "cpu_s": 50.0}, {"product_id": "A", "cpu_s": 2.2}, {"product_id": "A"}],
    ]
    ratio, n = job_overhead(jobs, engine)
    assert n == 2  # B (worker 1) and A (worker 2): first jobs, unknown products and no cpu_s left out
    assert ratio == pytest.approx((4.4 + 2.2) / (4.0 + 2.0) - 1)
    assert math.isnan(job_overhead([[{"product_id": "A", "cpu_s": 1.0}]], engine)[0])


def _granule(share: float | None) -> dict[str, dict[str, float]]:
    r = {"parcels": 1000.0, "strip_rows_10m": 10980.0, "scene_s": 3.0, "index_10m_disk_s": 0.0,
         "index_20m_disk_s": 0.0}  # fmt: skip
    if share is not None:
        r |= {"cog_share_10m": share, "cog_share_20m": share}
    return {"0.5": r}


def test_projection_reads_only_the_cog_blocks_under_the_windows() -> None:
    whole = project(_granule(None))
    half = project(_granule(0.5))
    assert whole["cog"]["mb"] == pytest.approx(GRANULE_MB["cog"])  # whole strip rows: every byte
    assert half["cog"]["mb"] == pytest.approx(0.5 * GRANULE_COG_MB_10M + 0.5 * (GRANULE_MB["cog"] - GRANULE_COG_MB_10M))
    assert half["cog"]["transfer_s"] == pytest.approx(half["cog"]["mb"] / (VM_MB_S / 2))
    for p in (whole, half):
        r = p["cog"]
        # the burst arrives at 0: extraction starts after a VM boots and ends with the backfill
        assert 0 < r["extraction_h"] < r["backfill_h"]
        assert r["backfill_h"] - r["extraction_h"] > 100 / 3600  # at least the shortest boot
    assert half["cog"]["backfill_h"] < whole["cog"]["backfill_h"]
