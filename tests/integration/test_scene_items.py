"""Products published as STAC Item assets, through the worker's scene functions into PostGIS.

One acquisition is extracted from its SAFE, then from the earth-search ``sentinel-2-l2a`` Item
(COG DN with the offset already applied) and the ``sentinel-2-c1-l2a`` Item (offset to apply),
read from local paths and over HTTP (``/vsicurl/``, the Item fetched from the server): every
re-extraction must replace the scene's rows with exactly the SAFE's, which equal the generator's
truth. A CARD ``bs`` product written as a ``sentinel-1-rtc``-shaped Item (one COG per
polarisation, -32768 no-data) gives the rows of the CARD COG.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2.errors
import pytest
from test_s3 import moto_endpoint, s3  # noqa: F401 - fixtures: an S3 endpoint on 127.0.0.1 and its settings

from card.testworld import EARTH_SEARCH_FLAVOURS, WorldSummary, generate, write_earth_search_item
from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.dev.verify import verify_truth
from cbmflow.errors import PermanentJobError
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import WatchSettings
from worker.index_cache import IndexCache
from worker.scene import ClaimedScene, extract_card, extract_s2

SCENES = 2
COLLECTIONS = ["sentinel-2-l2a", "sentinel-1-card-bs"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    out = tmp_path_factory.mktemp("itemworld")
    return generate(out, parcels=40, scenes=SCENES, seed=13, s1_scenes=1, earth_search_items=True)


@pytest.fixture(scope="module")
def http_root(world: WorldSummary) -> Iterator[tuple[str, Path]]:
    """A directory served over HTTP with ranges by a separate process on 127.0.0.1."""
    root = world.out / "served"
    root.mkdir(exist_ok=True)
    server = Path(__file__).resolve().parents[1] / "range_http.py"
    proc = subprocess.Popen([sys.executable, str(server), str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", root
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _rows(dsn: str, table: str = "sigs_2024") -> list[tuple[Any, ...]]:
    with db.transaction(dsn) as cur:
        if table == "sigs_2024":
            cur.execute("SELECT pid, scene_id, band, count, mean, std, min, max, p25, p50, p75 FROM ms.sigs_2024")
        else:
            cur.execute("SELECT pid, scene_id, class, count FROM ms.hists_2024")
        return sorted(cur.fetchall())


def _scenes(dsn: str) -> list[ClaimedScene]:
    with db.transaction(dsn) as cur:
        cur.execute("SELECT id, product_id, card, location, 2024 FROM scenes ORDER BY id")
        return [ClaimedScene(*row) for row in cur.fetchall()]


def _extract(dsn: str, scene: ClaimedScene, location: str) -> None:
    moved = ClaimedScene(scene.id, scene.product_id, scene.card, location, scene.year)
    with db.transaction(dsn) as cur:
        (extract_s2 if scene.card == "s2" else extract_card)(cur, moved, IndexCache(entries=4, cache_dir=""))


def test_cog_items_local_and_http_replace_rows_with_the_safes(
    world: WorldSummary, http_root: tuple[str, Path], cbm_env: Any, pg_dsn: str
) -> None:
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
    report = watch_once(
        dsn=pg_dsn,
        settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0, collections=COLLECTIONS),
    )
    assert report.new == SCENES + 1
    scenes = _scenes(pg_dsn)
    s2 = [s for s in scenes if s.card == "s2"]
    [bs] = [s for s in scenes if s.card == "bs"]
    for scene in scenes:
        _extract(pg_dsn, scene, scene.location)
    baseline, hists = _rows(pg_dsn), _rows(pg_dsn, "hists")
    assert len(baseline) > 40 * SCENES and hists
    tally = verify_truth(pg_dsn, world.truth_path, "ms", 2024)
    assert tally.ok and tally.expected > 40 * SCENES, tally

    base, served = http_root
    by_product = {p.name: p for p in world.product_paths}
    for scene in s2:
        safe = by_product[f"{scene.product_id}.SAFE"]
        i = world.product_paths.index(safe)
        local_items = world.earth_search_item_paths[2 * i : 2 * i + 2]
        remote_items = [write_earth_search_item(safe, served, f, href_base=base) for f in EARTH_SEARCH_FLAVOURS]
        urls = [f"{base}/{p.relative_to(served).as_posix()}" for p in remote_items]
        for location in (*map(str, local_items), *urls):
            with db.transaction(pg_dsn) as cur:  # wipe first, so rows cannot survive from the SAFE run
                cur.execute("DELETE FROM ms.sigs_2024 WHERE scene_id = %s", (scene.id,))
                cur.execute("DELETE FROM ms.hists_2024 WHERE scene_id = %s", (scene.id,))
            _extract(pg_dsn, scene, location)
            assert _rows(pg_dsn) == baseline, location
            assert _rows(pg_dsn, "hists") == hists, location

    # Backscatter as one COG per polarisation: the rows of the CARD COG, exactly.
    [rtc] = world.s1_rtc_item_paths
    with db.transaction(pg_dsn) as cur:
        cur.execute("DELETE FROM ms.sigs_2024 WHERE scene_id = %s", (bs.id,))
    _extract(pg_dsn, bs, str(rtc))
    assert _rows(pg_dsn) == baseline


def test_unreadable_items_are_permanent_failures(
    world: WorldSummary, cbm_env: Any, pg_dsn: str, tmp_path: Path
) -> None:
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
    watch_once(
        dsn=pg_dsn,
        settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0, collections=COLLECTIONS),
    )
    scene = next(s for s in _scenes(pg_dsn) if s.card == "s2")
    with pytest.raises(PermanentJobError, match="unreadable product"):
        _extract(pg_dsn, scene, str(tmp_path / "absent.json"))
    flagged = tmp_path / "flag-false.json"
    flagged.write_text(
        world.earth_search_item_paths[0]
        .read_text()
        .replace('"earthsearch:boa_offset_applied": true', '"earthsearch:boa_offset_applied": false')
    )
    with pytest.raises(PermanentJobError, match="unreliable"):
        _extract(pg_dsn, scene, str(flagged))


def test_the_band_set_is_a_dataset_setting(world: WorldSummary, cbm_env: Any, pg_dsn: str) -> None:
    """``datasets.s2_bands`` chooses the bands (each on its native grid); SCL histograms stay; a
    band the product does not have is a permanent failure naming it, never zeros."""
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
    watch_once(dsn=pg_dsn, settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0))
    scene = next(s for s in _scenes(pg_dsn) if s.card == "s2")
    _extract(pg_dsn, scene, scene.location)
    jrc, hists = _rows(pg_dsn), _rows(pg_dsn, "hists")
    assert {r[2] for r in jrc} == {"B02", "B03", "B04", "B05", "B08", "B11"}
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE datasets SET s2_bands = '{B11,B04}' WHERE aoi = 'ms' AND year = 2024")
    i = [p.name for p in world.product_paths].index(f"{scene.product_id}.SAFE")
    _extract(pg_dsn, scene, str(world.earth_search_item_paths[2 * i + 1]))  # sentinel-2-c1-l2a
    assert _rows(pg_dsn) == [r for r in jrc if r[2] in ("B04", "B11")]
    assert _rows(pg_dsn, "hists") == hists
    with db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE datasets SET s2_bands = '{B04,B12}' WHERE aoi = 'ms' AND year = 2024")
    with pytest.raises(PermanentJobError, match="B12"):
        _extract(pg_dsn, scene, scene.location)
    with pytest.raises(psycopg2.errors.CheckViolation, match="datasets_s2_bands_check"), db.transaction(pg_dsn) as cur:
        cur.execute("UPDATE datasets SET s2_bands = '{B10}' WHERE aoi = 'ms' AND year = 2024")


def test_cog_items_on_s3(world: WorldSummary, s3: Any, cbm_env: Any, pg_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    """Items and COGs in an object store (``s3://`` Item location, ``s3://`` asset hrefs read through
    the store's ``/vsis3/``): the SAFE's rows again."""
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        import_parcels(cur, world.parcels_path, "ms", 2024)
    watch_once(dsn=pg_dsn, settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0))
    scene = next(s for s in _scenes(pg_dsn) if s.card == "s2")
    _extract(pg_dsn, scene, scene.location)
    baseline, hists = _rows(pg_dsn), _rows(pg_dsn, "hists")
    bucket = f"cbm-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    safe = next(p for p in world.product_paths if p.name == f"{scene.product_id}.SAFE")
    staged = tmp_path / "staged"
    items = [write_earth_search_item(safe, staged, f, href_base=f"s3://{bucket}/cogs") for f in EARTH_SEARCH_FLAVOURS]
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"cogs/{path.relative_to(staged).as_posix()}")
    for item in items:
        location = f"s3://{bucket}/cogs/{item.relative_to(staged).as_posix()}"
        with db.transaction(pg_dsn) as cur:
            cur.execute("DELETE FROM ms.sigs_2024 WHERE scene_id = %s", (scene.id,))
            cur.execute("DELETE FROM ms.hists_2024 WHERE scene_id = %s", (scene.id,))
        _extract(pg_dsn, scene, location)
        assert _rows(pg_dsn) == baseline, location
        assert _rows(pg_dsn, "hists") == hists, location
