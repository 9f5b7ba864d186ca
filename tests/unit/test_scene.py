"""The worker's index cache: memory LRU backed by a directory shared across restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_engine import GRID, mixed_parcels

from worker import engine
from worker.index_cache import IndexCache


def test_disk_cache_survives_a_restart_and_keys_on_the_parcel_version(tmp_path: Path) -> None:
    geoms = mixed_parcels()
    index = engine.build_index(geoms, np.arange(len(geoms)), GRID)
    key = (1, 3, -5.0, 32735, tuple(GRID.transform)[:6], GRID.width, GRID.height)
    first = IndexCache(entries=2, cache_dir=tmp_path)
    first.put(key, index)
    assert len(list(tmp_path.glob("index-*.npz"))) == 1 and not list(tmp_path.glob(".*tmp"))

    restarted = IndexCache(entries=2, cache_dir=tmp_path)
    got = restarted.get(key)
    assert got is not None and restarted.disk_hits == 1
    for name in ("pids", "offsets", "run_row", "run_col", "run_len", "npixels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(index, name))
    assert got.window == index.window and got.grid == index.grid
    assert restarted.get(key) is got and restarted.hits == 1  # now from memory
    assert restarted.get((1, 4, *key[2:])) is None  # parcels re-imported: a different key


def test_memory_only_cache_evicts_least_recently_used() -> None:
    geoms = mixed_parcels()
    index = engine.build_index(geoms, np.arange(len(geoms)), GRID)
    cache = IndexCache(entries=2, cache_dir="")
    for k in range(3):
        cache.put((k,), index)
    assert cache.get((0,)) is None and cache.get((2,)) is index
